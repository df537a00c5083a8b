"""The HTTP layer over any QueryStore: the composition root takes one in place of the
worker process's query server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from clickagg.compose import create_app
from clickagg.config import Settings
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.query.base import (
    AdTotals,
    AggregateRow,
    Dimension,
    Granularity,
    KeyedStatus,
    PartitionStatus,
    QueryError,
    QueryStore,
    RankBy,
    RollupLevel,
    StoreUnavailable,
    Totals,
)

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS


class FakeQueryStore:
    """Canned answers; records what it was asked. ``failure`` makes every query raise."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.failure: Exception | None = None
        self.closed = False
        self.started = False

    def _ask(self, method: str, **kwargs: Any) -> None:
        self.asked.append((method, kwargs))
        if self.failure is not None:
            raise self.failure

    async def aggregates(
        self,
        *,
        ad_id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        self._ask("aggregates", ad_id=ad_id, granularity=granularity, group_by=group_by)
        return [AggregateRow(T0, "US" if group_by else None, 3, 60, 4_500_000, 2, 0)]

    async def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        self._ask("totals", ad_id=ad_id)
        return Totals(0, 0, 0, 0, 0)

    async def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        self._ask("window", ad_id=ad_id, minutes=(end_ms - start_ms) // MINUTE_MS)
        return Totals(7, 70, 700_000, 0, 0)

    async def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        self._ask("top_ads")
        return []

    async def rollup(
        self,
        *,
        level: RollupLevel,
        id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        self._ask("rollup")
        return []

    async def partition_status(self) -> list[PartitionStatus]:
        self._ask("partition_status")
        return [PartitionStatus(0, 5, T0, T0, 4, 1, 0, 0, T0)]

    async def keyed_status(self) -> KeyedStatus:
        self._ask("keyed_status")
        return KeyedStatus(partitions=[], corrections_by_rule={})

    async def ping(self) -> bool:
        return self.failure is None

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[TestClient, FakeQueryStore]]:
    store = FakeQueryStore()
    typed: QueryStore = store  # mypy would reject a fake that drifted from the Protocol
    settings = Settings(data_dir=tmp_path / "data", partitions=1)
    with TestClient(create_app(settings, manage_worker=False, query_store=typed)) as client:
        yield client, store
    assert store.started and store.closed


def test_queries_are_answered_from_the_given_store(
    fake: tuple[TestClient, FakeQueryStore],
) -> None:
    client, store = fake
    response = client.get(
        "/aggregates", params={"ad_id": "ad-1", "granularity": "hour", "group_by": "country"}
    )
    assert response.status_code == 200, response.text
    assert response.json() == [
        {
            "window": "2023-11-14T22:00:00Z",
            "country": "US",
            "clicks": 3,
            "impressions": 60,
            "ctr": 0.05,
            "spend": 4.5,
            "spend_micros": 4_500_000,
            "unique_users": 2,
            "invalid_clicks": 0,
            "final": False,
        }
    ]
    realtime = client.get("/aggregates/realtime", params={"ad_id": "ad-1", "window": "5m"})
    assert realtime.json()["clicks"] == 7
    assert store.asked == [
        ("aggregates", {"ad_id": "ad-1", "granularity": "hour", "group_by": "country"}),
        ("window", {"ad_id": "ad-1", "minutes": 5}),
    ]
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    assert 'clickagg_partition_committed_offset{partition="0"} 5.0' in metrics
    assert "clickagg_replica_" not in metrics  # a store without a replica: no such figures


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (StoreUnavailable("worker restarting"), "store unavailable"),
        (QueryError("TypeError: boom"), "store error"),
    ],
)
def test_a_store_that_cannot_answer_is_a_503(
    fake: tuple[TestClient, FakeQueryStore], failure: Exception, error: str
) -> None:
    client, store = fake
    store.failure = failure
    for path in ("/aggregates?ad_id=a", "/aggregates/realtime?ad_id=a"):
        response = client.get(path)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"] == error
    assert client.get("/healthz").status_code == 503
    # A scrape leaves the store's figures out and says so, rather than failing.
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "\nclickagg_store_up 0.0\n" in metrics.text
    assert "clickagg_partition_committed_offset{" not in metrics.text
    assert "clickagg_partition_durable_end_offset{" in metrics.text
