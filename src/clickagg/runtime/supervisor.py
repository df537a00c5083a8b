"""Starts the worker process and restarts it if it dies: a restart is not a crash.

Restarts back off (by default 0.5 s doubling to 5 s, the ``worker_restart_backoff``
settings; back to the first once a worker has stayed up for 30 s; short, because every
second without a worker is a second of staleness), and a crash
loop ends: after ``max_restarts`` restarts within ``window_s`` the
supervisor stops restarting and says why (``failure``), which ``/healthz`` reports, rather
than burning the CPU the API process needs on a worker that cannot start (a damaged store,
a missing ad registry). Ingest keeps answering meanwhile: what it accepts waits in the
durable log. A full disk is not among these: the worker waits it out without exiting
(``runtime/worker.py``), so it never counts towards the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from clickagg.config import Settings
from clickagg.runtime import worker as worker_process

log = logging.getLogger(__name__)


class WorkerSupervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        check_interval_s: float = 0.5,
        first_backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
        healthy_after_s: float = 30.0,
        max_restarts: int = 20,
        window_s: float = 600.0,
        target: Callable[[Settings], None] = worker_process.run,
        name: str = "clickagg-worker",
    ) -> None:
        """``target(settings)`` is the process's body (the stream workers by default)."""
        self.settings = settings
        self.target = target
        self.name = name
        self.check_interval_s = check_interval_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.process: BaseProcess | None = None
        self.restarts = 0
        self.failure: str | None = None  # set when the supervisor gave up
        self._recent: deque[float] = deque()
        self._backoff_s = first_backoff_s
        self._started_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=self.target, args=(self.settings,), name=self.name)
        self.process.start()
        self._started_at = time.monotonic()
        log.info("%s process started (pid %s)", self.name, self.process.pid)

    def start(self) -> None:
        self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"{self.name}-supervisor")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            process = self.process
            if process is None or process.is_alive():
                continue
            now = time.monotonic()
            if now - self._started_at >= self.healthy_after_s:
                self._backoff_s = self.first_backoff_s  # it ran fine for a while
            self._recent.append(now)
            while self._recent and now - self._recent[0] > self.window_s:
                self._recent.popleft()
            if len(self._recent) > self.max_restarts:
                self.failure = (
                    f"worker process exited {len(self._recent)} times in "
                    f"{self.window_s:.0f} s (last exit code {process.exitcode}); "
                    "not restarting it: see the server log"
                )
                log.error("%s", self.failure)
                return
            log.warning(
                "worker process exited (%s): restarting in %.1f s",
                process.exitcode,
                self._backoff_s,
            )
            await asyncio.sleep(self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
            self.restarts += 1
            self._spawn()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    async def stop(self, timeout_s: float = 15.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        process = self.process
        if process is None or not process.is_alive():
            return
        process.terminate()
        await asyncio.to_thread(process.join, timeout_s)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, 5)
