"""Invalid-traffic rules on real clicks: the TalkingData sample through clickagg, stream and
batch, and how often the clicks each rule flags led to a download.

The sample (``../shared/data/talkingdata_train_sample.csv``, see its README) is 100,000
mobile ad clicks over three days with ``is_attributed`` (the click led to an app
download). Replayed with its own timestamps, in time order, into a real ``clickagg
serve`` (4 partitions, the keyed stage on) with the rules of FRAUD.md; then:

* **stream**: each click's fate as the stream decided it (the archive), and the keyed
  stage's corrections per reason (the ``invalid_reason`` breakdown of the minute rows);
* **batch**: every winning click of the 72 hours judged over the archive by each rule
  alone and by all of them (``clickagg.batch.replay.judge_clicks``, the what-if replay's
  engine: the same winners, the lookback of each rule as context across hours), and by
  the rules in force with the stream's verdicts kept (what ``clickagg reconcile`` bills).

Per rule: clicks flagged, and the download rate among flagged vs unflagged clicks (a good
rule flags clicks that almost never convert), and among the unflagged clicks of the ads it
flagged clicks of (some ads convert far less than others: a rule that merely finds busy,
poorly converting ads looks good against all clicks without saying anything about the
clicks themselves). Mapping: ad ← app + channel, user ← ip + device + os, address ← the
encoded ip as 10.x.y.z, device ← device, user agent ← ``os-<os>`` (the sample has none;
its os is the part of one it keeps, which the device-farm rule keys on), event id ← the
whole row (the sample's one repeated row is a retransmission, dropped as a duplicate).

    .venv/bin/python bench/fraud_report.py [--data PATH] [--rows N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from clickagg.archive.parquet import ParquetArchiveReader
from clickagg.batch.replay import Judge, judge_clicks
from clickagg.config import Settings
from clickagg.core.rules.base import RuleSet
from clickagg.core.rules.loading import load_rules
from clickagg.launcher import ServeProcess

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_FILE = "talkingdata_train_sample.csv"
PARTITIONS = 4

# The rules of the report: the built-in ones plus a repeat-click rule over an hour (the
# sample is one click in ~1,840 of the full log: within 30 s a visitor's repeats are too
# rare to show), in the server's (and so the batch's) rules in force; candidates judged
# alone: the same over a day, and per-address volume over a day at three thresholds (the
# busiest address clicks 262 times in a day here), and the device-farm rule at its
# shipped example's thresholds.
RULES = """\
include_builtin = true

[[rules]]
id = "repeat-click-1h"
kind = "repeat_click"
reason = "repeated click on the same ad within an hour"
[rules.params]
window_seconds = 3600
"""
CANDIDATES = """\
[[rules]]
id = "repeat-click-24h"
kind = "repeat_click"
reason = "repeated click on the same ad within a day"
[rules.params]
window_seconds = 86400

[[rules]]
id = "ip-click-volume-10"
kind = "ip_click_volume"
reason = "sustained clicks from one address"
[rules.params]
max_clicks = 10
window_hours = 24

[[rules]]
id = "ip-click-volume-20"
kind = "ip_click_volume"
reason = "sustained clicks from one address"
[rules.params]
max_clicks = 20
window_hours = 24

[[rules]]
id = "ip-click-volume-50"
kind = "ip_click_volume"
reason = "sustained clicks from one address"
[rules.params]
max_clicks = 50
window_hours = 24

[[rules]]
id = "shared-agent-ad-spread"
kind = "shared_agent_ad_spread"
reason = "one device fingerprint clicking an ad from many addresses"
[rules.params]
min_ips = 50
min_clicks = 300
window_hours = 24
"""


def load_clicks(path: Path, rows: int | None = None, hours: int | None = None) -> pl.DataFrame:
    """The sample (its first ``rows``; of those, the clicks of the first ``hours`` of its
    period) as clickagg events, in time order, with ``is_attributed`` kept."""
    frame = pl.read_csv(path, n_rows=rows, schema_overrides={"attributed_time": pl.String})
    ts_ms = (
        pl.col("click_time")
        .str.to_datetime("%Y-%m-%d %H:%M:%S", time_zone="UTC")
        .dt.epoch("ms")
        .alias("ts_ms")
    )
    ip = pl.col("ip")
    row = pl.concat_str(
        pl.lit("td"),
        *(pl.col(c).cast(pl.String).fill_null("") for c in frame.columns),
        separator="-",
    )
    frame = frame.with_columns(ts_ms, row.alias("event_id"))
    if hours is not None:
        first = frame["ts_ms"].min()
        assert isinstance(first, int)
        frame = frame.filter(pl.col("ts_ms") < first - first % 3_600_000 + hours * 3_600_000)
    return frame.sort("ts_ms", maintain_order=True).select(
        "event_id",
        pl.concat_str(pl.lit("app"), "app", pl.lit("-ch"), "channel").alias("ad_id"),
        pl.concat_str(pl.lit("app"), "app").alias("advertiser_id"),
        pl.concat_str("ip", "device", "os", separator="-").alias("user_id"),
        pl.format("10.{}.{}.{}", (ip // 65536) % 256, (ip // 256) % 256, ip % 256).alias("ip"),
        pl.col("device").cast(pl.String).alias("device"),
        pl.concat_str(pl.lit("os-"), "os").alias("user_agent"),
        "ts_ms",
        "is_attributed",
    )


def ndjson_bodies(clicks: pl.DataFrame, size: int) -> list[bytes]:
    events = clicks.select(
        pl.lit("click").alias("event_type"),
        "event_id",
        "ad_id",
        "advertiser_id",
        "user_id",
        "ip",
        "device",
        "user_agent",
        (pl.col("ts_ms") / 1000).alias("timestamp"),
    )
    return [events.slice(i, size).write_ndjson().encode() for i in range(0, events.height, size)]


def _metric_sum(text: str, prefix: str) -> int:
    return sum(
        int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(prefix)
    )


def replay_into_server(data_dir: Path, rules_file: Path, bodies: Sequence[bytes]) -> ServeProcess:
    server = ServeProcess(
        data_dir,
        partitions=PARTITIONS,
        extra_env={
            "CLICKAGG_KEYED_STAGE": "true",
            "CLICKAGG_RULES_FILE": str(rules_file),
            "CLICKAGG_CLOSE_INTERVAL": "0",  # the report reconciles itself
        },
    )
    server.start()
    try:
        post_all(server, bodies)
    except BaseException:
        server.stop()
        raise
    return server


def post_all(server: ServeProcess, bodies: Sequence[bytes]) -> None:
    """Post in order and wait until every event is committed and archived."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for body in bodies:  # one connection, in order: event time never goes back much
            response = client.post(
                "/events/batch", content=body, headers={"content-type": "application/x-ndjson"}
            )
            response.raise_for_status()
            if response.json()["rejected"]:
                raise RuntimeError(f"rejected: {response.json()['rejected'][:3]}")
        deadline = time.monotonic() + 300
        while True:
            text = client.get("/metrics").text
            lag = _metric_sum(text, "clickagg_partition_lag_events{") + _metric_sum(
                text, "clickagg_partition_archive_lag_events{"
            )
            if lag == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not caught up after 300 s (lag {lag})")
            time.sleep(0.2)


def keyed_corrections(
    server: ServeProcess, ads: list[str], start_ms: int, end_ms: int
) -> dict[str, int]:
    """Invalid clicks per reason in the stream's minute rows (stage-1 verdicts and the
    keyed stage's corrections alike), summed over every ad: day windows over the period."""
    totals: dict[str, int] = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for ad in ads:
            # The keyed stage may still be correcting the last round: wait for it to agree
            # with itself (two equal reads) only at the end, below.
            rows = client.get(
                "/aggregates",
                params={
                    "ad_id": ad,
                    "start": start_ms // 1000,
                    "end": end_ms // 1000,
                    "granularity": "day",
                    "group_by": "invalid_reason",
                },
            ).json()
            for row in rows:
                if row["invalid_clicks"]:
                    reason = row["invalid_reason"]
                    totals[reason] = totals.get(reason, 0) + row["invalid_clicks"]
    return totals


@dataclass(frozen=True)
class RuleFigure:
    name: str
    flagged: int
    flagged_downloads: int
    clicks: int
    downloads: int
    same_ads: int  # clicks not flagged, on ads with a flagged click
    same_ads_downloads: int

    @property
    def flagged_rate(self) -> float:
        return self.flagged_downloads / self.flagged if self.flagged else float("nan")

    @property
    def unflagged_rate(self) -> float:
        rest = self.clicks - self.flagged
        return (self.downloads - self.flagged_downloads) / rest if rest else float("nan")

    @property
    def same_ads_rate(self) -> float:
        return self.same_ads_downloads / self.same_ads if self.same_ads else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "unflagged_same_ads_download_rate": self.same_ads_rate,
            "rule": self.name,
            "flagged": self.flagged,
            "flagged_share": self.flagged / self.clicks if self.clicks else 0.0,
            "flagged_download_rate": self.flagged_rate,
            "unflagged_download_rate": self.unflagged_rate,
        }


def figure(name: str, verdicts: pl.DataFrame, attributed: pl.DataFrame) -> RuleFigure:
    """``verdicts``: event_id, invalid (one row per winning click)."""
    joined = verdicts.select("event_id", "invalid").join(
        attributed, on="event_id", how="inner", validate="1:1"
    )
    flagged = joined.filter(pl.col("invalid"))
    # Some ads convert far less than others: the flagged beside the same ads' other clicks.
    same_ads = joined.filter(
        ~pl.col("invalid") & pl.col("ad_id").is_in(flagged["ad_id"].unique().implode())
    )
    return RuleFigure(
        same_ads=same_ads.height,
        same_ads_downloads=int(same_ads["is_attributed"].sum()),
        name=name,
        flagged=flagged.height,
        flagged_downloads=int(flagged["is_attributed"].sum()),
        clicks=joined.height,
        downloads=int(joined["is_attributed"].sum()),
    )


def rule_id(reason: pl.Expr) -> pl.Expr:
    """A reason's rule: the processor writes ``"<id>: <reason>: <evidence>"``."""
    return reason.str.extract(r"^([^:]+):", 1)


def run(
    data: Path,
    rows: int | None,
    work: Path,
    *,
    candidates: str = CANDIDATES,
    hours: int | None = None,
) -> dict[str, Any]:
    clicks = load_clicks(data, rows, hours)
    attributed = clicks.unique("event_id", keep="first").select(
        "event_id", "ad_id", "is_attributed"
    )
    rules_file = work / "rules.toml"
    rules_file.write_text(RULES)
    candidates_file = work / "candidates.toml"
    candidates_file.write_text(candidates)
    started = time.monotonic()
    server = replay_into_server(work / "data", rules_file, ndjson_bodies(clicks, 2_000))
    replayed_s = time.monotonic() - started
    start_ms = int(clicks["ts_ms"].min())  # type: ignore[arg-type]
    end_ms = int(clicks["ts_ms"].max()) + 1  # type: ignore[arg-type]
    day = 86_400_000
    period = (start_ms - start_ms % day, end_ms - end_ms % day + day)
    ads = clicks["ad_id"].unique().sort().to_list()
    try:
        by_reason = keyed_corrections(server, ads, *period)
        while (again := keyed_corrections(server, ads, *period)) != by_reason:
            by_reason = again
    finally:
        server.stop()

    settings = Settings(data_dir=work / "data", partitions=PARTITIONS, rules_file=rules_file)
    reader = ParquetArchiveReader(settings.archive_dir)
    try:
        decisions = pl.from_arrow(reader.decisions(start_ms=period[0], end_ms=period[1]))
    finally:
        reader.close()
    assert isinstance(decisions, pl.DataFrame)
    fates = dict(decisions.group_by("status").len().iter_rows())
    stream_clicks = decisions.filter(pl.col("status").is_in(["counted", "invalid"]))
    stream = [
        figure(
            f"stream: {name}",
            stream_clicks.select(
                "event_id",
                (rule_id(pl.col("reason")) == name).fill_null(False).alias("invalid"),
            ),
            attributed,
        )
        for name in sorted(set(rule_id(stream_clicks["reason"]).drop_nulls().to_list()))
    ]
    stream.append(
        figure(
            "stream: all (stage 1)",
            stream_clicks.select("event_id", (pl.col("status") == "invalid").alias("invalid")),
            attributed,
        )
    )

    in_force = load_rules(rules_file)
    alone = [
        RuleSet(rules=(rule,)) for rule in (*in_force.rules, *load_rules(candidates_file).rules)
    ]
    judges = [Judge(in_force, stream_verdicts=True), Judge(in_force), *map(Judge, alone)]
    started = time.monotonic()
    judged = judge_clicks(settings, judges, *period)
    judged_s = time.monotonic() - started
    final, batch_all, *singles = judged.clicks
    batch = [
        figure("batch: reconcile (rules in force, stream verdicts kept)", final, attributed),
        figure("batch: rules in force, alone", batch_all, attributed),
    ]
    batch += [
        figure(f"batch: {rules.ids[0]} alone", frame, attributed)
        for rules, frame in zip(alone, singles, strict=True)
    ]
    return {
        "rows": clicks.height,
        "distinct_ids": attributed.height,
        "downloads": int(attributed["is_attributed"].sum()),
        "fates": fates,
        "stream_invalid_by_reason": by_reason,
        "stream": [f.as_dict() for f in stream],
        "batch": [f.as_dict() for f in batch],
        "hours": judged.hours,
        "replay_seconds": round(replayed_s, 1),
        "judge_seconds": round(judged_s, 1),
        "rules_in_force": in_force.ids,
    }


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.2f} %"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['rows']:,} rows, {result['distinct_ids']:,} distinct clicks, "
        f"{result['downloads']} downloads; stream fates {result['fates']}; "
        f"invalid clicks per reason in the stream's minute rows: "
        f"{result['stream_invalid_by_reason'] or 'none'}",
        "",
        "| rule | clicks flagged | share | download rate, flagged | not flagged "
        "| not flagged, same ads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in [*result["stream"], *result["batch"]]:
        lines.append(
            f"| {row['rule']} | {row['flagged']:,} | {_pct(row['flagged_share'])} | "
            f"{_pct(row['flagged_download_rate'])} | {_pct(row['unflagged_download_rate'])} | "
            f"{_pct(row['unflagged_same_ads_download_rate'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / DATA_FILE)
    p.add_argument("--rows", type=int, help="only the file's first N rows")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data}: not found (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory(prefix="clickagg-fraud-") as tmp:
        result = run(args.data, args.rows, Path(tmp))
    print(markdown(result))
    print(
        f"\nreplayed into the server in {result['replay_seconds']} s; "
        f"{result['hours']} hours judged in {result['judge_seconds']} s"
    )
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
