"""The processes ``clickagg serve`` runs beside the API: the stream workers and the hour
closer, each in a process of its own under a supervisor, seen by the API as one handle."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from clickagg.batch.closer import run_closer
from clickagg.config import Settings
from clickagg.runtime.supervisor import WorkerSupervisor

CLOSER_PID_FILE = "closer.pid"


def _closer_main(settings: Settings) -> None:
    """The closer process: records its pid (so tools can tell it from the workers), then
    closes due hours until terminated. A kill at any point leaves nothing half-published."""
    Path(settings.data_dir, CLOSER_PID_FILE).write_text(str(os.getpid()))
    run_closer(settings, parent_pid=os.getppid())


class Services:
    """Starts and stops the worker supervisor and, when ``close_interval`` is set, the
    closer's; restarts and failure are the workers' (what ingest and queries depend on)."""

    def __init__(self, settings: Settings) -> None:
        first_s = settings.worker_restart_backoff_ms / 1000
        max_s = settings.worker_restart_max_backoff_ms / 1000
        self.worker = WorkerSupervisor(settings, first_backoff_s=first_s, max_backoff_s=max_s)
        self.closer = (
            WorkerSupervisor(
                settings,
                first_backoff_s=first_s,
                max_backoff_s=max_s,
                target=_closer_main,
                name="clickagg-closer",
            )
            if settings.close_interval_ms > 0
            else None
        )

    @property
    def restarts(self) -> int:
        return self.worker.restarts

    @property
    def failure(self) -> str | None:
        return self.worker.failure

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    def start(self) -> None:
        self.worker.start()
        if self.closer is not None:
            self.closer.start()

    async def stop(self) -> None:
        stops = [self.worker.stop()]
        if self.closer is not None:
            stops.append(self.closer.stop())
        await asyncio.gather(*stops)
