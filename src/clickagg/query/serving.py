"""The serving layer of the Lambda design: final numbers where the batch layer has closed an
hour, the stream's everywhere else, merged in one answer.

A window is served whole from one side: a minute or hour window from the batch layer when
its hour is final, a day window when all 24 of its hours are; otherwise from the stream
(``final: false``). So no window ever mixes the two, and a window turns final at once when
its hour is reconciled (the reader sees a new version by its ``CURRENT`` pointer).
Advertiser and campaign roll-ups are served the same way. A top-N ranking is one answer
over its whole range: from the batch layer when every hour of the range is final, else from
the stream (rankings of the two sides cannot be added: the N of each are other ads).
Sliding real-time windows and totals stay on the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from clickagg.query.base import (
    AdTotals,
    AggregateRow,
    Dimension,
    FinalRows,
    Granularity,
    KeyedStatus,
    PartitionStatus,
    QueryStore,
    RankBy,
    RollupLevel,
    Totals,
    all_final,
)

_HOUR_MS = 3_600_000
_SIZES = {"minute": 60_000, "hour": _HOUR_MS, "day": 24 * _HOUR_MS}


class ServingQueryStore:
    """:class:`QueryStore` over the stream's store and the batch layer's final rows."""

    def __init__(self, stream: QueryStore, final: FinalRows) -> None:
        self.stream = stream
        self.final = final

    async def aggregates(
        self,
        *,
        ad_id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        stream_rows = await self.stream.aggregates(
            ad_id=ad_id,
            start_ms=start_ms,
            end_ms=end_ms,
            granularity=granularity,
            group_by=group_by,
        )

        def final_rows(hours: list[int]) -> list[AggregateRow]:
            return self.final.aggregates(
                ad_id=ad_id, hours=hours, granularity=granularity, group_by=group_by
            )

        return await self._merged(stream_rows, final_rows, start_ms, end_ms, granularity)

    async def rollup(
        self,
        *,
        level: RollupLevel,
        id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        stream_rows = await self.stream.rollup(
            level=level, id=id, start_ms=start_ms, end_ms=end_ms, granularity=granularity
        )

        def final_rows(hours: list[int]) -> list[AggregateRow]:
            return self.final.rollup(level=level, id=id, hours=hours, granularity=granularity)

        return await self._merged(stream_rows, final_rows, start_ms, end_ms, granularity)

    async def _merged(
        self,
        stream_rows: list[AggregateRow],
        final_rows: Callable[[list[int]], list[AggregateRow]],
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        """The stream's windows, each replaced whole by the batch's where it is final."""
        size = _SIZES[granularity]
        final_hours = set(await asyncio.to_thread(self.final.final_hours, start_ms, end_ms))
        if not final_hours:
            return stream_rows
        if granularity == "day":
            closed = {
                day
                for day in {h - h % size for h in final_hours}
                if all(day + i * _HOUR_MS in final_hours for i in range(24))
            }
            hours = sorted(h for h in final_hours if h - h % size in closed)

            def is_final(window_ms: int) -> bool:
                return window_ms in closed
        else:
            hours = sorted(final_hours)

            def is_final(window_ms: int) -> bool:
                return window_ms - window_ms % _HOUR_MS in final_hours

        batch_rows = [
            row
            for row in await asyncio.to_thread(final_rows, hours)
            if start_ms <= row.window_ms < end_ms
        ]
        merged = [row for row in stream_rows if not is_final(row.window_ms)] + batch_rows
        return sorted(merged, key=lambda r: (r.window_ms, r.group or ""))

    async def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        return await self.stream.totals(
            ad_id=ad_id, start_ms=start_ms, end_ms=end_ms, unique_users=unique_users
        )

    async def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        return await self.stream.window(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms)

    async def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        if await asyncio.to_thread(all_final, self.final, start_ms, end_ms):
            return await asyncio.to_thread(
                self.final.top_ads,
                start_ms=start_ms,
                end_ms=end_ms,
                by=by,
                limit=limit,
                advertiser_id=advertiser_id,
            )
        return await self.stream.top_ads(
            start_ms=start_ms, end_ms=end_ms, by=by, limit=limit, advertiser_id=advertiser_id
        )

    async def partition_status(self) -> list[PartitionStatus]:
        return await self.stream.partition_status()

    async def keyed_status(self) -> KeyedStatus:
        return await self.stream.keyed_status()

    async def ping(self) -> bool:
        return await self.stream.ping()

    async def start(self) -> None:
        await self.stream.start()

    async def close(self) -> None:
        await self.stream.close()
