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

import logging

import polars as pl

from clickagg.clock import Clock
from clickagg.config import Settings
from clickagg.core import columns
from clickagg.core.processor import BatchOutcome, PartitionProcessor, PartitionState
from clickagg.log.base import Frame, LogReader
from clickagg.store.base import AggregateStore, FencedError, PartitionCommit
from clickagg.worker.snapshots import SnapshotStore

log = logging.getLogger(__name__)


def frames_to_events(frames: list[Frame], from_offset: int) -> pl.DataFrame:
    """Decode frames into one DataFrame, dropping events before ``from_offset``."""
    parts = [
        columns.to_frame(
            columns.decode(f.payload), partition=f.partition, base_offset=f.base_offset
        )
        for f in frames
    ]
    events = columns.concat_frames(parts)
    if parts and frames[0].base_offset < from_offset:
        events = events.slice(from_offset - frames[0].base_offset)
    return events


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
    ) -> None:
        self.partition = partition
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

    def step(self) -> int:
        """Process one micro-batch if the log has one; return how many events it held."""
        state = self.processor.state
        frames = self.reader.read(
            self.partition, state.next_offset, self.settings.micro_batch_events
        )
        if not frames:
            return 0
        events = frames_to_events(frames, state.next_offset)
        outcome = self.processor.process(events)
        assert outcome is not None
        try:
            self.store.commit(self._commit_of(outcome))
        except FencedError:
            log.warning(
                "partition %d fenced at %d: recovering", self.partition, outcome.from_offset
            )
            self.processor = self._recover()
            return 0
        except BaseException:
            # State ran ahead of the store: rebuild before anything else happens.
            self.processor = self._recover()
            raise
        self._maybe_snapshot()
        return events.height

    def _commit_of(self, outcome: BatchOutcome) -> PartitionCommit:
        return PartitionCommit(
            partition=self.partition,
            from_offset=outcome.from_offset,
            to_offset=outcome.to_offset,
            minute_deltas=outcome.minute_deltas,
            dimension_deltas=outcome.dimension_deltas,
            fates=outcome.fates,
            late_events=outcome.late_events,
            max_event_ms=outcome.max_event_ms,
            watermark_ms=outcome.watermark_ms,
            counted=outcome.counted,
            duplicates=outcome.duplicates,
            late=outcome.late,
            invalid=outcome.invalid,
            committed_at_ms=self.clock.now_ms(),
        )

    def _maybe_snapshot(self) -> None:
        now = self.clock.now_ms()
        if now - self._last_snapshot_ms < self.settings.snapshot_interval_ms:
            return
        state = self.processor.state
        self.snapshots.save(self.partition, state.next_offset, state.snapshot())
        self._last_snapshot_ms = now

    def snapshot_now(self) -> None:
        state = self.processor.state
        self.snapshots.save(self.partition, state.next_offset, state.snapshot())
