"""Worker housekeeping: the audit trail outlives log retention (the archive keeps it)."""

from __future__ import annotations

import time
from pathlib import Path

from clickagg.archive.parquet import ParquetArchiveReader, ParquetArchiveWriter
from clickagg.clock import FixedClock
from clickagg.config import Settings
from clickagg.core import columns, ids
from clickagg.core.windows import HOUR_MS
from clickagg.keyed.stage2 import IP, VISITOR, counter_key
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.runtime.worker import Compactor, feed_snapshot
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker, step_all
from tests.conftest import Ev, build_columns
from tests.contracts.test_roles import commit_of
from tests.store.test_keyed_settle import _commit

T0 = 1_700_000_000_000
DAY = 86_400_000


def test_fates_outlive_the_segments_retention_removed(tmp_path: Path) -> None:
    writer = SegmentLogWriter(
        tmp_path / "log", 1, segment_bytes=600, retention_ms=DAY, retention_bytes=2**40
    )
    reader = SegmentLogReader(tmp_path / "log")
    store = DuckDBStore(tmp_path / "agg.duckdb")
    archive = ParquetArchiveWriter(tmp_path / "archive", flush_events=10, flush_interval_ms=0)
    try:
        for n in range(40):
            cols = build_columns([Ev(f"r{n}", "ad", T0 + n)])
            writer.append(0, columns.encode(cols), cols.count)
            writer.sync()
        worker = PartitionWorker(
            0,
            reader=reader,
            store=store,
            archive=archive,
            snapshots=SnapshotStore(tmp_path / "snap"),
            settings=Settings(data_dir=tmp_path),
            clock=FixedClock(T0),
        )
        while worker.step():
            pass
        archive.flush()
        later = int(time.time() * 1000) + 10 * DAY  # retention looks at file mtimes
        assert writer.apply_retention(0, keep_from=30, now_ms=later) > 0
        assert reader.start_offset(0) > 0
        trail = ParquetArchiveReader(tmp_path / "archive")
        assert [(f.offset, f.status) for f in trail.fates("r0")] == [(0, "counted")]
        assert [f.offset for f in trail.fates("r39")] == [39]
        assert trail.archived_offsets() == {0: 40}
    finally:
        archive.close()
        store.close()
        reader.close()
        writer.close()


def test_the_compactor_merges_deltas_in_the_background(tmp_path: Path) -> None:
    writer = SegmentLogWriter(
        tmp_path / "log", 2, segment_bytes=2**20, retention_ms=DAY, retention_bytes=2**40
    )
    reader = SegmentLogReader(tmp_path / "log")
    store = DuckDBStore(tmp_path / "agg.duckdb")
    compactor = Compactor(store, interval_ms=3_600_000, max_delta_rows=50, poll_s=0.01)
    archive = ParquetArchiveWriter(tmp_path / "archive")
    try:
        settings = Settings(data_dir=tmp_path, micro_batch_events=40)
        workers = [
            PartitionWorker(
                p,
                reader=reader,
                store=store,
                archive=archive,
                snapshots=SnapshotStore(tmp_path / "snap"),
                settings=settings,
                clock=FixedClock(T0),
            )
            for p in range(2)
        ]
        compactor.start()  # rows, not age, trigger it here (the interval is an hour)
        for n in range(600):
            country = ("US", "DE")[n % 2]
            ev = Ev(f"e{n}", f"ad{n % 37}", T0 + n * 7_000, ids.IMPRESSION, country=country)
            cols = build_columns([ev])
            writer.append(n % 2, columns.encode(cols), cols.count)
        writer.sync()
        while step_all(workers, store):
            pass
        deadline = time.monotonic() + 30
        while store.pending_delta_rows() >= 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        compactor.stop()
        assert compactor.compactions >= 1
        assert store.pending_delta_rows() < 50
        total = sum(
            store.totals(ad_id=f"ad{a}", start_ms=T0 - DAY, end_ms=T0 + DAY).impressions
            for a in range(37)
        )
        assert total == 600
        by_country = store.aggregates(
            ad_id="ad0", start_ms=T0 - DAY, end_ms=T0 + DAY, granularity="day", group_by="country"
        )
        assert sum(r.impressions for r in by_country) == len(range(0, 600, 37))
    finally:
        compactor.stop()
        archive.close()
        store.close()
        reader.close()
        writer.close()


def test_the_feed_snapshot_holds_every_family_at_its_offsets(tmp_path: Path) -> None:
    """A replica starts from the store's rows at the offsets they hold: the log partitions'
    and, under the counters' keys, both keyed families' consumed offsets (a family left out
    would take a correction it already holds, as a redo, a second time)."""
    store = DuckDBStore(tmp_path / "agg.duckdb")
    try:
        t0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
        store.commit_many([commit_of(0, 0, [Ev("a", "ad", t0), Ev("b", "ad", t0 + 1)])])
        store.commit_keyed([_commit("ip", [], k=1), _commit("visitor", [], k=2)])
        snap = feed_snapshot(store, FixedClock(t0 + 60_000))
        assert snap.offsets == {0: 2, counter_key(1, IP): 1, counter_key(2, VISITOR): 1}
        assert counter_key(1, IP) != counter_key(1, VISITOR)
        assert snap.since_ms < t0 and snap.minutes.num_rows >= 1
        assert sum(snap.minutes["clicks"].to_pylist()) == 2
        # the day of hours before the minutes, whole hours
        assert snap.hours is not None and snap.hours_since_ms is not None
        assert snap.since_ms % HOUR_MS == snap.hours_since_ms % HOUR_MS == 0
        assert snap.hours_since_ms <= t0 - 24 * HOUR_MS < snap.since_ms
        no_hours = feed_snapshot(store, FixedClock(t0 + 60_000), hours_ms=0)  # replica_hours 0
        assert no_hours.hours is None and no_hours.hours_since_ms is None
        assert no_hours.minutes.equals(snap.minutes)
    finally:
        store.close()
