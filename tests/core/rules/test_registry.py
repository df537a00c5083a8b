"""The registry of rule kinds: a deployment's kind registers and compiles like a built-in."""

from __future__ import annotations

import polars as pl
import pytest

from clickagg.core.rules.base import RuleError, RuleSpec
from clickagg.core.rules.registry import KINDS, compile_rule, compile_rules, register_kind
from tests.core.rules.events import Hit, log_frame


def test_the_builtin_kinds_are_registered() -> None:
    assert {"declared_crawler", "non_browser_client", "ip_blocklist"} <= set(KINDS)


def test_a_kind_of_ones_own_is_registered_and_used_like_a_builtin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("clickagg.core.rules.registry.KINDS", dict(KINDS))

    @register_kind("no_user_agent")
    def no_user_agent(spec: RuleSpec) -> object:
        def match(events: pl.DataFrame) -> pl.Series:
            return pl.select(
                pl.when(pl.lit(events["user_agent"]).is_null()).then(pl.lit("no agent"))
            ).to_series()

        return match

    [rule] = compile_rules([RuleSpec("empty-ua", "no_user_agent", "missing user agent")])
    frame = log_frame([Hit(user_agent=None), Hit(user_agent="x")])
    assert rule.evaluate(frame).to_list() == ["missing user agent: no agent", None]
    with pytest.raises(ValueError, match="already registered"):
        register_kind("no_user_agent")(no_user_agent)


def test_unknown_kinds_and_repeated_ids_are_errors_and_disabled_rules_are_left_out() -> None:
    with pytest.raises(RuleError, match="unknown kind 'nope'"):
        compile_rule(RuleSpec("x", "nope", "r"))
    patterns = {"patterns": ["^curl/"]}
    with pytest.raises(RuleError, match="'x' appears twice"):
        compile_rules([RuleSpec("x", "non_browser_client", "r", patterns)] * 2)
    rules = compile_rules(
        [
            RuleSpec("on", "non_browser_client", "r", patterns),
            RuleSpec("off", "nope", "r", enabled=False),
        ]
    )
    assert [r.name for r in rules] == ["on"]
