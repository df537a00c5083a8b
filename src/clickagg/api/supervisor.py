"""Starts the worker process and restarts it if it dies: a restart is not a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from multiprocessing.process import BaseProcess

from clickagg.config import Settings
from clickagg.worker import process as worker_process

log = logging.getLogger(__name__)


class WorkerSupervisor:
    def __init__(self, settings: Settings, *, check_interval_s: float = 0.5) -> None:
        self.settings = settings
        self.check_interval_s = check_interval_s
        self.process: BaseProcess | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=worker_process.run, args=(self.settings,), name="clickagg-worker"
        )
        self.process.start()
        log.info("worker process started (pid %s)", self.process.pid)

    def start(self) -> None:
        self._spawn()
        self._task = asyncio.create_task(self._watch(), name="worker-supervisor")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            if self.process is not None and not self.process.is_alive():
                log.warning("worker process exited (%s): restarting", self.process.exitcode)
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
