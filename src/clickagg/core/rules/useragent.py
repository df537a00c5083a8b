"""General invalid traffic by user agent: declared crawlers and non-browser clients.

Both kinds match a list of regular expressions against the user agents of a batch, once
per *distinct* user agent: a batch of 100,000 clicks holds a few hundred distinct agents,
so the patterns run a few hundred times, not 100,000 — and only for agents the rule has
not judged before (it remembers the verdicts of up to 50,000 agents). The patterns are
joined into one alternation and run by polars' (Rust) regex engine over the new distinct
values at once; the verdicts are then mapped back onto the events in one polars
operation, with no per-event Python.

Patterns use the Rust ``regex`` syntax (no look-around or back-references); the
crawler-user-agents list compiles as is. The evidence names the user agent (cut to
:data:`~clickagg.core.rules.base.MAX_EVIDENCE_CHARS`) and the text the patterns matched.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import polars as pl

from clickagg.core.rules.base import MAX_EVIDENCE_CHARS, Matcher, RuleError, RuleSpec, nulls
from clickagg.core.rules.registry import params_of, register_kind

VERDICT_CACHE_AGENTS = 50_000
"""Distinct agents whose verdict a rule remembers across batches (a few MB at most)."""


class PatternParams(msgspec.Struct, forbid_unknown_fields=True):
    patterns: list[str]
    # Patterns to leave out (exactly as listed), e.g. a false positive of a maintained list.
    exclude: list[str] = msgspec.field(default_factory=list)
    case_sensitive: bool = True


def user_agent_matcher(spec: RuleSpec, patterns: Sequence[str], case_sensitive: bool) -> Matcher:
    """A matcher flagging events whose user agent matches any of ``patterns``."""
    if not patterns:
        raise RuleError(f"rule {spec.id!r} ({spec.kind}): no patterns")
    combined = ("" if case_sensitive else "(?i)") + "|".join(f"(?:{p})" for p in patterns)
    try:
        pl.Series([""], dtype=pl.String).str.contains(combined)
    except pl.exceptions.ComputeError as exc:
        raise RuleError(
            f"rule {spec.id!r} ({spec.kind}): a pattern does not compile: {exc}"
        ) from None

    # Verdicts of agents already seen (agent -> the text matched, None: no match). The
    # regex engine builds its automaton lazily, per call: ~5 ms for a batch's few hundred
    # agents with the crawler list, where looking known agents up costs ~0.1 ms. A pure
    # function of the agent, so the cache never changes a decision; cleared when full.
    verdicts: dict[str, str | None] = {}

    def match(events: pl.DataFrame) -> pl.Series:
        agents = events["user_agent"]
        names: list[str] = agents.drop_nulls().unique().to_list()
        new = [name for name in names if name not in verdicts]
        if len(verdicts) + len(new) > VERDICT_CACHE_AGENTS:
            verdicts.clear()
            new = names
        if new:
            found = pl.Series(new, dtype=pl.String).str.extract(combined, 0)
            verdicts.update(zip(new, found.to_list(), strict=True))
        flagged = [name for name in names if verdicts[name] is not None]
        if not flagged:
            return nulls("evidence", agents.len())
        hits = pl.DataFrame(
            {"agent": flagged, "token": [verdicts[name] for name in flagged]},
            schema={"agent": pl.String, "token": pl.String},
        )
        evidence = hits.select(
            pl.format(
                '{} matches "{}"',
                pl.col("agent").str.slice(0, MAX_EVIDENCE_CHARS),
                pl.col("token").str.slice(0, MAX_EVIDENCE_CHARS),
            )
        ).to_series()
        return agents.replace_strict(hits["agent"], evidence, default=None, return_dtype=pl.String)

    return match


@register_kind("declared_crawler")
def declared_crawler(spec: RuleSpec) -> Matcher:
    """Declared bots and crawlers: a maintained list of user-agent patterns (the rules
    loader fills ``patterns`` from the crawler-user-agents package when the rule says
    ``source = "crawler-user-agents"``)."""
    return _listed_patterns(spec)


@register_kind("non_browser_client")
def non_browser_client(spec: RuleSpec) -> Matcher:
    """Clients that are not a person's browser: HTTP libraries and command-line tools
    (curl, wget, python-requests, Go-http-client) and headless or automated browsers."""
    return _listed_patterns(spec)


def _listed_patterns(spec: RuleSpec) -> Matcher:
    params = params_of(spec, PatternParams)
    excluded = set(params.exclude)
    patterns = [p for p in params.patterns if p not in excluded]
    return user_agent_matcher(spec, patterns, params.case_sensitive)
