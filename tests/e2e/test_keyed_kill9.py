"""kill -9 while the keyed stage's verdicts are in flight: a one-address burst spread over
every partition is posted in small batches while the worker process is killed again and
again (the supervisor restarts it), then the whole server once. Once caught up, every
burst click is invalid exactly once and every other click billed exactly once, in the
minute rows, the ``invalid_reason`` breakdown and the real-time windows: no correction
lost with a stage-1 round or a stage-2 step, none doubled by a redo."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import ServeProcess, http
from tests.e2e.test_keyed_stage import ADS, BROWSER, BURST_IP, minute_rows
from tests.e2e.test_kill9 import chaos_seeds, post, wait_caught_up, wait_healthy, worker_pid

BURST = 400
NORMAL = 300
NEAR_IP = "192.0.2.200"  # exactly at the limit: billed, unless a copy were counted twice
LIMIT = 60


def workload(seed: int, minute_s: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def click(event_id: str, ip: str, ad: str) -> dict[str, Any]:
        return {
            "event_type": "click",
            "event_id": event_id,
            "ad_id": ad,
            "user_id": f"u-{event_id}",  # one click per user: no repeat-click verdicts
            "timestamp": (minute_s * 1000 + rng.randrange(60_000)) / 1000,
            "ip": ip,
            "user_agent": BROWSER,
            "cost_micros": 1_000 * rng.randrange(1, 5),
        }

    events = [click(f"burst-{i}", BURST_IP, ADS[i % 4]) for i in range(BURST)]
    events += [click(f"ok-{i}", f"192.0.2.{i % 50}", ADS[i % 4]) for i in range(NORMAL)]
    events += [click(f"near-{i}", NEAR_IP, ADS[i % 4]) for i in range(LIMIT)]
    rng.shuffle(events)
    return events


def expected_totals(events: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    expected: Counter[tuple[str, str]] = Counter()
    for event in events:
        ad = event["ad_id"]
        if event["ip"] == BURST_IP:
            expected[(ad, "invalid")] += 1
        else:
            expected[(ad, "clicks")] += 1
            expected[(ad, "spend")] += event["cost_micros"]
    return expected


def stream_totals(url: str, minute_s: int) -> Counter[tuple[str, str]]:
    got: Counter[tuple[str, str]] = Counter()
    for ad in ADS:
        for row in minute_rows(url, ad, minute_s):
            got[(ad, "clicks")] += row["clicks"]
            got[(ad, "invalid")] += row["invalid_clicks"]
            got[(ad, "spend")] += row["spend_micros"]
    return +got


def send_while_killing_workers(
    server: ServeProcess, batches: list[list[dict[str, Any]]], kills: int, rnd: random.Random
) -> None:
    """Post every batch (each must be acknowledged: the API process stays up) from two
    threads, paced over the kills, while the worker process is SIGKILLed ``kills`` times.
    Unlike test_kill9's worker kills (batches released a share per kill), the sends run on
    through each kill: a kill then lands while a minute's clicks are pending below the
    limit in stage 2's windows, which is what a recovery that lost them would miscount."""
    todo = iter(range(len(batches)))
    lock = threading.Lock()
    errors: list[BaseException] = []
    pace_s = kills * 1.0 / len(batches)

    def sender() -> None:
        while True:
            with lock:
                index = next(todo, None)
            if index is None:
                return
            try:
                assert post(server.url, batches[index]), "the API process must stay up"
            except BaseException as exc:
                errors.append(exc)
                return
            time.sleep(pace_s)

    senders = [threading.Thread(target=sender) for _ in range(2)]
    for thread in senders:
        thread.start()
    killed: list[int] = []
    try:
        for _ in range(kills):
            pid = worker_pid(server, not_one_of=killed)
            wait_healthy(server)
            time.sleep(rnd.uniform(0.1, 0.6))  # rounds and keyed steps under way
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    finally:
        for thread in senders:
            thread.join(timeout=60)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("seed", chaos_seeds(21, 22, 23))
def test_kill9_with_keyed_verdicts_in_flight_counts_each_click_once(
    tmp_path: Path, seed: int
) -> None:
    server = ServeProcess(
        tmp_path / "data",
        partitions=4,
        extra_env={
            "CLICKAGG_KEYED_STAGE": "true",
            "CLICKAGG_KEYED_PARTITIONS": "3",
            "CLICKAGG_CLOSE_INTERVAL": "0",
        },
    )
    server.start()
    rnd = random.Random(seed)
    try:
        now_s = int(time.time())
        minute_s = now_s - now_s % 60 - 60  # the whole burst in one past UTC minute
        events = workload(seed, minute_s)
        batches = [events[i : i + 20] for i in range(0, len(events), 20)]
        half = len(batches) // 2
        send_while_killing_workers(server, batches[:half], kills=3, rnd=rnd)

        # Then the whole server, mid-stream, and a restart on the same data dir.
        rest = batches[half:]
        for batch in rest[: len(rest) // 2]:
            assert post(server.url, batch)
        server.kill9()
        server.start()
        for batch in rest[len(rest) // 2 :]:
            assert post(server.url, batch)
        for batch in rnd.sample(batches, k=5):  # retransmissions: duplicates, no effect
            assert post(server.url, batch)
        wait_caught_up(server)

        expected = expected_totals(events)
        deadline = time.monotonic() + 30
        while (got := stream_totals(server.url, minute_s)) != expected:
            assert time.monotonic() < deadline, (got, expected)
            time.sleep(0.1)
        by_reason: Counter[str] = Counter()
        for ad in ADS:
            for row in minute_rows(server.url, ad, minute_s, group_by="invalid_reason"):
                by_reason[row["invalid_reason"]] += row["invalid_clicks"]
        assert by_reason == Counter({"ip-click-velocity": BURST})
        for ad in ADS:
            realtime = http.get(
                server.url + "/aggregates/realtime",
                params={"ad_id": ad, "window": "1h"},
                timeout=10,
            ).json()
            assert realtime["clicks"] == expected[(ad, "clicks")]
            assert realtime["spend_micros"] == expected[(ad, "spend")]
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        server.stop()
