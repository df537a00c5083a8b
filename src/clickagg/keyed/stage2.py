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

Two keyed families run this protocol side by side, each over its own keyed log with its
own consumed offsets (:class:`Family`): the IP family (velocity, spread) and the visitor
family (``repeat_click``, ``clickagg.core.visitor``). Step 3 hands the store the verdicts
themselves, and the store settles them against every click either family corrected before
(``AggregateStore.commit_keyed``): a click both families flag is corrected once, named by
the earlier rule, whichever commits first. Steps 4 and 5 take what the store applied, and
a recovery hands the archive the re-derived verdicts the store says it applied
(``keyed_applied``), with the previous rule it applied them with.

The worker steps its families together (:func:`step_stages`): each does steps 1 and 2,
then every family's step 3 is ONE store transaction (its commits in the family order IP,
visitor, ad: a click two of them flag is settled as if they had committed one after the
other), then each does steps 4 and 5 with what the store applied of its own commits. A
transaction that does not apply leaves every family's windows ahead of the store: each
recovers.

The rules may change between two steps (the rules file is re-read while the worker runs).
Step 3 records, in the same transaction, the keyed spec the verdicts were made under
whenever it differs from the previous one, so a recovery replays each consumed range with
the spec it was committed with, not the one in force when it runs: a minute that was
flagged stays flagged, and no click is corrected twice or missed. The spec is opaque JSON
here and in the store (``spec_json`` / ``rules_of``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from clickagg.archive.base import ArchiveWriter
from clickagg.clock import Clock
from clickagg.core import aggregate
from clickagg.core.adkeyed import AdRules, AdWindows
from clickagg.core.corrections import CORRECTION_SCHEMA, correction_rows
from clickagg.core.keyed import KeyedRules, KeyedWindows, correction_deltas
from clickagg.core.rules.base import RuleSet
from clickagg.core.rules.loading import RulesWatcher
from clickagg.core.visitor import VisitorRules, VisitorWindows
from clickagg.core.windows import MINUTE_MS
from clickagg.keyed.snapshots import (
    decode_ad_windows,
    decode_visitor_windows,
    decode_windows,
    encode_windows,
)
from clickagg.keyed.stage1 import context_of, decode_records, newest_counted_ms
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


class Windows(Protocol):
    """What stage 2 needs of a family's state (``KeyedWindows``, ``VisitorWindows``,
    ``AdWindows``)."""

    high_water: dict[int, int]
    max_event_ms: int

    def consume(self, records: pa.Table, rules: Any) -> pa.Table: ...

    def start_context(self, from_ms: int) -> None:
        """The records from here on follow a gap: the log holds every record of this
        family from event time ``from_ms`` on, not before (``clickagg.keyed.stage1``)."""
        ...

    def kept(self) -> pl.DataFrame: ...


FAMILY_KEYS = 1024
"""Keyed partitions per family in the counters' fence and the corrections archive: the
visitor family's partition k is ``FAMILY_KEYS + k`` there, the ad family's ``2 *
FAMILY_KEYS + k`` (``keyed_partitions`` is at most this), the IP family's is k, so all
share them without a collision."""

FamilyRules = KeyedRules | VisitorRules | AdRules


@dataclass(frozen=True)
class Family:
    """One keyed family: the rules it applies, its state, where it stands in the store.
    ``"ip"``: ``clickagg.core.keyed`` (velocity, spread; verdicts as soon as a limit is
    passed). ``"visitor"``: ``clickagg.core.visitor`` (``repeat_click``; verdicts once a
    click is past the horizon). ``"ad"``: ``clickagg.core.adkeyed`` (``no_impression_click``,
    ``ctr_spike``; verdicts once the click's hour is past the horizon)."""

    name: str
    key_base: int

    def key(self, keyed_partition: int) -> int:
        """The partition's key in the corrections archive (and, negated, the counters)."""
        return self.key_base + keyed_partition

    def spec_json(self, ruleset: RuleSet) -> str:
        """The family's rules in force, as the canonical JSON the store records."""
        return self.rules_type.from_ruleset(ruleset).to_json()

    @property
    def rules_type(self) -> type[KeyedRules] | type[VisitorRules] | type[AdRules]:
        return {"ip": KeyedRules, "visitor": VisitorRules, "ad": AdRules}[self.name]

    def rules_of(self, spec: str) -> FamilyRules:
        kind = self.rules_type
        return kind() if spec == NO_SPEC else kind.from_json(spec)

    def windows(self, horizon_ms: int) -> Windows:
        if self.name == "ip":
            return KeyedWindows(horizon_ms)
        return VisitorWindows(horizon_ms) if self.name == "visitor" else AdWindows(horizon_ms)

    def decode(self, data: bytes, horizon_ms: int) -> Windows:
        if self.name == "ip":
            return decode_windows(data, horizon_ms)
        if self.name == "visitor":
            return decode_visitor_windows(data, horizon_ms)
        return decode_ad_windows(data, horizon_ms)

    def settled_before(
        self, windows: Mapping[int, Windows], rules: FamilyRules, horizon_ms: int
    ) -> int | None:
        """No verdict of this family can still come for a click older than this: an IP
        family's record is judged again only while records within the rules' reach of it
        can still be accepted; a visitor or ad family's click is decided once, below
        ``decided_until_ms``. A partition that has decided nothing yet settles nothing
        (0): the store then forgets no corrected click, whichever family's it was. (No
        bound would not do: the ad family, which commits only while its rules are in
        force, counts only once it has one, so its first hour's verdicts would find the
        clicks another family corrected forgotten, and correct them again.)"""
        bounds: list[int] = []
        for state in windows.values():
            if isinstance(state, VisitorWindows | AdWindows):
                bounds.append(state.decided_until_ms or 0)
            else:
                assert isinstance(rules, KeyedRules)
                bounds.append(state.max_event_ms - horizon_ms - rules.reach_ms)
        return min(bounds, default=None)


IP = Family("ip", 0)
VISITOR = Family("visitor", FAMILY_KEYS)
AD = Family("ad", 2 * FAMILY_KEYS)
FAMILIES = (IP, VISITOR, AD)


def counter_key(keyed_partition: int, family: Family = IP) -> int:
    """The real-time counters fence by partition number: keyed partitions take negative
    ones, which no log partition has (the visitor family's below the IP family's)."""
    return -1 - family.key(keyed_partition)


NO_SPEC = "null"  # recorded by no release; read as no keyed rule


def spec_json(ruleset: RuleSet) -> str:
    """The IP family's rules in force, as the canonical JSON the store records."""
    return IP.spec_json(ruleset)


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


def keyed_status(
    reader: LogReader,
    store: AggregateStore,
    visitor_reader: LogReader | None = None,
    ad_reader: LogReader | None = None,
) -> KeyedStatus:
    """What ``/metrics`` shows of the keyed stage: per keyed partition its durable end and
    what stage 2 consumed of it (the difference is its lag), and corrections per rule. The
    visitor family's partitions are numbered from ``FAMILY_KEYS`` (1024 + k), the ad
    family's from 2048, as in the corrections archive."""
    others = [(VISITOR, visitor_reader), (AD, ad_reader)]
    families = [(IP, reader), *((f, r) for f, r in others if r is not None)]
    partitions = []
    for family, log_reader in families:
        progress = store.keyed_progress(family.name)
        partitions += [
            KeyedPartitionStatus(
                keyed_partition=family.key(k),
                durable_end_offset=log_reader.durable_end(k),
                consumed_offset=progress[k].consumed_offset if k in progress else 0,
            )
            for k in range(log_reader.partitions)
        ]
    return KeyedStatus(
        partitions=partitions,
        corrections_by_rule=store.keyed_corrections_by_rule(),
        reviews_by_rule=store.keyed_reviews_by_rule(),
    )


def keyed_horizon_ms(allowed_lateness_ms: int) -> int:
    """How long (event time) an IP-minute is kept open: stage 1 counts no click older than
    its partition's watermark, so a minute takes no more clicks once the newest event time
    is past it by the lateness (with a minute of slack for partitions a little behind)."""
    return allowed_lateness_ms + 2 * MINUTE_MS


@dataclass(frozen=True)
class Prepared:
    """What :meth:`KeyedStage.prepare` made of one stage's new records: its commits, one
    per keyed partition read (the first carries the family's settled bound), and each rule's
    reason as the rules they were judged under say it."""

    commits: tuple[KeyedCommit, ...]
    reasons: Mapping[str, str]


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
        family: Family = IP,
    ) -> None:
        """``snapshots``: where stage 2 saves its windows now and then, so that recovery
        replays the keyed log from the newest usable one; ``trim(k, keep_from)`` then
        deletes keyed partition k's whole segments below ``keep_from`` (the keyed log
        writer's retention), which recovery never needs again. ``family``: which keyed
        family this stage runs over its own keyed log (one stage per family; both share
        the store, the counters and the corrections archive, under keys of their own)."""
        self.reader = reader
        self.store = store
        self.rules = rules
        self.clock = clock
        self.family = family
        self.horizon_ms = keyed_horizon_ms(allowed_lateness_ms)
        self.batch_records = batch_records
        self.counters = counters
        self.corrections = corrections
        self.snapshots = snapshots
        self.trim = trim
        self.snapshot_records = snapshot_records
        self.snapshot_seconds = snapshot_seconds
        self.windows: dict[int, Windows] = {}
        self.consumed: dict[int, int] = {}
        # per keyed partition: (consumed offset, monotonic time) of the last snapshot
        self._snapshotted: dict[int, tuple[int, float]] = {}
        # What the idle loop (every few ms) would otherwise redo each time: the trim bound
        # each partition was last trimmed to, and the rules of the last rule set seen.
        self._trimmed: dict[int, int] = {}
        self._rules_of: tuple[object, str, FamilyRules] | None = None
        # Whether the store holds no settled bound of this family since its rules went
        # (only a family that can be without rules while the stage runs: the ad family).
        self._released = False
        self.recover()

    def recover(self) -> None:
        """Rebuild every keyed partition's windows by replaying the keyed log up to the
        consumed offset the store holds (verdicts made then are already committed), each
        range under the spec the store recorded for it (before the first record: the spec
        in force now, as for a store of a build that recorded none); hand the corrections
        of the replayed range past the corrections archive's end to it again: of the
        verdicts re-derived, the ones the store applied then (``keyed_applied``: what
        either family had corrected before decided which), as it applied them. The replay
        starts at the newest snapshot at or before both the consumed offset and the
        corrections archive's end, if there is one, else at the keyed log's start."""
        family = self.family
        progress = self.store.keyed_progress(family.name)
        current = family.spec_json(self.rules.current())
        redo: list[pa.Table] = []
        ranges: dict[int, tuple[int, int]] = {}
        newest_counted: int | None = None
        for k in range(self.reader.partitions):
            stored = progress.get(k)
            until = stored.consumed_offset if stored is not None else 0
            specs = list(stored.specs) if stored is not None else []
            archived = (
                self.corrections.next_offset(family.key(k))
                if self.corrections is not None
                else until
            )
            windows = family.windows(self.horizon_ms)
            at = self.reader.start_offset(k)
            snapshot = (
                self.snapshots.load_at_or_before(k, min(until, archived))
                if self.snapshots is not None
                else None
            )
            if snapshot is not None:
                if snapshot[0] < at:
                    raise RuntimeError(
                        f"{family.name} keyed partition {k}: its snapshot at {snapshot[0]} is "
                        f"behind the keyed log's start {at}: the records between are gone"
                    )
                at, windows = snapshot[0], family.decode(snapshot[1], self.horizon_ms)
            elif at > 0:
                # Trimmed below ``at`` with no snapshot to start from (the snapshots were
                # lost or deleted): the records before are gone, as in a gap. They were all
                # counted, so the log is complete after the newest event counted so far:
                # a context mark there (conservative: the next hour or two to the batch).
                if newest_counted is None:
                    newest_counted = newest_counted_ms(self.store)
                windows.start_context(newest_counted + 1)
            self._snapshotted[k] = (at, time.monotonic())
            if archived > until or (archived < min(at, until)):
                raise RuntimeError(
                    f"{family.name} keyed partition {k}: corrections are archived up to "
                    f"{archived}, the store consumed up to {until} and the keyed log starts at "
                    f"{at}: the corrections between cannot be re-derived"
                )
            cuts = {start for start, _ in specs if at < start < until} | {until}
            if at < archived < until:
                cuts.add(archived)
            derived: list[pa.Table] = []
            reasons: dict[str, str] = {}  # each rule's reason as its range's spec says
            for cut in sorted(cuts):
                if at >= until:
                    break
                in_force = [spec for start, spec in specs if start <= at]
                rules = family.rules_of(in_force[-1] if in_force else current)
                verdicts = self._consume(k, windows, at, cut, rules)
                if isinstance(windows, AdWindows):
                    windows.take_reviews()  # committed with the verdicts they came with
                if at >= archived and verdicts.num_rows:
                    derived.append(verdicts)
                    reasons |= {rule.rule_id: rule.reason for rule in rules.rules}
                at = cut
            if derived:
                applied = self._as_applied(k, archived, pa.concat_tables(derived))
                redo.append(self._correction_rows(k, applied, reasons, self.clock.now_ms()))
            if stored is not None:  # the store's marks win over a trimmed log's
                windows.high_water.update(stored.high_water)
            self.windows[k] = windows
            self.consumed[k] = until
            if archived < until:
                ranges[family.key(k)] = (archived, until)
        if self.corrections is not None and ranges:
            rows = pa.concat_tables(redo) if redo else CORRECTION_SCHEMA.empty_table()
            self.corrections.append(rows, ranges)
            self.corrections.maybe_flush()

    def _as_applied(self, k: int, from_offset: int, verdicts: pa.Table) -> pa.Table:
        """Of verdicts re-derived from ``from_offset`` on, the ones the store applied, each
        with the ``previous_rule_id`` it was applied with (a click's rule is applied at
        most once: each move names an earlier rule) and when (``applied_at_ms``): the
        corrections archive stamps them with their commit's time, not the recovery's."""
        applied = pl.from_arrow(self.store.keyed_applied(self.family.name, k, from_offset))
        frame = pl.from_arrow(verdicts)
        assert isinstance(applied, pl.DataFrame) and isinstance(frame, pl.DataFrame)
        kept = frame.drop("previous_rule_id").join(
            applied.cast({"event_id": pl.String, "rule_id": pl.String}),
            on=["event_id", "rule_id"],
            how="inner",
            maintain_order="left",
        )
        names = [*verdicts.schema.names, "applied_at_ms"]
        schema = verdicts.schema.append(pa.field("applied_at_ms", pa.int64()))
        return kept.select(names).to_arrow().cast(schema)

    def _consume(self, k: int, windows: Windows, lo: int, hi: int, rules: FamilyRules) -> pa.Table:
        """Feed the records of keyed offsets [lo, hi) to ``windows``, each with its
        ``keyed_offset``, in one consume per read; their verdicts."""
        verdicts: list[pa.Table] = []
        at = lo
        while at < hi:
            frames = self.reader.read(k, at, min(self.batch_records, hi - at))
            if not frames:
                raise RuntimeError(
                    f"{self.family.name} keyed partition {k}: the keyed log ends at {at} but "
                    f"the store consumed up to {hi}"
                )
            parts: list[pa.Table] = []
            for frame in frames:
                records = decode_records(frame.payload)
                mark = context_of(records)
                if mark is not None and frame.base_offset >= at:
                    # The records before the mark are judged as they came, the rest with
                    # the gap's hours left to the batch: the mark applies at this record
                    # however the log is read, so a replay decides exactly as the first run.
                    if parts:
                        verdicts.append(windows.consume(pa.concat_tables(parts), rules))
                        parts = []
                    windows.start_context(mark)
                records = records.replace_schema_metadata(None)
                offsets = np.arange(frame.base_offset, frame.base_offset + records.num_rows)
                records = records.append_column("keyed_offset", pa.array(offsets, pa.int64()))
                skip = max(0, at - frame.base_offset)
                parts.append(records.slice(skip, max(0, hi - frame.base_offset - skip)))
                at = min(frame.end_offset, hi)
            if parts:
                verdicts.append(windows.consume(pa.concat_tables(parts), rules))
        return pa.concat_tables(verdicts)

    def _correction_rows(
        self, k: int, flagged: pa.Table, reasons: Mapping[str, str], at_ms: int
    ) -> pa.Table:
        return correction_rows(
            flagged, keyed_partition=self.family.key(k), reasons=reasons, corrected_at_ms=at_ms
        )

    def step(self) -> int:
        """Steps 1-5 over every keyed partition with new records; returns how many."""
        return step_stages([self])

    def prepare(self) -> Prepared | None:
        """Steps 1 and 2: read each keyed partition from its consumed offset and judge the
        records; the commits of step 3 (None: no new record). The windows have then taken
        records the store does not hold yet: :meth:`finish` once the commits are applied,
        :meth:`recover` if they are not."""
        ruleset = self.rules.current()
        if self._rules_of is None or self._rules_of[0] is not ruleset:
            spec = self.family.spec_json(ruleset)
            self._rules_of = (ruleset, spec, self.family.rules_of(spec))
        _, spec, rules = self._rules_of
        commits: list[KeyedCommit] = []
        for k, windows in self.windows.items():
            start = self.consumed[k]
            frames = self.reader.read(k, start, self.batch_records)
            if not frames:
                continue
            end = frames[-1].end_offset
            verdicts = self._consume(k, windows, start, end, rules)
            reviews = windows.take_reviews() if isinstance(windows, AdWindows) else {}
            commits.append(
                KeyedCommit(
                    keyed_partition=k,
                    from_offset=start,
                    to_offset=end,
                    high_water=dict(windows.high_water),
                    # made by the store, of the verdicts it applies
                    minute_deltas=aggregate.MINUTE_SCHEMA.empty_table(),
                    dimension_deltas=aggregate.empty_dimension_deltas(),
                    corrections=0,
                    committed_at_ms=self.clock.now_ms(),
                    spec_json=spec,
                    replay_from=self.reader.start_offset(k),
                    family=self.family.name,
                    verdicts=verdicts,
                    rule_order=tuple(ruleset.ids),
                    reviews_by_rule=reviews,
                )
            )
        if not commits:
            if not rules.rules and not self._released and self.family is AD:
                self.store.release_settled(self.family.name)
                self._released = True
            return None
        self._released = False
        settled = self.family.settled_before(self.windows, rules, self.horizon_ms)
        commits[0] = dataclasses.replace(commits[0], settled_before_ms=settled)
        reasons = {rule.rule_id: rule.reason for rule in rules.rules}
        return Prepared(tuple(commits), reasons)

    def finish(self, prepared: Prepared, applied: Sequence[pa.Table]) -> int:
        """Steps 4 and 5, once the store applied ``prepared``'s commits (``applied``: what
        it applied of each one's verdicts, as ``commit_keyed`` returns them); then the
        windows' snapshots. Returns how many records the commits consumed."""
        commits = prepared.commits
        for c in commits:
            self.consumed[c.keyed_partition] = c.to_offset
        ranges = {self.family.key(c.keyed_partition): (c.from_offset, c.to_offset) for c in commits}
        if self.counters is not None:
            minute = pa.concat_tables([correction_deltas(table)[0] for table in applied])
            self.counters.apply(
                minute,
                {
                    counter_key(c.keyed_partition, self.family): (c.from_offset, c.to_offset)
                    for c in commits
                },
            )
        if self.corrections is not None:
            corrected = [
                self._correction_rows(c.keyed_partition, table, prepared.reasons, c.committed_at_ms)
                for c, table in zip(commits, applied, strict=True)
                if table.num_rows
            ]
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
                state = self.windows[k]
                assert isinstance(state, KeyedWindows | VisitorWindows | AdWindows)
                self.snapshots.save(k, consumed, encode_windows(state))
                self._snapshotted[k] = (consumed, now)
            if self.trim is not None:
                published = (
                    self.corrections.published_offset(self.family.key(k))
                    if self.corrections is not None
                    else consumed
                )
                bound = min(consumed, published)
                if self._trimmed.get(k) == bound:
                    continue  # nothing new to trim below: no directory listing
                self._trimmed[k] = bound
                keep_from = self.snapshots.oldest_needed(k, bound)
                if keep_from:
                    self.trim(k, keep_from)

    def applied_offsets(self) -> Mapping[int, int]:
        """Per counter key, the keyed offsets the store holds: refilled counters start here."""
        return {counter_key(k, self.family): offset for k, offset in self.consumed.items()}


def step_stages(stages: Sequence[KeyedStage]) -> int:
    """Steps 1-5 of every stage (one per family, all over one store), with every family's
    step 3 in ONE store transaction: each stage prepares its commits, the store applies all
    of them or none (each fenced by its own family's consumed offset), then each stage
    applies what the store applied to the counters and the corrections archive. The commits
    go to the store in the stages' order, so a click two families flag in one step is
    settled as if they had committed one after the other in that order (the worker's: IP,
    visitor, ad). Returns how many records the stages consumed.

    Commits that do not apply leave every stage that took part with windows ahead of the
    store: each recovers, as one stage alone would (a fenced commit is logged and steps
    nothing; any other error is raised once they have)."""
    pending: list[tuple[KeyedStage, Prepared]] = []
    try:
        for stage in stages:
            prepared = stage.prepare()
            if prepared is not None:
                pending.append((stage, prepared))
    except BaseException:
        _recover([stage for stage, _ in pending])
        raise
    if not pending:
        return 0
    store = pending[0][0].store
    if any(stage.store is not store for stage, _ in pending):
        raise ValueError("keyed stages stepped together must share one store")
    commits = [c for _, prepared in pending for c in prepared.commits]
    try:
        applied = store.commit_keyed(commits)
    except FencedError as exc:
        names = ", ".join(stage.family.name for stage, _ in pending)
        log.warning("keyed stages (%s) fenced (%s): recovering", names, exc)
        _recover([stage for stage, _ in pending])
        return 0
    except BaseException:
        _recover([stage for stage, _ in pending])
        raise
    done = 0
    error: BaseException | None = None
    at = 0
    for stage, prepared in pending:
        mine = applied[at : at + len(prepared.commits)]
        at += len(prepared.commits)
        try:
            done += stage.finish(prepared, mine)
        except BaseException as exc:
            # The store holds every stage's commit: the others still finish theirs (as
            # each would have, committing on its own), then the first error is raised.
            error = error or exc
    if error is not None:
        raise error
    return done


def _recover(stages: Sequence[KeyedStage]) -> None:
    """Recover each stage; the first recovery error is raised once every stage tried."""
    error: BaseException | None = None
    for stage in stages:
        try:
            stage.recover()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
