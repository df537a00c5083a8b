"""The query store as a Protocol, and the records that cross it.

:class:`QueryStore` is everything the HTTP layer reads: aggregate rows, totals, the
real-time counters' sliding windows, per-partition status, top ads and roll-ups. ``api/``
imports this module (and no backend); the composition root (``clickagg.compose``) picks
the adapter. This module imports nothing heavier than the standard library, so the API
process, a type checker and any client can import it without loading a backend.

Errors an adapter raises, and only these: :class:`StoreUnavailable` while the store cannot
answer (its process is restarting, recovering or busy: retry later, a 503 over HTTP) and
:class:`QueryError` when it answered with an error. Every method is a read, so an adapter
may retry one.

Today's only adapter, ``clickagg.store.rpc.RpcQueryStore``, asks the worker process over
a Unix socket (DuckDB admits one writing process): every query is executed by a thread of
the worker process, under the GIL the stream also needs.

Next: take queries off the stream's GIL with immutable snapshots. After each compaction
the worker (still the only writer) exports the base tables up to the compaction's cut
``seq`` as Parquet files under ``query/snap-<seq>/`` (sorted by ad, minute), fsyncs them,
then publishes the snapshot by atomically renaming ``query/CURRENT`` to name it, with the
per-partition committed offsets and the cut. API processes open the newest snapshot with
their own read-only DuckDB connection (no lock on the writer's file) and swap when
``CURRENT`` changes; old snapshots are deleted once no reader has used them for a grace
period. The minutes after the cut (the deltas not yet compacted) come from an in-process
counter the API process feeds itself: it tails the durable log from the snapshot's offsets
and runs the same pure ``core`` dedup/window code for the recent minutes only, or, simpler
first step, it keeps asking the worker for ``base + deltas`` of the last few minutes while
the snapshot answers the rest (a cheap query: it touches only the delta tables). Exactly
once holds because a snapshot is a consistent cut (base up to ``seq``, offsets of that
same transaction) and the recent part is taken strictly after the cut, by minute or by
offset, so no minute is counted from both sides; freshness of the historical part is the
compaction interval (2 s) plus the export, of the recent part unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Granularity = Literal["minute", "hour", "day"]
Dimension = Literal["country", "device", "browser"]
RollupLevel = Literal["advertiser", "campaign"]
RankBy = Literal["clicks", "impressions", "spend_micros", "invalid_clicks"]


class QueryError(RuntimeError):
    """The store answered, with an error (the message says why)."""


class StoreUnavailable(ConnectionError):
    """The store cannot answer now (restarting, recovering, busy, gone): retry later."""


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    committed_offset: int
    max_event_ms: int
    watermark_ms: int
    counted: int
    duplicates: int
    late: int
    invalid: int
    committed_at_ms: int


@dataclass(frozen=True)
class AggregateRow:
    window_ms: int
    group: str | None  # the group_by dimension's value, None without group_by
    clicks: int
    impressions: int
    spend_micros: int
    unique_users: int
    invalid_clicks: int


@dataclass(frozen=True)
class Totals:
    clicks: int
    impressions: int
    spend_micros: int
    unique_users: int
    invalid_clicks: int


@dataclass(frozen=True)
class AdTotals:
    ad_id: str
    advertiser_id: str
    campaign_id: str
    clicks: int
    impressions: int
    spend_micros: int
    unique_users: int
    invalid_clicks: int


class QueryStore(Protocol):
    """All the HTTP layer reads. Async: an adapter may cross a process or a network."""

    async def aggregates(
        self,
        *,
        ad_id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        """Rows for windows starting in [start_ms, end_ms), oldest first (then by group)."""
        ...

    async def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        """Sums over minutes in [start_ms, end_ms). ``unique_users=False`` skips merging
        sketches (``unique_users`` is then 0)."""
        ...

    async def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        """The real-time counters' sums over minutes in [start_ms, end_ms): fresher than
        :meth:`totals` and without unique users (0)."""
        ...

    async def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        """The ``limit`` ads with the largest ``by`` over minutes in [start_ms, end_ms),
        optionally of one advertiser; ties broken by ad_id."""
        ...

    async def rollup(
        self,
        *,
        level: RollupLevel,
        id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        """Like :meth:`aggregates` without ``group_by``, over every ad of one advertiser or
        campaign."""
        ...

    async def partition_status(self) -> list[PartitionStatus]:
        """Per partition that has committed: offsets, watermark, fate counts."""
        ...

    async def ping(self) -> bool:
        """True when the store answers queries now; never raises."""
        ...

    async def close(self) -> None: ...
