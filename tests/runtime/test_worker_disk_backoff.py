"""The worker on a full disk: it waits (backing off, logging once) instead of exiting,
retries as soon as space is freed, and then counts and archives every event exactly once."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clickagg.archive.parquet import ParquetArchiveReader, ParquetArchiveWriter
from clickagg.clock import FixedClock
from clickagg.config import Settings
from clickagg.core import columns, ids
from clickagg.disk import Space
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.runtime import worker as process
from clickagg.runtime.worker import Compactor, DiskBackoff
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker, step_all
from tests.conftest import Ev, build_columns

MIB = 2**20
T0 = 1_700_000_000_000
DAY = 86_400_000
FULL = OSError(errno.ENOSPC, "No space left on device")


class FakeTime:
    """A clock that moves only when slept on, and a disk whose free space the test sets."""

    def __init__(self) -> None:
        self.now = 0.0
        self.free = 10 * MIB
        self.freed_at: float | None = None  # the free space grows by 100 MiB then

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def look(self, path: Path) -> Space:
        grown = self.freed_at is not None and self.now >= self.freed_at
        return Space(self.free + (100 * MIB if grown else 0), 1024 * MIB)

    def backoff(self, tmp_path: Path) -> DiskBackoff:
        settings = Settings(data_dir=tmp_path, disk_reserve_bytes=64 * MIB)
        return DiskBackoff(
            settings,
            first_s=0.5,
            max_s=4.0,
            poll_s=0.25,
            look=self.look,
            now=lambda: self.now,
            sleep=self.sleep,
        )


def test_waits_double_up_to_a_cap_and_an_episode_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeTime()
    backoff = clock.backoff(tmp_path)
    waited = []
    with caplog.at_level(logging.INFO, logger=process.__name__):
        for _ in range(6):
            started = clock.now
            backoff.wait(FULL, lambda: False)
            waited.append(clock.now - started)
        assert waited == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
        assert [r.getMessage()[:30] for r in caplog.records if r.levelno >= logging.WARNING] == [
            "out of disk space: counting pa"
        ]
        backoff.succeeded()
        backoff.succeeded()  # no episode any more: nothing to say
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and warnings[1].startswith("disk space is back")
    started = clock.now
    backoff.wait(FULL, lambda: False)
    assert clock.now - started == 0.5  # a new episode starts over


def test_a_wait_ends_as_soon_as_a_reserves_worth_of_space_is_freed(tmp_path: Path) -> None:
    clock = FakeTime()
    backoff = clock.backoff(tmp_path)
    for _ in range(5):
        backoff.wait(FULL, lambda: False)
    clock.freed_at = clock.now + 1.0
    started = clock.now
    backoff.wait(FULL, lambda: False)  # would be 4 s
    assert clock.now - started == 1.0


def test_a_wait_ends_when_the_worker_is_stopped(tmp_path: Path) -> None:
    clock = FakeTime()
    backoff = clock.backoff(tmp_path)
    for _ in range(5):
        backoff.wait(FULL, lambda: False)
    started = clock.now
    backoff.wait(FULL, lambda: clock.now - started >= 0.5)
    assert clock.now - started == 0.5


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    with open(path, "wb", buffering=0) as handle:
        for chunk in (MIB, 4096):
            block = b"\0" * chunk
            while True:
                try:
                    handle.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break


def append(writer: SegmentLogWriter, events: list[Ev], partitions: int) -> dict[int, int]:
    routed: dict[int, list[Ev]] = {}
    for ev in events:
        routed.setdefault(ids.partition_for_id(ev.event_type, ev.event_id, partitions), []).append(
            ev
        )
    for partition, part in routed.items():
        cols = build_columns(part)
        writer.append(partition, columns.encode(cols), cols.count)
    writer.sync()
    return {p: len(part) for p, part in routed.items()}


def test_a_failed_compaction_waits_instead_of_retrying_at_every_poll(small_disk: Path) -> None:
    writer = SegmentLogWriter(small_disk / "log", 1, retention_ms=DAY, retention_bytes=2**40)
    reader = SegmentLogReader(small_disk / "log")
    store = DuckDBStore(small_disk / "agg.duckdb")
    archive = ParquetArchiveWriter(small_disk / "archive")
    compactor = Compactor(store, interval_ms=0, max_delta_rows=1, poll_s=0.01)
    attempts = 0
    compact = store.compact

    def counted_compact(max_seq: int | None = None) -> object:
        nonlocal attempts
        attempts += 1
        return compact(max_seq)

    store.compact = counted_compact  # type: ignore[method-assign]
    try:
        worker = PartitionWorker(
            0,
            reader=reader,
            store=store,
            archive=archive,
            snapshots=SnapshotStore(small_disk / "snap"),
            settings=Settings(data_dir=small_disk),
            clock=FixedClock(T0),
        )
        append(writer, [Ev(f"c{n}", f"ad{n % 7}", T0 + n * 1000) for n in range(200)], 1)
        assert step_all([worker], store) == 200
        ballast = small_disk / "ballast"
        fill(ballast)
        compactor.start()
        assert compactor.out_of_space.wait(30)
        failed_at = time.monotonic()
        time.sleep(0.3)  # 30 polls with deltas waiting: no new attempt before the retry time
        allowed = 1 + int((time.monotonic() - failed_at) / process.COMPACT_RETRY_FIRST_S)
        assert 1 <= attempts <= allowed and compactor.compactions == 0
        ballast.unlink()
        deadline = time.monotonic() + 30
        while compactor.compactions == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert compactor.compactions == 1 and store.pending_delta_rows() == 0
        total = sum(
            store.totals(ad_id=f"ad{a}", start_ms=T0 - DAY, end_ms=T0 + DAY).clicks
            for a in range(7)
        )
        assert total == 200
    finally:
        compactor.stop()
        archive.close()
        store.close()
        reader.close()
        writer.close()


class _Seen(logging.Handler):
    """Sets an event once a record with ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@pytest.mark.parametrize("opened_before", [False, True], ids=["new-data-dir", "opened-before"])
def test_the_worker_process_waits_out_a_full_disk_then_counts_everything(
    small_disk: Path, opened_before: bool
) -> None:
    """``process.run`` itself, in this process, on a full disk: it neither raises nor
    exits while the disk is full (a new data dir fails to create its store; one opened
    before fails its first round), and once the ballast is gone it counts and archives
    every event exactly once, then stops when idle."""
    settings = Settings(data_dir=small_disk / "data", partitions=2, archive_flush_interval_ms=0)
    writer = SegmentLogWriter.for_settings(settings)
    now_ms = int(time.time() * 1000)
    events = [Ev(f"e{n}", f"ad{n % 5}", now_ms - n) for n in range(3000)]
    ends = append(writer, events, settings.partitions)
    writer.close()
    if opened_before:  # the store and the archive exist: the session opens, rounds fail
        DuckDBStore(settings.store_path).close()
        ParquetArchiveWriter(settings.archive_dir).close()
    ballast = small_disk / "ballast"
    fill(ballast)

    seen = _Seen("out of disk space")
    logger = logging.getLogger(process.__name__)
    logger.addHandler(seen)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    def free_space_once_it_backs_off() -> None:
        if seen.event.wait(60):
            time.sleep(1.0)  # a retry or two while still full
            ballast.unlink()

    freer = threading.Thread(target=free_space_once_it_backs_off, daemon=True)
    watchdog = threading.Timer(90, os.kill, (os.getpid(), signal.SIGTERM))  # run's stop
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    interval = sys.getswitchinterval()
    freer.start()
    watchdog.start()
    try:
        process.run(settings, max_idle_loops=200)
    finally:
        watchdog.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        sys.setswitchinterval(interval)
        logger.removeHandler(seen)
        logger.setLevel(old_level)
        freer.join(10)
    assert seen.event.is_set(), "the worker never ran out of space"
    assert not ballast.exists()
    with DuckDBStore(settings.store_path) as store:
        assert store.committed_offsets() == ends
        total = sum(
            store.totals(ad_id=f"ad{a}", start_ms=now_ms - DAY, end_ms=now_ms + DAY).clicks
            for a in range(5)
        )
        assert total == len(events)
    archive = ParquetArchiveReader(settings.archive_dir)
    try:
        assert archive.archived_offsets() == ends
        fates = archive.decisions(start_ms=now_ms - DAY, end_ms=now_ms + DAY)
        assert fates.num_rows == len(events)
        assert set(fates["status"].to_pylist()) == {"counted"}
    finally:
        archive.close()
