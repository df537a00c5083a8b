"""Rules files: TOML specs, the range files they name, reloading and the change records."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from clickagg.core.rules.base import RuleError
from clickagg.core.rules.loading import RulesWatcher, last_change, load_rules
from tests.core.rules.events import T0, Hit, log_frame

AWS = {
    "syncToken": "1",
    "createDate": "2025-01-15-10-00-00",
    "prefixes": [{"ip_prefix": "3.5.140.0/22", "region": "ap-northeast-2", "service": "AMAZON"}],
    "ipv6_prefixes": [{"ipv6_prefix": "2600:1f14::/35", "region": "us-west-2", "service": "EC2"}],
}
GOOGLE = {
    "syncToken": "1",
    "creationTime": "2025-01-15T10:00:00",
    "prefixes": [
        {"ipv4Prefix": "34.1.208.0/20", "service": "Google Cloud", "scope": "africa-south1"},
        {"ipv6Prefix": "2600:1900:8000::/44", "service": "Google Cloud", "scope": "us-east1"},
    ],
}
AZURE = {
    "changeNumber": 1,
    "cloud": "Public",
    "values": [
        {
            "name": "AzureCloud",
            "id": "AzureCloud",
            "properties": {"addressPrefixes": ["13.64.0.0/16", "2603:1000::/40"]},
        }
    ],
}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def blocklist_file(tmp_path: Path) -> Path:
    (tmp_path / "aws.json").write_text(json.dumps(AWS))
    (tmp_path / "cloud.json").write_text(json.dumps(GOOGLE))
    (tmp_path / "azure.json").write_text(json.dumps(AZURE))
    write(tmp_path / "abuse.txt", "# our list\n198.51.100.0/24\n\n2001:db8:bad::/48  # v6\n")
    return write(
        tmp_path / "rules.toml",
        """
        [[rules]]
        id = "datacenter-ip"
        kind = "ip_blocklist"
        reason = "data-centre or blocklisted address"
        [[rules.params.lists]]
        name = "aws"
        file = "aws.json"
        format = "aws"
        [[rules.params.lists]]
        name = "google"
        file = "cloud.json"
        format = "google"
        [[rules.params.lists]]
        name = "azure"
        file = "azure.json"
        format = "azure"
        [[rules.params.lists]]
        name = "abuse"
        file = "abuse.txt"
        cidrs = ["192.0.2.1"]
        """,
    )


def test_the_builtin_rules_load_from_the_package() -> None:
    rules = load_rules()
    assert rules.ids == [
        "non-browser-client",
        "declared-crawler",
        "ip-blocklist",
        "ip-click-velocity",
        "ip-ad-spread",  # the rules the keyed stage applies first: it names what it flags
        "repeat-click",
    ]
    assert [r.name for r in rules.stream_rules] == [
        "non-browser-client",
        "declared-crawler",
        "ip-blocklist",
    ]
    assert rules.source == "builtin"
    assert len(rules.rules[1].spec.params["patterns"]) > 1000
    assert rules.digest == load_rules().digest


def test_range_files_of_every_format_and_inline_cidrs(tmp_path: Path) -> None:
    rules = load_rules(blocklist_file(tmp_path))
    assert rules.ids == ["datacenter-ip"]
    assert len(rules.files) == 5
    ips = ["3.5.141.9", "2600:1f14::1", "34.1.210.1", "2600:1900:8000::5", "13.64.1.1"]
    ips += ["2603:1000::1", "198.51.100.200", "2001:db8:bad::9", "192.0.2.1", "192.0.2.2"]
    reasons = rules.rules[0].evaluate(log_frame([Hit(ip=ip) for ip in ips])).to_list()
    prefix = "data-centre or blocklisted address: "
    assert reasons == [
        prefix + "3.5.141.9 in aws 3.5.140.0/22",
        prefix + "2600:1f14::1 in aws 2600:1f14::/35",
        prefix + "34.1.210.1 in google 34.1.208.0/20",
        prefix + "2600:1900:8000::5 in google 2600:1900:8000::/44",
        prefix + "13.64.1.1 in azure 13.64.0.0/16",
        prefix + "2603:1000::1 in azure 2603:1000::/40",
        prefix + "198.51.100.200 in abuse 198.51.100.0/24",
        prefix + "2001:db8:bad::9 in abuse 2001:db8:bad::/48",
        prefix + "192.0.2.1 in abuse 192.0.2.1/32",
        None,
    ]


def test_include_builtin_keeps_the_builtins_first_and_a_same_id_rule_replaces_one(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "rules.toml",
        """
        include_builtin = true

        [[rules]]
        id = "declared-crawler"
        kind = "declared_crawler"
        reason = "declared bot or crawler"
        enabled = false

        [[rules]]
        id = "blocked"
        kind = "ip_blocklist"
        reason = "blocked"
        params.lists = [{ name = "ours", cidrs = ["192.0.2.0/24"] }]
        """,
    )
    assert load_rules(path).ids == [
        "non-browser-client",
        "ip-blocklist",
        "ip-click-velocity",
        "ip-ad-spread",
        "repeat-click",
        "blocked",
    ]


def test_effective_from_applies_to_event_times_at_or_after_it(tmp_path: Path) -> None:
    stamp = "2023-11-14T22:14:00Z"  # T0 (a whole minute) + 1 minute
    path = write(
        tmp_path / "rules.toml",
        f"""
        [[rules]]
        id = "curl"
        kind = "non_browser_client"
        reason = "curl"
        effective_from = {stamp}
        params.patterns = ["^curl/"]
        """,
    )
    [rule] = load_rules(path).rules
    assert rule.spec.effective_from_ms == T0 + 60_000
    hits = [Hit(user_agent="curl/8", ts_ms=T0 + d) for d in (59_999, 60_000, 120_000)]
    flagged = 'curl: curl/8 matches "curl/"'
    assert rule.evaluate(log_frame(hits)).to_list() == [None, flagged, flagged]
    quoted = write(tmp_path / "q.toml", path.read_text().replace(stamp, '"2023-11-14T22:14:00"'))
    assert load_rules(quoted).rules[0].spec.effective_from_ms == T0 + 60_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules = 1", "array of tables"),
        ("colour = 1", "unknown keys \\['colour'\\]"),
        ("[[rules]]\nid = 'a'\nkind = 'x'\n", "`reason` must be a non-empty string"),
        ("[[rules]]\nid='a'\nkind='x'\nreason='r'\nwhen=1\n", "unknown keys \\['when'\\]"),
        ("[[rules]]\nid='a'\nkind='x'\nreason='r'\n", "unknown kind 'x'"),
        (
            "[[rules]]\nid='a'\nkind='ip_blocklist'\nreason='r'\n"
            "params.lists=[{name='n', file='none.txt'}]\n",
            "cannot read",
        ),
        (
            "[[rules]]\nid='a'\nkind='ip_blocklist'\nreason='r'\n"
            "params.lists=[{name='n', file='rules.toml', format='aws'}]\n",
            "not a aws range file",
        ),
        (
            "[[rules]]\nid='a'\nkind='ip_blocklist'\nreason='r'\n"
            "params.lists=[{name='n', file='x', format='bgp'}]\n",
            "format 'bgp' unknown",
        ),
        (
            "[[rules]]\nid='a'\nkind='declared_crawler'\nreason='r'\nparams.source='mine'\n",
            "only 'crawler-user-agents'",
        ),
        ("[[rules]]\nid='a'\nkind='x'\nreason='r'\neffective_from='soon'\n", "not a date-time"),
        ("[rules", "not a TOML file"),
    ],
)
def test_a_bad_rules_file_is_an_error_saying_what_and_where(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path / "rules.toml", text)
    with pytest.raises(RuleError, match=message):
        load_rules(path)


def bump(path: Path, text: str) -> None:
    """Rewrite ``path`` and move its modification time on, as an edit would."""
    before = path.stat().st_mtime_ns
    path.write_text(textwrap.dedent(text))
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_the_watcher_reloads_changed_files_keeps_rules_on_a_bad_edit_and_records_changes(
    tmp_path: Path,
) -> None:
    rules_file = blocklist_file(tmp_path)
    changes = tmp_path / "data" / "rules" / "changes.jsonl"
    clock = iter(range(T0, T0 + 10**6, 1000))
    watcher = RulesWatcher(
        rules_file, changes=changes, check_interval_s=0, now_ms=lambda: next(clock)
    )
    first = watcher.current()
    assert watcher.current() is first  # nothing changed: nothing read again
    [record] = [json.loads(line) for line in changes.read_text().splitlines()]
    assert record["added"] == ["datacenter-ip"] and record["removed"] == []
    assert record["digest"] == first.digest and record["source"] == str(rules_file)
    assert record["time"] == "2023-11-14T22:13:00.000+00:00" and record["who"]

    # A block-list file the rules name changes: reloaded, recorded as a changed rule.
    bump(tmp_path / "abuse.txt", "198.51.100.0/24\n203.0.113.0/24\n")
    second = watcher.current()
    assert second is not first
    assert last_change(changes)["changed"] == ["datacenter-ip"]  # type: ignore[index]
    reason = second.rules[0].evaluate(log_frame([Hit(ip="203.0.113.5")]))[0]
    assert reason.endswith("203.0.113.5 in abuse 203.0.113.0/24")

    # A bad edit: the rules in force stay, nothing is recorded.
    bump(rules_file, "[[rules]]\nid = 'x'\n")
    assert watcher.current() is second
    assert len(changes.read_text().splitlines()) == 2

    # A good edit: a rule added, one removed.
    bump(
        rules_file,
        """
        [[rules]]
        id = "curl"
        kind = "non_browser_client"
        reason = "curl"
        params.patterns = ["^curl/"]
        """,
    )
    assert watcher.current().ids == ["curl"]
    last = last_change(changes)
    assert last is not None
    assert (last["added"], last["removed"], last["changed"]) == (["curl"], ["datacenter-ip"], [])

    # A restart with the same rules records nothing new; the log only grows.
    RulesWatcher(rules_file, changes=changes)
    assert len(changes.read_text().splitlines()) == 3


def test_rules_text_names_files_only_under_its_base(tmp_path: Path) -> None:
    from clickagg.core.rules.loading import load_rules_text

    (tmp_path / "abuse.txt").write_text("198.51.100.0/24\n")
    text = (
        '[[rules]]\nid = "abuse"\nkind = "ip_blocklist"\nreason = "r"\n'
        '[[rules.params.lists]]\nname = "abuse"\nfile = "{}"\n'
    )
    rules = load_rules_text(text.format("abuse.txt"), source="request", base=tmp_path, confine=True)
    assert rules.ids == ["abuse"] and rules.files == (str(tmp_path / "abuse.txt"),)
    outside = tmp_path.parent / "outside.txt"
    outside.write_text("203.0.113.0/24\n")
    with pytest.raises(RuleError, match="files must be under"):
        load_rules_text(
            text.format("../outside.txt"), source="request", base=tmp_path, confine=True
        )
    with pytest.raises(RuleError, match="may not name files"):
        load_rules_text(text.format("abuse.txt"), source="request")
    builtin = load_rules_text("include_builtin = true\n", source="request")
    assert builtin.ids == load_rules(None).ids


def test_the_builtin_files_examples_shipped_off_load_once_uncommented() -> None:
    """Each ``# [[rules]]`` block of builtin.toml, uncommented, is a rule that compiles:
    the examples an operator copies stay valid as kinds change."""
    from clickagg.core.rules.loading import builtin_text, load_rules_text

    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in builtin_text().decode().splitlines():
        if line == "# [[rules]]":
            current = []
            blocks.append(current)
        elif current is None or not line.startswith("# "):
            current = None  # a bare "#" ends an example; prose or live rules follow
            continue
        current.append(line[2:])
    examples = ["\n".join(block) for block in blocks]
    kinds = set()
    for example in examples:
        [rule] = load_rules_text(example, source="example").rules
        kinds.add(rule.spec.kind)
    expected = {"ip_click_volume", "shared_agent_ad_spread", "no_impression_click", "ctr_spike"}
    assert kinds == expected
