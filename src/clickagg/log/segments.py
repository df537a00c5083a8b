"""The embedded log: segment files on local disk, no services to run.

Layout: ``<log_dir>/p0000/00000000000000000000.seg`` per partition, named by the base offset
of their first frame; ``meta.json`` fixes the partition count; ``durable`` holds one
little-endian uint64 per partition, the durable end, shared through mmap with readers in
other processes. Readers trust only that file for how far to read: bytes beyond it may be
unsynced, torn, or about to be rolled back.

A frame is a ``<IIQI`` header (payload length, crc32, base offset, count) then the payload;
the crc covers base offset, count and payload, so a torn or misplaced tail is detected.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clickagg.log.base import (
    CorruptFrameError,
    Frame,
    LogFullError,
    PartitionDamagedError,
    Recovery,
)
from clickagg.log.integrity import (
    HEADER,
    frame_crc,
    list_segments,
    record_damage,
    recorded_damage,
    scan_segment,
    seg_path,
)

if TYPE_CHECKING:
    from clickagg.config import Settings

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # the durable file is little-endian, read via native casts
    raise ImportError("clickagg.log.segments needs a little-endian host")

_HSIZE = HEADER.size
_READ_CHUNK = 1 << 20
_FIRST_CHUNK = 64 << 10
_FLUSH_BYTES = 1 << 20
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_meta(log_dir: Path) -> int | None:
    try:
        meta = json.loads((log_dir / "meta.json").read_text())
    except FileNotFoundError:
        return None
    if meta.get("format") != 1:
        raise ValueError(f"{log_dir}/meta.json: unknown log format {meta.get('format')!r}")
    return int(meta["partitions"])


def _map_durable(path: Path, partitions: int, writable: bool) -> tuple[mmap.mmap, memoryview]:
    """The writer recreates a missing or short file as zeros: ends older than any data,
    which recovery then takes from the segments (see ``SegmentLogWriter._recover``)."""
    size = 8 * partitions
    flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
    with open(os.open(path, flags, 0o644), "r+b" if writable else "rb") as f:
        if writable and os.fstat(f.fileno()).st_size < size:
            log.warning("log recovery: %s is short or missing: ends taken from the data", path)
            f.truncate(size)
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    # Native 8-byte aligned element stores: readers never see a half-updated end.
    return mm, memoryview(mm).cast("Q")


@dataclass
class _Partition:
    index: int
    pdir: Path
    segs: list[int]
    fd: int
    base: int  # active segment
    size: int  # bytes in the active segment, buffered ones included
    next: int
    synced_base: int
    synced_size: int
    synced_next: int
    buf: bytearray = field(default_factory=bytearray)
    retired: list[int] = field(default_factory=list)  # fds a running sync may still use
    dirty: bool = False
    new_entry: bool = False


class SegmentLogWriter:
    """The single writer. ``sync`` may run in another thread while appends go on (group
    commit): it fsyncs a snapshot outside the lock. A failure rolls partitions back to their
    last sync so no half frame can become durable later; if that dropped frames some caller
    still waits on, every sync until one that starts afterwards fails too, so nothing lost
    is ever acknowledged, and offsets stay contiguous."""

    @classmethod
    def for_settings(cls, settings: Settings) -> SegmentLogWriter:
        """The writer of a data dir, with the settings' partitions, segments and retention."""
        return cls(
            settings.log_dir,
            settings.partitions,
            segment_bytes=settings.segment_bytes,
            retention_ms=settings.retention_ms,
            retention_bytes=settings.retention_bytes,
        )

    def __init__(
        self,
        log_dir: Path,
        partitions: int,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        retention_ms: int,
        retention_bytes: int,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self._dir = Path(log_dir)
        self.partitions = partitions
        self._segment_bytes = segment_bytes
        self._retention_ms = retention_ms
        self._retention_bytes = retention_bytes
        self._parts: list[_Partition] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # partition state
        self._sync_lock = threading.Lock()  # one sync at a time
        self._lost: OSError | None = None
        self._dead: str | None = None
        self._closed = False
        self.recoveries: list[Recovery] = []
        self._damage: dict[int, str] = {}
        self._damage_checked = 0.0
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._dir / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"another writer has the log at {self._dir} open") from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self._damage = recorded_damage(self._dir)
        self._damage_checked = time.monotonic()

    def _open(self) -> None:
        stored = _read_meta(self._dir)
        if stored is None:
            # The durable file exists before meta.json does, so a reader that finds the
            # log can always map it.
            (self._dir / "durable").write_bytes(bytes(8 * self.partitions))
            tmp = self._dir / "meta.json.tmp"
            tmp.write_text(json.dumps({"partitions": self.partitions, "format": 1}))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self._dir / "meta.json")
        elif stored != self.partitions:
            raise ValueError(
                f"log at {self._dir} has {stored} partitions; cannot open it with {self.partitions}"
            )
        self._map, self._ends = _map_durable(self._dir / "durable", self.partitions, True)
        acknowledged = list(self._ends)  # what readers were last shown: every ack is below
        for p in range(self.partitions):
            self._parts.append(self._recover(p, acknowledged[p]))
        for dirpath in [self._dir, *(st.pdir for st in self._parts)]:
            _fsync_dir(dirpath)
        for st in self._parts:
            self._ends[st.index] = st.next

    def _recover(self, p: int, acknowledged: int) -> _Partition:
        """Only the last segment can hold a torn tail: a roll fsyncs the old segment before
        its successor exists, so every earlier segment is complete. A tail beyond the
        acknowledged end is cut (logged); damage below it is recorded, never cut, and the
        partition takes no new events until repaired, so no offset is ever reused.

        ``acknowledged`` comes from the ``durable`` file, which is never synced itself:
        after a power loss it may be older than the data (every fsynced frame is kept, as
        the scan walks every whole frame; only a damaged range between the stale and the
        true end would pass for a torn tail) or newer than what survived (recorded as
        damage). Whole frames written but never synced before a crash are kept too, so
        the segment is synced before readers are shown them: were they lost to a power
        loss after the worker counted them, their offsets could go to new events."""
        pdir = self._dir / f"p{p:04d}"
        pdir.mkdir(exist_ok=True)
        segs = list_segments(pdir) or [0]
        base = segs[-1]
        path = seg_path(pdir, base)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        scan = scan_segment(path, p, base, acknowledged_end=acknowledged, next_base=None)
        for damage in scan.damages:
            self.recoveries.append(Recovery(p, "damage_found", damage.describe()))
            record_damage(self._dir, p, damage.describe(), by="log writer recovery")
        if scan.damages:  # keep every byte for the repair; append nothing after them
            size, nxt = scan.size, max(scan.end_offset, acknowledged)
        else:
            size, nxt = scan.end, scan.end_offset
            if scan.torn_tail is not None:
                lo, hi = scan.torn_tail
                detail = (
                    f"partition {p}: cut an unacknowledged torn tail, bytes [{lo}, {hi}) of "
                    f"segment {base:020d}.seg after offset {nxt} (durable end {acknowledged})"
                )
                log.warning("log recovery: %s", detail)
                self.recoveries.append(Recovery(p, "torn_tail_truncated", detail))
                os.ftruncate(fd, size)
        os.fsync(fd)
        return _Partition(p, pdir, segs, fd, base, size, nxt, base, size, nxt)

    def damaged(self) -> Mapping[int, str]:
        """Re-read the damage markers at most once a second: a reader in another process
        (the worker) may have found damage the writer's recovery could not see."""
        now = time.monotonic()
        if now - self._damage_checked >= 1.0:
            self._damage = recorded_damage(self._dir)
            self._damage_checked = now
        return self._damage

    def _check(self) -> None:
        if self._dead is not None:
            raise RuntimeError(self._dead)

    def append(self, partition: int, payload: bytes, count: int) -> int:
        if count < 1:
            raise ValueError("a frame holds at least one event")
        with self._lock:
            self._check()
            damaged = self.damaged()
            if partition in damaged:
                raise PartitionDamagedError(
                    errno.EIO, f"partition {partition} is damaged: {damaged[partition]}"
                )
            st = self._parts[partition]
            base = st.next
            n = _HSIZE + len(payload)
            try:
                if st.size > 0 and st.size + n > self._segment_bytes:
                    self._roll(st)
                st.buf += HEADER.pack(len(payload), frame_crc(base, count, payload), base, count)
                st.buf += payload
                st.size += n
                st.next += count
                st.dirty = True
                if len(st.buf) >= _FLUSH_BYTES:
                    self._flush(st)
            except OSError as exc:
                raise self._fail(exc, [st], lost=base != st.synced_next) from exc
        return base

    def _flush(self, st: _Partition) -> None:
        with memoryview(st.buf) as view:
            done = 0
            while done < len(view):
                done += os.write(st.fd, view[done:])
        st.buf.clear()

    def _roll(self, st: _Partition) -> None:
        """Make the old segment whole on disk before its successor exists (see _recover)."""
        self._flush(st)
        os.fdatasync(st.fd)
        path = seg_path(st.pdir, st.next)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        st.retired.append(st.fd)
        st.fd, st.base, st.size = fd, st.next, 0
        st.segs.append(st.next)
        st.new_entry = True

    def sync(self) -> None:
        with self._sync_lock:
            with self._lock:
                self._check()
                if self._lost is not None:  # appended before a failure that dropped frames
                    lost, self._lost = self._lost, None
                    raise self._fail(lost, [st for st in self._parts if st.dirty], lost=False)
                parts = [st for st in self._parts if st.dirty]
                try:
                    for st in parts:
                        self._flush(st)
                except OSError as exc:
                    raise self._fail(exc, parts, lost=False) from exc
                snap = [(st, st.fd, st.base, st.size, st.next, st.new_entry) for st in parts]
                for st in parts:
                    st.dirty = st.new_entry = False
            try:
                self._fsync([fd for _, fd, *_ in snap])
                for st, *_, new_entry in snap:
                    if new_entry:
                        _fsync_dir(st.pdir)
            except OSError as exc:
                with self._lock:
                    dropped = any(st.next != nxt for st, _, _, _, nxt, _ in snap)
                    raise self._fail(exc, parts, lost=dropped) from exc
            with self._lock:
                self._close_retired()
                if self._lost is not None:  # an append failed meanwhile and dropped frames
                    raise self._fail(self._lost, parts, lost=False)
                for st, _, base, size, nxt, _ in snap:
                    st.synced_base, st.synced_size, st.synced_next = base, size, nxt
                    self._ends[st.index] = nxt

    def _fsync(self, fds: list[int]) -> None:
        """In parallel: on a real disk 8 partitions sync in about half the time."""
        if len(fds) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(min(4, self.partitions), "log-fsync")
            list(self._pool.map(os.fdatasync, fds))
        elif fds:
            os.fdatasync(fds[0])

    def _close_retired(self) -> None:
        for st in self._parts:
            for fd in st.retired:
                os.close(fd)
            st.retired.clear()

    def _fail(self, exc: OSError, parts: list[_Partition], *, lost: bool) -> OSError:
        """Roll ``parts`` back to their last sync and return the error to raise. ``lost``:
        frames that callers wait on were dropped, so the next sync must fail as well."""
        if lost:
            self._lost = exc
        try:
            for st in parts:
                self._rollback(st)
        except OSError as err:
            self._dead = f"log writer unusable: rollback failed ({err}) after: {exc}"
            raise
        if isinstance(exc, LogFullError) or exc.errno not in _FULL:
            return exc
        return LogFullError(exc.errno, f"log full: {exc.strerror}", exc.filename)

    def _rollback(self, st: _Partition) -> None:
        st.buf.clear()
        for base in [b for b in st.segs if b > st.synced_base]:
            st.segs.remove(base)
            seg_path(st.pdir, base).unlink(missing_ok=True)
        if st.base != st.synced_base:
            st.retired.append(st.fd)
            st.fd = -1
            st.fd = os.open(seg_path(st.pdir, st.synced_base), os.O_WRONLY | os.O_APPEND)
        os.ftruncate(st.fd, st.synced_size)
        st.base, st.size, st.next = st.synced_base, st.synced_size, st.synced_next
        st.dirty = st.new_entry = False

    def apply_retention(self, partition: int, *, keep_from: int, now_ms: int) -> int:
        """Deletes only a prefix of whole segments, so readers never meet a hole."""
        with self._lock:
            self._check()
            st = self._parts[partition]
            keep_from = min(keep_from, st.synced_next)
            limit = min(st.base, st.synced_base)
            stats = {b: os.stat(seg_path(st.pdir, b)) for b in st.segs if b < limit}
            total = st.size + sum(s.st_size for s in stats.values())
            deleted = 0
            for base, end in zip(list(st.segs), st.segs[1:], strict=False):
                if base >= limit or end > keep_from:
                    break
                old = stats[base].st_mtime_ns // 1_000_000 < now_ms - self._retention_ms
                if not (old or total > self._retention_bytes):
                    break
                seg_path(st.pdir, base).unlink(missing_ok=True)
                st.segs.remove(base)
                total -= stats[base].st_size
                deleted += 1
            return deleted

    def close(self) -> None:
        """Unsynced frames may or may not survive a close; only sync() promises anything."""
        with self._sync_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            self._dead = self._dead or "log writer is closed"
            if self._pool is not None:
                self._pool.shutdown()
            self._close_retired()
            for st in self._parts:
                if st.fd >= 0:
                    os.close(st.fd)
            if hasattr(self, "_map"):
                self._ends.release()
                self._map.close()
            os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> SegmentLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Cursor:
    fd: int
    pos: int
    next: int
    segment: int  # the base offset naming the open segment


class SegmentLogReader:
    """Reads durable frames, possibly from another process than the writer. A per-partition
    cursor makes consecutive reads (``from_offset`` = previous end) cost no rescans; that
    cursor is why one reader must not be shared between threads."""

    def __init__(self, log_dir: Path) -> None:
        self._dir = Path(log_dir)
        stored = _read_meta(self._dir)
        if stored is None:
            raise FileNotFoundError(f"no log at {self._dir} (no meta.json): start a writer first")
        self.partitions = stored
        self._map, self._ends = _map_durable(self._dir / "durable", stored, False)
        self._cursors: dict[int, _Cursor] = {}

    def _pdir(self, partition: int) -> Path:
        if not 0 <= partition < self.partitions:
            raise IndexError(f"partition {partition} out of range 0..{self.partitions - 1}")
        return self._dir / f"p{partition:04d}"

    def durable_end(self, partition: int) -> int:
        self._pdir(partition)
        return int(self._ends[partition])

    def start_offset(self, partition: int) -> int:
        segs = list_segments(self._pdir(partition))
        return segs[0] if segs else 0

    def read(self, partition: int, from_offset: int, max_events: int) -> list[Frame]:
        """A ``from_offset`` older than ``start_offset`` (deleted by retention) reads from
        the oldest stored frame: the caller sees the gap from the first frame's offset."""
        end = self.durable_end(partition)
        if from_offset >= end:
            return []
        cur = self._cursors.get(partition)
        if cur is None or cur.next != from_offset:
            if cur is not None:
                os.close(cur.fd)
                del self._cursors[partition]
            cur = self._seek(partition, from_offset)
            if cur is None:
                return []
            self._cursors[partition] = cur
        frames: list[Frame] = []
        events = 0
        chunk, chunk_pos, want = b"", 0, _FIRST_CHUNK
        while cur.next < end and (not frames or events < max_events):
            rel = cur.pos - chunk_pos
            if rel < 0 or rel + _HSIZE > len(chunk):
                chunk, chunk_pos, rel = os.pread(cur.fd, want, cur.pos), cur.pos, 0
                want = min(2 * want, _READ_CHUNK)
                if len(chunk) < _HSIZE:
                    if not self._next_segment(partition, cur):
                        return self._stop(partition, cur, frames, f"the log ends before {end}")
                    chunk = b""
                    continue
            length, crc, base, count = HEADER.unpack_from(chunk, rel)
            stop = rel + _HSIZE + length
            if stop > len(chunk):
                chunk, chunk_pos = os.pread(cur.fd, max(want, stop - rel), cur.pos), cur.pos
                rel, stop = 0, _HSIZE + length
                if len(chunk) < stop:
                    return self._stop(partition, cur, frames, "a frame runs past the segment's end")
            payload = chunk[rel + _HSIZE : stop]
            if base != cur.next or frame_crc(base, count, payload) != crc:
                return self._stop(partition, cur, frames, "a frame fails its offset or crc check")
            frames.append(Frame(partition, base, count, payload))
            cur.pos += _HSIZE + length
            cur.next += count
            events += count
        return frames

    def report_damage(self, partition: int, detail: str) -> None:
        self._pdir(partition)
        record_damage(self._dir, partition, detail, by="log reader")

    def _stop(self, partition: int, cur: _Cursor, frames: list[Frame], why: str) -> list[Frame]:
        """Hand out the good frames read before the damage; the next read raises."""
        if frames:
            return frames
        raise self._damage(partition, cur, why)

    def _damage(self, partition: int, cur: _Cursor, why: str) -> CorruptFrameError:
        """Record the damage (ingest then stops for the partition) and return the error."""
        if self._cursors.pop(partition, None) is not None:
            os.close(cur.fd)
        detail = (
            f"partition {partition}: offset {cur.next} unreadable ({why}) at byte {cur.pos} "
            f"of the segment holding it; acknowledged events may be lost: run "
            f"`clickagg log check`"
        )
        record_damage(self._dir, partition, detail, by="log reader")
        return CorruptFrameError(partition, cur.next, why)

    def _next_segment(self, partition: int, cur: _Cursor) -> bool:
        """At a segment's end the next frame starts the segment named by its offset, unless
        retention deleted it meanwhile: then go on at the oldest segment left, as read()
        does for offsets below start_offset. Never the open one again: a segment that ends
        before the durable end (data lost) is damage, not a wait."""
        pdir = self._pdir(partition)
        for _ in range(3):
            later = [b for b in list_segments(pdir) if b >= cur.next and b > cur.segment]
            if not later:
                return False
            try:
                fd = os.open(seg_path(pdir, later[0]), os.O_RDONLY)
            except FileNotFoundError:
                continue
            os.close(cur.fd)
            cur.fd, cur.pos, cur.next, cur.segment = fd, 0, later[0], later[0]
            return True
        return False

    def _seek(self, partition: int, from_offset: int) -> _Cursor | None:
        """Find the segment by name, then hop over whole frames reading headers only.
        ``from_offset`` is below the durable end: a log that ends before it lost data."""
        pdir = self._pdir(partition)
        for _ in range(3):  # a segment may vanish under retention between listing and open
            segs = list_segments(pdir)
            if not segs:
                gone = _Cursor(-1, 0, from_offset, from_offset)
                raise self._damage(partition, gone, "every segment of the partition is gone")
            target = max(from_offset, segs[0])
            base = segs[bisect.bisect_right(segs, target) - 1]
            try:
                fd = os.open(seg_path(pdir, base), os.O_RDONLY)
            except FileNotFoundError:
                continue
            cur = _Cursor(fd, 0, base, base)
            while True:
                head = os.pread(cur.fd, _HSIZE, cur.pos)
                if len(head) < _HSIZE:
                    if self._next_segment(partition, cur):
                        continue
                    error = self._damage(partition, cur, "the log ends before the durable end")
                    os.close(cur.fd)
                    raise error
                length, _crc32, fbase, count = HEADER.unpack(head)
                if fbase != cur.next:
                    error = self._damage(partition, cur, "a frame header names the wrong offset")
                    os.close(cur.fd)
                    raise error
                if fbase + count > target:
                    return cur
                cur.pos += _HSIZE + length
                cur.next += count
        return None

    def close(self) -> None:
        for cur in self._cursors.values():
            os.close(cur.fd)
        self._cursors.clear()
        if not self._map.closed:
            self._ends.release()
            self._map.close()

    def __enter__(self) -> SegmentLogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
