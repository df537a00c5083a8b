"""The embedded query store as the API process composes it: recent queries from the
replica of the recent minutes while it follows the worker's feed and holds their range,
from the worker's query server otherwise. Real store, real sockets, both servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clickagg.core.windows import DAY_MS, HOUR_MS
from clickagg.query.base import QueryStore, StoreUnavailable
from clickagg.query.replicated import ReplicatedQueryStore
from clickagg.realtime.feed import FeedServer, PublishingCounters, Snapshot
from clickagg.realtime.memory import InMemoryCounters
from clickagg.realtime.replica import RecentReplica
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

    def snapshot() -> Snapshot:
        recent = store.recent_rows(T0, T0 - 2 * HOUR_MS)
        return Snapshot(recent.minutes, recent.committed, T0, recent.hours, T0 - 2 * HOUR_MS)

    counters = PublishingCounters(InMemoryCounters(), snapshot=snapshot)
    commit_events(store, counters.inner)
    rpc = QueryServer(tmp_path / "q.sock", store, counters)
    rpc.start()
    feed = FeedServer(tmp_path / "feed.sock", counters)

    async def scenario() -> None:
        replica = RecentReplica(tmp_path / "feed.sock")
        queries: QueryStore = ReplicatedQueryStore(RpcQueryStore(tmp_path / "q.sock"), replica)
        await queries.start()
        try:
            # No feed yet: the worker answers.
            assert not replica.live
            window = await queries.window(ad_id="a", **MINUTE)
            assert window.clicks == 2
            minutes = await queries.aggregates(ad_id="a", granularity="minute", **SPAN)
            totals = await queries.totals(ad_id="a", **SPAN)
            assert (len(minutes), totals.clicks, totals.unique_users) == (2, 3, 2)
            hours = await queries.aggregates(
                ad_id="a", granularity="hour", start_ms=T0 - HOUR_MS, end_ms=T0 + HOUR_MS
            )
            assert [(h.window_ms, h.clicks) for h in hours] == [(T0, 3)]  # "old" was late
            feed.start()
            await until(lambda: replica.live)
            rpc.stop()  # from now on only the replica can answer
            assert await queries.window(ad_id="a", **MINUTE) == window
            assert await queries.aggregates(ad_id="a", granularity="minute", **SPAN) == minutes
            assert await queries.totals(ad_id="a", **SPAN) == totals
            assert (
                await queries.aggregates(
                    ad_id="a", granularity="hour", start_ms=T0 - HOUR_MS, end_ms=T0 + HOUR_MS
                )
                == hours
            )
            for worker_only in (
                # hours before the replica's day, and days (the replica's hours begin
                # after the UTC day does)
                queries.aggregates(
                    ad_id="a", granularity="hour", start_ms=T0 - 3 * HOUR_MS, end_ms=T0
                ),
                queries.aggregates(
                    ad_id="a", granularity="day", start_ms=T0 - T0 % DAY_MS - 1, end_ms=T0
                ),
                queries.aggregates(ad_id="a", granularity="minute", group_by="country", **SPAN),
                queries.totals(ad_id="a", start_ms=T0 - 1, end_ms=T0 + HOUR_MS),  # not held
            ):
                with pytest.raises(StoreUnavailable):
                    await worker_only
            feed.stop()
            await until(lambda: not replica.live)
            with pytest.raises(StoreUnavailable):  # no replica and no worker
                await queries.window(ad_id="a", **MINUTE)
        finally:
            await queries.close()
        assert replica.covering(T0) is None

    try:
        asyncio.run(scenario())
    finally:
        rpc.stop()
        feed.stop()
        store.close()
