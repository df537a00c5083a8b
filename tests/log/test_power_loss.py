"""A power loss can leave the ``durable`` file and the segments it describes of different
ages: the writer updates ``durable`` through a shared mapping that it never syncs, so the
file on disk may be older than the fsynced frames (usual), and a lost or old disk image
may leave it newer than the frames that survived. Simulated on real log directories by
rewriting ``durable`` or cutting segments with the writer closed."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from clickagg.log.base import CorruptFrameError, Frame, PartitionDamagedError
from clickagg.log.integrity import HEADER, list_segments, seg_path
from clickagg.log.repair import check_log, repair_log
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from tests.log.test_integrity import frame_positions, no_archive, read_until_error
from tests.log.test_segments import (
    check_frames,
    fill,
    frame_bytes,
    open_writer,
    payload,
    read_all,
)

PARTITIONS = 3
SEGMENT_BYTES = 300  # a few frames each: the acknowledged frames span several segments
P = 1  # the partition that loses data; 0 and 2 keep theirs


def acknowledged_log(d: Path) -> tuple[dict[int, int], list[dict[int, int]]]:
    """Frames appended and synced in rounds, as group commits acknowledge them. Returns
    the final durable ends and the ends after each round (what ``durable`` held then)."""
    rounds: list[dict[int, int]] = []
    ends = dict.fromkeys(range(PARTITIONS), 0)
    with open_writer(d, PARTITIONS, segment_bytes=SEGMENT_BYTES) as w:
        for _ in range(4):
            for p in range(PARTITIONS):
                ends[p] += sum(c for _, c in fill(w, p, 5 + p, start=ends[p]))
            w.sync()
            rounds.append(dict(ends))
    return ends, rounds


def write_durable(d: Path, ends: dict[int, int]) -> None:
    """Rewrite the ``durable`` file in place (same inode, as a page written back would)."""
    with open(d / "durable", "r+b") as f:
        f.write(struct.pack(f"<{PARTITIONS}Q", *(ends[p] for p in range(PARTITIONS))))


@pytest.mark.parametrize("stale", ["zeros", "first_round", "previous_round", "missing"])
def test_a_durable_file_older_than_the_data_loses_no_acknowledged_frame(
    tmp_path: Path, stale: str
) -> None:
    ends, rounds = acknowledged_log(tmp_path)
    seg = seg_path(tmp_path / "p0002", list_segments(tmp_path / "p0002")[-1])
    torn_at = seg.stat().st_size
    with open(seg, "ab") as f:  # a frame half written when the power went: never acknowledged
        f.write(HEADER.pack(40, 0, ends[2], 2) + b"x" * 10)
    reader = SegmentLogReader(tmp_path)  # mapped before the restart: must see the new ends
    try:
        if stale == "missing":
            (tmp_path / "durable").unlink()
        else:
            older = {"zeros": dict.fromkeys(ends, 0), "first_round": rounds[0]}
            write_durable(tmp_path, older.get(stale, rounds[-2]))

        with open_writer(tmp_path, PARTITIONS, segment_bytes=SEGMENT_BYTES) as w:
            assert w.damaged() == {}
            assert [(r.partition, r.action) for r in w.recoveries] == [(2, "torn_tail_truncated")]
            assert seg.stat().st_size == torn_at
            for p in range(PARTITIONS):
                # No offset is reused and none skipped: the next event follows the last ack.
                assert w.append(p, payload(p, ends[p], 2), 2) == ends[p]
            w.sync()
            if stale != "missing":
                assert [reader.durable_end(p) for p in range(PARTITIONS)] == [
                    ends[p] + 2 for p in range(PARTITIONS)
                ]
        with SegmentLogReader(tmp_path) as fresh:
            for p in range(PARTITIONS):
                assert fresh.durable_end(p) == ends[p] + 2
                # every acknowledged frame once, in order, then the new one
                check_frames(read_all(fresh, p), p, 0, ends[p] + 2)
        assert all(not report.damages for report in check_log(tmp_path))
    finally:
        reader.close()


def test_recovery_syncs_the_frames_it_keeps_before_readers_see_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames written but not synced before a kill -9 survive in the page cache; recovery
    keeps them and shows them to readers (the worker may count them). Unless they are
    synced first, a power loss then drops them while the store has counted them, and a
    stale ``durable`` file lets the writer give their offsets to new events."""
    with open_writer(tmp_path, PARTITIONS) as w:
        synced_end = sum(c for _, c in fill(w, P, 4))
        w.sync()
    unsynced = seg_path(tmp_path / f"p{P:04d}", 0)
    with open(unsynced, "ab") as f:  # whole frames written, never synced: then a kill -9
        f.write(frame_bytes(synced_end, 3, payload(P, synced_end, 3)))
    unsynced_end = synced_end + 3

    synced: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, real: object = real) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)  # type: ignore[operator]

        monkeypatch.setattr(os, name, spy)
    with open_writer(tmp_path, PARTITIONS) as w:
        # the unsynced frames were kept
        assert w.append(P, payload(P, unsynced_end, 1), 1) == unsynced_end
    assert str(unsynced) in synced, synced


@pytest.mark.parametrize(
    "loss", ["mid_frame", "frame_boundary", "emptied", "last_segment_gone", "all_segments_gone"]
)
def test_data_lost_below_the_durable_end_is_recorded_and_no_offset_is_reused(
    tmp_path: Path, loss: str
) -> None:
    ends, _ = acknowledged_log(tmp_path)
    pdir = tmp_path / f"p{P:04d}"
    segs = list_segments(pdir)
    assert len(segs) >= 3
    last = seg_path(pdir, segs[-1])
    frames = frame_positions(last)
    pos, base, _ = frames[len(frames) // 2]
    if loss == "mid_frame":
        os.truncate(last, pos + HEADER.size + 1)
        lost_from = base
    elif loss == "frame_boundary":
        os.truncate(last, pos)
        lost_from = base
    elif loss == "emptied":
        os.truncate(last, 0)
        lost_from = segs[-1]
    elif loss == "last_segment_gone":
        last.unlink()
        lost_from = segs[-1]
    else:
        for s in segs:
            seg_path(pdir, s).unlink()
        lost_from = 0

    with open_writer(tmp_path, PARTITIONS, segment_bytes=SEGMENT_BYTES) as w:
        assert f"offsets [{lost_from}, {ends[P]})" in w.damaged()[P]
        assert [(r.partition, r.action) for r in w.recoveries] == [(P, "damage_found")]
        with pytest.raises(PartitionDamagedError, match=f"partition {P}"):
            w.append(P, payload(P, ends[P], 1), 1)
        for p in (0, 2):
            assert w.append(p, payload(p, ends[p], 1), 1) == ends[p]
        w.sync()
    with SegmentLogReader(tmp_path) as r:
        assert r.durable_end(P) == ends[P]  # readers are never shown a shorter log
        frames, error = read_until_error(r, P)
        assert error is not None and error.offset == lost_from
        if frames:
            check_frames(frames, P, 0, lost_from)
        for p in (0, 2):
            check_frames(read_all(r, p), p, 0, ends[p] + 1)
    [report] = [report for report in check_log(tmp_path) if report.damages]
    assert [(d.offset_start, d.offset_end) for d in report.damages] == [(lost_from, ends[P])]

    [repaired] = repair_log(tmp_path, rebuild=no_archive)
    assert not repaired.rebuilt
    assert (repaired.damage.offset_start, repaired.damage.offset_end) == (lost_from, ends[P])
    with open_writer(tmp_path, PARTITIONS, segment_bytes=SEGMENT_BYTES) as w:
        assert w.damaged() == {}
        assert w.append(P, payload(P, ends[P], 1), 1) == ends[P]  # after the lost ones
        w.sync()
    with SegmentLogReader(tmp_path) as r:
        after = read_all(r, P)
        lost = [f for f in after if f.lost]
        assert [(f.base_offset, f.end_offset) for f in lost] == [(lost_from, ends[P])]
        assert after[-1].end_offset == ends[P] + 1


def test_a_reader_that_meets_the_loss_records_it(tmp_path: Path) -> None:
    """``durable`` newer than the data with the writer not restarted yet (a reader in the
    worker process meets it first): the reader records the damage, and ingest stops,
    rather than waiting for ever on the empty segment for frames that are gone."""
    ends, _ = acknowledged_log(tmp_path)
    pdir = tmp_path / f"p{P:04d}"
    last = list_segments(pdir)[-1]
    os.truncate(seg_path(pdir, last), 0)
    outcome: list[tuple[list[Frame], CorruptFrameError | None]] = []
    with SegmentLogReader(tmp_path) as r:
        assert r.durable_end(P) == ends[P]
        reading = threading.Thread(
            target=lambda: outcome.append(read_until_error(r, P)), daemon=True
        )
        reading.start()
        reading.join(timeout=10)
        assert not reading.is_alive(), "the reader spins on the empty segment"
    [(frames, error)] = outcome
    assert error is not None and error.offset == last
    check_frames(frames, P, 0, last)
    with SegmentLogWriter(tmp_path, PARTITIONS, retention_ms=10**15, retention_bytes=10**15) as w:
        assert f"offset {last} unreadable" in w.damaged()[P]
