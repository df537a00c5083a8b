"""A price changed on a live server applies from its effective time on, without a restart:
clicks before keep their price, in the stream and in the reconciled hour alike."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clickagg.core.windows import HOUR_MS
from tests.e2e.server import ServeProcess, http, lag

pytestmark = pytest.mark.slow


def cli(server: ServeProcess, *args: str) -> str:
    command = [sys.executable, "-m", "clickagg", *args, "--data-dir", str(server.data_dir)]
    done = subprocess.run(
        [*command, "--partitions", str(server.partitions)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def post(server: ServeProcess, prefix: str, ts_ms: int, n: int) -> None:
    batch: list[dict[str, Any]] = [
        {"event_type": "click", "event_id": f"{prefix}{i}", "ad_id": "ad-p", "timestamp": ts_ms}
        for i in range(n)
    ]
    response = http.post(server.url + "/events/batch", json=batch, timeout=30)
    assert response.status_code == 202 and response.json()["accepted"] == n


def spend(server: ServeProcess, start: int, end: int) -> int:
    deadline = time.monotonic() + 60
    while lag(server) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    params = {"ad_id": "ad-p", "start": start, "end": end, "granularity": "hour"}
    rows = http.get(server.url + "/aggregates", params=params, timeout=30).json()
    return sum(int(r["spend_micros"]) for r in rows)


def test_a_price_change_applies_from_its_time_on_in_stream_and_batch(tmp_path: Path) -> None:
    # At info, the worker logs each reload of the registry: the test waits for it.
    server = ServeProcess(tmp_path / "data", partitions=2, extra_env={"CLICKAGG_LOG_LEVEL": "info"})
    try:
        server.start()
        cli(server, "ads", "set", "ad-p", "--cpc-micros", "100")
        now = int(time.time() * 1000)
        change = now + 3_000
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(change / 1000))
        cli(server, "ads", "set", "ad-p", "--cpc-micros", "300", "--effective-from", when)
        change -= change % 1000  # the CLI's time has whole seconds
        # The worker notices the registry between rounds: both prices, before any click.
        deadline = time.monotonic() + 30
        while "prices reloaded: 2 entries" not in server.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the worker never reloaded the prices"
            time.sleep(0.05)
        post(server, "before", change - 1_000, 4)  # priced 100 each
        post(server, "after", change + 1_000, 2)  # priced 300 each
        hour = change - change % HOUR_MS
        window = (hour, hour + 2 * HOUR_MS)
        assert spend(server, *window) == 4 * 100 + 2 * 300
        assert "ad-p" in cli(server, "ads", "list")

        for start in sorted({(change - 1_000) // HOUR_MS, (change + 1_000) // HOUR_MS}):
            iso = time.strftime("%Y-%m-%dT%H", time.gmtime(start * HOUR_MS / 1000))
            cli(server, "reconcile", "--hour", iso)
        assert spend(server, *window) == 4 * 100 + 2 * 300  # the batch prices the same way
    finally:
        server.kill9()


def test_a_price_cannot_be_set_in_the_past(tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "clickagg", "ads", "set", "ad-p", "--cpc-micros", "5"),
        *("--effective-from", "2020-01-01T00:00:00", "--data-dir", str(tmp_path)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "not from the past" in done.stderr
