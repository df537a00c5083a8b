"""Per-rule figures of the keyed invalid-traffic rules on real clicks: the TalkingData
sample (``shared/data/talkingdata_train_sample.csv`` above the checkout: 100,000 clicks
over 3 days, 227 of them followed by an app download). For each rule: the clicks it flags,
and the download rate of the clicks it flags beside that of the clicks it leaves, all of
them and those of the same ads (TalkingData's premise: clicks that never lead to a
download are mostly fraudulent, so a useful rule flags clicks whose download rate is far
below the rest's; some ads convert far less than others, hence the same-ads column).
FRAUD.md holds the output.

Columns as ``tests/api/test_real_data.py`` sends them: the ad is the channel (``ch-<n>``),
the user and the address are the ``ip`` (the sample has no user id), the device is
``device`` (``d<n>``). The sample has no user agent: ``os`` (``os-<n>``) stands for it, the
part of a user agent the data keeps. Only clicks, no impressions: ``no_impression_click``
and ``ctr_spike`` have nothing to judge. The whole sample is judged at once: for a rule
whose window ends at the click, the verdicts of the batch layer's hours, each judged with
its lookback before it (``repeat_click`` may start its chain of counted clicks earlier).
Exact duplicate rows count once.

    .venv/bin/python bench/fraud_figures.py [--csv PATH] [--rule ID ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import polars as pl

from clickagg.core.rules import RuleSet, RuleSpec, compile_rules

SAMPLE = Path("shared") / "data" / "talkingdata_train_sample.csv"


def sample() -> Path:
    """``shared/data`` beside the checkout or beside any directory above it."""
    for parent in Path(__file__).resolve().parents[1:]:
        if (parent / SAMPLE).exists():
            return parent / SAMPLE
    return Path(__file__).resolve().parents[2] / SAMPLE


# (id, kind, params, note): the built-in values, then the examples shipped off.
RULES: list[tuple[str, str, dict[str, Any], str]] = [
    ("ip-click-velocity", "ip_click_velocity", {"max_clicks_per_minute": 60}, "built in"),
    ("repeat-click", "repeat_click", {"window_seconds": 30}, "built in"),
    ("ip-ad-spread", "ip_ad_spread", {"max_ads": 20, "window_minutes": 10}, "built in"),
    ("ip-click-volume", "ip_click_volume", {"max_clicks": 500, "window_hours": 24}, "example"),
    (
        "shared-agent-ad-spread",
        "shared_agent_ad_spread",
        {"min_ips": 50, "min_clicks": 300, "window_hours": 24},
        "example",
    ),
]


def events(csv: Path) -> pl.DataFrame:
    """The sample's clicks as archived decisions carry them, exact copies dropped."""
    raw = pl.read_csv(csv).unique(maintain_order=True)
    ts = pl.col("click_time").str.to_datetime("%Y-%m-%d %H:%M:%S", time_zone="UTC")
    return raw.select(
        pl.lit("click").alias("event_type"),
        pl.format("ch-{}", "channel").alias("ad_id"),
        pl.col("ip").cast(pl.String).alias("user_id"),
        pl.col("ip").cast(pl.String).alias("ip"),
        pl.format("os-{}", "os").alias("user_agent"),
        pl.format("d{}", "device").alias("device"),
        ts.dt.epoch("ms").alias("ts_ms"),
        pl.col("is_attributed"),
    ).sort("ts_ms", maintain_order=True)


def figures(frame: pl.DataFrame, rule_id: str, kind: str, params: dict[str, Any]) -> str:
    rules = RuleSet(compile_rules([RuleSpec(rule_id, kind, "r", params)]))
    flagged = rules.batch_reasons(frame).is_not_null()
    marked = frame.with_columns(flagged.alias("_flagged"))
    hit = marked.filter(pl.col("_flagged"))
    left = marked.filter(~pl.col("_flagged"))

    def rate(part: pl.DataFrame) -> str:
        if not part.height:
            return "-"
        return f"{100 * part['is_attributed'].sum() / part.height:.3f} % of {part.height:,}"

    # Some ads convert less than others: the flagged clicks beside the same ads' others.
    same_ads = left.filter(pl.col("ad_id").is_in(hit["ad_id"].unique().implode()))
    share = 100 * hit.height / frame.height
    shown = ", ".join(f"{k} = {v}" for k, v in params.items())
    return (
        f"| `{rule_id}` ({kind}: {shown}) | {hit.height:,} ({share:.2f} %) | {rate(hit)} | "
        f"{rate(left)} | {rate(same_ads)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=sample())
    parser.add_argument("--rule", action="append", help="only this rule id (repeatable)")
    args = parser.parse_args()
    frame = events(args.csv)
    print(
        f"{frame.height:,} clicks, {int(frame['is_attributed'].sum())} downloads "
        f"({100 * frame['is_attributed'].mean():.3f} %)\n"  # type: ignore[operator]
    )
    print(
        "| rule | clicks flagged | download rate, flagged | not flagged | not flagged, same ads |"
    )
    print("|---|---|---|---|---|")
    for rule_id, kind, params, note in RULES:
        if args.rule and rule_id not in args.rule:
            continue
        print(figures(frame, rule_id, kind, params).replace(") |", f"; {note}) |", 1))


if __name__ == "__main__":
    main()
