"""The event model: what ad servers send, and how it is validated and normalized.

Validation is msgspec (compiled), so a batch is checked in one pass with an error that names
the field (``$.timestamp``). Normalization turns the accepted events into columns
(:class:`~clickagg.core.columns.EventColumns`) split by partition, ready to append.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, cast

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import xxhash

from clickagg.core import columns, ids
from clickagg.core.columns import EventColumns
from clickagg.core.useragent import device_and_browser

Id = str | int
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
IdText = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
AnyId = IdText | Annotated[int, msgspec.Meta(ge=0)]

EARLIEST_MS = 946_684_800_000  # 2000-01-01T00:00:00Z: anything earlier is a unit mistake
_SECONDS_LIMIT = 100_000_000_000  # below this a number is epoch seconds, above it epoch ms
SMALL_BATCH = 32  # up to this many events, text columns skip Arrow's fixed per-call costs


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
    event_ids: list[str] = field(default_factory=list)  # accepted, in request order
    partitions: list[int] = field(default_factory=list)  # partition of each accepted event
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.event_ids)


# Everything decoding untrusted bytes can raise: msgspec's DecodeError (a ValueError, as is
# the UnicodeDecodeError of a JSON string that is not UTF-8), RecursionError when nesting
# exceeds the interpreter's recursion limit (about 1,000 levels, less the caller's stack),
# OverflowError from a number that fits nothing.
DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RecursionError, OverflowError)


def decode_one(body: bytes) -> IncomingEvent:
    try:
        return _single_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise InvalidEvent(_describe(exc)) from None


def decode_many(body: bytes, *, ndjson: bool) -> tuple[list[IncomingEvent | None], list[Rejection]]:
    """Decode a JSON array or NDJSON body; a bad item is reported by index, not fatal.

    The whole-body decode is the fast path; only when it fails are items decoded one by
    one to say which of them are bad. A JSON array that cannot even be split into items
    (malformed, or nested too deeply to walk) is refused whole with the reason.
    """
    if ndjson:
        with contextlib.suppress(*DECODE_ERRORS):
            decoded = _single_decoder.decode_lines(body)
            # one object per line, or the exact path below says which line is wrong
            if len(decoded) == body.count(b"\n") + (not body.endswith(b"\n")):
                return list(decoded), []
        return _decode_lines_in_chunks([line for line in body.split(b"\n") if line.strip()])
    with contextlib.suppress(*DECODE_ERRORS):
        return list(_array_decoder.decode(body)), []
    try:
        raw_items = _raw_array_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise InvalidEvent(f"body is not a JSON array of events: {_describe(exc)}") from None
    items: list[IncomingEvent | None] = []
    problems: list[Rejection] = []
    for index, raw in enumerate(raw_items):
        try:
            items.append(_single_decoder.decode(raw))
        except DECODE_ERRORS as exc:
            items.append(None)
            problems.append(Rejection(index, _describe(exc)))
    return items, problems


def _decode_lines_in_chunks(
    lines: list[bytes], chunk: int = 16
) -> tuple[list[IncomingEvent | None], list[Rejection]]:
    """Decode NDJSON lines a small chunk at a time, and only the chunks holding a bad line
    line by line: a few bad lines cost little more than a clean body."""
    events: list[IncomingEvent | None] = []
    rejected: list[Rejection] = []
    for start in range(0, len(lines), chunk):
        part = lines[start : start + chunk]
        with contextlib.suppress(*DECODE_ERRORS):
            decoded = _single_decoder.decode_lines(b"\n".join(part))
            if len(decoded) == len(part):
                events.extend(decoded)
                continue
        for index, line in enumerate(part, start):
            try:
                values = _single_decoder.decode_lines(line)
                if len(values) != 1:
                    raise msgspec.DecodeError("one JSON object per line expected")
                events.append(values[0])
            except DECODE_ERRORS as exc:
                events.append(None)
                rejected.append(Rejection(index, _describe(exc)))
    return events, rejected


def _describe(exc: Exception) -> str:
    """The reason to send back: msgspec's own message names the field (``$.timestamp``)."""
    if isinstance(exc, msgspec.ValidationError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "malformed JSON: nested too deeply (at most about 1,000 levels; an event needs 2)"
    if isinstance(exc, UnicodeDecodeError):
        return f"malformed JSON: a string is not valid UTF-8 ({exc.reason})"
    return f"malformed JSON: {exc}"


def timestamp_ms(value: int | float | datetime) -> int:
    """Epoch seconds, epoch milliseconds or an ISO-8601 time (naive means UTC) → epoch ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    if abs(value) < _SECONDS_LIMIT:
        return round(value * 1000)
    return int(value)


def _text(value: Id | None) -> str | None:
    return None if value is None else str(value)


_STR_OR_NONE = frozenset((str, type(None)))


def _texts(values: list[Id | None]) -> list[str | None]:
    """:func:`_text` of each value: no call per value when all are strings or null."""
    if set(map(type, values)) <= _STR_OR_NONE:
        return cast(list[str | None], values)
    return [_text(v) for v in values]


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
    ``None`` items were already rejected by the decoder. Column by column: one pass of
    compiled code per field (list comprehensions, numpy, xxhash digests joined into one
    buffer), with per-event Python only on the rare paths (no id given, bad values).
    """
    problems: dict[int, str] = {}
    positions = [i for i, event in enumerate(events) if event is not None]
    valid = cast(list[IncomingEvent], [events[i] for i in positions])
    if len(valid) == 1:
        return _normalize_one(
            valid[0],
            positions[0],
            default_type=default_type,
            partitions=partitions,
            now_ms=now_ms,
            max_future_ms=max_future_ms,
            rejected=list(rejected or ()),
        )
    types = _event_types(valid, default_type, problems)
    ts_ms = _timestamps(valid, now_ms + max_future_ms, max_future_ms, problems)
    if problems:
        keep = [n for n in range(len(valid)) if n not in problems]
        batch_rejections = [Rejection(positions[n], problem) for n, problem in problems.items()]
        valid = [valid[n] for n in keep]
        types = types[keep]
        ts_ms = ts_ms[keep]
        positions = [positions[n] for n in keep]
    else:
        batch_rejections = []
    all_rejected = sorted([*(rejected or ()), *batch_rejections], key=lambda r: r.index)
    if not valid:
        return NormalizedBatch(rejected=all_rejected)
    event_ids = _event_ids(valid, types, ts_ms)
    fp_high, fp_low = _fingerprints(event_ids, types)
    partition = (fp_low % np.uint64(partitions)).astype(np.int64)
    user_ids = _texts([e.user_id for e in valid])
    devices, browsers = _devices_and_browsers(valid)
    numeric: dict[str, npt.NDArray[Any]] = {
        "fp_high": fp_high,
        "fp_low": fp_low,
        "event_type": types.astype(np.uint8),
        "ts_ms": ts_ms,
        "received_ms": np.full(len(valid), now_ms, dtype=np.int64),
        "cost_micros": np.array(
            [-1 if e.cost_micros is None else e.cost_micros for e in valid], dtype=np.int64
        ),
        "user_hash": np.array(
            [0 if u is None else (xxhash.xxh3_64_intdigest(u.encode()) or 1) for u in user_ids],
            dtype=np.uint64,
        ),
    }
    text: dict[str, list[Any]] = {
        "event_id": event_ids,
        "ad_id": [e.ad_id if type(e.ad_id) is str else str(e.ad_id) for e in valid],
        "advertiser_id": _texts([e.advertiser_id for e in valid]),
        "campaign_id": _texts([e.campaign_id for e in valid]),
        "user_id": user_ids,
        "ip": [e.ip for e in valid],
        "user_agent": [e.user_agent for e in valid],
        "country": [e.country.upper() if e.country else None for e in valid],
        "device": devices,
        "browser": browsers,
    }
    return NormalizedBatch(
        by_partition=split_by_partition(partition, numeric, text),
        event_ids=event_ids,
        partitions=partition.tolist(),
        rejected=all_rejected,
    )


def split_by_partition(
    partition: npt.NDArray[np.int64],
    numeric: dict[str, npt.NDArray[Any]],
    text: dict[str, list[Any]],
) -> dict[int, EventColumns]:
    """One EventColumns per partition present, events in request order within each."""
    order = np.argsort(partition, kind="stable")
    present, starts = np.unique(partition[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    if len(partition) <= SMALL_BATCH:
        return {
            p: columns.build(numeric, text, order[bounds[n] : bounds[n + 1]])
            for n, p in enumerate(present.tolist())
        }
    arrays = {name: pa.array(values, type=pa.string()) for name, values in text.items()}
    return dict(
        zip(present.tolist(), columns.build_runs(numeric, arrays, order, bounds), strict=True)
    )


def _event_types(
    valid: list[IncomingEvent], default_type: int | None, problems: dict[int, str]
) -> npt.NDArray[np.int64]:
    names = [e.event_type for e in valid]
    if default_type is None:
        codes = [ids.EVENT_TYPE_CODES.get(name, -1) if name else -1 for name in names]
        for n, code in enumerate(codes):
            if code < 0:
                problems[n] = _MISSING_TYPE
    else:
        codes = [default_type if name is None else ids.EVENT_TYPE_CODES[name] for name in names]
        for n, code in enumerate(codes):
            if code != default_type:
                problems[n] = _wrong_type(names[n])
    return np.array(codes, dtype=np.int64)


def _timestamps(
    valid: list[IncomingEvent], latest_ms: int, max_future_ms: int, problems: dict[int, str]
) -> npt.NDArray[np.int64]:
    raw = [e.timestamp for e in valid]
    ts_ms: npt.NDArray[np.int64]
    try:
        if not all(type(v) is int for v in raw):
            raise TypeError
        values = np.array(raw, dtype=np.int64)
        ts_ms = np.where(np.abs(values) < _SECONDS_LIMIT, values * 1000, values)
    except (TypeError, OverflowError):
        ts_ms = np.array([_timestamp_or_sentinel(v) for v in raw], dtype=np.int64)
    for n in np.flatnonzero((ts_ms < EARLIEST_MS) | (ts_ms > latest_ms)).tolist():
        if n not in problems:
            problems[n] = _time_problem(int(ts_ms[n]), max_future_ms)
    return ts_ms


_MISSING_TYPE = (
    "Object missing required field `event_type` (click or impression) - at `$.event_type`"
)


def _wrong_type(name: str | None) -> str:
    return f"event_type {name!r} does not match this endpoint - at `$.event_type`"


def _time_problem(ts_ms: int, max_future_ms: int) -> str:
    if ts_ms < EARLIEST_MS:
        return (
            "timestamp is before 2000-01-01 or not a valid time; send epoch seconds, "
            "epoch ms or ISO-8601 - at `$.timestamp`"
        )
    return f"timestamp is more than {max_future_ms // 1000} s in the future - at `$.timestamp`"


def _timestamp_or_sentinel(value: int | float | datetime) -> int:
    try:
        ms = timestamp_ms(value)
    except (OverflowError, ValueError, OSError):
        return -1
    return ms if -(2**62) < ms < 2**62 else -1


def _event_ids(
    valid: list[IncomingEvent], types: npt.NDArray[np.int64], ts_ms: npt.NDArray[np.int64]
) -> list[str]:
    given = [
        e.event_id if e.event_id is not None else _typed_id(e, code)
        for e, code in zip(valid, types.tolist(), strict=True)
    ]
    return [
        (value if type(value) is str else str(value))
        if value is not None
        else event_id_of(valid[n], int(types[n]), int(ts_ms[n]))
        for n, value in enumerate(given)
    ]


def _typed_id(event: IncomingEvent, code: int) -> Id | None:
    preferred = event.click_id if code == ids.CLICK else event.impression_id
    if preferred is not None:
        return preferred
    return event.click_id if event.click_id is not None else event.impression_id


def _fingerprints(
    event_ids: list[str], types: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The same values as :func:`ids.fingerprint`, computed into one buffer."""
    digest = xxhash.xxh3_128_digest
    joined = b"".join(
        [digest(i.encode(), seed) for i, seed in zip(event_ids, types.tolist(), strict=True)]
    )
    halves = np.frombuffer(joined, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return np.ascontiguousarray(halves[:, 0]), np.ascontiguousarray(halves[:, 1])


def _devices_and_browsers(valid: list[IncomingEvent]) -> tuple[list[Any], list[Any]]:
    """:func:`_device_and_browser` of each event, with each distinct user agent parsed (a
    cache lookup) once per batch: most events send neither device nor browser, and real
    traffic repeats few agents."""
    agents = {e.user_agent for e in valid if e.device is None and e.browser is None}
    parsed = {agent: device_and_browser(agent) for agent in agents if agent}
    unknown = (None, None)
    pairs = [
        parsed.get(e.user_agent or "", unknown)
        if e.device is None and e.browser is None
        else _device_and_browser(e)
        for e in valid
    ]
    return [d for d, _ in pairs], [b for _, b in pairs]


def _device_and_browser(event: IncomingEvent) -> tuple[str | None, str | None]:
    """As sent, else derived from the user agent; device lower-cased."""
    device, browser = event.device, event.browser
    if event.user_agent and (device is None or browser is None):
        parsed_device, parsed_browser = device_and_browser(event.user_agent)
        device = device or parsed_device
        browser = browser or parsed_browser
    return (device.lower() if device else None), browser


_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


def _normalize_one(
    event: IncomingEvent,
    position: int,
    *,
    default_type: int | None,
    partitions: int,
    now_ms: int,
    max_future_ms: int,
    rejected: list[Rejection],
) -> NormalizedBatch:
    """:func:`normalize` for a single event in plain Python: a one-event request should
    not pay numpy's and Arrow's per-call costs. The same rules, the same log columns
    (``tests/core/test_events.py`` compares the two paths)."""
    name = event.event_type
    if default_type is None:
        code = ids.EVENT_TYPE_CODES.get(name, -1) if name else -1
        problem = _MISSING_TYPE if code < 0 else None
    else:
        code = default_type if name is None else ids.EVENT_TYPE_CODES[name]
        problem = _wrong_type(name) if code != default_type else None
    ts_ms = 0
    if problem is None:
        ts_ms = _timestamp_or_sentinel(event.timestamp)
        if ts_ms < EARLIEST_MS or ts_ms > now_ms + max_future_ms:
            problem = _time_problem(ts_ms, max_future_ms)
    if problem is not None:
        all_rejected = sorted([*rejected, Rejection(position, problem)], key=lambda r: r.index)
        return NormalizedBatch(rejected=all_rejected)
    given = event.event_id if event.event_id is not None else _typed_id(event, code)
    event_id = event_id_of(event, code, ts_ms) if given is None else str(given)
    fp_high, fp_low = ids.fingerprint(code, event_id)
    partition = ids.partition_of(fp_low, partitions)
    user_id = _text(event.user_id)
    device, browser = _device_and_browser(event)
    one = columns.TextColumn.of_one
    cols = EventColumns(
        count=1,
        fp_high=_U64.pack(fp_high),
        fp_low=_U64.pack(fp_low),
        event_type=bytes((code,)),
        ts_ms=_I64.pack(ts_ms),
        received_ms=_I64.pack(now_ms),
        cost_micros=_I64.pack(-1 if event.cost_micros is None else event.cost_micros),
        user_hash=_U64.pack(ids.user_hash(user_id)),
        event_id=one(event_id),
        ad_id=one(str(event.ad_id)),
        advertiser_id=one(_text(event.advertiser_id)),
        campaign_id=one(_text(event.campaign_id)),
        user_id=one(user_id),
        ip=one(event.ip),
        user_agent=one(event.user_agent),
        country=one(event.country.upper() if event.country else None),
        device=one(device),
        browser=one(browser),
    )
    return NormalizedBatch(
        by_partition={partition: cols},
        event_ids=[event_id],
        partitions=[partition],
        rejected=list(rejected),
    )
