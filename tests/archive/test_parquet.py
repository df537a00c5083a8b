"""The Parquet archive: each decision published exactly once, atomically, and found again."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from clickagg.archive.base import ArchiveFencedError, ArchiveGapError
from clickagg.archive.parquet import (
    INDEX_DIR,
    MANIFEST_DIR,
    ParquetArchiveReader,
    ParquetArchiveWriter,
    _split_by_hour,
    hour_dir,
)
from clickagg.core import ids
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.windows import HOUR_MS

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS


def decisions(
    partition: int, start: int, count: int, *, ts_ms: int = T0, prefix: str = "e", kind: int = 0
) -> pa.Table:
    """``count`` decisions of one partition from offset ``start``, ids ``{prefix}{offset}``."""
    event_ids = [f"{prefix}{o}" for o in range(start, start + count)]
    fps = [ids.fingerprint(kind, e) for e in event_ids]
    return pa.table(
        {
            "partition": [partition] * count,
            "offset": list(range(start, start + count)),
            "event_id": event_ids,
            "event_type": [ids.EVENT_TYPES[kind]] * count,
            "status": ["counted"] * count,
            "reason": [None] * count,
            "ad_id": ["ad"] * count,
            **{name: [None] * count for name in ("advertiser_id", "campaign_id", "user_id")},
            **{name: [None] * count for name in ("ip", "user_agent", "country", "device")},
            "browser": [None] * count,
            "ts_ms": [ts_ms + o for o in range(start, start + count)],
            "received_ms": [ts_ms] * count,
            "cost_micros": [None] * count,
            "spend_micros": [0] * count,
            "fp_high": [high for high, _ in fps],
            "fp_low": [low for _, low in fps],
        },
        schema=DECISION_SCHEMA,
    )


def writer_for(directory: Path, **options: int) -> ParquetArchiveWriter:
    settings = {"flush_events": 1_000_000, "flush_interval_ms": 10**9, **options}
    return ParquetArchiveWriter(directory, **settings)


def test_published_decisions_are_read_back_by_hour_and_by_id(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.append(
        pa.concat_tables([decisions(0, 0, 3), decisions(1, 0, 2, ts_ms=T0 + HOUR_MS)]),
        {0: (0, 3), 1: (0, 2)},
    )
    # an impression sharing a click's id is another event: both copies are found
    writer.append(decisions(1, 2, 1, prefix="e", kind=ids.IMPRESSION), {1: (2, 3)})
    reader = ParquetArchiveReader(tmp_path)
    assert reader.archived_offsets() == {}  # nothing is visible before the flush
    writer.flush()
    assert reader.archived_offsets() == {0: 3, 1: 3}
    first_hour = reader.decisions(start_ms=T0, end_ms=T0 + HOUR_MS)
    assert first_hour["event_id"].to_pylist() == ["e0", "e1", "e2", "e2"]
    assert first_hour["partition"].to_pylist() == [0, 0, 0, 1]
    second_hour = reader.decisions(start_ms=T0 + HOUR_MS, end_ms=T0 + 2 * HOUR_MS)
    assert second_hour["event_id"].to_pylist() == ["e0", "e1"]
    found = reader.fates("e2")
    assert [(f.partition, f.offset, f.event_type) for f in found] == [
        (0, 2, "click"),
        (1, 2, "impression"),
    ]
    assert reader.fates("nope") == []
    assert (tmp_path / hour_dir(T0)).is_dir()
    writer.close()


def test_a_range_wider_than_the_archive_reads_the_hours_within_it(tmp_path: Path) -> None:
    """A range of more hours than the archive holds (from 0, say) is answered from the
    listed hours within it: the same files and decisions as the hours one by one."""
    writer = writer_for(tmp_path)
    for hour in range(4):
        writer.append(
            decisions(0, hour, 1, ts_ms=T0 + hour * HOUR_MS - hour), {0: (hour, hour + 1)}
        )
    writer.flush()
    writer.close()
    reader = ParquetArchiveReader(tmp_path)
    for start, end in ((0, T0 + 2 * HOUR_MS), (T0 + HOUR_MS, 2 * T0), (0, T0), (0, 2 * T0)):
        one_by_one = [T0 + h * HOUR_MS for h in range(4) if start <= T0 + h * HOUR_MS < end]
        assert reader.files(start, end) == [
            f for hour in one_by_one for f in reader.files(hour, hour + HOUR_MS)
        ]
        got = reader.decisions(start_ms=start, end_ms=end)["offset"].to_pylist()
        assert got == [(hour - T0) // HOUR_MS for hour in one_by_one]
    reader.close()


def test_a_redo_is_dropped_and_a_gap_is_refused(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.append(decisions(0, 0, 5), {0: (0, 5)})
    writer.flush()
    writer.append(decisions(0, 3, 4), {0: (3, 7)})  # 3, 4 again after a crash: only 5, 6 new
    writer.append(decisions(0, 0, 2), {0: (0, 2)})  # wholly archived: nothing
    with pytest.raises(ArchiveGapError, match="partition 0"):
        writer.append(decisions(0, 9, 1), {0: (9, 10)})
    writer.close()
    table = ParquetArchiveReader(tmp_path).decisions(start_ms=0, end_ms=2 * T0)
    assert table["offset"].to_pylist() == list(range(7))


def test_a_second_writer_is_fenced(tmp_path: Path) -> None:
    first = writer_for(tmp_path)
    first.append(decisions(0, 0, 2), {0: (0, 2)})
    first.flush()
    with pytest.raises(ArchiveFencedError, match="another writer"):
        writer_for(tmp_path)
    first.close()
    second = writer_for(tmp_path)  # the lock went with the first writer
    assert second.next_offset(0) == 2
    second.close()
    assert ParquetArchiveReader(tmp_path).archived_offsets() == {0: 2}


def test_checkpoints_bound_the_manifests_and_readers_follow(tmp_path: Path) -> None:
    """Every 4th flush folds the manifests into a checkpoint; a reader that started before
    (and one that starts after) sees exactly the same archive."""
    early = ParquetArchiveReader(tmp_path)
    writer = writer_for(tmp_path, checkpoint_every=4)
    for n in range(10):
        writer.append(decisions(0, n * 3, 3, ts_ms=T0 + n * HOUR_MS), {0: (n * 3, n * 3 + 3)})
        writer.flush()
        if n == 2:
            assert early.archived_offsets() == {0: 9}  # read before the first checkpoint
    writer.close()
    names = sorted(os.listdir(tmp_path / MANIFEST_DIR))
    assert [n for n in names if not n.startswith(".")] == [
        "000000000008.checkpoint.json",
        "000000000009.json",
        "000000000010.json",
    ]
    late = ParquetArchiveReader(tmp_path)
    for reader in (early, late):
        assert reader.archived_offsets() == {0: 30}
        table = reader.decisions(start_ms=T0, end_ms=T0 + 10 * HOUR_MS)
        assert table["offset"].to_pylist() == list(range(30))
        assert [f.offset for f in reader.fates("e4")] == [4]
    # a writer reopening the archive continues from the checkpoint and what follows it
    again = writer_for(tmp_path)
    assert again.next_offset(0) == 30
    again.close()


def test_index_runs_merge_and_every_id_is_still_found(tmp_path: Path) -> None:
    writer = writer_for(tmp_path, flush_events=1, merge_fan_in=2)
    for n in range(9):
        writer.append(decisions(n % 2, n // 2 * 3, 3), {n % 2: (n // 2 * 3, n // 2 * 3 + 3)})
        writer.flush()
    writer.close()
    runs = os.listdir(tmp_path / INDEX_DIR)
    assert 1 <= len(runs) < 9  # merged in tiers
    reader = ParquetArchiveReader(tmp_path)
    for partition, end in reader.archived_offsets().items():
        for offset in range(end):
            [fate] = [f for f in reader.fates(f"e{offset}") if f.partition == partition]
            assert fate.offset == offset


def test_published_files_are_plain_parquet(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    writer.append(decisions(0, 0, 10), {0: (0, 10)})
    writer.close()
    pattern = str(tmp_path / hour_dir(T0) / "*.parquet")
    [(count, first)] = duckdb.sql(
        f"SELECT count(*), min(event_id) FROM read_parquet('{pattern}')"
    ).fetchall()
    assert (count, first) == (10, "e0")


def test_a_failed_flush_is_never_followed_by_a_later_one(tmp_path: Path) -> None:
    """A flush that fails (a disk error, not a kill) leaves a hole in what is published;
    the worker process then stops and closes its writer. Closing must not publish the
    decisions after the hole: readers take a manifest's range end as the archived offset,
    and the next writer would resume past decisions that were never written."""
    writer = writer_for(tmp_path)
    writer.append(decisions(0, 0, 5), {0: (0, 5)})
    writer.flush()
    publish = writer._publish_manifest

    def failing(seq: int, body: bytes) -> None:
        raise OSError("disk I/O error")

    writer._publish_manifest = failing  # type: ignore[method-assign]
    writer.append(decisions(0, 5, 3), {0: (5, 8)})
    writer.flush_events = 1
    writer.maybe_flush()  # the flush of 5..8 starts in the background and fails
    writer.append(decisions(0, 8, 2), {0: (8, 10)})
    with pytest.raises(OSError, match="disk I/O error"):
        writer.flush()  # the stream loop sees the error (from maybe_flush) and stops
    writer._publish_manifest = publish  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="failed flush"):
        writer.append(decisions(0, 10, 1), {0: (10, 11)})
    writer.close()  # what the worker process does on its way out: publishes nothing more
    reader = ParquetArchiveReader(tmp_path)
    ends = reader.archived_offsets()
    table = reader.decisions(start_ms=0, end_ms=2 * T0)
    assert table["offset"].to_pylist() == list(range(ends[0]))
    # the next writer continues from the end of what is published, without a hole
    after = writer_for(tmp_path)
    assert after.next_offset(0) == ends[0]
    after.append(decisions(0, ends[0], 10 - ends[0]), {0: (ends[0], 10)})
    after.close()
    table = ParquetArchiveReader(tmp_path).decisions(start_ms=0, end_ms=2 * T0)
    assert table["offset"].to_pylist() == list(range(10))


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from clickagg.archive.parquet import ParquetArchiveWriter
    from tests.archive.test_parquet import decisions

    writer = ParquetArchiveWriter(Path(sys.argv[1]), flush_events=1, flush_interval_ms=0)
    while True:
        batch = {p: writer.next_offset(p) for p in range(3)}
        table = [decisions(p, start, 500) for p, start in batch.items()]
        import pyarrow as pa
        writer.append(pa.concat_tables(table), {p: (s, s + 500) for p, s in batch.items()})
        writer.flush()
        print("flushed", flush=True)
    """
)


def test_kill9_during_archiving_leaves_each_decision_once(tmp_path: Path) -> None:
    """A writer killed at random moments: the archive shows whole flushes only, each
    decision once, and the next writer removes what the dead one left unpublished."""
    rng = random.Random(7)
    root = Path(__file__).resolve().parents[2]
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            cwd=root,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert child.stdout is not None
        child.stdout.readline()  # at least one flush published
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    reader = ParquetArchiveReader(tmp_path)
    ends = reader.archived_offsets()
    assert set(ends) == {0, 1, 2} and min(ends.values()) >= 500
    table = reader.decisions(start_ms=0, end_ms=2 * T0)
    seen = Counter(zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True))
    assert set(seen.values()) == {1}
    assert sorted(seen) == [(p, o) for p in range(3) for o in range(ends[p])]
    # the next writer deletes unpublished leftovers: every file left is a published one
    writer_for(tmp_path).close()
    manifests = len([n for n in os.listdir(tmp_path / MANIFEST_DIR) if n.endswith(".json")])
    data_files = list(tmp_path.glob("hour=*/*"))
    assert all(not p.name.startswith(".") for p in data_files)
    assert len(data_files) == manifests  # one event hour per flush here


@pytest.mark.parametrize("hours", [1, 2, 4, 5, 30])
def test_a_flush_splits_by_event_hour_keeping_each_hours_rows_in_log_order(hours: int) -> None:
    """One hour (no copy), a few (a filter each) or many (one sorted take): every row once,
    in its hour's part, in the flush's order."""
    rng = random.Random(hours)
    count = 500
    ts = [T0 + rng.randrange(hours) * HOUR_MS + rng.randrange(HOUR_MS) for _ in range(count)]
    table = pa.table(
        {"offset": pa.array(range(count), pa.int64()), "ts_ms": pa.array(ts, pa.int64())}
    )
    parts = list(_split_by_hour(table))
    assert [hour for hour, _ in parts] == sorted({t - t % HOUR_MS for t in ts})
    for hour, part in parts:
        offsets = part["offset"].to_pylist()
        assert offsets == sorted(offsets)
        assert all(hour <= t < hour + HOUR_MS for t in part["ts_ms"].to_pylist())
    assert sum(part.num_rows for _, part in parts) == count
    assert sorted(o for _, part in parts for o in part["offset"].to_pylist()) == list(range(count))
    if hours == 1:
        assert parts[0][1] is table
