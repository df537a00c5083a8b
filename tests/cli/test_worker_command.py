"""`clickagg serve --no-worker` plus `clickagg worker`: the two halves run apart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from clickagg.launcher import ServeProcess, stop_group
from tests.e2e.server import http

NOW_S = int(time.time())


def test_serve_without_worker_and_a_separate_worker_count_exactly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    worker_log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 (closed below)
    worker = subprocess.Popen(
        [sys.executable, "-m", "clickagg", "worker", "--data-dir", str(data_dir)],
        stdout=worker_log,
        stderr=worker_log,
        start_new_session=True,
    )
    server = ServeProcess(data_dir, partitions=2, extra_args=["--no-worker"])
    try:
        server.start()  # healthy only once the separate worker answers
        batch = "\n".join(
            f'{{"event_type":"click","event_id":"w{n % 40}","ad_id":"ad-w","timestamp":{NOW_S}}}'
            for n in range(50)
        )
        response = http.post(
            server.url + "/events/batch",
            content=batch,
            headers={"content-type": "application/x-ndjson"},
            timeout=10,
        )
        assert response.json()["accepted"] == 50
        deadline = time.monotonic() + 90  # generous: a loaded 2-core box
        clicks = 0
        while time.monotonic() < deadline and clicks < 40:
            rows = http.get(
                server.url + "/aggregates", params={"ad_id": "ad-w", "last": "1h"}, timeout=10
            ).json()
            clicks = sum(r["clicks"] for r in rows)
            time.sleep(0.1)
        assert clicks == 40  # 10 copies deduplicated by the separate worker
        worker.send_signal(signal.SIGTERM)  # stops cleanly; the API then reports it gone
        assert worker.wait(timeout=30) == 0
        assert http.get(server.url + "/healthz", timeout=10).status_code == 503
    finally:
        server.stop()
        if worker.poll() is None:
            stop_group(worker)
        worker_log.close()
