"""Settings from a TOML file and CLICKAGG_* variables reach both processes of ``serve``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.e2e.server import ServeProcess, http


def _fate(server: ServeProcess, event_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = http.get(f"{server.url}/events/{event_id}", timeout=10)
        if response.status_code == 200:
            fate: dict[str, Any] = response.json()
            return fate
        time.sleep(0.05)
    raise AssertionError(f"no fate for {event_id} in {timeout_s}s")


def test_file_and_environment_settings_reach_the_worker(tmp_path: Path) -> None:
    config = tmp_path / "clickagg.toml"
    config.write_text('allowed_lateness = "1m"\ndedup_horizon = "2m"\npartitions = 5\n')
    server = ServeProcess(
        tmp_path / "data",
        partitions=1,  # a flag: wins over the file and the variable
        extra_env={
            "CLICKAGG_CONFIG": str(config),
            "CLICKAGG_PARTITIONS": "3",
            "CLICKAGG_MAX_BATCH_EVENTS": "2",
        },
    )
    server.start()
    try:
        now = int(time.time())
        click = {"ad_id": "ad-settings", "timestamp": now}
        response = http.post(f"{server.url}/events/click", json=click | {"click_id": "s-1"})
        assert response.status_code == 202
        assert _fate(server, "s-1")["status"] == "counted"
        # 3 minutes behind the partition's max event time: counted with the default
        # lateness (5m), late with the file's 1m, which only the worker applies.
        old = click | {"click_id": "s-2", "timestamp": now - 180}
        assert http.post(f"{server.url}/events/click", json=old).status_code == 202
        late = _fate(server, "s-2")
        assert late["status"] == "late", late
        assert late["partition"] == 0

        # The API process has the variable's batch limit and the flag's partition count.
        batch = [click | {"event_type": "click", "click_id": f"b-{n}"} for n in range(3)]
        assert http.post(f"{server.url}/events/batch", json=batch).status_code == 413
        metrics = http.get(f"{server.url}/metrics", timeout=10).text
        assert 'clickagg_partition_lag_events{partition="0"}' in metrics
        assert 'partition="1"' not in metrics
    finally:
        server.stop()
