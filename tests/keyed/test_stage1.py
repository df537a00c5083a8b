"""Stage 1's context marks: the first frame of each keyed partition after a gap (the stage
started while the stream ran, or the family was inactive) says from when its log is
complete, the mark survives a restart until delivered, and a log that starts with the
stream carries none."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa

from clickagg.keyed.stage1 import KeyedAppender, context_of, decode_records
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter

KEYED = 3


def records(kept: pl.DataFrame, partitions: int) -> dict[int, pa.Table]:
    """Each event's keyed partition is its ``k`` column."""
    return {
        int(k): kept.filter(pl.col("k") == k).select("offset", "ts_ms").to_arrow()
        for k in sorted(set(kept["k"].to_list()))
    }


def events(partition: int, first: int, ts: list[int], keys: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "partition": [partition] * len(ts),
            "offset": list(range(first, first + len(ts))),
            "ts_ms": ts,
            "k": keys,
        },
        schema={"partition": pl.Int64, "offset": pl.Int64, "ts_ms": pl.Int64, "k": pl.Int64},
    )


def appender(root: Path, committed: dict[int, int], **kwargs: object) -> KeyedAppender:
    writer = SegmentLogWriter(root / "log", KEYED, retention_ms=0, retention_bytes=0)
    return KeyedAppender(
        writer,
        root / "stage1.json",
        committed,
        records=records,
        clicks_only=False,
        **kwargs,  # type: ignore[arg-type]
    )


def marks(root: Path) -> dict[int, list[int | None]]:
    """Per keyed partition, the context mark of each frame (None: none)."""
    reader = SegmentLogReader(root / "log")
    try:
        return {
            k: [context_of(decode_records(f.payload)) for f in reader.read(k, 0, 10_000)]
            for k in range(KEYED)
        }
    finally:
        reader.close()


def test_a_log_started_mid_stream_marks_each_partitions_first_frame(tmp_path: Path) -> None:
    first = appender(tmp_path, {0: 10}, newest_event_ms=5_000)
    first.append(events(0, 10, [4_000, 6_000], [0, 1]), {0: (10, 12)})
    # every event counted so far is at or before 6,000 (this round's newest)
    assert marks(tmp_path) == {0: [6_001], 1: [6_001], 2: []}
    stored = json.loads((tmp_path / "stage1.json").read_text())
    assert stored == {"0": 12, "format": 2, "owed": {"2": 6_001}}  # 2 has no record yet
    first.writer.close()
    # a restart: the mark still owed goes with partition 2's first frame, and only there
    again = appender(tmp_path, {0: 12}, newest_event_ms=6_000)
    again.append(events(0, 12, [7_000, 7_500], [2, 0]), {0: (12, 14)})
    assert marks(tmp_path) == {0: [6_001, None], 1: [6_001], 2: [6_001]}
    assert json.loads((tmp_path / "stage1.json").read_text()) == {"0": 14, "format": 2}
    again.writer.close()


def test_a_log_started_with_the_stream_carries_no_mark(tmp_path: Path) -> None:
    started = appender(tmp_path, {0: 0, 1: 0})
    started.append(events(0, 0, [1_000, 2_000, 3_000], [0, 1, 2]), {0: (0, 3)})
    assert marks(tmp_path) == {0: [None], 1: [None], 2: [None]}
    started.writer.close()


def test_rounds_an_inactive_family_skips_make_its_next_frames_marked(tmp_path: Path) -> None:
    on = True
    family = appender(tmp_path, {0: 0}, active=lambda: on)
    family.append(events(0, 0, [1_000], [0]), {0: (0, 1)})
    on = False
    family.append(events(0, 1, [9_000, 2_000], [0, 1]), {0: (1, 3)})  # counted, not appended
    assert family.next_offset(0) == 3
    stored = json.loads((tmp_path / "stage1.json").read_text())
    assert stored == {"0": 3, "format": 2, "gap": True}
    on = True
    family.append(events(0, 3, [8_000], [1]), {0: (3, 4)})
    # the skipped round's newest (9,000) bounds what the log misses
    assert marks(tmp_path) == {0: [None], 1: [9_001], 2: []}
    family.append(events(0, 4, [8_500, 8_600], [0, 2]), {0: (4, 6)})
    assert marks(tmp_path) == {0: [None, 9_001], 1: [9_001], 2: [9_001]}
    family.writer.close()


def test_a_marker_of_an_earlier_build_reads_as_a_gap(tmp_path: Path) -> None:
    """A build before the marks wrote only offsets, also while its ad family's rules were
    off (appending nothing): its log may miss anything counted, so it is marked."""
    (tmp_path / "stage1.json").write_text(json.dumps({"0": 7}))
    resumed = appender(tmp_path, {0: 7}, newest_event_ms=9_000)
    assert resumed.next_offset(0) == 7
    resumed.append(events(0, 7, [9_500], [1]), {0: (7, 8)})
    assert marks(tmp_path) == {0: [], 1: [9_501], 2: []}
    stored = json.loads((tmp_path / "stage1.json").read_text())
    assert stored == {"0": 8, "format": 2, "owed": {"0": 9_501, "2": 9_501}}
    resumed.append(events(0, 8, [9_600], [1]), {0: (8, 9)})  # once: its own marker has none
    assert marks(tmp_path) == {0: [], 1: [9_501, None], 2: []}
    resumed.writer.close()
