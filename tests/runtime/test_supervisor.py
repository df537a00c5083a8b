"""The worker supervisor: restarts with backoff, and gives up on a crash loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from clickagg.config import Settings
from clickagg.runtime.services import Services
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


def test_the_wait_doubles_up_to_the_max_backoff(tmp_path: Path) -> None:
    """Each restart waits twice as long as the one before, never more than the max."""
    settings = Settings(data_dir=tmp_path, ads_file=tmp_path / "missing.csv")
    supervisor = WorkerSupervisor(
        settings,
        check_interval_s=0.05,
        first_backoff_s=0.05,
        max_backoff_s=0.15,
        max_restarts=4,
        window_s=120,
    )
    waits: list[float] = []

    async def run() -> None:
        supervisor.start()
        deadline = time.monotonic() + 90
        while supervisor.failure is None and time.monotonic() < deadline:
            if len(waits) == supervisor.restarts:
                waits.append(supervisor._backoff_s)  # the wait before the next restart
            await asyncio.sleep(0.01)
        await supervisor.stop()

    asyncio.run(run())
    assert supervisor.failure is not None and supervisor.restarts == 4
    # 0.05, 0.1, then 0.15 (0.2 capped) and 0.15 again (0.3 capped): the cap is reached
    # before the crash-loop limit stops the restarts.
    assert waits[:4] == [0.05, 0.1, 0.15, 0.15]


def test_serve_backs_off_half_a_second_doubling_to_five_by_default(tmp_path: Path) -> None:
    """The defaults README.md and RELIABILITY.md state reach both supervisors ``serve``
    starts; the settings change them (tests of servers shorten the wait by them)."""
    services = Services(Settings(data_dir=tmp_path))
    assert services.closer is not None
    for supervisor in (services.worker, services.closer):
        assert (supervisor.first_backoff_s, supervisor.max_backoff_s) == (0.5, 5.0)
        assert (supervisor.max_restarts, supervisor.window_s) == (20, 600.0)
    short = Services(
        Settings(data_dir=tmp_path, worker_restart_backoff_ms=50, worker_restart_max_backoff_ms=200)
    )
    assert short.closer is not None
    for supervisor in (short.worker, short.closer):
        assert (supervisor.first_backoff_s, supervisor.max_backoff_s) == (0.05, 0.2)
    with pytest.raises(ValueError, match="worker restart backoff"):
        Settings(worker_restart_backoff_ms=6_000, worker_restart_max_backoff_ms=5_000)
    with pytest.raises(ValueError, match="worker restart backoff"):
        Settings(worker_restart_backoff_ms=0)
