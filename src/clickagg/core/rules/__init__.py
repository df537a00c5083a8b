"""Invalid-traffic rules: specs, the registry of rule kinds, and the built-in kinds.

Pure: compiling a rule and matching a batch touch no files. Reading a rules file, the
block-list files it names and the crawler-user-agents list is :mod:`.loading`'s job.
"""

from __future__ import annotations

from clickagg.core.rules import behaviour, devicefarm, iprange, useragent, velocity
from clickagg.core.rules.base import (
    CompiledRule,
    FrameMatcher,
    Matcher,
    RuleError,
    RuleSet,
    RuleSpec,
    first_reasons,
)
from clickagg.core.rules.registry import KINDS, compile_rule, compile_rules, register_kind

__all__ = [
    "KINDS",
    "CompiledRule",
    "FrameMatcher",
    "Matcher",
    "RuleError",
    "RuleSet",
    "RuleSpec",
    "behaviour",
    "compile_rule",
    "compile_rules",
    "devicefarm",
    "first_reasons",
    "iprange",
    "register_kind",
    "useragent",
    "velocity",
]
