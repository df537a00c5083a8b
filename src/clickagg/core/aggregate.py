"""Aggregate deltas: what one micro-batch of counted events adds to the minute rows.

Deltas are additive (sums) or mergeable (unique-user sketches), so applying the deltas of
any split of the same events, in any order, gives the same rows: the store only merges.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from clickagg.core import ids, sketch
from clickagg.core.windows import MINUTE_MS

UNKNOWN = "unknown"

MEASURES = [
    pa.field("clicks", pa.int64(), nullable=False),
    pa.field("impressions", pa.int64(), nullable=False),
    pa.field("spend_micros", pa.int64(), nullable=False),
    pa.field("invalid_clicks", pa.int64(), nullable=False),
    pa.field("user_hashes", pa.list_(pa.uint64()), nullable=False),
]
MINUTE_SCHEMA = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("minute_ms", pa.int64(), nullable=False),
        *MEASURES,
    ]
)
DIMENSIONS = ("country", "device", "browser")
DIMENSION_SCHEMA = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("minute_ms", pa.int64(), nullable=False),
        *(pa.field(name, pa.string(), nullable=False) for name in DIMENSIONS),
        *MEASURES,
    ]
)


def _measure_exprs() -> list[pl.Expr]:
    is_click = pl.col("event_type") == ids.CLICK
    valid_click = is_click & ~pl.col("invalid")
    return [
        valid_click.sum().cast(pl.Int64).alias("clicks"),
        (pl.col("event_type") == ids.IMPRESSION).sum().cast(pl.Int64).alias("impressions"),
        pl.when(valid_click)
        .then(pl.col("spend_micros"))
        .otherwise(0)
        .sum()
        .cast(pl.Int64)
        .alias("spend_micros"),
        (is_click & pl.col("invalid")).sum().cast(pl.Int64).alias("invalid_clicks"),
        pl.col("user_hash")
        .filter(pl.col("user_hash") != 0)
        .unique()
        .sort()
        .head(sketch.K)
        .alias("user_hashes"),
    ]


def with_minute_and_spend(events: pl.DataFrame, cpc_micros: dict[str, int]) -> pl.DataFrame:
    """Add ``minute_ms`` and ``spend_micros`` (the event's cost, else the ad's CPC, else 0)."""
    cpc = pl.col("ad_id").replace_strict(cpc_micros, default=0, return_dtype=pl.Int64)
    return events.with_columns(
        (pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS).alias("minute_ms"),
        pl.when(pl.col("cost_micros") >= 0)
        .then(pl.col("cost_micros"))
        .otherwise(cpc)
        .alias("spend_micros"),
    )


def minute_deltas(counted: pl.DataFrame) -> pa.Table:
    """Per (ad_id, minute): the measures of ``counted`` (which has minute, spend, invalid)."""
    grouped = counted.group_by("ad_id", "minute_ms").agg(_measure_exprs())
    return grouped.sort("ad_id", "minute_ms").to_arrow().cast(MINUTE_SCHEMA)


def dimension_deltas(counted: pl.DataFrame) -> pa.Table:
    """Per (ad_id, minute, country, device, browser); missing values become "unknown"."""
    filled = counted.with_columns(pl.col(*DIMENSIONS).fill_null(UNKNOWN))
    grouped = filled.group_by("ad_id", "minute_ms", *DIMENSIONS).agg(_measure_exprs())
    return grouped.sort("ad_id", "minute_ms", *DIMENSIONS).to_arrow().cast(DIMENSION_SCHEMA)
