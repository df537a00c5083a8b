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
    """A String series of ``count`` nulls (without a Python list of them: 1 ms per 100K)."""
    return pl.repeat(None, count, dtype=pl.String, eager=True).alias(name)


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
    matcher: Matcher = field(repr=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.spec.id)

    def evaluate(self, events: pl.DataFrame) -> pl.Series:
        """Stream form: events in the log's columns (``event_type`` a ``UInt8`` code)."""
        return self._reasons(events, (events["event_type"] == CLICK).to_numpy())

    def batch(self, decisions: pl.DataFrame) -> pl.Series:
        """Batch form: archived decisions (``event_type`` the name, ``click``)."""
        click = EVENT_TYPES[CLICK]
        return self._reasons(decisions, (decisions["event_type"] == click).to_numpy())

    def _reasons(self, frame: pl.DataFrame, applies: np.ndarray[Any, Any]) -> pl.Series:
        applies = applies.astype(np.bool_, copy=True)
        if self.spec.effective_from_ms is not None:
            applies &= frame["ts_ms"].to_numpy() >= self.spec.effective_from_ms
        reasons = nulls("reason", frame.height)
        rows = np.flatnonzero(applies)
        if not len(rows):
            return reasons
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

        return tuple(rule for rule in self.rules if rule.spec.kind not in KEYED_KINDS)

    def batch_reasons(self, decisions: pl.DataFrame) -> pl.Series:
        """The batch layer's ``InvalidHook``: each archived decision's reason as the stream
        would have written it (``"<id>: <reason>: <evidence>"``, first rule wins), null
        when no rule flags it."""
        return first_reasons(decisions, [(rule.name, rule.batch) for rule in self.rules])


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
