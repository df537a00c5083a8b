"""Hostile input never gets a 5xx: random bodies to every ingest endpoint, random query
strings to every query endpoint, JSON nested past the decoder's limit and strings that are
not UTF-8, alone or among good events (hypothesis, against the real app and worker)."""

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

SINGLE = [
    "/events/click",
    "/events/impression",
    "/api/v1/events/click",
    "/api/v1/events/impression",
]
INGEST = [*SINGLE, "/events/batch"]
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


# Hostile lines: every one is refused, alone or in a batch, whatever the endpoint.
NOT_UTF8 = [b"\xff", b"\x80", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
STRING_FIELDS = ["ad_id", "event_id", "user_id", "ip", "user_agent", "country", "device"]


def _line(**fields: object) -> bytes:
    event = {"event_type": "click", "ad_id": "ad-hostile", "timestamp": int(time.time())}
    return json.dumps({**event, **fields}).encode()


good_lines = st.integers(0, 10**9).map(lambda n: _line(event_id=f"hostile-{n}"))


@st.composite
def nested_lines(draw: st.DrawFn) -> bytes:
    """Nested past any interpreter's recursion limit: the whole line, an unknown field
    (skipped by the decoder, but still walked) or a field the server reads."""
    depth = draw(st.integers(min_value=20_000, max_value=40_000))
    deep = draw(
        st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"0" + b"}" * depth])
    )
    where = draw(st.sampled_from(["line", "extra", "user_id"]))
    return deep if where == "line" else _line(**{where: "@"}).replace(b'"@"', deep)


@st.composite
def not_utf8_lines(draw: st.DrawFn) -> bytes:
    """Invalid UTF-8 inside a string field the server reads."""
    value = draw(st.text(alphabet="abc", max_size=3)).encode()
    at = draw(st.integers(0, len(value)))
    value = value[:at] + draw(st.sampled_from(NOT_UTF8)) + value[at:]
    field = draw(st.sampled_from(STRING_FIELDS))
    return _line(**{field: "@"}).replace(b'"@"', b'"' + value + b'"')


hostile_lines = nested_lines() | not_utf8_lines()
hostile_reasons = ("nested too deeply", "not valid UTF-8", "Expected `")
marked_lines = st.lists(
    good_lines.map(lambda line: (True, line)) | hostile_lines.map(lambda line: (False, line)),
    min_size=1,
    max_size=30,
)
fuzz_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz_settings
@given(path=st.sampled_from(SINGLE), line=hostile_lines)
def test_hostile_event_is_400_naming_the_problem(
    client: TestClient, path: str, line: bytes
) -> None:
    response = client.post(path, content=line, headers={"content-type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.json()["error"] == "invalid event"
    assert any(reason in response.json()["detail"] for reason in hostile_reasons), response.text


@fuzz_settings
@given(lines=marked_lines)
def test_hostile_ndjson_lines_are_rejected_by_index(
    client: TestClient, lines: list[tuple[bool, bytes]]
) -> None:
    """The good lines of the batch are stored, the hostile ones named by their index."""
    body = b"\n".join(line for _, line in lines)
    response = client.post(
        "/events/batch", content=body, headers={"content-type": "application/x-ndjson"}
    )
    good = [n for n, (is_good, _) in enumerate(lines) if is_good]
    assert response.status_code == (202 if good else 400), (response.status_code, response.text)
    answer = response.json()
    assert answer["accepted"] == len(good)
    assert [r["index"] for r in answer["rejected"]] == sorted(set(range(len(lines))) - set(good))
    assert all(any(why in r["error"] for why in hostile_reasons) for r in answer["rejected"])


@fuzz_settings
@given(lines=marked_lines)
def test_hostile_items_in_a_json_array(client: TestClient, lines: list[tuple[bool, bytes]]) -> None:
    """Bad strings are rejected item by item; an array too deep to split into items is
    refused whole, saying so."""
    body = b"[" + b",".join(line for _, line in lines) + b"]"
    response = client.post(
        "/events/batch", content=body, headers={"content-type": "application/json"}
    )
    answer = response.json()
    if any(b"[[[[" in line or b'{"a":{"a":' in line for _, line in lines):
        assert response.status_code == 400, response.text
        assert answer["error"] == "invalid batch"
        assert "nested too deeply" in answer["detail"]
        return
    good = [n for n, (is_good, _) in enumerate(lines) if is_good]
    assert response.status_code == (202 if good else 400), (response.status_code, response.text)
    assert answer["accepted"] == len(good)
    assert [r["index"] for r in answer["rejected"]] == sorted(set(range(len(lines))) - set(good))


def test_one_hostile_line_does_not_keep_999_good_ones_out(client: TestClient) -> None:
    """What a retrying ad server needs: the good lines are acknowledged and counted."""
    lines = [_line(ad_id="ad-999", event_id=f"ok-{n}") for n in range(999)]
    lines.insert(400, b'{"event_type":"click","ad_id":"ad-999","x":' + b"[" * 5000 + b"]" * 5000)
    lines.insert(700, _line(ad_id="ad-999", user_id="@").replace(b'"@"', b'"\xff"'))
    response = client.post(
        "/events/batch", content=b"\n".join(lines), headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 999
    assert [r["index"] for r in response.json()["rejected"]] == [400, 700]
    deadline = time.monotonic() + 30
    while True:
        rows = client.get("/aggregates", params={"ad_id": "ad-999", "granularity": "minute"})
        if sum(row["clicks"] for row in rows.json()) == 999:
            break
        assert time.monotonic() < deadline, rows.text
        time.sleep(0.1)
