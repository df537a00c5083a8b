"""Spend: the event's cost_micros, else the ad's CPC from the registry, else 0."""

from __future__ import annotations

import time
from pathlib import Path

from starlette.testclient import TestClient

from clickagg.compose import create_app
from clickagg.config import Settings


def test_spend_uses_cost_then_registry_price(tmp_path: Path) -> None:
    ads = tmp_path / "ads.csv"
    ads.write_text("ad_id,cpc_micros\nad-priced,250000\n")
    settings = Settings(data_dir=tmp_path / "data", partitions=2, ads_file=ads)
    now = int(time.time())
    events = [
        {"event_type": "click", "event_id": "s1", "ad_id": "ad-priced", "timestamp": now},
        {
            "event_type": "click",
            "event_id": "s2",
            "ad_id": "ad-priced",
            "timestamp": now,
            "cost_micros": 1_000_000,
        },
        {"event_type": "impression", "event_id": "s3", "ad_id": "ad-priced", "timestamp": now},
        {"event_type": "click", "event_id": "s4", "ad_id": "ad-unpriced", "timestamp": now},
    ]
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/events/batch", json=events).status_code == 202

        def spend(ad: str) -> tuple[int, int]:
            rows = client.get("/aggregates", params={"ad_id": ad, "last": "1h"}).json()
            return sum(r["clicks"] for r in rows), sum(r["spend_micros"] for r in rows)

        while spend("ad-priced")[0] < 2 or spend("ad-unpriced")[0] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert spend("ad-priced") == (2, 1_250_000)
        assert spend("ad-unpriced") == (1, 0)
