"""Invalid traffic through the real server: crawler, non-browser and blocklisted clicks are
kept with their reason and not billed; a rules file edited while it runs is taken up and
the change is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from tests.e2e.server import ServeProcess, http
from tests.e2e.test_kill9 import post, wait_caught_up

AD = "ad-givt"
COST = 250_000  # micros per click
BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
AWS_RANGES = {
    "syncToken": "1",
    "createDate": "2025-01-15-10-00-00",
    "prefixes": [{"ip_prefix": "203.0.113.0/24", "region": "us-east-1", "service": "EC2"}],
    "ipv6_prefixes": [{"ipv6_prefix": "2001:db8:ec2::/48", "region": "us-east-1"}],
}
RULES = """\
include_builtin = true

[[rules]]
id = "datacenter-ip"
kind = "ip_blocklist"
reason = "data-centre or blocklisted address"
[[rules.params.lists]]
name = "datacenter-aws"
file = "ip-ranges.json"
format = "aws"
[[rules.params.lists]]
name = "abuse"
file = "abuse.txt"
"""


def click(event_id: str, now_s: int, *, ua: str = BROWSER, ip: str = "192.0.2.10") -> Any:
    return {
        "event_type": "click",
        "event_id": event_id,
        "ad_id": AD,
        "user_id": f"u-{event_id}",
        "timestamp": now_s,
        "ip": ip,
        "user_agent": ua,
        "cost_micros": COST,
    }


def totals(url: str, now_s: int) -> dict[str, int]:
    rows = http.get(
        url + "/aggregates",
        params={"ad_id": AD, "start": now_s - 600, "end": now_s + 600, "granularity": "minute"},
        timeout=10,
    ).json()
    keys = ("clicks", "invalid_clicks", "spend_micros")
    return {key: sum(row[key] for row in rows) for key in keys}


def fate(url: str, event_id: str, timeout_s: float = 30) -> dict[str, Any]:
    """The audit trail of an event, once the archive has it."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(f"{url}/events/{event_id}", timeout=10)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)


def test_flagged_clicks_are_kept_with_their_reason_and_not_billed(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES)
    (tmp_path / "ip-ranges.json").write_text(json.dumps(AWS_RANGES))
    abuse = tmp_path / "abuse.txt"
    abuse.write_text("# addresses we caught\n198.51.100.66\n")
    server = ServeProcess(
        tmp_path / "data", extra_env={"CLICKAGG_RULES_FILE": str(rules_file)}, partitions=2
    )
    server.start()
    try:
        now = int(time.time())
        events = [click(f"ok-{i}", now, ip=f"192.0.2.{i}") for i in range(5)]
        events += [
            click("bot-1", now, ua=GOOGLEBOT),
            click("curl-1", now, ua="curl/8.5.0"),
            click("aws-1", now, ip="203.0.113.7"),
            click("aws-6", now, ip="2001:db8:ec2::42"),
            click("abuse-1", now, ip="198.51.100.66"),
            {**click("imp-bot", now, ua=GOOGLEBOT), "event_type": "impression"},
        ]
        assert post(server.url, events)
        wait_caught_up(server)
        assert totals(server.url, now) == {
            "clicks": 5,
            "invalid_clicks": 5,
            "spend_micros": 5 * COST,
        }
        by_rule = http.get(
            server.url + "/aggregates",
            params={
                "ad_id": AD,
                "start": now - 600,
                "end": now + 600,
                "granularity": "hour",
                "group_by": "invalid_reason",
            },
            timeout=10,
        ).json()
        per_rule: dict[str, int] = {}
        for row in by_rule:
            per_rule[row["invalid_reason"]] = (
                per_rule.get(row["invalid_reason"], 0) + row["invalid_clicks"]
            )
        assert per_rule == {"declared-crawler": 1, "non-browser-client": 1, "datacenter-ip": 3}
        assert fate(server.url, "ok-0")["status"] == "counted"
        assert fate(server.url, "imp-bot")["status"] == "counted"  # only clicks are judged
        expected = {
            "bot-1": "declared-crawler: declared bot or crawler: "
            + f'{GOOGLEBOT} matches "Googlebot/"',
            "curl-1": "non-browser-client: HTTP library, tool or automated browser: "
            'curl/8.5.0 matches "curl/"',
            "aws-1": "datacenter-ip: data-centre or blocklisted address: "
            "203.0.113.7 in datacenter-aws 203.0.113.0/24",
            "aws-6": "datacenter-ip: data-centre or blocklisted address: "
            "2001:db8:ec2::42 in datacenter-aws 2001:db8:ec2::/48",
            "abuse-1": "datacenter-ip: data-centre or blocklisted address: "
            "198.51.100.66 in abuse 198.51.100.66/32",
        }
        for event_id, reason in expected.items():
            body = fate(server.url, event_id)
            assert (body["status"], body["reason"]) == ("invalid", reason), body
        traced = subprocess.run(
            [sys.executable, "-m", "clickagg", "trace", "aws-1", "--url", server.url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "aws-1: invalid" in traced and expected["aws-1"] in traced

        # An edit of a list the rules name is taken up without a restart, and recorded.
        before = abuse.stat().st_mtime_ns
        abuse.write_text("198.51.100.66\n192.0.2.200\n")
        os.utime(abuse, ns=(before + 10**9, before + 10**9))
        changes = tmp_path / "data" / "rules" / "changes.jsonl"
        deadline = time.monotonic() + 30
        while len(changes.read_text().splitlines()) < 2:
            assert time.monotonic() < deadline, changes.read_text()
            time.sleep(0.1)
        later = int(time.time())
        assert post(server.url, [click("ok-5", later, ip="192.0.2.200")])
        assert fate(server.url, "ok-5")["reason"].endswith("192.0.2.200 in abuse 192.0.2.200/32")
        wait_caught_up(server)
        assert totals(server.url, now)["invalid_clicks"] == 6
        records = [msgspec.json.decode(line) for line in changes.read_text().splitlines()]
        assert records[0]["added"] == [
            "datacenter-ip",
            "declared-crawler",
            "ip-ad-spread",
            "ip-blocklist",
            "ip-click-velocity",
            "non-browser-client",
            "repeat-click",
        ]
        assert records[1]["changed"] == ["datacenter-ip"]
        assert records[1]["source"] == str(rules_file) and records[1]["who"]
    finally:
        server.stop()


def test_serve_refuses_a_rules_file_that_does_not_load(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('[[rules]]\nid = "x"\nkind = "no_such_kind"\nreason = "r"\n')
    done = subprocess.run(
        [sys.executable, "-m", "clickagg", "serve", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env={**os.environ, "CLICKAGG_RULES_FILE": str(rules_file)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "rule 'x': unknown kind 'no_such_kind'" in done.stderr
    assert "CLICKAGG_RULES_FILE" in done.stderr
