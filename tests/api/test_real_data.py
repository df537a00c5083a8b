"""Real public click data (TalkingData sample) through the HTTP API, checked against DuckDB.

The sample has no click id, so ids are synthesized from the payload: its one exact
duplicate row must count once. Rows are sent in time order, as an ad server would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import msgspec
import pytest
from starlette.testclient import TestClient

from clickagg.compose import create_app
from clickagg.config import Settings

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "talkingdata_train_sample.csv"
pytestmark = pytest.mark.skipif(
    not DATA.exists(), reason=f"TalkingData sample not found at {DATA} (see shared/data/README)"
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("real"), partitions=4)
    with TestClient(create_app(settings)) as test_client:
        deadline = time.monotonic() + 30
        while test_client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield test_client


def test_talkingdata_minute_counts_match_duckdb(client: TestClient) -> None:
    rows = duckdb.sql(
        f"SELECT ip, app, device, os, channel, "
        f"epoch_ms(click_time::TIMESTAMP) AS ts FROM read_csv('{DATA}') ORDER BY ts"
    ).fetchall()
    assert len(rows) == 100_000
    events = [
        {
            "event_type": "click",
            "ad_id": f"ch-{channel}",
            "timestamp": ts,
            "user_id": f"{ip}",
            "ip": str(ip),
            "device": f"d{device}",
            "campaign_id": f"app-{app}",
            "browser": f"os-{os}",
        }
        for ip, app, device, os, channel, ts in rows
    ]
    accepted = 0
    for start in range(0, len(events), 20_000):
        body = b"\n".join(msgspec.json.encode(e) for e in events[start : start + 20_000])
        response = client.post(
            "/events/batch", content=body, headers={"content-type": "application/x-ndjson"}
        )
        assert response.status_code == 202, response.text
        accepted += response.json()["accepted"]
    assert accepted == 100_000

    expected = duckdb.sql(
        f"SELECT 'ch-' || channel AS ad, count(*) AS clicks FROM "
        f"(SELECT DISTINCT * FROM read_csv('{DATA}')) GROUP BY ALL ORDER BY clicks DESC LIMIT 5"
    ).fetchall()
    deadline = time.monotonic() + 60
    while True:
        got = {
            ad: sum(
                r["clicks"]
                for r in client.get(
                    "/aggregates",
                    params={
                        "ad_id": ad,
                        "granularity": "day",
                        "start": "2017-11-06T00:00:00Z",
                        "end": "2017-11-10T00:00:00Z",
                    },
                ).json()
            )
            for ad, _ in expected
        }
        if got == dict(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == dict(expected)
    busiest = expected[0][0]
    minute_expected = duckdb.sql(
        f"SELECT strftime(date_trunc('minute', click_time::TIMESTAMP), '%Y-%m-%dT%H:%M:%SZ'), "
        f"count(*) FROM (SELECT DISTINCT * FROM read_csv('{DATA}')) "
        f"WHERE 'ch-' || channel = '{busiest}' AND click_time < '2017-11-07' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    minutes = client.get(
        "/aggregates",
        params={
            "ad_id": busiest,
            "granularity": "minute",
            "start": "2017-11-06T00:00:00Z",
            "end": "2017-11-07T00:00:00Z",
        },
    ).json()
    assert [(m["window"], m["clicks"]) for m in minutes] == minute_expected
    duplicate = client.get("/metrics").text
    assert 'clickagg_partition_events_duplicate{partition="' in duplicate
    dup_total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in duplicate.splitlines()
        if line.startswith("clickagg_partition_events_duplicate{")
    )
    assert dup_total == 1  # file lines 64364 and 84127 are the same click
