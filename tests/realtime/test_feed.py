"""The counters' feed and the API process's replica: over a real Unix socket, the replica
holds exactly the worker's counters, whenever it subscribed, and starts over after any
break."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.realtime.feed import (
    ROUND,
    SNAPSHOT,
    FeedServer,
    PublishingCounters,
    decode_frame,
    encode_frame,
)
from clickagg.realtime.memory import SUMS_SCHEMA, InMemoryCounters
from clickagg.realtime.replica import CountersReplica

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
ADS = [f"ad{i}" for i in range(20)]


def sums(rows: list[tuple[str, int, int, int]]) -> pa.Table:
    return pa.table(
        {
            "ad_id": [ad for ad, _, _, _ in rows],
            "minute_ms": [minute for _, minute, _, _ in rows],
            "clicks": [clicks for _, _, clicks, _ in rows],
            "impressions": [imps for _, _, _, imps in rows],
            "spend_micros": [clicks * 7 for _, _, clicks, _ in rows],
            "invalid_clicks": [0 for _ in rows],
        },
        schema=SUMS_SCHEMA,
    )


def random_round(rng: random.Random) -> pa.Table:
    return sums(
        [
            (rng.choice(ADS), T0 + rng.randrange(30) * MINUTE_MS, rng.randrange(1, 9), 1)
            for _ in range(rng.randrange(0, 40))
        ]
    )


class Rounds:
    """Applies random rounds over 4 partitions (offsets continuing) from a thread, like
    the worker's stream loop."""

    def __init__(self, counters: PublishingCounters, seed: int) -> None:
        self.counters = counters
        self.rng = random.Random(seed)
        self.next = dict.fromkeys(range(4), 0)

    def apply(self, n: int) -> None:
        for _ in range(n):
            parts = self.rng.sample(range(4), self.rng.randrange(1, 5))
            ranges = {}
            for p in parts:
                width = self.rng.randrange(0, 50)
                ranges[p] = (self.next[p], self.next[p] + width)
                self.next[p] += width
            self.counters.apply(random_round(self.rng), ranges)


def windows_of(window: Callable[..., object]) -> list[object]:
    return [
        window(ad_id=ad, start_ms=T0 + lo * MINUTE_MS, end_ms=T0 + hi * MINUTE_MS)
        for ad in ADS
        for lo, hi in ((0, 30), (0, 5), (12, 13), (29, 30))
    ]


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "feed.sock"


@pytest.fixture
def feed(socket_path: Path) -> Iterator[tuple[PublishingCounters, FeedServer]]:
    counters = PublishingCounters(InMemoryCounters())
    server = FeedServer(socket_path, counters)
    server.start()
    yield counters, server
    server.stop()


def test_a_frame_is_msgpack_and_arrow_and_reads_back() -> None:
    table = sums([("a", T0, 3, 1), ("b", T0 + MINUTE_MS, 1, 0)])
    frame = encode_frame(ROUND, {2: (10, 14), 0: (0, 3)}, table)
    kind, ranges, back = decode_frame(frame[4:])
    assert (kind, ranges) == (ROUND, {0: (0, 3), 2: (10, 14)})
    assert back.equals(table)
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4


def test_the_replica_equals_the_counters_whenever_it_subscribed(
    feed: tuple[PublishingCounters, FeedServer], socket_path: Path
) -> None:
    """Rounds are applied from a thread before, while and after the replica subscribes;
    once the writer stops, every window of the replica equals the worker's."""
    counters, _ = feed
    rounds = Rounds(counters, seed=7)
    rounds.apply(50)  # before the replica exists: in its snapshot
    stop = threading.Event()

    def keep_applying() -> None:
        for _ in range(400):
            if stop.is_set():
                return
            rounds.apply(1)
            time.sleep(0.0005)

    async def main() -> None:
        replica = CountersReplica(socket_path)
        writer = threading.Thread(target=keep_applying)
        writer.start()
        try:
            replica.start()
            await until(lambda: replica.live)
            await asyncio.to_thread(writer.join)
            rounds.apply(20)
            await until(lambda: replica.applied_offsets() == counters.applied_offsets())
            assert windows_of(replica.window) == windows_of(counters.window)
            assert replica.snapshots == 1
            assert sum(w.clicks for w in windows_of(counters.window)) > 0  # type: ignore[attr-defined]
        finally:
            stop.set()
            writer.join()
            await replica.close()

    asyncio.run(main())


def test_a_reader_that_falls_behind_is_cut_off_and_the_writer_never_waits(
    socket_path: Path,
) -> None:
    counters = PublishingCounters(InMemoryCounters(), max_queued=3)
    server = FeedServer(socket_path, counters)
    server.start()
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stalled.connect(str(socket_path))
        wait_until(lambda: counters.subscribers == 1)
        rounds = Rounds(counters, seed=1)
        started = time.monotonic()
        rounds.apply(200)  # never read: it would block a writer that waited
        assert time.monotonic() - started < 5
        wait_until(lambda: counters.subscribers == 0)
    finally:
        stalled.close()
        server.stop()


def test_the_replica_starts_over_from_a_new_worker_and_answers_none_in_between(
    socket_path: Path,
) -> None:
    async def main() -> None:
        first = PublishingCounters(InMemoryCounters())
        first.apply(sums([("ad0", T0, 5, 0)]), {0: (0, 5)})
        server = FeedServer(socket_path, first)
        server.start()
        replica = CountersReplica(socket_path)
        replica.start()
        try:
            await until(lambda: replica.live)
            assert replica.window(ad_id="ad0", start_ms=T0, end_ms=T0 + MINUTE_MS) is not None
            server.stop()  # the worker went away
            await until(lambda: not replica.live)
            assert replica.window(ad_id="ad0", start_ms=T0, end_ms=T0 + MINUTE_MS) is None
            # the next worker refilled its counters from the store: a state of its own
            second = PublishingCounters(InMemoryCounters())
            second.apply(sums([("ad0", T0, 9, 0)]), {0: (0, 9)})
            server = FeedServer(socket_path, second)
            server.start()
            await until(lambda: replica.live)
            second.apply(sums([("ad0", T0, 1, 0)]), {0: (9, 10)})
            await until(lambda: replica.applied_offsets() == {0: 10})
            answer = replica.window(ad_id="ad0", start_ms=T0, end_ms=T0 + MINUTE_MS)
            assert answer is not None and answer.clicks == 10
            assert replica.snapshots == 2
        finally:
            await replica.close()
            server.stop()

    asyncio.run(main())


def test_a_round_that_does_not_continue_the_offsets_makes_the_replica_start_over(
    socket_path: Path,
) -> None:
    """A feed with a gap (frames crafted here) is dropped: the replica reconnects and
    follows the next snapshot instead of serving counts with a hole."""
    snapshot = encode_frame(SNAPSHOT, {0: (0, 5)}, sums([("ad0", T0, 5, 0)]))
    gap = encode_frame(ROUND, {0: (7, 9)}, sums([("ad0", T0, 2, 0)]))
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.write(snapshot)
        if len(connections) == 1:
            writer.write(gap)
        await writer.drain()
        await reader.read()  # hold the connection until the replica closes it
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, str(socket_path))
        replica = CountersReplica(socket_path)
        replica.start()
        try:
            await until(lambda: replica.snapshots == 2 and replica.live)
            answer = replica.window(ad_id="ad0", start_ms=T0, end_ms=T0 + MINUTE_MS)
            assert answer is not None and answer.clicks == 5
            assert replica.rounds == 0
        finally:
            await replica.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
