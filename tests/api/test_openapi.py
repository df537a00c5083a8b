"""The OpenAPI document is exact: schemathesis, with every check, against the live server;
405 with ``Allow`` for every method a route does not take; the timestamp bounds the document
states are the server's own, to the last float."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st

from clickagg.api import openapi
from clickagg.clock import FixedClock
from clickagg.compose import create_app
from clickagg.config import Settings
from clickagg.core import ids
from clickagg.core.events import EARLIEST_MS, decode_one, normalize, timestamp_ms
from clickagg.launcher import free_port
from tests.e2e.server import http

REPO = Path(__file__).resolve().parents[2]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
FUTURE_MS = 5 * 60_000
# schemathesis.toml sends this token to the admin endpoints.
ADMIN_TOKEN = "schemathesis:schemathesis-admin-token"


@dataclass
class Live:
    url: str
    clock: FixedClock

    def spec(self) -> dict[str, Any]:
        response = http.get(self.url + "/openapi.json", timeout=10)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The real app (and its worker process) served by uvicorn on a loopback port, on a
    clock that stands still: the document states the timestamp bounds of the moment it is
    served, and with a moving clock a value just past them is accepted a moment later."""
    data_dir = tmp_path_factory.mktemp("openapi") / "data"
    clock = FixedClock(time.time_ns() // 1_000_000 // 1000 * 1000)
    settings = Settings(
        data_dir=data_dir, partitions=2, max_batch_events=50, admin_token=ADMIN_TOKEN
    )
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, clock=clock), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="openapi-live-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if http.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield Live(url, clock)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def test_every_route_answers_405_with_allow_to_other_methods(live: Live) -> None:
    paths = {**live.spec()["paths"], "/openapi.json": {"get": {}}}
    for template, operations in paths.items():
        path = re.sub(r"\{\w+\}", "x", template)
        allowed = {method.upper() for method in operations}
        if "GET" in allowed:
            allowed.add("HEAD")
        for method in METHODS:
            if method in allowed:
                continue
            response = http.request(method, live.url + path, timeout=10)
            assert response.status_code == 405, (method, path, response.text)
            assert set(response.headers["allow"].split(", ")) == allowed, (method, path)
            if method != "HEAD":
                assert response.json()["error"] == "method not allowed", response.text


def test_the_document_states_the_bounds_of_the_moment_it_is_served(live: Live) -> None:
    def latest_ms() -> float:
        timestamp = live.spec()["components"]["schemas"]["ClickEvent"]["properties"]["timestamp"]
        return float(timestamp["anyOf"][1]["maximum"])

    before = latest_ms()
    live.clock.advance(60_000)
    assert latest_ms() == before + 60_000


@pytest.mark.slow
def test_schemathesis_finds_nothing(live: Live, tmp_path: Path) -> None:
    """Every check of schemathesis, the few rules JSON Schema cannot state replaced by the
    checks of ``schemathesis_hooks.py`` (``schemathesis.toml`` says which and why)."""
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--no-color"),
        *("--config-file", str(REPO / "tests/api/schemathesis.toml")),
        *("run", live.url + "/openapi.json", "--max-examples", "25"),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(  # in tmp_path: its caches stay out of the work tree
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout[-12_000:] + result.stderr[-3_000:]
    assert "No issues found" in result.stdout, result.stdout[-3_000:]


# The timestamp bounds, checked against the server's own rule.
NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _accepted(value: float) -> bool:
    try:
        return EARLIEST_MS <= timestamp_ms(value) <= NOW_MS + FUTURE_MS
    except OverflowError:
        return False


TIMESTAMP = openapi.timestamp_schema(NOW_MS, FUTURE_MS)
NUMBERS = [branch for branch in TIMESTAMP["anyOf"] if branch["type"] == "number"]
EDGES = [bound for branch in NUMBERS for bound in (branch["minimum"], branch["maximum"])]
near_edges = st.tuples(st.sampled_from(EDGES), st.integers(-3, 3)).map(
    lambda pair: _step(pair[0], pair[1])
)


def _step(value: float, steps: int) -> float:
    for _ in range(abs(steps)):
        value = math.nextafter(value, math.inf if steps > 0 else -math.inf)
    return value


@given(
    near_edges
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=9e8, max_value=2e12)
    | st.integers(min_value=-(2**70), max_value=2**70)
)
def test_numeric_timestamps_the_schema_admits_are_exactly_those_accepted(value: float) -> None:
    assert jsonschema_rs.validator_for(TIMESTAMP).is_valid(value) == _accepted(value), value


@given(st.from_regex(TIMESTAMP["anyOf"][2]["pattern"], fullmatch=True))
def test_date_times_the_schema_admits_are_accepted(text: str) -> None:
    event = decode_one(f'{{"ad_id":"a","timestamp":"{text}"}}'.encode())
    batch = normalize(
        [event], default_type=ids.CLICK, partitions=1, now_ms=NOW_MS, max_future_ms=FUTURE_MS
    )
    assert batch.accepted == 1, batch.rejected
