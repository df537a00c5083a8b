"""Log damage is never silent: found, recorded (ingest stops), checked and repaired."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from clickagg.core import columns
from clickagg.log.base import CorruptFrameError, Frame, PartitionDamagedError
from clickagg.log.integrity import HEADER, list_segments, recorded_damage, seg_path
from clickagg.log.repair import check_log, repair_log
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from tests.log.test_segments import fill, open_writer, payload

P = 1  # the damaged partition; 0 and 2 stay healthy


def frame_positions(path: Path) -> list[tuple[int, int, int]]:
    """(byte position, base offset, count) of every frame of an undamaged segment."""
    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        length, _crc, base, count = HEADER.unpack_from(data, pos)
        out.append((pos, base, count))
        pos += HEADER.size + length
    return out


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def no_archive(partition: int, start: int, end: int) -> pa.Table:
    return columns.SCHEMA.empty_table()


def read_until_error(r: SegmentLogReader, p: int) -> tuple[list[Frame], CorruptFrameError | None]:
    frames: list[Frame] = []
    nxt = 0
    try:
        while batch := r.read(p, nxt, 7):
            frames += batch
            nxt = batch[-1].end_offset
    except CorruptFrameError as exc:
        return frames, exc
    return frames, None


def written_log(tmp_path: Path, frames: int = 30, **kw: int) -> dict[int, int]:
    with open_writer(tmp_path, **kw) as w:
        ends = {p: sum(c for _, c in fill(w, p, frames)) for p in range(3)}
        w.sync()
    return ends


def active_segment(tmp_path: Path, p: int = P) -> Path:
    pdir = tmp_path / f"p{p:04d}"
    return seg_path(pdir, list_segments(pdir)[-1])


def test_a_flipped_byte_in_the_active_segment_stops_the_partition_and_cuts_nothing(
    tmp_path: Path,
) -> None:
    ends = written_log(tmp_path)
    seg = active_segment(tmp_path)
    frames = frame_positions(seg)
    pos, bad_base, bad_count = frames[10]
    size = seg.stat().st_size
    flip(seg, pos + HEADER.size + 3)  # inside the 11th frame's payload

    with open_writer(tmp_path) as w:
        assert seg.stat().st_size == size  # acknowledged frames after it are kept
        assert P in w.damaged() and f"[{bad_base}, {bad_base + bad_count})" in w.damaged()[P]
        assert [r.action for r in w.recoveries] == ["damage_found"]
        with pytest.raises(PartitionDamagedError, match=f"partition {P}"):
            w.append(P, payload(P, ends[P], 1), 1)
        assert w.append(0, payload(0, ends[0], 1), 1) == ends[0]  # others go on
        w.sync()
    with SegmentLogReader(tmp_path) as r:
        got, error = read_until_error(r, P)
        assert error is not None and error.offset == bad_base
        assert got[-1].end_offset == bad_base  # everything before the damage reads

    [report] = [r for r in check_log(tmp_path) if r.damages]
    [damage] = report.damages
    assert (damage.offset_start, damage.offset_end) == (bad_base, bad_base + bad_count)
    assert (damage.byte_start, damage.byte_end) == (pos, frames[11][0])  # resynced

    [repaired] = repair_log(tmp_path, rebuild=no_archive)
    assert not repaired.rebuilt and repaired.damage == damage
    assert list((tmp_path / "quarantine").iterdir())  # the bad bytes are kept
    assert recorded_damage(tmp_path) == {}
    with open_writer(tmp_path) as w:
        assert w.damaged() == {}
        assert w.append(P, payload(P, ends[P], 2), 2) == ends[P]  # no offset reused
        w.sync()
    with SegmentLogReader(tmp_path) as r:
        got, error = read_until_error(r, P)
    assert error is None
    lost = [f for f in got if f.lost]
    assert [(f.base_offset, f.count) for f in lost] == [(bad_base, bad_count)]
    kept = [f for f in got if not f.lost]
    assert all(f.payload == payload(P, f.base_offset, f.count) for f in kept)
    assert got[-1].end_offset == ends[P] + 2


def test_a_cut_tail_is_damage_when_it_was_acknowledged(tmp_path: Path) -> None:
    ends = written_log(tmp_path)
    seg = active_segment(tmp_path)
    last_pos, last_base, _ = frame_positions(seg)[-1]
    data = seg.read_bytes()
    seg.write_bytes(data[:-5])

    with open_writer(tmp_path) as w:
        assert f"[{last_base}, {ends[P]})" in w.damaged()[P]
        assert seg.stat().st_size == len(data) - 5  # nothing cut further
    [repaired] = repair_log(tmp_path, rebuild=no_archive)
    assert (repaired.damage.offset_start, repaired.damage.offset_end) == (last_base, ends[P])
    assert repaired.damage.byte_start == last_pos
    with open_writer(tmp_path) as w:
        assert w.append(P, payload(P, ends[P], 1), 1) == ends[P]


def test_an_unacknowledged_torn_tail_is_cut_and_logged(tmp_path: Path) -> None:
    ends = written_log(tmp_path)
    seg = active_segment(tmp_path)
    size = seg.stat().st_size
    with open(seg, "ab") as f:  # a frame written but never synced, hence never acknowledged
        f.write(HEADER.pack(100, 0, ends[P], 3) + b"x" * 40)
    with open_writer(tmp_path) as w:
        assert w.damaged() == {}
        [recovery] = w.recoveries
        assert recovery.action == "torn_tail_truncated" and f"[{size}, {size + 60})" in (
            recovery.detail
        )
        assert seg.stat().st_size == size
        assert w.append(P, payload(P, ends[P], 1), 1) == ends[P]


def test_damage_in_an_old_segment_is_found_by_the_reader_and_rebuilt_from_the_archive(
    tmp_path: Path,
) -> None:
    ends = written_log(tmp_path, frames=60, segment_bytes=400)
    pdir = tmp_path / f"p{P:04d}"
    segs = list_segments(pdir)
    assert len(segs) > 3
    old = seg_path(pdir, segs[1])
    pos, bad_base, bad_count = frame_positions(old)[1]
    flip(old, pos + HEADER.size + 1)

    with open_writer(tmp_path) as w:  # the writer checks the active segment only
        assert w.damaged() == {}
        with SegmentLogReader(tmp_path) as r:
            _, error = read_until_error(r, P)
        assert error is not None and error.offset == bad_base
        assert P in recorded_damage(tmp_path)  # the reader recorded it: ingest stops
        w._damage_checked = 0.0  # the writer re-reads markers once a second
        with pytest.raises(PartitionDamagedError):
            w.append(P, payload(P, ends[P], 1), 1)

    # The archive holds these events: the repair puts them back, nothing is lost.
    rebuilt_ids = [f"e{i}" for i in range(bad_count)]
    rows: dict[str, list[object]] = {name: [] for name in columns.SCHEMA.names}
    for i, event_id in enumerate(rebuilt_ids):
        for name in columns.SCHEMA.names:
            rows[name].append(0 if name not in columns.TEXT_COLUMNS else None)
        rows["event_id"][i], rows["ad_id"][i] = event_id, "ad-1"
    events = pa.table(rows, schema=columns.SCHEMA)

    def archive(partition: int, start: int, end: int) -> pa.Table:
        assert (partition, start, end) == (P, bad_base, bad_base + bad_count)
        return events

    [repaired] = repair_log(tmp_path, rebuild=archive)
    assert repaired.rebuilt and list(repaired.event_ids) == rebuilt_ids
    with SegmentLogReader(tmp_path) as r:
        got, error = read_until_error(r, P)
    assert error is None and got[-1].end_offset == ends[P]
    [back] = [f for f in got if f.base_offset == bad_base]
    assert back.count == bad_count and not back.lost
    assert columns.decode(back.payload).column("event_id").to_pylist() == rebuilt_ids


def test_repair_refuses_while_a_writer_holds_the_log(tmp_path: Path) -> None:
    written_log(tmp_path, frames=3)
    with (
        SegmentLogWriter(tmp_path, 3, retention_ms=1, retention_bytes=1),
        pytest.raises(RuntimeError, match="stop `clickagg serve` first"),
    ):
        repair_log(tmp_path, rebuild=no_archive)


def test_check_reports_a_clean_log_as_clean(tmp_path: Path) -> None:
    written_log(tmp_path, frames=40, segment_bytes=500)
    assert all(not r.damages and r.recorded is None for r in check_log(tmp_path))
