"""``clickagg log check`` and ``clickagg log repair`` over the segment log.

Check is read-only and may run beside a live server. Repair takes the writer's lock, so
the server must be stopped: for every damaged range it keeps the bad bytes under
``quarantine/``, writes frames rebuilt from the archive where the archive holds every
event of the range (nothing is lost: those events were decided and counted before the
damage), and otherwise one lost-offsets frame, so every later offset stays where it was
and no offset is ever handed out twice. Then the partition takes events again.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from clickagg.core import columns
from clickagg.log.integrity import (
    HEADER,
    QUARANTINE_DIR,
    Damage,
    SegmentScan,
    clear_damage,
    frame_crc,
    list_segments,
    lost_frame,
    recorded_damage,
    scan_partition,
    seg_path,
)

Rebuild = Callable[[int, int, int], pa.Table]
"""(partition, start, end) → the archived events of those offsets (log SCHEMA), possibly
fewer than asked for: a range is rebuilt only when all of it comes back."""


@dataclass
class PartitionReport:
    partition: int
    acknowledged_end: int
    damages: list[Damage] = field(default_factory=list)
    recorded: str | None = None  # the damage marker, if any process recorded one


@dataclass(frozen=True)
class Repaired:
    damage: Damage
    rebuilt: bool  # True: every event came back from the archive; False: offsets lost
    event_ids: tuple[str, ...]  # ids the archive knows in the range (all of them if rebuilt)

    def describe(self) -> str:
        what = "rebuilt from the archive" if self.rebuilt else "LOST"
        ids = ""
        if not self.rebuilt:
            ids = f"; ids known from the archive: {len(self.event_ids)}" + (
                f" ({', '.join(self.event_ids[:10])}{', ...' if len(self.event_ids) > 10 else ''})"
                if self.event_ids
                else " (none: these events were never processed)"
            )
        return f"{self.damage.describe()}: {self.damage.lost_offsets} offsets {what}{ids}"


def _durable_ends(log_dir: Path) -> list[int]:
    data = (log_dir / "durable").read_bytes()
    return list(struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8]))


def _partitions(log_dir: Path) -> int:
    try:
        return int(json.loads((log_dir / "meta.json").read_text())["partitions"])
    except FileNotFoundError:
        raise FileNotFoundError(f"no log at {log_dir} (no meta.json)") from None


def _scans(log_dir: Path, partition: int, acknowledged: int) -> list[SegmentScan]:
    return scan_partition(log_dir / f"p{partition:04d}", partition, acknowledged)


def check_log(log_dir: Path, *, floors: Mapping[int, int] | None = None) -> list[PartitionReport]:
    """Every frame of every partition, crc-checked. ``floors``: offsets known to be
    acknowledged beyond the durable file (e.g. the store's committed offsets)."""
    ends = _durable_ends(log_dir)
    recorded = recorded_damage(log_dir)
    reports = []
    for partition in range(_partitions(log_dir)):
        acknowledged = max(ends[partition], (floors or {}).get(partition, 0))
        report = PartitionReport(partition, acknowledged, recorded=recorded.get(partition))
        for scan in _scans(log_dir, partition, acknowledged):
            report.damages.extend(scan.damages)
        reports.append(report)
    return reports


def _lock(log_dir: Path) -> int:
    fd = os.open(log_dir / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"the log at {log_dir} is open by a writer: stop `clickagg serve` first"
        ) from None
    return fd


def _frame(base: int, count: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), frame_crc(base, count, payload), base, count) + payload


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def repair_log(
    log_dir: Path, *, rebuild: Rebuild, floors: Mapping[int, int] | None = None
) -> list[Repaired]:
    """Repair every damaged range (see the module docstring); returns what was done."""
    lock = _lock(log_dir)
    try:
        ends = _durable_ends(log_dir)
        done: list[Repaired] = []
        for partition in range(_partitions(log_dir)):
            acknowledged = max(ends[partition], (floors or {}).get(partition, 0))
            pdir = log_dir / f"p{partition:04d}"
            if not list_segments(pdir) and acknowledged > 0:
                seg_path(pdir, 0).touch()  # every segment gone: start one to hold the gap
            for scan in _scans(log_dir, partition, acknowledged):
                if scan.damages or scan.torn_tail:
                    done.extend(_rewrite(log_dir, partition, scan, rebuild))
            clear_damage(log_dir, partition)
        return done
    finally:
        os.close(lock)


def _rewrite(log_dir: Path, partition: int, scan: SegmentScan, rebuild: Rebuild) -> list[Repaired]:
    pdir = log_dir / f"p{partition:04d}"
    path = seg_path(pdir, scan.base)
    data = path.read_bytes()
    quarantine = log_dir / QUARANTINE_DIR
    quarantine.mkdir(exist_ok=True)
    pieces: list[bytes] = []
    done: list[Repaired] = []
    cursor = 0
    for damage in sorted(scan.damages, key=lambda d: (d.byte_start, d.offset_start)):
        if damage.offset_end <= damage.offset_start:
            raise RuntimeError(f"cannot repair: {damage.describe()}")
        pieces.append(data[cursor : damage.byte_start])
        if damage.byte_end > damage.byte_start:
            name = f"p{partition:04d}-{scan.base:020d}-{damage.byte_start}-{damage.byte_end}.bin"
            _fsync_write(quarantine / name, data[damage.byte_start : damage.byte_end])
        events = rebuild(partition, damage.offset_start, damage.offset_end)
        ids = tuple(str(i) for i in events.column("event_id").to_pylist())
        if events.num_rows == damage.lost_offsets:
            payload = columns.encode_table(events)
            pieces.append(_frame(damage.offset_start, damage.lost_offsets, payload))
            done.append(Repaired(damage, True, ids))
        else:
            pieces.append(lost_frame(damage.offset_start, damage.lost_offsets, damage.describe()))
            done.append(Repaired(damage, False, ids))
        cursor = damage.byte_end
    end = len(data)
    if scan.torn_tail is not None:  # never acknowledged: quarantined, not kept
        lo, end = scan.torn_tail
        name = f"p{partition:04d}-{scan.base:020d}-{lo}-{end}.torn.bin"
        _fsync_write(quarantine / name, data[lo:end])
        end = lo
    pieces.append(data[cursor:end])
    tmp = path.with_suffix(".repair")
    _fsync_write(tmp, b"".join(pieces))
    os.replace(tmp, path)
    fd = os.open(pdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return done
