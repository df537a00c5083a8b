"""The worker supervisor: restarts with backoff, and gives up on a crash loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from clickagg.config import Settings
from clickagg.runtime.supervisor import WorkerSupervisor


def test_a_crash_looping_worker_is_restarted_with_backoff_then_given_up(tmp_path: Path) -> None:
    """A worker that cannot start (its ad registry is missing) exits at once: the
    supervisor restarts it a bounded number of times, further and further apart, then
    stops and says why."""
    settings = Settings(data_dir=tmp_path, ads_file=tmp_path / "missing.csv")
    supervisor = WorkerSupervisor(
        settings, check_interval_s=0.05, first_backoff_s=0.2, max_restarts=2, window_s=120
    )

    async def run() -> float:
        started = time.monotonic()
        supervisor.start()
        deadline = started + 90
        while supervisor.failure is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.0)  # given up: no further restart
        await supervisor.stop()
        return elapsed

    elapsed = asyncio.run(run())
    assert supervisor.failure is not None and "3 times" in supervisor.failure
    assert supervisor.restarts == 2
    assert supervisor.process is not None and supervisor.process.exitcode not in (None, 0)
    assert elapsed >= 0.2 + 0.4  # the two restarts waited, the second twice as long
