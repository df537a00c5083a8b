"""Finding, recording and repairing damage in the segment log.

A byte flipped on disk, a truncated file or a lost segment must never cost an acknowledged
event silently, nor let a new event reuse its offset. So damage is *found* (a crc-checked
walk over whole frames that resyncs on the next good frame instead of cutting everything
after the first bad one), *recorded* (a marker file per partition that the writer, the
worker and ``/healthz`` all see: the partition takes no new events from then on) and
*repaired* only by an operator (``clickagg log repair``), who is told exactly which offsets
were lost. A repair replaces each damaged byte range by frames rebuilt from the archive
where it holds those events, and otherwise by one *lost-offsets frame* (see
``clickagg.log.base.LOST_MAGIC``) that keeps every later offset where it was; the removed
bytes are kept under ``quarantine/``.

Only the active (last) segment can hold a torn tail after a crash: a roll fsyncs a segment
before its successor exists. A torn tail beyond the acknowledged (durable) end is normal
after kill -9 and is truncated; anything else is damage.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clickagg.log.base import LOST_MAGIC

log = logging.getLogger(__name__)

# The frame layout (see segments.py): header <IIQI (payload length, crc, base, count).
HEADER = struct.Struct("<IIQI")
_OFFSETS = struct.Struct("<QI")
HSIZE = HEADER.size
SUFFIX = ".seg"
DAMAGE_DIR = "damaged"
QUARANTINE_DIR = "quarantine"


def frame_crc(base: int, count: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_OFFSETS.pack(base, count)))


def seg_path(pdir: Path, base: int) -> Path:
    return pdir / f"{base:020d}{SUFFIX}"


def list_segments(pdir: Path) -> list[int]:
    try:
        names = os.listdir(pdir)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-4]) for n in names if n.endswith(SUFFIX) and n[:-4].isdigit())


def lost_frame(base: int, count: int, detail: str) -> bytes:
    """A whole frame that stands for ``count`` offsets whose events are gone."""
    payload = LOST_MAGIC + json.dumps({"detail": detail, "at": time.time()}).encode()
    return HEADER.pack(len(payload), frame_crc(base, count, payload), base, count) + payload


@dataclass(frozen=True)
class Damage:
    """Bytes ``[byte_start, byte_end)`` of one segment hold no readable frame for the
    offsets ``[offset_start, offset_end)``."""

    partition: int
    segment: int  # the base offset naming the segment file
    byte_start: int
    byte_end: int
    offset_start: int
    offset_end: int
    detail: str

    @property
    def lost_offsets(self) -> int:
        return self.offset_end - self.offset_start

    def describe(self) -> str:
        return (
            f"partition {self.partition}: offsets [{self.offset_start}, {self.offset_end}) "
            f"unreadable ({self.detail}) in segment {self.segment:020d}{SUFFIX} "
            f"bytes [{self.byte_start}, {self.byte_end})"
        )


@dataclass
class SegmentScan:
    """One segment walked frame by frame. ``end``/``end_offset``: after the last good
    frame; ``torn_tail``: bytes after it that hold no acknowledged event (truncatable)."""

    base: int
    size: int
    end: int
    end_offset: int
    damages: list[Damage] = field(default_factory=list)
    torn_tail: tuple[int, int] | None = None


def _frame_at(buf: memoryview, pos: int, offset: int | None, size: int) -> tuple[int, int] | None:
    """(length, count) of a whole crc-good frame at ``pos`` (based at ``offset`` if
    given), else None."""
    if pos + HSIZE > size:
        return None
    length, crc, base, count = HEADER.unpack_from(buf, pos)
    if (offset is not None and base != offset) or count == 0 or pos + HSIZE + length > size:
        return None
    if frame_crc(base, count, buf[pos + HSIZE : pos + HSIZE + length]) != crc:
        return None
    return length, count


def _resync(buf: memoryview, start: int, offset: int, limit: int, size: int) -> int | None:
    """The first position at or after ``start`` where a whole, crc-good frame begins whose
    base offset lies in ``(offset, limit)``. Candidates are found vectorized: the base
    field read as a little-endian uint64 at every byte position, in 8 strided views."""
    found: list[int] = []
    for align in range(8):
        first = start + 8 + align  # the base field of a header starting at start + align
        n = (size - first) // 8
        if n <= 0:
            continue
        bases = np.frombuffer(buf, dtype="<u8", count=n, offset=first)
        hits = np.flatnonzero((bases > offset) & (bases < limit))
        found.extend((hits * 8 + first - 8).tolist())
    for pos in sorted(found):
        if _frame_at(buf, pos, None, size) is not None:
            return pos
    return None


def scan_segment(
    path: Path, partition: int, base: int, *, acknowledged_end: int, next_base: int | None
) -> SegmentScan:
    """Walk every frame of one segment, checking crc and offsets, resyncing after damage.

    ``next_base``: the base of the following segment (every offset below it is
    acknowledged), or None for the active segment, where ``acknowledged_end`` (the
    durable end readers were shown) says which offsets were acknowledged.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:  # ``_walk`` then records an acknowledged end beyond ``base``
            scan = _walk(memoryview(b""), 0, partition, base, acknowledged_end, next_base)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as buf:
                scan = _walk(buf, size, partition, base, acknowledged_end, next_base)
    if next_base is not None and scan.end_offset != next_base and not scan.torn_tail:
        end = scan.end_offset
        lo, hi = (end, next_base) if end < next_base else (next_base, end)
        scan.damages.append(
            Damage(partition, base, scan.size, scan.size, lo, hi, "segment ends off its successor")
        )
    return scan


def _walk(
    buf: memoryview,
    size: int,
    partition: int,
    base: int,
    acknowledged_end: int,
    next_base: int | None,
) -> SegmentScan:
    pos, offset = 0, base
    scan = SegmentScan(base, size, 0, base)
    while pos < size:
        frame = _frame_at(buf, pos, offset, size)
        if frame is not None:
            length, count = frame
            pos += HSIZE + length
            offset += count
            continue
        limit = offset + (size - pos) + 1  # every event takes at least one byte
        if next_base is not None:
            limit = min(limit, next_base)
        resumed = _resync(buf, pos + 1, offset, limit, size)
        if resumed is not None:
            _, _, resumed_base, _ = HEADER.unpack_from(buf, resumed)
            scan.damages.append(
                Damage(partition, base, pos, resumed, offset, resumed_base, "corrupt frames")
            )
            pos, offset = resumed, resumed_base
            continue
        acknowledged = next_base if next_base is not None else acknowledged_end
        if offset < acknowledged:
            scan.damages.append(
                Damage(partition, base, pos, size, offset, acknowledged, "corrupt or cut tail")
            )
            scan.end_offset = acknowledged
        else:
            scan.torn_tail = (pos, size)
            scan.end_offset = offset
        scan.end = pos
        return scan
    scan.end, scan.end_offset = pos, offset
    if next_base is None and offset < acknowledged_end:
        scan.damages.append(
            Damage(partition, base, pos, pos, offset, acknowledged_end, "cut after the last frame")
        )
        scan.end_offset = acknowledged_end
    return scan


def scan_partition(pdir: Path, partition: int, acknowledged_end: int) -> list[SegmentScan]:
    """Every segment of one partition, fully checked (``clickagg log check``)."""
    segs = list_segments(pdir)
    return [
        scan_segment(
            seg_path(pdir, base),
            partition,
            base,
            acknowledged_end=acknowledged_end,
            next_base=segs[i + 1] if i + 1 < len(segs) else None,
        )
        for i, base in enumerate(segs)
    ]


# -- damage markers: what every process sees -----------------------------------------------


def record_damage(log_dir: Path, partition: int, detail: str, *, by: str) -> None:
    """Stop ``partition`` taking new events (the writer checks these markers) and say why.
    The first record wins: it names the earliest damage found."""
    ddir = log_dir / DAMAGE_DIR
    ddir.mkdir(exist_ok=True)
    final = ddir / f"p{partition:04d}.json"
    if final.exists():
        return
    tmp = ddir / f".p{partition:04d}.{os.getpid()}.tmp"
    body = {"partition": partition, "detail": detail, "found_by": by, "at": time.time()}
    tmp.write_text(json.dumps(body))
    os.replace(tmp, final)
    log.error("log damage recorded: %s (found by %s)", detail, by)


def recorded_damage(log_dir: Path) -> dict[int, str]:
    """Partition → why it takes no new events."""
    out: dict[int, str] = {}
    try:
        names = os.listdir(log_dir / DAMAGE_DIR)
    except FileNotFoundError:
        return out
    for name in names:
        if name.startswith("p") and name.endswith(".json"):
            try:
                body = json.loads((log_dir / DAMAGE_DIR / name).read_text())
            except (OSError, ValueError):
                continue
            out[int(body["partition"])] = str(body["detail"])
    return out


def clear_damage(log_dir: Path, partition: int) -> None:
    (log_dir / DAMAGE_DIR / f"p{partition:04d}.json").unlink(missing_ok=True)
