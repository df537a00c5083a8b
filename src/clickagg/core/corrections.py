"""Correction records: the keyed stage's verdicts on clicks the stream had counted, one row
per corrected click, as one Arrow table.

Stage 1 archives every click with the fate it decided (``clickagg.core.decisions``); a click
that stage 2 later finds invalid (a keyed rule over all of its IP's clicks) keeps that
first row and gets one correction row, which the audit trail shows as its final fate. The
schema is a public format, like the decisions': plain Arrow types, Parquet on disk.

What stage 2 hands over is its flagged clicks: the keyed log's records
(``clickagg.core.keyed.RECORD_SCHEMA``) plus ``keyed_offset`` (where the record is in the
keyed log), ``rule_id`` and ``evidence`` (what the rule saw, as text), and, where a click
already corrected is named by another rule now, ``previous_rule_id``.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl
import pyarrow as pa

from clickagg.core import ids

CORRECTION_SCHEMA = pa.schema(
    [
        pa.field("keyed_partition", pa.int32(), nullable=False),
        pa.field("keyed_offset", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("source_partition", pa.int32(), nullable=False),
        pa.field("source_offset", pa.int64(), nullable=False),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),  # event time (UTC epoch ms)
        pa.field("rule_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # the rule's reason text
        pa.field("evidence", pa.string(), nullable=False),
        pa.field("spend_micros", pa.int64(), nullable=False),  # what the correction took back
        pa.field("corrected_at_ms", pa.int64(), nullable=False),
        # High half of the click's 128-bit fingerprint: the archive's id index.
        pa.field("fp_high", pa.uint64(), nullable=False),
        # Null: the click's correction. Else a later verdict of an earlier rule moved the
        # reason of a click already corrected under this rule (its counts untouched).
        pa.field("previous_rule_id", pa.string()),
    ]
)
"""One corrected click: which one (its id and both log places), by which rule and why."""

FLAGGED_COLUMNS = ("keyed_offset", "rule_id", "evidence")
"""What stage 2's flagged clicks carry beyond the keyed log's record columns."""


def correction_rows(
    flagged: pa.Table,
    *,
    keyed_partition: int,
    reasons: Mapping[str, str],
    corrected_at_ms: int,
) -> pa.Table:
    """The correction rows of one keyed partition's flagged clicks, in their order;
    ``reasons`` gives each rule id's reason text. A flagged click with an
    ``applied_at_ms`` (when its verdict was applied, if known) is stamped with that time,
    the others with ``corrected_at_ms``."""
    if flagged.num_rows == 0:
        return CORRECTION_SCHEMA.empty_table()
    frame = pl.from_arrow(flagged)
    assert isinstance(frame, pl.DataFrame)
    if "previous_rule_id" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("previous_rule_id"))
    fp_high, _ = ids.fingerprints(frame["event_id"].to_list(), ids.CLICK)
    rules = pl.DataFrame(
        {"rule_id": list(reasons), "reason": list(reasons.values())},
        schema={"rule_id": pl.String, "reason": pl.String},
    )
    rows = frame.join(rules, on="rule_id", how="left", maintain_order="left").with_columns(
        pl.lit(keyed_partition).alias("keyed_partition"),
        pl.col("reason").fill_null(""),
        (
            pl.col("applied_at_ms").fill_null(corrected_at_ms)
            if "applied_at_ms" in frame.columns
            else pl.lit(corrected_at_ms)
        ).alias("corrected_at_ms"),
        pl.Series("fp_high", fp_high, dtype=pl.UInt64),
    )
    return rows.select(CORRECTION_SCHEMA.names).to_arrow().cast(CORRECTION_SCHEMA)
