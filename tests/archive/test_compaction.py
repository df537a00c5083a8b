"""Archive compaction: an event hour's small files merged into one, each decision still
visible exactly once (across crashes at every step), found by id, read by old listings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clickagg.archive.parquet import (
    CORRECTIONS,
    INDEX_DIR,
    ParquetArchiveReader,
    ParquetArchiveWriter,
    hour_dir,
)
from clickagg.core import ids
from clickagg.core.corrections import CORRECTION_SCHEMA
from clickagg.core.windows import HOUR_MS
from tests.archive.test_parquet import T0, decisions

ROOT = Path(__file__).resolve().parents[2]
OLD = T0  # an hour long settled
NEW = T0 + 10 * HOUR_MS  # the hour "now" is in: not settled


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


def writer_at(directory: Path, clock: Clock, **options: int) -> ParquetArchiveWriter:
    settings = {
        "flush_events": 1_000,
        "flush_interval_ms": 10**9,
        "compact_files": 8,
        "compact_after_ms": 10 * 60_000,
        "compact_grace_ms": 60 * 60_000,
        **options,
    }
    return ParquetArchiveWriter(directory, clock=clock, **settings)  # type: ignore[arg-type]


def trickle(writer: ParquetArchiveWriter, flushes: int, *, per_flush: int = 5) -> None:
    """``flushes`` small flushes of two partitions: each holds events of the old hour and
    of the new one."""
    for _ in range(flushes):
        tables, ranges = [], {}
        for partition in (0, 1):
            start = writer.next_offset(partition)
            old = decisions(partition, start, per_flush - 2, ts_ms=OLD)
            new = decisions(partition, start + per_flush - 2, 2, ts_ms=NEW)
            tables += [old, new]
            ranges[partition] = (start, start + per_flush)
        writer.append(pa.concat_tables(tables), ranges)
        writer.flush()


def snapshot(reader: ParquetArchiveReader) -> pa.Table:
    """Everything archived, in a fixed order."""
    table = reader.decisions(start_ms=0, end_ms=2 * NEW)
    return table.sort_by([("partition", "ascending"), ("offset", "ascending")])


def assert_each_decision_once(reader: ParquetArchiveReader) -> None:
    ends = reader.archived_offsets()
    table = snapshot(reader)
    seen = Counter(zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True))
    assert set(seen.values()) == {1}
    assert sorted(seen) == [(p, o) for p in sorted(ends) for o in range(ends[p])]
    # every id found by the audit lookup, once per copy (ids e<offset> in both partitions)
    for offset in range(max(ends.values())):
        fates = reader.fates(f"e{offset}")
        assert sorted(f.partition for f in fates) == [p for p in sorted(ends) if offset < ends[p]]


def published(directory: Path, hour_ms: int) -> set[str]:
    return {p.name for p in ParquetArchiveReader(directory).files(hour_ms, hour_ms + HOUR_MS)}


def on_disk(directory: Path, hour_ms: int) -> set[str]:
    return {p.name for p in (directory / hour_dir(hour_ms)).iterdir()}


def test_a_settled_hours_small_files_become_one_and_read_the_same(tmp_path: Path) -> None:
    clock = Clock(NEW + 30 * 60_000)  # the old hour settled long ago, the new one not
    writer = writer_at(tmp_path, clock)
    trickle(writer, 20)
    reader = ParquetArchiveReader(tmp_path)
    before = snapshot(reader)
    flushes = reader.flushes(OLD)
    old_listing = reader.files(OLD, OLD + HOUR_MS)
    assert len(old_listing) == 20 and len(reader.files(NEW, NEW + HOUR_MS)) == 20

    assert writer.compact() == 20
    [merged] = reader.files(OLD, OLD + HOUR_MS)
    assert len(reader.files(NEW, NEW + HOUR_MS)) == 20  # not settled: left alone
    assert merged.name == "000000000021.parquet"  # the compaction's own seq
    assert snapshot(reader).equals(before)
    assert reader.flushes(OLD) == flushes  # the same flushes, in one file
    assert reader.archived_offsets() == {0: 100, 1: 100}
    assert_each_decision_once(reader)
    # a reader that listed the old files can still read them, for the grace period
    assert all(path.exists() for path in old_listing)
    assert reader.flushes_of(old_listing) == flushes
    # nothing more to do until new small files arrive
    assert writer.compact() == 0
    clock.now_ms += 60 * 60_000  # past the grace: the retired files are deleted
    writer.compact()
    assert on_disk(tmp_path, OLD) == {"000000000021.parquet"}
    assert_each_decision_once(ParquetArchiveReader(tmp_path))
    writer.close()


def test_a_merged_file_is_sorted_as_the_layout_scans(tmp_path: Path) -> None:
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(tmp_path, clock)
    trickle(writer, 9)
    writer.compact()
    [merged] = ParquetArchiveReader(tmp_path).files(OLD, OLD + HOUR_MS)
    table = pq.read_table(merged)
    keys = list(zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True))
    assert keys == sorted(keys) and len(keys) == 2 * 9 * 3
    writer.close()


def test_few_or_big_files_are_left_alone(tmp_path: Path) -> None:
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(tmp_path, clock, flush_events=10)  # merged files hold at most 40
    trickle(writer, 7)  # 7 files of the old hour: fewer than 8
    assert writer.compact() == 0
    trickle(writer, 13, per_flush=12)  # 20 more files of 20 rows: 2 fit in 40
    assert writer.compact() == 0
    assert len(published(tmp_path, OLD)) == 20
    writer.close()


def test_an_early_reader_and_a_late_one_see_the_same_rows(tmp_path: Path) -> None:
    """A reader whose listing predates the compaction and one that refreshes after it."""
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(tmp_path, clock)
    trickle(writer, 10)
    early = ParquetArchiveReader(tmp_path)
    before = snapshot(early)
    writer.compact()
    trickle(writer, 1)  # and one late flush after it
    late = ParquetArchiveReader(tmp_path)
    for reader in (early, late):
        assert_each_decision_once(reader)
        assert snapshot(reader).slice(0, 0).schema == before.schema
    assert len(published(tmp_path, OLD)) == 2  # the merged file and the late flush's
    writer.close()


def test_index_merges_drop_what_deleted_files_held(tmp_path: Path) -> None:
    """Once the retired files are deleted, index merges leave out their entries; every id
    is still found, once."""
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(tmp_path, clock, compact_grace_ms=0, merge_fan_in=2)
    trickle(writer, 16)
    writer.compact()
    trickle(writer, 16)  # more flushes: more index merges, over the compacted seqs too
    writer.compact()
    trickle(writer, 4)
    writer.close()
    reader = ParquetArchiveReader(tmp_path)
    assert_each_decision_once(reader)
    entries = sum(
        np.load(tmp_path / INDEX_DIR / name, mmap_mode="r").shape[1]
        for name in os.listdir(tmp_path / INDEX_DIR)
        if name.endswith(".npy") and not name.startswith(".")
    )
    rows = snapshot(reader).num_rows
    # unmerged runs still hold their dead entries; merged ones do not
    assert rows <= entries < 2 * rows


def test_background_maintenance_compacts_between_flushes(tmp_path: Path) -> None:
    """What the worker does: ``maybe_flush`` when no flush is due starts the maintenance
    on the archive thread."""
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(tmp_path, clock)
    trickle(writer, 12)
    deadline = time.monotonic() + 20
    while len(published(tmp_path, OLD)) > 1 and time.monotonic() < deadline:
        writer.maybe_flush()
        time.sleep(0.05)
    assert len(published(tmp_path, OLD)) == 1
    writer.close()
    assert_each_decision_once(ParquetArchiveReader(tmp_path))


def test_a_failed_compaction_publishes_nothing_and_the_writer_goes_on(tmp_path: Path) -> None:
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(tmp_path, clock)
    trickle(writer, 9)

    def full_disk(step: str) -> None:
        if step == "indexed":
            raise OSError(28, "No space left on device")

    writer._step = full_disk
    assert writer.compact() == 0
    assert len(published(tmp_path, OLD)) == 9 and len(on_disk(tmp_path, OLD)) == 9
    writer._step = lambda step: None
    trickle(writer, 1)  # the next flush takes the seq the compaction gave back
    assert writer.compact() == 10
    writer.close()
    assert_each_decision_once(ParquetArchiveReader(tmp_path))


def corrections(keyed_offset: int, ts_ms: int) -> pa.Table:
    """One correction of click ``c<keyed_offset>``, made at that keyed offset."""
    event_id = f"c{keyed_offset}"
    return pa.table(
        {
            "keyed_partition": [0],
            "keyed_offset": [keyed_offset],
            "event_id": [event_id],
            "source_partition": [1],
            "source_offset": [keyed_offset],
            "ad_id": ["ad"],
            "ts_ms": [ts_ms + keyed_offset],
            "rule_id": ["ip_click_velocity"],
            "reason": ["too fast"],
            "evidence": ["{}"],
            "spend_micros": [100],
            "corrected_at_ms": [ts_ms],
            "fp_high": [ids.fingerprint(ids.CLICK, event_id)[0]],
            "previous_rule_id": [None],
        },
        schema=CORRECTION_SCHEMA,
    )


def test_the_corrections_layout_compacts_too(tmp_path: Path) -> None:
    clock = Clock(NEW + 30 * 60_000)
    writer = ParquetArchiveWriter(
        tmp_path, flush_events=1_000, flush_interval_ms=10**9, layout=CORRECTIONS, clock=clock
    )
    for n in range(9):
        writer.append(corrections(n, OLD), {0: (n, n + 1)})
        writer.flush()
    reader = ParquetArchiveReader(tmp_path, layout=CORRECTIONS)
    before = reader.lookup("c3")
    assert writer.compact() == 9
    assert len(reader.files(OLD, OLD + HOUR_MS)) == 1
    assert reader.lookup("c3") == before and len(before) == 1
    writer.close()


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from tests.archive.test_compaction import Clock, writer_at, NEW

    step = sys.argv[2]
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(Path(sys.argv[1]), clock, compact_grace_ms=0)

    def crash(at: str) -> None:
        if at == step:
            os._exit(9)

    writer._step = crash
    writer.compact()
    os._exit(0)
    """
)


@pytest.mark.parametrize("step", ["read", "written", "indexed", "published", "deleted"])
def test_a_crash_at_each_step_leaves_each_decision_once(tmp_path: Path, step: str) -> None:
    """A writer dies (os._exit) right after each step of a compaction: every decision is
    visible once whatever it had done, and the next writer finishes the job."""
    clock = Clock(NEW + 30 * 60_000)
    writer = writer_at(tmp_path, clock)
    trickle(writer, 12)
    writer.close()
    before = snapshot(ParquetArchiveReader(tmp_path))
    reader = ParquetArchiveReader(tmp_path)  # listed before the crash
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), step],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert child.returncode == 9
    for after_crash in (reader, ParquetArchiveReader(tmp_path)):
        assert snapshot(after_crash).equals(before)
        assert_each_decision_once(after_crash)
    survivor = writer_at(tmp_path, clock, compact_grace_ms=0)
    survivor.compact()
    survivor.close()
    assert snapshot(ParquetArchiveReader(tmp_path)).equals(before)
    assert_each_decision_once(ParquetArchiveReader(tmp_path))
    # nothing left over: on disk exactly what is published, one file for the old hour
    assert on_disk(tmp_path, OLD) == published(tmp_path, OLD)
    assert len(published(tmp_path, OLD)) == 1
    runs = [n for n in os.listdir(tmp_path / INDEX_DIR) if n.startswith(".")]
    assert runs == []
