"""The admin endpoints in-process (real app, real data dir, no worker): the token guard,
every endpoint's answer and what it records, and bad input refused with a 4xx naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from clickagg.clock import FixedClock
from clickagg.compose import create_app
from clickagg.config import Settings

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
OPS = {"Authorization": "Bearer s3cret"}
BARE = {"Authorization": "Bearer other"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("admin") / "data"


@pytest.fixture(scope="module")
def clock() -> FixedClock:
    return FixedClock(NOW_MS)


@pytest.fixture(scope="module")
def client(data_dir: Path, clock: FixedClock) -> Iterator[TestClient]:
    settings = Settings(data_dir=data_dir, partitions=1, admin_token="ops:s3cret, other")
    with TestClient(create_app(settings, clock=clock, manage_worker=False)) as test_client:
        yield test_client


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


ADMIN_REQUESTS = [
    ("GET", "/admin/ads", None),
    ("PUT", "/admin/ads/a", {"status": "paused"}),
    ("GET", "/admin/advertisers", None),
    ("PUT", "/admin/advertisers/adv", {"name": "Acme"}),
    ("GET", "/admin/blocklist", None),
    ("POST", "/admin/blocklist", {"cidrs": ["192.0.2.1"]}),
    ("DELETE", "/admin/blocklist/192.0.2.1", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_REQUESTS)
def test_admin_is_off_without_the_setting(
    tmp_path: Path, method: str, path: str, body: Any
) -> None:
    settings = Settings(data_dir=tmp_path / "data", partitions=1)
    with TestClient(create_app(settings, manage_worker=False)) as off:
        response = off.request(method, path, json=body, headers=OPS)
    assert response.status_code == 403
    assert "CLICKAGG_ADMIN_TOKEN" in response.json()["detail"]
    assert not (tmp_path / "data" / "registry").exists()
    assert not (tmp_path / "data" / "rules" / "blocklist.jsonl").exists()


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_REQUESTS)
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}]
)
def test_a_missing_or_wrong_token_is_401(
    client: TestClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in response.json()["detail"]


def test_ads_are_set_from_a_time_on_and_read_as_of_a_time(
    client: TestClient, data_dir: Path
) -> None:
    later = NOW_MS + 3_600_000
    response = client.put(
        "/admin/ads/ad-1",
        json={"cpc_micros": 250_000, "advertiser_id": "adv-1", "campaign_id": "spring"},
        headers=OPS,
    )
    assert response.status_code == 200, response.text
    assert response.json()["ad"] == {
        "ad_id": "ad-1",
        "cpc_micros": 250_000,
        "advertiser_id": "adv-1",
        "campaign_id": "spring",
        "status": "active",
        "since_ms": NOW_MS,
    }
    response = client.put(
        "/admin/ads/ad-1",
        json={"status": "paused", "effective_from": "2026-01-01T01:00:00Z"},
        headers=BARE,
    )
    assert response.status_code == 200, response.text
    assert response.json()["by"] == "admin"
    now = client.get("/admin/ads", headers=OPS).json()
    assert [(a["ad_id"], a["status"]) for a in now["ads"]] == [("ad-1", "active")]
    then = client.get("/admin/ads", params={"at": str(later)}, headers=OPS).json()
    assert then["ads"][0]["status"] == "paused" and then["ads"][0]["cpc_micros"] == 250_000
    written = records(data_dir / "registry" / "prices.jsonl")[-2:]
    assert [(r["by"], r["recorded_ms"], r["effective_from_ms"]) for r in written] == [
        ("ops", NOW_MS, NOW_MS),
        ("admin", NOW_MS, later),
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"status": "deleted"}, "status must be one of"),
        ({"cpc_micros": -1}, "cpc_micros"),
        ({"cpc_micros": 1.5}, "cpc_micros"),
        ({"cpc_micros": 2**63}, "cpc_micros"),
        ({"advertiser_id": ""}, "advertiser_id"),
        ({"colour": "red"}, "colour"),
        ({}, "nothing to change"),
        ({"status": "paused", "effective_from": NOW_MS - 60_000}, "not from the past"),
        ({"status": "paused", "effective_from": "soon"}, "effective_from"),
        ({"status": "paused", "effective_from": True}, "effective_from"),
        ([1, 2], "JSON object"),
        ("not json", "not JSON"),
    ],
)
def test_a_bad_ad_change_is_400_naming_the_field(
    client: TestClient, body: Any, needle: str
) -> None:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    response = client.put("/admin/ads/ad-2", content=content, headers=OPS)
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]
    ads = client.get("/admin/ads", params={"at": str(NOW_MS + 10**9)}, headers=OPS).json()["ads"]
    assert "ad-2" not in {a["ad_id"] for a in ads}


def test_advertisers_are_described_and_listed(client: TestClient, data_dir: Path) -> None:
    response = client.put(
        "/admin/advertisers/adv-1",
        json={"name": "Acme", "currency": "EUR", "time_zone": "Europe/Paris"},
        headers=OPS,
    )
    assert response.status_code == 200, response.text
    response = client.put("/admin/advertisers/adv-1", json={"currency": "JPY"}, headers=OPS)
    assert response.json()["advertiser"] == {
        "advertiser_id": "adv-1",
        "name": "Acme",
        "currency": "JPY",
        "time_zone": "Europe/Paris",
    }
    listed = client.get("/admin/advertisers", headers=OPS).json()["advertisers"]
    assert listed == [response.json()["advertiser"]]
    assert {r["by"] for r in records(data_dir / "registry" / "advertisers.jsonl")} == {"ops"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"currency": "eur"}, "currency"),
        ({"currency": "EURO"}, "currency"),
        ({"name": ""}, "name"),
        ({"fax": "1"}, "fax"),
        ({}, "nothing to change"),
    ],
)
def test_a_bad_advertiser_is_400_naming_the_field(
    client: TestClient, body: dict[str, Any], needle: str
) -> None:
    response = client.put("/admin/advertisers/adv-2", json=body, headers=OPS)
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]


def test_the_blocklist_is_added_to_listed_and_removed_from(
    client: TestClient, data_dir: Path
) -> None:
    response = client.post(
        "/admin/blocklist",
        json={"cidrs": ["203.0.113.0/24", "2001:db8::1"], "reason": "abuse"},
        headers=OPS,
    )
    assert response.json() == {"added": ["203.0.113.0/24", "2001:db8::1/128"], "by": "ops"}
    listed = client.get("/admin/blocklist", headers=OPS).json()["entries"]
    assert listed == [
        {"cidr": "2001:db8::1/128", "since_ms": NOW_MS, "by": "ops", "reason": "abuse"},
        {"cidr": "203.0.113.0/24", "since_ms": NOW_MS, "by": "ops", "reason": "abuse"},
    ]
    response = client.delete("/admin/blocklist/203.0.113.0%2F24", headers=BARE)
    assert response.json() == {"removed": "203.0.113.0/24", "by": "admin"}
    response = client.delete("/admin/blocklist/203.0.113.0%2F24", headers=BARE)
    assert response.status_code == 404 and "not on the blocklist" in response.json()["detail"]
    ops = [(r["op"], r["cidr"], r["by"]) for r in records(data_dir / "rules" / "blocklist.jsonl")]
    assert ops == [
        ("add", "203.0.113.0/24", "ops"),
        ("add", "2001:db8::1/128", "ops"),
        ("remove", "203.0.113.0/24", "admin"),
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"cidrs": ["203.0.113.0/33"]}, "not an IP address or CIDR: '203.0.113.0/33'"),
        ({"cidrs": ["192.0.2.1", "nope"]}, "'nope'"),
        ({"cidrs": [7]}, "CIDR"),
        ({"cidrs": []}, "cidrs must be an array"),
        ({"cidrs": "192.0.2.1"}, "cidrs must be an array"),
        ({"cidrs": ["192.0.2.1"], "reason": 5}, "reason"),
        ({"cidrs": ["192.0.2.1"], "why": "x"}, "why"),
    ],
)
def test_a_bad_blocklist_body_is_400_and_nothing_is_listed(
    client: TestClient, body: dict[str, Any], needle: str
) -> None:
    before = client.get("/admin/blocklist", headers=OPS).json()
    response = client.post("/admin/blocklist", json=body, headers=OPS)
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]
    assert client.get("/admin/blocklist", headers=OPS).json() == before


def test_deleting_a_bad_cidr_is_400(client: TestClient) -> None:
    response = client.delete("/admin/blocklist/not-an-ip", headers=OPS)
    assert response.status_code == 400 and "not-an-ip" in response.json()["detail"]


def test_the_document_lists_the_admin_operations_with_their_security(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    admin = {p: ops for p, ops in spec["paths"].items() if p.startswith("/admin")}
    assert set(admin) == {
        "/admin/ads",
        "/admin/ads/{ad_id}",
        "/admin/advertisers",
        "/admin/advertisers/{advertiser_id}",
        "/admin/blocklist",
        "/admin/blocklist/{cidr}",
    }
    for operations in admin.values():
        for operation in operations.values():
            assert operation["security"] == [{"adminToken": []}]
            assert {"401", "403"} <= set(operation["responses"])
