"""Partition state snapshots on local disk, so a restart replays seconds, not the horizon.

A snapshot is named by the offset it was taken at. It may be ahead of the store's committed
offset (taken, then the commit was lost in a crash): such a snapshot is useless and ignored,
so recovery loads the newest snapshot at or before the committed offset.
"""

from __future__ import annotations

import os
from pathlib import Path

_SUFFIX = ".snap"


class SnapshotStore:
    def __init__(self, directory: Path, *, keep: int = 3) -> None:
        self.directory = directory
        self.keep = keep
        directory.mkdir(parents=True, exist_ok=True)

    def _dir(self, partition: int) -> Path:
        path = self.directory / f"p{partition:04d}"
        path.mkdir(exist_ok=True)
        return path

    def offsets(self, partition: int) -> list[int]:
        return sorted(
            int(p.name.removesuffix(_SUFFIX))
            for p in self._dir(partition).iterdir()
            if p.name.endswith(_SUFFIX)
        )

    def save(self, partition: int, offset: int, data: bytes) -> None:
        """Write atomically (temp file, fsync, rename, fsync dir), then prune old ones. A
        failed write removes its temp file (on a full disk it would keep the disk full)."""
        directory = self._dir(partition)
        final = directory / f"{offset:020d}{_SUFFIX}"
        temp = directory / f".{offset:020d}.tmp"
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        os.replace(temp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in self.offsets(partition)[: -self.keep]:
            (directory / f"{old:020d}{_SUFFIX}").unlink(missing_ok=True)

    def load_at_or_before(self, partition: int, offset: int) -> tuple[int, bytes] | None:
        best = self._best(partition, offset)
        if best is None:
            return None
        return best, (self._dir(partition) / f"{best:020d}{_SUFFIX}").read_bytes()

    def oldest_needed(self, partition: int, committed: int) -> int:
        """The lowest offset a restart may replay from: the log must keep it."""
        best = self._best(partition, committed)
        return 0 if best is None else best

    def _best(self, partition: int, offset: int) -> int | None:
        """The newest snapshot at or before ``offset``."""
        candidates = [o for o in self.offsets(partition) if o <= offset]
        return candidates[-1] if candidates else None
