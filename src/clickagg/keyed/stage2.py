"""Stage 2 of the keyed stage: the keyed rules over the keyed log, and their corrections
applied exactly once.

It runs in the worker process, in the loop that runs stage 1's rounds, right after each
round: the embedded store is a DuckDB file only one process may write, stage 2's
corrections must go through its fenced commit, and a verdict then reaches the counts one
round after the click that crossed the threshold (see BENCHMARKS.md, verdict latency).

Commit order, for one step over keyed partitions k (the keyed stage's own protocol):

1. Read durable records of each k from its consumed offset (the store's).
2. Run :class:`clickagg.core.keyed.VelocityWindows`: skip copies (at or below their
   source's high-water offset), count per (ip, minute), flag what crosses the limit.
3. Commit the corrections (negative deltas), every k's new consumed offset and its
   high-water marks in ONE store transaction, each only if the consumed offset is still
   the one read from (FencedError otherwise: recover).
4. Apply the corrections to the real-time counters, fenced by the keyed offsets (under
   keys of their own, ``counter_key``), so a redo never doubles them.

A crash before 3 loses nothing (the store still has the old offset; the state is rebuilt
by replaying the keyed log up to it). A crash after 3: the restarted process refills its
counters from the store, corrections included.

The rules may change between two steps (the rules file is re-read while the worker runs).
Step 3 records, in the same transaction, the keyed spec the verdicts were made under
whenever it differs from the previous one, so a recovery replays each consumed range with
the spec it was committed with, not the one in force when it runs: a minute that was
flagged stays flagged, and no click is corrected twice or missed. The spec is opaque JSON
here and in the store (``spec_json`` / ``limit_of``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pyarrow as pa

from clickagg.clock import Clock
from clickagg.core.keyed import VelocityLimit, VelocityWindows, correction_deltas
from clickagg.core.rules.base import RuleSet
from clickagg.core.rules.loading import RulesWatcher
from clickagg.core.windows import MINUTE_MS
from clickagg.keyed.stage1 import decode_records
from clickagg.log.base import LogReader
from clickagg.realtime.base import RealtimeCounters
from clickagg.store.base import AggregateStore, FencedError, KeyedCommit

log = logging.getLogger(__name__)

VELOCITY_KIND = "ip_click_velocity"


def counter_key(keyed_partition: int) -> int:
    """The real-time counters fence by partition number: keyed partitions take negative
    ones, which no log partition has."""
    return -1 - keyed_partition


def velocity_limit(ruleset: RuleSet) -> VelocityLimit | None:
    """The first enabled per-IP velocity rule of the rules in force (the batch's too)."""
    for rule in ruleset.rules:
        spec = rule.spec
        if spec.kind == VELOCITY_KIND and spec.enabled:
            return VelocityLimit(
                rule_id=spec.id,
                reason=spec.reason,
                max_clicks_per_minute=int(spec.params["max_clicks_per_minute"]),
                effective_from_ms=spec.effective_from_ms,
            )
    return None


NO_SPEC = "null"


def spec_json(ruleset: RuleSet) -> str:
    """The keyed spec in force, as the canonical JSON the store records."""
    limit = velocity_limit(ruleset)
    return limit.to_json() if limit is not None else NO_SPEC


def limit_of(spec: str) -> VelocityLimit | None:
    return None if spec == NO_SPEC else VelocityLimit.from_json(spec)


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
        self.windows: dict[int, VelocityWindows] = {}
        self.consumed: dict[int, int] = {}
        self.recover()

    def recover(self) -> None:
        """Rebuild every keyed partition's windows by replaying the keyed log up to the
        consumed offset the store holds (verdicts made then are already committed), each
        range under the spec the store recorded for it (before the first record: the spec
        in force now, as for a store of a build that recorded none)."""
        progress = self.store.keyed_progress()
        current = spec_json(self.rules.current())
        for k in range(self.reader.partitions):
            stored = progress.get(k)
            until = stored.consumed_offset if stored is not None else 0
            specs = list(stored.specs) if stored is not None else []
            windows = VelocityWindows(self.horizon_ms)
            at = self.reader.start_offset(k)
            cuts = sorted({start for start, _ in specs if at < start < until} | {until})
            for cut in cuts:
                if at >= until:
                    break
                in_force = [spec for start, spec in specs if start <= at]
                limit = limit_of(in_force[-1] if in_force else current)
                self._consume(k, windows, at, cut, limit)
                at = cut
            if stored is not None:  # the store's marks win over a trimmed log's
                windows.high_water.update(stored.high_water)
            self.windows[k] = windows
            self.consumed[k] = until

    def _consume(
        self, k: int, windows: VelocityWindows, lo: int, hi: int, limit: VelocityLimit | None
    ) -> list[dict[str, object]]:
        """Feed the records of keyed offsets [lo, hi) to ``windows``; what they flag."""
        flagged: list[dict[str, object]] = []
        at = lo
        while at < hi:
            frames = self.reader.read(k, at, min(self.batch_records, hi - at))
            if not frames:
                raise RuntimeError(
                    f"keyed partition {k}: the keyed log ends at {at} but the store "
                    f"consumed up to {hi}"
                )
            for frame in frames:
                records = decode_records(frame.payload).to_pylist()
                skip = max(0, at - frame.base_offset)
                flagged += windows.consume(records[skip : hi - frame.base_offset], limit)
                at = min(frame.end_offset, hi)
        return flagged

    def step(self) -> int:
        """Steps 1-4 over every keyed partition with new records; returns how many."""
        spec = spec_json(self.rules.current())
        limit = limit_of(spec)
        commits: list[KeyedCommit] = []
        for k, windows in self.windows.items():
            start = self.consumed[k]
            frames = self.reader.read(k, start, self.batch_records)
            if not frames:
                continue
            flagged = []
            for frame in frames:
                records = decode_records(frame.payload).to_pylist()
                flagged += windows.consume(records[max(0, start - frame.base_offset) :], limit)
            rule_id = limit.rule_id if limit is not None else ""
            minute, dimensions = correction_deltas(flagged, rule_id)
            commits.append(
                KeyedCommit(
                    keyed_partition=k,
                    from_offset=start,
                    to_offset=frames[-1].end_offset,
                    high_water=dict(windows.high_water),
                    minute_deltas=minute,
                    dimension_deltas=dimensions,
                    corrections=len(flagged),
                    committed_at_ms=self.clock.now_ms(),
                    spec_json=spec,
                    replay_from=self.reader.start_offset(k),
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
