"""The log's record format: a batch of events as columns.

One log record (frame) holds many events, column by column: numeric columns are raw
little-endian numpy buffers, text columns are lists. The worker turns a run of frames into
one polars DataFrame without touching an event as a Python object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import polars as pl

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
    event_id: list[str]
    ad_id: list[str]
    advertiser_id: list[str | None]
    campaign_id: list[str | None]
    user_id: list[str | None]
    ip: list[str | None]
    user_agent: list[str | None]
    country: list[str | None]
    device: list[str | None]
    browser: list[str | None]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventColumns)


def encode(columns: EventColumns) -> bytes:
    return _encoder.encode(columns)


def decode(payload: bytes) -> EventColumns:
    return _decoder.decode(payload)


class ColumnBuilder:
    """Collects normalized events row by row (at the HTTP edge) and emits columns."""

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
            name: np.asarray(values, dtype=NUMERIC_COLUMNS[name]).tobytes()
            for name, values in self._numeric.items()
        }
        return EventColumns(count=count, **numeric, **self._text)  # type: ignore[arg-type]


def to_frame(columns: EventColumns, *, partition: int, base_offset: int) -> pl.DataFrame:
    """Columns of one frame → DataFrame with each event's (partition, offset)."""
    data: dict[str, Any] = {
        name: np.frombuffer(getattr(columns, name), dtype=dtype)
        for name, dtype in NUMERIC_COLUMNS.items()
    }
    data["partition"] = np.full(columns.count, partition, dtype=np.int32)
    data["offset"] = np.arange(base_offset, base_offset + columns.count, dtype=np.int64)
    for name in TEXT_COLUMNS:
        data[name] = pl.Series(name, getattr(columns, name), dtype=pl.String)
    return pl.DataFrame(data)


def concat_frames(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    if not frames:
        return empty_frame()
    return pl.concat(frames, how="vertical", rechunk=True)


def empty_frame() -> pl.DataFrame:
    return to_frame(ColumnBuilder().build(), partition=0, base_offset=0)
