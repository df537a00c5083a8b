"""Snapshots: atomic files named by offset, newest at or before an offset, old ones pruned."""

from __future__ import annotations

from pathlib import Path

from clickagg.worker.snapshots import SnapshotStore


def test_save_load_prune(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    assert store.load_at_or_before(0, 100) is None
    for offset in (10, 20, 30):
        store.save(0, offset, f"state@{offset}".encode())
    assert store.offsets(0) == [20, 30]
    assert store.load_at_or_before(0, 25) == (20, b"state@20")
    assert store.load_at_or_before(0, 10) is None
    assert store.oldest_needed(0, 29) == 20
    assert store.oldest_needed(1, 29) == 0
    assert not list((tmp_path / "p0000").glob(".*.tmp"))
