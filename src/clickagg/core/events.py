"""The event model: what ad servers send, and how it is validated and normalized.

Validation is msgspec (compiled), so a batch is checked in one pass with an error that names
the field (``$.timestamp``). Normalization turns the accepted events into columns
(:class:`~clickagg.core.columns.EventColumns`) split by partition, ready to append.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

from clickagg.core import ids
from clickagg.core.columns import ColumnBuilder, EventColumns
from clickagg.core.useragent import device_and_browser

Id = str | int
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
IdText = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
AnyId = IdText | Annotated[int, msgspec.Meta(ge=0)]

EARLIEST_MS = 946_684_800_000  # 2000-01-01T00:00:00Z: anything earlier is a unit mistake
_SECONDS_LIMIT = 100_000_000_000  # below this a number is epoch seconds, above it epoch ms


class IncomingEvent(msgspec.Struct, omit_defaults=True):
    """One event as sent, in either seed's shape. Unknown fields are ignored."""

    ad_id: AnyId
    timestamp: int | float | datetime
    event_type: Literal["click", "impression"] | None = None
    event_id: AnyId | None = None
    click_id: AnyId | None = None
    impression_id: AnyId | None = None
    advertiser_id: AnyId | None = None
    campaign_id: AnyId | None = None
    user_id: AnyId | None = None
    ip: ShortText | None = None
    user_agent: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    country: ShortText | None = None
    device: ShortText | None = None
    browser: ShortText | None = None
    cost_micros: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000_000)] | None = None


_single_decoder = msgspec.json.Decoder(IncomingEvent)
_array_decoder = msgspec.json.Decoder(list[IncomingEvent])
_raw_array_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_canonical_encoder = msgspec.json.Encoder(order="sorted")


class InvalidEvent(ValueError):
    """An event that cannot be accepted; the message names the field and the problem."""


@dataclass
class Rejection:
    index: int
    error: str


@dataclass
class NormalizedBatch:
    """Accepted events as columns per partition, plus what was rejected and why."""

    by_partition: dict[int, EventColumns] = field(default_factory=dict)
    ids: list[tuple[str, int]] = field(default_factory=list)  # (event_id, partition) in order
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.ids)


def decode_one(body: bytes) -> IncomingEvent:
    try:
        return _single_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidEvent(_describe(exc)) from None


def decode_many(body: bytes, *, ndjson: bool) -> tuple[list[IncomingEvent | None], list[Rejection]]:
    """Decode a JSON array or NDJSON body; a bad item is reported by index, not fatal.

    The whole-array decode is the fast path; only when it fails are items decoded one by
    one to say which of them are bad.
    """
    if ndjson:
        lines = [line for line in body.split(b"\n") if line.strip()]
        body = b"[" + b",".join(lines) + b"]"
    try:
        return list(_array_decoder.decode(body)), []
    except msgspec.DecodeError:
        pass
    try:
        raw_items = _raw_array_decoder.decode(body)
    except msgspec.DecodeError as exc:
        if ndjson:
            return _decode_lines_one_by_one(lines)
        raise InvalidEvent(f"body is not a JSON array of events: {_describe(exc)}") from None
    events: list[IncomingEvent | None] = []
    rejected: list[Rejection] = []
    for index, raw in enumerate(raw_items):
        try:
            events.append(_single_decoder.decode(raw))
        except msgspec.DecodeError as exc:
            events.append(None)
            rejected.append(Rejection(index, _describe(exc)))
    return events, rejected


def _decode_lines_one_by_one(
    lines: list[bytes],
) -> tuple[list[IncomingEvent | None], list[Rejection]]:
    events: list[IncomingEvent | None] = []
    rejected: list[Rejection] = []
    for index, line in enumerate(lines):
        try:
            events.append(_single_decoder.decode(line))
        except msgspec.DecodeError as exc:
            events.append(None)
            rejected.append(Rejection(index, _describe(exc)))
    return events, rejected


def _describe(exc: msgspec.DecodeError) -> str:
    text = str(exc)
    if text.startswith("JSON is malformed"):
        return "malformed JSON: " + text
    return text


def timestamp_ms(value: int | float | datetime) -> int:
    """Epoch seconds, epoch milliseconds or an ISO-8601 time (naive means UTC) → epoch ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    if isinstance(value, bool):
        raise InvalidEvent("timestamp must be a number or an ISO-8601 string - at `$.timestamp`")
    if abs(value) < _SECONDS_LIMIT:
        return round(value * 1000)
    return int(value)


def _text(value: Id | None) -> str | None:
    return None if value is None else str(value)


def event_id_of(event: IncomingEvent, event_type: int, ts_ms: int) -> str:
    """The event's own id, or a stable hash of its canonical payload when it has none."""
    given = event.event_id
    if given is None:
        given = event.click_id if event_type == ids.CLICK else event.impression_id
    if given is None:
        given = event.click_id or event.impression_id
    if given is not None:
        return str(given)
    canonical = msgspec.structs.asdict(event)
    canonical["timestamp"] = ts_ms
    canonical["event_type"] = ids.EVENT_TYPES[event_type]
    canonical = {key: value for key, value in canonical.items() if value is not None}
    return ids.synthesized_id(_canonical_encoder.encode(canonical))


def normalize(
    events: list[IncomingEvent | None],
    *,
    default_type: int | None,
    partitions: int,
    now_ms: int,
    max_future_ms: int,
    rejected: list[Rejection] | None = None,
) -> NormalizedBatch:
    """Validate what the schema cannot (time bounds, type) and build per-partition columns.

    ``default_type`` is the endpoint's event type; batch items name theirs in ``event_type``.
    ``None`` items were already rejected by the decoder.
    """
    batch = NormalizedBatch(rejected=list(rejected or ()))
    builders: dict[int, ColumnBuilder] = {}
    latest_allowed = now_ms + max_future_ms
    for index, event in enumerate(events):
        if event is None:
            continue
        try:
            event_type = _event_type(event, default_type)
            ts_ms = timestamp_ms(event.timestamp)
            if ts_ms < EARLIEST_MS:
                raise InvalidEvent(
                    "timestamp is before 2000-01-01; send epoch seconds, epoch ms or "
                    "ISO-8601 - at `$.timestamp`"
                )
            if ts_ms > latest_allowed:
                raise InvalidEvent(
                    f"timestamp is more than {max_future_ms // 1000} s in the future "
                    "- at `$.timestamp`"
                )
        except InvalidEvent as exc:
            batch.rejected.append(Rejection(index, str(exc)))
            continue
        event_id = event_id_of(event, event_type, ts_ms)
        fp_high, fp_low = ids.fingerprint(event_type, event_id)
        partition = ids.partition_of(fp_low, partitions)
        device, browser = event.device, event.browser
        if event.user_agent and (device is None or browser is None):
            parsed_device, parsed_browser = device_and_browser(event.user_agent)
            device = device or parsed_device
            browser = browser or parsed_browser
        user_id = _text(event.user_id)
        builder = builders.get(partition)
        if builder is None:
            builder = builders[partition] = ColumnBuilder()
        builder.add(
            event_id=event_id,
            fp_high=fp_high,
            fp_low=fp_low,
            event_type=event_type,
            ts_ms=ts_ms,
            received_ms=now_ms,
            cost_micros=-1 if event.cost_micros is None else event.cost_micros,
            user_hash=ids.user_hash(user_id),
            ad_id=str(event.ad_id),
            advertiser_id=_text(event.advertiser_id),
            campaign_id=_text(event.campaign_id),
            user_id=user_id,
            ip=event.ip,
            user_agent=event.user_agent,
            country=event.country.upper() if event.country else None,
            device=device.lower() if device else None,
            browser=browser,
        )
        batch.ids.append((event_id, partition))
    batch.by_partition = {p: b.build() for p, b in sorted(builders.items())}
    batch.rejected.sort(key=lambda r: r.index)
    return batch


def _event_type(event: IncomingEvent, default_type: int | None) -> int:
    if event.event_type is not None:
        code = ids.EVENT_TYPE_CODES[event.event_type]
        if default_type is not None and code != default_type:
            raise InvalidEvent(
                f"event_type {event.event_type!r} does not match this endpoint - at `$.event_type`"
            )
        return code
    if default_type is None:
        raise InvalidEvent(
            "Object missing required field `event_type` (click or impression) - at `$.event_type`"
        )
    return default_type
