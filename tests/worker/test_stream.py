"""The partition worker over a real segment log and a real DuckDB store: a crash between
any two steps of the commit order changes nothing in the final counts."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clickagg.archive.parquet import ParquetArchiveReader, ParquetArchiveWriter
from clickagg.clock import FixedClock
from clickagg.config import Settings
from clickagg.core import columns, ids
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.log.base import LOST_MAGIC, PartitionDamagedError
from clickagg.log.integrity import recorded_damage
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.realtime.memory import InMemoryCounters
from clickagg.runtime.worker import refill_counters
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker, frames_to_events, step_all
from tests.conftest import Ev, build_columns

T0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS
DAY = 24 * 60 * MINUTE_MS


class CrashError(Exception):
    """An injected crash: in a real worker process, kill -9 at that point."""


class Crash:
    """Kills the "process" at ``point`` the ``at``-th time it is reached since the last
    start, ``times`` times in all. Points are reached by wrappers around the real
    components (see :meth:`wrap`): the component really does its work (or really has not
    started it yet) when the crash hits."""

    def __init__(self, point: str | None = None, *, at: int = 1, times: int = 3) -> None:
        self.point = point
        self.at = at
        self.times = times
        self.hits = 0
        self.fired = 0
        self.armed = False
        self.died_in_background = False  # fired in the archive's flush thread
        self._lock = threading.Lock()

    def rearm(self) -> None:
        self.hits = 0
        self.armed = self.point is not None and self.fired < self.times

    def reach(self, point: str) -> None:
        with self._lock:
            if not self.armed or point != self.point:
                return
            self.hits += 1
            if self.hits < self.at:
                return
            self.armed = False
            self.fired += 1
            if threading.current_thread() is not threading.main_thread():
                self.died_in_background = True
        raise CrashError(point)

    def wrap(
        self, obj: object, name: str, *, before: str | None = None, after: str | None = None
    ) -> None:
        """Replace ``obj.name`` by the real method between two crash points."""
        real: Callable[..., Any] = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                self.reach(before)
            result = real(*args, **kwargs)
            if after is not None:
                self.reach(after)
            return result

        setattr(obj, name, wrapper)


class Rig:
    """A worker process in a temp dir: the partitions' log, the store, the snapshots, the
    archive and the real-time counters. Workers can come and go; :meth:`restart` is a
    kill -9 and a fresh start on the same files."""

    def __init__(self, root: Path, *, partitions: int = 1, crash: Crash | None = None) -> None:
        self.root = root
        self.partitions = partitions
        self.settings = Settings(
            data_dir=root, partitions=partitions, micro_batch_events=7, snapshot_interval_ms=0
        )
        self.writer = SegmentLogWriter(
            root / "log", partitions, retention_ms=DAY, retention_bytes=2**40
        )
        self.archive_dir = root / "archive"
        self.clock = FixedClock(T0)
        self.crash = crash or Crash()
        self.appended: dict[int, list[Ev]] = {p: [] for p in range(partitions)}
        self.workers: list[PartitionWorker] = []
        self._open()

    def _open(self) -> None:
        self.reader = SegmentLogReader(self.root / "log")
        self.store = DuckDBStore(self.root / "agg.duckdb")
        self.snapshots = SnapshotStore(self.root / "snapshots")
        self.archive = self.new_archive()
        self.counters = InMemoryCounters()

    def new_archive(self) -> ParquetArchiveWriter:
        return ParquetArchiveWriter(self.archive_dir, flush_events=5, flush_interval_ms=0)

    def append(self, events: list[Ev], partition: int = 0) -> None:
        cols = build_columns(events)
        self.writer.append(partition, columns.encode(cols), cols.count)
        self.writer.sync()
        self.appended[partition].extend(events)

    def send(self, events: list[Ev], *, frame_events: int = 3) -> None:
        """Append as the ingest API would: each event to its partition (every copy of an
        event to the same one), in frames of a few events (group commits)."""
        routed: dict[int, list[Ev]] = {}
        for ev in events:
            p = ids.partition_for_id(ev.event_type, ev.event_id, self.partitions)
            routed.setdefault(p, []).append(ev)
        for p, part in sorted(routed.items()):
            for i in range(0, len(part), frame_events):
                self.append(part[i : i + frame_events], p)

    def worker(self, *, restart: bool = True) -> PartitionWorker:
        """A new worker; ``restart`` also loses what the archive had not published, as
        a crashed process would."""
        if restart:
            self.archive.abandon()
            self.archive = self.new_archive()
        return PartitionWorker(
            0,
            reader=self.reader,
            store=self.store,
            archive=self.archive,
            snapshots=self.snapshots,
            settings=self.settings,
            clock=self.clock,
        )

    def drain(self, worker: PartitionWorker) -> None:
        for _ in range(1000):
            if worker.step() == 0:
                return
        raise AssertionError("worker did not drain")

    def counts(self) -> Counter[str]:
        rows = self.store.aggregates(
            ad_id="ad", start_ms=T0 - DAY, end_ms=T0 + DAY, granularity="day"
        )
        return Counter(
            {"clicks": sum(r.clicks for r in rows), "impressions": sum(r.impressions for r in rows)}
        )

    def archived_statuses(self) -> list[str]:
        """Every archived decision's status in offset order, after checking that each
        offset the store committed is archived exactly once."""
        self.archive.flush()
        table = ParquetArchiveReader(self.archive_dir).decisions(start_ms=0, end_ms=2 * T0)
        committed = self.store.committed_offsets().get(0, 0)
        assert table["offset"].to_pylist() == list(range(committed))
        statuses: list[str] = table["status"].to_pylist()
        return statuses

    # -- a whole worker process, crashing --------------------------------------------------

    def start(self) -> None:
        """What ``runtime.worker.run`` does on start: every partition's worker recovers,
        then the counters are refilled from the store; then the crash points are wired."""
        self.workers = [
            PartitionWorker(
                p,
                reader=self.reader,
                store=self.store,
                archive=self.archive,
                snapshots=self.snapshots,
                settings=self.settings,
                clock=self.clock,
            )
            for p in range(self.partitions)
        ]
        refill_counters(self.counters, self.store, now_ms=self.clock.now_ms())
        wrap = self.crash.wrap
        wrap(self.reader, "read", after="after-read")
        for worker in self.workers:
            wrap(worker, "decide", after="after-process")
        wrap(self.store, "commit_many", before="before-commit", after="after-commit")
        wrap(self.store, "_apply", after="inside-commit")  # in the transaction, before COMMIT
        wrap(self.counters, "apply", after="after-counters")
        wrap(self.archive, "append", after="after-archive-append")
        wrap(
            self.archive,
            "_publish_manifest",
            before="flush-before-manifest",
            after="flush-after-manifest",
        )
        wrap(self.snapshots, "save", before="before-snapshot", after="after-snapshot")
        self.crash.rearm()

    def restart(self) -> None:
        """kill -9, then start a new process on the same files: what the archive had not
        published is lost, the store's open transaction too; counters start empty."""
        self.crash.armed = False
        self.archive.abandon()
        self.crash.died_in_background = False
        self.store.close()
        self.reader.close()
        self._open()
        self.start()

    def run(self) -> None:
        """Rounds until the log is drained and the archive flushed, restarting after every
        crash (raised here, or in the archive's flush thread)."""
        for _ in range(1000):
            try:
                processed = step_all(self.workers, self.store, self.counters)
                if processed == 0:
                    self.archive.flush()
            except CrashError:
                self.restart()
                continue
            if self.crash.died_in_background:  # the process dies with its flush thread
                self.restart()
                continue
            if processed == 0:
                return
        raise AssertionError("the workers did not drain")

    def close(self) -> None:
        self.archive.close()
        self.store.close()
        self.reader.close()
        self.writer.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def expected(*batches: list[Ev]) -> Counter[str]:
    """Reference: each distinct (type, id) once (all events here are on time)."""
    distinct = {(e.event_type, e.event_id) for batch in batches for e in batch}
    return Counter(
        {
            "clicks": sum(t == ids.CLICK for t, _ in distinct),
            "impressions": sum(t == ids.IMPRESSION for t, _ in distinct),
        }
    )


def assert_archived(rig: Rig, *batches: list[Ev]) -> None:
    """The archive holds one decision per offset: the first copy of each id counted, every
    other copy a duplicate (all events here are on time)."""
    statuses = Counter(rig.archived_statuses())
    distinct = len({(e.event_type, e.event_id) for batch in batches for e in batch})
    total = sum(len(batch) for batch in batches)
    assert statuses == Counter({"counted": distinct, "duplicate": total - distinct})


def traffic(n: int, start: int = 0) -> list[Ev]:
    events = [
        Ev(f"e{i}", "ad", T0 + i * 1000, event_type=ids.CLICK if i % 3 else ids.IMPRESSION)
        for i in range(start, start + n)
    ]
    return events + events[::4]  # copies


def test_frames_to_events_numbers_a_run_of_frames_from_the_first_unseen_event(rig: Rig) -> None:
    rig.append([Ev("a", "x", T0), Ev("b", "x", T0)])
    rig.append([Ev("c", "y", T0)])
    rig.append([Ev("d", "x", T0), Ev("e", "z", T0, user_id="ü")])
    frames = rig.reader.read(0, 1, 100)
    events = frames_to_events(frames, 1)  # the first frame starts before the offset asked for
    assert events["offset"].to_list() == [1, 2, 3, 4]
    assert events["partition"].to_list() == [0] * 4
    assert events["event_id"].to_list() == ["b", "c", "d", "e"]
    assert events["user_id"].to_list() == [None, None, None, "ü"]
    assert events.schema == frames_to_events([], 0).schema
    with pytest.raises(ValueError, match="do not match"):
        frames_to_events([frames[0], frames[2]], 0)  # a gap: offsets would be wrong


def test_uninterrupted_run_counts_each_event_once(rig: Rig) -> None:
    rig.append(traffic(40))
    rig.drain(rig.worker())
    assert rig.counts() == expected(traffic(40))
    assert_archived(rig, traffic(40))
    assert rig.counts()["clicks"] > 0 and rig.counts()["impressions"] > 0


def test_crash_after_processing_before_commit_redoes_the_batch(rig: Rig) -> None:
    rig.append(traffic(40))
    doomed = rig.worker()
    state = doomed.processor.state
    frames = rig.reader.read(0, state.next_offset, 7)
    doomed.processor.process(frames_to_events(frames, state.next_offset))  # step 2, no step 3
    survivor = rig.worker()  # restart: recovers from the store's offset (0)
    assert survivor.processor.state.next_offset == 0
    rig.drain(survivor)
    assert rig.counts() == expected(traffic(40))
    assert_archived(rig, traffic(40))


def test_crash_after_commit_before_snapshot_replays_to_the_same_state(rig: Rig) -> None:
    rig.settings = Settings(
        data_dir=rig.settings.data_dir,
        partitions=1,
        micro_batch_events=7,
        snapshot_interval_ms=10**12,
    )  # never snapshot on its own
    rig.append(traffic(40))
    first = rig.worker()
    first.step()
    first.snapshot_now()
    for _ in range(3):
        first.step()  # committed, but the snapshot is older
    restarted = rig.worker()
    assert restarted.processor.state.next_offset == first.processor.state.next_offset
    assert len(restarted.processor.state.seen) == len(first.processor.state.seen)
    rig.append(traffic(10))  # copies of already-counted events only
    rig.drain(restarted)
    assert rig.counts() == expected(traffic(40))
    assert_archived(rig, traffic(40), traffic(10))


def test_snapshot_ahead_of_the_store_is_ignored(rig: Rig) -> None:
    rig.append(traffic(20))
    worker = rig.worker()
    rig.drain(worker)
    committed = worker.processor.state.next_offset
    rig.snapshots.save(0, committed + 100, b"not a real snapshot")
    assert rig.worker().processor.state.next_offset == committed


def test_a_stale_worker_is_fenced_and_recovers(rig: Rig) -> None:
    rig.append(traffic(30))
    stale = rig.worker()
    fresh = rig.worker(restart=False)  # two owners in one process: one archive writer
    rig.drain(fresh)
    assert stale.step() == 0  # fenced: the store moved on without it
    assert stale.processor.state.next_offset == fresh.processor.state.next_offset
    rig.append(traffic(5, start=100))
    rig.drain(stale)
    assert rig.counts() == expected(traffic(30), traffic(5, start=100))
    assert_archived(rig, traffic(30), traffic(5, start=100))


def test_a_log_shorter_than_the_store_stalls_its_partition_and_stops_its_ingest(
    rig: Rig, tmp_path: Path
) -> None:
    rig.append(traffic(10))
    rig.drain(rig.worker())
    other = Rig(tmp_path / "other")
    try:
        other.store.close()
        other.store = rig.store  # a store that committed more than this (empty) log holds
        worker = other.worker()
        assert worker.damage is not None and "store committed" in worker.damage
        assert worker.prepare() is None  # stalled: never reads on, never reuses an offset
        damaged = recorded_damage(other.settings.log_dir)
        assert "acknowledged events were lost" in damaged[0]
        time.sleep(1.05)  # the writer re-reads the markers once a second
        with pytest.raises(PartitionDamagedError, match="partition 0 is damaged"):
            other.writer.append(0, b"x", 1)
    finally:
        other.reader.close()
        other.writer.close()


def test_offsets_a_repair_marked_lost_are_committed_past_and_never_counted(
    rig: Rig, tmp_path: Path
) -> None:
    before, after = traffic(10), traffic(10, start=100)
    rig.append(before)
    rig.writer.append(0, LOST_MAGIC + b"{}", 5)  # what `clickagg log repair` writes
    rig.writer.sync()
    rig.append(after)
    end = len(before) + 5 + len(after)
    rig.drain(rig.worker())
    assert rig.store.committed_offsets()[0] == end
    clean = Rig(tmp_path / "clean")  # the same events with no hole between them
    try:
        clean.append(before)
        clean.append(after)
        clean.drain(clean.worker())
        expected = clean.counts()
    finally:
        clean.close()
    assert rig.counts() == expected and expected["clicks"] > 0
    rig.archive.flush()
    offsets = ParquetArchiveReader(rig.archive_dir).decisions(start_ms=0, end_ms=2 * T0)["offset"]
    assert offsets.to_pylist() == [*range(10 + 3), *range(18, end)]  # no decision for the hole
    worker = rig.worker()  # recovery replays across the hole too
    assert worker.damage is None and worker.processor.state.next_offset == end
    rig.drain(worker)
    assert rig.counts() == expected


# -- a crash at every step of the commit order, four partitions per round ------------------

PARTITIONS = 4
LATENESS_MS = Settings().allowed_lateness_ms
# (point, how many times it is reached before the crash): rounds reach the per-partition
# points (read, process, snapshot) once per partition, so the 6th is mid-round.
CRASH_POINTS = [
    ("after-read", 6),  # a round half read: some partitions processed in memory only
    ("after-process", 6),
    ("before-commit", 2),
    ("inside-commit", 2),  # deltas and offsets written in the transaction, no COMMIT
    ("after-commit", 2),  # the store holds the round; counters and archive do not
    ("after-counters", 2),
    ("after-archive-append", 2),  # decisions buffered, not published
    ("flush-before-manifest", 2),  # data files and index run written, not published
    ("flush-after-manifest", 2),  # published, but the writer never learnt it
    ("before-snapshot", 6),  # some partitions' snapshots at the new offset, some not
    ("after-snapshot", 6),
]


def crash_traffic(
    seed: int, *, rounds: int = 6, per_round: int = 40, ads: int = 5
) -> list[list[Ev]]:
    """Sends of new events (clicks with and without a cost, impressions), some out of
    order, some late, plus copies of events of this send and of earlier ones."""
    rnd = random.Random(seed)
    sent: list[Ev] = []
    sends = []
    n = 0
    for _ in range(rounds):
        batch: list[Ev] = []
        for _ in range(per_round):
            ts = T0 + n * 3000
            if rnd.random() < 0.15:
                ts -= 7 * MINUTE_MS + rnd.randrange(
                    2 * MINUTE_MS
                )  # late, if its partition moved on
            elif rnd.random() < 0.3:
                ts -= rnd.randrange(4 * MINUTE_MS)  # out of order, within the lateness
            kind = ids.CLICK if rnd.random() < 0.4 else ids.IMPRESSION
            cost = rnd.randrange(1, 9) * 1000 if kind == ids.CLICK and rnd.random() < 0.5 else -1
            batch.append(Ev(f"e{n}", f"ad-{rnd.randrange(ads)}", ts, kind, cost_micros=cost))
            n += 1
            if rnd.random() < 0.25:
                batch.append(rnd.choice(sent + batch))  # a copy, maybe of an earlier send
        sent.extend(batch)
        sends.append(batch)
    return sends


def reference_fates(appended: dict[int, list[Ev]]) -> dict[tuple[int, int], tuple[Ev, str]]:
    """(partition, offset) -> (event, status), decided here event by event: the first copy
    of an id counts unless late (older than its partition's max event time so far, itself
    included, minus the lateness); every other copy is a duplicate."""
    fates: dict[tuple[int, int], tuple[Ev, str]] = {}
    for partition, events in appended.items():
        seen: set[tuple[int, str]] = set()
        top = None
        for offset, ev in enumerate(events):
            top = ev.ts_ms if top is None else max(top, ev.ts_ms)
            key = (ev.event_type, ev.event_id)
            if key in seen:
                status = "duplicate"
            elif ev.ts_ms < top - LATENESS_MS:
                status = "late"
            else:
                status = "counted"
            seen.add(key)
            fates[(partition, offset)] = (ev, status)
    return fates


def reference_minutes(
    fates: dict[tuple[int, int], tuple[Ev, str]],
) -> dict[tuple[str, int], tuple[int, int, int]]:
    """(ad, minute) -> (clicks, impressions, spend micros) of the counted events."""
    sums: dict[tuple[str, int], list[int]] = {}
    for ev, status in fates.values():
        if status != "counted":
            continue
        cell = sums.setdefault((ev.ad_id, ev.ts_ms - ev.ts_ms % MINUTE_MS), [0, 0, 0])
        if ev.event_type == ids.CLICK:
            cell[0] += 1
            cell[2] += max(ev.cost_micros, 0)
        else:
            cell[1] += 1
    return {key: (c, i, s) for key, (c, i, s) in sums.items()}


def assert_exact(rig: Rig) -> None:
    """Store, counters and archive against the reference, and against each other."""
    fates = reference_fates(rig.appended)
    ends = {p: len(events) for p, events in rig.appended.items() if events}
    assert {p: rig.reader.durable_end(p) for p in ends} == ends
    assert rig.store.committed_offsets() == ends
    assert rig.counters.applied_offsets() == ends

    # The store, minute by minute.
    start, end = T0 - HOUR_MS, T0 + HOUR_MS
    ads = sorted({ev.ad_id for ev, _ in fates.values()})
    stored = {
        (ad, row.window_ms): (row.clicks, row.impressions, row.spend_micros)
        for ad in ads
        for row in rig.store.aggregates(ad_id=ad, start_ms=start, end_ms=end, granularity="minute")
        if row.clicks or row.impressions
    }
    assert stored == reference_minutes(fates)

    # The real-time counters hold what the store holds, minute by minute.
    for ad in ads:
        for minute in range(T0 - 15 * MINUTE_MS, T0 + 15 * MINUTE_MS, MINUTE_MS):
            counted = rig.counters.window(ad_id=ad, start_ms=minute, end_ms=minute + MINUTE_MS)
            want = stored.get((ad, minute), (0, 0, 0))
            assert (counted.clicks, counted.impressions, counted.spend_micros) == want, (ad, minute)
        window = rig.counters.window(ad_id=ad, start_ms=start, end_ms=end)
        totals = rig.store.totals(ad_id=ad, start_ms=start, end_ms=end, unique_users=False)
        assert (window.clicks, window.impressions, window.spend_micros) == (
            totals.clicks,
            totals.impressions,
            totals.spend_micros,
        )

    # The archive: every committed offset exactly once, with its event and its fate.
    reader = ParquetArchiveReader(rig.archive_dir)
    assert reader.archived_offsets() == ends
    table = reader.decisions(start_ms=start, end_ms=end)
    archived = list(
        zip(
            table["partition"].to_pylist(),
            table["offset"].to_pylist(),
            table["event_id"].to_pylist(),
            table["status"].to_pylist(),
            strict=True,
        )
    )
    assert archived == [
        (p, offset, ev.event_id, status) for (p, offset), (ev, status) in sorted(fates.items())
    ]


@pytest.mark.parametrize(
    ("point", "at"),
    [pytest.param(None, 1, id="no-crash")]
    + [pytest.param(point, at, id=point) for point, at in CRASH_POINTS],
)
def test_a_crash_at_any_step_of_a_round_changes_nothing(
    tmp_path: Path, point: str | None, at: int
) -> None:
    crash = Crash(point, at=at, times=3)
    rig = Rig(tmp_path, partitions=PARTITIONS, crash=crash)
    rig.clock.advance(30 * MINUTE_MS)  # now: the counters' span covers all the traffic
    try:
        rig.start()
        for batch in crash_traffic(seed=11):
            rig.send(batch)
            rig.run()
        assert crash.fired == (0 if point is None else crash.times)
        assert_exact(rig)
        statuses = Counter(status for _, status in reference_fates(rig.appended).values())
        assert statuses.keys() == {"counted", "duplicate", "late"}
        assert all(rig.appended.values())  # every partition has traffic
    finally:
        rig.close()
