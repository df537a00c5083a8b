"""The HTTP API in-process (Starlette TestClient, real log, real worker process, real DuckDB)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from clickagg.api.ingest import ROUTES as INGEST_ROUTES
from clickagg.api.ingest import IngestRouter
from clickagg.compose import create_app
from clickagg.config import Settings
from clickagg.core import ids

NOW_S = int(time.time())


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data_dir: Path = tmp_path_factory.mktemp("api")
    settings = Settings(
        data_dir=data_dir, partitions=4, max_body_bytes=256 * 1024, max_batch_events=1000
    )
    with TestClient(create_app(settings)) as test_client:
        wait_until(lambda: test_client.get("/healthz").status_code == 200)
        yield test_client


def wait_until(check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def fate(client: TestClient, event_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        response = client.get(f"/events/{event_id}")
        return response.json() if response.status_code == 200 else None

    result: dict[str, Any] = wait_until(found)
    return result


def clicks(client: TestClient, ad_id: str, **params: str) -> list[dict[str, Any]]:
    response = client.get("/aggregates", params={"ad_id": ad_id, "granularity": "minute", **params})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


def served_operations(front: Any) -> set[tuple[str, str]]:
    """(path, method) of every route of the ASGI front: its own ingest POSTs, then the
    Starlette app's routes (path parameters without their convertors, HEAD left out)."""
    assert isinstance(front, IngestRouter) and isinstance(front.app, Starlette)
    operations = {(path, "POST") for path in INGEST_ROUTES}
    for route in front.app.routes:
        assert isinstance(route, Route) and route.methods, route
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        operations |= {(path, method) for method in route.methods if method != "HEAD"}
    return operations


def test_healthz_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    # every route is documented and every documented operation is served (the document
    # itself aside)
    assert documented == served_operations(client.app) - {("/openapi.json", "GET")}
    assert ("/events/{event_id}", "GET") in documented  # the :path convertor is dropped
    assert {"ClickEvent", "ImpressionEvent", "BatchItem"} <= set(spec["components"]["schemas"])


def test_click_is_acknowledged_counted_and_traceable(client: TestClient) -> None:
    response = client.post(
        "/events/click",
        json={
            "click_id": "api-c1",
            "ad_id": "ad-api-1",
            "advertiser_id": "adv",
            "user_id": "u1",
            "timestamp": NOW_S,
            "ip": "1.2.3.4",
            "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile Safari",
        },
    )
    assert response.status_code == 202
    assert response.json()["event_id"] == "api-c1"
    traced = fate(client, "api-c1")
    assert traced["status"] == "counted"
    assert traced["partition"] == response.json()["partition"]
    assert traced["offset"] >= 0
    rows = clicks(client, "ad-api-1")
    assert [r["clicks"] for r in rows] == [1]
    by_device = client.get("/aggregates", params={"ad_id": "ad-api-1", "group_by": "device"})
    assert by_device.json()[0]["device"] == "mobile"


def test_seed_001_click_without_id_deduplicates_by_payload(client: TestClient) -> None:
    body = {
        "ad_id": "ad-api-2",
        "user_id": "u_456",
        "timestamp": NOW_S,
        "ip": "1.2.3.4",
        "country": "US",
        "device": "mobile",
    }
    first = client.post("/api/v1/events/click", json=body)
    second = client.post("/api/v1/events/click", json=body)
    assert first.status_code == second.status_code == 202
    assert first.json()["event_id"] == second.json()["event_id"]
    event_id = first.json()["event_id"]
    wait_until(lambda: len(client.get(f"/events/{event_id}").json().get("copies", [])) == 2)
    traced = fate(client, event_id)
    assert [c["status"] for c in traced["copies"]] == ["counted", "duplicate"]
    metrics = client.get("/api/v1/ads/ad-api-2/metrics", params={"granularity": "minute"})
    assert [m["clicks"] for m in metrics.json()["metrics"]] == [1]
    assert metrics.json()["metrics"][0]["window_start"].endswith("Z")


def test_batch_reports_rejected_items_by_index_and_stores_the_rest(client: TestClient) -> None:
    items = [
        {"event_type": "impression", "event_id": "b-i1", "ad_id": "ad-api-3", "timestamp": NOW_S},
        {"event_type": "click", "event_id": "b-c1", "ad_id": "ad-api-3"},
        {"event_type": "click", "event_id": "b-c2", "ad_id": "ad-api-3", "timestamp": NOW_S * 1000},
        {"event_type": "bogus", "ad_id": "ad-api-3", "timestamp": NOW_S},
        {
            "event_type": "impression",
            "event_id": "b-i2",
            "ad_id": "ad-api-3",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW_S)),
        },
        {"event_type": "click", "event_id": "b-c3", "ad_id": "ad-api-3", "timestamp": NOW_S + 3600},
    ]
    response = client.post("/events/batch", json=items)
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 3
    rejected = {r["index"]: r["error"] for r in body["rejected"]}
    assert set(rejected) == {1, 3, 5}
    assert "timestamp" in rejected[1]
    assert "event_type" in rejected[3]
    assert "future" in rejected[5]
    wait_until(lambda: sum(r["impressions"] for r in clicks(client, "ad-api-3")) == 2)
    rows = clicks(client, "ad-api-3")
    # the three accepted items share one timestamp (seconds, milliseconds, ISO): one minute
    assert [(r["clicks"], r["impressions"], r["ctr"]) for r in rows] == [(1, 2, 0.5)]
    rejected_trace = client.get("/events/b-c3").json()
    assert rejected_trace["status"] == "rejected" and "future" in rejected_trace["reason"]


def test_ndjson_batch(client: TestClient) -> None:
    lines = [
        msgspec.json.encode(
            {"event_type": "click", "event_id": f"nd-{n}", "ad_id": "ad-api-4", "timestamp": NOW_S}
        )
        for n in range(50)
    ]
    body = b"\n".join(lines + lines[:5]) + b"\n\nnot json\n"
    response = client.post(
        "/events/batch", content=body, headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 202
    assert response.json()["accepted"] == 55
    assert [r["index"] for r in response.json()["rejected"]] == [55]
    wait_until(lambda: sum(r["clicks"] for r in clicks(client, "ad-api-4")) == 50)
    time.sleep(0.3)
    assert sum(r["clicks"] for r in clicks(client, "ad-api-4")) == 50


def test_late_event_goes_to_the_late_log(client: TestClient) -> None:
    """An event far behind its partition's max event time is late, not counted."""
    same_partition = [
        f"late-{n}" for n in range(200) if ids.partition_for_id(ids.CLICK, f"late-{n}", 4) == 0
    ][:2]
    recent, old = same_partition
    client.post("/events/click", json={"click_id": recent, "ad_id": "ad-api-5", "timestamp": NOW_S})
    assert fate(client, recent)["status"] == "counted"
    response = client.post(
        "/events/click", json={"click_id": old, "ad_id": "ad-api-5", "timestamp": NOW_S - 3600}
    )
    assert response.status_code == 202 and response.json()["partition"] == 0
    traced = fate(client, old)
    assert traced["status"] == "late"
    assert "watermark" in traced["reason"]
    hour = client.get("/aggregates", params={"ad_id": "ad-api-5", "last": "2h"}).json()
    assert sum(r["clicks"] for r in hour) == 1


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/events/click", b"{not json", "malformed"),
        ("/events/click", b'{"ad_id": 1.5, "timestamp": 1}', "ad_id"),
        ("/events/click", b'{"ad_id": "a"}', "timestamp"),
        ("/events/click", b'{"ad_id": "a", "timestamp": "yesterday"}', "timestamp"),
        ("/events/click", b'{"ad_id": "a", "timestamp": 5}', "2000"),
        (
            "/events/click",
            b'{"ad_id": "a", "timestamp": 1700000000, "cost_micros": -1}',
            "cost_micros",
        ),
        (
            "/events/click",
            b'{"ad_id": "a", "timestamp": 1700000000, "event_type": "impression"}',
            "event_type",
        ),
        ("/events/click", b"[]", "object"),
        ("/events/click", b"", "empty"),
        ("/events/batch", b'{"a": 1}', "array"),
        ("/events/batch", b"[]", "empty"),
        ("/events/batch", b'[{"ad_id": "a", "timestamp": 1700000000}]', "event_type"),
    ],
)
def test_bad_input_is_a_400_naming_the_problem(
    client: TestClient, path: str, body: bytes, needle: str
) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["error"]
    assert needle.lower() in (payload["detail"] + str(payload.get("rejected", ""))).lower()


def test_oversize_body_and_batch_are_413(client: TestClient) -> None:
    huge = b'{"ad_id": "a", "timestamp": 1700000000, "ip": "' + b"x" * 300_000 + b'"}'
    assert client.post("/events/click", content=huge).status_code == 413
    many = [{"event_type": "click", "ad_id": "a", "timestamp": NOW_S}] * 1001
    response = client.post("/events/batch", json=many)
    assert response.status_code == 413
    assert "1001" in response.json()["detail"]


SINGLE_EVENT_BODIES = [
    b'{"click_id": "same-answer-1", "ad_id": "ad-same", "timestamp": %d, "user_agent": "x"}',
    b'{"ad_id": "ad-same", "timestamp": %d, "country": "de", "cost_micros": 7}',
    b'{"click_id": "same-answer-2", "timestamp": %d}',  # no ad_id
    b'{"click_id": "same-answer-3", "ad_id": "a", "timestamp": 5}',  # before 2000
    b'{"ad_id": "a", "timestamp": %d, "event_type": "impression"}',  # wrong endpoint
    b'{"ad_id": "a", "timestamp": "yesterday"}',
    b'{"ad_id": "a", "timestamp": %d, "cost_micros": -1}',
    b'{"ad_id": "a", "timestamp": ',  # truncated
    b"[1, 2]",
    b"   ",
]


def asgi_post(client: TestClient, path: str, messages: list[bytes]) -> tuple[int, Any, Any]:
    """POST straight to the ASGI app, the body in the given ``http.request`` messages
    (the HTTP test client always hands the app a body in one message)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json")],
    }
    pending = [
        {"type": "http.request", "body": chunk, "more_body": n < len(messages) - 1}
        for n, chunk in enumerate(messages)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def call() -> None:
        await client.app(scope, receive, send)  # type: ignore[arg-type]

    assert client.portal is not None
    client.portal.call(call)
    start, body = sent
    headers = dict(start["headers"])
    assert int(headers[b"content-length"]) == len(body["body"])
    return start["status"], headers[b"content-type"], msgspec.json.decode(body["body"])


@pytest.mark.parametrize("template", SINGLE_EVENT_BODIES)
def test_a_body_in_one_message_gets_the_answer_of_one_in_pieces(
    client: TestClient, template: bytes
) -> None:
    """A single event's body comes in one ASGI message, which ``read_body`` takes without
    the chunk loop; the same bytes in pieces go through the loop. The answer (status,
    body, headers) must not depend on which, and must be what the HTTP client sees."""
    body = template % NOW_S if b"%d" in template else template
    whole = asgi_post(client, "/events/click", [body])
    pieces = asgi_post(client, "/events/click", [body[i : i + 7] for i in range(0, len(body), 7)])
    assert whole == pieces
    status, _, answer = whole
    over_http = client.post("/events/click", content=body)
    assert (over_http.status_code, over_http.json()) == (status, answer)
    if status == 202:
        assert answer["accepted"] == 1 and answer["event_id"]
    else:
        assert status == 400 and answer["detail"], answer


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({}, "ad_id"),
        ({"ad_id": "a", "granularity": "week"}, "granularity"),
        ({"ad_id": "a", "group_by": "os"}, "group_by"),
        ({"ad_id": "a", "start": "noon"}, "start"),
        ({"ad_id": "a", "start": "2025-01-02T00:00:00Z", "end": "2025-01-01T00:00:00Z"}, "before"),
        ({"ad_id": "a", "last": "forever"}, "last"),
        ({"ad_id": "a", "granularity": "minute", "last": "90d"}, "too long"),
    ],
)
def test_bad_queries_are_400(client: TestClient, params: dict[str, str], needle: str) -> None:
    response = client.get("/aggregates", params=params)
    assert response.status_code == 400
    assert needle in response.json()["detail"]


def test_rollups_realtime_and_ranges(client: TestClient) -> None:
    ad = "ad-api-6"
    items = [
        {
            "event_type": "click",
            "event_id": f"r-{n}",
            "ad_id": ad,
            "timestamp": NOW_S - n,
            "country": "DE" if n % 2 else "FR",
            "user_id": f"u{n % 3}",
            "cost_micros": 1000,
        }
        for n in range(10)
    ]
    assert client.post("/events/batch", json=items).status_code == 202
    wait_until(lambda: sum(r["clicks"] for r in clicks(client, ad)) == 10)
    for granularity in ("hour", "day"):
        rows = client.get(
            "/aggregates", params={"ad_id": ad, "granularity": granularity, "last": "7d"}
        ).json()
        assert sum(r["clicks"] for r in rows) == 10
        assert rows[0]["window"].endswith(":00:00Z")
    by_country = client.get(
        "/aggregates", params={"ad_id": ad, "granularity": "day", "group_by": "country"}
    ).json()
    assert {r["country"]: r["clicks"] for r in by_country} == {"DE": 5, "FR": 5}
    day = client.get("/aggregates", params={"ad_id": ad, "granularity": "day"}).json()
    assert day[0]["spend_micros"] == 10_000 and day[0]["unique_users"] == 3
    realtime = client.get("/aggregates/realtime", params={"ad_id": ad, "window": "1h"}).json()
    assert realtime["clicks"] == 10 and realtime["as_of"].endswith("Z")
    assert (
        client.get("/aggregates/realtime", params={"ad_id": ad, "window": "2m"}).status_code == 400
    )
    v1 = client.get(f"/api/v1/ads/{ad}/metrics/realtime").json()
    assert v1["clicks_last_hour"] == 10
    assert v1["clicks_last_minute"] <= v1["clicks_last_5_minutes"] <= v1["clicks_last_hour"]
    empty = client.get(
        "/aggregates",
        params={"ad_id": ad, "start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"},
    )
    assert empty.json() == []


def test_unknown_event_is_404_with_a_reason(client: TestClient) -> None:
    response = client.get("/events/never-sent")
    assert response.status_code == 404
    assert "partition" in response.json()["detail"]


def test_metrics_expose_pipeline_counters(client: TestClient) -> None:
    def scrape() -> dict[str, dict[str, float]]:
        samples: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(client.get("/metrics").text):
            for sample in family.samples:
                if sample.name.startswith("clickagg_") and not sample.name.endswith("_created"):
                    labels = sample.labels
                    label = labels.get("partition") or labels.get("event_type") or ""
                    label = label or labels.get("granularity", "")
                    if "le" not in labels:
                        samples.setdefault(sample.name, {})[label] = sample.value
        return samples

    # Once the replica of the recent rows follows the worker, m-1 reaches it in a round.
    wait_until(lambda: scrape()["clickagg_replica_live"] == {"": 1})
    response = client.post(
        "/events/click",
        json={"click_id": "m-1", "ad_id": "ad-m", "user_id": "u-m", "timestamp": NOW_S},
    )
    partition = str(response.json()["partition"])
    fate(client, "m-1")
    samples = wait_until(
        lambda: (found := scrape())["clickagg_replica_rounds_total"][""] >= 1 and found
    )
    # the names dashboards, the demo and the e2e tests read
    assert set(samples) == {
        "clickagg_events_accepted_total",
        "clickagg_events_rejected_total",
        "clickagg_ingest_unavailable_total",
        "clickagg_ingest_durable_seconds_count",
        "clickagg_ingest_durable_seconds_sum",
        "clickagg_partition_durable_end_offset",
        "clickagg_partition_committed_offset",
        "clickagg_partition_lag_events",
        "clickagg_partition_archived_offset",
        "clickagg_partition_archive_lag_events",
        "clickagg_partition_watermark_delay_seconds",
        "clickagg_partition_events_counted",
        "clickagg_partition_events_duplicate",
        "clickagg_partition_events_late",
        "clickagg_partition_events_invalid",
        "clickagg_worker_restarts",
        "clickagg_connections_refused_total",
        "clickagg_log_partition_damaged",
        "clickagg_disk_free_bytes",
        "clickagg_disk_reserve_bytes",
        "clickagg_store_up",
        "clickagg_replica_live",
        "clickagg_replica_snapshots_total",
        "clickagg_replica_rounds_total",
        "clickagg_replica_cells",
        "clickagg_replica_sketch_bytes",
    }
    assert samples["clickagg_store_up"] == {"": 1}
    partitions = {str(p) for p in range(4)}
    assert samples["clickagg_log_partition_damaged"] == dict.fromkeys(partitions, 0)
    assert samples["clickagg_events_accepted_total"]["click"] >= 1
    assert samples["clickagg_ingest_durable_seconds_count"][""] >= 1
    durable = samples["clickagg_partition_durable_end_offset"]
    committed = samples["clickagg_partition_committed_offset"]
    lag = samples["clickagg_partition_lag_events"]
    assert set(durable) == set(committed) == set(lag) == partitions
    for p in partitions:
        assert lag[p] == max(0, durable[p] - committed[p])
    assert committed[partition] >= 1  # m-1 is counted, so its partition has committed it
    assert samples["clickagg_partition_events_counted"][partition] >= 1
    for name in ("duplicate", "late", "invalid"):
        assert partition in samples[f"clickagg_partition_events_{name}"]
    assert samples["clickagg_worker_restarts"] == {"": 0}
    # the replica of the recent rows follows the worker and holds m-1's minute and hour
    assert samples["clickagg_replica_live"] == {"": 1}
    assert samples["clickagg_replica_snapshots_total"] == {"": 1}
    assert set(samples["clickagg_replica_cells"]) == {"minute", "hour"}
    assert samples["clickagg_replica_cells"]["minute"] >= 1
    assert samples["clickagg_replica_cells"]["hour"] >= 1
    assert samples["clickagg_replica_sketch_bytes"]["minute"] > 0
    assert samples["clickagg_replica_sketch_bytes"]["hour"] > 0
