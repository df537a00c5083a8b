"""The embedded archive: Parquet files under the data dir, published through a manifest.

Layout of ``<data_dir>/archive``::

    _manifest/000000000042.json          one per flush: its offset ranges and its files
    hour=2025-01-15T10/000000000042.parquet
                                         the flush's decisions of that event hour, in the
                                         order the stream decided them, zstd
    _index/000000000001-000000000042.npy id index run of flushes 1..42

Any engine reads one event hour as ``hour=…/*.parquet`` (the manifest says which files are
published). Publishing a flush: its data files and index run are written and fsynced under
names no manifest lists yet; then its manifest appears atomically, as a hard link of a
fsynced temporary file, which fails if the name exists. Readers trust only what a manifest
lists: a crash leaves nothing partial or doubled visible, and the next writer deletes the
unpublished flush's files. One writer at a time: it holds ``_manifest/.writer.lock``
(flock, released by the OS if the process dies). Every ``checkpoint_every`` flushes the
writer folds the manifests into ``<seq>.checkpoint.json`` and deletes the ones it covers,
so the directory, and a reader's start, stay small however long the archive runs.

Audit lookups: an index run holds, for every event, the high 64 bits of its (type, id)
fingerprint, where its row is (flush << 32 | row in the file) and its event hour, sorted by
fingerprint, memory-mapped by readers (24 bytes per event). A lookup binary-searches every
run and reads the one row group holding each match (row groups have a fixed size). Runs
are merged in tiers of ``merge_fan_in`` in the background, so there are O(log n) of them.

The same machinery keeps the keyed stage's corrections (``clickagg.core.corrections``,
fenced by keyed partition and offset): an :class:`ArchiveLayout` says which table an
archive holds, how its rows are placed in the log and what a lookup reads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from clickagg.archive.base import ArchiveFencedError, ArchiveGapError, Fate
from clickagg.core import ids
from clickagg.core.corrections import CORRECTION_SCHEMA
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.windows import HOUR_MS
from clickagg.disk import OutOfSpaceError, mentions_out_of_space

log = logging.getLogger(__name__)

MANIFEST_DIR: Final = "_manifest"
_MAINTENANCE_EVERY_S: Final = 5.0
_READ_ATTEMPTS: Final = 3
INDEX_DIR: Final = "_index"
ROW_GROUP_ROWS: Final = 16_384  # small enough that a lookup reads little, big enough to scan
_ROW_MASK: Final = (1 << 32) - 1
_CHECKPOINT_SUFFIX: Final = ".checkpoint.json"
# Dictionary encoding pays for these low-cardinality columns only; ids, users and IPs
# would just fall back to plain encoding after the dictionary grew (wasted work).
_DICTIONARY_COLUMNS: Final = [
    "event_type",
    "status",
    "reason",
    "ad_id",
    "advertiser_id",
    "campaign_id",
    "user_agent",
    "country",
    "device",
    "browser",
]
_MAX_MERGED_RUN_ROWS: Final = 64_000_000
_FATE_COLUMNS: Final = [
    "event_id",
    "event_type",
    "partition",
    "offset",
    "status",
    "reason",
    "ad_id",
    "ts_ms",
]


@dataclass(frozen=True)
class ArchiveLayout:
    """What one archive holds. Every layout has ``ts_ms`` (files are split by event hour)
    and ``fp_high`` (the id index)."""

    schema: pa.Schema
    dictionary_columns: tuple[str, ...]
    partition_column: str  # the log partition its manifest ranges are of
    # The log offset of each row: a redo that overlaps the archive drops the rows below
    # the archived offset by it. None: a row is not tied to one offset of its range (a
    # correction is made by a later record than its own), so an appended range must
    # continue the archive exactly or lie wholly below it (a redo, dropped whole).
    offset_column: str | None
    lookup_columns: tuple[str, ...]  # what an id lookup reads of each match
    sort_columns: tuple[str, ...]  # the order of a range scan's rows


DECISIONS: Final = ArchiveLayout(
    schema=DECISION_SCHEMA,
    dictionary_columns=tuple(_DICTIONARY_COLUMNS),
    partition_column="partition",
    offset_column="offset",
    lookup_columns=tuple(_FATE_COLUMNS),
    sort_columns=("partition", "offset"),
)
CORRECTIONS: Final = ArchiveLayout(
    schema=CORRECTION_SCHEMA,
    dictionary_columns=("ad_id", "rule_id", "reason"),
    partition_column="keyed_partition",
    offset_column=None,
    lookup_columns=tuple(n for n in CORRECTION_SCHEMA.names if n != "fp_high"),
    sort_columns=("keyed_partition", "keyed_offset"),
)


def _seq_name(seq: int) -> str:
    return f"{seq:012d}"


def hour_dir(hour_ms: int) -> str:
    """The directory of one event hour (UTC), e.g. ``hour=2025-01-15T10``."""
    return datetime.fromtimestamp(hour_ms / 1000, UTC).strftime("hour=%Y-%m-%dT%H")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(final: Path, write: Any) -> None:
    """Write through ``write(handle)`` into a temporary file, fsync, rename into place.

    A write that fails leaves no temporary file behind (on a full disk it would hold the
    space the retry needs); numpy's report of a full disk, an OSError without an errno,
    is raised as OutOfSpaceError, so the worker knows to back off."""
    temp = final.with_name(f".{final.name}.tmp")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno is None and mentions_out_of_space(str(exc)):
            raise OutOfSpaceError(errno.ENOSPC, f"archive: {exc}", str(final)) from exc
        raise
    os.replace(temp, final)


def _lock_writer(path: Path) -> int:
    """Hold an exclusive lock for the writer's lifetime (released by close, or by the OS
    when the process dies): a second writer fails at once instead of racing the first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ArchiveFencedError(f"another writer holds {path.parent.parent}") from None
    return fd


class _ManifestView:
    """What the published manifests say, loaded incrementally (manifests never change).

    A checkpoint (``<seq>.checkpoint.json``) holds the whole state up to its seq; once it
    is published the writer deletes the manifests it covers, so the directory stays small
    and a reader starts from the newest checkpoint plus the manifests after it.

    A compaction's manifest adds one file that holds the rows of several published files
    of an hour (its ``sources``: the flushes that wrote them) and retires those files: from
    then on they are not listed, and the writer deletes them after the grace period.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.last_seq = 0
        self.offsets: dict[int, int] = {}
        self.by_hour: dict[int, list[str]] = {}  # event hour -> published files, relative
        self.live: set[str] = set()  # the files by_hour lists
        self.rows: dict[str, int] = {}  # file -> rows, where a manifest said
        self.sources: dict[str, list[int]] = {}  # compacted file -> the flushes it holds
        self.retired: dict[str, tuple[int, int]] = {}  # file -> (event hour, retired at ms)

    def refresh(self) -> None:
        for _attempt in range(10):
            try:
                self._refresh()
                return
            except FileNotFoundError:
                continue  # a checkpoint superseded what was listed: list again
        raise RuntimeError("archive manifests kept changing while being read")

    def _refresh(self) -> None:
        manifest_dir = self.directory / MANIFEST_DIR
        try:
            names = os.listdir(manifest_dir)
        except FileNotFoundError:
            return
        checkpoints = sorted(
            int(n.removesuffix(_CHECKPOINT_SUFFIX))
            for n in names
            if n.endswith(_CHECKPOINT_SUFFIX) and not n.startswith(".")
        )
        if checkpoints and checkpoints[-1] > self.last_seq:
            name = f"{_seq_name(checkpoints[-1])}{_CHECKPOINT_SUFFIX}"
            self._load_checkpoint(json.loads((manifest_dir / name).read_bytes()))
        seqs = sorted(
            int(n.removesuffix(".json")) for n in names if n.endswith(".json") and n[:-5].isdigit()
        )
        for seq in seqs:
            if seq > self.last_seq:
                body = json.loads((manifest_dir / f"{_seq_name(seq)}.json").read_bytes())
                self.add(seq, body)

    def _load_checkpoint(self, body: dict[str, Any]) -> None:
        self.offsets = {int(p): int(end) for p, end in body["offsets"].items()}
        self.by_hour = {int(hour): list(paths) for hour, paths in body["by_hour"].items()}
        self.live = {path for paths in self.by_hour.values() for path in paths}
        # Checkpoints of an older clickagg have no rows, sources or retired files.
        self.rows = {path: int(rows) for path, rows in body.get("rows", {}).items()}
        self.sources = {path: list(seqs) for path, seqs in body.get("sources", {}).items()}
        self.retired = {
            path: (int(hour), int(at)) for path, (hour, at) in body.get("retired", {}).items()
        }
        self.last_seq = int(body["seq"])

    def add(self, seq: int, body: dict[str, Any]) -> None:
        for key, (_, hi) in body["ranges"].items():
            self.offsets[int(key)] = hi
        for entry in body["files"]:
            path = entry["path"]
            self.by_hour.setdefault(int(entry["hour_ms"]), []).append(path)
            self.live.add(path)
            self.rows[path] = int(entry["rows"])
            if "sources" in entry:
                self.sources[path] = [int(s) for s in entry["sources"]]
        gone: dict[int, set[str]] = {}
        for entry in body.get("retired", []):
            hour = int(entry["hour_ms"])
            gone.setdefault(hour, set()).add(entry["path"])
            self.retired[entry["path"]] = (hour, int(body["created_ms"]))
        for hour, paths in gone.items():
            self.by_hour[hour] = [p for p in self.by_hour.get(hour, []) if p not in paths]
            self.live -= paths
        self.last_seq = seq

    def forget(self, path: str) -> None:
        """A retired file was deleted: nothing refers to it any more."""
        self.retired.pop(path, None)
        self.rows.pop(path, None)
        self.sources.pop(path, None)

    def checkpoint(self) -> bytes:
        body = {
            "seq": self.last_seq,
            "offsets": {str(p): end for p, end in sorted(self.offsets.items())},
            "by_hour": {str(hour): paths for hour, paths in sorted(self.by_hour.items())},
            "rows": self.rows,
            "sources": self.sources,
            "retired": {path: list(where) for path, where in self.retired.items()},
        }
        return json.dumps(body).encode()

    def paths(self, hour_ms: int) -> list[Path]:
        return [self.directory / path for path in self.by_hour.get(hour_ms, [])]

    def hours(self, first_ms: int, end_ms: int) -> list[int]:
        """The hours from ``first_ms`` (an hour's start) up to ``end_ms`` that may hold
        files, ascending: the range's, or when it spans more hours than the listing holds
        (a range from 0, say), the listed hours within it."""
        if (end_ms - first_ms) // HOUR_MS <= len(self.by_hour):
            return list(range(first_ms, end_ms, HOUR_MS))
        return sorted(hour for hour in self.by_hour if first_ms <= hour < end_ms)

    def flushes_of(self, relative: str) -> list[int]:
        """The flushes whose rows a published (or retired) file holds: its own flush, or
        for a compacted file, the flushes of the files it replaced."""
        found = self.sources.get(relative)
        return found if found is not None else [_seq_of(relative)]

    def flushes(self, hour_ms: int) -> list[int]:
        return sorted({s for path in self.by_hour.get(hour_ms, []) for s in self.flushes_of(path)})

    def file_keys(self) -> npt.NDArray[np.uint64]:
        """``event hour << 32 | seq`` of every published file and every retired one not
        deleted yet: the index entries that may still be read."""
        keys = [
            (hour_ms // HOUR_MS) << 32 | _seq_of(path)
            for hour_ms, paths in self.by_hour.items()
            for path in paths
        ]
        keys += [(hour // HOUR_MS) << 32 | _seq_of(p) for p, (hour, _) in self.retired.items()]
        return np.unique(np.array(keys, dtype=np.uint64))


def _seq_of(relative: str) -> int:
    """The seq in a data file's name (``hour=…/000000000042.parquet``)."""
    return int(relative.rsplit("/", 1)[-1].split(".", 1)[0])


def _index_runs(index_dir: Path) -> list[tuple[int, int, Path]]:
    """Published index runs as (first seq, last seq, path), runs covered by a wider run
    (inputs of a merge that has been published) left out."""
    try:
        names = os.listdir(index_dir)
    except FileNotFoundError:
        return []
    runs = []
    for name in names:
        if name.startswith(".") or not name.endswith(".npy"):
            continue
        lo, hi = name.removesuffix(".npy").split("-")
        runs.append((int(lo), int(hi), index_dir / name))
    runs.sort(key=lambda run: (run[0], -run[1]))
    kept: list[tuple[int, int, Path]] = []
    for run in runs:
        if kept and run[1] <= kept[-1][1]:
            continue  # covered by the wider run before it
        kept.append(run)
    return kept


def _covered_runs(index_dir: Path) -> list[Path]:
    kept = {path for _, _, path in _index_runs(index_dir)}
    return [
        index_dir / name
        for name in os.listdir(index_dir)
        if name.endswith(".npy") and not name.startswith(".") and index_dir / name not in kept
    ]


class ParquetArchiveWriter:
    """The single writer of an archive directory (the worker process)."""

    def __init__(
        self,
        directory: Path,
        *,
        flush_events: int = 200_000,
        flush_interval_ms: int = 2_000,
        merge_fan_in: int = 8,
        checkpoint_every: int = 256,
        layout: ArchiveLayout = DECISIONS,
        compact_files: int = 8,
        compact_after_ms: int = 10 * 60_000,
        compact_grace_ms: int = HOUR_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.layout = layout
        self.flush_events = flush_events
        self.flush_interval_ms = flush_interval_ms
        self.merge_fan_in = merge_fan_in
        self.checkpoint_every = checkpoint_every
        # Compaction (see :meth:`compact`): 0 files turns it off.
        self.compact_files = compact_files
        self.compact_after_ms = compact_after_ms
        self.compact_grace_ms = compact_grace_ms
        # A merged file holds at most what a flush may: the disk reserve covers it.
        self.compact_max_rows = 4 * flush_events
        self._clock = clock
        self._next_maintenance = 0.0
        # A test's stand-in for a crash: called with each step's name (see _compact).
        self._step: Callable[[str], None] = lambda step: None
        for sub in (MANIFEST_DIR, INDEX_DIR):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_writer(directory / MANIFEST_DIR / ".writer.lock")
        view = _ManifestView(directory)
        view.refresh()
        self._view = view  # updated by the flush thread only, after each publish
        self._seq = view.last_seq
        self._remove_unpublished()
        self._next: dict[int, int] = dict(view.offsets)
        self._buffer: list[pa.Table] = []
        self._buffer_ranges: dict[int, tuple[int, int]] = {}
        self._buffer_rows = 0
        self._buffer_since_ms: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")
        self._pending: Future[Any] | None = None
        # A failed flush leaves a hole in what is published: nothing after it may be
        # published (a manifest's range end is the archived offset), so the writer stops.
        self._failed: BaseException | None = None

    # -- the writer protocol -------------------------------------------------------------

    def next_offset(self, partition: int) -> int:
        return self._next.get(partition, 0)

    def published_offset(self, partition: int) -> int:
        return self._view.offsets.get(partition, 0)

    def append(self, decisions: pa.Table, ranges: Mapping[int, tuple[int, int]]) -> None:
        self._check_not_failed()
        fresh: dict[int, tuple[int, int]] = {}
        for partition, (lo, hi) in ranges.items():
            expected = self.next_offset(partition)
            if lo > expected:
                raise ArchiveGapError(
                    f"partition {partition}: decisions from offset {lo}, but the archive "
                    f"ends at {expected}"
                )
            if hi > expected:
                if lo < expected and self.layout.offset_column is None:
                    raise ArchiveGapError(
                        f"partition {partition}: rows of offsets [{lo}, {hi}) overlap the "
                        f"archive's end {expected}, and its rows cannot be split by offset"
                    )
                fresh[partition] = (expected, hi)
        if not fresh:
            return
        if any(lo < self.next_offset(p) for p, (lo, _) in ranges.items()):
            decisions = _rows_from(decisions, self._next, self.layout, fresh)
        for partition, (lo, hi) in fresh.items():
            self._next[partition] = hi
            first = self._buffer_ranges.get(partition, (lo, hi))[0]
            self._buffer_ranges[partition] = (first, hi)
        if decisions.num_rows:
            self._buffer.append(decisions)
            self._buffer_rows += decisions.num_rows
        if self._buffer_since_ms is None:
            self._buffer_since_ms = time.monotonic() * 1000

    def maybe_flush(self) -> None:
        """Also starts the archive's maintenance (compaction, deleting retired files) in
        the background now and then, when no flush is due or under way."""
        self._collect()
        now_ms = time.monotonic() * 1000
        waited = now_ms - (self._buffer_since_ms or now_ms)
        due = bool(self._buffer_ranges) and (
            self._buffer_rows >= self.flush_events or waited >= self.flush_interval_ms
        )
        if not due:
            self._maybe_maintain(now_ms / 1000)
            return
        if self._pending is not None and self._buffer_rows < 4 * self.flush_events:
            return  # one flush at a time; let the buffer grow a little meanwhile
        self._start_flush()

    def compact(self) -> int:
        """Compact every event hour that qualifies now, and delete the retired files whose
        grace period is over; the number of files merged. What the background maintenance
        does a piece at a time; tests and tools call it to have it done."""
        self._wait()
        self._check_not_failed()
        merged = 0
        while (done := self._maintain()) > 0:
            merged += done
        return merged

    def flush(self) -> None:
        if self._buffer_ranges:
            self._start_flush()
        self._wait()

    def close(self) -> None:
        """Publish what is buffered and stop; after a failed flush, just stop (the next
        writer resumes from what is published, and the worker re-derives the rest)."""
        try:
            if self._failed is None:
                self.flush()
        finally:
            self._executor.shutdown(wait=True)
            self._unlock()

    def abandon(self) -> None:
        """Stop without publishing what is buffered, as a crash would (a flush already
        under way completes). Crash tests use it."""
        self._executor.shutdown(wait=True)
        self._buffer, self._buffer_ranges, self._buffer_rows = [], {}, 0
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- flushing -------------------------------------------------------------------------

    def _collect(self) -> None:
        """Take the result of a finished background flush (raising its error)."""
        if self._pending is not None and self._pending.done():
            self._wait()

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except BaseException as exc:
            self._failed = exc
            raise

    def _check_not_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError(
                "the archive writer stopped after a failed flush; a new writer resumes "
                "from what is published"
            ) from self._failed

    def _maybe_maintain(self, now_s: float) -> None:
        if self.compact_files <= 0 or self._pending is not None:
            return
        if now_s < self._next_maintenance:
            return
        self._next_maintenance = now_s + _MAINTENANCE_EVERY_S
        self._pending = self._executor.submit(self._maintain)

    def _start_flush(self) -> None:
        self._wait()
        self._check_not_failed()
        self._seq += 1
        table = pa.concat_tables(self._buffer) if self._buffer else self.layout.schema.empty_table()
        ranges = dict(self._buffer_ranges)
        self._buffer, self._buffer_ranges, self._buffer_rows = [], {}, 0
        self._buffer_since_ms = None
        self._pending = self._executor.submit(self._publish, self._seq, table, ranges)

    def _publish(self, seq: int, table: pa.Table, ranges: dict[int, tuple[int, int]]) -> None:
        """Write one flush: data files, index run, then the manifest that publishes them."""
        files = []
        index_parts = []
        touched = {self.directory / INDEX_DIR}
        for hour_ms, part in _split_by_hour(table):
            relative = f"{hour_dir(hour_ms)}/{_seq_name(seq)}.parquet"
            path = self.directory / relative
            self._write_file(path, part)
            index_parts.append(_index_entries(part, seq, hour_ms))
            touched.add(path.parent)
            files.append({"path": relative, "hour_ms": hour_ms, "rows": part.num_rows})
        run = _sorted_run(index_parts)
        _write_durably(
            self.directory / INDEX_DIR / f"{_seq_name(seq)}-{_seq_name(seq)}.npy",
            lambda handle: np.save(handle, run),
        )
        for directory in touched:
            _fsync_dir(directory)
        manifest = {
            "seq": seq,
            "ranges": {str(p): [lo, hi] for p, (lo, hi) in sorted(ranges.items())},
            "files": files,
            "rows": table.num_rows,
            "created_ms": int(time.time() * 1000),
        }
        self._publish_manifest(seq, json.dumps(manifest, indent=1).encode())
        self._view.add(seq, manifest)
        if seq % self.checkpoint_every == 0:
            self._checkpoint()
        try:
            self._merge_index_runs()
        except OSError as exc:  # a merge is an optimization: lookups work without it
            log.warning("archive index merge failed: %s", exc)

    def _publish_manifest(self, seq: int, body: bytes) -> None:
        manifest_dir = self.directory / MANIFEST_DIR
        temp = manifest_dir / f".{_seq_name(seq)}.json.tmp"
        with open(temp, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, manifest_dir / f"{_seq_name(seq)}.json")
        except FileExistsError:
            raise ArchiveFencedError(
                f"archive flush {seq} was published by another writer"
            ) from None
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(manifest_dir)

    def _checkpoint(self) -> None:
        """Publish the whole manifest state up to the last flush, then delete the manifests
        and checkpoints it supersedes (readers re-list when one vanishes under them)."""
        manifest_dir = self.directory / MANIFEST_DIR
        seq = self._view.last_seq
        _write_durably(
            manifest_dir / f"{_seq_name(seq)}{_CHECKPOINT_SUFFIX}",
            lambda h: h.write(self._view.checkpoint()),
        )
        _fsync_dir(manifest_dir)
        keep = f"{_seq_name(seq)}{_CHECKPOINT_SUFFIX}"
        for name in os.listdir(manifest_dir):
            stem = name.split(".")[0]
            if name != keep and stem.isdigit() and int(stem) <= seq:
                (manifest_dir / name).unlink(missing_ok=True)

    def _remove_unpublished(self) -> None:
        """Delete what a crashed flush wrote but never published (seq beyond the last
        manifest), and index runs a published merge has superseded."""
        for path in self.directory.glob("hour=*/*"):
            name = path.name.lstrip(".").split(".")[0]
            if not name.isdigit() or int(name) > self._seq or path.name.startswith("."):
                path.unlink(missing_ok=True)
        index_dir = self.directory / INDEX_DIR
        for path in index_dir.iterdir():
            unpublished = path.name.startswith(".") or (
                int(path.name.removesuffix(".npy").split("-")[1]) > self._seq
            )
            if unpublished:
                path.unlink(missing_ok=True)
        for path in _covered_runs(index_dir):
            path.unlink(missing_ok=True)
        for path in (self.directory / MANIFEST_DIR).glob(".*.tmp"):
            path.unlink(missing_ok=True)

    # -- compaction -----------------------------------------------------------------------

    def _maintain(self) -> int:
        """One piece of maintenance (on the archive thread, between flushes): delete the
        retired files past their grace, then compact one group of small files; how many
        files it merged (0: nothing to compact)."""
        try:
            self._delete_retired()
            chosen = self._compaction_candidate()
        except OSError as exc:  # maintenance is an optimization: the archive is whole
            log.warning("archive maintenance failed: %s", exc)
            return 0
        if chosen is None:
            return 0
        hour_ms, paths = chosen
        return len(paths) if self._compact(hour_ms, paths) else 0

    def _compaction_candidate(self) -> tuple[int, list[str]] | None:
        """The oldest event hour, settled (``compact_after`` past its end), with a run of
        ``compact_files`` consecutive files that together hold at most
        ``compact_max_rows``: that hour and that run (the first such, in flush order)."""
        if self.compact_files <= 0:
            return None
        settled = self._clock() * 1000 - self.compact_after_ms
        for hour_ms in sorted(self._view.by_hour):
            paths = self._view.by_hour[hour_ms]
            if hour_ms + HOUR_MS > settled or len(paths) < self.compact_files:
                continue
            run: list[str] = []
            total = 0
            for path in sorted(paths, key=_seq_of):
                rows = self._rows(path)
                if total + rows > self.compact_max_rows:
                    if len(run) >= self.compact_files:
                        return hour_ms, run
                    run, total = [], 0
                    if rows > self.compact_max_rows:
                        continue  # big enough on its own
                run.append(path)
                total += rows
            if len(run) >= self.compact_files:
                return hour_ms, run
        return None

    def _rows(self, relative: str) -> int:
        rows = self._view.rows.get(relative)
        if rows is None:  # listed by an older clickagg's checkpoint: ask the file
            rows = pq.ParquetFile(self.directory / relative).metadata.num_rows
            self._view.rows[relative] = rows
        return rows

    def _compact(self, hour_ms: int, paths: list[str]) -> bool:
        """Replace ``paths`` (published files of one event hour) by one file, in steps:

        1. read their rows and sort them as the layout orders a scan;
        2. write the merged file and its index run under the next seq, fsynced, as a flush
           would (a crash before step 3 leaves them unpublished: the next writer deletes
           them, and the small files stay published);
        3. publish one manifest that adds the merged file and retires ``paths``: readers
           that refresh from then on see the merged file instead, each row once; the
           retired files stay readable for ``compact_grace`` (readers that listed them);
        4. later, past the grace, delete them (:meth:`_delete_retired`; a crash before
           that leaves them retired, and the next writer deletes them).

        False if it failed before step 3 (nothing changed)."""
        seq = self._seq + 1
        relative = f"{hour_dir(hour_ms)}/{_seq_name(seq)}.parquet"
        path = self.directory / relative
        run_path = self.directory / INDEX_DIR / f"{_seq_name(seq)}-{_seq_name(seq)}.npy"
        try:
            table = pa.concat_tables(
                [pq.read_table(self.directory / p, schema=self.layout.schema) for p in paths]
            )
            table = table.sort_by([(name, "ascending") for name in self.layout.sort_columns])
            self._step("read")
            self._write_file(path, table)
            self._step("written")
            run = _sorted_run([_index_entries(table, seq, hour_ms)])
            _write_durably(run_path, lambda handle: np.save(handle, run))
            _fsync_dir(path.parent)
            _fsync_dir(run_path.parent)
            self._step("indexed")
        except Exception as exc:
            # Nothing is published: take the files back and carry on without compacting
            # (an optimization); a writer that cannot delete them stops, as after a failed
            # flush, so that no later flush reuses the seq over leftovers.
            try:
                path.unlink(missing_ok=True)
                run_path.unlink(missing_ok=True)
            except OSError:
                raise exc from None
            log.warning("archive compaction of %s failed: %s", hour_dir(hour_ms), exc)
            return False
        sources = sorted({s for p in paths for s in self._view.flushes_of(p)})
        manifest = {
            "seq": seq,
            "ranges": {},
            "files": [
                {"path": relative, "hour_ms": hour_ms, "rows": table.num_rows, "sources": sources}
            ],
            "retired": [{"path": p, "hour_ms": hour_ms} for p in paths],
            "rows": 0,
            "created_ms": int(self._clock() * 1000),
        }
        try:
            self._seq = seq
            self._publish_manifest(seq, json.dumps(manifest, indent=1).encode())
            self._step("published")
            self._view.add(seq, manifest)
            if seq % self.checkpoint_every == 0:
                self._checkpoint()
        except BaseException as exc:
            self._failed = exc  # published or not, this writer can no longer tell
            raise
        try:
            self._merge_index_runs()
        except OSError as exc:
            log.warning("archive index merge failed: %s", exc)
        self._delete_retired()
        return True

    def _delete_retired(self) -> None:
        """Delete the retired files whose grace period is over."""
        now_ms = self._clock() * 1000
        due = [
            path
            for path, (_, retired_ms) in self._view.retired.items()
            if now_ms - retired_ms >= self.compact_grace_ms
        ]
        for path in due:
            (self.directory / path).unlink(missing_ok=True)
            self._step("deleted")
            self._view.forget(path)

    def _write_file(self, path: Path, table: pa.Table) -> None:
        path.parent.mkdir(exist_ok=True)
        _write_durably(
            path,
            lambda handle: pq.write_table(
                table,
                handle,
                compression="zstd",
                row_group_size=ROW_GROUP_ROWS,
                use_dictionary=list(self.layout.dictionary_columns),
            ),
        )

    def _merge_index_runs(self) -> None:
        """Merge ``merge_fan_in`` consecutive runs of one size tier into one run."""
        index_dir = self.directory / INDEX_DIR
        runs = _index_runs(index_dir)
        sizes = [_run_rows(path) for _, _, path in runs]
        tiers = [self._tier(rows) for rows in sizes]
        fan_in = self.merge_fan_in
        for start in range(len(runs) - fan_in + 1):
            window = range(start, start + fan_in)
            if len({tiers[i] for i in window}) != 1:
                continue
            if sum(sizes[i] for i in window) > _MAX_MERGED_RUN_ROWS:
                continue
            chosen = [runs[i] for i in window]
            merged = np.concatenate([np.load(path) for _, _, path in chosen], axis=1)
            # Entries of files that compaction retired and deleted are read by no one.
            places = (merged[2] << np.uint64(32)) | (merged[1] >> np.uint64(32))
            merged = merged[:, np.isin(places, self._view.file_keys())]
            order = np.argsort(merged[0], kind="stable")
            merged = np.ascontiguousarray(merged[:, order])
            name = f"{_seq_name(chosen[0][0])}-{_seq_name(chosen[-1][1])}.npy"
            _write_durably(index_dir / name, lambda handle, run=merged: np.save(handle, run))
            _fsync_dir(index_dir)
            for _, _, path in chosen:
                path.unlink(missing_ok=True)
            return

    def _tier(self, rows: int) -> int:
        base = max(self.flush_events, 1)
        return int(math.log(max(rows, base) / base, self.merge_fan_in))


def _rows_from(
    decisions: pa.Table,
    next_offsets: Mapping[int, int],
    layout: ArchiveLayout = DECISIONS,
    fresh: Mapping[int, object] | None = None,
) -> pa.Table:
    """Rows at or beyond their partition's next offset (a redo overlaps the archive); for
    a layout without row offsets, the rows of the ``fresh`` partitions (the others' ranges
    were wholly archived; partial overlaps were refused)."""
    partitions = decisions[layout.partition_column].to_numpy()
    if layout.offset_column is None:
        return decisions.filter(pa.array(np.isin(partitions, list(fresh or {}))))
    size = int(partitions.max()) + 1 if len(partitions) else 0
    floor = np.array([next_offsets.get(p, 0) for p in range(size)], dtype=np.int64)
    keep = decisions[layout.offset_column].to_numpy() >= floor[partitions]
    return decisions.filter(pa.array(keep))


def _split_by_hour(table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """(event hour, its rows) in hour order; rows keep their (partition, offset) order.

    Most flushes hold one event hour: then the table is the hour's, no copy. A few hours
    are a filter each, a sequential copy; a take of the whole table in hour order gathered
    every string column row by row instead (300 ms of a 400,000-event flush's 700, one hour
    or two). Many hours (old, late events) are one sorted take again, not a pass each."""
    ts = table["ts_ms"].to_numpy()
    hours = ts - ts % HOUR_MS
    if not len(hours):
        return
    if bool((hours == hours[0]).all()):
        yield int(hours[0]), table
        return
    distinct = np.unique(hours)
    if len(distinct) <= _FILTERED_HOURS:
        for hour in distinct.tolist():
            yield int(hour), table.filter(pa.array(hours == hour))
        return
    order = np.argsort(hours, kind="stable")
    ordered = table.take(pa.array(order))
    sorted_hours = hours[order]
    bounds = np.flatnonzero(np.diff(sorted_hours)) + 1
    starts = [0, *bounds.tolist()]
    ends = [*bounds.tolist(), len(sorted_hours)]
    for start, end in zip(starts, ends, strict=True):
        yield int(sorted_hours[start]), ordered.slice(start, end - start)


_FILTERED_HOURS: Final = 4


def _index_entries(part: pa.Table, seq: int, hour_ms: int) -> npt.NDArray[np.uint64]:
    """Rows: fingerprint high halves; flush << 32 | row in the file; the event hour."""
    count = part.num_rows
    return np.stack(
        [
            part["fp_high"].to_numpy().astype(np.uint64),
            (np.uint64(seq) << np.uint64(32)) | np.arange(count, dtype=np.uint64),
            np.full(count, hour_ms // HOUR_MS, dtype=np.uint64),
        ]
    )


def _sorted_run(parts: list[npt.NDArray[np.uint64]]) -> npt.NDArray[np.uint64]:
    entries = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.uint64)
    order = np.argsort(entries[0], kind="stable")
    return np.ascontiguousarray(entries[:, order])


def _run_rows(path: Path) -> int:
    try:
        run = np.load(path, mmap_mode="r")
    except (FileNotFoundError, ValueError):
        return 0
    return int(run.shape[1])


class ParquetArchiveReader:
    """Read side of an archive directory; any number of processes, read-only."""

    def __init__(self, directory: Path, *, layout: ArchiveLayout = DECISIONS) -> None:
        self.directory = directory
        self.layout = layout
        self._view = _ManifestView(directory)
        self._runs: dict[Path, npt.NDArray[np.uint64]] = {}
        self._lock = threading.Lock()

    def archived_offsets(self) -> dict[int, int]:
        with self._lock:
            self._view.refresh()
            return dict(self._view.offsets)

    def fates(self, event_id: str) -> list[Fate]:
        found: dict[tuple[int, int], Fate] = {}
        for values in self.lookup(event_id):
            fate = Fate(**values)
            found[(fate.partition, fate.offset)] = fate
        return [found[key] for key in sorted(found)]

    def lookup(self, event_id: str) -> list[dict[str, Any]]:
        """The layout's ``lookup_columns`` of every published row about ``event_id``, in
        the order they were published."""
        for _attempt in range(_READ_ATTEMPTS - 1):
            try:
                return self._lookup(event_id)
            except FileNotFoundError:
                continue  # compacted and deleted under a stale listing: look again
        return self._lookup(event_id)

    def _lookup(self, event_id: str) -> list[dict[str, Any]]:
        with self._lock:
            self._view.refresh()
            found = []
            for seq, row, hour_ms in sorted(self._locate(event_id)):
                values = self._read_row(seq, row, hour_ms)
                if values is not None and values["event_id"] == event_id:
                    found.append(values)
        return found

    def decisions(
        self, *, start_ms: int, end_ms: int, statuses: tuple[str, ...] | None = None
    ) -> pa.Table:
        for _attempt in range(_READ_ATTEMPTS - 1):
            try:
                return self._decisions(start_ms, end_ms, statuses)
            except FileNotFoundError:
                continue  # compacted and deleted under a stale listing: list again
        return self._decisions(start_ms, end_ms, statuses)

    def _decisions(self, start_ms: int, end_ms: int, statuses: tuple[str, ...] | None) -> pa.Table:
        with self._lock:
            self._view.refresh()
            first = start_ms - start_ms % HOUR_MS
            paths = [
                str(path)
                for hour in self._view.hours(first, end_ms)
                for path in self._view.paths(hour)
            ]
        schema = self.layout.schema
        if not paths:
            return schema.empty_table()
        condition = (ds.field("ts_ms") >= start_ms) & (ds.field("ts_ms") < end_ms)
        if statuses is not None:
            condition &= ds.field("status").isin(list(statuses))
        dataset = ds.dataset(paths, format="parquet", schema=schema)
        table = dataset.to_table(filter=condition)
        return table.sort_by([(name, "ascending") for name in self.layout.sort_columns])

    def event_hours(self) -> list[int]:
        """The event hours that have archived decisions, ascending."""
        with self._lock:
            self._view.refresh()
            return sorted(self._view.by_hour)

    def files(self, start_ms: int, end_ms: int) -> list[Path]:
        """The published Parquet files of event hours overlapping [start_ms, end_ms): what
        a batch engine (DuckDB, Spark) reads directly. A compaction may retire them later;
        they stay readable for the writer's ``compact_grace`` after that."""
        with self._lock:
            self._view.refresh()
            first = start_ms - start_ms % HOUR_MS
            return [
                path for hour in self._view.hours(first, end_ms) for path in self._view.paths(hour)
            ]

    def flushes(self, hour_ms: int) -> list[int]:
        """The flushes whose decisions of the event hour are published, ascending: what
        the hour holds, whichever files hold it (compaction merges files, not flushes)."""
        with self._lock:
            self._view.refresh()
            return self._view.flushes(hour_ms)

    def flushes_of(self, files: list[Path]) -> list[int]:
        """The flushes whose decisions these files (as :meth:`files` listed them) hold,
        ascending. A file retired so long ago that this reader no longer knows what it
        replaced counts as its own seq."""
        with self._lock:
            return sorted(
                {
                    seq
                    for path in files
                    for seq in self._view.flushes_of(path.relative_to(self.directory).as_posix())
                }
            )

    def decisions_at(self, partition: int, start: int, end: int) -> pa.Table:
        """Scans every published file (a log repair's question, not a hot path)."""
        for _attempt in range(_READ_ATTEMPTS - 1):
            try:
                return self._decisions_at(partition, start, end)
            except FileNotFoundError:
                continue  # compacted and deleted under a stale listing: list again
        return self._decisions_at(partition, start, end)

    def _decisions_at(self, partition: int, start: int, end: int) -> pa.Table:
        with self._lock:
            self._view.refresh()
            paths = [str(path) for hour in self._view.by_hour for path in self._view.paths(hour)]
        if not paths:
            return DECISION_SCHEMA.empty_table()
        condition = (
            (ds.field("partition") == partition)
            & (ds.field("offset") >= start)
            & (ds.field("offset") < end)
        )
        dataset = ds.dataset(paths, format="parquet", schema=DECISION_SCHEMA)
        return dataset.to_table(filter=condition).sort_by("offset")

    def close(self) -> None:
        with self._lock:
            self._runs.clear()

    # -- lookup ---------------------------------------------------------------------------

    def _locate(self, event_id: str) -> set[tuple[int, int, int]]:
        """(flush, row in file, event hour) of every indexed event whose fingerprint matches
        the id as a click or as an impression."""
        wanted = [
            np.uint64(ids.fingerprint(code, event_id)[0]) for code in range(len(ids.EVENT_TYPES))
        ]
        found: set[tuple[int, int, int]] = set()
        for run in self._load_runs():
            keys = run[0]
            for fp in wanted:
                lo = int(np.searchsorted(keys, fp, side="left"))
                hi = int(np.searchsorted(keys, fp, side="right"))
                for where, hour in zip(run[1][lo:hi].tolist(), run[2][lo:hi].tolist(), strict=True):
                    found.add((where >> 32, where & _ROW_MASK, hour * HOUR_MS))
        return found

    def _load_runs(self) -> list[npt.NDArray[np.uint64]]:
        for _attempt in range(5):
            runs = _index_runs(self.directory / INDEX_DIR)
            try:
                for _, _, path in runs:
                    if path not in self._runs:
                        self._runs[path] = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                continue  # merged away between the listing and the open: list again
            live = {path for _, _, path in runs}
            for path in [p for p in self._runs if p not in live]:
                del self._runs[path]
            return [self._runs[path] for _, _, path in runs]
        raise RuntimeError("archive index runs kept changing while being opened")

    def _read_row(self, seq: int, row: int, hour_ms: int) -> dict[str, Any] | None:
        relative = f"{hour_dir(hour_ms)}/{_seq_name(seq)}.parquet"
        if relative not in self._view.live:
            return None  # not published (yet, or ever), or retired by a compaction
        path = self.directory / relative
        group = pq.ParquetFile(path).read_row_group(
            row // ROW_GROUP_ROWS, columns=list(self.layout.lookup_columns)
        )
        [values] = group.slice(row % ROW_GROUP_ROWS, 1).to_pylist()
        return dict(values)


# -- a billing period's id index, for the batch layer ------------------------------------------

COPY_KEY_COLUMNS: Final = ["fp_high", "fp_low", "event_type", "partition", "offset", "ts_ms"]
"""What decides which copy of an event is the first: its id, its place in the log and its
event time (which billing period it is in)."""
_COPY_KEY_SCHEMA: Final = pa.schema([DECISION_SCHEMA.field(name) for name in COPY_KEY_COLUMNS])


def _hour_of_dir(name: str) -> int | None:
    try:
        day = datetime.strptime(f"{name}+0000", "hour=%Y-%m-%dT%H%z")
    except ValueError:
        return None
    return int(day.timestamp() * 1000)


def _map_runs(index_dir: Path) -> list[tuple[int, int, npt.NDArray[np.uint64]]]:
    """The published index runs, memory-mapped, as (first seq, last seq, run)."""
    for _attempt in range(5):
        try:
            return [
                (lo, hi, np.load(path, mmap_mode="r")) for lo, hi, path in _index_runs(index_dir)
            ]
        except FileNotFoundError:
            continue  # merged away between the listing and the open: list again
    raise RuntimeError("archive index runs kept changing while being opened")


class PeriodIndex:
    """A set of published archive files (what :meth:`ParquetArchiveReader.files` listed) and
    the archive's id index: which of them hold an hour's events, and where else in them the
    same fingerprints occur. It lets the batch layer select an hour's first copies by reading
    that hour and the few copies elsewhere, instead of every file of the billing period."""

    def __init__(
        self, directory: Path, files: Mapping[tuple[int, int], Path], runs: list[Any]
    ) -> None:
        self.directory = directory
        self._files = dict(files)  # (flush seq, event hour) -> path
        self._runs: list[npt.NDArray[np.uint64]] = runs

    @classmethod
    def over(cls, files: list[Path]) -> PeriodIndex | None:
        """The index over ``files`` if they are published files of one archive whose index
        covers every one of them; else None (files of another origin: no index to use)."""
        if not files:
            return None
        directory = files[0].parent.parent
        placed: dict[tuple[int, int], Path] = {}
        for path in files:
            hour_ms = _hour_of_dir(path.parent.name)
            if path.parent.parent != directory or hour_ms is None or not path.stem.isdigit():
                return None
            placed[(int(path.stem), hour_ms)] = path
        index_dir = directory / INDEX_DIR
        if not (directory / MANIFEST_DIR).is_dir() or not index_dir.is_dir():
            return None
        runs = _map_runs(index_dir)
        bounds = np.array([(lo, hi) for lo, hi, _ in runs], dtype=np.int64).reshape(-1, 2)
        seqs = np.unique(np.array([seq for seq, _ in placed], dtype=np.int64))
        # Runs are disjoint and sorted by first seq: the one that may hold each file's seq.
        which = np.searchsorted(bounds[:, 0], seqs, side="right") - 1
        if (which < 0).any() or (bounds[which, 1] < seqs).any():
            return None  # a file the index does not cover (yet): it cannot be answered for
        return cls(directory, placed, [run for _, _, run in runs])

    def files_of(self, start_ms: int, end_ms: int) -> list[Path]:
        """The files of the event hours in [start_ms, end_ms) (their rows are all there)."""
        return [path for (_, hour), path in self._files.items() if start_ms <= hour < end_ms]

    def copies_elsewhere(
        self,
        fp_high: npt.NDArray[np.uint64],
        inside: tuple[int, int],
        within: tuple[int, int],
    ) -> pa.Table:
        """The :data:`COPY_KEY_COLUMNS` of every row of the files in event hours of
        ``within`` but outside ``inside`` (both [start, end) in ms, on whole hours) whose
        fingerprint's high half is one of ``fp_high``: the candidates for an earlier copy of
        an event of ``inside`` (same high half; the caller compares the whole key)."""
        wanted = np.unique(np.asarray(fp_high, dtype=np.uint64))
        hour_lo, hour_hi = (t // HOUR_MS for t in within)
        skip_lo, skip_hi = (t // HOUR_MS for t in inside)
        places, rows = [], []  # (event hour, flush seq) and row in that file, per match
        for run in self._runs:
            keys = run[0]
            first = np.searchsorted(keys, wanted, side="left")
            counts = np.searchsorted(keys, wanted, side="right") - first
            total = int(counts.sum())
            if not total:
                continue
            # Every matching position: each range [first, first + count) laid end to end.
            ends = np.cumsum(counts)
            positions = np.repeat(first - (ends - counts), counts) + np.arange(total)
            hours = np.asarray(run[2][positions])
            keep = (hours >= hour_lo) & (hours < hour_hi) & ((hours < skip_lo) | (hours >= skip_hi))
            where = np.asarray(run[1][positions[keep]])
            places.append((hours[keep] << np.uint64(32)) | (where >> np.uint64(32)))
            rows.append(where & np.uint64(_ROW_MASK))
        place = np.concatenate(places) if places else np.zeros(0, dtype=np.uint64)
        if not len(place):
            return _COPY_KEY_SCHEMA.empty_table()
        row = np.concatenate(rows)
        order = np.lexsort((row, place))  # by file, then row
        place, row = place[order], row[order]
        cuts = np.flatnonzero(np.diff(place)) + 1
        parts = []
        for chunk_place, chunk_rows in zip(
            place[np.r_[0, cuts]].tolist(),
            np.split(row, cuts),
            strict=True,
        ):
            hour, seq = chunk_place >> 32, chunk_place & _ROW_MASK
            path = self._files.get((seq, hour * HOUR_MS))
            if path is not None:  # not among the files: not asked about
                parts.append(_rows_of(path, np.unique(chunk_rows)).cast(_COPY_KEY_SCHEMA))
        return pa.concat_tables(parts) if parts else _COPY_KEY_SCHEMA.empty_table()

    def close(self) -> None:
        self._runs = []


def _rows_of(path: Path, rows: npt.NDArray[np.uint64]) -> pa.Table:
    """The :data:`COPY_KEY_COLUMNS` of these rows of one file (sorted, unique), reading only
    the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    wanted = rows.astype(np.int64)
    groups = np.searchsorted(starts, wanted, side="right") - 1
    chosen = np.unique(groups)
    read_starts = np.cumsum([0, *(sizes[g] for g in chosen.tolist())])
    # A row's place in the concatenation of the chosen groups.
    places = read_starts[np.searchsorted(chosen, groups)] + (wanted - starts[groups])
    table = parquet.read_row_groups(chosen.tolist(), columns=COPY_KEY_COLUMNS)
    return table.take(pa.array(places))
