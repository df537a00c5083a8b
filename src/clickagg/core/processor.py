"""One partition's stream logic: decide each event's fate and compute aggregate deltas.

Pure: it takes the events of a micro-batch (a DataFrame of log columns in offset order) and
returns what to commit; it never touches the log or the store. Its state (remembered ids
and the max event time) is a function of the events it has read, so replaying the same log
range from the same snapshot rebuilds exactly the same state.

Fate of an event, first match wins:
1. duplicate: its (type, id) was already read within the dedup horizon;
2. late: its event time is older than the watermark (max event time - allowed lateness);
3. invalid: an invalid-traffic rule flags it (kept and counted as ``invalid_clicks``);
4. counted.

Why dedup stays exact with a bounded memory: ids are remembered by event minute for the
horizon (≥ lateness + 1 minute) behind the max event time. An event whose minute has been
forgotten is necessarily late, so a copy of a counted event is never counted again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from clickagg.core import aggregate, columns, decisions, fates
from clickagg.core.dedup import IdSet
from clickagg.core.ids import CLICK, EVENT_TYPES
from clickagg.core.prices import PriceBook
from clickagg.core.rules.base import nulls
from clickagg.core.windows import MINUTE_MS, NO_EVENT_MS, late_mask, minute_start


class Rule(Protocol):
    """An invalid-traffic rule: flags events of a batch, with a reason per flagged event
    (``clickagg.core.rules`` compiles them from rules files)."""

    @property
    def name(self) -> str:
        """Names the rule in the reason it gives: ``"<name>: <reason>"``."""
        ...

    def evaluate(self, events: pl.DataFrame) -> pl.Series:
        """A String series aligned with ``events``: the reason, or null when not flagged."""
        ...


@dataclass
class PartitionState:
    partition: int
    next_offset: int
    max_event_ms: int
    seen: IdSet

    @classmethod
    def empty(cls, partition: int, next_offset: int = 0) -> PartitionState:
        return cls(partition, next_offset, NO_EVENT_MS, IdSet())

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(
            (self.partition, self.next_offset, self.max_event_ms, self.seen.snapshot())
        )

    @classmethod
    def restore(cls, data: bytes) -> PartitionState:
        partition, next_offset, max_event_ms, seen = msgspec.msgpack.decode(
            data, type=tuple[int, int, int, bytes]
        )
        return cls(partition, next_offset, max_event_ms, IdSet.restore(seen))


@dataclass(frozen=True)
class BatchOutcome:
    from_offset: int
    to_offset: int
    minute_deltas: pa.Table
    dimension_deltas: Mapping[str, pa.Table]  # per dimension (aggregate.DIMENSION_SCHEMAS)
    decisions: pa.Table  # every event read, with its fate: clickagg.core.decisions
    max_event_ms: int
    watermark_ms: int
    counted: int
    duplicates: int
    late: int
    invalid: int
    kept: pl.DataFrame  # counted and invalid events, with minute and spend: the deltas' input


@dataclass(frozen=True)
class Decided:
    """A partition's events with what its state decided of them (:meth:`PartitionProcessor.decide`),
    not labelled yet (:func:`outcomes`)."""

    events: pl.DataFrame
    from_offset: int
    duplicate: npt.NDArray[np.bool_]
    late: npt.NDArray[np.bool_]  # and not a duplicate
    max_event_ms: int  # the partition's, after these events
    watermark_ms: int


class PartitionProcessor:
    def __init__(
        self,
        state: PartitionState,
        *,
        allowed_lateness_ms: int,
        dedup_horizon_ms: int,
        cpc_micros: PriceBook | Mapping[str, int] | None = None,
        rules: Sequence[Rule] = (),
    ) -> None:
        if dedup_horizon_ms < allowed_lateness_ms + MINUTE_MS:
            raise ValueError("dedup horizon must be at least allowed lateness + 1 minute")
        self.state = state
        self.allowed_lateness_ms = allowed_lateness_ms
        self.dedup_horizon_ms = dedup_horizon_ms
        self.prices = PriceBook.of(cpc_micros)
        self.rules = list(rules)

    @property
    def watermark_ms(self) -> int:
        if self.state.max_event_ms == NO_EVENT_MS:
            return NO_EVENT_MS
        return self.state.max_event_ms - self.allowed_lateness_ms

    def process(
        self, events: pl.DataFrame, *, emit: bool = True, deltas: bool = True
    ) -> BatchOutcome | None:
        """Read the next events of the partition (offsets must continue ``next_offset``).

        With ``emit=False`` only the state advances (replay after a restart). With
        ``deltas=False`` the outcome's delta tables are left empty and the caller aggregates
        ``kept`` itself (a worker round aggregates all its partitions in one pass).
        """
        decided = self.decide(events)
        if not emit:
            return None
        [outcome] = outcomes([decided], rules=self.rules, prices=self.prices, deltas=deltas)
        return outcome

    def decide(self, events: pl.DataFrame) -> Decided:
        """The stateful half of :meth:`process`: which events are duplicates and which are
        late, the state moved past them. :func:`outcomes` labels them (rules, prices,
        decisions), for several partitions at once."""
        state = self.state
        count = events.height
        if count:
            first = int(events["offset"][0])
            if first != state.next_offset:
                raise ValueError(f"expected offset {state.next_offset}, got {first}")
        ts_ms = events["ts_ms"].to_numpy()
        forget_before = self._forget_before(state.max_event_ms)
        late, new_max = late_mask(
            ts_ms, max_event_ms=state.max_event_ms, allowed_lateness_ms=self.allowed_lateness_ms
        )
        minutes = ts_ms - ts_ms % MINUTE_MS
        duplicate = self._check_duplicates(events, minutes, forget_before)
        state.max_event_ms = new_max
        state.seen.expire_before(self._forget_before(new_max))
        from_offset = state.next_offset
        state.next_offset = from_offset + count
        return Decided(
            events=events,
            from_offset=from_offset,
            duplicate=duplicate,
            late=late & ~duplicate,
            max_event_ms=state.max_event_ms,
            watermark_ms=self.watermark_ms,
        )

    def skip_lost(self, until: int, *, emit: bool = True) -> BatchOutcome | None:
        """Step over offsets ``[next_offset, until)`` that a log repair marked lost: no
        event, so nothing is decided or counted, but the offsets are committed past."""
        state = self.state
        from_offset = state.next_offset
        if until < from_offset:
            raise ValueError(f"cannot skip back from {from_offset} to {until}")
        none = np.zeros(0, dtype=np.bool_)
        nothing = Decided(
            columns.empty_frame(), from_offset, none, none, state.max_event_ms, self.watermark_ms
        )
        [outcome] = outcomes([nothing], rules=self.rules, prices=self.prices, deltas=True)
        state.next_offset = until
        return dataclasses.replace(outcome, to_offset=until) if emit else None

    def _forget_before(self, max_event_ms: int) -> int:
        if max_event_ms == NO_EVENT_MS:
            return NO_EVENT_MS
        return minute_start(max_event_ms) - self.dedup_horizon_ms

    def _check_duplicates(
        self, events: pl.DataFrame, minutes: npt.NDArray[np.int64], forget_before: int
    ) -> npt.NDArray[np.bool_]:
        # Events of already-forgotten minutes are late (see module docstring): not checked.
        eligible = minutes >= forget_before
        duplicate = np.zeros(len(minutes), dtype=np.bool_)
        if eligible.any():
            duplicate[eligible] = self.state.seen.check_and_add(
                events["fp_high"].to_numpy()[eligible],
                events["fp_low"].to_numpy()[eligible],
                minutes[eligible],
            )
        return duplicate


def outcomes(
    decided: Sequence[Decided],
    *,
    rules: Sequence[Rule],
    prices: PriceBook,
    deltas: bool = True,
) -> list[BatchOutcome]:
    """Each partition's outcome of its decided events, labelled in ONE pass over all of
    them: the rules, the prices and the decision records are polars queries whose fixed
    cost (~0.2 ms each, a dozen per pass) a worker round paid once per partition before.
    Stream rules judge each event on its own (their batch form must agree with them on any
    split of the archive), so judging a round's partitions together gives each event the
    verdict it would get alone. With ``deltas`` each outcome carries its own deltas."""
    events = decided[0].events if len(decided) == 1 else pl.concat([d.events for d in decided])
    duplicate = np.concatenate([d.duplicate for d in decided])
    late = np.concatenate([d.late for d in decided])
    fresh = ~duplicate & ~late
    reasons = _rule_reasons(events.filter(pl.Series(fresh)), rules)
    invalid = np.zeros(len(fresh), dtype=np.bool_)
    invalid[np.flatnonzero(fresh)] = reasons.is_not_null().to_numpy()
    reason_all = nulls("reason", len(fresh))
    if reasons.len():
        reason_all = reason_all.scatter(np.flatnonzero(fresh), reasons)
    status = np.where(
        duplicate,
        fates.DUPLICATE,
        np.where(late, fates.LATE, np.where(invalid, fates.INVALID, fates.COUNTED)),
    )
    labelled = events.with_columns(
        pl.Series("status", status, dtype=pl.String),
        pl.Series("invalid", invalid),
        reason_all,
        pl.col("event_type")
        .replace_strict(dict(enumerate(EVENT_TYPES)), return_dtype=pl.String)
        .alias("event_type_name"),
    )
    priced = aggregate.with_minute_and_spend(labelled, prices)
    billed = (
        pl.when((pl.col("status") == fates.COUNTED) & (pl.col("event_type") == CLICK))
        .then(pl.col("spend_micros"))
        .otherwise(0)
    )
    spend = priced.select(billed.cast(pl.Int64)).to_series()
    kept = priced.filter(pl.Series(fresh))
    records = decisions.decisions_table(labelled, spend)
    results: list[BatchOutcome] = []
    row = kept_row = 0
    for part in decided:
        n = part.events.height
        rows = slice(row, row + n)
        part_fresh = fresh[rows]
        part_invalid = invalid[rows]
        n_kept = int(np.count_nonzero(part_fresh))
        part_kept = kept.slice(kept_row, n_kept)
        if deltas:
            minute, dimensions = aggregate.round_deltas(part_kept)
        else:
            minute, dimensions = (
                aggregate.MINUTE_SCHEMA.empty_table(),
                aggregate.empty_dimension_deltas(),
            )
        results.append(
            BatchOutcome(
                from_offset=part.from_offset,
                to_offset=part.from_offset + n,
                minute_deltas=minute,
                dimension_deltas=dimensions,
                decisions=records.slice(row, n),
                max_event_ms=part.max_event_ms,
                watermark_ms=part.watermark_ms,
                counted=int(np.count_nonzero(part_fresh & ~part_invalid)),
                duplicates=int(np.count_nonzero(part.duplicate)),
                late=int(np.count_nonzero(part.late)),
                invalid=int(np.count_nonzero(part_invalid)),
                kept=part_kept,
            )
        )
        row += n
        kept_row += n_kept
    return results


def _rule_reasons(fresh: pl.DataFrame, rules: Sequence[Rule]) -> pl.Series:
    reasons = nulls("reason", fresh.height)
    for rule in rules:
        flagged = rule.evaluate(fresh).cast(pl.String)
        named = pl.select(pl.concat_str(pl.lit(f"{rule.name}: "), flagged)).to_series()
        reasons = reasons.fill_null(named)
    return reasons
