"""A worker process crash seen from HTTP: queries answer once it is restarted, and are a 503
JSON with Retry-After while no worker is up, never a 500 (the API's pooled query
connections go stale when the worker dies)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from starlette.testclient import TestClient

from clickagg.api.state import AppState
from clickagg.compose import create_app
from clickagg.config import Settings
from clickagg.store.rpc import RpcQueryStore
from tests.api.test_app import wait_until

AD = "ad-restart"
QUERIES = [  # every endpoint the worker process answers
    f"/aggregates?ad_id={AD}&granularity=minute&last=1h",
    f"/aggregates/realtime?ad_id={AD}&window=1h",
    f"/api/v1/ads/{AD}/metrics?granularity=hour",
    f"/api/v1/ads/{AD}/metrics/realtime",
    "/metrics",
]


def clicks_counted(client: TestClient) -> int:
    response = client.get("/aggregates", params={"ad_id": AD, "last": "1h"})
    return sum(row["clicks"] for row in response.json()) if response.status_code == 200 else -1


async def worker_answers(settings: Settings) -> bool:
    """Asked on a connection of its own, not one of the app's pool."""
    probe = RpcQueryStore(settings.rpc_socket)
    try:
        return await probe.ping()
    finally:
        await probe.close()


def test_a_worker_crash_is_never_a_500(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", partitions=2)
    app = create_app(settings)
    with (
        TestClient(app, raise_server_exceptions=False) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        state: AppState = client.app.app.state.clickagg  # type: ignore[attr-defined]
        assert state.supervisor is not None
        wait_until(lambda: client.get("/healthz").status_code == 200, timeout_s=60)
        now_s = int(time.time())
        items = [
            {"event_type": "click", "event_id": f"restart-{n}", "ad_id": AD, "timestamp": now_s}
            for n in range(5)
        ]
        assert client.post("/events/batch", json=items).status_code == 202
        wait_until(lambda: clicks_counted(client) == 5)

        def round_of_queries() -> list[httpx.Response]:
            """Every query endpoint, eight at a time: the store client pools connections."""
            return list(pool.map(client.get, QUERIES * 2))

        assert {r.status_code for r in round_of_queries()} == {200}

        # A crash, and the supervisor's restart: afterwards every pooled connection is
        # stale, and the queries that find one must still answer.
        old_pid = state.supervisor.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: state.supervisor is not None and state.supervisor.restarts == 1)
        wait_until(lambda: asyncio.run(worker_answers(settings)), timeout_s=60)
        assert state.supervisor.pid != old_pid
        answers = round_of_queries()
        assert [r.status_code for r in answers] == [200] * len(answers), answers[0].text
        assert clicks_counted(client) == 5

        # No worker at all: every query is a 503 JSON with Retry-After; a metrics scrape
        # answers what the API process knows, and says the store did not.
        client.portal.call(state.supervisor.stop)
        for response in round_of_queries():
            if response.url.path == "/metrics":
                assert response.status_code == 200, response.text
                assert "\nclickagg_store_up 0.0\n" in response.text
                continue
            assert response.status_code == 503, (response.status_code, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["retry-after"] == "1"
            body = response.json()
            assert body["error"] == "store unavailable" and body["detail"], body
        assert client.get("/healthz").status_code == 503
