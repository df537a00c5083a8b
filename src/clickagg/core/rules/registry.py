"""The registry of rule kinds: every kind of rule, built-in or not, is registered here by
name, and a rule spec names its kind. A kind is a function from a spec to its matcher
(see :mod:`clickagg.core.rules.base`); it validates the spec's parameters and fails with
a :class:`RuleError` naming the rule.

The built-in kinds (``declared_crawler``, ``non_browser_client``, ``ip_blocklist``)
register themselves when this package is imported, with the same :func:`register_kind` a
deployment's own kind would use; the built-in *rules* are a rules file like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import msgspec

from clickagg.core.rules.base import CompiledRule, FrameMatcher, Matcher, RuleError, RuleSpec

RuleKind = Callable[[RuleSpec], Matcher | FrameMatcher]
KINDS: dict[str, RuleKind] = {}

_K = TypeVar("_K", bound=RuleKind)
_P = TypeVar("_P")


def register_kind(name: str) -> Callable[[_K], _K]:
    """Register a rule kind under ``name`` (a decorator)."""

    def register(kind: _K) -> _K:
        if name in KINDS:
            raise ValueError(f"rule kind {name!r} is already registered")
        KINDS[name] = kind
        return kind

    return register


def params_of(spec: RuleSpec, schema: type[_P]) -> _P:
    """The spec's parameters as ``schema`` (a msgspec Struct): unknown or mistyped
    parameters are an error naming the rule."""
    try:
        return msgspec.convert(dict(spec.params), type=schema)
    except msgspec.ValidationError as exc:
        raise RuleError(f"rule {spec.id!r} ({spec.kind}): params: {exc}") from None


def compile_rule(spec: RuleSpec) -> CompiledRule:
    kind = KINDS.get(spec.kind)
    if kind is None:
        known = ", ".join(sorted(KINDS))
        raise RuleError(f"rule {spec.id!r}: unknown kind {spec.kind!r} (known: {known})")
    return CompiledRule(spec, kind(spec))


def compile_rules(specs: Iterable[RuleSpec]) -> tuple[CompiledRule, ...]:
    """The enabled specs, compiled, in order; ids must be unique."""
    seen: set[str] = set()
    compiled = []
    for spec in specs:
        if spec.id in seen:
            raise RuleError(f"rule id {spec.id!r} appears twice")
        seen.add(spec.id)
        if spec.enabled:
            compiled.append(compile_rule(spec))
    return tuple(compiled)
