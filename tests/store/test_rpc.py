"""Queries across processes: the query server over a real DuckDB store, the async client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clickagg.realtime.memory import InMemoryCounters
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.store.rpc import QueryClient, QueryError, QueryServer


def test_round_trip_and_errors(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "agg.duckdb")
    counters = InMemoryCounters()
    server = QueryServer(tmp_path / "q.sock", store, counters)
    server.start()

    async def scenario() -> None:
        client = QueryClient(tmp_path / "q.sock", pool_size=2)
        assert await client.ping()
        results = await asyncio.gather(
            *(client.call("totals", ad_id="a", start_ms=0, end_ms=10**13) for _ in range(10))
        )
        assert all(r.clicks == 0 for r in results)
        assert await client.call("partition_status") == []
        window = await client.call("window", ad_id="a", start_ms=0, end_ms=10**13)
        assert window.clicks == 0
        with pytest.raises(QueryError, match="unknown method"):
            await client.call("drop_everything")
        with pytest.raises(QueryError, match="TypeError"):
            await client.call("totals", nonsense=1)
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
        store.close()
    assert not (tmp_path / "q.sock").exists()


def test_ping_is_false_without_a_server(tmp_path: Path) -> None:
    async def scenario() -> bool:
        return await QueryClient(tmp_path / "none.sock").ping()

    assert asyncio.run(scenario()) is False
