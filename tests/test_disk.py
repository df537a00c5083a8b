"""The disk reserve ingest keeps for the worker, and how a full disk is recognised."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from clickagg.config import Settings
from clickagg.disk import (
    DiskReserve,
    OutOfSpaceError,
    Space,
    is_out_of_space,
    mentions_out_of_space,
    reserve_for,
    space,
)

MIB = 2**20
GIB = 2**30


class FakeDisk:
    """What statvfs would say, and how often it was asked; a clock the test moves."""

    def __init__(self, free: int, total: int = 100 * GIB) -> None:
        self.free = free
        self.total = total
        self.looks = 0
        self.now = 0.0
        self.broken = False

    def look(self, path: Path) -> Space:
        self.looks += 1
        if self.broken:
            raise OSError(errno.EIO, "statvfs failed")
        return Space(self.free, self.total)

    def reserve(self, reserve_bytes: int = GIB, reserve_percent: int = 10) -> DiskReserve:
        return DiskReserve(
            Path("/data"),
            reserve_bytes=reserve_bytes,
            reserve_percent=reserve_percent,
            interval_s=0.1,
            look=self.look,
            now=lambda: self.now,
        )


def test_the_reserve_is_the_bytes_but_at_most_the_percent_of_the_filesystem() -> None:
    assert reserve_for(100 * GIB, reserve_bytes=512 * MIB, reserve_percent=10) == 512 * MIB
    assert reserve_for(1 * GIB, reserve_bytes=512 * MIB, reserve_percent=10) == GIB // 10
    assert reserve_for(1 * GIB, reserve_bytes=0, reserve_percent=10) == 0
    assert reserve_for(1 * GIB, reserve_bytes=512 * MIB, reserve_percent=0) == 0
    defaults = Settings()
    assert defaults.disk_reserve_bytes == 512 * MIB and defaults.disk_reserve_percent == 10


def test_a_reserve_percent_beyond_100_is_refused() -> None:
    with pytest.raises(ValueError, match="percent"):
        Settings(disk_reserve_percent=101)


def test_below_the_reserve_ingest_is_refused_with_the_reason() -> None:
    disk = FakeDisk(free=2 * GIB)
    reserve = disk.reserve()
    assert reserve.shortage() is None
    disk.free, disk.now = 300 * MIB, 1.0
    reason = reserve.shortage()
    assert reason is not None
    assert "300.0 MiB free" in reason and "reserve of 1024.0 MiB" in reason
    assert reserve.last == Space(300 * MIB, 100 * GIB) and reserve.reserve == GIB
    disk.free, disk.now = GIB, 2.0  # exactly the reserve is enough
    assert reserve.shortage() is None


def test_free_space_is_looked_at_most_once_per_interval() -> None:
    disk = FakeDisk(free=2 * GIB)
    reserve = disk.reserve()
    for _ in range(1000):  # a burst of appends within one interval: one statvfs
        assert reserve.shortage() is None
    assert disk.looks == 1
    disk.free = 0  # the disk fills between two looks: seen at the next one
    disk.now = 0.05
    assert reserve.shortage() is None and disk.looks == 1
    disk.now = 0.1
    assert reserve.shortage() is not None and disk.looks == 2


def test_a_filesystem_that_cannot_be_looked_at_refuses_nothing() -> None:
    disk = FakeDisk(free=0)
    disk.broken = True
    reserve = disk.reserve()
    assert reserve.shortage() is None and reserve.last is None


def test_a_zero_reserve_never_refuses() -> None:
    disk = FakeDisk(free=0)
    assert disk.reserve(reserve_bytes=0).shortage() is None


def test_the_reserve_reads_the_data_dirs_filesystem(tmp_path: Path) -> None:
    seen = space(tmp_path)
    assert 0 <= seen.free_bytes <= seen.total_bytes
    settings = Settings(data_dir=tmp_path, disk_reserve_bytes=0)
    reserve = DiskReserve.for_settings(settings)
    assert reserve.path == tmp_path and reserve.shortage() is None


def _raised_from(cause: BaseException) -> RuntimeError:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("the archive writer stopped after a failed flush") from exc
    except RuntimeError as outer:
        return outer


def _raised_while_handling(cause: BaseException) -> ValueError:
    try:
        try:
            raise cause
        except BaseException:
            raise ValueError("cleanup failed too")  # noqa: B904 (the point: only a context)
    except ValueError as outer:
        return outer


def test_a_full_disk_is_recognised_by_errno_through_causes() -> None:
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_out_of_space(OutOfSpaceError(errno.ENOSPC, "aggregate store: ..."))
    assert is_out_of_space(_raised_from(OSError(errno.ENOSPC, "No space left on device")))
    assert is_out_of_space(_raised_while_handling(OSError(errno.ENOSPC, "no space")))
    assert not is_out_of_space(OSError(errno.EIO, "Input/output error"))
    assert not is_out_of_space(OSError("Not enough free space to write 24 bytes"))  # no errno
    assert not is_out_of_space(_raised_from(ValueError("a bug")))


def test_engines_messages_about_a_full_disk_are_recognised() -> None:
    assert mentions_out_of_space(
        'TransactionContext Error: Failed to commit: Could not write file "/d/a.duckdb.wal": '
        "No space left on device"
    )
    assert mentions_out_of_space("Not enough free space to write 24000000 bytes after offset 128")
    assert mentions_out_of_space("Disk quota exceeded")
    assert not mentions_out_of_space("Conflict on tuple deletion!")
