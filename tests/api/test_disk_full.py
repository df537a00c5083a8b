"""A full disk under the log: 503 with Retry-After, nothing acknowledged is lost."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from clickagg.compose import create_app
from clickagg.config import Settings


@pytest.fixture
def tiny_log_dir(tmp_path: Path) -> Iterator[Path]:
    log_dir = tmp_path / "data" / "log"
    log_dir.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(log_dir)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield tmp_path / "data"
    subprocess.run(["umount", "-l", str(log_dir)], check=False)


def test_disk_full_answers_503_and_keeps_what_was_acknowledged(tiny_log_dir: Path) -> None:
    settings = Settings(data_dir=tiny_log_dir, partitions=2)
    now = int(time.time())
    acknowledged: list[str] = []
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = None
        for n in range(2000):
            batch = [
                {
                    "event_type": "click",
                    "event_id": f"full-{n}-{i}",
                    "ad_id": "ad-full",
                    "timestamp": now,
                    "user_agent": "x" * 500,
                }
                for i in range(20)
            ]
            response = client.post("/events/batch", json=batch)
            if response.status_code == 503:
                refused = response
                break
            assert response.status_code == 202
            acknowledged.extend(e["event_id"] for e in batch)
        assert refused is not None, "the 256 KiB log never filled up"
        assert refused.headers["retry-after"]
        assert "durably" in refused.json()["detail"]
        assert acknowledged
        deadline = time.monotonic() + 30
        while True:
            rows = client.get("/aggregates", params={"ad_id": "ad-full", "last": "1h"}).json()
            counted = sum(r["clicks"] for r in rows)
            if counted == len(acknowledged) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counted == len(acknowledged)
        health = client.get("/healthz")
        assert health.status_code == 503 and "log unavailable" in health.text
