"""The managed IP blocklist: its record of adds and removes, what is listed now, and the
rules that apply it, reloaded by the watcher when the record grows."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.blocklist import CIDR_PATTERN, Blocklist, BlocklistError, normal_cidr
from clickagg.core.rules.base import RuleError
from clickagg.core.rules.iprange import ManagedEntry, fold_blocklist
from clickagg.core.rules.loading import RulesWatcher, load_rules
from tests.core.rules.events import T0, Hit, log_frame


def test_adds_and_removes_are_recorded_with_who_when_and_why(tmp_path: Path) -> None:
    blocklist = Blocklist(tmp_path / "rules" / "blocklist.jsonl")
    added = blocklist.add(
        ["203.0.113.7", "2001:DB8::/32", "10.1.2.3/8"], reason="abuse", by="ops", now_ms=1_000
    )
    assert added == ["203.0.113.7/32", "2001:db8::/32", "10.0.0.0/8"]  # normal forms
    assert blocklist.add(["203.0.113.7/32"], reason="again", by="ops", now_ms=2_000) == []
    assert (
        blocklist.remove("10.0.0.0/8", by="eve", now_ms=3_000, reason="false alarm") == "10.0.0.0/8"
    )
    assert [entry.as_json() for entry in blocklist.listed()] == [
        {"cidr": "2001:db8::/32", "since_ms": 1_000, "by": "ops", "reason": "abuse"},
        {"cidr": "203.0.113.7/32", "since_ms": 1_000, "by": "ops", "reason": "abuse"},
    ]
    last = blocklist.records()[-1]
    assert last == {
        "op": "remove",
        "cidr": "10.0.0.0/8",
        "time_ms": 3_000,
        "by": "eve",
        "reason": "false alarm",
    }
    with pytest.raises(LookupError, match=r"10\.0\.0\.0/8 is not on the blocklist"):
        blocklist.remove("10.0.0.0/8", by="eve", now_ms=4_000)


@pytest.mark.parametrize("bad", ["203.0.113.300", "not-an-ip", "", "2001:db8::/129", 7])
def test_a_bad_cidr_is_refused_and_nothing_is_recorded(tmp_path: Path, bad: object) -> None:
    blocklist = Blocklist(tmp_path / "blocklist.jsonl")
    with pytest.raises(BlocklistError, match="CIDR"):
        blocklist.add(["192.0.2.1", bad], reason="", by="ops", now_ms=1)
    assert blocklist.records() == []


def test_entries_span_from_their_addition_to_their_removal() -> None:
    records = [
        {"op": "add", "cidr": "a", "time_ms": 1},
        {"op": "add", "cidr": "a", "time_ms": 2},  # already listed: no change
        {"op": "remove", "cidr": "b", "time_ms": 3},  # not listed: no change
        {"op": "remove", "cidr": "a", "time_ms": 4},
        {"op": "add", "cidr": "a", "time_ms": 5},
        {"op": "add", "cidr": "b", "time_ms": 6},
    ]
    assert fold_blocklist(records) == [
        ManagedEntry("a", 1, 4),
        ManagedEntry("a", 5),
        ManagedEntry("b", 6),
    ]


def test_the_builtin_rule_flags_listed_addresses_of_event_times_while_listed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "blocklist.jsonl"
    blocklist = Blocklist(path)
    blocklist.add(["198.51.100.0/24"], reason="", by="ops", now_ms=T0 + 1_000)
    blocklist.add(["198.51.100.9", "2001:db8::/32"], reason="", by="ops", now_ms=T0 + 2_000)
    blocklist.remove("198.51.100.0/24", by="ops", now_ms=T0 + 3_000)
    rule = next(r for r in load_rules(blocklist=path).rules if r.name == "ip-blocklist")
    hits = [
        Hit(ip="198.51.100.9", ts_ms=T0 + 500),  # before any entry
        Hit(ip="198.51.100.9", ts_ms=T0 + 1_000),  # the /24 from its addition
        Hit(ip="198.51.100.8", ts_ms=T0 + 2_500),  # the /24 still listed
        Hit(ip="198.51.100.8", ts_ms=T0 + 3_000),  # the /24 removed
        Hit(ip="198.51.100.9", ts_ms=T0 + 3_000),  # its own /32 stays
        Hit(ip="2001:db8::1", ts_ms=T0 + 9_000),
        Hit(ip="192.0.2.1", ts_ms=T0 + 9_000),
        Hit(ip=None, ts_ms=T0 + 9_000),
    ]
    prefix = "blocklisted address: "
    assert rule.evaluate(log_frame(hits)).to_list() == [
        None,
        prefix + "198.51.100.9 in blocklist 198.51.100.0/24",
        prefix + "198.51.100.8 in blocklist 198.51.100.0/24",
        None,
        prefix + "198.51.100.9 in blocklist 198.51.100.9/32",
        prefix + "2001:db8::1 in blocklist 2001:db8::/32",
        None,
        None,
    ]


def test_the_watcher_takes_up_the_managed_list_and_records_the_change(tmp_path: Path) -> None:
    path = tmp_path / "rules" / "blocklist.jsonl"
    changes = tmp_path / "rules" / "changes.jsonl"
    watcher = RulesWatcher(None, changes=changes, blocklist=path, check_interval_s=0)
    frame = log_frame([Hit(ip="203.0.113.7", ts_ms=T0 + 10_000)])
    first = watcher.current()
    assert [r.evaluate(frame)[0] for r in first.stream_rules] == [None, None, None]
    Blocklist(path).add(["203.0.113.0/24"], reason="", by="ops", now_ms=T0)
    os.utime(path, ns=(10**18, 10**18))
    second = watcher.current()
    assert second is not first
    assert [r.evaluate(frame)[0] for r in second.stream_rules][2].endswith(
        "203.0.113.7 in blocklist 203.0.113.0/24"
    )
    records = [json.loads(line) for line in changes.read_text().splitlines()]
    assert [r["changed"] for r in records[1:]] == [["ip-blocklist"]]


def test_a_rules_file_rule_can_apply_the_managed_list(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.jsonl"
    Blocklist(path).add(["192.0.2.0/24"], reason="", by="ops", now_ms=T0)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(
        "[[rules]]\nid = 'mine'\nkind = 'ip_blocklist'\nreason = 'ours'\n"
        "params.managed = true\nparams.lists = [{ name = 'x', cidrs = ['10.0.0.0/8'] }]\n"
    )
    [rule] = load_rules(rules_file, blocklist=path).rules
    frame = log_frame([Hit(ip="192.0.2.5", ts_ms=T0), Hit(ip="10.0.0.1", ts_ms=T0)])
    assert rule.evaluate(frame).to_list() == [
        "ours: 192.0.2.5 in blocklist 192.0.2.0/24",
        "ours: 10.0.0.1 in x 10.0.0.0/8",
    ]
    rules_file.write_text(
        "[[rules]]\nid = 'mine'\nkind = 'ip_blocklist'\nreason = 'ours'\nparams.managed = 'yes'\n"
    )
    with pytest.raises(RuleError, match="managed` must be true or false"):
        load_rules(rules_file, blocklist=path)


@settings(max_examples=500)
@given(st.from_regex(CIDR_PATTERN, fullmatch=True))
def test_what_the_pattern_admits_is_a_network(text: str) -> None:
    assert normal_cidr(text) == str(ipaddress.ip_network(text, strict=False))


@given(
    st.one_of(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
            lambda p: ipaddress.IPv4Network(p, strict=False)
        ),
        st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
            lambda p: ipaddress.IPv6Network(p, strict=False)
        ),
    )
)
def test_every_network_in_its_usual_spellings_is_taken(network: Any) -> None:
    for text in (str(network), network.exploded, str(network.network_address)):
        assert re.match(CIDR_PATTERN, text), text
        assert normal_cidr(text).split("/")[0] == str(network.network_address)
