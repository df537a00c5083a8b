"""Advertiser statements: per ad and local day, exact across DST and in half-hour zones,
from final rows only, with the adjustments made after the month closed."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clickagg.batch.published import FinalRowsReader
from clickagg.batch.runner import batch_dir, reconcile_hours
from clickagg.batch.statement import build_statement, statement_frame, statement_json
from clickagg.core.ads import AdChange, AdEntry, as_of
from clickagg.core.windows import HOUR_MS
from clickagg.registry import Advertiser
from tests.conftest import Ev
from tests.worker.test_stream import Rig

LA = Advertiser("adv-la", "West Coast Shoes", "USD", "America/Los_Angeles")
KOLKATA = Advertiser("adv-in", "Chai Co", "INR", "Asia/Kolkata")


def ms(zone: str, *when: int) -> int:
    return int(dt.datetime(*when, tzinfo=ZoneInfo(zone)).timestamp() * 1000)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r
    r.close()


def clicks_at(prefix: str, advertiser: str, times: list[int], ad: str) -> list[Ev]:
    return [
        Ev(f"{prefix}{i}", ad, t, advertiser_id=advertiser, cost_micros=250_000)
        for i, t in enumerate(times)
    ]


def reconcile_span(rig: Rig, start: int, end: int) -> None:
    first = start - start % HOUR_MS
    reconcile_hours(rig.settings, list(range(first, end, HOUR_MS)), reason="month end")


def test_local_days_across_the_fall_back_change_and_in_a_half_hour_zone(rig: Rig) -> None:
    tz = LA.time_zone
    # 2023-11-05 in Los Angeles has 25 hours (PDT -> PST at 02:00).
    la = [
        ms(tz, 2023, 11, 4, 23, 59),  # Nov 4 local
        ms(tz, 2023, 11, 5, 0, 0),  # Nov 5 local, 07:00 UTC
        ms(tz, 2023, 11, 5, 1, 30),  # the first 01:30 (PDT)
        ms(tz, 2023, 11, 5, 1, 30) + HOUR_MS,  # the second 01:30 (PST), same local day
        ms(tz, 2023, 11, 5, 23, 59),  # still Nov 5: 08:59 UTC on Nov 6
        ms(tz, 2023, 11, 6, 0, 0),  # Nov 6 local
    ]
    kz = KOLKATA.time_zone
    india = [ms(kz, 2023, 11, 10, 23, 45), ms(kz, 2023, 11, 11, 0, 15)]  # 18:15, 18:45 UTC
    events = sorted(
        clicks_at("la", "adv-la", la, "ad-la") + clicks_at("in", "adv-in", india, "ad-in"),
        key=lambda e: e.ts_ms,
    )
    rig.append(events)
    rig.drain(rig.worker())
    rig.archive.flush()
    reconcile_span(rig, min(la), max(india) + HOUR_MS)

    reader = FinalRowsReader(batch_dir(rig.settings))
    statement = build_statement(reader, LA, "2023-11")
    days = {(line.day.isoformat(), line.clicks) for line in statement.lines}
    assert days == {("2023-11-04", 1), ("2023-11-05", 4), ("2023-11-06", 1)}
    assert statement.totals["spend_micros"] == 6 * 250_000
    assert statement.hours_not_final  # the rest of the month was never reconciled
    india_days = {
        (line.day.isoformat(), line.clicks)
        for line in build_statement(reader, KOLKATA, "2023-11").lines
    }
    assert india_days == {("2023-11-10", 1), ("2023-11-11", 1)}  # split at local midnight


def test_adjustments_after_the_month_closed_and_the_cli_formats(rig: Rig, tmp_path: Path) -> None:
    tz = LA.time_zone
    start = ms(tz, 2023, 11, 20, 12, 0)
    rig.append(clicks_at("a", "adv-la", [start, start + 60_000], "ad-la"))
    rig.drain(rig.worker())
    rig.archive.flush()
    reconcile_span(rig, start, start + HOUR_MS)
    # Two very late clicks for the same hour, found once the month is over: a restatement.
    rig.append(clicks_at("late", "adv-la", [start + 120_000, start + 180_000], "ad-la"))
    rig.drain(rig.worker())
    rig.archive.flush()
    reader = FinalRowsReader(batch_dir(rig.settings))
    version = reader.hours.current(start - start % HOUR_MS)
    assert version is not None
    reconcile_span(rig, start, start + HOUR_MS)
    month_end = ms(tz, 2023, 12, 1, 0, 0)
    statement = build_statement(reader, LA, "2023-11")
    assert statement.totals["clicks"] == 4
    # The restatement was made now, long after November 2023 closed: it is an adjustment.
    assert reader.hours.current(start - start % HOUR_MS).created_ms > month_end  # type: ignore[union-attr]
    assert statement.adjustments_after_close == {
        "ad-la": {"clicks": 2, "impressions": 0, "spend_micros": 500_000, "invalid_clicks": 0}
    }

    advertisers = tmp_path / "advertisers.csv"
    advertisers.write_text(
        "advertiser_id,name,currency,time_zone\nadv-la,West Coast Shoes,USD,America/Los_Angeles\n"
    )
    command = [
        *(sys.executable, "-m", "clickagg", "statement", "--advertiser", "adv-la"),
        *("--month", "2023-11", "--data-dir", str(rig.root), "--partitions", "1"),
        *("--advertisers", str(advertisers)),
    ]
    as_json = subprocess.run([*command, "--format", "json"], capture_output=True, text=True)
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert (body["time_zone"], body["totals"]["clicks"], body["final"]) == (tz, 4, False)
    assert body["lines"] == [
        {
            "ad_id": "ad-la",
            "day": "2023-11-20",
            "clicks": 4,
            "impressions": 0,
            "spend_micros": 1_000_000,
            "invalid_clicks_removed": 0,
            "ad_status": None,  # not in the registry
        }
    ]
    as_csv = subprocess.run([*command, "--format", "csv"], capture_output=True, text=True)
    assert as_csv.stdout.splitlines()[1] == "adv-la,ad-la,2023-11-20,4,0,1000000,0,"
    out = tmp_path / "statement.parquet"
    done = subprocess.run([*command, "--format", "parquet", "--output", str(out)], check=True)
    assert done.returncode == 0
    import polars as pl

    assert pl.read_parquet(out)["clicks"].to_list() == [4]


def test_a_half_hour_zone_month_takes_only_its_minutes_of_a_restated_boundary_hour(
    rig: Rig,
) -> None:
    """December 2023 starts in Kolkata at 18:30 UTC on Nov 30: the hour 18:00-19:00 UTC
    belongs to two statements. A restatement of it adjusts each month by the changes in
    its own minutes, never both by the whole hour."""
    kz = KOLKATA.time_zone
    boundary = ms(kz, 2023, 12, 1, 0, 0)  # 18:30 UTC
    hour = boundary - boundary % HOUR_MS
    rig.append(clicks_at("on", "adv-in", [boundary - 20 * 60_000, boundary + 10 * 60_000], "ad"))
    rig.drain(rig.worker())
    rig.archive.flush()
    reconcile_span(rig, hour, hour + HOUR_MS)
    late = [boundary - 15 * 60_000, boundary + 12 * 60_000, boundary + 14 * 60_000]
    rig.append(clicks_at("late", "adv-in", late, "ad"))  # 1 in November, 2 in December
    rig.drain(rig.worker())
    rig.archive.flush()
    reconcile_span(rig, hour, hour + HOUR_MS)  # a restatement, long after both months
    reader = FinalRowsReader(batch_dir(rig.settings))
    november = build_statement(reader, KOLKATA, "2023-11")
    december = build_statement(reader, KOLKATA, "2023-12")
    assert (november.totals["clicks"], december.totals["clicks"]) == (2, 3)
    assert november.adjustments_after_close["ad"]["clicks"] == 1
    assert december.adjustments_after_close["ad"]["clicks"] == 2
    assert november.adjustments_after_close["ad"]["spend_micros"] == 250_000


def test_lines_report_the_ad_status_at_the_month_end_and_counts_are_unchanged(
    rig: Rig,
) -> None:
    tz = LA.time_zone
    start = ms(tz, 2023, 11, 20, 12, 0)
    rig.append(clicks_at("s", "adv-la", [start, start + 60_000], "ad-la"))
    rig.drain(rig.worker())
    rig.archive.flush()
    reconcile_span(rig, start, start + HOUR_MS)
    month_end = ms(tz, 2023, 12, 1, 0, 0)
    changes = [
        AdChange("ad-la", start + HOUR_MS, status="paused"),
        AdChange("ad-la", month_end, status="archived"),  # December's: not November's
    ]
    asked: list[int] = []

    def ads(at_ms: int) -> dict[str, AdEntry]:
        asked.append(at_ms)
        return as_of({}, changes, at_ms)

    reader = FinalRowsReader(batch_dir(rig.settings))
    plain = build_statement(reader, LA, "2023-11")
    statement = build_statement(reader, LA, "2023-11", ads=ads)
    assert asked == [month_end - 1]
    assert statement.ad_status == {"ad-la": "paused"}
    assert statement.lines == plain.lines  # a paused ad's clicks are counted all the same
    assert {line["ad_status"] for line in statement_json(statement)["lines"]} == {"paused"}
    assert statement_frame(statement)["ad_status"].to_list() == ["paused"]
    assert {line["ad_status"] for line in statement_json(plain)["lines"]} == {None}
