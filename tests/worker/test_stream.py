"""The partition worker over a real segment log and a real DuckDB store: a crash between
any two steps of the commit order changes nothing in the final counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from clickagg.archive.parquet import ParquetArchiveReader, ParquetArchiveWriter
from clickagg.clock import FixedClock
from clickagg.config import Settings
from clickagg.core import columns, ids
from clickagg.core.windows import MINUTE_MS
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker, frames_to_events
from tests.conftest import Ev, build_columns

T0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS
DAY = 24 * 60 * MINUTE_MS


class Rig:
    """One partition's log, store and snapshots in a temp dir; workers can come and go."""

    def __init__(self, root: Path) -> None:
        self.settings = Settings(
            data_dir=root, partitions=1, micro_batch_events=7, snapshot_interval_ms=0
        )
        self.writer = SegmentLogWriter(root / "log", 1, retention_ms=DAY, retention_bytes=2**40)
        self.reader = SegmentLogReader(root / "log")
        self.store = DuckDBStore(root / "agg.duckdb")
        self.snapshots = SnapshotStore(root / "snapshots")
        self.archive_dir = root / "archive"
        self.archive = self.new_archive()
        self.clock = FixedClock(T0)

    def new_archive(self) -> ParquetArchiveWriter:
        return ParquetArchiveWriter(self.archive_dir, flush_events=5, flush_interval_ms=0)

    def append(self, events: list[Ev]) -> None:
        cols = build_columns(events)
        self.writer.append(0, columns.encode(cols), cols.count)
        self.writer.sync()

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


def test_recovery_refuses_a_log_shorter_than_the_store(rig: Rig, tmp_path: Path) -> None:
    rig.append(traffic(10))
    rig.drain(rig.worker())
    other = Rig(tmp_path / "other")
    try:
        other.store.close()
        other.store = rig.store  # a store that committed more than this (empty) log holds
        with pytest.raises(RuntimeError, match="lost acknowledged data"):
            other.worker()
    finally:
        other.reader.close()
        other.writer.close()
