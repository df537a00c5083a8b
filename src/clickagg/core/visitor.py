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
id order as the batch takes them. Clicks a stage-1 rule flagged (``counted`` false) take
part in the chains, as the batch counts every winner, but are not corrected again.

What the state keeps. A chain's past says one thing about the clicks after it: the time of
its last counted click (a repeat does not move it). So once clicks are decided, the state
keeps, per window, hour phase, visitor and ad, only that time, and only while a later click
could be its repeat (:class:`Chains`); the matcher is given that click (key, ad, time)
standing in for the chain before it. The undecided clicks are kept whole. At 5,000 clicks/s
the state was an hour and more of whole clicks (gigabytes); it is now the horizon's clicks
and a window's counted keys.

What the stream cannot match. A click stage 1 dropped as late is billed by the batch
(``late_counted``) and takes part in its chains, but never reaches this stage; the IP family
has the same gap. So does a click older than the decided bound that a longer horizon after
a restart accepts: the stage drops it (neither decided nor in a chain). A window that comes
into force while the stream runs (a rule switched on, or its window changed) has no chains
before that: it judges the hours whose whole lookback it has seen, and leaves the one or two
before them to the batch, which reconciliation closes with every click.
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
from clickagg.core.keyed import accept, later_bound, records_by_partition
from clickagg.core.rules.base import RuleSet
from clickagg.core.rules.behaviour import RepeatParams, repeat_evidence, visitor_key
from clickagg.core.rules.registry import params_of
from clickagg.core.windows import HOUR_MS

VISITOR_RECORD_SCHEMA = pa.schema(
    [
        pa.field("visitor", pa.string(), nullable=False),  # ``u:<user>`` or ``a:<ip> <agent>``
        pa.field("ip", pa.string()),
        pa.field("user_id", pa.string()),
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
"""One fresh click with a visitor, as the visitor-keyed log carries it. No user agent: the
visitor key holds it where it matters, and no verdict reads it (logs and snapshots of a
build that carried it read the same: columns are taken by name)."""

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
        leading=VISITOR_RECORD_SCHEMA.get_field_index("source_partition"),
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
        return repeat_lookback_ms(self.window_seconds * 1000)


def repeat_lookback_ms(window_ms: int) -> int:
    """How far before an hour the batch starts the chains of its clicks (``repeat_click``:
    ``max(window, 1 h)``)."""
    return max(window_ms, HOUR_MS)


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
        rule in force)."""
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


_ANCHOR_SCHEMA = pl.Schema(
    {"phase_ms": pl.Int64(), "visitor": pl.String(), "ad_id": pl.String(), "ts_ms": pl.Int64()}
)
ANCHOR_SCHEMA = pa.schema(
    [
        pa.field("window_ms", pa.int64(), nullable=False),
        pa.field("phase_ms", pa.int64(), nullable=False),
        pa.field("visitor", pa.string(), nullable=False),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
    ]
)
"""Every repeat window's chains as a snapshot saves them (:meth:`VisitorWindows.chains`)."""


PRUNE_AT_ROWS = 4096
"""Anchors a window holds, beyond twice what its last prune left, before it prunes again."""


@dataclass
class Chains:
    """One repeat window's chains of counted clicks over the decided clicks: per phase (the
    hour whose clicks it judges, ``phase_ms``) and visitor and ad, the time of the last
    counted click, while a later click could still be its repeat. That is all a chain's
    past says about the clicks still to decide (a repeat does not move the chain), so the
    state is the clicks of one window, not of an hour and more.

    ``start_ms``: where the chains begin (the decided bound when the window came into force;
    None: the log's start). A phase whose lookback begins before it is not judged by this
    window in the stream: its chains lack clicks the batch has (the batch judges it)."""

    window_ms: int
    start_ms: int | None
    anchors: pl.DataFrame = field(default_factory=lambda: _ANCHOR_SCHEMA.to_frame())
    _pruned_height: int = 0

    @property
    def lookback_ms(self) -> int:
        return repeat_lookback_ms(self.window_ms)

    def advance(self, rows: pl.DataFrame, until_ms: int) -> tuple[np.ndarray, pl.Series]:
        """Take the clicks decided now (``rows``: every accepted click below ``until_ms``
        not taken before, with ``_at``), each in every phase whose frame holds it; return
        the ``_at`` of those that repeat a counted click within their own hour's phase, and
        their evidence, by the batch's own matcher."""
        lookback = self.lookback_ms
        ts = pl.col("ts_ms")
        phase = ts - ts % HOUR_MS + pl.col("_k") * HOUR_MS
        phased = (
            rows.select("_at", "visitor", "ad_id", "ts_ms", "event_id", "user_id", "ip")
            .join(pl.DataFrame({"_k": range(lookback // HOUR_MS + 2)}), how="cross")
            .with_columns(phase.alias("phase_ms"))
            .filter(pl.col("phase_ms") - lookback <= ts)
            .drop("_k")
        )
        if self.start_ms is not None:
            phased = phased.filter(pl.col("phase_ms") - lookback >= self.start_ms)
        if not phased.height:
            self._prune(until_ms)
            return np.zeros(0, dtype=np.uint32), pl.Series("evidence", [], pl.String)
        keys = ["phase_ms", "visitor", "ad_id"]
        prior = (
            self.anchors.join(phased.select(keys).unique(), on=keys, how="semi")
            .group_by(keys)
            .agg(ts.max())
        )
        frame = pl.concat([prior, phased], how="diagonal").with_columns(
            pl.lit("click").alias("event_type")
        )
        said = repeat_evidence(frame, self.window_ms, phase="phase_ms", key="visitor")
        real = frame["_at"].is_not_null()
        counted = frame.filter(real & said.is_null())
        self.anchors = pl.concat([self.anchors, counted.group_by(keys).agg(ts.max())])
        self._prune(until_ms)
        own_hour = frame["phase_ms"] == frame["ts_ms"] - frame["ts_ms"] % HOUR_MS
        judged = real & said.is_not_null() & own_hour
        return frame["_at"].filter(judged).to_numpy(), said.filter(judged)

    def leaves(self, ts: np.ndarray) -> np.ndarray:
        """Which of these click times' hours this window does not judge in the stream (their
        lookback begins before ``start_ms``): the batch's to close."""
        if self.start_ms is None:
            return np.zeros(len(ts), dtype=np.bool_)
        left: np.ndarray = ts - ts % HOUR_MS - self.lookback_ms < self.start_ms
        return left

    def _prune(self, until_ms: int) -> None:
        """Forget the counted clicks no later click can repeat (closed phases, or more than a
        window before every undecided time); a forgotten one reads as no counted click,
        which is what it is to the clicks left. Amortized: only once the anchors doubled."""
        if self.anchors.height <= 2 * self._pruned_height + PRUNE_AT_ROWS:
            return
        self.anchors = self.anchors.filter(
            (pl.col("phase_ms") + HOUR_MS > until_ms)
            & (pl.col("ts_ms") > until_ms - self.window_ms)
        )
        self._pruned_height = self.anchors.height


@dataclass
class VisitorWindows:
    """One visitor-keyed partition's stage-2 state: a function of the records consumed and
    the rules, so replaying the log up to the committed offset, in any chunks, rebuilds it.

    It keeps the undecided clicks whole (a verdict carries its record), and of the decided
    ones only each repeat window's :class:`Chains`: at production rates an hour of whole
    clicks was gigabytes, a window of counted clicks' keys is megabytes.

    ``decided_until_ms``: every accepted click before it is decided (and no record before it
    is accepted any more). Kept as a field, not derived from the newest event time, so a
    longer horizon after a restart never decides a click twice."""

    horizon_ms: int
    high_water: dict[int, int] = field(default_factory=dict)
    max_event_ms: int = 0
    decided_until_ms: int | None = None
    _kept: pl.DataFrame = field(default_factory=lambda: _STATE_SCHEMA.to_frame())
    _chains: dict[int, Chains] = field(default_factory=dict)
    # The records are complete from this event time on (None: from the log's start):
    # the latest context mark (``start_context``). No window's chains start before it.
    context_from_ms: int | None = None

    def start_context(self, from_ms: int) -> None:
        """The records from here on follow a gap: every window's chains, and those of a
        window that comes into force later, start at ``from_ms`` at the earliest, so an hour
        whose lookback reaches into the gap is the batch's (a repeat of a click in the gap
        would be missed, or a repeat taken for the first click)."""
        self.context_from_ms = later_bound(self.context_from_ms, from_ms)
        for chains in self._chains.values():
            chains.start_ms = later_bound(chains.start_ms, from_ms)

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
        since = self.decided_until_ms
        if since is not None and fresh.height:
            # Only under a longer horizon than the one that decided up to ``since`` (after a
            # restart): deciding such a click would be a verdict below the bound the family
            # settled, and it would precede chains' counted clicks. Left to the batch.
            fresh = fresh.filter(pl.col("ts_ms") >= since)
        if fresh.height:
            fresh = fresh.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA)
            self._kept = pl.concat([self._kept, fresh])
        if since is None and not self._kept.height:
            return VISITOR_VERDICT_SCHEMA.empty_table()
        until = self.max_event_ms - self.horizon_ms
        if since is not None and until <= since:
            return VISITOR_VERDICT_SCHEMA.empty_table()
        self.decided_until_ms = until
        windows = {rule.window_seconds * 1000 for rule in rules.rules}
        self._chains = {
            w: self._chains.get(w) or Chains(w, start_ms=later_bound(since, self.context_from_ms))
            for w in sorted(windows)
        }
        deciding = pl.col("ts_ms") < until
        decided = self._kept.filter(deciding)
        self._kept = self._kept.filter(~deciding)
        return _judge(decided, rules, self._chains, until)

    def kept(self) -> pl.DataFrame:
        """The undecided records (what a snapshot saves, with the marks and :meth:`chains`)."""
        return self._kept

    def chains(self) -> tuple[dict[int, int | None], pa.Table]:
        """Each repeat window's start, and every window's anchors (``ANCHOR_SCHEMA``)."""
        starts = {w: chains.start_ms for w, chains in self._chains.items()}
        anchors = [
            chains.anchors.select(pl.lit(w, pl.Int64).alias("window_ms"), pl.all())
            for w, chains in self._chains.items()
        ]
        table = pl.concat(anchors).to_arrow() if anchors else ANCHOR_SCHEMA.empty_table()
        return starts, table.cast(ANCHOR_SCHEMA)

    @classmethod
    def restore(
        cls,
        horizon_ms: int,
        *,
        high_water: dict[int, int],
        max_event_ms: int,
        decided_until_ms: int | None,
        kept: pl.DataFrame,
        starts: dict[int, int | None] | None = None,
        anchors: pl.DataFrame | None = None,
        context_from_ms: int | None = None,
    ) -> VisitorWindows:
        """``starts`` None (a snapshot of a build that kept decided clicks whole): the
        decided clicks it holds are dropped and every window starts at the decided bound,
        judging the hours whose lookback it has seen whole."""
        if decided_until_ms is not None:
            kept = kept.filter(pl.col("ts_ms") >= decided_until_ms)
        chains: dict[int, Chains] = {}
        for w, start in (starts or {}).items():
            mine = (
                anchors.filter(pl.col("window_ms") == w).drop("window_ms")
                if anchors is not None
                else _ANCHOR_SCHEMA.to_frame()
            )
            chains[w] = Chains(w, start, mine.cast(_ANCHOR_SCHEMA))
        return cls(
            horizon_ms,
            high_water=dict(high_water),
            max_event_ms=max_event_ms,
            decided_until_ms=decided_until_ms,
            _kept=kept.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA),
            _chains=chains,
            context_from_ms=context_from_ms,
        )


def _judge(
    decided: pl.DataFrame, rules: VisitorRules, chains: dict[int, Chains], until_ms: int
) -> pa.Table:
    """The verdicts on the counted clicks just decided: per rule, its window's chains
    advanced over them, the first rule in order that flags a click naming it. A click in an
    hour that a rule in force for it leaves to the batch (its window came into force while
    the stream ran) is named by no later rule either: the batch may name that rule."""
    if not decided.height or not rules.rules:
        return VISITOR_VERDICT_SCHEMA.empty_table()
    rows = decided.with_row_index("_at")
    said: dict[int, tuple[np.ndarray, pl.Series]] = {}
    for w, window in chains.items():
        said[w] = window.advance(rows, until_ms)
    counted = rows["counted"].to_numpy()
    ts = rows["ts_ms"].to_numpy()
    taken = np.zeros(rows.height, dtype=np.bool_)
    found: list[pl.DataFrame] = []
    for rule in rules.rules:
        at, evidence = said[rule.window_seconds * 1000]
        flagged = counted[at] & ~taken[at]
        if rule.effective_from_ms is not None:
            flagged &= ts[at] >= rule.effective_from_ms
        taken[at[flagged]] = True
        left = chains[rule.window_seconds * 1000].leaves(ts)
        if rule.effective_from_ms is not None:
            left &= ts >= rule.effective_from_ms
        taken |= left
        found.append(
            pl.DataFrame(
                {"_at": at[flagged], "evidence": evidence.filter(pl.Series(flagged))},
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
