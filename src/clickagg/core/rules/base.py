"""Invalid-traffic rules: a spec (what a rules file says), and the compiled rule.

A rule is one *matcher*, a function from a batch of events (a polars DataFrame with at
least ``user_agent`` and ``ip``) to the evidence for each row that it flags (null where it
does not). Both of the rule's forms run that same matcher, so they cannot drift apart:

* the **stream form**, :meth:`CompiledRule.evaluate`, is the processor's ``Rule``: it takes
  the log's columns, where ``event_type`` is a ``UInt8`` code;
* the **batch form**, :meth:`CompiledRule.batch`, takes archived decisions, where
  ``event_type`` is the name (``click``) — the batch layer's ``InvalidHook`` shape.

Only clicks are judged. An impression is never billed, and the aggregates count every
impression the stream keeps, so flagging one would mark it invalid in the archive while
still counting it; clicks are what an advertiser pays for.

A *keyed* kind (behavioural, batch only: :mod:`.velocity`, :mod:`.behaviour`) may need more
than the clicks: its matcher is a :class:`FrameMatcher`, which sees every event of the frame
(impressions too) and still only flags clicks, and declares the ``lookback`` of earlier
events it needs to judge an event (a repeat click just after ``:00`` needs the clicks just
before it). The batch layer gives each hour's evaluation that context, and each rule sees
exactly its own lookback before the judged events, so a rule's verdict does not depend on
which other rules are in force.

A rule applies to events whose event time is at or after its ``effective_from`` (if set):
a change to the rules file decides the events of its effective time on, whenever they
arrive, and both forms agree on that too. Matchers are deterministic functions of the
events, so replaying a log range with the same rules gives the same decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from clickagg.core.ids import CLICK, EVENT_TYPES

Matcher = Callable[[pl.DataFrame], pl.Series]
"""Evidence per row of the given events (String, null: not flagged)."""

MAX_EVIDENCE_CHARS = 200
"""Text taken from an event into its reason (a user agent can be long) is cut to this."""


def nulls(name: str, count: int) -> pl.Series:
    """A String series of ``count`` nulls: one null repeated, without a Python list of them
    (1 ms per 100K) and without ``pl.repeat``'s query (~0.2 ms a call, whatever ``count``;
    the stream calls this for every rule of every partition of every round)."""
    return pl.Series(name, [None], dtype=pl.String).new_from_index(0, count)


@dataclass(frozen=True)
class FrameMatcher:
    """A matcher that sees the whole frame: evidence per row of every event given (clicks
    and impressions), of which only the clicks the rule applies to are used.

    ``lookback_ms``: how far before the first judged event the events it needs reach.
    ``review_only``: its verdicts are reported for review, the clicks stay billable."""

    match: Callable[[pl.DataFrame], pl.Series]
    lookback_ms: int = 0
    review_only: bool = False

    def __call__(self, frame: pl.DataFrame) -> pl.Series:
        return self.match(frame)


def named_event_types(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame with ``event_type`` as the name (the stream's frames carry the code)."""
    if frame.schema["event_type"] == pl.String:
        return frame
    names = pl.col("event_type").replace_strict(
        dict(enumerate(EVENT_TYPES)), return_dtype=pl.String
    )
    return frame.with_columns(names)


class RuleError(ValueError):
    """A rule spec that cannot be compiled; the message names the rule."""


@dataclass(frozen=True)
class RuleSpec:
    """One rule as a rules file declares it."""

    id: str
    kind: str
    reason: str
    params: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True
    # Applies to events whose event time (epoch ms) is at or after this; None: all.
    effective_from_ms: int | None = None


@dataclass(frozen=True)
class CompiledRule:
    """A spec compiled to its matcher. ``name`` is the spec's id: the processor writes the
    reason of an event it flags as ``"<name>: <reason>: <evidence>"``."""

    spec: RuleSpec
    matcher: Matcher | FrameMatcher = field(repr=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.spec.id)

    @property
    def lookback_ms(self) -> int:
        return self.matcher.lookback_ms if isinstance(self.matcher, FrameMatcher) else 0

    @property
    def review_only(self) -> bool:
        return isinstance(self.matcher, FrameMatcher) and self.matcher.review_only

    def evaluate(self, events: pl.DataFrame) -> pl.Series:
        """Stream form: events in the log's columns (``event_type`` a ``UInt8`` code)."""
        return self._reasons(events, (events["event_type"] == CLICK).to_numpy())

    def batch(self, decisions: pl.DataFrame, judged_from_ms: int | None = None) -> pl.Series:
        """Batch form: archived decisions (``event_type`` the name, ``click``).

        ``judged_from_ms``: only events at or after it are judged (the hour being
        reconciled); the earlier ones are context, of which the rule sees its own lookback."""
        click = EVENT_TYPES[CLICK]
        applies = (decisions["event_type"] == click).to_numpy()
        if judged_from_ms is None:
            return self._reasons(decisions, applies)
        ts = decisions["ts_ms"].to_numpy()
        seen = np.flatnonzero(ts >= judged_from_ms - self.lookback_ms)
        judged = applies[seen] & (ts[seen] >= judged_from_ms)
        if len(seen) == decisions.height:
            frame = decisions
        elif len(seen) and seen[-1] - seen[0] + 1 == len(seen):  # a run: the hour after its
            frame = decisions.slice(int(seen[0]), len(seen))  # context, no copy
        else:
            frame = decisions[seen]
        return nulls("reason", decisions.height).scatter(seen, self._reasons(frame, judged))

    def _reasons(self, frame: pl.DataFrame, applies: np.ndarray[Any, Any]) -> pl.Series:
        applies = applies.astype(np.bool_, copy=True)
        if self.spec.effective_from_ms is not None:
            applies &= frame["ts_ms"].to_numpy() >= self.spec.effective_from_ms
        reasons = nulls("reason", frame.height)
        rows = np.flatnonzero(applies)
        if not len(rows):
            return reasons
        if isinstance(self.matcher, FrameMatcher):
            evidence = self.matcher(named_event_types(frame)).gather(rows)
        else:
            evidence = self.matcher(frame if len(rows) == frame.height else frame[rows])
        prefix = f"{self.spec.reason}: "
        flagged = pl.select(pl.concat_str(pl.lit(prefix), pl.lit(evidence))).to_series()
        return reasons.scatter(rows, flagged)


@dataclass(frozen=True)
class RuleSet:
    """The rules in force, in order (the first that flags an event gives its reason), and
    where they came from: the files read and a digest of their bytes."""

    rules: tuple[CompiledRule, ...]
    source: str = "builtin"
    digest: str = ""
    files: tuple[str, ...] = ()

    @property
    def ids(self) -> list[str]:
        return [rule.name for rule in self.rules]

    @property
    def stream_rules(self) -> tuple[CompiledRule, ...]:
        """The rules a partition's worker can apply exactly: not the keyed ones, whose
        verdict needs every event of a key (an IP) across all partitions."""
        from clickagg.core.rules.velocity import KEYED_KINDS

        return tuple(
            rule
            for rule in self.rules
            if rule.spec.kind not in KEYED_KINDS and not isinstance(rule.matcher, FrameMatcher)
        )

    @property
    def lookback_ms(self) -> int:
        """The context the batch layer gives an hour's evaluation: the most any rule needs."""
        return max((rule.lookback_ms for rule in self.rules), default=0)

    def batch_reasons(
        self, decisions: pl.DataFrame, judged_from_ms: int | None = None
    ) -> pl.Series:
        """The batch layer's ``InvalidHook``: each archived decision's reason as the stream
        would have written it (``"<id>: <reason>: <evidence>"``, first rule wins), null
        when no rule flags it (nor for events before ``judged_from_ms``: context). Rules
        whose verdicts are for review only are not among them (:meth:`batch_reviews`)."""
        return self._first(decisions, judged_from_ms, review=False)

    def batch_reviews(
        self, decisions: pl.DataFrame, judged_from_ms: int | None = None
    ) -> pl.Series:
        """The same, of the review-only rules: clicks reported for review, still billable."""
        return self._first(decisions, judged_from_ms, review=True)

    @property
    def has_reviews(self) -> bool:
        return any(rule.review_only for rule in self.rules)

    def _first(
        self, decisions: pl.DataFrame, judged_from_ms: int | None, *, review: bool
    ) -> pl.Series:
        def form(rule: CompiledRule) -> Callable[[pl.DataFrame], pl.Series]:
            return lambda frame: rule.batch(frame, judged_from_ms)

        chosen = [(r.name, form(r)) for r in self.rules if r.review_only == review]
        return first_reasons(decisions, chosen)


def first_reasons(
    frame: pl.DataFrame, rules: Sequence[tuple[str, Callable[[pl.DataFrame], pl.Series]]]
) -> pl.Series:
    """Combine rules as the processor does: the first rule that flags a row names it."""
    reasons = nulls("reason", frame.height)
    for name, form in rules:
        flagged = form(frame).cast(pl.String)
        named = pl.select(pl.concat_str(pl.lit(f"{name}: "), pl.lit(flagged))).to_series()
        reasons = reasons.fill_null(named)
    return reasons
