"""Decision records: every event the stream read, with its fate, as one Arrow table.

A micro-batch yields one row per event it read — counted, duplicate, late or invalid with
its reason — carrying the whole event and its (partition, offset). These rows are what the
archive stores and what the audit trail, the late log and the billing batch layer read, so
the schema below is a public format: plain Arrow types, no clickagg decoder needed.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from clickagg.core import fates

DECISION_SCHEMA = pa.schema(
    [
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),  # click | impression
        pa.field("status", pa.string(), nullable=False),  # counted | duplicate | late | invalid
        pa.field("reason", pa.string()),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("advertiser_id", pa.string()),
        pa.field("campaign_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("ip", pa.string()),
        pa.field("user_agent", pa.string()),
        pa.field("country", pa.string()),
        pa.field("device", pa.string()),
        pa.field("browser", pa.string()),
        pa.field("ts_ms", pa.int64(), nullable=False),  # event time (UTC epoch ms)
        pa.field("received_ms", pa.int64(), nullable=False),
        pa.field("cost_micros", pa.int64()),  # as sent; null: the ad's CPC applied
        # What the stream billed for this event: the spend of a counted click, else 0.
        pa.field("spend_micros", pa.int64(), nullable=False),
        # 128-bit fingerprint of (event_type, event_id): exact dedup without string compares.
        pa.field("fp_high", pa.uint64(), nullable=False),
        pa.field("fp_low", pa.uint64(), nullable=False),
    ]
)

DUPLICATE_REASON = "id already seen within the dedup horizon"
LATE_REASON = "event time older than the partition watermark; left to the batch layer"


def decisions_table(labelled: pl.DataFrame, spend_micros: pl.Series) -> pa.Table:
    """Rows of ``labelled`` (log columns + ``status``, ``reason``, ``event_type_name``) in
    log order; ``spend_micros`` is aligned with it (0 where nothing was billed)."""
    reason = (
        pl.when(pl.col("status") == fates.DUPLICATE)
        .then(pl.lit(DUPLICATE_REASON))
        .when(pl.col("status") == fates.LATE)
        .then(pl.lit(LATE_REASON))
        .otherwise(pl.col("reason"))
    )
    table = labelled.with_columns(
        pl.col("event_type_name").alias("event_type"),
        reason.alias("reason"),
        pl.when(pl.col("cost_micros") >= 0).then(pl.col("cost_micros")).alias("cost_micros"),
        spend_micros.alias("spend_micros"),
    ).select(DECISION_SCHEMA.names)
    return table.to_arrow().cast(DECISION_SCHEMA)
