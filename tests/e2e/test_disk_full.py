"""A full disk under the real server (``clickagg serve``, both processes): ingest stops at
the reserve, the worker backs off on ENOSPC instead of crash-looping, and once space is
freed every acknowledged event is counted and ingest accepts again, with no manual step."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server import ServeProcess
from tests.e2e.test_kill9 import worker_pid

AD = "ad-disk"
MIB = 2**20
RESERVE_MIB = 16
BATCH = 400
# Long user agents make a big log for few events: the disk fills after ~50 batches, and the
# worker's share (deltas, decisions, snapshots: some bytes per event) stays small.
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) " + "x" * 2000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 96 MiB tmpfs to fill: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; return its size."""
    written = 0
    with open(path, "wb", buffering=0) as handle:
        for chunk in (MIB, 4096):
            block = b"\0" * chunk
            while True:
                try:
                    written += handle.write(block) or 0
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return written


def batch(first: int, now_ms: int) -> list[dict[str, Any]]:
    return [
        {
            "event_type": "click",
            "event_id": f"disk-{n}",
            "ad_id": AD,
            "timestamp": now_ms,
            "user_agent": USER_AGENT,
        }
        for n in range(first, first + BATCH)
    ]


def counted(client: httpx.Client) -> int:
    response = client.get("/aggregates", params={"ad_id": AD, "last": "1h"})
    return sum(r["clicks"] for r in response.json()) if response.status_code == 200 else -1


def worker_restarts(client: httpx.Client) -> int:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("clickagg_worker_restarts "):
            return int(float(line.split()[1]))
    raise AssertionError("no clickagg_worker_restarts in /metrics")


def server_log(server: ServeProcess) -> str:
    return server.log_path.read_text(errors="replace")


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_full_disk_pauses_ingest_and_counting_and_both_resume(
    small_disk: Path, tmp_path: Path
) -> None:
    # What the operator frees at the end, besides the ballast: room for ingest to resume.
    spare = small_disk / "spare"
    spare.write_bytes(b"\0" * (24 * MIB))
    server = ServeProcess(
        small_disk / "data",
        partitions=2,
        log_path=tmp_path / "serve.log",
        extra_env={
            "CLICKAGG_DISK_RESERVE_BYTES": f"{RESERVE_MIB}MiB",
            "CLICKAGG_DISK_RESERVE_PERCENT": "100",
            "CLICKAGG_SNAPSHOT_INTERVAL": "1s",
            "CLICKAGG_LOG_LEVEL": "debug",  # the worker logs each retry of its backoff
        },
    )
    worker = None
    try:
        server.start()
        worker = worker_pid(server, not_one_of=[])
        acknowledged: list[str] = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # 1. The worker is held still, so the log holds a backlog when the disk fills.
            os.kill(worker, signal.SIGSTOP)
            refused = None
            for n in range(0, 400 * BATCH, BATCH):
                events = batch(n, int(time.time() * 1000))
                response = client.post("/events/batch", json=events)
                if response.status_code == 503:
                    refused = response
                    break
                assert response.status_code == 202, response.text
                acknowledged.extend(e["event_id"] for e in events)
            assert refused is not None, "ingest never reached the reserve"
            assert refused.json()["error"] == "disk full"
            assert "reserve" in refused.json()["detail"]
            assert refused.headers["retry-after"]
            assert acknowledged
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            assert free < RESERVE_MIB * MIB

            # 2. Something else takes the reserve; the worker goes on and hits ENOSPC.
            ballast = small_disk / "ballast"
            fill(ballast)
            os.kill(worker, signal.SIGCONT)
            wait_for(lambda: "out of disk space" in server_log(server), 20, "a backoff")
            # A few backoff retries (0.5 s, then 1 s): none of them may end the process.
            wait_for(
                lambda: "still out of disk space (retry 2 " in server_log(server),
                20,
                "two backoff retries",
            )
            health = client.get("/healthz")
            assert health.status_code == 503
            assert any("disk space low" in p for p in health.json()["problems"])
            response = client.post("/events/batch", json=batch(10**6, int(time.time() * 1000)))
            assert response.status_code == 503 and response.json()["error"] == "disk full"
            assert worker_pid(server, not_one_of=[]) == worker
            assert worker_restarts(client) == 0

            # 3. Space is freed: counting resumes by itself, then ingest.
            ballast.unlink()
            spare.unlink()
            wait_for(lambda: counted(client) == len(acknowledged), 30, "every 202 counted")
            for event_id in (acknowledged[0], acknowledged[len(acknowledged) // 2]):
                wait_for(
                    lambda event_id=event_id: (
                        client.get(f"/events/{event_id}").json().get("status") == "counted"
                    ),
                    10,
                    f"the audit trail of {event_id}",
                )
            more = batch(2 * 10**6, int(time.time() * 1000))
            wait_for(
                lambda: client.post("/events/batch", json=more).status_code == 202,
                10,
                "ingest to accept again",
            )
            wait_for(lambda: counted(client) == len(acknowledged) + BATCH, 30, "the new batch")
            wait_for(lambda: client.get("/healthz").status_code == 200, 10, "healthz 200")
            assert worker_pid(server, not_one_of=[]) == worker
            assert worker_restarts(client) == 0
            assert "disk space is back" in server_log(server)
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)
        server.stop()
