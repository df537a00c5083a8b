"""The embedded query store as the API process composes it: sliding windows from the
replica of the worker's counters while it follows them, from the worker's query server
otherwise; every other query from the worker. Real store, real sockets, both servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from clickagg.query.base import QueryStore, StoreUnavailable
from clickagg.query.local_windows import LocalWindowsQueryStore
from clickagg.realtime.feed import FeedServer, PublishingCounters
from clickagg.realtime.memory import InMemoryCounters
from clickagg.realtime.replica import CountersReplica
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.store.rpc import QueryServer, RpcQueryStore
from tests.store.test_rpc import SPAN, T0, commit_events

MINUTE = {"start_ms": T0, "end_ms": T0 + 60_000}


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_windows_come_from_the_replica_while_it_follows_else_from_the_worker(
    tmp_path: Path,
) -> None:
    store = DuckDBStore(tmp_path / "agg.duckdb")
    counters = PublishingCounters(InMemoryCounters())
    commit_events(store, counters.inner)
    rpc = QueryServer(tmp_path / "q.sock", store, counters)
    rpc.start()
    feed = FeedServer(tmp_path / "feed.sock", counters)

    async def scenario() -> None:
        replica = CountersReplica(tmp_path / "feed.sock")
        queries: QueryStore = LocalWindowsQueryStore(RpcQueryStore(tmp_path / "q.sock"), replica)
        await queries.start()
        try:
            # No feed yet: the worker answers.
            assert not replica.live
            from_worker = await queries.window(ad_id="a", **MINUTE)
            assert from_worker.clicks == 2
            feed.start()
            await until(lambda: replica.live)
            rpc.stop()  # from now on only the replica can answer a window
            assert await queries.window(ad_id="a", **MINUTE) == from_worker
            try:
                await queries.totals(ad_id="a", **SPAN)
                raise AssertionError("totals are the worker's to answer")
            except StoreUnavailable:
                pass
            feed.stop()
            await until(lambda: not replica.live)
            try:
                await queries.window(ad_id="a", **MINUTE)
                raise AssertionError("no replica and no worker: unavailable")
            except StoreUnavailable:
                pass
        finally:
            await queries.close()
        assert replica.window(ad_id="a", **MINUTE) is None

    try:
        asyncio.run(scenario())
    finally:
        rpc.stop()
        feed.stop()
        store.close()
