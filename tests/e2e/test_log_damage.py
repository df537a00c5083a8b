"""A damaged log on the real server: the partition stops and says why, `clickagg log
check` names the damage, `clickagg log repair` rebuilds from the archive what it holds and
names what is lost; every other acknowledged event is counted, and no offset is reused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clickagg.core import ids
from clickagg.log.integrity import HEADER, list_segments, seg_path
from tests.e2e.server import ServeProcess, http, lag

pytestmark = pytest.mark.slow
PARTITIONS = 4
DAMAGED = 2


def events(prefix: str, n: int) -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    return [
        {"event_type": "click", "event_id": f"{prefix}-{i}", "ad_id": "ad-1", "timestamp": now_ms}
        for i in range(n)
    ]


def send(server: ServeProcess, batch: list[dict[str, Any]], size: int = 50) -> list[str]:
    """Post in small batches (many frames per partition); return the acknowledged ids."""
    acked: list[str] = []
    for i in range(0, len(batch), size):
        part = batch[i : i + size]
        response = http.post(server.url + "/events/batch", json=part, timeout=30)
        assert response.status_code == 202, response.text
        acked += [e["event_id"] for e in part]
    return acked


def partition_of(event_id: str) -> int:
    return ids.partition_for_id(ids.CLICK, event_id, PARTITIONS)


def wait_counted(server: ServeProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while lag(server) > 0:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)


def metrics_text(server: ServeProcess, timeout_s: float = 60) -> str:
    """``/metrics`` once the worker answers (it starts beside a damaged partition)."""
    deadline = time.monotonic() + timeout_s
    while (response := http.get(server.url + "/metrics", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    return response.text


def clicks(server: ServeProcess) -> int:
    params = {"ad_id": "ad-1", "last": "1d", "granularity": "day"}
    response = http.get(server.url + "/aggregates", params=params, timeout=30)
    response.raise_for_status()
    return sum(row["clicks"] for row in response.json())


def damage_a_middle_frame(data_dir: Path) -> None:
    pdir = data_dir / "log" / f"p{DAMAGED:04d}"
    seg = seg_path(pdir, list_segments(pdir)[-1])
    data = bytearray(seg.read_bytes())
    positions, pos = [], 0
    while pos < len(data):
        length = HEADER.unpack_from(data, pos)[0]
        positions.append(pos)
        pos += HEADER.size + length
    assert len(positions) >= 3, "want frames before and after the damaged one"
    data[positions[len(positions) // 2] + HEADER.size + 10] ^= 0x40
    seg.write_bytes(bytes(data))


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "clickagg", "log", *args, "--data-dir", str(data_dir)]
    command += ["--partitions", str(PARTITIONS)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = ServeProcess(tmp_path / "data", partitions=PARTITIONS)
    yield srv
    srv.kill9()


def test_damage_to_counted_events_is_rebuilt_from_the_archive(server: ServeProcess) -> None:
    server.start()
    acked = send(server, events("a", 400))
    wait_counted(server)
    server.stop()
    damage_a_middle_frame(server.data_dir)

    server.start(healthy=False)
    health = http.get(server.url + "/healthz", timeout=10)
    assert health.status_code == 503 and f"partition {DAMAGED} takes no events" in health.text
    metrics = metrics_text(server)
    assert f'clickagg_log_partition_damaged{{partition="{DAMAGED}"}} 1.0' in metrics
    recovery = 'clickagg_log_recoveries_total{action="damage_found",partition="%d"} 1.0'
    assert recovery % DAMAGED in metrics
    refused = next(e for e in events("b", 50) if partition_of(e["event_id"]) == DAMAGED)
    taken = next(e for e in events("b", 50) if partition_of(e["event_id"]) != DAMAGED)
    response = http.post(server.url + "/events/click", json=refused, timeout=10)
    assert response.status_code == 503 and "clickagg log repair" in response.text
    assert response.headers["Retry-After"]
    response = http.post(server.url + "/events/click", json=taken, timeout=10)
    assert response.status_code == 202
    acked.append(taken["event_id"])
    server.stop()

    check = cli(server.data_dir, "check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"partition {DAMAGED}: offsets [" in check.stdout
    assert "the archive holds all of them" in check.stdout
    repair = cli(server.data_dir, "repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "rebuilt from the archive" in repair.stdout and "0 acknowledged events lost" in (
        repair.stdout
    )
    assert cli(server.data_dir, "check").returncode == 0

    server.start()
    acked += send(server, events("c", 200))
    wait_counted(server)
    assert clicks(server) == len(acked)  # every acknowledged click, once
    for event_id in acked[::37]:
        assert http.get(f"{server.url}/events/{event_id}", timeout=10).status_code == 200


def test_damage_to_unprocessed_events_names_exactly_what_was_lost(server: ServeProcess) -> None:
    server.extra_args = ["--no-worker"]  # nothing is processed: the archive cannot help
    server.start(healthy=False)
    acked = send(server, events("a", 400))
    server.stop()
    damage_a_middle_frame(server.data_dir)

    repair = cli(server.data_dir, "repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    lost = int(repair.stdout.rsplit("; ", 1)[1].split()[0])
    assert lost > 0 and "LOST" in repair.stdout and "never processed" in repair.stdout

    server.extra_args = []
    server.start()
    acked += send(server, events("c", 200))
    wait_counted(server)
    assert clicks(server) == len(acked) - lost  # exactly what the repair said it lost
