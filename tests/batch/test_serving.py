"""`clickagg reconcile` beside a live server: its queries serve the final hour at once,
whole (`final: true`), and a restatement replaces it; other hours stay on the stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clickagg.core.windows import HOUR_MS, MINUTE_MS
from tests.e2e.server import ServeProcess, http, lag

pytestmark = pytest.mark.slow


def post(server: ServeProcess, events: list[dict[str, Any]]) -> None:
    response = http.post(server.url + "/events/batch", json=events, timeout=30)
    assert response.status_code == 202 and response.json()["accepted"] == len(events)


def settle(server: ServeProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while lag(server) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def rows(server: ServeProcess, start: int, end: int, granularity: str) -> list[dict[str, Any]]:
    params = {"ad_id": "ad-1", "start": start, "end": end, "granularity": granularity}
    response = http.get(server.url + "/aggregates", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json())


def reconcile(server: ServeProcess, hour: int, *more: str) -> str:
    iso = time.strftime("%Y-%m-%dT%H", time.gmtime(hour / 1000))
    command = [sys.executable, "-m", "clickagg", "reconcile", "--hour", iso, *more]
    command += ["--data-dir", str(server.data_dir), "--partitions", str(server.partitions)]
    env = {**os.environ, "COLUMNS": "200"}  # tables unwrapped
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reconciled 1/1 hours" in done.stderr and "events/s" in done.stderr  # progress
    return done.stdout


def clicks(ad: str, ts_ms: int, n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {"event_type": "click", "event_id": f"{prefix}-{i}", "ad_id": ad, "timestamp": ts_ms}
        for i in range(n)
    ]


def test_a_reconciled_hour_is_served_final_and_restated(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    hour = now - now % HOUR_MS - 2 * HOUR_MS
    server = ServeProcess(tmp_path / "data", partitions=4)  # no closer: we reconcile
    try:
        server.start()
        post(server, clicks("ad-1", hour + 10 * MINUTE_MS, 30, "a"))
        post(server, clicks("ad-1", hour + HOUR_MS + 5 * MINUTE_MS, 4, "next"))
        post(server, clicks("ad-1", now, 1, "now"))  # the watermark passes the hour
        post(server, clicks("ad-1", hour + 20 * MINUTE_MS, 5, "late"))  # left out: late
        settle(server)
        before = rows(server, hour, hour + 2 * HOUR_MS, "hour")
        assert [(r["clicks"], r["final"]) for r in before] == [(30, False), (4, False)]

        shown = reconcile(server, hour, "--report")
        assert "v1 (new)" in shown
        assert "1 of 1 (ad, hour) differ" in shown and "+5 late clicks counted" in shown
        after = rows(server, hour, hour + 2 * HOUR_MS, "hour")
        assert [(r["clicks"], r["final"]) for r in after] == [(35, True), (4, False)]
        minutes = rows(server, hour, hour + HOUR_MS, "minute")
        assert [(r["clicks"], r["final"]) for r in minutes] == [(30, True), (5, True)]
        assert "unchanged" in reconcile(server, hour)  # twice: same rows, one version
        shown = subprocess.run(
            [
                *(sys.executable, "-m", "clickagg", "query", "ad-1", "--url", server.url),
                *("--start", str(hour), "--end", str(hour + 2 * HOUR_MS), "--granularity", "hour"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        ).stdout
        table_rows = [line.split("│") for line in shown.splitlines() if line.startswith("│")]
        assert [cells[-2].strip() for cells in table_rows] == ["yes", "no"], shown  # final

        post(server, clicks("ad-1", hour + 30 * MINUTE_MS, 2, "later"))  # very late
        settle(server)
        assert "v2 (new)" in reconcile(server, hour, "--reason", "very late clicks")
        restated = rows(server, hour, hour + HOUR_MS, "hour")
        assert [(r["clicks"], r["final"]) for r in restated] == [(37, True)]

        span = {"start": hour, "end": hour + HOUR_MS}
        [row] = http.get(server.url + "/reconciliation", params=span, timeout=30).json()
        assert (row["ad_id"], row["stream"]["clicks"], row["batch"]["clicks"]) == ("ad-1", 30, 37)
        assert row["difference"]["clicks"] == 7 == row["causes"]["late_clicks"]  # all late
        [change] = http.get(server.url + "/billing/adjustments", params=span, timeout=30).json()
        assert (change["ad_id"], change["clicks"], change["version"]) == ("ad-1", 2, 2)
        assert change["reason"] == "very late clicks"
        month = time.strftime("%Y-%m", time.gmtime(hour / 1000))
        statement = http.get(
            f"{server.url}/billing/advertisers/unknown/statement", params={"month": month}
        ).json()  # the clicks named no advertiser
        assert statement["totals"]["clicks"] == 37 and statement["time_zone"] == "UTC"
        assert not statement["final"]  # most hours of the month are not reconciled
    finally:
        server.kill9()


def test_the_server_closes_a_past_hour_by_itself(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    hour = now - now % HOUR_MS - 2 * HOUR_MS  # long past its lateness and the close delay
    server = ServeProcess(
        tmp_path / "data", partitions=2, extra_env={"CLICKAGG_CLOSE_INTERVAL": "1s"}
    )
    try:
        server.start()
        post(server, clicks("ad-1", hour + 7 * MINUTE_MS, 12, "a"))
        deadline = time.monotonic() + 60
        found = rows(server, hour, hour + HOUR_MS, "hour")
        while not any(r["final"] for r in found):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
            found = rows(server, hour, hour + HOUR_MS, "hour")
        assert [(r["clicks"], r["final"]) for r in found] == [(12, True)]
        version = json.loads(
            next((server.data_dir / "batch").glob("hour=*/v000001/version.json")).read_text()
        )
        assert version["reason"] == "closed on schedule"
    finally:
        server.kill9()


def owned(
    ad: str, advertiser: str, campaign: str, ts_ms: int, n: int, prefix: str
) -> list[dict[str, Any]]:
    return [
        {**event, "advertiser_id": advertiser, "campaign_id": campaign}
        for event in clicks(ad, ts_ms, n, prefix)
    ]


def test_rollups_and_top_ads_are_final_where_reconciled(tmp_path: Path) -> None:
    """Advertiser and campaign roll-ups serve reconciled hours from the billing rows, late
    clicks included; a top-N over a reconciled range is ranked from them (``final``), one
    reaching into an open hour by the stream."""
    now = int(time.time() * 1000)
    hour = now - now % HOUR_MS - 2 * HOUR_MS
    server = ServeProcess(tmp_path / "data", partitions=4)
    try:
        server.start()
        post(server, owned("ad-1", "adv-A", "camp-1", hour + 10 * MINUTE_MS, 12, "a1"))
        post(server, owned("ad-2", "adv-A", "camp-2", hour + 11 * MINUTE_MS, 10, "a2"))
        post(server, owned("ad-3", "adv-B", "camp-3", hour + 12 * MINUTE_MS, 3, "b3"))
        post(server, owned("ad-1", "adv-A", "camp-1", hour + HOUR_MS + MINUTE_MS, 2, "n1"))
        # Every partition's watermark passes the hour (ids spread over all 4 partitions).
        post(server, clicks("ad-9", now, 40, "now"))
        post(server, owned("ad-2", "adv-A", "camp-2", hour + 20 * MINUTE_MS, 5, "late2"))
        settle(server)

        def get(path: str, **params: Any) -> Any:
            response = http.get(server.url + path, params=params, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        def ranking(start: int, end: int, **more: Any) -> tuple[bool, list[tuple[str, int]]]:
            body = get("/ads/top", start=start, end=end, **more)
            return body["final"], [(ad["ad_id"], ad["clicks"]) for ad in body["ads"]]

        def windows(path: str) -> list[tuple[int, bool]]:
            body = get(path, start=hour, end=hour + 2 * HOUR_MS, granularity="hour")
            return [(m["clicks"], m["final"]) for m in body["metrics"]]

        # The stream left the 5 late clicks of ad-2 out.
        assert ranking(hour, hour + HOUR_MS) == (False, [("ad-1", 12), ("ad-2", 10), ("ad-3", 3)])
        assert windows("/advertisers/adv-A/metrics") == [(22, False), (2, False)]
        reconcile(server, hour)
        assert windows("/advertisers/adv-A/metrics") == [(27, True), (2, False)]
        assert windows("/campaigns/camp-2/metrics") == [(15, True)]
        assert windows("/advertisers/adv-B/metrics") == [(3, True)]
        assert ranking(hour, hour + HOUR_MS) == (True, [("ad-2", 15), ("ad-1", 12), ("ad-3", 3)])
        assert ranking(hour, hour + HOUR_MS, limit=1, advertiser_id="adv-B") == (
            True,
            [("ad-3", 3)],
        )
        # Into the open next hour: the stream's ranking, whole.
        assert ranking(hour, hour + 2 * HOUR_MS) == (
            False,
            [("ad-1", 14), ("ad-2", 10), ("ad-3", 3)],
        )
        for bad in ("0", "1001", "²", "ten"):
            response = http.get(server.url + "/ads/top", params={"limit": bad}, timeout=30)
            assert response.status_code == 400 and "limit" in response.json()["detail"]
        response = http.get(server.url + "/ads/top", params={"by": "ctr"}, timeout=30)
        assert response.status_code == 400 and "by=" in response.json()["detail"]
    finally:
        server.kill9()
