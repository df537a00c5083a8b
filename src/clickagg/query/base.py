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

The embedded adapter, ``clickagg.query.replicated.ReplicatedQueryStore``, answers from two
places. ``clickagg.store.rpc.RpcQueryStore`` asks the worker process over a Unix socket
(DuckDB admits one writing process): such a query runs in a thread of the worker process,
under the GIL the stream also needs (BENCHMARKS.md, "QueryStore split": the real-time
window, microseconds of work, waited tens of ms at p99 there). So the worker also feeds
every committed round's per-ad minute rows to the API process
(``clickagg.realtime.feed``), which keeps the last 70 minutes and 26 hours of every ad in
memory (``clickagg.realtime.recent``) and answers sliding windows, minute, hour and day rows
without a breakdown and totals within those spans itself.

Why not breakdowns, roll-ups and top ads the same way: those cells multiply (20 countries
by every ad-hour, each with a sketch of up to 4 KiB) or need unions across many ads per
query, Python work on the API's GIL that costs ingest what it saves the worker. Next, for
the rest (breakdowns, roll-ups, top ads, older ranges): a
query store in the API process over immutable files plus the pushed deltas.
(1) Each background compaction already merges the deltas with ``seq`` in (previous cut,
cut] into the base tables; the worker also writes that same merged batch (minute, hour and
dimension rows: sums and sketches, all additive) as Parquet files, fsyncs them and
publishes them by adding one manifest file naming them and their ``seq`` range, as the
archive does; a later compaction rewrites many small files as one covering their union
and a manifest that replaces them. (2) The feed carries every round's deltas, all
families, tagged with the round's ``seq``. (3) The API process's adapter answers with its
own DuckDB connection: ``read_parquet`` of the manifest's files UNION ALL an Arrow table of
the pushed deltas with ``seq`` above the manifest's cut (those at or below are dropped when
the manifest arrives). Exactly once: every ``seq`` is summed from one side only. The
worker pays a Parquet write per compaction instead of every query, and the read-only files
also let more API processes share the load. What it costs: the file merges repeat the
sketch unions the base compaction does (the dominant cost of compaction), on the same two
cores. (A DuckDB replica file copied after each compaction was the alternative: simpler
readers, but every copy rewrites the whole base.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Granularity = Literal["minute", "hour", "day"]
Dimension = Literal["country", "device", "browser", "invalid_reason"]
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
class KeyedPartitionStatus:
    keyed_partition: int
    durable_end_offset: int  # one past the last durable record of the keyed log
    consumed_offset: int  # up to where stage 2 has committed its verdicts


@dataclass(frozen=True)
class KeyedStatus:
    """The keyed stage's progress: per keyed partition, and corrections per rule id (both
    empty while the stage is off)."""

    partitions: list[KeyedPartitionStatus]
    corrections_by_rule: dict[str, int]
    # clicks review-only rules flagged (billable), per rule id
    reviews_by_rule: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HeldCells:
    """What the API process's replica of the recent rows holds of one granularity."""

    cells: int  # (ad, minute) or (ad, hour) cells
    sketch_bytes: int  # bytes of their unique-user sketches, the bulk of their memory


@dataclass(frozen=True)
class ReplicaStatus:
    """The replica of the recent rows (``clickagg.query.replicated``) as ``/metrics``
    shows it: whether it follows the worker's feed, how often it started over from a
    snapshot, the rounds it applied, and what it holds (nothing while not live)."""

    live: bool
    snapshots: int  # since the process started: one per (re)connection that got one
    rounds: int  # rounds applied since the process started (redos it ignored are not)
    held: dict[Literal["minute", "hour"], HeldCells]


@dataclass(frozen=True)
class AggregateRow:
    window_ms: int
    group: str | None  # the group_by dimension's value, None without group_by
    clicks: int
    impressions: int
    spend_micros: int
    unique_users: int
    invalid_clicks: int
    final: bool = False  # from the batch layer's reconciled hours: billing-grade


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


@dataclass(frozen=True)
class ReconciliationRow:
    """One (ad, hour): what the stream counted, what the batch counts, and why."""

    ad_id: str
    hour_ms: int
    stream_clicks: int
    batch_clicks: int
    stream_impressions: int
    batch_impressions: int
    stream_spend_micros: int
    batch_spend_micros: int
    late_clicks: int  # counted by the batch only: the stream had left them out as late
    late_spend_micros: int
    beyond_horizon_clicks: int  # copies the stream counted again beyond its dedup horizon
    beyond_horizon_spend_micros: int
    newly_invalid_clicks: int  # invalid by a verdict only the batch made
    review_clicks: int = 0  # billable, flagged for review (reports before it: none)


@dataclass(frozen=True)
class Adjustment:
    """How one (ad, hour) changed from one published version of the hour to the next."""

    ad_id: str
    advertiser_id: str
    campaign_id: str
    hour_ms: int
    version: int
    previous_version: int
    created_ms: int
    reason: str
    clicks: int  # new minus previous
    impressions: int
    spend_micros: int
    invalid_clicks: int


class FinalRows(Protocol):
    """The batch layer's reconciled hours, as the serving layer reads them."""

    def final_hours(self, start_ms: int, end_ms: int) -> list[int]:
        """Starts of the hours overlapping [start_ms, end_ms) that have final rows."""
        ...

    def aggregates(
        self,
        *,
        ad_id: str,
        hours: list[int],
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        """Final rows (``final=True``) of ``ad_id`` over whole final ``hours``: per minute,
        per hour, or per day (then ``hours`` must hold whole days)."""
        ...

    def rollup(
        self, *, level: RollupLevel, id: str, hours: list[int], granularity: Granularity
    ) -> list[AggregateRow]:
        """:meth:`aggregates` over every ad of one advertiser or campaign."""
        ...

    def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        """:meth:`QueryStore.top_ads` over the final minutes in [start_ms, end_ms) (the
        caller checks that every hour of the range is final)."""
        ...

    def reconciliation(
        self, *, start_ms: int, end_ms: int, ad_id: str | None = None
    ) -> list[ReconciliationRow]:
        """Stream vs batch per (ad, hour) of the reconciled hours in [start_ms, end_ms)."""
        ...

    def adjustments(
        self, *, start_ms: int, end_ms: int, advertiser_id: str | None = None
    ) -> list[Adjustment]:
        """Every change between consecutive versions of the hours in [start_ms, end_ms),
        per (ad, hour) that changed, oldest first; counting only the minutes in the range
        (an hour cut by the range's edge contributes its own side's changes)."""
        ...

    def statement(self, *, advertiser_id: str, month: str) -> dict[str, Any]:
        """The advertiser's statement of ``month`` (YYYY-MM) as JSON-ready data: per ad and
        local day, from final rows only. Raises ValueError for a month it cannot read."""
        ...


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

    async def keyed_status(self) -> KeyedStatus:
        """The keyed stage's lag and corrections (empty while it is off)."""
        ...

    async def ping(self) -> bool:
        """True when the store answers queries now; never raises."""
        ...

    async def start(self) -> None:
        """Begin any background work (e.g. following a feed) in the running event loop;
        the app calls it once, before serving, and :meth:`close` when it stops."""
        ...

    async def close(self) -> None: ...


def all_final(final: FinalRows, start_ms: int, end_ms: int) -> bool:
    """Whether every hour overlapping [start_ms, end_ms) is final."""
    first = start_ms - start_ms % 3_600_000
    return set(final.final_hours(start_ms, end_ms)) >= set(range(first, end_ms, 3_600_000))
