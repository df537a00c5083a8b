"""``POST /rules/replay`` on the real app: clicks sent over HTTP, counted by the real
worker, archived, then candidate rules replayed over them; bad candidates are 400s naming
the problem."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from clickagg.api.timefmt import iso
from clickagg.compose import create_app
from clickagg.config import Settings
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from tests.api.test_app import wait_until

BURST_IP = "203.0.113.9"
BURST = 15
COST = 3000
LOWER_VELOCITY = """\
include_builtin = true
[[rules]]
id = "ip-click-velocity"
kind = "ip_click_velocity"
reason = "click burst from one address"
[rules.params]
max_clicks_per_minute = 10
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, int]]:
    """A server that counted a burst of clicks from one address in one minute (below the
    built-in velocity limit) and a few ordinary ones, all archived."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("replay") / "data", partitions=2)
    now_ms = int(time.time() * 1000)
    minute = now_ms - now_ms % MINUTE_MS
    events: list[dict[str, Any]] = [
        {
            "event_type": "click",
            "event_id": f"burst{i}",
            "ad_id": "ad-b",
            "advertiser_id": "adv-1",
            "timestamp": minute + i,
            "ip": BURST_IP,
            "cost_micros": COST,
        }
        for i in range(BURST)
    ]
    events += [
        {
            "event_type": "click",
            "event_id": f"calm{i}",
            "ad_id": "ad-c",
            "advertiser_id": "adv-2",
            "timestamp": minute + i,
            "ip": f"198.51.100.{i}",
            "cost_micros": COST,
        }
        for i in range(5)
    ]
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: client.get("/healthz").status_code == 200)
        response = client.post("/events/batch", json=events)
        assert response.status_code == 202 and response.json()["accepted"] == len(events)
        for event in events:
            wait_until(lambda e=event: client.get(f"/events/{e['event_id']}").status_code == 200)
        yield client, minute - minute % HOUR_MS


def replay(client: TestClient, **body: Any) -> Any:
    return client.post("/rules/replay", json=body)


def test_a_lower_velocity_limit_flips_the_burst(served: tuple[TestClient, int]) -> None:
    client, hour = served
    response = replay(
        client, rules=LOWER_VELOCITY, since=iso(hour), until=iso(hour + HOUR_MS), limit=4
    )
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["hours"] == 1 and report["since"] == iso(hour)
    assert report["flipped_total"] == BURST and len(report["flipped"]) == 4
    for flip in report["flipped"]:
        assert flip["event_id"].startswith("burst") and flip["ip"] == BURST_IP
        assert flip["now_reason"] is None
        assert flip["candidate_reason"].startswith("ip-click-velocity: click burst")
    ads = {ad["ad_id"]: ad for ad in report["ads"]}
    assert ads["ad-b"]["advertiser_id"] == "adv-1"
    assert (ads["ad-b"]["now_clicks"], ads["ad-b"]["candidate_clicks"]) == (BURST, 0)
    assert ads["ad-b"]["delta_spend_micros"] == -BURST * COST
    assert ads["ad-c"]["delta_clicks"] == 0 and ads["ad-c"]["now_clicks"] == 5
    advertisers = {a["advertiser_id"]: a for a in report["advertisers"]}
    assert advertisers["adv-1"]["delta_clicks"] == -BURST
    assert report["total"]["delta_spend_micros"] == -BURST * COST
    assert "ip-click-velocity" in report["candidate_rules"]["ids"]

    # The rules in force (the built-in ones) as the candidate: nothing changes.
    same = replay(client, rules="include_builtin = true\n", since=hour, until=hour + HOUR_MS)
    assert same.status_code == 200, same.text
    assert same.json()["flipped_total"] == 0 and same.json()["total"]["delta_clicks"] == 0


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"rules": "include_builtin = ", "since": "2025-01-15T10"}, "not a TOML file"),
        ({"rules": LOWER_VELOCITY.replace("ip_click", "ip_clack"), "since": 0}, "unknown kind"),
        (
            {"rules": LOWER_VELOCITY.replace("= 10", "= -1.5"), "since": 0},
            "max_clicks_per_minute",
        ),
        (
            {
                "rules": '[[rules]]\nid="x"\nkind="ip_blocklist"\nreason="r"\n'
                '[[rules.params.lists]]\nname="l"\nfile="/etc/passwd"\n',
                "since": 0,
            },
            "may not name files",
        ),
        ({"rules": "", "since": "yesterday"}, "is not a time"),
        ({"rules": "", "since": 0, "until": 40 * DAY_MS}, "period too long"),
        ({"rules": "", "since": 2 * HOUR_MS, "until": HOUR_MS}, "must be before until"),
        ({"rules": "", "since": 0, "limit": -1}, "limit"),
        ({"rules": "", "since": 0, "extra": 1}, "extra"),
        ({"since": 0}, "rules"),
    ],
)
def test_bad_requests_are_400s_naming_the_problem(
    served: tuple[TestClient, int], body: dict[str, Any], named: str
) -> None:
    client, _ = served
    response = client.post("/rules/replay", json=body)
    assert response.status_code == 400, response.text
    assert named in response.json()["detail"], response.text


def test_an_empty_period_of_the_archive_reports_nothing(
    served: tuple[TestClient, int], tmp_path: Path
) -> None:
    client, hour = served
    response = replay(client, rules="", since=hour - DAY_MS, until=hour)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["hours"], body["events"], body["ads"], body["flipped_total"]) == (24, 0, [], 0)
