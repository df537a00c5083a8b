"""The log's record format: a batch of events as columns.

One log record (frame) holds many events, column by column. Numeric columns are raw
little-endian numpy buffers; text columns are Arrow string buffers (offsets, bytes,
validity). The worker turns a run of frames into one polars DataFrame zero-copy: no event
and no string ever becomes a Python object on the way from the log to the aggregates.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

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


class TextColumn(msgspec.Struct, array_like=True):
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

    def array(self, count: int) -> pa.Array:
        validity = None
        null_count = 0
        if self.valid:
            mask = np.frombuffer(self.valid, dtype=np.uint8)
            null_count = count - int(np.count_nonzero(mask))
            validity = pa.py_buffer(np.packbits(mask, bitorder="little").tobytes())
        buffers = [validity, pa.py_buffer(self.offsets), pa.py_buffer(self.data)]
        return pa.Array.from_buffers(pa.string(), count, buffers, null_count=null_count)

    @staticmethod
    def concat(parts: Sequence[TextColumn], counts: Sequence[int]) -> TextColumn:
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


_ZERO_OFFSET = b"\0\0\0\0"


class EventColumns(msgspec.Struct, array_like=True):
    """A batch of normalized events, as stored in one log frame."""

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


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventColumns)


def encode(columns: EventColumns) -> bytes:
    return _encoder.encode(columns)


def decode(payload: bytes) -> EventColumns:
    return _decoder.decode(payload)


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


def to_frame(columns: EventColumns, *, partition: int, base_offset: int) -> pl.DataFrame:
    """Columns of one frame → DataFrame with each event's (partition, offset)."""
    count = columns.count
    arrays: dict[str, Any] = {name: columns.numeric(name) for name in NUMERIC_COLUMNS}
    arrays["partition"] = np.full(count, partition, dtype=np.int32)
    arrays["offset"] = np.arange(base_offset, base_offset + count, dtype=np.int64)
    frame = pl.DataFrame(arrays)
    text = pa.table({name: columns.text(name) for name in TEXT_COLUMNS})
    converted = pl.from_arrow(text)
    assert isinstance(converted, pl.DataFrame)
    return pl.concat([frame, converted], how="horizontal")


def concat_frames(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    if not frames:
        return empty_frame()
    return pl.concat(frames, how="vertical", rechunk=True)


def empty_frame() -> pl.DataFrame:
    return to_frame(ColumnBuilder().build(), partition=0, base_offset=0)
