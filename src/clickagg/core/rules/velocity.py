"""Behavioural (sophisticated) invalid traffic: per-IP click velocity.

A rule keyed by IP must see every click of an IP, but the log partitions events by id, so
one IP's clicks are spread over every partition and no partition's worker can count them
exactly. Such rules are *keyed*: the batch layer applies them (it reads the whole hour
from the archive), and a restated hour removes what they flag from billing. A partition's
worker skips them (``RuleSet.stream_rules``); with the ``keyed_stage`` setting on, the
stream's keyed second stage (``clickagg.core.keyed``: an internal log partitioned by IP)
applies the rules keyed by IP (this one and ``ip_ad_spread``) with the same specs and
corrects the counts.
"""

from __future__ import annotations

import msgspec
import polars as pl

from clickagg.core.rules.base import Matcher, RuleSpec
from clickagg.core.rules.registry import params_of, register_kind

MINUTE_MS = 60_000
KEYED_KINDS: set[str] = set()
"""Kinds whose verdict depends on other events than the one judged (not stage-1 rules)."""


class VelocityParams(msgspec.Struct, forbid_unknown_fields=True):
    max_clicks_per_minute: int


def keyed(name: str) -> None:
    """Mark a kind as keyed: the stream skips it (``RuleSet.stream_rules``)."""
    KEYED_KINDS.add(name)


@register_kind("ip_click_velocity")
def ip_click_velocity(spec: RuleSpec) -> Matcher:
    """More than ``max_clicks_per_minute`` clicks from one IP in one UTC minute: every
    click of that IP and minute is flagged, with the count as evidence."""
    limit = params_of(spec, VelocityParams).max_clicks_per_minute

    def match(clicks: pl.DataFrame) -> pl.Series:
        minute = (pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS).alias("_minute")
        counted = clicks.select(pl.col("ip"), minute, pl.len().over("ip", minute).alias("_n"))
        stamp = pl.from_epoch("_minute", time_unit="ms").dt.strftime("%Y-%m-%dT%H:%MZ")
        evidence = pl.concat_str(
            pl.lit("ip "),
            pl.col("ip"),
            pl.lit(": "),
            pl.col("_n").cast(pl.String),
            pl.lit(" clicks in minute "),
            stamp,
        )
        flagged = pl.col("ip").is_not_null() & (pl.col("_n") > limit)
        return counted.select(
            pl.when(flagged).then(evidence).otherwise(None).alias("evidence")
        ).to_series()

    return match


keyed("ip_click_velocity")
