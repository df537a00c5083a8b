"""The keyed second stage's pure half: its records, their partitioning by IP, per-IP click
velocity in event-time minutes, and the corrections a verdict makes.

Stage 1 (one worker per partition of the log, which is partitioned by event id) appends
every fresh click it decided to an internal log partitioned by a stable hash of the IP, so
that all of an IP's clicks meet in one keyed partition whatever the number of log
partitions. Stage 2 counts them per (ip, UTC minute) there. Appends are at-least-once (a
crash between the store commit and the append makes recovery append again), so stage 2
consumes idempotently: per (keyed partition, source partition) it keeps the highest
source offset it has taken, and ignores a record at or below it (a source partition's
records reach a keyed partition in offset order, copies after the originals).

A verdict is the batch's verdict (``clickagg.core.rules.velocity``: more than the limit
clicks from one IP in one UTC minute flags every click of that IP-minute, the ones before
the threshold too): the same rule spec gives the limit. Clicks that a stage-1 rule had
already flagged count toward the minute (the batch counts them too) but are not corrected
again. Each click is corrected exactly once: a flagged minute flags its pending clicks
once, and each later click as it arrives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import xxhash

from clickagg.core import aggregate, ids
from clickagg.core.windows import MINUTE_MS

RECORD_SCHEMA = pa.schema(
    [
        pa.field("ip", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("advertiser_id", pa.string()),
        pa.field("campaign_id", pa.string()),
        pa.field("country", pa.string()),
        pa.field("device", pa.string()),
        pa.field("browser", pa.string()),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("source_partition", pa.int32(), nullable=False),
        pa.field("source_offset", pa.int64(), nullable=False),
        pa.field("spend_micros", pa.int64(), nullable=False),  # what stage 1 billed
        # False: a stage-1 rule already flagged it (counts toward the minute, not corrected)
        pa.field("counted", pa.bool_(), nullable=False),
    ]
)
"""One fresh click as the keyed log carries it (Arrow frames, readable without clickagg)."""

NO_OFFSET = -1


def keyed_partition(ip: str, partitions: int) -> int:
    """Stable across processes, versions and machines (not Python's salted ``hash``)."""
    return xxhash.xxh3_64_intdigest(ip.encode()) % partitions


def keyed_records(kept: pl.DataFrame, partitions: int) -> dict[int, pa.Table]:
    """The records of a round's kept events (``BatchOutcome.kept``: fresh events with
    ``invalid`` and ``spend_micros``), by keyed partition, each in source offset order.
    Only clicks with an IP: an IP-less click has no key (the batch rule skips it too)."""
    clicks = kept.filter((pl.col("event_type") == ids.CLICK) & pl.col("ip").is_not_null())
    if clicks.is_empty():
        return {}
    ips = clicks["ip"].unique().to_list()
    lookup = pl.DataFrame(
        {"ip": ips, "_k": [keyed_partition(ip, partitions) for ip in ips]},
        schema={"ip": pl.String, "_k": pl.Int64},
    )
    records = (
        clicks.join(lookup, on="ip", how="left")
        .select(
            *(name for name in RECORD_SCHEMA.names[:10]),
            pl.col("partition").cast(pl.Int32).alias("source_partition"),
            pl.col("offset").alias("source_offset"),
            pl.col("spend_micros").cast(pl.Int64),
            (~pl.col("invalid")).alias("counted"),
            "_k",
        )
        .sort("source_partition", "source_offset")
    )
    return {
        int(k): part.drop("_k").to_arrow().cast(RECORD_SCHEMA)
        for (k,), part in records.partition_by("_k", as_dict=True, maintain_order=True).items()
    }


@dataclass(frozen=True)
class VelocityLimit:
    """The keyed rule in force: its id (the reason's prefix and the ``invalid_reason``
    value), its reason text, the limit and where it starts applying."""

    rule_id: str
    reason: str
    max_clicks_per_minute: int
    effective_from_ms: int | None = None

    def to_json(self) -> str:
        """Canonical (sorted keys, no spaces): equal specs give equal text, so a store can
        record a spec only when it changes by comparing strings."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> VelocityLimit:
        return cls(**json.loads(text))


@dataclass
class _Minute:
    count: int = 0
    flagged: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)  # counted, not yet flagged


@dataclass
class VelocityWindows:
    """One keyed partition's stage-2 state: a function of the records it consumed, so
    replaying the keyed log up to the committed offset rebuilds it exactly."""

    horizon_ms: int
    high_water: dict[int, int] = field(default_factory=dict)
    max_event_ms: int = 0
    _minutes: dict[tuple[str, int], _Minute] = field(default_factory=dict)

    def consume(
        self, records: Iterable[Mapping[str, Any]], limit: VelocityLimit | None
    ) -> list[dict[str, Any]]:
        """Take records in keyed-log order; return the counted clicks newly flagged (each
        once, ever). Copies at or below their source's high-water offset are skipped."""
        flagged: list[dict[str, Any]] = []
        for record in records:
            source, offset = record["source_partition"], record["source_offset"]
            if offset <= self.high_water.get(source, NO_OFFSET):
                continue
            self.high_water[source] = offset
            ts = record["ts_ms"]
            self.max_event_ms = max(self.max_event_ms, ts)
            if limit is None or (
                limit.effective_from_ms is not None and ts < limit.effective_from_ms
            ):
                continue
            minute = self._minutes.setdefault((record["ip"], ts - ts % MINUTE_MS), _Minute())
            minute.count += 1
            if minute.flagged:
                if record["counted"]:
                    flagged.append(dict(record))
                continue
            if record["counted"]:
                minute.pending.append(dict(record))
            if minute.count > limit.max_clicks_per_minute:
                minute.flagged = True
                flagged.extend(minute.pending)
                minute.pending = []
        self._forget()
        return flagged

    def _forget(self) -> None:
        """Minutes a horizon behind the newest event time take no more clicks (stage 1
        counts nothing that old: it would be late there)."""
        before = self.max_event_ms - self.horizon_ms
        if len(self._minutes) and before > 0:
            for key in [key for key in self._minutes if key[1] < before - MINUTE_MS]:
                del self._minutes[key]


def correction_deltas(
    flagged: Sequence[Mapping[str, Any]], rule_id: str
) -> tuple[pa.Table, dict[str, pa.Table]]:
    """What flagging counted clicks changes, as deltas the store adds like any round's:
    per minute row and per dimension row clicks -1, spend -(what was billed) and
    invalid_clicks +1; per ``invalid_reason`` row (the rule's id) invalid_clicks +1.
    Unique-user sketches cannot be decremented (the user was seen, and stays counted), so
    ``users`` is null: the correction leaves them as they are."""
    if not flagged:
        return aggregate.MINUTE_SCHEMA.empty_table(), aggregate.empty_dimension_deltas()
    rows = pl.DataFrame(list(flagged), schema=pl.Schema(RECORD_SCHEMA)).with_columns(
        (pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS).alias("minute_ms"),
        pl.lit(rule_id).alias(aggregate.REASON_DIMENSION),
    )
    unknown = aggregate.UNKNOWN
    measures = [
        -pl.len().cast(pl.Int64).alias("clicks"),
        pl.lit(0, pl.Int64).alias("impressions"),
        -pl.col("spend_micros").sum().cast(pl.Int64).alias("spend_micros"),
        pl.len().cast(pl.Int64).alias("invalid_clicks"),
    ]
    reason_measures = [
        pl.lit(0, pl.Int64).alias("clicks"),
        pl.lit(0, pl.Int64).alias("impressions"),
        pl.lit(0, pl.Int64).alias("spend_micros"),
        pl.len().cast(pl.Int64).alias("invalid_clicks"),
    ]

    def grouped(keys: Sequence[str], agg: list[pl.Expr], schema: pa.Schema) -> pa.Table:
        frame = (
            rows.with_columns(pl.col(k).fill_null(unknown) for k in keys)
            .group_by("ad_id", "minute_ms", *keys)
            .agg(agg)
            .sort("ad_id", "minute_ms", *keys)
            .with_columns(pl.lit(None, pl.Binary).alias("users"))
        )
        return frame.to_arrow().cast(schema)

    minute = grouped(aggregate.OWNERS, measures, aggregate.MINUTE_SCHEMA)
    dimensions = {
        name: grouped(
            [name],
            reason_measures if name == aggregate.REASON_DIMENSION else measures,
            aggregate.DIMENSION_SCHEMAS[name],
        )
        for name in aggregate.DIMENSIONS
    }
    return minute, dimensions
