"""General invalid traffic by user agent: declared crawlers and non-browser clients.

Both kinds match a list of regular expressions against the user agents of a batch, once
per *distinct* user agent: a batch of 100,000 clicks holds a few hundred distinct agents,
so the patterns run a few hundred times, not 100,000. The patterns are joined into one
alternation and run by polars' (Rust) regex engine over the distinct values, vectorized:
no per-event or per-agent Python. The verdicts are then mapped back onto the events.

Patterns use the Rust ``regex`` syntax (no look-around or back-references); the
crawler-user-agents list compiles as is. The evidence names the user agent (cut to
:data:`~clickagg.core.rules.base.MAX_EVIDENCE_CHARS`) and the text the patterns matched.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import polars as pl

from clickagg.core.rules.base import MAX_EVIDENCE_CHARS, Matcher, RuleError, RuleSpec
from clickagg.core.rules.registry import params_of, register_kind


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

    def match(events: pl.DataFrame) -> pl.Series:
        agents = events["user_agent"]
        distinct = agents.drop_nulls().unique()
        matched = distinct.str.extract(combined, 0)
        hit = matched.is_not_null()
        flagged = distinct.filter(hit)
        evidence = pl.select(
            pl.format(
                '{} matches "{}"',
                pl.lit(flagged).str.slice(0, MAX_EVIDENCE_CHARS),
                pl.lit(matched.filter(hit)).str.slice(0, MAX_EVIDENCE_CHARS),
            )
        ).to_series()
        return agents.replace_strict(flagged, evidence, default=None, return_dtype=pl.String)

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
