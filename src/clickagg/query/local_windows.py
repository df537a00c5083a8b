"""A :class:`QueryStore` that answers sliding windows from a replica in this process and
everything else from the store it wraps.

The embedded store answers from the worker process, under the stream's GIL; its real-time
counters are replicated into the API process (``clickagg.realtime.replica``), so the most
frequent dashboard query, a sliding window, needs no trip there. While the replica is not
following the worker's counters (starting, or the worker restarting) the window is asked
of the wrapped store, as before.
"""

from __future__ import annotations

from typing import Protocol

from clickagg.query.base import (
    AdTotals,
    AggregateRow,
    Dimension,
    Granularity,
    KeyedStatus,
    PartitionStatus,
    QueryStore,
    RankBy,
    RollupLevel,
    Totals,
)


class WindowReplica(Protocol):
    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals | None:
        """The counters' sums, or None while the replica cannot answer."""
        ...

    def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalWindowsQueryStore:
    def __init__(self, store: QueryStore, replica: WindowReplica) -> None:
        self.store = store
        self.replica = replica

    async def start(self) -> None:
        self.replica.start()
        await self.store.start()

    async def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        local = self.replica.window(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms)
        if local is not None:
            return local
        return await self.store.window(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms)

    async def aggregates(
        self,
        *,
        ad_id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        return await self.store.aggregates(
            ad_id=ad_id,
            start_ms=start_ms,
            end_ms=end_ms,
            granularity=granularity,
            group_by=group_by,
        )

    async def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        return await self.store.totals(
            ad_id=ad_id, start_ms=start_ms, end_ms=end_ms, unique_users=unique_users
        )

    async def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        return await self.store.top_ads(
            start_ms=start_ms, end_ms=end_ms, by=by, limit=limit, advertiser_id=advertiser_id
        )

    async def rollup(
        self,
        *,
        level: RollupLevel,
        id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        return await self.store.rollup(
            level=level, id=id, start_ms=start_ms, end_ms=end_ms, granularity=granularity
        )

    async def partition_status(self) -> list[PartitionStatus]:
        return await self.store.partition_status()

    async def keyed_status(self) -> KeyedStatus:
        return await self.store.keyed_status()

    async def ping(self) -> bool:
        return await self.store.ping()

    async def close(self) -> None:
        await self.replica.close()
        await self.store.close()
