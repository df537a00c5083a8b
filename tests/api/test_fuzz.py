"""Hostile input never gets a 5xx: random bodies to every ingest endpoint, random query
strings to every query endpoint (hypothesis, against the real app and worker)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from clickagg.compose import create_app
from clickagg.config import Settings

INGEST = ["/events/click", "/events/impression", "/events/batch", "/api/v1/events/click"]
QUERIES = [
    "/aggregates",
    "/aggregates/realtime",
    "/api/v1/ads/x/metrics",
    "/api/v1/ads/x/metrics/realtime",
    "/events/x",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=12,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "ad_id": json_values,
        "timestamp": json_values,
        "event_type": json_values,
        "click_id": json_values,
        "user_id": json_values,
        "cost_micros": json_values,
        "country": json_values,
        "user_agent": json_values,
    },
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    with TestClient(create_app(Settings(data_dir=data_dir, partitions=2))) as test_client:
        deadline = time.monotonic() + 30
        while test_client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield test_client


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(INGEST),
    body=st.binary(max_size=300)
    | event_like.map(lambda e: repr(e).encode())
    | st.lists(event_like, max_size=5).map(lambda items: json.dumps(items).encode())
    | event_like.map(lambda e: json.dumps(e).encode()),
)
def test_ingest_never_5xx(client: TestClient, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code in (202, 400, 413), (response.status_code, response.text)
    if response.status_code != 202:
        assert response.json()["detail"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(QUERIES),
    params=st.dictionaries(
        st.sampled_from(["ad_id", "start", "end", "last", "granularity", "group_by", "window"]),
        st.text(max_size=30),
        max_size=5,
    ),
)
def test_queries_never_5xx(client: TestClient, path: str, params: dict[str, str]) -> None:
    response = client.get(path, params=params)
    assert response.status_code in (200, 400, 404), (response.status_code, response.text)


@pytest.mark.parametrize(
    "params",
    [
        {"ad_id": "a", "start": "99999999999999999999999"},
        {"ad_id": "a", "end": "99999999999999999999999"},
        {"ad_id": "a", "start": "-99999999999999999999999"},
        {"ad_id": "a", "start": "9999-12-31T23:59:59Z", "end": "0001-01-01T00:00:00"},
        {"ad_id": "a", "last": "99999999999999999999d"},
        {"ad_id": "a", "start": "1e400"},
    ],
)
def test_extreme_times_are_400(client: TestClient, params: dict[str, str]) -> None:
    response = client.get("/aggregates", params=params)
    assert response.status_code == 400, response.text
