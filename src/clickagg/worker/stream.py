"""The partition worker: the exactly-once loop between the log, the store and the archive.

Commit order, for one round over partitions p (this is the whole protocol):

1. Read durable frames of each p from ``next_offset`` (the store's committed offset).
2. Run the pure processor: it decides fates and deltas and advances in-memory state.
3. Commit the round's deltas and every ``to_offset`` in ONE store transaction, each only if
   the committed offset is still ``from_offset`` (otherwise FencedError: recover).
4. Apply the deltas to the real-time counters.
5. Hand the round's decisions (every event with its fate) to the archive, which publishes
   them in the background, fenced by the same offsets (it takes only what continues its
   archived offset).
6. Every ``snapshot_interval`` write the state snapshot at ``to_offset`` (atomic file).

With the keyed stage on, step 4 is followed by appending the round's fresh clicks to the
keyed log (``clickagg.keyed.stage1``), which keeps its own marker like the archive's
offset: recovery re-derives ``[min(archived, keyed marker), committed)`` and hands each
sink what it lacks. A round then takes each partition's events only up to a minute (event
time) past the furthest-behind partition's (``aligned``): the keyed stage, which gathers
the partitions' clicks of a key, must not receive one partition's records far behind
another's. For the same reason the keyed records a recovery re-derives are held until the
next round and appended for every recovered partition at once, before the round's own: one
append interleaves its partitions' records by event time (``records_by_partition``), one
partition after the other would not.

A crash before 3 loses nothing: the store still says ``from_offset`` and the restarted
worker redoes the round. A crash after 3 loses nothing either: recovery loads the newest
snapshot at or before the archive's offset, replays the log up to it without emitting,
re-derives the decisions of ``[archived, committed)`` for the archive (the processor is
deterministic), and resumes at the committed offset: the state, the store and the archive
end up exactly as an uninterrupted worker would have left them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from clickagg.archive.base import ArchiveWriter
from clickagg.clock import Clock
from clickagg.config import Settings
from clickagg.core import aggregate, columns
from clickagg.core.prices import PriceBook
from clickagg.core.processor import (
    BatchOutcome,
    Decided,
    PartitionProcessor,
    PartitionState,
    outcomes,
)
from clickagg.core.rules.loading import RulesWatcher
from clickagg.core.windows import MINUTE_MS
from clickagg.disk import is_out_of_space
from clickagg.keyed.stage1 import KeyedAppender, KeyedAppenders
from clickagg.log.base import CorruptFrameError, Frame, LogReader
from clickagg.realtime.base import RealtimeCounters
from clickagg.store.base import CommitSink, FencedError, PartitionCommit
from clickagg.worker.snapshots import SnapshotStore

log = logging.getLogger(__name__)


def frames_to_events(frames: list[Frame], from_offset: int) -> pl.DataFrame:
    """Decode a run of frames (one partition, contiguous offsets, as the log reads them)
    into one DataFrame, dropping events before ``from_offset``."""
    if not frames:
        return columns.empty_frame()
    first = frames[0]
    if any(f.lost for f in frames):
        raise ValueError(f"partition {first.partition}: lost-offsets frames hold no events")
    events = columns.decode_run([f.payload for f in frames])
    if events.num_rows != frames[-1].end_offset - first.base_offset:
        raise ValueError(f"frames of partition {first.partition} do not match their offsets")
    skip = max(0, from_offset - first.base_offset)
    return columns.to_frame(
        events.slice(skip), partition=first.partition, base_offset=first.base_offset + skip
    )


def _readable_run(frames: list[Frame]) -> list[Frame]:
    """The frames before the first lost-offsets frame (handled on its own next time)."""
    for i, frame in enumerate(frames):
        if frame.lost:
            return frames[:i]
    return frames


_RULES: dict[tuple[Path | None, Path], RulesWatcher] = {}


def rules_watcher(settings: Settings) -> RulesWatcher:
    """The invalid-traffic rules of a worker process, loaded once and shared by all its
    partitions; re-read when their files change (checked at most once a second), each
    change recorded under the data dir. A rules file that does not load stops the start
    (``clickagg serve`` checks it first); a bad edit later leaves the rules in force."""
    key = (settings.rules_file, settings.data_dir)
    watcher = _RULES.get(key)
    if watcher is None:
        watcher = RulesWatcher(
            settings.rules_file,
            changes=settings.rules_changes_path,
            blocklist=settings.blocklist_path,
        )
        _RULES[key] = watcher
    return watcher


@dataclasses.dataclass(frozen=True)
class Pending:
    """A micro-batch read, not processed: its events, or where a lost range ends."""

    events: pl.DataFrame = dataclasses.field(default_factory=columns.empty_frame)
    lost_until: int | None = None


@dataclasses.dataclass(frozen=True)
class Prepared:
    commit: PartitionCommit
    kept: pl.DataFrame  # counted and invalid events: the input of the deltas
    decisions: pa.Table  # every event read, with its fate: for the archive


class PartitionWorker:
    def __init__(
        self,
        partition: int,
        *,
        reader: LogReader,
        store: CommitSink,
        archive: ArchiveWriter,
        snapshots: SnapshotStore,
        settings: Settings,
        clock: Clock,
        cpc_micros: PriceBook | Mapping[str, int] | None = None,
        keyed: KeyedAppender | KeyedAppenders | None = None,
    ) -> None:
        self.partition = partition
        self.keyed = keyed
        self.prices = PriceBook.of(cpc_micros)
        self.reader = reader
        self.store = store
        self.archive = archive
        self.snapshots = snapshots
        self.settings = settings
        self.clock = clock
        # Why this partition is stalled: the log lost data it needs (recorded in the log,
        # so ingest stops for it and /healthz names it). Cleared only by a restart.
        self.damage: str | None = None
        self.rules = rules_watcher(settings)
        self._ruleset = self.rules.current()
        # Keyed records a recovery re-derived, not appended yet (see the module docstring):
        # kept events and their source range (``append_recovered``).
        self.keyed_backlog: list[tuple[pl.DataFrame, tuple[int, int]]] = []
        self.processor = self._recover()
        self._last_snapshot_ms = clock.now_ms()
        self._snapshots_skipped = False

    def _new_processor(self, state: PartitionState) -> PartitionProcessor:
        return PartitionProcessor(
            state,
            allowed_lateness_ms=self.settings.allowed_lateness_ms,
            dedup_horizon_ms=self.settings.dedup_horizon_ms,
            cpc_micros=self.prices,
            rules=self._ruleset.stream_rules,
        )

    def _refresh_rules(self) -> None:
        """Take up reloaded rules between micro-batches (never within one). Rules decide
        only the fate of fresh events, not the state (ids, watermark), so a change never
        disturbs dedup; a recovery re-derives unarchived decisions with the rules then in
        force (see README, Invalid traffic)."""
        ruleset = self.rules.current()
        if ruleset is not self._ruleset:
            self._ruleset = ruleset
            self.processor.rules = list(ruleset.stream_rules)

    def _recover(self) -> PartitionProcessor:
        """Rebuild state = snapshot at or before the archive's offset + replay up to it;
        then replay to the committed offset, handing those decisions to the archive."""
        committed = self.store.committed_offsets().get(self.partition, 0)
        archived = self.archive.next_offset(self.partition)
        if archived > committed:
            raise RuntimeError(
                f"partition {self.partition}: the archive holds decisions up to {archived} "
                f"but the store committed only {committed}; the store lost committed data"
            )
        # Decisions from here on are re-derived: each sink takes only what it lacks.
        self.keyed_backlog = []  # an earlier recovery's: re-derived again below
        resume = archived
        if self.keyed is not None:
            resume = min(resume, self.keyed.next_offset(self.partition))
        found = self.snapshots.load_at_or_before(self.partition, resume)
        if found is None:
            state = PartitionState.empty(self.partition, self.reader.start_offset(self.partition))
        else:
            state = PartitionState.restore(found[1])
        processor = self._new_processor(state)
        try:
            replayed = self._replay(processor, resume, archive=False)
            rearchived = self._replay(processor, committed, archive=True)
        except CorruptFrameError as exc:
            self._stall(str(exc))
            return processor
        log.info(
            "partition %d recovered at offset %d (replayed %d, re-derived %d)",
            self.partition,
            committed,
            replayed,
            rearchived,
        )
        return processor

    def _replay(self, processor: PartitionProcessor, until: int, *, archive: bool) -> int:
        """Run the log up to ``until`` through ``processor`` without committing anything;
        with ``archive``, hand the decisions to the archive. Returns how many events."""
        state = processor.state
        replayed = 0
        while state.next_offset < until:
            limit = min(self.settings.micro_batch_events, until - state.next_offset)
            frames = self.reader.read(self.partition, state.next_offset, limit)
            if not frames:
                detail = (
                    f"partition {self.partition}: the log ends at {state.next_offset} but "
                    f"the store committed {until}; acknowledged events were lost from the "
                    f"log: run `clickagg log check`"
                )
                self.reader.report_damage(self.partition, detail)
                raise CorruptFrameError(self.partition, state.next_offset, detail)
            if frames[0].lost:
                first = state.next_offset
                outcome = processor.skip_lost(min(frames[0].end_offset, until), emit=archive)
                replayed += state.next_offset - first
            else:
                events = frames_to_events(_readable_run(frames), state.next_offset)
                events = events.head(until - state.next_offset)
                outcome = processor.process(events, emit=archive, deltas=False)
                replayed += events.height
            if outcome is not None:
                ranges = {self.partition: (outcome.from_offset, outcome.to_offset)}
                self.archive.append(outcome.decisions, ranges)
                if self.keyed is not None:
                    self.keyed_backlog.append((outcome.kept, ranges[self.partition]))
        return replayed

    def _stall(self, why: str) -> None:
        self.damage = why
        log.error("partition %d stalled: %s", self.partition, why)

    def prepare(self, *, deltas: bool = True) -> Prepared | None:
        """Steps 1-2: read the next durable micro-batch and run it through the processor.

        Returns the commit, the events it counts (see ``BatchOutcome.kept``) and the
        decisions for the archive. The
        in-memory state is now ahead of the store: the caller must commit the result, or
        call :meth:`recover` before anything else.
        """
        return self.process(self.read_pending(), deltas=deltas)

    def read_pending(self) -> Pending | None:
        """Step 1: the next durable micro-batch (decoded events, or the end of a range lost
        from the log), without processing it: None when there is none."""
        if self.damage is not None:
            return None
        self._refresh_rules()
        state = self.processor.state
        try:
            frames = self.reader.read(
                self.partition, state.next_offset, self.settings.micro_batch_events
            )
        except CorruptFrameError as exc:
            self._stall(str(exc))
            return None
        if not frames:
            return None
        if frames[0].lost:
            return Pending(lost_until=frames[0].end_offset)
        return Pending(events=frames_to_events(_readable_run(frames), state.next_offset))

    def process(self, pending: Pending | None, *, deltas: bool = True) -> Prepared | None:
        """Step 2 for a batch :meth:`read_pending` read (or a prefix of its events)."""
        if pending is None:
            return None
        if pending.lost_until is not None:
            log.error(
                "partition %d: offsets [%d, %d) were lost from the log (repaired); skipping",
                self.partition,
                self.processor.state.next_offset,
                pending.lost_until,
            )
            outcome = self.processor.skip_lost(pending.lost_until)
        else:
            outcome = self.processor.process(pending.events, deltas=deltas)
        assert outcome is not None
        return self.prepared(outcome)

    def decide(self, events: pl.DataFrame) -> Decided:
        """Step 2's stateful half for events :meth:`read_pending` read (``prepare_round``
        labels them with the round's other partitions)."""
        return self.processor.decide(events)

    def prepared(self, outcome: BatchOutcome) -> Prepared:
        return Prepared(self._commit_of(outcome), outcome.kept, outcome.decisions)

    def event_clock_ms(self, pending: Pending) -> int | None:
        """How far in event time this partition would be with all of ``pending`` taken:
        the newest event time it processed or read (None: a lost range, no events)."""
        if pending.lost_until is not None or not pending.events.height:
            return None
        newest = pending.events["ts_ms"].max()
        assert isinstance(newest, int)
        return max(self.processor.state.max_event_ms, newest)

    def set_prices(self, prices: PriceBook) -> None:
        """Price events processed from now on with ``prices`` (a changed registry)."""
        self.prices = prices
        self.processor.prices = prices

    def recover(self) -> None:
        self.processor = self._recover()

    def step(self) -> int:
        """One micro-batch of this partition alone; return how many events it held."""
        return step_all([self], self.store)

    def _commit_of(self, outcome: BatchOutcome) -> PartitionCommit:
        carried = {
            f.name: getattr(outcome, f.name)
            for f in dataclasses.fields(outcome)
            if f.name not in ("kept", "decisions")
        }
        return PartitionCommit(
            partition=self.partition, committed_at_ms=self.clock.now_ms(), **carried
        )

    def maybe_snapshot(self) -> None:
        now = self.clock.now_ms()
        if now - self._last_snapshot_ms < self.settings.snapshot_interval_ms:
            return
        self._last_snapshot_ms = now
        self.snapshot_now()

    def snapshot_now(self) -> None:
        """Save the state at its offset. Skipped, not failed, when the disk is full: a
        snapshot only shortens a restart's replay (recovery falls back to an older one, and
        log retention keeps what that needs), so it must not stop the counting."""
        state = self.processor.state
        try:
            self.snapshots.save(self.partition, state.next_offset, state.snapshot())
        except OSError as exc:
            if not is_out_of_space(exc):
                raise
            if not self._snapshots_skipped:
                log.warning(
                    "partition %d: snapshots skipped, out of disk space: %s", self.partition, exc
                )
            self._snapshots_skipped = True
            return
        if self._snapshots_skipped:
            log.info("partition %d: snapshots resumed", self.partition)
            self._snapshots_skipped = False


def prepare_round(
    pending: Sequence[tuple[PartitionWorker, Pending | None]],
) -> list[tuple[PartitionWorker, Prepared]]:
    """Step 2 for every partition of a round: each partition's state decides its events
    (duplicates, lateness), then the partitions that share their rules and prices are
    labelled together (``processor.outcomes``: one pass of polars queries per round, not
    per partition). In the order of ``pending``; partitions with nothing are left out."""
    done: dict[int, Prepared] = {}
    groups: dict[tuple[tuple[int, ...], int], list[tuple[int, PartitionWorker, Decided]]] = {}
    books: list[PriceBook] = []  # the distinct price books (equal ones are one)
    for index, (worker, item) in enumerate(pending):
        if item is None:
            continue
        if item.lost_until is not None:
            lost = worker.process(item, deltas=False)
            assert lost is not None
            done[index] = lost
            continue
        processor = worker.processor
        book = next((b for b in books if _same_book(b, processor.prices)), None)
        if book is None:
            books.append(book := processor.prices)
        key = (tuple(map(id, processor.rules)), id(book))
        groups.setdefault(key, []).append((index, worker, worker.decide(item.events)))
    for members in groups.values():
        first = members[0][1].processor
        labelled = outcomes(
            [decided for _, _, decided in members],
            rules=first.rules,
            prices=first.prices,
            deltas=False,
        )
        for (index, worker, _), outcome in zip(members, labelled, strict=True):
            done[index] = worker.prepared(outcome)
    return [(pending[index][0], done[index]) for index in sorted(done)]


def _same_book(a: PriceBook, b: PriceBook) -> bool:
    return a is b or a.table.equals(b.table)


def append_recovered(workers: Sequence[PartitionWorker]) -> None:
    """Append the keyed records every recovered partition re-derived, in ONE append (its
    records interleaved by event time across partitions), before any round's own."""
    backlog = [(w, kept, span) for w in workers for kept, span in w.keyed_backlog]
    if not backlog:
        return
    keyed = backlog[0][0].keyed
    assert keyed is not None
    ranges: dict[int, tuple[int, int]] = {}
    for worker, _, (lo, hi) in backlog:
        start, _ = ranges.get(worker.partition, (lo, hi))
        ranges[worker.partition] = (start, hi)  # a partition's spans follow each other
    keyed.append(pl.concat([kept for _, kept, _ in backlog], how="vertical"), ranges)
    for worker in workers:
        worker.keyed_backlog = []


ALIGNMENT_MS = MINUTE_MS
"""How far in event time a round lets one partition run ahead of the furthest-behind
partition with events to take, when the keyed stage is on: less than the keyed stage's
slack beyond the allowed lateness (its horizon is the lateness + 2 minutes)."""


def aligned(
    pending: list[tuple[PartitionWorker, Pending | None]],
) -> list[tuple[PartitionWorker, Pending | None]]:
    """Each partition's batch cut where its events pass ``ALIGNMENT_MS`` beyond the
    furthest-behind partition's event clock: the newest event time it would have with its
    whole batch taken (a partition whose first event is past the cut waits a round).

    Why: the keyed stage gathers every partition's clicks of a key in one keyed partition,
    and leaves to the batch a record that arrives more than its horizon (the lateness + 2
    minutes) behind the newest there. Live traffic keeps the partitions' event clocks
    close, but a backlog (a replay, a catch-up) lets one partition's micro-batch end hours
    of event time after another's; taken as they come, the slower partition's next records
    would reach the keyed logs too late. Cut this way, every partition's event clock after
    the round is at least the cut minus ``ALIGNMENT_MS`` (it took its whole batch, whose
    newest event is at least the furthest-behind clock) or its next event is past the cut;
    stage 1 keeps no event more than the lateness behind its partition's clock, so no
    record of the next round is more than the lateness + ``ALIGNMENT_MS`` behind one of
    this round's (within a round, ``records_by_partition`` interleaves by time). The
    furthest-behind partition takes its whole batch, so a round moves as far as before
    for it. A partition with nothing to read does not hold the others back; one that
    resumes after being idle is behind on its own terms, as before. Events past the cut
    are read again next round; live traffic, within a minute across partitions, is never
    cut."""
    clocks = [
        clock
        for worker, item in pending
        if item is not None and (clock := worker.event_clock_ms(item)) is not None
    ]
    if len(clocks) < 2:
        return pending
    bound = min(clocks) + ALIGNMENT_MS
    out: list[tuple[PartitionWorker, Pending | None]] = []
    for worker, item in pending:
        if item is not None and item.lost_until is None:
            ts = item.events["ts_ms"].to_numpy()
            past = np.flatnonzero(ts > bound)
            if len(past):
                cut = int(past[0])
                item = Pending(events=item.events.head(cut)) if cut else None
        out.append((worker, item))
    return out


def step_all(
    workers: Sequence[PartitionWorker],
    store: CommitSink,
    counters: RealtimeCounters | None = None,
) -> int:
    """One round: every partition with new events prepares a batch, and all of them are
    committed in ONE store transaction (step 3 for each), so per-transaction costs are paid
    once per round. On any failure the partitions of the round rebuild their state from the
    store and the log; a fenced partition does so and the round is simply lost."""
    append_recovered(workers)
    pending = [(worker, worker.read_pending()) for worker in workers]
    if any(worker.keyed is not None for worker in workers):
        pending = aligned(pending)
    batch = prepare_round(pending)
    if not batch:
        return 0
    try:
        # One aggregation for the whole round: polars' fixed costs once, not per partition.
        kept = pl.concat([item.kept for _, item in batch], how="vertical")
        minute, dimensions = aggregate.round_deltas(kept)
        commits = [item.commit for _, item in batch]
        commits[0] = dataclasses.replace(
            commits[0], minute_deltas=minute, dimension_deltas=dimensions
        )
        store.commit_many(commits)
    except FencedError as exc:
        log.warning("fenced (%s): recovering %d partitions", exc, len(batch))
        for worker, _ in batch:
            worker.recover()
        return 0
    except BaseException:
        for worker, _ in batch:
            worker.recover()
        raise
    ranges = {c.partition: (c.from_offset, c.to_offset) for c in commits}
    if counters is not None:  # only committed deltas: counters never run ahead of the store
        counters.apply(minute, ranges)
    keyed = batch[0][0].keyed
    if keyed is not None:
        keyed.append(kept, ranges)
    archive = batch[0][0].archive
    archive.append(pa.concat_tables([item.decisions for _, item in batch]), ranges)
    archive.maybe_flush()
    for worker, _ in batch:
        worker.maybe_snapshot()
    return sum(c.to_offset - c.from_offset for c in commits)
