"""Group commit: many concurrent requests share one append + fsync.

Requests queue their columns; one background task takes everything queued, writes one
frame per partition, syncs once, and only then answers every request in the group. While
a sync runs, the next group gathers, so fsync cost is paid per group, not per request.

Every ingest route appends here, so the disk reserve is enforced here too: once free space
on the data dir's filesystem falls below it (``clickagg.disk``), appends are refused before
anything is queued, and the worker keeps that room to count what the log already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from dataclasses import dataclass, field

from clickagg.core import columns
from clickagg.core.columns import EventColumns
from clickagg.disk import DiskReserve
from clickagg.log.base import LogFullError, LogWriter, PartitionDamagedError


class Backpressure(RuntimeError):
    """More is waiting for the log than it may hold: the client should retry later."""


class DiskReserveError(LogFullError):
    """Free space is below the reserve kept for the worker: the log takes no more for now
    (a LogFullError: nothing of the request was acknowledged; retry later)."""


@dataclass
class _Group:
    by_partition: dict[int, list[EventColumns]] = field(default_factory=dict)
    events: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


def merge_columns(parts: list[EventColumns]) -> EventColumns:
    """Concatenate the column batches of several requests: no per-event work."""
    return columns.merge(parts)


class GroupCommitter:
    def __init__(
        self,
        writer: LogWriter,
        *,
        max_pending_events: int,
        reserve: DiskReserve | None = None,
    ) -> None:
        self.writer = writer
        self.max_pending_events = max_pending_events
        self.reserve = reserve
        self._group = _Group()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.unavailable_reason: str | None = None
        # Held while a thread uses the writer, so maintenance (retention) never overlaps it.
        self.writer_lock = asyncio.Lock()

    def disk_pressure(self) -> str | None:
        """Why appends are refused for want of disk space, if they are (a cached look at
        free space: at most one statvfs per ``DiskReserve.interval_s``)."""
        return None if self.reserve is None else self.reserve.shortage()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def append(self, by_partition: dict[int, EventColumns]) -> None:
        """Return once every event given is durable; raise Backpressure, LogFullError
        (DiskReserveError when free space is below the reserve) or PartitionDamagedError
        (a partition lost acknowledged data and awaits repair)."""
        count = sum(c.count for c in by_partition.values())
        if count == 0:
            return
        shortage = self.disk_pressure()
        if shortage is not None:
            raise DiskReserveError(errno.ENOSPC, shortage)
        damaged = self.writer.damaged()
        for partition in by_partition:
            if partition in damaged:  # refused before queueing: nothing half-appended
                raise PartitionDamagedError(
                    errno.EIO,
                    f"partition {partition} takes no new events until `clickagg log repair` "
                    f"has run: {damaged[partition]}",
                )
        if self._group.events + self._in_flight + count > self.max_pending_events:
            raise Backpressure(
                f"{self._group.events + self._in_flight} events are waiting for the log"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        group = self._group
        for partition, cols in by_partition.items():
            group.by_partition.setdefault(partition, []).append(cols)
        group.events += count
        group.waiters.append(waiter)
        self._wakeup.set()
        await waiter

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            group, self._group = self._group, _Group()
            if not group.waiters:
                continue
            self._in_flight = group.events
            try:
                async with self.writer_lock:
                    await asyncio.to_thread(self._write, group)
            except Exception as exc:
                if isinstance(exc, LogFullError):
                    self.unavailable_reason = str(exc)
                for waiter in group.waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
            else:
                self.unavailable_reason = None
                for waiter in group.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            finally:
                self._in_flight = 0

    def _write(self, group: _Group) -> None:
        for partition, parts in sorted(group.by_partition.items()):
            merged = merge_columns(parts)
            self.writer.append(partition, columns.encode(merged), merged.count)
        self.writer.sync()
