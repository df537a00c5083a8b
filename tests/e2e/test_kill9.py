"""kill -9 the whole server mid-stream, restart, re-send, and compare every minute count
with a reference computed here: exactly-once across crashes, nothing acknowledged lost."""

from __future__ import annotations

import calendar
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.e2e.server import ServeProcess, lag

MINUTE_MS = 60_000
Batch = list[dict[str, Any]]


class Workload:
    """Distinct events on time (within 2 minutes), late ones, and 10 % exact copies."""

    def __init__(self, seed: int, *, events: int, ads: int = 12) -> None:
        rnd = random.Random(seed)
        now_ms = int(time.time() * 1000)
        self.warmup: Batch = [
            {
                "event_type": "impression",
                "event_id": f"warm-{n}",
                "ad_id": "ad-warm",
                "timestamp": now_ms,
            }
            for n in range(64)
        ]
        self.on_time: Batch = []
        for n in range(events):
            self.on_time.append(
                {
                    "event_type": "click" if rnd.random() < 0.3 else "impression",
                    "event_id": f"e-{seed}-{n}",
                    "ad_id": f"ad-{rnd.randrange(ads)}",
                    "timestamp": now_ms - rnd.randrange(2 * MINUTE_MS),
                    "user_id": f"u-{rnd.randrange(500)}",
                }
            )
        self.late: Batch = [
            {
                "event_type": "click",
                "event_id": f"late-{seed}-{n}",
                "ad_id": f"ad-{n % ads}",
                "timestamp": now_ms - 15 * MINUTE_MS,
            }
            for n in range(events // 50)
        ]
        stream = self.on_time + self.late
        stream += [dict(rnd.choice(stream)) for _ in range(len(stream) // 10)]
        rnd.shuffle(stream)
        self.stream = stream

    def reference(self) -> Counter[tuple[str, int, str]]:
        counts: Counter[tuple[str, int, str]] = Counter()
        for event in self.warmup + self.on_time:
            ts = event["timestamp"]
            counts[(event["ad_id"], ts - ts % MINUTE_MS, event["event_type"])] += 1
        return counts

    def batches(self, size: int) -> list[Batch]:
        return [self.stream[i : i + size] for i in range(0, len(self.stream), size)]


def post(url: str, batch: Batch) -> bool:
    """True when the server acknowledged (202) the batch."""
    try:
        body = b"\n".join(msgspec.json.encode(e) for e in batch)
        response = httpx.post(
            url + "/events/batch",
            content=body,
            timeout=10,
            headers={"content-type": "application/x-ndjson"},
        )
    except httpx.HTTPError:
        return False
    # Anything but an acknowledgement or a lost connection (the kill) is a bug.
    assert response.status_code == 202, response.text
    assert response.json()["rejected"] == []
    return True


def send_until_killed(
    server: ServeProcess, batches: list[Batch], kill_after_s: float, threads: int = 3
) -> set[int]:
    """Send batches from several threads; kill -9 the server meanwhile. Returns acked batches."""
    acked: set[int] = set()
    lock = threading.Lock()
    todo: Iterator[int] = iter(range(len(batches)))

    errors: list[BaseException] = []

    def sender() -> None:
        while True:
            with lock:
                index = next(todo, None)
            if index is None:
                return
            try:
                ok = post(server.url, batches[index])
            except BaseException as exc:  # surfaced in the test thread below
                errors.append(exc)
                return
            if ok:
                with lock:
                    acked.add(index)

    workers = [threading.Thread(target=sender) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(kill_after_s)
    server.kill9()
    for worker in workers:
        worker.join(timeout=30)
    if errors:
        raise errors[0]
    return acked


def minute_counts(url: str, ads: set[str]) -> Counter[tuple[str, int, str]]:
    counts: Counter[tuple[str, int, str]] = Counter()
    for ad_id in ads:
        rows = httpx.get(
            url + "/aggregates",
            params={"ad_id": ad_id, "granularity": "minute", "last": "1h"},
            timeout=10,
        ).json()
        for row in rows:
            minute = calendar.timegm(time.strptime(row["window"], "%Y-%m-%dT%H:%M:%SZ")) * 1000
            for kind, key in (("click", "clicks"), ("impression", "impressions")):
                if row[key]:
                    counts[(ad_id, minute, kind)] += row[key]
    return counts


def wait_caught_up(server: ServeProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lag(server) == 0:
            return
        time.sleep(0.1)
    raise AssertionError("workers did not catch up")


def run_crash_cycles(tmp_path: Path, *, seed: int, events: int, kills: int) -> None:
    workload = Workload(seed, events=events)
    batches = workload.batches(100)
    server = ServeProcess(tmp_path / "data")
    server.start()
    try:
        assert post(server.url, workload.warmup)
        wait_caught_up(server)  # every partition has seen "now": the late events are late
        rnd = random.Random(seed)
        pending = list(range(len(batches)))
        for _ in range(kills):
            acked = send_until_killed(
                server, [batches[i] for i in pending], kill_after_s=rnd.uniform(0.2, 1.0)
            )
            pending = [i for n, i in enumerate(pending) if n not in acked]
            server.start()
        for index in pending:  # re-send what was never acknowledged
            assert post(server.url, batches[index])
        for index in rnd.sample(range(len(batches)), k=min(5, len(batches))):
            assert post(server.url, batches[index])  # client retries of acknowledged batches
        wait_caught_up(server)
        ads = {e["ad_id"] for e in workload.warmup + workload.stream}
        reference = workload.reference()
        assert minute_counts(server.url, ads) == reference
        for ad_id in ads:  # real-time counters, refilled from the store after each restart
            realtime = httpx.get(
                f"{server.url}/aggregates/realtime",
                params={"ad_id": ad_id, "window": "1h"},
                timeout=10,
            ).json()
            expected = sum(
                n for (ad, _, kind), n in reference.items() if ad == ad_id and kind == "click"
            )
            assert realtime["clicks"] == expected, ad_id
        sample = rnd.sample(workload.stream, k=min(200, len(workload.stream)))
        for event in sample:
            traced = httpx.get(f"{server.url}/events/{event['event_id']}", timeout=10)
            assert traced.status_code == 200, event
            expected = "late" if event["event_id"].startswith("late-") else "counted"
            assert traced.json()["status"] == expected, traced.json()
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        server.stop()


def test_kill9_mid_stream_then_restart_counts_exactly_once(tmp_path: Path) -> None:
    run_crash_cycles(tmp_path, seed=1, events=4000, kills=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_repeated_kill9_under_load(tmp_path: Path, seed: int) -> None:
    run_crash_cycles(tmp_path, seed=seed, events=12_000, kills=4)
