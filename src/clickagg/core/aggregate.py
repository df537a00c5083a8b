"""Aggregate deltas: what one micro-batch of counted events adds to the minute rows.

Deltas are additive (sums) or mergeable (unique-user sketches), so applying the deltas of
any split of the same events, in any order, gives the same rows: the store only merges.
Unique users are a DataSketches HLL sketch per row (``users``, the bytes of
``clickagg.core.hll``; null when no event of the row names a user): the same bytes Spark's
``hll_sketch_agg(user_id)`` makes, so stream and batch sketches merge.

A round yields one minute delta per (ad_id, minute), carrying the ad's ``advertiser_id``
and ``campaign_id`` (an ad belongs to one of each; missing means "unknown"; they are part of
the key, so an ad whose events only sometimes name them gets two rows), and one narrow
delta per breakdown dimension, keyed (ad_id, minute, value): three narrow tables instead of
one keyed by the product of the dimensions, whose rows would multiply.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl
import pyarrow as pa

from clickagg.core import hll, ids
from clickagg.core.prices import PriceBook
from clickagg.core.windows import MINUTE_MS

UNKNOWN = "unknown"

MEASURES = [
    pa.field("clicks", pa.int64(), nullable=False),
    pa.field("impressions", pa.int64(), nullable=False),
    pa.field("spend_micros", pa.int64(), nullable=False),
    pa.field("invalid_clicks", pa.int64(), nullable=False),
    pa.field("users", pa.binary(), nullable=True),  # HLL sketch bytes; null: no user
]
OWNERS = ("advertiser_id", "campaign_id")
MINUTE_SCHEMA = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("minute_ms", pa.int64(), nullable=False),
        *(pa.field(name, pa.string(), nullable=False) for name in OWNERS),
        *MEASURES,
    ]
)
DIMENSIONS = ("country", "device", "browser", "invalid_reason")
# invalid_reason holds invalid events only, keyed by the id of the rule that flagged them
# (the text of a reason before its first ":"): the breakdown of invalid_clicks by rule,
# a table as small as the invalid traffic.
REASON_DIMENSION = "invalid_reason"
# One narrow schema per dimension: (ad_id, minute_ms, <dimension>, measures).
DIMENSION_SCHEMAS: Mapping[str, pa.Schema] = {
    name: pa.schema(
        [
            pa.field("ad_id", pa.string(), nullable=False),
            pa.field("minute_ms", pa.int64(), nullable=False),
            pa.field(name, pa.string(), nullable=False),
            *MEASURES,
        ]
    )
    for name in DIMENSIONS
}


_USER_RANK = "_user_rank"


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
        # The row's distinct users (their ranks, ``hll.rank_users``), for its sketch
        # (dropped once the sketches are built).
        pl.col(_USER_RANK).filter(pl.col(_USER_RANK) >= 0).unique().alias("_user_ranks"),
    ]


def with_minute_and_spend(
    events: pl.DataFrame, prices: PriceBook | Mapping[str, int]
) -> pl.DataFrame:
    """Add ``minute_ms`` and ``spend_micros``: the event's cost, else the ad's CPC in force
    at the event's time (``clickagg.core.prices``), else 0."""
    cpc = PriceBook.of(prices).cpc_expr_or_series(events)
    return events.with_columns(
        (pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS).alias("minute_ms"),
        pl.when(pl.col("cost_micros") >= 0)
        .then(pl.col("cost_micros"))
        .otherwise(cpc)
        .alias("spend_micros"),
    )


def empty_dimension_deltas() -> dict[str, pa.Table]:
    return {name: schema.empty_table() for name, schema in DIMENSION_SCHEMAS.items()}


def _with_sketches(frame: pl.DataFrame, schema: pa.Schema, coupons: np.ndarray) -> pa.Table:
    """``frame`` (sorted, with each row's distinct ``_user_ranks``) with the ``users``
    sketches: row i is group i, so the (row, user) pairs come from one explode, no
    per-event Python."""
    pairs = frame.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("g"), pl.col("_user_ranks")
    ).explode("_user_ranks")
    pairs = pairs.filter(pl.col("_user_ranks").is_not_null())
    sketches = hll.sketches_by_ranked_group(
        pairs["g"].to_numpy().astype(np.int64, copy=False),
        pairs["_user_ranks"].to_numpy().astype(np.int64, copy=False),
        coupons,
        frame.height,
    )
    table = frame.drop("_user_ranks").to_arrow()
    return table.append_column("users", sketches).cast(schema)


def round_deltas(counted: pl.DataFrame) -> tuple[pa.Table, dict[str, pa.Table]]:
    """The minute deltas and every dimension's deltas of ``counted`` (which has minute,
    spend, invalid), in one polars pass: the group-bys run in parallel. Each table's
    sketches are built from its rows' distinct users, ranked and hashed once for all five
    tables (``hll.rank_users``)."""
    missing = [
        pl.lit(None, pl.String).alias(name) for name in (*OWNERS, "reason") if name not in counted
    ]
    users = hll.rank_users(
        counted["user_id"]
        if "user_id" in counted
        else pl.Series([None] * counted.height, dtype=pl.String)
    )
    lazy = counted.lazy().with_columns(*missing, pl.Series(_USER_RANK, users.ranks))
    rule_id = pl.col("reason").str.split_exact(":", 1).struct.field("field_0")
    by_value = {
        **{name: (lazy, pl.col(name).fill_null(UNKNOWN)) for name in DIMENSIONS},
        REASON_DIMENSION: (
            lazy.filter(pl.col("invalid")),
            rule_id.fill_null(UNKNOWN).alias(REASON_DIMENSION),
        ),
    }
    # The owners are part of the key (an ad has one of each, so it stays one row per ad
    # and minute): a row never changes owner when deltas merge, so roll-ups are the same
    # before and after compaction even when some events do not name their advertiser.
    owners = [pl.col(name).fill_null(UNKNOWN) for name in OWNERS]
    plans = [
        lazy.group_by("ad_id", "minute_ms", *owners)
        .agg(_measure_exprs())
        .sort("ad_id", "minute_ms", *OWNERS),
        *(
            rows.group_by("ad_id", "minute_ms", value)
            .agg(_measure_exprs())
            .sort("ad_id", "minute_ms", name)
            for name, (rows, value) in by_value.items()
        ),
    ]
    minute, *dims = pl.collect_all(plans)
    return (
        _with_sketches(minute, MINUTE_SCHEMA, users.coupons),
        {
            name: _with_sketches(frame, DIMENSION_SCHEMAS[name], users.coupons)
            for name, frame in zip(DIMENSIONS, dims, strict=True)
        },
    )
