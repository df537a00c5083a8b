"""DuckDBStore on a full disk (a small tmpfs): DuckDB's reports of it are OutOfSpaceError,
a commit is whole or absent, and the store works again once space is freed (reopened if
a failed checkpoint invalidated it)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from clickagg.disk import OutOfSpaceError, is_out_of_space
from clickagg.store.duckdb_store import DuckDBStore
from tests.store.test_duckdb_store import T0, Ev, make_commit

DAY_MS = 86_400_000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def leave_free(directory: Path, free: int) -> Path:
    """A ballast file that leaves about ``free`` bytes of the filesystem free."""
    stat = os.statvfs(directory)
    ballast = directory / "ballast"
    ballast.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))
    return ballast


def clicks(store: DuckDBStore) -> int:
    return store.totals(ad_id="ad1", start_ms=T0 - DAY_MS, end_ms=T0 + DAY_MS).clicks


def test_a_commit_on_a_full_disk_is_out_of_space_and_absent(small_disk: Path) -> None:
    store = DuckDBStore(small_disk / "agg.duckdb")
    try:
        store.commit(make_commit(0, 0, 3, [Ev("ad1", T0 + n) for n in range(3)]))
        ballast = leave_free(small_disk, 0)
        events = [Ev("ad1", T0 + n, user=f"u{n}") for n in range(300)]
        with pytest.raises(OutOfSpaceError) as caught:
            store.commit(make_commit(0, 3, 303, events))
        assert is_out_of_space(caught.value)
        ballast.unlink()
        assert store.committed_offsets() == {0: 3}  # rolled back whole
        store.commit(make_commit(0, 3, 303, events))  # the same round, redone
        assert store.committed_offsets() == {0: 303} and clicks(store) == 303
    finally:
        store.close()


def test_a_failed_checkpoint_invalidates_the_store_and_is_out_of_space_too(
    small_disk: Path,
) -> None:
    """DuckDB checkpoints inside COMMIT once the WAL passes a threshold; when that fails
    for want of space the database is invalidated (FatalException) until it is reopened,
    and the commit may or may not be durable. Every error is then an OutOfSpaceError, and
    the reopened store holds the commits that succeeded, plus the failed one whole or not
    at all."""
    path = small_disk / "agg.duckdb"
    store = DuckDBStore(path)
    store.commit(make_commit(0, 0, 1, [Ev("ad1", T0)]))
    store._cursor().execute("SET wal_autocheckpoint = '1KB'")  # checkpoint at every commit
    ballast = leave_free(small_disk, 200 * 1024)
    offset, failed = 1, None
    try:
        for _ in range(50):
            events = [Ev("ad1", T0 + offset + n, user=f"u{offset + n}") for n in range(20)]
            try:
                store.commit(make_commit(0, offset, offset + 20, events))
            except OutOfSpaceError as exc:
                failed = exc
                break
            offset += 20
        assert failed is not None, "the disk never filled"
        assert isinstance(failed.__cause__, duckdb.FatalException), failed
        with pytest.raises(OutOfSpaceError, match="invalidated"):
            store.committed_offsets()
    finally:
        store.close()
    ballast.unlink()
    with DuckDBStore(path) as reopened:
        committed = reopened.committed_offsets()[0]
        assert committed in (offset, offset + 20)
        assert clicks(reopened) == committed
