"""Reconciling an hour from the archive the real stream wrote: equal to the stream where
the stream is exact, and exact where it is not (late events, copies beyond its horizon)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from clickagg.batch.published import FinalHours, hour_name
from clickagg.batch.runner import batch_dir, reconcile_hours
from clickagg.cli.main import main
from clickagg.core import hll, ids
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from tests.conftest import Ev
from tests.worker.test_stream import T0, Rig

HOUR = T0 - T0 % HOUR_MS


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r
    r.close()


def on_time(n: int, prefix: str = "e") -> list[Ev]:
    return [
        Ev(
            f"{prefix}{i}",
            f"ad-{i % 3}",
            HOUR + 60_000 + i * 997,
            event_type=ids.CLICK if i % 4 else ids.IMPRESSION,
            user_id=f"u{i % 50}",
            country=("US", "DE")[i % 2],
            cost_micros=1000 + i,
        )
        for i in range(n)
    ]


def stream_minutes(rig: Rig, ad_id: str) -> list[tuple[int, int, int, int, int]]:
    rows = rig.store.aggregates(
        ad_id=ad_id, start_ms=HOUR, end_ms=HOUR + HOUR_MS, granularity="minute"
    )
    return [(r.window_ms, r.clicks, r.impressions, r.spend_micros, r.unique_users) for r in rows]


def batch_minutes(rig: Rig, ad_id: str) -> list[tuple[int, int, int, int, int]]:
    table = FinalHours(batch_dir(rig.settings)).read(HOUR)
    assert table is not None
    rows = table.filter(pc.equal(table["ad_id"], ad_id)).sort_by("minute_ms").to_pylist()
    return [
        (
            r["minute_ms"],
            r["clicks"],
            r["impressions"],
            r["spend_micros"],
            hll.estimate(r["users"]),
        )
        for r in rows
    ]


def test_an_hour_the_stream_got_right_reconciles_to_the_same_rows(rig: Rig) -> None:
    rig.append(on_time(300) + on_time(300)[::7])  # with copies the stream deduplicates
    rig.drain(rig.worker())
    rig.archive.flush()
    [run] = reconcile_hours(rig.settings, [HOUR], reason="test")
    assert run.published is not None and run.clicks > 0
    for ad in ("ad-0", "ad-1", "ad-2"):
        assert batch_minutes(rig, ad) == stream_minutes(rig, ad)


def test_late_events_and_copies_beyond_the_horizon_count_once_in_the_batch(rig: Rig) -> None:
    worker = rig.worker()
    rig.append(on_time(100))
    rig.drain(worker)
    rig.append([Ev("mid", "ad-9", HOUR + 45 * MINUTE_MS)])  # the stream forgets e2 ...
    rig.drain(worker)
    # ... so e2 again, 58 minutes after its first copy (beyond the stream's 30-minute
    # horizon) and in the same hour, counts twice in the stream, once in the batch.
    rig.append([Ev("e2", "ad-2", HOUR + 59 * MINUTE_MS, cost_micros=1002)])
    rig.drain(worker)
    # Far ahead in event time: the watermark moves past the hour.
    rig.append([Ev("later", "ad-9", HOUR + HOUR_MS + 40 * MINUTE_MS)])
    late = [Ev(f"late{i}", "ad-0", HOUR + 5 * MINUTE_MS, cost_micros=500) for i in range(7)]
    rig.append(late)
    rig.drain(worker)
    rig.archive.flush()
    stream_clicks = sum(r[1] for ad in ("ad-0", "ad-1", "ad-2") for r in stream_minutes(rig, ad))
    [run] = reconcile_hours(rig.settings, [HOUR], reason="test")
    sent = sum(1 for e in on_time(100) if e.event_type == ids.CLICK)
    assert run.clicks == sent + len(late) + 1 and run.late_counted == len(late)  # + mid
    assert stream_clicks == sent + 1  # the late ones left out, e2 counted twice
    spend = sum(e.cost_micros for e in on_time(100) if e.event_type == ids.CLICK)
    assert run.spend_micros == spend + 500 * len(late)

    report = FinalHours(batch_dir(rig.settings)).read_report(HOUR)
    assert report is not None
    by_ad = {r["ad_id"]: r for r in report.to_pylist()}
    assert by_ad["ad-0"]["late_clicks"] == len(late)
    assert by_ad["ad-0"]["late_spend_micros"] == 500 * len(late)
    assert by_ad["ad-2"]["beyond_horizon_clicks"] == 1
    assert by_ad["ad-2"]["beyond_horizon_spend_micros"] == 1002
    for r in by_ad.values():  # every difference has its cause
        assert r["batch_clicks"] - r["stream_clicks"] == (
            r["late_clicks"] - r["beyond_horizon_clicks"] - r["newly_invalid_clicks"]
        )
        assert r["batch_spend_micros"] - r["stream_spend_micros"] == (
            r["late_spend_micros"] - r["beyond_horizon_spend_micros"]
        )


def test_reconciling_twice_publishes_one_version_and_a_crashed_run_leaves_nothing(
    rig: Rig,
) -> None:
    rig.append(on_time(50))
    rig.drain(rig.worker())
    rig.archive.flush()
    [first] = reconcile_hours(rig.settings, [HOUR], reason="first")
    hours = FinalHours(batch_dir(rig.settings))
    before = hours.read(HOUR)
    crashed = batch_dir(rig.settings) / hour_name(HOUR) / "v000002"
    os.makedirs(crashed)  # a run killed before it published
    [again] = reconcile_hours(rig.settings, [HOUR], reason="again")
    assert first.published is not None and again.published is None
    assert [v.version for v in hours.versions(HOUR)] == [1] and not crashed.exists()
    assert hours.read(HOUR) == before

    rig.append([Ev("new", "ad-0", HOUR + 30 * MINUTE_MS, cost_micros=5)])  # a restatement
    rig.drain(rig.worker())
    rig.archive.flush()
    [third] = reconcile_hours(rig.settings, [HOUR], reason="restated")
    assert third.published is not None and third.clicks == first.clicks + 1
    versions = hours.versions(HOUR)
    assert [(v.version, v.reason) for v in versions] == [(1, "first"), (2, "restated")]
    assert hours.current(HOUR) == versions[-1]


def test_a_restatement_is_listed_as_adjustments_and_the_report_is_served(rig: Rig) -> None:
    from clickagg.batch.published import FinalRowsReader

    rig.append(on_time(40))
    rig.drain(rig.worker())
    rig.archive.flush()
    reconcile_hours(rig.settings, [HOUR], reason="closed")
    reader = FinalRowsReader(batch_dir(rig.settings))
    assert reader.adjustments(start_ms=HOUR, end_ms=HOUR + HOUR_MS) == []
    rig.append([Ev(f"x{i}", "ad-2", HOUR + 50 * MINUTE_MS, cost_micros=7) for i in range(3)])
    rig.drain(rig.worker())
    rig.archive.flush()
    reconcile_hours(rig.settings, [HOUR], reason="very late clicks")
    [adjustment] = reader.adjustments(start_ms=HOUR, end_ms=HOUR + HOUR_MS)
    assert (adjustment.ad_id, adjustment.version, adjustment.previous_version) == ("ad-2", 2, 1)
    assert (adjustment.clicks, adjustment.spend_micros, adjustment.reason) == (
        3,
        21,
        "very late clicks",
    )
    assert reader.adjustments(start_ms=HOUR, end_ms=HOUR + HOUR_MS, advertiser_id="other") == []
    rows = reader.reconciliation(start_ms=HOUR, end_ms=HOUR + HOUR_MS, ad_id="ad-2")
    [row] = rows
    assert row.batch_clicks == row.stream_clicks  # the stream counted the late-sent x too


@pytest.mark.slow
def test_a_reconciliation_killed_mid_run_then_rerun_equals_an_uninterrupted_one(
    rig: Rig, tmp_path: Path
) -> None:
    import shutil
    import signal
    import subprocess
    import sys
    import time

    hours = 48
    for h in range(hours):
        rig.append(
            [Ev(f"k{h}-{i}", f"ad-{i % 4}", HOUR + h * HOUR_MS + i * 1000) for i in range(12)]
        )
    rig.drain(rig.worker())
    rig.archive.flush()
    twin = tmp_path / "twin"
    shutil.copytree(rig.root / "archive", twin / "archive")

    def command(data_dir: Path) -> list[str]:
        since = time.strftime("%Y-%m-%dT%H", time.gmtime(HOUR / 1000))
        until = time.strftime("%Y-%m-%dT%H", time.gmtime((HOUR + hours * HOUR_MS) / 1000))
        return [
            *(sys.executable, "-m", "clickagg", "reconcile", "--since", since),
            *("--until", until, "--data-dir", str(data_dir), "--partitions", "1"),
        ]

    run = subprocess.Popen(command(rig.root), stdout=subprocess.DEVNULL)
    published = batch_dir(rig.settings)
    deadline = time.monotonic() + 60
    while not list(published.glob("hour=*/CURRENT")):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=10)
    assert len(list(published.glob("hour=*/CURRENT"))) < hours  # it died mid-run
    rerun = subprocess.run(command(rig.root), capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    whole = subprocess.run(command(twin), capture_output=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    mine, theirs = FinalHours(published), FinalHours(twin / "batch")
    for h in range(hours):
        hour = HOUR + h * HOUR_MS
        for table in ("minute", "country", "device", "browser", "invalid_reason"):
            assert mine.read(hour, table) == theirs.read(hour, table), (h, table)
        assert [v.version for v in mine.versions(hour)] == [1]


def test_the_batch_applies_the_stream_s_rules_to_late_clicks_the_stream_never_judged(
    rig: Rig,
) -> None:
    bot = "Googlebot/2.1 (+http://www.google.com/bot.html)"
    rig.append(on_time(20))
    rig.append([Ev("later", "ad-9", HOUR + HOUR_MS + 40 * MINUTE_MS)])  # watermark moves on
    rig.append(
        [
            Ev("late-bot", "ad-0", HOUR + 5 * MINUTE_MS, user_agent=bot, cost_micros=50),
            Ev("late-ok", "ad-0", HOUR + 5 * MINUTE_MS, cost_micros=50),
        ]
    )
    rig.drain(rig.worker())
    rig.archive.flush()
    [run] = reconcile_hours(rig.settings, [HOUR], reason="test")
    sent = sum(1 for e in on_time(20) if e.event_type == ids.CLICK)
    assert run.clicks == sent + 1 and run.invalid == 1  # the late bot click is not billed
    report = FinalHours(batch_dir(rig.settings)).read_report(HOUR)
    assert report is not None
    [ad0] = [r for r in report.to_pylist() if r["ad_id"] == "ad-0"]
    assert (ad0["late_clicks"], ad0["newly_invalid_clicks"]) == (1, 0)  # only late-ok
    assert ad0["batch_clicks"] - ad0["stream_clicks"] == 1


def test_a_one_ip_burst_the_stream_billed_is_removed_from_the_final_hour(rig: Rig) -> None:
    burst = [
        Ev(f"burst{i}", "ad-1", HOUR + 10 * MINUTE_MS + i * 100, ip="203.0.113.9", cost_micros=10)
        for i in range(300)
    ]
    rig.append(on_time(20) + burst)
    rig.drain(rig.worker())
    rig.archive.flush()
    streamed = sum(r[1] for r in stream_minutes(rig, "ad-1"))
    [run] = reconcile_hours(rig.settings, [HOUR], reason="closed")
    assert run.invalid == 300
    report = FinalHours(batch_dir(rig.settings)).read_report(HOUR)
    assert report is not None
    [ad1] = [r for r in report.to_pylist() if r["ad_id"] == "ad-1"]
    assert ad1["stream_clicks"] == streamed  # the stream billed the burst ...
    assert ad1["batch_clicks"] == streamed - 300  # ... the final hour does not
    assert ad1["newly_invalid_clicks"] == 300
    assert ad1["batch_spend_micros"] == ad1["stream_spend_micros"] - 300 * 10


REPEAT_RULES = """
include_builtin = true

[[rules]]
id = "repeat-click"
kind = "repeat_click"
reason = "repeated click"
[rules.params]
window_seconds = 30
"""


def test_a_repeat_click_across_the_hours_end_is_flagged_once_in_the_next_hour(
    rig: Rig, tmp_path: Path
) -> None:
    """One user clicks an ad at :59:50 and again at :00:05 (15 s later, a repeat) and at
    :00:25 (35 s after the counted one: billable). Each hour is reconciled on its own: the
    next hour's sees the click before its start as context, and the earlier hour's verdicts
    do not change."""
    nxt = HOUR + HOUR_MS
    clicks = [
        Ev("r0", "ad-7", nxt - 10_000, user_id="u-rep", cost_micros=100),
        Ev("r1", "ad-7", nxt + 5_000, user_id="u-rep", cost_micros=100),
        Ev("r2", "ad-7", nxt + 25_000, user_id="u-rep", cost_micros=100),
    ]
    rig.append(on_time(20) + clicks)
    rig.drain(rig.worker())
    rig.archive.flush()
    rules = tmp_path / "rules.toml"
    rules.write_text(REPEAT_RULES)
    settings = dataclasses.replace(rig.settings, rules_file=rules)
    runs = [reconcile_hours(settings, [hour], reason="closed")[0] for hour in (HOUR, nxt)]
    runs += reconcile_hours(settings, [HOUR, nxt], reason="again")  # together: the same
    assert [run.invalid for run in runs] == [0, 1, 0, 1]
    final = FinalHours(batch_dir(settings))
    for hour, billed in ((HOUR, 1), (nxt, 1)):
        report = final.read_report(hour)
        assert report is not None
        [row] = [r for r in report.to_pylist() if r["ad_id"] == "ad-7"]
        assert row["batch_clicks"] == billed and row["stream_clicks"] == billed + (hour == nxt)
        assert row["newly_invalid_clicks"] == (hour == nxt)
    reasons = final.read(nxt, "invalid_reason")
    assert reasons is not None
    [row] = [r for r in reasons.to_pylist() if r["ad_id"] == "ad-7"]
    assert (row["invalid_reason"], row["minute_ms"]) == ("repeat-click", nxt)  # the rule's id


CTR_RULES = """
[[rules]]
id = "ctr-spike"
kind = "ctr_spike"
reason = "CTR far above the ad's baseline"
[rules.params]
factor = 3.0
baseline_hours = 1
min_clicks = 20
"""


def test_a_ctr_spike_is_reported_for_review_and_stays_billable(rig: Rig, tmp_path: Path) -> None:
    """An ad at 1 click per 10 impressions for an hour, then 40 clicks on 50 impressions:
    the spike's clicks are counted in the report (and ``clickagg reconcile --report``) for
    review, and billed."""
    nxt = HOUR + HOUR_MS

    def events(prefix: str, start: int, impressions: int, clicks: int) -> list[Ev]:
        kinds = [ids.IMPRESSION] * impressions + [ids.CLICK] * clicks
        return [
            Ev(f"{prefix}{i}", "ad-5", start + i * 1000, event_type=kind, user_id=f"{prefix}{i}")
            for i, kind in enumerate(kinds)
        ]

    rig.append(events("base", HOUR + MINUTE_MS, 200, 20) + events("spike", nxt + MINUTE_MS, 50, 40))
    rig.drain(rig.worker())
    rig.archive.flush()
    rules = tmp_path / "rules.toml"
    rules.write_text(CTR_RULES)
    settings = dataclasses.replace(rig.settings, rules_file=rules)
    runs = reconcile_hours(settings, [HOUR, nxt], reason="closed")
    assert [(run.clicks, run.invalid, run.review) for run in runs] == [(20, 0, 0), (40, 0, 40)]
    report = FinalHours(batch_dir(settings)).read_report(nxt)
    assert report is not None
    [row] = report.to_pylist()
    assert (row["batch_clicks"], row["review_clicks"], row["newly_invalid_clicks"]) == (40, 40, 0)

    hour = time.strftime("%Y-%m-%dT%H", time.gmtime(nxt / 1000))
    args = ["reconcile", "--hour", hour, "--report", "--data-dir", str(settings.data_dir)]
    result = CliRunner().invoke(main, args, env={"CLICKAGG_RULES_FILE": str(rules)})
    assert result.exit_code == 0, result.output
    assert "flagged for review: 1 (ad, hour)" in result.output
    assert "ad-5" in result.output.split("flagged for review")[1]
