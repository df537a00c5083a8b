"""The partition worker: the exactly-once loop between the log and the store.

Commit order, for one micro-batch of partition p (this is the whole protocol):

1. Read durable frames of p from ``next_offset`` (the store's committed offset).
2. Run the pure processor: it decides fates and deltas and advances in-memory state.
3. Commit deltas, fates, late events and ``to_offset`` in ONE store transaction, only if
   the committed offset is still ``from_offset`` (otherwise FencedError: recover).
4. Every ``snapshot_interval`` write the state snapshot at ``to_offset`` (atomic file).

A crash before 3 loses nothing: the store still says ``from_offset`` and the restarted
worker redoes the batch. A crash after 3 loses nothing either: recovery loads the newest
snapshot at or before the committed offset and replays the log up to it without emitting,
which rebuilds exactly the state an uninterrupted worker would have.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import polars as pl

from clickagg.clock import Clock
from clickagg.config import Settings
from clickagg.core import aggregate, columns
from clickagg.core.processor import BatchOutcome, PartitionProcessor, PartitionState
from clickagg.log.base import Frame, LogReader
from clickagg.realtime.base import RealtimeCounters
from clickagg.store.base import AggregateStore, FencedError, PartitionCommit
from clickagg.worker.snapshots import SnapshotStore

log = logging.getLogger(__name__)


def frames_to_events(frames: list[Frame], from_offset: int) -> pl.DataFrame:
    """Decode a run of frames (one partition, contiguous offsets, as the log reads them)
    into one DataFrame, dropping events before ``from_offset``."""
    if not frames:
        return columns.empty_frame()
    first = frames[0]
    events = columns.decode_run([f.payload for f in frames])
    if events.num_rows != frames[-1].end_offset - first.base_offset:
        raise ValueError(f"frames of partition {first.partition} do not match their offsets")
    skip = max(0, from_offset - first.base_offset)
    return columns.to_frame(
        events.slice(skip), partition=first.partition, base_offset=first.base_offset + skip
    )


class PartitionWorker:
    def __init__(
        self,
        partition: int,
        *,
        reader: LogReader,
        store: AggregateStore,
        snapshots: SnapshotStore,
        settings: Settings,
        clock: Clock,
        cpc_micros: Mapping[str, int] | None = None,
    ) -> None:
        self.partition = partition
        self.cpc_micros = dict(cpc_micros or {})
        self.reader = reader
        self.store = store
        self.snapshots = snapshots
        self.settings = settings
        self.clock = clock
        self.processor = self._recover()
        self._last_snapshot_ms = clock.now_ms()

    def _new_processor(self, state: PartitionState) -> PartitionProcessor:
        return PartitionProcessor(
            state,
            allowed_lateness_ms=self.settings.allowed_lateness_ms,
            dedup_horizon_ms=self.settings.dedup_horizon_ms,
            cpc_micros=self.cpc_micros,
        )

    def _recover(self) -> PartitionProcessor:
        """Rebuild state = snapshot at or before the committed offset + replay up to it."""
        committed = self.store.committed_offsets().get(self.partition, 0)
        found = self.snapshots.load_at_or_before(self.partition, committed)
        if found is None:
            state = PartitionState.empty(self.partition, self.reader.start_offset(self.partition))
        else:
            state = PartitionState.restore(found[1])
        processor = self._new_processor(state)
        replayed = 0
        while state.next_offset < committed:
            limit = min(self.settings.micro_batch_events, committed - state.next_offset)
            frames = self.reader.read(self.partition, state.next_offset, limit)
            if not frames:
                raise RuntimeError(
                    f"partition {self.partition}: log ends at {state.next_offset} but the "
                    f"store committed {committed}; the log lost acknowledged data"
                )
            events = frames_to_events(frames, state.next_offset)
            events = events.head(committed - state.next_offset)
            processor.process(events, emit=False)
            replayed += events.height
        log.info(
            "partition %d recovered at offset %d (replayed %d)", self.partition, committed, replayed
        )
        return processor

    def prepare(self, *, deltas: bool = True) -> tuple[PartitionCommit, pl.DataFrame] | None:
        """Steps 1-2: read the next durable micro-batch and run it through the processor.

        Returns the commit and the events it counts (see ``BatchOutcome.kept``). The
        in-memory state is now ahead of the store: the caller must commit the result, or
        call :meth:`recover` before anything else.
        """
        state = self.processor.state
        frames = self.reader.read(
            self.partition, state.next_offset, self.settings.micro_batch_events
        )
        if not frames:
            return None
        outcome = self.processor.process(frames_to_events(frames, state.next_offset), deltas=deltas)
        assert outcome is not None
        return self._commit_of(outcome), outcome.kept

    def recover(self) -> None:
        self.processor = self._recover()

    def step(self) -> int:
        """One micro-batch of this partition alone; return how many events it held."""
        return step_all([self], self.store)

    def _commit_of(self, outcome: BatchOutcome) -> PartitionCommit:
        carried = {
            f.name: getattr(outcome, f.name)
            for f in dataclasses.fields(outcome)
            if f.name != "kept"
        }
        return PartitionCommit(
            partition=self.partition, committed_at_ms=self.clock.now_ms(), **carried
        )

    def maybe_snapshot(self) -> None:
        now = self.clock.now_ms()
        if now - self._last_snapshot_ms < self.settings.snapshot_interval_ms:
            return
        state = self.processor.state
        self.snapshots.save(self.partition, state.next_offset, state.snapshot())
        self._last_snapshot_ms = now

    def snapshot_now(self) -> None:
        state = self.processor.state
        self.snapshots.save(self.partition, state.next_offset, state.snapshot())


def step_all(
    workers: Sequence[PartitionWorker],
    store: AggregateStore,
    counters: RealtimeCounters | None = None,
) -> int:
    """One round: every partition with new events prepares a batch, and all of them are
    committed in ONE store transaction (step 3 for each), so per-transaction costs are paid
    once per round. On any failure the partitions of the round rebuild their state from the
    store and the log; a fenced partition does so and the round is simply lost."""
    prepared = [(worker, worker.prepare(deltas=False)) for worker in workers]
    batch = [(worker, item[0]) for worker, item in prepared if item is not None]
    if not batch:
        return 0
    try:
        # One aggregation for the whole round: polars' fixed costs once, not per partition.
        kept = pl.concat([item[1] for _, item in prepared if item is not None], how="vertical")
        minute = aggregate.minute_deltas(kept)
        dimensions = aggregate.dimension_deltas(kept)
        commits = [commit for _, commit in batch]
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
    if counters is not None:  # only committed deltas: counters never run ahead of the store
        counters.apply(minute)
    for worker, _ in batch:
        worker.maybe_snapshot()
    return sum(commit.to_offset - commit.from_offset for _, commit in batch)
