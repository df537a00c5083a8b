"""A :class:`QueryStore` that answers recent queries from a replica in this process and
everything else from the store it wraps.

The embedded store answers from the worker process, under the stream's GIL; the worker
also feeds the recent minutes of every ad into the API process
(``clickagg.realtime.replica``): their minutes of the last 70 minutes and their hours of
the last day. Sliding windows, minute, hour and day rows without a breakdown and totals
over a range the replica holds whole are answered here, in microseconds; other queries,
and every query while the replica is not following the worker (starting, or the worker
restarting), are asked of the wrapped store, as before.
"""

from __future__ import annotations

from typing import Literal, Protocol

from clickagg.query.base import (
    AdTotals,
    AggregateRow,
    Dimension,
    Granularity,
    KeyedStatus,
    PartitionStatus,
    QueryStore,
    RankBy,
    ReplicaStatus,
    RollupLevel,
    Totals,
)


class RecentRows(Protocol):
    """What the replica answers for a range it holds whole."""

    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals: ...

    def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals: ...

    def minutes(self, *, ad_id: str, start_ms: int, end_ms: int) -> list[AggregateRow]: ...

    def windows(
        self, *, ad_id: str, start_ms: int, end_ms: int, granularity: Literal["hour", "day"]
    ) -> list[AggregateRow]: ...


class Replica(Protocol):
    def covering(self, start_ms: int, granularity: str = "minute") -> RecentRows | None:
        """The recent rows if they hold every window of ``granularity`` from ``start_ms``
        on, else None."""
        ...

    def status(self) -> ReplicaStatus:
        """Whether it follows the feed, and what it holds: cheap (a scrape reads it)."""
        ...

    def start(self) -> None: ...

    async def close(self) -> None: ...


class ReplicatedQueryStore:
    def __init__(self, store: QueryStore, replica: Replica) -> None:
        self.store = store
        self.replica = replica

    async def start(self) -> None:
        self.replica.start()
        await self.store.start()

    def replica_status(self) -> ReplicaStatus:
        return self.replica.status()

    async def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        recent = self.replica.covering(start_ms)
        if recent is not None:
            return recent.window(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms)
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
        recent = None if group_by is not None else self.replica.covering(start_ms, granularity)
        if recent is not None:
            if granularity == "minute":
                return recent.minutes(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms)
            if granularity in ("hour", "day"):
                return recent.windows(
                    ad_id=ad_id, start_ms=start_ms, end_ms=end_ms, granularity=granularity
                )
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
        recent = self.replica.covering(start_ms)
        if recent is not None:
            return recent.totals(
                ad_id=ad_id, start_ms=start_ms, end_ms=end_ms, unique_users=unique_users
            )
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
