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
5. Hand the corrected clicks (``clickagg.core.corrections``: each with its rule and
   evidence) to the corrections archive, fenced like the decisions' archive: per keyed
   partition it holds exactly the corrections of keyed offsets ``[0, archived)``.

A crash before 3 loses nothing (the store still has the old offset; the state is rebuilt
by replaying the keyed log up to it). A crash after 3: the restarted process refills its
counters from the store, corrections included, and its recovery re-derives the
corrections of ``[archived, consumed)`` by replaying that range (verdicts are a function of
the keyed log and the recorded specs) and hands them to the archive: none is archived
twice, none is missed.

The rules may change between two steps (the rules file is re-read while the worker runs).
Step 3 records, in the same transaction, the keyed spec the verdicts were made under
whenever it differs from the previous one, so a recovery replays each consumed range with
the spec it was committed with, not the one in force when it runs: a minute that was
flagged stays flagged, and no click is corrected twice or missed. The spec is opaque JSON
here and in the store (``spec_json`` / ``rules_of``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clickagg.archive.base import ArchiveWriter
from clickagg.clock import Clock
from clickagg.core.corrections import CORRECTION_SCHEMA, correction_rows
from clickagg.core.keyed import KeyedRules, KeyedWindows, correction_deltas, corrections
from clickagg.core.rules.base import RuleSet
from clickagg.core.rules.loading import RulesWatcher
from clickagg.core.windows import MINUTE_MS
from clickagg.keyed.snapshots import decode_windows, encode_windows
from clickagg.keyed.stage1 import decode_records
from clickagg.log.base import LogReader
from clickagg.query.base import KeyedPartitionStatus, KeyedStatus
from clickagg.realtime.base import RealtimeCounters
from clickagg.store.base import AggregateStore, FencedError, KeyedCommit
from clickagg.worker.snapshots import SnapshotStore

log = logging.getLogger(__name__)

# A keyed partition's windows are saved after this many records consumed, or this long
# after the last save once it consumed any: a restart replays at most about that much.
SNAPSHOT_RECORDS = 200_000
SNAPSHOT_SECONDS = 30.0


def counter_key(keyed_partition: int) -> int:
    """The real-time counters fence by partition number: keyed partitions take negative
    ones, which no log partition has."""
    return -1 - keyed_partition


NO_SPEC = "null"  # recorded by no release; read as no keyed rule


def spec_json(ruleset: RuleSet) -> str:
    """The keyed rules in force, as the canonical JSON the store records."""
    return KeyedRules.from_ruleset(ruleset).to_json()


def rules_of(spec: str) -> KeyedRules:
    return KeyedRules() if spec == NO_SPEC else KeyedRules.from_json(spec)


def newly_corrected(verdicts: pa.Table) -> pa.Table:
    """The verdicts that correct a click (not those moving a corrected click's reason)."""
    return verdicts.filter(pc.is_null(verdicts["previous_rule_id"]))


def count_by_rule(flagged: pa.Table) -> dict[str, int]:
    """How many clicks each rule flagged."""
    counts = pc.value_counts(flagged["rule_id"])
    return {
        str(rule): int(n)
        for rule, n in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        )
    }


def keyed_status(reader: LogReader, store: AggregateStore) -> KeyedStatus:
    """What ``/metrics`` shows of the keyed stage: per keyed partition its durable end and
    what stage 2 consumed of it (the difference is its lag), and corrections per rule."""
    progress = store.keyed_progress()
    return KeyedStatus(
        partitions=[
            KeyedPartitionStatus(
                keyed_partition=k,
                durable_end_offset=reader.durable_end(k),
                consumed_offset=progress[k].consumed_offset if k in progress else 0,
            )
            for k in range(reader.partitions)
        ],
        corrections_by_rule=store.keyed_corrections_by_rule(),
    )


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
        corrections: ArchiveWriter | None = None,
        snapshots: SnapshotStore | None = None,
        trim: Callable[[int, int], object] | None = None,
        snapshot_records: int = SNAPSHOT_RECORDS,
        snapshot_seconds: float = SNAPSHOT_SECONDS,
    ) -> None:
        """``snapshots``: where stage 2 saves its windows now and then, so that recovery
        replays the keyed log from the newest usable one; ``trim(k, keep_from)`` then
        deletes keyed partition k's whole segments below ``keep_from`` (the keyed log
        writer's retention), which recovery never needs again."""
        self.reader = reader
        self.store = store
        self.rules = rules
        self.clock = clock
        self.horizon_ms = keyed_horizon_ms(allowed_lateness_ms)
        self.batch_records = batch_records
        self.counters = counters
        self.corrections = corrections
        self.snapshots = snapshots
        self.trim = trim
        self.snapshot_records = snapshot_records
        self.snapshot_seconds = snapshot_seconds
        self.windows: dict[int, KeyedWindows] = {}
        self.consumed: dict[int, int] = {}
        # per keyed partition: (consumed offset, monotonic time) of the last snapshot
        self._snapshotted: dict[int, tuple[int, float]] = {}
        self.recover()

    def recover(self) -> None:
        """Rebuild every keyed partition's windows by replaying the keyed log up to the
        consumed offset the store holds (verdicts made then are already committed), each
        range under the spec the store recorded for it (before the first record: the spec
        in force now, as for a store of a build that recorded none); hand the corrections
        of the replayed range past the corrections archive's end to it again. The replay
        starts at the newest snapshot at or before both the consumed offset and the
        corrections archive's end, if there is one, else at the keyed log's start."""
        progress = self.store.keyed_progress()
        current = spec_json(self.rules.current())
        redo: list[pa.Table] = []
        ranges: dict[int, tuple[int, int]] = {}
        for k in range(self.reader.partitions):
            stored = progress.get(k)
            until = stored.consumed_offset if stored is not None else 0
            specs = list(stored.specs) if stored is not None else []
            archived = self.corrections.next_offset(k) if self.corrections is not None else until
            windows = KeyedWindows(self.horizon_ms)
            at = self.reader.start_offset(k)
            snapshot = (
                self.snapshots.load_at_or_before(k, min(until, archived))
                if self.snapshots is not None
                else None
            )
            if snapshot is not None:
                if snapshot[0] < at:
                    raise RuntimeError(
                        f"keyed partition {k}: its snapshot at {snapshot[0]} is behind the "
                        f"keyed log's start {at}: the records between are gone"
                    )
                at, windows = snapshot[0], decode_windows(snapshot[1], self.horizon_ms)
            self._snapshotted[k] = (at, time.monotonic())
            if archived > until or (archived < min(at, until)):
                raise RuntimeError(
                    f"keyed partition {k}: corrections are archived up to {archived}, the "
                    f"store consumed up to {until} and the keyed log starts at {at}: the "
                    "corrections between cannot be re-derived"
                )
            cuts = {start for start, _ in specs if at < start < until} | {until}
            if at < archived < until:
                cuts.add(archived)
            for cut in sorted(cuts):
                if at >= until:
                    break
                in_force = [spec for start, spec in specs if start <= at]
                rules = rules_of(in_force[-1] if in_force else current)
                verdicts = self._consume(k, windows, at, cut, rules)
                if at >= archived and verdicts.num_rows:
                    redo.append(self._correction_rows(k, verdicts, rules))
                at = cut
            if stored is not None:  # the store's marks win over a trimmed log's
                windows.high_water.update(stored.high_water)
            self.windows[k] = windows
            self.consumed[k] = until
            if archived < until:
                ranges[k] = (archived, until)
        if self.corrections is not None and ranges:
            rows = pa.concat_tables(redo) if redo else CORRECTION_SCHEMA.empty_table()
            self.corrections.append(rows, ranges)
            self.corrections.maybe_flush()

    def _consume(
        self, k: int, windows: KeyedWindows, lo: int, hi: int, rules: KeyedRules
    ) -> pa.Table:
        """Feed the records of keyed offsets [lo, hi) to ``windows``, each with its
        ``keyed_offset``, in one consume per read; their verdicts."""
        verdicts: list[pa.Table] = []
        at = lo
        while at < hi:
            frames = self.reader.read(k, at, min(self.batch_records, hi - at))
            if not frames:
                raise RuntimeError(
                    f"keyed partition {k}: the keyed log ends at {at} but the store "
                    f"consumed up to {hi}"
                )
            parts = []
            for frame in frames:
                records = decode_records(frame.payload)
                offsets = np.arange(frame.base_offset, frame.base_offset + records.num_rows)
                records = records.append_column("keyed_offset", pa.array(offsets, pa.int64()))
                skip = max(0, at - frame.base_offset)
                parts.append(records.slice(skip, max(0, hi - frame.base_offset - skip)))
                at = min(frame.end_offset, hi)
            verdicts.append(windows.consume(pa.concat_tables(parts), rules))
        return pa.concat_tables(verdicts)

    def _correction_rows(self, k: int, flagged: pa.Table, rules: KeyedRules) -> pa.Table:
        return correction_rows(
            flagged,
            keyed_partition=k,
            reasons={rule.rule_id: rule.reason for rule in rules.rules},
            corrected_at_ms=self.clock.now_ms(),
        )

    def step(self) -> int:
        """Steps 1-5 over every keyed partition with new records; returns how many."""
        spec = spec_json(self.rules.current())
        rules = rules_of(spec)
        commits: list[KeyedCommit] = []
        corrected: list[pa.Table] = []
        for k, windows in self.windows.items():
            start = self.consumed[k]
            frames = self.reader.read(k, start, self.batch_records)
            if not frames:
                continue
            end = frames[-1].end_offset
            verdicts = self._consume(k, windows, start, end, rules)
            minute, dimensions = correction_deltas(verdicts)
            fresh = newly_corrected(verdicts)
            if verdicts.num_rows:  # corrections, and moves of a corrected click's reason
                corrected.append(self._correction_rows(k, verdicts, rules))
            commits.append(
                KeyedCommit(
                    keyed_partition=k,
                    from_offset=start,
                    to_offset=end,
                    high_water=dict(windows.high_water),
                    minute_deltas=minute,
                    dimension_deltas=dimensions,
                    corrections=corrections(verdicts),
                    committed_at_ms=self.clock.now_ms(),
                    spec_json=spec,
                    replay_from=self.reader.start_offset(k),
                    corrections_by_rule=count_by_rule(fresh),
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
        ranges = {c.keyed_partition: (c.from_offset, c.to_offset) for c in commits}
        if self.counters is not None:
            minute = pa.concat_tables([c.minute_deltas for c in commits])
            self.counters.apply(minute, {counter_key(k): r for k, r in ranges.items()})
        if self.corrections is not None:
            rows = pa.concat_tables(corrected) if corrected else CORRECTION_SCHEMA.empty_table()
            self.corrections.append(rows, ranges)
            self.corrections.maybe_flush()
        self._maintain()
        return sum(c.to_offset - c.from_offset for c in commits)

    def maybe_flush(self) -> None:
        """A quiet stage still publishes the corrections it made, and saves its windows."""
        if self.corrections is not None:
            self.corrections.maybe_flush()
        self._maintain()

    def _maintain(self) -> None:
        """Save the windows of partitions that consumed enough since their last snapshot,
        then trim the keyed log below what a recovery could still need: the newest snapshot
        at or before both the consumed offset and the corrections archive's published end
        (a restart re-derives the corrections past that end from there)."""
        if self.snapshots is None:
            return
        now = time.monotonic()
        for k, consumed in self.consumed.items():
            last, at = self._snapshotted.get(k, (0, now))
            if consumed - last >= self.snapshot_records or (
                consumed > last and now - at >= self.snapshot_seconds
            ):
                self.snapshots.save(k, consumed, encode_windows(self.windows[k]))
                self._snapshotted[k] = (consumed, now)
            if self.trim is not None:
                published = (
                    self.corrections.published_offset(k)
                    if self.corrections is not None
                    else consumed
                )
                keep_from = self.snapshots.oldest_needed(k, min(consumed, published))
                if keep_from:
                    self.trim(k, keep_from)

    def applied_offsets(self) -> Mapping[int, int]:
        """Per counter key, the keyed offsets the store holds: refilled counters start here."""
        return {counter_key(k): offset for k, offset in self.consumed.items()}
