"""Recent queries through the real server come from the API process's replica of the
recent minutes and hours: sliding windows, the last hour's minute rows and the last day's
hour rows are answered while the worker process is frozen (so they do not wait for its
GIL; a metrics scrape answers too, without the stream's figures), they are exact, and
after a kill -9 of the worker the replica follows the new worker exactly (its hours from
the new worker's snapshot of the store's hour rows). ``/metrics`` shows the replica live,
its rounds, snapshots and what it holds."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import ServeProcess, http
from tests.e2e.test_kill9 import post, wait_caught_up, wait_healthy, worker_pid

ADS = ("ad-r1", "ad-r2", "ad-r3")


def clicks(
    prefix: str, n: int, now_s: int, rng: random.Random, *, age_s: int = 0
) -> list[dict[str, Any]]:
    return [
        {
            "event_type": "click",
            "event_id": f"{prefix}-{i}",
            "ad_id": ADS[i % len(ADS)],
            "user_id": f"u-{prefix}-{i}",
            "timestamp": now_s - age_s - rng.randrange(300),
            "cost_micros": 1_000,
        }
        for i in range(n)
    ]


def realtime(server: ServeProcess, ad: str, timeout_s: float = 10) -> dict[str, Any]:
    response = http.get(
        server.url + "/aggregates/realtime", params={"ad_id": ad, "window": "1h"}, timeout=timeout_s
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def rows(
    server: ServeProcess, ad: str, granularity: str, last: str, timeout_s: float = 10
) -> list[dict[str, Any]]:
    response = http.get(
        server.url + "/aggregates",
        params={"ad_id": ad, "granularity": granularity, "last": last},
        timeout=timeout_s,
    )
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


def minute_rows(server: ServeProcess, ad: str, timeout_s: float = 10) -> list[dict[str, Any]]:
    return rows(server, ad, "minute", "1h", timeout_s)


def hour_rows(server: ServeProcess, ad: str, timeout_s: float = 10) -> list[dict[str, Any]]:
    return rows(server, ad, "hour", "1d", timeout_s)


def replica_figures(server: ServeProcess) -> dict[str, float]:
    """The replica's samples of a scrape, by name (and granularity, after a colon)."""
    scrape = http.get(server.url + "/metrics", timeout=10)
    scrape.raise_for_status()
    return {
        ":".join([sample.name, *sample.labels.values()]): sample.value
        for family in text_string_to_metric_families(scrape.text)
        for sample in family.samples
        if sample.name.startswith("clickagg_replica_") and not sample.name.endswith("_created")
    }


def wait_windows(server: ServeProcess, expected: Counter[str], timeout_s: float = 30) -> None:
    """Until every ad's window equals ``expected`` (a window never exceeds it meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = Counter({ad: realtime(server, ad)["clicks"] for ad in ADS})
        assert all(got[ad] <= expected[ad] for ad in ADS), (got, expected)
        if got == expected:
            return
        assert time.monotonic() < deadline, (got, expected)
        time.sleep(0.05)


def test_windows_are_answered_by_the_replica_exactly_and_through_worker_restarts(
    tmp_path: Path,
) -> None:
    server = ServeProcess(tmp_path / "data", partitions=3)
    server.start()
    rng = random.Random(5)
    now_s = int(time.time())
    expected: Counter[str] = Counter()
    try:
        # Clicks of three hours ago first (not late: nothing newer was seen yet), so that
        # the last day's hour rows hold hours before the replica's minutes.
        old = clicks("o", 60, now_s, rng, age_s=3 * 3600)
        assert post(server.url, old)
        earlier = Counter(e["ad_id"] for e in old)  # not in the last hour's windows
        wait_caught_up(server)
        first = clicks("a", 300, now_s, rng)
        for i in range(0, len(first), 100):
            assert post(server.url, first[i : i + 100])
        expected.update(e["ad_id"] for e in first)
        wait_caught_up(server)
        wait_windows(server, expected)

        minutes = {ad: minute_rows(server, ad) for ad in ADS}
        assert {ad: sum(r["clicks"] for r in minutes[ad]) for ad in ADS} == expected
        hours = {ad: hour_rows(server, ad) for ad in ADS}
        assert {ad: sum(r["clicks"] for r in hours[ad]) for ad in ADS} == expected + earlier
        assert all(len(hours[ad]) >= 2 for ad in ADS)
        figures = replica_figures(server)  # the replica is live, and what it holds costs
        assert figures["clickagg_replica_live"] == 1
        assert figures["clickagg_replica_snapshots_total"] == 1
        assert figures["clickagg_replica_rounds_total"] > 0
        for granularity in ("minute", "hour"):
            assert figures[f"clickagg_replica_cells:{granularity}"] >= len(ADS)
            assert figures[f"clickagg_replica_sketch_bytes:{granularity}"] > 0
        worker = worker_pid(server, not_one_of=[])
        os.kill(worker, signal.SIGSTOP)
        try:
            # Frozen worker: no query of it could be answered; the replica answers at once.
            started = time.monotonic()
            for ad in ADS:
                assert realtime(server, ad, timeout_s=2)["clicks"] == expected[ad]
                assert minute_rows(server, ad, timeout_s=2) == minutes[ad]
                assert hour_rows(server, ad, timeout_s=2) == hours[ad]
            assert time.monotonic() - started < 2
            # A scrape still answers, after a bounded wait, without the stream's figures.
            scrape = http.get(server.url + "/metrics", timeout=10)
            assert scrape.status_code == 200
            assert "\nclickagg_store_up 0.0\n" in scrape.text
            assert "\nclickagg_worker_restarts 0.0\n" in scrape.text
            assert "clickagg_partition_durable_end_offset{" in scrape.text
            assert "clickagg_partition_committed_offset{" not in scrape.text  # not known
            assert "\nclickagg_replica_live 1.0\n" in scrape.text  # still following
        finally:
            os.kill(worker, signal.SIGCONT)
        scrape = http.get(server.url + "/metrics", timeout=10)
        assert "\nclickagg_store_up 1.0\n" in scrape.text
        assert "clickagg_partition_committed_offset{" in scrape.text

        second = clicks("b", 240, now_s, rng)
        assert post(server.url, second)
        expected.update(e["ad_id"] for e in second)
        wait_caught_up(server)
        wait_windows(server, expected)

        os.kill(worker, signal.SIGKILL)  # the replica must follow the next worker's counters
        third = clicks("c", 90, now_s, rng)
        assert post(server.url, third)  # accepted by the API process meanwhile
        expected.update(e["ad_id"] for e in third)
        new_worker = worker_pid(server, not_one_of=[worker])
        wait_healthy(server)
        wait_caught_up(server)
        wait_windows(server, expected)
        for ad in ADS:  # minute rows too, unique users included (one user per click)
            after = minute_rows(server, ad)
            assert sum(r["clicks"] for r in after) == expected[ad]
            assert sum(r["unique_users"] for r in after) == expected[ad]
            by_hour = hour_rows(server, ad)
            assert sum(r["clicks"] for r in by_hour) == expected[ad] + earlier[ad]
            assert sum(r["unique_users"] for r in by_hour) == expected[ad] + earlier[ad]
        figures = replica_figures(server)  # it started over from the new worker's snapshot
        assert figures["clickagg_replica_live"] == 1
        assert figures["clickagg_replica_snapshots_total"] >= 2
        os.kill(new_worker, signal.SIGSTOP)  # its hours came in the new worker's snapshot
        try:
            for ad in ADS:
                by_hour = hour_rows(server, ad, timeout_s=2)
                assert sum(r["clicks"] for r in by_hour) == expected[ad] + earlier[ad]
        finally:
            os.kill(new_worker, signal.SIGCONT)
    finally:
        server.stop()
