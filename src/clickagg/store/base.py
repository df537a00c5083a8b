"""The aggregate store as a Protocol, and the records that cross it.

The worker hands the store one :class:`PartitionCommit` per micro-batch; the store applies
all of it in ONE transaction, only if the partition's committed offset is still
``from_offset`` (otherwise :class:`FencedError`: a stale owner lost the partition).
Table layouts are documented in ``clickagg.core.aggregate`` where the deltas are made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

# The records a query returns belong to the query role; re-exported here for the store's
# adapters, which produce them.
from clickagg.query.base import AdTotals as AdTotals
from clickagg.query.base import AggregateRow as AggregateRow
from clickagg.query.base import Dimension as Dimension
from clickagg.query.base import Granularity as Granularity
from clickagg.query.base import PartitionStatus as PartitionStatus
from clickagg.query.base import RankBy as RankBy
from clickagg.query.base import RollupLevel as RollupLevel
from clickagg.query.base import Totals as Totals


class FencedError(RuntimeError):
    """A partition's committed offset moved: this writer no longer owns the partition."""

    def __init__(self, message: str, partitions: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.partitions = tuple(partitions)


@dataclass(frozen=True)
class PartitionCommit:
    partition: int
    from_offset: int
    to_offset: int
    minute_deltas: pa.Table  # clickagg.core.aggregate.MINUTE_SCHEMA
    # dimension name -> its deltas (clickagg.core.aggregate.DIMENSION_SCHEMAS)
    dimension_deltas: Mapping[str, pa.Table]
    max_event_ms: int  # the partition's max event time after this batch (watermark source)
    watermark_ms: int
    counted: int
    duplicates: int
    late: int
    invalid: int
    committed_at_ms: int


@dataclass(frozen=True)
class KeyedCommit:
    """What the keyed stage's stage 2 consumed from one keyed partition, and the corrections
    its verdicts make (``clickagg.core.keyed.correction_deltas``)."""

    keyed_partition: int
    from_offset: int  # the keyed log offset consumed so far: the fence
    to_offset: int
    high_water: Mapping[int, int]  # source partition -> highest source offset consumed
    minute_deltas: pa.Table
    dimension_deltas: Mapping[str, pa.Table]
    corrections: int  # clicks flagged by this commit
    committed_at_ms: int
    # The keyed rules' spec the verdicts were made under (opaque JSON, canonical: equal
    # specs are equal text). The store records it with the offset it applies from when it
    # differs from the previous one, so a recovery replays each range under its own spec.
    spec_json: str = "null"
    # ``corrections`` by the id of the rule that made them (the keyed stage's counter).
    corrections_by_rule: Mapping[str, int] = field(default_factory=dict)
    # Where a recovery's replay of the keyed log starts (its first retained offset): spec
    # records wholly before it are no longer needed.
    replay_from: int = 0
    # Which keyed family: ``"ip"`` (keyed by address), ``"visitor"`` (by user, or address
    # and agent) or ``"ad"`` (by ad). Each has its own consumed offsets, high-water marks
    # and specs, in its own tables (the IP family's are the tables of the builds before
    # the second family).
    family: str = "ip"
    # The verdicts themselves (``clickagg.core.keyed.VERDICT_SCHEMA`` or the visitor
    # family's, which share every column used): the store then settles them against the
    # clicks either family corrected before (see ``commit_keyed``), makes the deltas of
    # what it applies, and ignores ``minute_deltas``, ``dimension_deltas``,
    # ``corrections`` and ``corrections_by_rule``.
    verdicts: pa.Table | None = None
    # Every rule id of the rule set, in its order: where two verdicts name one click, the
    # earlier rule names it (a rule id not in it ranks after every one that is).
    rule_order: tuple[str, ...] = ()
    # Clicks a review-only rule flagged in the consumed range (billable, reported): added
    # to the store's per-rule totals in the same transaction, so each is counted once.
    reviews_by_rule: Mapping[str, int] = field(default_factory=dict)
    # No verdict of this commit's family will come for a click older than this (event
    # time): the store forgets what it corrected before every family's bound.
    settled_before_ms: int | None = None


@dataclass(frozen=True)
class KeyedProgress:
    consumed_offset: int
    high_water: dict[int, int]
    corrections: int
    # (from keyed offset, spec JSON), ascending: each spec applies up to the next one's
    # offset (the last up to ``consumed_offset``).
    specs: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class CompactionResult:
    cut_seq: int  # every delta with seq <= cut_seq is now in the base tables
    delta_rows: int  # delta rows merged (and deleted)
    seconds: float


class CommitSink(Protocol):
    """The fenced round commit: what the stream needs of a store, and all it may assume.

    A round's deltas and every partition's new offset land in one transaction, each
    conditional on the partition's previous offset, so a stale owner (a worker that was
    replaced, a replay) is refused whole and a crash leaves the round either applied or
    not. The real-time counters are the second fenced sink (``RealtimeCounters.apply``)."""

    def committed_offsets(self) -> dict[int, int]:
        """Committed offset per partition that has ever committed (others start at 0)."""
        ...

    def commit(self, commit: PartitionCommit) -> None:
        """Apply deltas and the new offset atomically, or raise
        FencedError (offset moved) leaving the store untouched."""
        ...

    def commit_many(self, commits: Sequence[PartitionCommit]) -> None:
        """Like :meth:`commit` for several partitions (each at most once) in ONE
        transaction: all apply or none. Fixed per-transaction costs are paid once."""
        ...

    def close(self) -> None: ...


class AggregateStore(CommitSink, Protocol):
    """A commit sink that also keeps the keyed stage's corrections and answers reads: the
    embedded store, which the worker process owns and queries (the API process reads it
    through ``clickagg.query``)."""

    def commit_keyed(self, commits: Sequence[KeyedCommit]) -> list[pa.Table]:
        """Apply keyed partitions' corrections, consumed offsets, high-water marks and the
        spec each commit was made under (when it changed) in ONE transaction, each only if
        the partition's consumed offset (of the commit's family) is still ``from_offset``
        (FencedError otherwise, leaving the store untouched).

        A commit with ``verdicts`` is settled against every click either family corrected
        before, in the same transaction, so that a click is corrected once whichever family
        flags it first: a verdict on a click not corrected yet corrects it; one naming a
        rule earlier in ``rule_order`` than the one it stands corrected under moves its
        reason (``previous_rule_id`` set to that rule); any other is dropped. Returns, per
        commit, the verdicts applied (empty for a commit without ``verdicts``)."""
        ...

    def keyed_applied(self, family: str, keyed_partition: int, from_offset: int) -> pa.Table:
        """The verdicts the family's commits of the keyed partition from ``from_offset`` on
        applied (event_id, rule_id, previous_rule_id, applied_at_ms: the commit's time,
        null if unknown; in the order applied): what a
        recovery hands the corrections archive again, of the verdicts it re-derives."""
        ...

    def keyed_corrections_by_rule(self) -> dict[str, int]:
        """Clicks the keyed stage ever corrected, per rule id."""
        ...

    def keyed_reviews_by_rule(self) -> dict[str, int]:
        """Clicks the keyed stage's review-only rules ever flagged (still billable), per
        rule id."""
        ...

    def release_settled(self, family: str) -> None:
        """The family has no rule in force and judges nothing: drop its settled bound, so a
        bound it recorded while it had rules no longer keeps the store from forgetting the
        clicks every other family is done with. Its next commit records a new one."""
        ...

    def keyed_progress(self, family: str = "ip") -> dict[int, KeyedProgress]:
        """Per keyed partition of the family that ever committed: what stage 2 consumed so
        far, and the specs its consumed ranges were judged under."""
        ...

    def aggregates(
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

    def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        """Sums over minutes in [start_ms, end_ms) (for sliding windows and ad-hoc ranges).
        ``unique_users=False`` skips merging sketches (``unique_users`` is then 0)."""
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
        """The ``limit`` ads with the largest ``by`` over minutes in [start_ms, end_ms),
        optionally of one advertiser; ties broken by ad_id."""
        ...

    def rollup(
        self,
        *,
        level: RollupLevel,
        id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        """Like :meth:`aggregates` without ``group_by``, over every ad of one advertiser or
        campaign (unique users merged across its ads)."""
        ...

    def minute_rows_since(self, since_ms: int) -> pa.Table:
        """Minute rows (sums only: ad_id, minute_ms, clicks, impressions, spend_micros,
        invalid_clicks) from ``since_ms`` on: refills real-time counters after a restart."""
        ...

    def partition_status(self) -> list[PartitionStatus]: ...
