"""A large batch is decoded and validated off the event loop: while one is being prepared,
other requests on the same loop are still answered (real app, real log and worker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
from starlette.testclient import TestClient

from clickagg.api.ingest import OFF_LOOP_BYTES, _decode_and_normalize
from clickagg.compose import create_app
from clickagg.config import Settings

EVENTS = 100_000  # ~11 MB: long enough to prepare that a wait for it shows


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("off-loop"),
        partitions=2,
        max_body_bytes=16 * 1024 * 1024,
        max_batch_events=EVENTS,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def big_body() -> bytes:
    now_s = int(time.time())
    lines = [
        msgspec.json.encode(
            {
                "event_type": "click",
                "event_id": f"big-{i}",
                "ad_id": f"ad-{i % 500}",
                "user_id": f"u-{i}",
                "timestamp": now_s - i % 120,
            }
        )
        for i in range(EVENTS)
    ]
    return b"\n".join(lines)


def test_requests_are_answered_while_a_large_batch_is_prepared(client: TestClient) -> None:
    body = big_body()
    assert len(body) >= OFF_LOOP_BYTES
    settings = Settings(max_batch_events=EVENTS)
    timings = []
    for _ in range(3):  # warm (the user-agent cache is shared), as in the app
        started = time.perf_counter()
        _decode_and_normalize(settings, int(time.time() * 1000), body, True)
        timings.append(time.perf_counter() - started)
    prepare_s = min(timings[1:])  # how long it would hold the loop, if on it

    answer: list[int] = []
    batch = threading.Thread(
        target=lambda: answer.append(
            client.post(
                "/events/batch", content=body, headers={"content-type": "application/x-ndjson"}
            ).status_code
        )
    )
    latencies: list[float] = []
    batch.start()
    deadline = time.monotonic() + 60
    while batch.is_alive() and time.monotonic() < deadline:
        sent = time.perf_counter()
        assert client.get("/no-such-path").status_code == 404  # answered on the loop alone
        latencies.append(time.perf_counter() - sent)
    batch.join()
    assert answer == [202]
    # On the loop, one of these requests would have waited for the whole preparation.
    assert len(latencies) >= 3, (latencies, prepare_s)
    assert max(latencies) < prepare_s / 2, (max(latencies), prepare_s)
