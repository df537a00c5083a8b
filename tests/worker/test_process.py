"""Worker-process housekeeping: the audit trail follows log retention."""

from __future__ import annotations

import time
from pathlib import Path

from clickagg.clock import FixedClock
from clickagg.config import Settings
from clickagg.core import columns
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.worker.process import forget_fates_of_retired_segments
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker
from tests.conftest import Ev, build_columns

T0 = 1_700_000_000_000
DAY = 86_400_000


def test_fates_are_dropped_with_the_segments_retention_removed(tmp_path: Path) -> None:
    writer = SegmentLogWriter(
        tmp_path / "log", 1, segment_bytes=600, retention_ms=DAY, retention_bytes=2**40
    )
    reader = SegmentLogReader(tmp_path / "log")
    store = DuckDBStore(tmp_path / "agg.duckdb")
    try:
        for n in range(40):
            cols = build_columns([Ev(f"r{n}", "ad", T0 + n)])
            writer.append(0, columns.encode(cols), cols.count)
            writer.sync()
        worker = PartitionWorker(
            0,
            reader=reader,
            store=store,
            snapshots=SnapshotStore(tmp_path / "snap"),
            settings=Settings(data_dir=tmp_path),
            clock=FixedClock(T0),
        )
        while worker.step():
            pass
        later = int(time.time() * 1000) + 10 * DAY  # retention looks at file mtimes
        assert writer.apply_retention(0, keep_from=30, now_ms=later) > 0
        start = reader.start_offset(0)
        assert 0 < start <= 30
        assert forget_fates_of_retired_segments(store, reader) == start
        assert store.fates(event_id="r0") == []
        assert [f.offset for f in store.fates(event_id=f"r{start}")] == [start]
        assert forget_fates_of_retired_segments(store, reader) == 0
    finally:
        store.close()
        reader.close()
        writer.close()
