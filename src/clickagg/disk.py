"""Free space on the data dir's filesystem, and what running out of it looks like.

The log (API process) and the aggregate store, the archive and the snapshots (worker
process) share one filesystem. Left alone, the log takes every byte there is: the store
then fails its commit or its checkpoint, the archive its flush, and acknowledged events
wait uncounted while the log goes on taking whatever the worker frees. So ingest keeps a
reserve: it refuses new events (503) once free space falls below :func:`reserve_for`, and
the worker, which is not held to the reserve, has that room to count and archive what
the log already holds, compact and checkpoint. Should the disk fill anyway (another
program, a reserve too small), the worker backs off and retries instead of crashing
(``runtime/worker.py``): every write it makes is fenced by offsets and re-derivable.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clickagg.config import Settings

log = logging.getLogger(__name__)

OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How engines word it when they report it in a message rather than an errno: the OS's own
# strerror (DuckDB: 'Could not write file "...": No space left on device'), and numpy's
# "Not enough free space to write N bytes" (np.save into a full filesystem).
_MESSAGES = ("no space left on device", "disk quota exceeded", "not enough free space")


class OutOfSpaceError(OSError):
    """A write failed for want of space, as an engine reported it in its own terms.

    Adapters raise it (``errno.ENOSPC``) from such errors, so that one errno check,
    :func:`is_out_of_space`, recognises a full disk whichever component hit it."""


def mentions_out_of_space(text: str) -> bool:
    """Whether an engine's error message says the disk (or a quota) is full."""
    lowered = text.lower()
    return any(message in lowered for message in _MESSAGES)


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from or while handling, is an OSError
    with ENOSPC or EDQUOT: a failure that more free space would have avoided (and that
    freeing space will end), as opposed to a bug or damaged data."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in OUT_OF_SPACE_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class Space:
    free_bytes: int  # what an unprivileged writer may still use (f_bavail)
    total_bytes: int


def space(path: Path) -> Space:
    """Free and total bytes of the filesystem holding ``path`` (one statvfs call)."""
    stat = os.statvfs(path)
    return Space(stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize)


def reserve_for(total_bytes: int, *, reserve_bytes: int, reserve_percent: int) -> int:
    """The free space ingest leaves to the worker on a filesystem of ``total_bytes``:
    ``reserve_bytes``, but no more than ``reserve_percent`` of the filesystem, so that a
    small disk is not mostly reserve (what the worker needs scales with the traffic, and a
    small disk carries little). 0 turns the reserve off."""
    return min(reserve_bytes, total_bytes * reserve_percent // 100)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class DiskReserve:
    """Ingest's side of the reserve: is free space below it right now?

    Asked for every append, so it looks (one ``statvfs``) at most every ``interval_s``
    and answers from its last look in between: appends pay a clock read, not a system
    call. A filesystem that cannot be looked at refuses nothing (the log's own ENOSPC
    handling still answers 503 on a really full disk)."""

    def __init__(
        self,
        path: Path,
        *,
        reserve_bytes: int,
        reserve_percent: int,
        interval_s: float = 0.1,
        look: Callable[[Path], Space] = space,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.reserve_bytes = reserve_bytes
        self.reserve_percent = reserve_percent
        self.interval_s = interval_s
        self._look = look
        self._now = now
        self._looked_at: float | None = None
        self._reason: str | None = None
        self.last: Space | None = None  # the last look
        self.reserve: int = 0  # the reserve in bytes at the last look

    @classmethod
    def for_settings(cls, settings: Settings) -> DiskReserve:
        """The reserve of ``settings``, on the filesystem of its data dir."""
        return cls(
            settings.data_dir,
            reserve_bytes=settings.disk_reserve_bytes,
            reserve_percent=settings.disk_reserve_percent,
        )

    def shortage(self) -> str | None:
        """Why ingest must refuse events (free space below the reserve), else None."""
        now = self._now()
        if self._looked_at is None or now - self._looked_at >= self.interval_s:
            self._looked_at = now
            self._refresh()
        return self._reason

    def _refresh(self) -> None:
        try:
            seen = self._look(self.path)
        except OSError as exc:
            log.warning("cannot read free space of %s: %s", self.path, exc)
            self.last, self._reason = None, None
            return
        self.last = seen
        self.reserve = reserve_for(
            seen.total_bytes,
            reserve_bytes=self.reserve_bytes,
            reserve_percent=self.reserve_percent,
        )
        if seen.free_bytes >= self.reserve:
            self._reason = None
        else:
            self._reason = (
                f"disk space low: {_mib(seen.free_bytes)} free on the filesystem of "
                f"{self.path}, below the reserve of {_mib(self.reserve)} kept for the "
                "aggregate store, the archive and compaction"
            )
