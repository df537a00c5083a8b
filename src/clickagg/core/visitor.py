"""The keyed stage's second family, keyed by *visitor*: its records, their partitioning, and
``repeat_click`` over them, with the batch's verdicts.

A visitor (``clickagg.core.rules.behaviour.visitor_key``) is the user, or where a click has
none, its address and user agent together. One visitor's clicks are spread over every
partition of the log as one IP's are, so stage 1 appends each fresh click with a visitor
to a second internal log, partitioned by a stable hash of the visitor; stage 2 judges there
(:class:`VisitorWindows`). Appends are at-least-once and consumed idempotently, exactly as
in the IP family (``clickagg.core.keyed.accept``).

Why a click is decided only once it is past the horizon. The IP family's verdicts only
grow as records arrive (a count that passed a limit stays past it), so it flags a click as
soon as it can. A repeat click's verdict is not monotone: a click is a repeat of the
previous *counted* one, and an earlier click arriving late can become the counted one,
turning a flagged repeat back into one that counts (a chain ``0 s, 20 s, 40 s`` with a 30 s
window counts ``0`` and ``40``; ``20`` arriving last after ``0`` and ``40`` were
judged would, judged early, leave ``40`` wrongly billable or wrongly flagged). A
correction cannot be taken back once billed and archived, so a click is judged once, when
no record that could change its verdict can still be accepted: when its time is below the
newest event time minus ``horizon_ms`` (a record that old is too late and not accepted).
That costs the horizon (the stream's allowed lateness plus slack: minutes) of verdict
latency, and each click is then corrected at most once and never re-attributed within this
family.

Exactness against the batch. The batch judges each closed hour ``H`` with the lookback
``L = max(window, 1 h)`` before it as context, so the chain of counted clicks of a click in
``H`` starts at the first click at or after ``H - L`` (``behaviour.repeat_click``); a visitor
that never pauses for a whole window is phased per hour, not over all time. The stream
decides each hour's clicks the same way, by calling the batch's own matcher on the same
clicks (one definition: only what it is given differs), with clicks of equal time in event
id order as the batch takes them. The state keeps, per visitor and ad, the clicks from the
start of the hour of the oldest undecided click minus ``L``. Clicks a stage-1 rule flagged
(``counted`` false) take part in the chains, as the batch counts every winner, but are not
corrected again. What the stream cannot match: a click stage 1 dropped as late is billed by
the batch (``late_counted``) and takes part in its chains, but never reaches this stage;
the IP family has the same gap.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import xxhash

from clickagg.core import ids
from clickagg.core.keyed import accept, records_by_partition
from clickagg.core.rules.base import FrameMatcher, RuleSet, RuleSpec
from clickagg.core.rules.behaviour import RepeatParams, repeat_click, repeat_evidence, visitor_key
from clickagg.core.rules.registry import params_of
from clickagg.core.windows import HOUR_MS

VISITOR_RECORD_SCHEMA = pa.schema(
    [
        pa.field("visitor", pa.string(), nullable=False),  # ``u:<user>`` or ``a:<ip> <agent>``
        pa.field("ip", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("user_agent", pa.string()),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("advertiser_id", pa.string()),
        pa.field("campaign_id", pa.string()),
        pa.field("country", pa.string()),
        pa.field("device", pa.string()),
        pa.field("browser", pa.string()),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("source_partition", pa.int32(), nullable=False),
        pa.field("source_offset", pa.int64(), nullable=False),
        pa.field("spend_micros", pa.int64(), nullable=False),  # what stage 1 billed
        # False: a stage-1 rule already flagged it (takes part in chains, not corrected)
        pa.field("counted", pa.bool_(), nullable=False),
    ]
)
"""One fresh click with a visitor, as the visitor-keyed log carries it."""

VISITOR_VERDICT_SCHEMA = pa.schema(
    [
        *VISITOR_RECORD_SCHEMA,
        pa.field("keyed_offset", pa.int64()),
        pa.field("rule_id", pa.string(), nullable=False),
        pa.field("evidence", pa.string(), nullable=False),
        # Always null here (a click is decided once); kept so that both families' verdicts
        # go through the same correction path.
        pa.field("previous_rule_id", pa.string()),
    ]
)

_STATE_SCHEMA = pl.Schema([*pl.Schema(VISITOR_RECORD_SCHEMA).items(), ("keyed_offset", pl.Int64())])


def visitor_partition(visitor: str, partitions: int) -> int:
    """Stable across processes, versions and machines (not Python's salted ``hash``)."""
    return xxhash.xxh3_64_intdigest(visitor.encode()) % partitions


def visitor_records(kept: pl.DataFrame, partitions: int) -> dict[int, pa.Table]:
    """The records of a round's kept events (``BatchOutcome.kept``), by visitor-keyed
    partition, each in source offset order. Only clicks with a visitor and an ad: the batch
    rule judges no other."""
    clicks = (
        kept.filter(pl.col("event_type") == ids.CLICK)
        .with_columns(visitor_key().alias("visitor"))
        .filter(pl.col("visitor").is_not_null() & pl.col("ad_id").is_not_null())
    )
    if clicks.is_empty():
        return {}
    return records_by_partition(
        clicks,
        "visitor",
        partitions,
        VISITOR_RECORD_SCHEMA,
        leading=12,
    )


REPEAT_KIND = "repeat_click"


@dataclass(frozen=True)
class RepeatRule:
    """``repeat_click`` as the visitor-keyed stage applies it (a value: recorded with each
    commit, like the IP family's rules)."""

    rule_id: str
    reason: str
    window_seconds: int
    effective_from_ms: int | None = None
    kind: ClassVar[str] = REPEAT_KIND

    @property
    def lookback_ms(self) -> int:
        """The batch's context for an hour: where the chains of its clicks start."""
        return max(self.window_seconds * 1000, HOUR_MS)

    def matcher(self) -> FrameMatcher:
        """The batch's own matcher for this rule (one definition of the rule)."""
        spec = RuleSpec(
            self.rule_id, REPEAT_KIND, self.reason, {"window_seconds": self.window_seconds}
        )
        return repeat_click(spec)


@dataclass(frozen=True)
class VisitorRules:
    """The visitor-keyed rules in force, in the rule set's order (the first that flags a
    click names it), as a recordable value (:meth:`to_json`)."""

    rules: tuple[RepeatRule, ...] = ()

    @classmethod
    def from_ruleset(cls, ruleset: RuleSet) -> VisitorRules:
        rules = []
        for compiled in ruleset.rules:
            spec = compiled.spec
            if spec.enabled and spec.kind == REPEAT_KIND:
                window = params_of(spec, RepeatParams).window_seconds
                rules.append(RepeatRule(spec.id, spec.reason, window, spec.effective_from_ms))
        return cls(tuple(rules))

    @property
    def ids(self) -> list[str]:
        return [rule.rule_id for rule in self.rules]

    @property
    def lookback_ms(self) -> int:
        """How far before an hour the clicks deciding its verdicts lie (an hour with no
        rule in force: what the state keeps then)."""
        return max((rule.lookback_ms for rule in self.rules), default=HOUR_MS)

    def to_json(self) -> str:
        rules = [{"kind": rule.kind, **asdict(rule)} for rule in self.rules]
        return json.dumps({"rules": rules}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> VisitorRules:
        rules = []
        for fields in json.loads(text)["rules"]:
            kind = fields.pop("kind")
            if kind != REPEAT_KIND:
                raise ValueError(f"visitor rule {fields.get('rule_id')!r}: unknown kind {kind!r}")
            rules.append(RepeatRule(**fields))
        return cls(tuple(rules))


@dataclass
class VisitorWindows:
    """One visitor-keyed partition's stage-2 state: a function of the records consumed and
    the rules, so replaying the log up to the committed offset, in any chunks, rebuilds it.

    ``decided_until_ms``: every accepted click before it is decided (and no record before it
    is accepted any more). Kept as a field, not derived from the newest event time, so a
    longer horizon after a restart never decides a click twice."""

    horizon_ms: int
    high_water: dict[int, int] = field(default_factory=dict)
    max_event_ms: int = 0
    decided_until_ms: int | None = None
    _kept: pl.DataFrame = field(default_factory=lambda: _STATE_SCHEMA.to_frame())

    def consume(self, records: pa.Table | pl.DataFrame, rules: VisitorRules) -> pa.Table:
        """Take records (``VISITOR_RECORD_SCHEMA``) in log order; return the verdicts
        (``VISITOR_VERDICT_SCHEMA``) on the counted clicks this consume decides: those whose
        time fell below the newest event time minus the horizon."""
        batch = records if isinstance(records, pl.DataFrame) else pl.from_arrow(records)
        assert isinstance(batch, pl.DataFrame)
        if "keyed_offset" not in batch.columns:
            batch = batch.with_columns(pl.lit(None, pl.Int64).alias("keyed_offset"))
        fresh, self.max_event_ms = accept(
            batch, self.high_water, max_event_ms=self.max_event_ms, horizon_ms=self.horizon_ms
        )
        if fresh.height:
            fresh = fresh.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA)
            self._kept = pl.concat([self._kept, fresh])
        if not self._kept.height:
            return VISITOR_VERDICT_SCHEMA.empty_table()
        since = self.decided_until_ms
        until = self.max_event_ms - self.horizon_ms
        if since is not None and until <= since:
            return VISITOR_VERDICT_SCHEMA.empty_table()
        self.decided_until_ms = until
        ts = pl.col("ts_ms")
        deciding = (ts < until) if since is None else (ts >= since) & (ts < until)
        verdicts = _judge(self._kept, deciding, rules)
        self._forget(rules)
        return verdicts

    def kept(self) -> pl.DataFrame:
        """The records kept (what a snapshot saves, with the marks)."""
        return self._kept

    @classmethod
    def restore(
        cls,
        horizon_ms: int,
        *,
        high_water: dict[int, int],
        max_event_ms: int,
        decided_until_ms: int | None,
        kept: pl.DataFrame,
    ) -> VisitorWindows:
        return cls(
            horizon_ms,
            high_water=dict(high_water),
            max_event_ms=max_event_ms,
            decided_until_ms=decided_until_ms,
            _kept=kept.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA),
        )

    def _forget(self, rules: VisitorRules) -> None:
        """Records no undecided click's chain can reach: before the hour of the oldest
        undecided time, minus the longest lookback."""
        if self.decided_until_ms is None or not self._kept.height:
            return
        start = self.decided_until_ms - self.decided_until_ms % HOUR_MS - rules.lookback_ms
        if self._kept.select(pl.col("ts_ms").min()).item() < start:
            self._kept = self._kept.filter(pl.col("ts_ms") >= start)


def _judge(kept: pl.DataFrame, deciding: pl.Expr, rules: VisitorRules) -> pa.Table:
    """The verdicts on the counted clicks ``deciding`` selects: per rule, its matcher over
    the clicks of their visitors and ads, each hour of them as a phase of its own holding
    the clicks from the hour minus the rule's lookback to the hour's end (the batch's frame
    for that hour), the first rule in order that flags a click naming it."""
    rows = kept.with_row_index("_at")
    decided = rows.filter(deciding & pl.col("counted"))
    if not decided.height or not rules.rules:
        return VISITOR_VERDICT_SCHEMA.empty_table()
    hour = pl.col("ts_ms") - pl.col("ts_ms") % HOUR_MS
    hours = decided.select(hour.unique().alias("_phase"))
    chains = (
        rows.join(decided.select("visitor", "ad_id").unique(), on=["visitor", "ad_id"], how="semi")
        .with_columns(pl.lit("click").alias("event_type"))
        .join(hours, how="cross")
    )
    is_decided = np.zeros(kept.height, dtype=np.bool_)
    is_decided[decided["_at"].to_numpy()] = True
    taken = np.zeros(kept.height, dtype=np.bool_)
    found: list[pl.DataFrame] = []
    for rule in rules.rules:
        phase = pl.col("_phase")
        frame = chains.filter(
            (pl.col("ts_ms") >= phase - rule.lookback_ms) & (pl.col("ts_ms") < phase + HOUR_MS)
        )
        said = repeat_evidence(frame, rule.window_seconds * 1000, phase="_phase")
        at = frame["_at"].to_numpy()
        ts = frame["ts_ms"].to_numpy()
        flagged = (
            said.is_not_null().to_numpy()
            & is_decided[at]
            & (ts - ts % HOUR_MS == frame["_phase"].to_numpy())  # judged in its own hour
            & ~taken[at]
        )
        if rule.effective_from_ms is not None:
            flagged &= ts >= rule.effective_from_ms
        taken[at[flagged]] = True
        found.append(
            pl.DataFrame(
                {"_at": at[flagged], "evidence": said.filter(pl.Series(flagged))},
                schema={"_at": pl.UInt32, "evidence": pl.String},
            ).with_columns(pl.lit(rule.rule_id).alias("rule_id"))
        )
    verdicts = pl.concat(found).join(rows, on="_at").sort("_at")  # in the records' order
    return (
        verdicts.select(
            *VISITOR_RECORD_SCHEMA.names,
            "keyed_offset",
            "rule_id",
            "evidence",
            pl.lit(None, pl.String).alias("previous_rule_id"),
        )
        .to_arrow()
        .cast(VISITOR_VERDICT_SCHEMA)
    )
