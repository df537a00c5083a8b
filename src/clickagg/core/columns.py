"""The log's record format: a batch of events as columns, stored as Arrow IPC.

A log frame's payload is one Arrow IPC stream: the schema, then one record batch. Anything
with pyarrow (an archiver, Spark, a NATS consumer) reads a frame without clickagg::

    pa.ipc.open_stream(frame.payload).read_all()

The schema is fixed (:data:`SCHEMA`); row ``i`` of a frame is the event at log offset
``frame.base_offset + i`` (offsets count events, not frames). Numeric columns, never null:

* ``fp_high``, ``fp_low`` (uint64): the 128-bit fingerprint of (event type, event id), the
  dedup key; ``fp_low`` picks the partition.
* ``event_type`` (uint8): 0 click, 1 impression.
* ``ts_ms`` (int64): event time; ``received_ms`` (int64): ingest time; epoch milliseconds.
* ``cost_micros`` (int64): the event's cost; -1 when not given (the ad's CPC applies).
* ``user_hash`` (uint64): xxh3-64 of ``user_id``, never 0; 0 when there is no user id.

Text columns, Arrow ``string`` (UTF-8), as sent (ids sent as numbers in decimal):

* ``event_id`` (never null; synthesized from the payload when none was sent) and
  ``ad_id`` (never null).
* ``advertiser_id``, ``campaign_id``, ``user_id``, ``ip``, ``user_agent``: null when not
  sent.
* ``country`` (upper-cased), ``device`` (lower-cased), ``browser``: as sent, device and
  browser else derived from the user agent; null when unknown.

Writing. :class:`EventColumns` holds a batch as plain buffers (numeric columns as
little-endian numpy bytes, text as Arrow string offsets and data): the ingest path builds it
with no Arrow call for a small request, and the group committer concatenates requests with
byte joins. :func:`encode` wraps the buffers as Arrow arrays without copying and serializes
once per frame. The stream it writes is the schema message (serialized once per process),
the record batch message and the end-of-stream marker: byte for byte what
``pa.ipc.new_stream`` writes, without opening a writer per frame. Arrow's fixed costs
(an object per column, the batch's metadata) make a frame cost about 30 µs to encode
whatever its size; the group committer pays that once per partition per group, off the
event loop, not once per request.

No IPC compression. Measured with pyarrow 26 on traffic from ``clickagg.traffic``, per event,
against the same stream uncompressed (257 B, 0.013 µs to write, 0.012 µs to read):

* 1,000-event frame: lz4 97 B, +0.11 µs to write, +0.09 µs to read; zstd 65 B, +0.31 µs
  and +0.41 µs.
* 1-event frame (2.3 kB, nearly all schema and metadata): lz4 3.0 kB and +75 µs to write and
  read; zstd 2.9 kB and +280 µs. Compression is per buffer, and codec setup is per call.

The log is retention-bounded local disk, and both ends of a frame are hot paths (the group
commit thread and the worker), so bytes are not worth that time, let alone +75 µs for a
single-event frame. Every reader would also need the codec. Revisit when the log's bytes
cross a network (a NATS or Kafka log): lz4 on frames of hundreds of events or more is the
candidate, and readers need no change (the stream says how it is compressed).

Reading. :func:`decode` returns a frame's ``pa.Table``; for a frame :func:`encode` wrote it
skips parsing the schema again. :func:`decode_run` reads a run of frames into one table,
and :func:`to_frame` turns that into the polars DataFrame the worker processes, with one
conversion per run rather than per frame. No event and no string ever becomes a Python
object on the way from the log to the aggregates.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from clickagg.core import ids

NUMERIC_COLUMNS: dict[str, type[np.generic]] = {
    "fp_high": np.uint64,
    "fp_low": np.uint64,
    "event_type": np.uint8,
    "ts_ms": np.int64,
    "received_ms": np.int64,
    "cost_micros": np.int64,  # -1: not given, the ad's CPC applies
    "user_hash": np.uint64,  # 0: no user id
}
TEXT_COLUMNS = (
    "event_id",
    "ad_id",
    "advertiser_id",
    "campaign_id",
    "user_id",
    "ip",
    "user_agent",
    "country",
    "device",
    "browser",
)
_NEVER_NULL_TEXT = ("event_id", "ad_id")

SCHEMA = pa.schema(
    [
        *(
            pa.field(name, pa.from_numpy_dtype(dtype), nullable=False)
            for name, dtype in NUMERIC_COLUMNS.items()
        ),
        *(
            pa.field(name, pa.string(), nullable=name not in _NEVER_NULL_TEXT)
            for name in TEXT_COLUMNS
        ),
    ]
)
"""The schema of every log frame (see the module docstring)."""


class TextColumn(msgspec.Struct):
    """A text column as Arrow ``string`` buffers: int32 offsets and UTF-8 bytes, plus one
    byte per row (1 = present) when the column has nulls. Bytes rather than Arrow's bitmap
    make concatenation (group commit) a plain join."""

    offsets: bytes
    data: bytes
    valid: bytes  # empty when there is no null

    @classmethod
    def of(cls, array: pa.Array) -> TextColumn:
        """From an Arrow string array (the vectorized path, for larger batches)."""
        if array.offset:
            array = pa.concat_arrays([array])  # rebase a slice so its buffers start at 0
        _, offsets, data = array.buffers()
        count = len(array)
        valid = b""
        if array.null_count:
            valid = array.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8).tobytes()
        return cls(
            offsets=offsets.to_pybytes()[: 4 * (count + 1)] if offsets else _ZERO_OFFSET,
            data=data.to_pybytes() if data else b"",
            valid=valid,
        )

    @classmethod
    def of_list(cls, values: Sequence[str | None]) -> TextColumn:
        """From Python strings (the path for a handful of events: no fixed Arrow costs)."""
        encoded = [b"" if v is None else v.encode() for v in values]
        offsets = array("i", accumulate(map(len, encoded), initial=0)).tobytes()
        has_null = any(v is None for v in values)
        valid = bytes(v is not None for v in values) if has_null else b""
        return cls(offsets=offsets, data=b"".join(encoded), valid=valid)

    @classmethod
    def of_one(cls, value: str | None) -> TextColumn:
        """One row (a single-event request): what ``of_list([value])`` gives, without the
        list, the accumulate and the array."""
        if value is None:
            return _NULL_ROW
        data = value.encode()
        return cls(offsets=_ONE_ROW.pack(0, len(data)), data=data, valid=b"")

    def array(self, count: int) -> pa.Array:
        validity = None
        null_count = 0
        if self.valid:
            null_count = count - self.valid.count(1)
            validity = pa.py_buffer(_bitmap(self.valid))
        buffers = [validity, pa.py_buffer(self.offsets), pa.py_buffer(self.data)]
        return pa.Array.from_buffers(pa.string(), count, buffers, null_count=null_count)

    @staticmethod
    def concat(parts: Sequence[TextColumn], counts: Sequence[int]) -> TextColumn:
        if sum(counts) <= SMALL_CONCAT:
            return TextColumn._concat_small(parts, counts)
        return TextColumn._concat_numpy(parts, counts)

    @staticmethod
    def _concat_numpy(parts: Sequence[TextColumn], counts: Sequence[int]) -> TextColumn:
        starts = np.cumsum([0, *(len(p.data) for p in parts[:-1])], dtype=np.int64)
        shifted = [
            np.frombuffer(p.offsets, dtype=np.int32)[:-1] + np.int32(start)
            for p, start in zip(parts, starts.tolist(), strict=True)
        ]
        total = int(starts[-1]) + len(parts[-1].data)
        offsets = np.concatenate([*shifted, np.array([total], dtype=np.int32)])
        valid = b""
        if any(p.valid for p in parts):
            valid = b"".join(
                p.valid or b"\x01" * count for p, count in zip(parts, counts, strict=True)
            )
        return TextColumn(
            offsets=offsets.astype(np.int32).tobytes(),
            data=b"".join(p.data for p in parts),
            valid=valid,
        )

    @staticmethod
    def _concat_small(parts: Sequence[TextColumn], counts: Sequence[int]) -> TextColumn:
        """:meth:`concat` in plain Python: a group commit of single-event requests merges
        dozens of one-row columns per partition, where numpy's per-call costs (two calls
        per part) were most of the group's CPU."""
        if 0 not in counts and sum(counts) == len(counts):  # one row each: just lengths
            offsets = array("i", accumulate([len(p.data) for p in parts], initial=0))
        else:
            offsets = array("i", [0])
            end = 0
            for part, count in zip(parts, counts, strict=True):
                if count:
                    offsets.extend([end + o for o in array("i", part.offsets)[1:]])
                    end += len(part.data)
        valid = b""
        if any(p.valid for p in parts):
            valid = b"".join(
                p.valid or b"\x01" * count for p, count in zip(parts, counts, strict=True)
            )
        return TextColumn(
            offsets=offsets.tobytes(), data=b"".join(p.data for p in parts), valid=valid
        )


SMALL_CONCAT = 256  # rows: up to this many, concat in plain Python beats numpy
_ZERO_OFFSET = b"\0\0\0\0"
_ONE_ROW = struct.Struct("<ii")
_NULL_ROW = TextColumn(offsets=_ONE_ROW.pack(0, 0), data=b"", valid=b"\x00")
_BINARY_DIGITS = bytes.maketrans(b"\0\1", b"01")


def _bitmap(valid: bytes) -> bytes:
    """Arrow's validity bitmap (least significant bit first) of one byte per row."""
    if len(valid) <= 64:  # a Python int beats numpy's fixed per-call costs here
        bits = int(valid.translate(_BINARY_DIGITS)[::-1], 2)
        return bits.to_bytes((len(valid) + 7) // 8, "little")
    return np.packbits(np.frombuffer(valid, dtype=np.uint8), bitorder="little").tobytes()


class EventColumns(msgspec.Struct):
    """A batch of normalized events as buffers, on its way into one log frame."""

    count: int
    fp_high: bytes
    fp_low: bytes
    event_type: bytes
    ts_ms: bytes
    received_ms: bytes
    cost_micros: bytes
    user_hash: bytes
    event_id: TextColumn
    ad_id: TextColumn
    advertiser_id: TextColumn
    campaign_id: TextColumn
    user_id: TextColumn
    ip: TextColumn
    user_agent: TextColumn
    country: TextColumn
    device: TextColumn
    browser: TextColumn

    def numeric(self, name: str) -> npt.NDArray[Any]:
        return np.frombuffer(getattr(self, name), dtype=NUMERIC_COLUMNS[name])

    def text(self, name: str) -> pa.Array:
        column: TextColumn = getattr(self, name)
        return column.array(self.count)

    def record_batch(self) -> pa.RecordBatch:
        """The batch as Arrow arrays over the same buffers (no copy)."""
        count = self.count
        arrays = [
            pa.Array.from_buffers(
                field.type, count, [None, pa.py_buffer(getattr(self, field.name))]
            )
            for field in _NUMERIC_FIELDS
        ]
        arrays += [getattr(self, name).array(count) for name in TEXT_COLUMNS]
        return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


_NUMERIC_FIELDS = [SCHEMA.field(name) for name in NUMERIC_COLUMNS]
_SCHEMA_MESSAGE = SCHEMA.serialize().to_pybytes()
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # continuation marker, length 0


def encode(columns: EventColumns) -> bytes:
    """One frame's payload: an Arrow IPC stream of the schema and one record batch."""
    return b"".join((_SCHEMA_MESSAGE, columns.record_batch().serialize(), _END_OF_STREAM))


def encode_table(events: pa.Table) -> bytes:
    """A frame's payload from a table of :data:`SCHEMA` (one record batch)."""
    batches = events.cast(SCHEMA).combine_chunks().to_batches()
    batch = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=SCHEMA)
    return b"".join((_SCHEMA_MESSAGE, batch.serialize(), _END_OF_STREAM))


def events_from_decisions(decided: pa.Table) -> pa.Table:
    """The log's events back from archived decisions (``clickagg.core.decisions``), which
    carry every field of an event: what a log repair rebuilds a damaged frame from."""
    frame = pl.from_arrow(decided)
    assert isinstance(frame, pl.DataFrame)
    user_hash = np.array([ids.user_hash(u) for u in frame["user_id"]], dtype=np.uint64)
    rebuilt = frame.select(
        "fp_high",
        "fp_low",
        pl.col("event_type")
        .replace_strict(ids.EVENT_TYPE_CODES, return_dtype=pl.UInt8)
        .alias("event_type"),
        "ts_ms",
        "received_ms",
        pl.col("cost_micros").fill_null(-1),
        pl.Series("user_hash", user_hash),
        *TEXT_COLUMNS,
    )
    return rebuilt.to_arrow().cast(SCHEMA)


class FrameFormatError(ValueError):
    """A frame's payload is not an Arrow IPC stream of :data:`SCHEMA`."""


def decode(payload: bytes) -> pa.Table:
    """A frame's events: an Arrow IPC stream of :data:`SCHEMA`."""
    return decode_run([payload])


def decode_run(payloads: Sequence[bytes]) -> pa.Table:
    """The events of several frames, in order, as one table (no copy: a chunk per frame)."""
    batches = [batch for payload in payloads for batch in _record_batches(payload)]
    return pa.Table.from_batches(batches, schema=SCHEMA)


def _record_batches(payload: bytes) -> list[pa.RecordBatch]:
    try:
        if payload.startswith(_SCHEMA_MESSAGE):
            # What encode writes: skip parsing the schema again (most of the cost of a
            # small frame); read the batch and check that only the end of stream follows.
            reader = pa.BufferReader(payload)
            reader.seek(len(_SCHEMA_MESSAGE))
            message = pa.ipc.read_message(reader)
            if message.type == "record batch" and payload[reader.tell() :] == _END_OF_STREAM:
                return [pa.ipc.read_record_batch(message, SCHEMA)]
        stream = pa.ipc.open_stream(payload)
        if not stream.schema.equals(SCHEMA):
            raise FrameFormatError(f"log frame has an unexpected schema:\n{stream.schema}")
        return list(stream)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FrameFormatError(
            f"log frame is not an Arrow IPC stream ({exc}); logs written before frames "
            "became Arrow IPC cannot be read"
        ) from exc


def build(
    numeric: dict[str, npt.NDArray[Any]],
    text: dict[str, pa.Array] | dict[str, list[Any]],
    rows: npt.NDArray[Any],
) -> EventColumns:
    """Columns of the events at positions ``rows`` (in that order). Text may be Arrow
    arrays (vectorized take) or, for a handful of events, plain lists."""
    fields: dict[str, Any] = {
        name: np.ascontiguousarray(values[rows], dtype=NUMERIC_COLUMNS[name]).tobytes()
        for name, values in numeric.items()
    }
    picked = rows.tolist()
    indices = None
    for name, values in text.items():
        if isinstance(values, list):
            fields[name] = TextColumn.of_list([values[i] for i in picked])
        else:
            if indices is None:
                indices = pa.array(rows)
            fields[name] = TextColumn.of(values.take(indices))
    return EventColumns(count=len(picked), **fields)


def build_runs(
    numeric: dict[str, npt.NDArray[Any]],
    text: dict[str, pa.Array],
    order: npt.NDArray[np.int64],
    bounds: Sequence[int],
) -> list[EventColumns]:
    """Columns of the events at ``order[bounds[n]:bounds[n + 1]]``, one set per ``n``: the
    same as :func:`build` of each run, but every column is reordered with ONE take and then
    cut into runs by slicing its buffers. A batch split over 8 partitions took 8 takes per
    text column before, and Arrow's fixed cost per take was most of the work."""
    runs = range(len(bounds) - 1)
    fields: list[dict[str, Any]] = [{} for _ in runs]
    for name, values in numeric.items():
        ordered = np.ascontiguousarray(values[order], dtype=NUMERIC_COLUMNS[name])
        for n in runs:
            fields[n][name] = ordered[bounds[n] : bounds[n + 1]].tobytes()
    indices = pa.array(order)
    for name, values in text.items():
        taken = values.take(indices)  # a new array: its buffers start at row 0
        _, offsets_buffer, data_buffer = taken.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int32, count=len(taken) + 1)
        data = data_buffer.to_pybytes() if data_buffer is not None else b""
        valid = None
        if taken.null_count:
            valid = taken.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8)
        for n in runs:
            lo, hi = bounds[n], bounds[n + 1]
            start, end = int(offsets[lo]), int(offsets[hi])
            run_valid = b""
            if valid is not None and not valid[lo:hi].all():
                run_valid = valid[lo:hi].tobytes()
            fields[n][name] = TextColumn(
                offsets=(offsets[lo : hi + 1] - np.int32(start)).tobytes(),
                data=data[start:end],
                valid=run_valid,
            )
    return [EventColumns(count=bounds[n + 1] - bounds[n], **fields[n]) for n in runs]


def merge(parts: Sequence[EventColumns]) -> EventColumns:
    """Concatenate batches (several requests sharing one group commit): byte joins."""
    if len(parts) == 1:
        return parts[0]
    counts = [p.count for p in parts]
    fields: dict[str, Any] = {
        name: b"".join(getattr(p, name) for p in parts) for name in NUMERIC_COLUMNS
    }
    for name in TEXT_COLUMNS:
        fields[name] = TextColumn.concat([getattr(p, name) for p in parts], counts)
    return EventColumns(count=sum(counts), **fields)


class ColumnBuilder:
    """Collects events row by row (tests, tools) and emits columns."""

    def __init__(self) -> None:
        self._numeric: dict[str, list[int]] = {name: [] for name in NUMERIC_COLUMNS}
        self._text: dict[str, list[str | None]] = {name: [] for name in TEXT_COLUMNS}

    def add(self, **values: Any) -> None:
        for name, column in self._numeric.items():
            column.append(values[name])
        for name, text_column in self._text.items():
            text_column.append(values[name])

    def build(self) -> EventColumns:
        count = len(self._text["event_id"])
        numeric = {
            name: np.asarray(values, dtype=NUMERIC_COLUMNS[name])
            for name, values in self._numeric.items()
        }
        text = {name: pa.array(values, type=pa.string()) for name, values in self._text.items()}
        return build(numeric, text, np.arange(count))


def to_frame(events: pa.Table, *, partition: int, base_offset: int) -> pl.DataFrame:
    """Decoded events (one frame, or a contiguous run of frames) → DataFrame with each
    event's (partition, offset); the event in row ``i`` is at offset ``base_offset + i``."""
    frame = pl.from_arrow(events.combine_chunks())  # Arrow joins many chunks faster
    assert isinstance(frame, pl.DataFrame)
    end = base_offset + events.num_rows
    return frame.select(
        *NUMERIC_COLUMNS,
        pl.lit(partition, dtype=pl.Int32).alias("partition"),
        pl.int_range(base_offset, end, dtype=pl.Int64).alias("offset"),
        *TEXT_COLUMNS,
    )


def empty_frame() -> pl.DataFrame:
    return to_frame(SCHEMA.empty_table(), partition=0, base_offset=0)
