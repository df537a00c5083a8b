"""Queries across processes: the query server over a real DuckDB store, the typed async
client (:class:`RpcQueryStore`)."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import threading
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from clickagg.core import ids
from clickagg.core.processor import PartitionProcessor, PartitionState
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.query.base import QueryError, QueryStore, StoreUnavailable
from clickagg.realtime.memory import InMemoryCounters
from clickagg.store.base import AggregateRow, PartitionCommit, Totals
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.store.rpc import QueryServer, RpcQueryStore
from tests.conftest import Ev, frame_of

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS  # an hour's start
# One partition's log: two minutes of ad "a", one click of ad "b", a duplicate and a late one.
EVENTS = [
    Ev("c1", "a", T0 + 10_000, user_id="u1", country="US", device="mobile", cost_micros=1000),
    Ev("c2", "a", T0 + 20_000, user_id="u2", country="DE", device="desktop", cost_micros=2000),
    Ev("c1", "a", T0 + 25_000, user_id="u1", country="US", device="mobile", cost_micros=1000),
    Ev("i1", "a", T0 + 30_000, ids.IMPRESSION, user_id="u1", country="US", device="mobile"),
    Ev("c3", "a", T0 + 61_000, user_id="u1", country="US", device="mobile", cost_micros=500),
    Ev("b1", "b", T0 + 5_000, user_id="u9", cost_micros=700),
    Ev("old", "a", T0 - 10 * MINUTE_MS, user_id="u3", cost_micros=9000),
]
SPAN = {"start_ms": T0, "end_ms": T0 + HOUR_MS}


def commit_events(store: DuckDBStore, counters: InMemoryCounters) -> None:
    """What a worker round does: process the events, commit, then feed the counters."""
    processor = PartitionProcessor(
        PartitionState.empty(0), allowed_lateness_ms=5 * MINUTE_MS, dedup_horizon_ms=HOUR_MS
    )
    outcome = processor.process(frame_of(EVENTS))
    assert outcome is not None
    carried = {
        f.name: getattr(outcome, f.name)
        for f in dataclasses.fields(PartitionCommit)
        if f.name not in ("partition", "committed_at_ms")
    }
    store.commit(PartitionCommit(partition=0, committed_at_ms=T0 + HOUR_MS, **carried))
    counters.apply(outcome.minute_deltas, {0: (outcome.from_offset, outcome.to_offset)})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, DuckDBStore]]:
    store = DuckDBStore(tmp_path / "agg.duckdb")
    counters = InMemoryCounters()
    commit_events(store, counters)
    server = QueryServer(tmp_path / "q.sock", store, counters)
    server.start()
    try:
        yield tmp_path / "q.sock", store
    finally:
        server.stop()
        store.close()
    assert not (tmp_path / "q.sock").exists()


def row(
    window_ms: int, group: str | None, *, clicks: int, impressions: int, spend: int, users: int
) -> AggregateRow:
    return AggregateRow(window_ms, group, clicks, impressions, spend, users, invalid_clicks=0)


def test_committed_rows_cross_the_socket(served: tuple[Path, DuckDBStore]) -> None:
    path, store = served

    async def scenario() -> None:
        client = RpcQueryStore(path, pool_size=2)
        queries: QueryStore = client  # the adapter implements the role
        assert await queries.ping()

        minutes = await client.aggregates(ad_id="a", granularity="minute", **SPAN)
        assert minutes == [
            row(T0, None, clicks=2, impressions=1, spend=3000, users=2),
            row(T0 + MINUTE_MS, None, clicks=1, impressions=0, spend=500, users=1),
        ]
        assert minutes == store.aggregates(ad_id="a", granularity="minute", **SPAN)
        hours = await client.aggregates(ad_id="a", granularity="hour", **SPAN)
        assert hours == [row(T0, None, clicks=3, impressions=1, spend=3500, users=2)]
        by_country = await client.aggregates(
            ad_id="a", granularity="hour", group_by="country", **SPAN
        )
        assert [(r.group, r.clicks, r.impressions) for r in by_country] == [
            ("DE", 1, 0),
            ("US", 2, 1),
        ]

        # ten at once over a pool of two: each answer is its own, none mixed up
        totals = await asyncio.gather(
            *(client.totals(ad_id=ad, **SPAN) for ad in ["a", "b", "none"] * 4)
        )
        assert totals[:3] == [
            Totals(clicks=3, impressions=1, spend_micros=3500, unique_users=2, invalid_clicks=0),
            Totals(clicks=1, impressions=0, spend_micros=700, unique_users=1, invalid_clicks=0),
            Totals(clicks=0, impressions=0, spend_micros=0, unique_users=0, invalid_clicks=0),
        ]
        assert totals == totals[:3] * 4

        window = await client.window(ad_id="a", start_ms=T0, end_ms=T0 + MINUTE_MS)
        assert window == Totals(
            clicks=2, impressions=1, spend_micros=3000, unique_users=0, invalid_clicks=0
        )

        (status,) = await client.partition_status()
        assert (status.partition, status.committed_offset) == (0, len(EVENTS))
        assert (status.counted, status.duplicates, status.late, status.invalid) == (5, 1, 1, 0)
        assert status.max_event_ms == T0 + 61_000
        assert [status] == store.partition_status()

        # the store's other reads, typed end to end
        top = await client.top_ads(**SPAN)
        assert [(t.ad_id, t.clicks) for t in top] == [("a", 3), ("b", 1)]
        assert top == store.top_ads(**SPAN)
        rollup = {"level": "advertiser", "id": top[0].advertiser_id, "granularity": "hour"}
        assert await client.rollup(**rollup, **SPAN) == store.rollup(**rollup, **SPAN) != []

        # an error answer is a QueryError and leaves the connection usable
        with pytest.raises(QueryError, match="unknown method 'drop_everything'"):
            await client._call("drop_everything", {}, msgspec.msgpack.Decoder())
        with pytest.raises(QueryError, match="TypeError"):
            await client._call("totals", {"nonsense": 1}, msgspec.msgpack.Decoder())
        assert (await client.totals(ad_id="b", **SPAN)).clicks == 1
        await client.close()

    asyncio.run(scenario())


def test_ping_is_false_without_a_server(tmp_path: Path) -> None:
    async def scenario() -> bool:
        return await RpcQueryStore(tmp_path / "none.sock").ping()

    assert asyncio.run(scenario()) is False


def _serve(db_path: Path, socket_path: Path) -> None:
    """A stand-in for the worker process: the query server over the store, until killed."""
    store = DuckDBStore(db_path)
    QueryServer(socket_path, store, InMemoryCounters()).start()
    threading.Event().wait()


def _start_server(db_path: Path, socket_path: Path) -> BaseProcess:
    process = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(db_path, socket_path), daemon=True
    )
    process.start()
    return process


async def _kill(process: BaseProcess) -> None:
    process.kill()  # as a crash: the kernel closes the server's end of every connection
    await asyncio.to_thread(process.join, 10)
    assert process.exitcode is not None


async def _until_ready(client: RpcQueryStore, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await client.ping():
            await asyncio.sleep(0.05)


def test_pooled_connections_survive_a_worker_restart(tmp_path: Path) -> None:
    """After the server process dies, every pooled connection is stale: queries must not
    fail on them. Once a new server is up they answer; while none is, they raise
    (StoreUnavailable, which the API answers 503), never an EOFError."""
    db_path, socket_path = tmp_path / "agg.duckdb", tmp_path / "q.sock"
    store = DuckDBStore(db_path)
    commit_events(store, InMemoryCounters())
    store.close()
    expected = Totals(clicks=3, impressions=1, spend_micros=3500, unique_users=2, invalid_clicks=0)
    processes = [_start_server(db_path, socket_path)]

    async def eight_queries(client: RpcQueryStore) -> list[Any]:
        return await asyncio.gather(*(client.totals(ad_id="a", **SPAN) for _ in range(8)))

    async def scenario() -> None:
        client = RpcQueryStore(socket_path, pool_size=8)
        await _until_ready(client)
        assert await eight_queries(client) == [expected] * 8
        assert len(client._idle) == 8  # the pool holds eight open connections

        # A quick restart (the supervisor's): the first queries after it find stale ones.
        await _kill(processes[-1])
        processes.append(_start_server(db_path, socket_path))
        probe = RpcQueryStore(socket_path)  # not the client under test: its pool stays stale
        await _until_ready(probe)
        await probe.close()
        assert await eight_queries(client) == [expected] * 8
        assert await client.aggregates(ad_id="b", granularity="hour", **SPAN) == [
            row(T0, None, clicks=1, impressions=0, spend=700, users=1)
        ]

        # No server for a while: every query says so (StoreUnavailable), none hangs.
        await _kill(processes[-1])
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await client.totals(ad_id="a", **SPAN)
        assert await client.ping() is False
        processes.append(_start_server(db_path, socket_path))
        await _until_ready(client)
        assert await eight_queries(client) == [expected] * 8
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        for process in processes:
            process.kill()
            process.join(10)


def test_a_server_stopped_in_process_ends_its_clients_connections(tmp_path: Path) -> None:
    """The worker reopens its store in-process after a full disk: it stops its query
    server and starts another on the same socket. Pooled connections to the old one must
    end (its handler threads outlive it and would go on answering from the closed store),
    so that queries reach the new one."""
    socket_path = tmp_path / "q.sock"
    expected = Totals(clicks=3, impressions=1, spend_micros=3500, unique_users=2, invalid_clicks=0)

    def serve() -> tuple[QueryServer, DuckDBStore]:
        store = DuckDBStore(tmp_path / "agg.duckdb")
        server = QueryServer(socket_path, store, InMemoryCounters())
        server.start()
        return server, store

    store = DuckDBStore(tmp_path / "agg.duckdb")
    commit_events(store, InMemoryCounters())
    store.close()
    server, store = serve()

    async def scenario() -> None:
        nonlocal server, store
        client = RpcQueryStore(socket_path, pool_size=4)
        answers = await asyncio.gather(*(client.totals(ad_id="a", **SPAN) for _ in range(4)))
        assert answers == [expected] * 4
        assert len(client._idle) == 4
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(store.close)
        server, store = await asyncio.to_thread(serve)
        answers = await asyncio.gather(*(client.totals(ad_id="a", **SPAN) for _ in range(4)))
        assert answers == [expected] * 4
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
        store.close()
