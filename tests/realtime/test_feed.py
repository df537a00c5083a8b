"""The worker's feed of committed minute rows and the API process's replica of the recent
minutes: over a real Unix socket and a real store, the replica answers exactly what the
store answers, whenever it subscribed, and starts over after any break."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clickagg.core import hll
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.query.base import HeldCells
from clickagg.realtime.feed import (
    ROUND,
    SNAPSHOT,
    FeedServer,
    PublishingCounters,
    Snapshot,
    decode_frame,
    encode_frame,
)
from clickagg.realtime.memory import InMemoryCounters
from clickagg.realtime.recent import RecentAggregates
from clickagg.realtime.replica import RecentReplica
from clickagg.store.duckdb_store import DuckDBStore
from tests.conftest import Ev
from tests.contracts.test_roles import commit_of

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
SINCE = T0 - 10 * MINUTE_MS
ADS = [f"ad{i}" for i in range(12)]
RANGES = [(0, 30), (0, 5), (12, 13), (29, 30), (3, 21)]


def sums(rows: list[tuple[str, int, int]]) -> pa.Table:
    return pa.table(
        {
            "ad_id": [ad for ad, _, _ in rows],
            "minute_ms": [minute for _, minute, _ in rows],
            "clicks": [clicks for _, _, clicks in rows],
            "impressions": [0 for _ in rows],
            "spend_micros": [clicks * 7 for _, _, clicks in rows],
            "invalid_clicks": [0 for _ in rows],
        }
    )


class Worker:
    """What the worker's stream loop does with a round: commit it to the store, then apply
    it to the (publishing) counters. Random events over 4 partitions, 12 ads, 30 minutes,
    a few hundred users (so that unique users are estimated from merged sketches)."""

    def __init__(
        self,
        store: DuckDBStore,
        seed: int,
        *,
        max_queued: int = 4096,
        first_ms: int = T0,
        span_ms: int = 30 * MINUTE_MS,
        since_ms: int = SINCE,
        hours_since_ms: int | None = None,
    ) -> None:
        self.store = store
        self.first_ms, self.span_ms = first_ms, span_ms
        self.since_ms, self.hours_since_ms = since_ms, hours_since_ms
        self.counters = PublishingCounters(
            InMemoryCounters(), snapshot=self.snapshot, max_queued=max_queued
        )
        self.rng = random.Random(seed)
        self.next = dict.fromkeys(range(4), 0)
        self.ids = 0

    def snapshot(self) -> Snapshot:
        recent = self.store.recent_rows(self.since_ms, self.hours_since_ms)
        return Snapshot(
            recent.minutes, recent.committed, self.since_ms, recent.hours, self.hours_since_ms
        )

    def rounds(self, n: int) -> None:
        for _ in range(n):
            commits = []
            for p in self.rng.sample(range(4), self.rng.randrange(1, 5)):
                events = []
                for _ in range(self.rng.randrange(1, 30)):
                    self.ids += 1
                    events.append(
                        Ev(
                            f"e{self.ids}",
                            self.rng.choice(ADS),
                            self.first_ms + self.rng.randrange(self.span_ms),
                            user_id=f"u{self.rng.randrange(300)}",
                            cost_micros=1_000,
                        )
                    )
                commits.append(commit_of(p, self.next[p], events))
                self.next[p] += len(events)
            self.store.commit_many(commits)
            minute = pa.concat_tables([c.minute_deltas for c in commits])
            ranges = {c.partition: (c.from_offset, c.to_offset) for c in commits}
            self.counters.apply(minute, ranges)


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def held_clicks(replica: RecentReplica) -> int:
    """Clicks of ad0 in minute T0 as the replica holds them (it must be following a feed)."""
    recent = replica.covering(T0)
    assert recent is not None
    return recent.window(ad_id="ad0", start_ms=T0, end_ms=T0 + MINUTE_MS).clicks


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBStore]:
    store = DuckDBStore(tmp_path / "agg.duckdb")
    yield store
    store.close()


@contextlib.asynccontextmanager
async def subscribed_while_committing(
    worker: Worker, tmp_path: Path, *, rounds: int, compact_every: int
) -> AsyncIterator[RecentReplica]:
    """A replica that subscribed while ``rounds`` rounds were committed and applied from
    another thread (compacting every ``compact_every``), once it holds them and 5 more."""
    server = FeedServer(tmp_path / "feed.sock", worker.counters)
    server.start()

    def keep_committing() -> None:
        for i in range(rounds):
            worker.rounds(1)
            if i % compact_every == 0:
                worker.store.compact()

    replica = RecentReplica(tmp_path / "feed.sock")
    writer = threading.Thread(target=keep_committing)
    writer.start()
    try:
        replica.start()
        await until(lambda: replica.live)
        await asyncio.to_thread(writer.join)
        worker.rounds(5)
        await until(lambda: replica.applied_offsets() == worker.store.committed_offsets())
        yield replica
    finally:
        writer.join()
        await replica.close()
        server.stop()


def test_a_frame_is_msgpack_and_arrow_and_reads_back() -> None:
    table = sums([("a", T0, 3), ("b", T0 + MINUTE_MS, 1)])
    frame = encode_frame(ROUND, {2: (10, 14), 0: (0, 3)}, table, since_ms=T0)
    kind, ranges, since_ms, back, hours_since_ms, hours = decode_frame(frame[4:])
    assert (kind, ranges, since_ms) == (ROUND, {0: (0, 3), 2: (10, 14)}, T0)
    assert hours_since_ms is None and hours is None  # a round carries no hours
    assert back.drop_columns(["users"]).equals(table)
    assert back["users"].null_count == 2  # sums only: no sketch
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4


def test_the_replica_answers_what_the_store_answers_whenever_it_subscribed(
    store: DuckDBStore, tmp_path: Path
) -> None:
    """Rounds are committed and applied from a thread, with compactions between them,
    before, while and after the replica subscribes; once they stop, every minute row,
    total and window of the replica equals the store's."""
    worker = Worker(store, seed=7)
    worker.rounds(10)  # before the replica exists: in its snapshot
    store.compact()

    async def main() -> None:
        async with subscribed_while_committing(
            worker, tmp_path, rounds=30, compact_every=10
        ) as replica:
            recent = replica.covering(T0)
            assert recent is not None
            assert replica.covering(SINCE - 1) is None  # not held whole: the worker's
            checked_users = 0
            for ad in ADS:
                for lo, hi in RANGES:
                    start, end = T0 + lo * MINUTE_MS, T0 + hi * MINUTE_MS
                    rows = recent.minutes(ad_id=ad, start_ms=start, end_ms=end)
                    assert rows == store.aggregates(
                        ad_id=ad, start_ms=start, end_ms=end, granularity="minute"
                    )
                    totals = recent.totals(ad_id=ad, start_ms=start, end_ms=end)
                    assert totals == store.totals(ad_id=ad, start_ms=start, end_ms=end)
                    window = recent.window(ad_id=ad, start_ms=start, end_ms=end)
                    assert window == store.totals(
                        ad_id=ad, start_ms=start, end_ms=end, unique_users=False
                    )
                    checked_users += totals.unique_users
            assert checked_users > 0
            assert replica.snapshots == 1 and replica.rounds > 0
            status = replica.status()
            assert status.live and (status.snapshots, status.rounds) == (1, replica.rounds)
            assert status.held == walked(recent)
            assert status.held["minute"].cells > 0 and status.held["minute"].sketch_bytes > 0

    asyncio.run(main())


def test_the_replicas_hours_and_days_are_the_stores_whenever_it_subscribed(
    store: DuckDBStore, tmp_path: Path
) -> None:
    """Events over five hours, the minutes before the snapshot's whole hour sent as hour
    rows (the store's hour base, minutes not rolled up yet and deltas), then rounds and
    compactions (which roll minutes up into hours) while the replica subscribes: every
    hour and day row of the replica equals the store's, unique users included."""
    first = T0 - 4 * HOUR_MS
    worker = Worker(
        store,
        seed=11,
        first_ms=first,
        span_ms=4 * HOUR_MS + 30 * MINUTE_MS,
        since_ms=T0 - HOUR_MS,
        hours_since_ms=first,
    )
    worker.rounds(10)
    store.compact()
    worker.rounds(3)  # deltas not compacted at the snapshot

    async def main() -> None:
        async with subscribed_while_committing(
            worker, tmp_path, rounds=20, compact_every=7
        ) as replica:
            assert replica.covering(first, "hour") is not None
            assert replica.covering(first - 1, "hour") is not None  # rounded up to an hour
            assert replica.covering(first - HOUR_MS, "hour") is None  # not held whole
            day = T0 - T0 % (24 * HOUR_MS)  # the UTC day began before the hours held
            assert day < first and replica.covering(day, "day") is None
            hours = replica.covering(first, "hour")
            assert hours is not None
            checked = 0
            for ad in ADS:
                for lo, hi in [(0, 5), (1, 3), (0, 1), (4, 5), (2, 9)]:
                    start, end = first + lo * HOUR_MS - 1, first + hi * HOUR_MS
                    rows = hours.windows(ad_id=ad, start_ms=start, end_ms=end, granularity="hour")
                    assert rows == store.aggregates(
                        ad_id=ad, start_ms=start, end_ms=end, granularity="hour"
                    )
                    checked += len(rows)
            assert checked > len(ADS) * 5
            # day rows from the hours: a replica whose hours hold the whole (UTC) day
            recent = RecentAggregates(since_ms=T0, hours_since_ms=day)
            snap = store.recent_rows(T0, day)
            assert recent.apply(snap.minutes, {0: (0, 1)}, snap.hours)
            for ad in ADS:
                got = recent.windows(
                    ad_id=ad, start_ms=day, end_ms=day + 24 * HOUR_MS, granularity="day"
                )
                want = store.aggregates(
                    ad_id=ad, start_ms=day, end_ms=day + 24 * HOUR_MS, granularity="day"
                )
                assert got == want and want[0].unique_users > 0

    asyncio.run(main())


def test_a_reader_that_falls_behind_is_cut_off_and_the_writer_never_waits(
    tmp_path: Path,
) -> None:
    counters = PublishingCounters(
        InMemoryCounters(), snapshot=lambda: Snapshot(sums([]), {}, SINCE), max_queued=3
    )
    server = FeedServer(tmp_path / "feed.sock", counters)
    server.start()
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    big = sums([(f"ad{i}", T0 + (i % 30) * MINUTE_MS, 1) for i in range(5_000)])
    try:
        stalled.connect(str(tmp_path / "feed.sock"))
        wait_until(lambda: counters.subscribers == 1)
        started = time.monotonic()
        for i in range(200):  # never read: once the socket's buffer is full, frames queue
            counters.apply(big, {0: (i, i + 1)})
            if counters.subscribers == 0:
                break
        assert counters.subscribers == 0
        assert time.monotonic() - started < 10  # the writer never waited for the reader
    finally:
        stalled.close()
        server.stop()


def test_the_replica_starts_over_from_a_new_worker_and_answers_nothing_in_between(
    tmp_path: Path,
) -> None:
    def fixed(rows: pa.Table, offsets: dict[int, int]) -> Callable[[], Snapshot]:
        return lambda: Snapshot(rows, offsets, SINCE)

    async def main() -> None:
        first = PublishingCounters(
            InMemoryCounters(), snapshot=fixed(sums([("ad0", T0, 5)]), {0: 5})
        )
        server = FeedServer(tmp_path / "feed.sock", first)
        server.start()
        replica = RecentReplica(tmp_path / "feed.sock")
        replica.start()
        try:
            await until(lambda: replica.live)
            assert held_clicks(replica) == 5
            assert replica.status().held["minute"] == HeldCells(cells=1, sketch_bytes=0)
            server.stop()  # the worker went away
            await until(lambda: not replica.live)
            assert replica.covering(T0) is None
            status = replica.status()  # not live: it holds nothing; what it did stays counted
            assert (status.live, status.snapshots, status.rounds) == (False, 1, 0)
            assert set(status.held.values()) == {HeldCells(0, 0)}
            # the next worker: a state of its own
            second = PublishingCounters(
                InMemoryCounters(), snapshot=fixed(sums([("ad0", T0, 9)]), {0: 9})
            )
            server = FeedServer(tmp_path / "feed.sock", second)
            server.start()
            await until(lambda: replica.live)
            second.apply(sums([("ad0", T0, 1)]), {0: (9, 10)})
            await until(lambda: replica.applied_offsets() == {0: 10})
            assert held_clicks(replica) == 10
            assert replica.snapshots == 2
            status = replica.status()
            assert (status.live, status.snapshots, status.rounds) == (True, 2, 1)
        finally:
            await replica.close()
            server.stop()

    asyncio.run(main())


def test_a_round_that_does_not_continue_the_offsets_makes_the_replica_start_over(
    tmp_path: Path,
) -> None:
    """A feed with a gap (frames crafted here) is dropped: the replica reconnects and
    follows the next snapshot instead of serving counts with a hole."""
    snapshot = encode_frame(SNAPSHOT, {0: (0, 5)}, sums([("ad0", T0, 5)]), SINCE)
    gap = encode_frame(ROUND, {0: (7, 9)}, sums([("ad0", T0, 2)]))
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
        server = await asyncio.start_unix_server(serve, str(tmp_path / "feed.sock"))
        replica = RecentReplica(tmp_path / "feed.sock")
        replica.start()
        try:
            await until(lambda: replica.snapshots == 2 and replica.live)
            assert held_clicks(replica) == 5
            assert replica.rounds == 0
        finally:
            await replica.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def walked(recent: RecentAggregates) -> dict[str, HeldCells]:
    """What ``held()`` must say, counted the slow way: every cell and sketch walked."""
    return {
        granularity: HeldCells(
            cells=sum(len(windows) for windows in cells.values()),
            sketch_bytes=sum(
                len(sketch)
                for windows in cells.values()
                for cell in windows.values()
                for sketch in cell.sketches
            ),
        )
        for granularity, cells in (("minute", recent._cells), ("hour", recent._hours))
    }


def test_what_the_recent_rows_hold_is_counted_as_cells_come_merge_seal_and_go(
    store: DuckDBStore,
) -> None:
    """Rounds over a moving hour, from a snapshot with hours: cells are added, their
    sketches merged (by queries too) and sealed, old minutes and hours forgotten; the
    counts kept as they go are what walking every cell finds, after each round."""
    worker = Worker(
        store,
        seed=3,
        first_ms=T0 - 3 * HOUR_MS,
        span_ms=HOUR_MS,
        since_ms=T0 - 2 * HOUR_MS,
        hours_since_ms=T0 - 3 * HOUR_MS,
    )
    worker.rounds(20)
    store.compact()
    snapshot, subscriber = worker.counters.subscribe()
    frame = decode_frame(snapshot[4:])
    assert frame.hours_since_ms is not None
    recent = RecentAggregates(
        since_ms=frame.since_ms,
        hours_since_ms=frame.hours_since_ms,
        span_ms=20 * MINUTE_MS,
        hours_span_ms=2 * HOUR_MS,
    )
    assert recent.apply(frame.rows, frame.ranges, frame.hours)
    assert recent.held() == walked(recent)
    forgot = 0
    for step in range(30):  # the hour of the events moves on 8 minutes a round
        worker.first_ms += 8 * MINUTE_MS
        worker.rounds(1)
        frame = decode_frame(subscriber.frames.get_nowait()[4:])
        before = recent.held()
        assert recent.apply(frame.rows, frame.ranges)
        if step % 7 == 0:  # a query merges a cell's sketches
            recent.totals(ad_id=ADS[step % len(ADS)], start_ms=0, end_ms=T0 + 2 * HOUR_MS)
        held = recent.held()
        forgot += held["minute"].cells < before["minute"].cells
        assert held == walked(recent)
    assert recent.seal(10**9) == 0
    assert recent.held() == walked(recent)
    assert forgot > 0  # minutes were forgotten along the way
    assert recent.held()["hour"].cells > 0 and recent.held()["hour"].sketch_bytes > 0


def test_recent_rows_forget_beyond_their_span_and_say_so() -> None:
    recent = RecentAggregates(since_ms=T0, span_ms=10 * MINUTE_MS)
    sketch = hll.union([])
    rows = sums([("a", T0, 1), ("a", T0 + 30 * MINUTE_MS, 2)])
    rows = rows.append_column("users", pa.array([sketch, None], pa.binary()))
    assert recent.apply(rows, {0: (0, 2)})
    assert not recent.apply(rows, {0: (0, 2)})  # a redo
    assert not recent.covers(T0)  # T0 was forgotten: newest minute minus the span
    assert recent.covers(T0 + 20 * MINUTE_MS)
    assert recent.totals(ad_id="a", start_ms=T0, end_ms=T0 + HOUR_MS).clicks == 2


def test_closed_cells_are_sealed_to_one_compact_sketch_with_the_same_answers() -> None:
    """A busy minute's per-round sketches (HLL mode, 4 KiB each) are merged into one
    compact sketch once the minute and its hour are closed: far fewer bytes held, the
    same unique users."""
    recent = RecentAggregates(since_ms=T0, hours_since_ms=T0 - HOUR_MS)
    rounds = []
    for r in range(10):
        users = [f"u{r}-{i}" for i in range(500)]
        [sketch] = hll.sketches_by_group_via_library(
            np.zeros(len(users), np.int64), pa.array(users), 1
        ).to_pylist()
        rows = sums([("a", T0, 1)]).append_column("users", pa.array([sketch], pa.binary()))
        assert recent.apply(rows, {0: (r, r + 1)})
        rounds.append(sketch)
    held = recent.sketch_bytes()
    assert held >= 2 * 10 * 4_000  # every round's sketch, in its minute and in its hour
    expected = hll.estimate(hll.union(rounds))
    # The newest minute moves 65 minutes on: the minute is closed (and still held).
    assert recent.apply(sums([("b", T0 + 65 * MINUTE_MS, 1)]), {0: (10, 11)})
    assert recent.seal(10**9) == 0
    assert recent.sketch_bytes() < held * 3 // 4
    [minute] = recent.minutes(ad_id="a", start_ms=T0, end_ms=T0 + MINUTE_MS)
    assert minute.unique_users == expected > 4_000
    # Two hours on: its hour is closed too (the minute is forgotten by then).
    assert recent.apply(sums([("b", T0 + 2 * HOUR_MS, 1)]), {0: (11, 12)})
    assert recent.seal(10**9) == 0
    assert recent.sketch_bytes() <= 2_200  # one compact sketch (HLL_4: 2 KiB, not 4)
    [hour] = recent.windows(ad_id="a", start_ms=T0, end_ms=T0 + HOUR_MS, granularity="hour")
    assert hour.unique_users == expected
