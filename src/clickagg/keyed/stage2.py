"""Stage 2 of the keyed stage: the keyed rules over the keyed log, and their corrections
applied exactly once.

It runs in the worker process, in the loop that runs stage 1's rounds, right after each
round: the embedded store is a DuckDB file only one process may write, stage 2's
corrections must go through its fenced commit, and a verdict then reaches the counts one
round after the click that crossed the threshold (see BENCHMARKS.md, verdict latency).

Commit order, for one step over keyed partitions k (the keyed stage's own protocol):

1. Read durable records of each k from its consumed offset (the store's).
2. Run :class:`clickagg.core.keyed.KeyedWindows`: skip copies (at or below their
   source's high-water offset), judge each IP's clicks by the keyed rules in force
   (:class:`clickagg.core.keyed.KeyedRules`), flag what crosses a limit.
3. Commit the corrections (negative deltas), every k's new consumed offset and its
   high-water marks in ONE store transaction, each only if the consumed offset is still
   the one read from (FencedError otherwise: recover).
4. Apply the corrections to the real-time counters, fenced by the keyed offsets (under
   keys of their own, ``counter_key``), so a redo never doubles them.

A crash before 3 loses nothing (the store still has the old offset; the state is rebuilt
by replaying the keyed log up to it). A crash after 3: the restarted process refills its
counters from the store, corrections included.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pyarrow as pa

from clickagg.clock import Clock
from clickagg.core.keyed import KeyedRules, KeyedWindows, correction_deltas, corrections
from clickagg.core.rules.loading import RulesWatcher
from clickagg.core.windows import MINUTE_MS
from clickagg.keyed.stage1 import decode_records
from clickagg.log.base import LogReader
from clickagg.realtime.base import RealtimeCounters
from clickagg.store.base import AggregateStore, FencedError, KeyedCommit

log = logging.getLogger(__name__)


def counter_key(keyed_partition: int) -> int:
    """The real-time counters fence by partition number: keyed partitions take negative
    ones, which no log partition has."""
    return -1 - keyed_partition


def keyed_horizon_ms(allowed_lateness_ms: int) -> int:
    """How long (event time) an IP-minute is kept open: stage 1 counts no click older than
    its partition's watermark, so a minute takes no more clicks once the newest event time
    is past it by the lateness (with a minute of slack for partitions a little behind)."""
    return allowed_lateness_ms + 2 * MINUTE_MS


class KeyedStage:
    def __init__(
        self,
        reader: LogReader,
        store: AggregateStore,
        *,
        rules: RulesWatcher,
        clock: Clock,
        allowed_lateness_ms: int,
        batch_records: int = 50_000,
        counters: RealtimeCounters | None = None,
    ) -> None:
        self.reader = reader
        self.store = store
        self.rules = rules
        self.clock = clock
        self.horizon_ms = keyed_horizon_ms(allowed_lateness_ms)
        self.batch_records = batch_records
        self.counters = counters
        self.windows: dict[int, KeyedWindows] = {}
        self.consumed: dict[int, int] = {}
        self.recover()

    def recover(self) -> None:
        """Rebuild every keyed partition's windows by replaying the keyed log up to the
        consumed offset the store holds (verdicts made then are already committed)."""
        progress = self.store.keyed_progress()
        rules = KeyedRules.from_ruleset(self.rules.current())
        for k in range(self.reader.partitions):
            stored = progress.get(k)
            until = stored.consumed_offset if stored is not None else 0
            windows = KeyedWindows(self.horizon_ms)
            at = self.reader.start_offset(k)
            while at < until:
                frames = self.reader.read(k, at, min(self.batch_records, until - at))
                if not frames:
                    raise RuntimeError(
                        f"keyed partition {k}: the keyed log ends at {at} but the store "
                        f"consumed up to {until}"
                    )
                records = []
                for frame in frames:
                    skip = max(0, at - frame.base_offset)
                    length = until - frame.base_offset - skip
                    records.append(decode_records(frame.payload).slice(skip, length))
                    at = min(frame.end_offset, until)
                windows.consume(pa.concat_tables(records), rules)
            if stored is not None:  # the store's marks win over a trimmed log's
                windows.high_water.update(stored.high_water)
            self.windows[k] = windows
            self.consumed[k] = until

    def step(self) -> int:
        """Steps 1-4 over every keyed partition with new records; returns how many."""
        rules = KeyedRules.from_ruleset(self.rules.current())
        commits: list[KeyedCommit] = []
        for k, windows in self.windows.items():
            start = self.consumed[k]
            frames = self.reader.read(k, start, self.batch_records)
            if not frames:
                continue
            records = pa.concat_tables(  # one consume: it judges a step's records at once
                decode_records(frame.payload).slice(max(0, start - frame.base_offset))
                for frame in frames
            )
            verdicts = windows.consume(records, rules)
            minute, dimensions = correction_deltas(verdicts)
            commits.append(
                KeyedCommit(
                    keyed_partition=k,
                    from_offset=start,
                    to_offset=frames[-1].end_offset,
                    high_water=dict(windows.high_water),
                    minute_deltas=minute,
                    dimension_deltas=dimensions,
                    corrections=corrections(verdicts),
                    committed_at_ms=self.clock.now_ms(),
                )
            )
        if not commits:
            return 0
        try:
            self.store.commit_keyed(commits)
        except FencedError as exc:
            log.warning("keyed stage fenced (%s): recovering", exc)
            self.recover()
            return 0
        except BaseException:
            self.recover()
            raise
        for c in commits:
            self.consumed[c.keyed_partition] = c.to_offset
        if self.counters is not None:
            minute = pa.concat_tables([c.minute_deltas for c in commits])
            self.counters.apply(
                minute,
                {counter_key(c.keyed_partition): (c.from_offset, c.to_offset) for c in commits},
            )
        return sum(c.to_offset - c.from_offset for c in commits)

    def applied_offsets(self) -> Mapping[int, int]:
        """Per counter key, the keyed offsets the store holds: refilled counters start here."""
        return {counter_key(k): offset for k, offset in self.consumed.items()}
