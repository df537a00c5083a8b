"""The API process's replica of the worker's real-time counters, kept by the counters' feed
(``clickagg.realtime.feed``): sliding windows answered in the API process, off the stream's
GIL.

It answers only while it follows a live feed: from its first snapshot until the
connection breaks or a round does not continue its offsets. Otherwise :meth:`window`
returns None and the caller asks the worker as before (which, while the worker is down,
answers 503). So the replica never serves counts that another path would not have served,
only sooner. After a break it reconnects, with a short backoff, and starts over from a new
snapshot: a new worker process's counters are a new state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from clickagg.realtime.feed import LENGTH, SNAPSHOT, decode_frame
from clickagg.realtime.memory import InMemoryCounters
from clickagg.store.base import FencedError, Totals

log = logging.getLogger(__name__)


class CountersReplica:
    def __init__(
        self,
        path: Path,
        *,
        retain_ms: int | None = None,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
    ) -> None:
        self.path = path
        self.retain_ms = retain_ms
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._counters: InMemoryCounters | None = None  # None: not following a feed
        self._task: asyncio.Task[None] | None = None
        self.snapshots = 0  # how many times it (re)started from a snapshot
        self.rounds = 0  # rounds applied since the process started

    @property
    def live(self) -> bool:
        return self._counters is not None

    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals | None:
        """The sums over minutes in [start_ms, end_ms), or None while not following."""
        counters = self._counters
        if counters is None:
            return None
        return counters.window(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms)

    def applied_offsets(self) -> dict[int, int] | None:
        counters = self._counters
        return None if counters is None else counters.applied_offsets()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="replica")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._counters = None

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
                self._counters = None
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            await asyncio.sleep(self.min_backoff_s)

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        """Apply the snapshot, then every round, until the feed ends (EOFError)."""
        counters: InMemoryCounters | None = None
        while True:
            header = await reader.readexactly(LENGTH.size)
            kind, ranges, table = decode_frame(await reader.readexactly(LENGTH.unpack(header)[0]))
            if counters is None:
                if kind != SNAPSHOT:
                    raise ValueError(f"the feed began with a {kind!r} frame, not a snapshot")
                counters = (
                    InMemoryCounters()
                    if self.retain_ms is None
                    else InMemoryCounters(retain_ms=self.retain_ms)
                )
                counters.apply(table, ranges)
                self._counters = counters
                self.snapshots += 1
            else:
                counters.apply(table, ranges)
                self.rounds += 1
