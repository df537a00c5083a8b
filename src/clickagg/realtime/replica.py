"""The API process's replica of the recent minutes and hours, kept by the worker's feed
(``clickagg.realtime.feed``): recent queries answered in the API process, off the stream's
GIL.

It answers only while it follows a live feed, from its first snapshot until the connection
breaks or a round does not continue its offsets, and only ranges it holds whole. Otherwise
:attr:`recent` is None and the caller asks the worker as before (which, while the worker
is down, answers 503). So the replica never serves counts that the worker would not have
served, only sooner. After a break it reconnects, with a short backoff, and starts over
from a new snapshot (a new worker process is a new feed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Literal

from clickagg.core.windows import DAY_MS, HOUR_MS
from clickagg.query.base import HeldCells, ReplicaStatus
from clickagg.realtime.feed import LENGTH, SNAPSHOT, decode_frame
from clickagg.realtime.recent import RECENT_HOURS_MS, RecentAggregates
from clickagg.store.base import FencedError

log = logging.getLogger(__name__)
_WINDOW_MS = {"hour": HOUR_MS, "day": DAY_MS}


class RecentReplica:
    def __init__(
        self,
        path: Path,
        *,
        hours_span_ms: int = RECENT_HOURS_MS,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
    ) -> None:
        self.path = path
        self.hours_span_ms = hours_span_ms
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._recent: RecentAggregates | None = None  # None: not following a feed
        self._task: asyncio.Task[None] | None = None
        self.snapshots = 0  # how many times it (re)started from a snapshot
        self.rounds = 0  # rounds applied since the process started (not redos)

    @property
    def live(self) -> bool:
        return self._recent is not None

    def covering(self, start_ms: int, granularity: str = "minute") -> RecentAggregates | None:
        """The recent rows, if the replica follows the feed and holds every window of
        ``granularity`` from ``start_ms`` on; else None."""
        recent = self._recent
        if recent is None:
            return None
        if granularity == "minute":
            held = recent.covers(start_ms)
        elif granularity in _WINDOW_MS:
            held = recent.covers_windows(start_ms, _WINDOW_MS[granularity])
        else:
            held = False
        return recent if held else None

    def status(self) -> ReplicaStatus:
        """For ``/metrics``: counted as the feed goes, read without walking the cells."""
        recent = self._recent
        held: dict[Literal["minute", "hour"], HeldCells]
        if recent is None:
            held = {"minute": HeldCells(0, 0), "hour": HeldCells(0, 0)}
        else:
            held = recent.held()
        return ReplicaStatus(
            live=recent is not None, snapshots=self.snapshots, rounds=self.rounds, held=held
        )

    def applied_offsets(self) -> dict[int, int] | None:
        recent = self._recent
        return None if recent is None else recent.applied_offsets()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="replica")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._recent = None

    async def _run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            try:
                await self._follow(reader)
                backoff = self.min_backoff_s
            except (OSError, EOFError, FencedError, ValueError) as exc:
                log.info("counters feed broke (%s: %s); starting over", type(exc).__name__, exc)
            finally:
                self._recent = None
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            await asyncio.sleep(self.min_backoff_s)

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        """Apply the snapshot, then every round, until the feed ends (EOFError)."""
        recent: RecentAggregates | None = None
        while True:
            header = await reader.readexactly(LENGTH.size)
            body = await reader.readexactly(LENGTH.unpack(header)[0])
            frame = decode_frame(body)
            if recent is None:
                if frame.kind != SNAPSHOT:
                    raise ValueError(f"the feed began with a {frame.kind!r} frame, not a snapshot")
                recent = RecentAggregates(
                    since_ms=frame.since_ms,
                    hours_since_ms=frame.hours_since_ms,
                    hours_span_ms=self.hours_span_ms,
                )
                # A day of every ad's hours: applied beside the event loop, not in it.
                await asyncio.to_thread(recent.apply, frame.rows, frame.ranges, frame.hours)
                self._recent = recent
                self.snapshots += 1
            else:
                if await asyncio.to_thread(recent.apply, frame.rows, frame.ranges):
                    self.rounds += 1
