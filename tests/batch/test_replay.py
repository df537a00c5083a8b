"""Replaying candidate rules over an archive the real stream wrote: the report's numbers
equal a count made here from the archived rows with Python's own regular expressions, the
flipped clicks carry both verdicts, and the data dir is left byte for byte as it was."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clickagg.archive.parquet import ParquetArchiveReader
from clickagg.batch.replay import replay_rules
from clickagg.batch.runner import Progress
from clickagg.core import ids
from clickagg.core.rules.loading import builtin_text, load_rules
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from tests.conftest import Ev
from tests.worker.test_stream import T0, Rig

HOUR = T0 - T0 % HOUR_MS
BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
BURST_IP = "203.0.113.7"
SCRAPER = "FooScraper/1.0"  # no built-in rule knows it; the candidate adds a pattern
POSTMAN = "PostmanRuntime/7.36.0"  # a built-in non-browser pattern only: not a crawler
CURL = "curl/8.4.0"  # both a non-browser client and a declared crawler
ADVERTISER = {"ad-0": "adv-A", "ad-1": "adv-A", "ad-2": "adv-B", "ad-3": "adv-B"}

CANDIDATE = """\
include_builtin = true

[[rules]]
id = "ip-click-velocity"
kind = "ip_click_velocity"
reason = "click burst from one address"
[rules.params]
max_clicks_per_minute = 10

[[rules]]
id = "non-browser-client"
kind = "non_browser_client"
reason = "turned off"
enabled = false

[[rules]]
id = "scraper"
kind = "non_browser_client"
reason = "scraping library"
[rules.params]
patterns = ["^FooScraper/"]
"""


def click(event_id: str, ad: str, ts_ms: int, **kw: Any) -> Ev:
    kw.setdefault("user_agent", BROWSER)
    return Ev(event_id, ad, ts_ms, advertiser_id=ADVERTISER[ad], **kw)


def traffic() -> list[Ev]:
    events = [
        click(
            f"n{i}",
            f"ad-{i % 4}",
            HOUR + MINUTE_MS + i * 30_011,
            ip=f"198.51.100.{i % 20}",
            cost_micros=1000 + i,
            user_id=f"u{i}",
        )
        for i in range(80)
    ]
    events += [
        Ev(f"imp{i}", f"ad-{i % 4}", HOUR + i * 60_000, event_type=ids.IMPRESSION, ip=BURST_IP)
        for i in range(20)
    ]
    # A burst: 25 clicks from one address in one minute, and 3 in another (never flagged).
    events += [
        click(f"burst{i}", "ad-1", HOUR + 20 * MINUTE_MS + i * 1000, ip=BURST_IP, cost_micros=2000)
        for i in range(25)
    ]
    events += [
        click(f"calm{i}", "ad-1", HOUR + 40 * MINUTE_MS + i, ip=BURST_IP, cost_micros=2000)
        for i in range(3)
    ]
    events += [
        click(f"scrape{i}", "ad-2", HOUR + 30 * MINUTE_MS + i, ip="192.0.2.1", user_agent=SCRAPER)
        for i in range(6)  # no cost: priced at the ad's CPC, here none (0)
    ]
    events += [
        click(f"postman{i}", "ad-3", HOUR + 31 * MINUTE_MS + i, user_agent=POSTMAN, cost_micros=7)
        for i in range(5)
    ]
    events += [
        click(f"curl{i}", "ad-0", HOUR + 32 * MINUTE_MS + i, user_agent=CURL, cost_micros=9)
        for i in range(2)
    ]
    return events


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("replay"))
    events = sorted(traffic(), key=lambda e: e.ts_ms)  # on time: the stream judges them
    r.append(events)
    r.append(events[::9])  # copies: the stream and the batch count each once
    r.drain(r.worker())
    r.archive.flush()
    yield r
    r.close()


# -- the reference: the archived rows, judged here ----------------------------------------


def _patterns(text: bytes) -> list[str]:
    rules = {rule["id"]: rule for rule in tomllib.loads(text.decode())["rules"]}
    patterns: list[str] = rules["non-browser-client"]["params"]["patterns"]
    return patterns


NON_BROWSER = [re.compile(p) for p in _patterns(builtin_text())]
CRAWLERS = [
    re.compile(entry["pattern"])
    for entry in json.loads(
        (importlib.resources.files("crawleruseragents") / "crawler-user-agents.json").read_bytes()
    )
]


def winning_clicks(rig: Rig) -> list[dict[str, Any]]:
    """The first archived copy of each click id, in log order."""
    rows = ParquetArchiveReader(rig.archive_dir).decisions(start_ms=HOUR, end_ms=HOUR + HOUR_MS)
    seen: set[str] = set()
    winners = []
    for row in sorted(rows.to_pylist(), key=lambda r: (r["partition"], r["offset"])):
        if row["event_type"] == "click" and row["event_id"] not in seen:
            seen.add(row["event_id"])
            winners.append(row)
    return winners


def judge(
    clicks: list[dict[str, Any]], *, velocity: int, agents: list[re.Pattern[str]]
) -> set[str]:
    """The ids of the clicks the rules flag: more than ``velocity`` clicks of an address in
    a minute, or a user agent one of ``agents`` finds."""
    per_minute = Counter((c["ip"], c["ts_ms"] // MINUTE_MS) for c in clicks)
    return {
        c["event_id"]
        for c in clicks
        if per_minute[(c["ip"], c["ts_ms"] // MINUTE_MS)] > velocity
        or any(p.search(c["user_agent"] or "") for p in agents)
    }


def repeats(clicks: list[dict[str, Any]], window_ms: int = 30_000) -> set[str]:
    """The ids the built-in repeat-click rule flags: a visitor's (the user, else address and
    agent) click on an ad within ``window_ms`` of its counted one."""
    counted: dict[tuple[str, str], int] = {}
    out = set()
    for c in sorted(clicks, key=lambda c: c["ts_ms"]):
        who = c["user_id"] or (c["ip"] and c["user_agent"] and f"{c['ip']} {c['user_agent']}")
        if not who:
            continue
        anchor = counted.get((who, c["ad_id"]))
        if anchor is not None and c["ts_ms"] - anchor < window_ms:
            out.add(c["event_id"])
        else:
            counted[(who, c["ad_id"])] = c["ts_ms"]
    return out


def billable(
    clicks: list[dict[str, Any]], invalid: set[str], key: str
) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for c in clicks:
        n, spend = out.get(c[key], (0, 0))
        valid = c["event_id"] not in invalid
        out[c[key]] = (n + valid, spend + ((c["cost_micros"] or 0) if valid else 0))
    return out


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``, files with the digest of their bytes."""
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        )
        for path in sorted(root.rglob("*"))
    }


# -- the tests ------------------------------------------------------------------------------


def test_candidate_rules_report_exactly_what_they_would_change(rig: Rig, tmp_path: Path) -> None:
    clicks = winning_clicks(rig)
    assert {c["status"] for c in clicks} == {"counted", "invalid"}
    # Both keep the built-in repeat-click rule (the spread rule finds nothing: 4 ads).
    now_invalid = judge(clicks, velocity=60, agents=NON_BROWSER + CRAWLERS) | repeats(clicks)
    assert {c["event_id"] for c in clicks if c["status"] == "invalid"} <= now_invalid
    scraper = re.compile("^FooScraper/")
    later_invalid = judge(clicks, velocity=10, agents=[*CRAWLERS, scraper]) | repeats(clicks)

    rules_file = tmp_path / "candidate.toml"
    rules_file.write_text(CANDIDATE)
    before = tree(rig.root)
    heard: list[Progress] = []
    report = replay_rules(
        rig.settings,
        load_rules(rules_file),
        HOUR - 2 * HOUR_MS,
        HOUR + HOUR_MS,
        limit=1000,
        progress=heard.append,
    )
    assert tree(rig.root) == before  # nothing written, nothing created, nothing removed
    assert [p.hours_done for p in heard] == [1, 2, 3] and heard[-1].events == report.events

    for side, invalid in (("now", now_invalid), ("candidate", later_invalid)):
        for key, rows in (("ad_id", report.ads), ("advertiser_id", report.advertisers)):
            expected = billable(clicks, invalid, key)
            got = {
                getattr(r, key): (getattr(r, f"{side}_clicks"), getattr(r, f"{side}_spend_micros"))
                for r in rows
            }
            assert got == expected, (side, key)
    assert {ad.ad_id: ad.advertiser_id for ad in report.ads} == ADVERTISER
    for ad in report.ads:
        assert ad.delta_clicks == ad.candidate_clicks - ad.now_clicks
    assert report.total.delta_clicks == len(now_invalid) - len(later_invalid)

    flipped = now_invalid ^ later_invalid
    assert {f.event_id for f in report.flipped} == flipped
    assert report.flipped_total == len(flipped)
    assert {f.event_id.rstrip("0123456789") for f in report.flipped} == {
        "burst",
        "scrape",
        "postman",
    }
    for f in report.flipped:
        assert (f.now_reason is None) == (f.event_id in later_invalid)
        assert (f.candidate_reason is None) == (f.event_id in now_invalid)
        if f.event_id.startswith("burst"):
            assert f.ip == BURST_IP and f.candidate_reason is not None
            assert f.candidate_reason.startswith("ip-click-velocity: click burst from one")
            assert "25 clicks" in f.candidate_reason
        elif f.event_id.startswith("scrape"):
            assert f.user_agent == SCRAPER and f.candidate_reason is not None
            assert f.candidate_reason.startswith("scraper: scraping library: ")
        else:  # the stream's own verdict, from the built-in rule the candidate turns off
            assert f.now_reason is not None and f.now_reason.startswith("non-browser-client: ")

    limited = replay_rules(rig.settings, load_rules(rules_file), HOUR, HOUR + HOUR_MS, limit=3)
    assert limited.flipped == report.flipped[:3] and limited.flipped_total == len(flipped)


def test_the_current_rules_change_nothing(rig: Rig) -> None:
    report = replay_rules(rig.settings, load_rules(rig.settings.rules_file), HOUR, HOUR + 1)
    assert report.hours == 1 and report.flipped_total == 0 and report.flipped == []
    assert report.ads and not any(ad.changed for ad in report.ads)
    assert not any(adv.changed for adv in report.advertisers) and not report.total.changed
    clicks = winning_clicks(rig)
    now = judge(clicks, velocity=60, agents=NON_BROWSER + CRAWLERS) | repeats(clicks)
    expected = billable(clicks, now, "ad_id")
    assert {ad.ad_id: (ad.now_clicks, ad.now_spend_micros) for ad in report.ads} == expected


def test_an_empty_period_reports_nothing(rig: Rig) -> None:
    report = replay_rules(rig.settings, load_rules(None), HOUR + 5 * HOUR_MS, HOUR + 6 * HOUR_MS)
    assert (report.hours, report.events, report.ads, report.flipped_total) == (1, 0, [], 0)


def test_the_command_line_reports_and_refuses_rules_that_do_not_load(
    rig: Rig, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from clickagg.api.timefmt import iso
    from clickagg.cli.main import main

    rules_file = tmp_path / "candidate.toml"
    rules_file.write_text(CANDIDATE)
    since, until = iso(HOUR), iso(HOUR + HOUR_MS)
    before = tree(rig.root)
    command = ["rules", "replay", "--data-dir", str(rig.root), "--rules", str(rules_file)]
    period = ["--since", since, "--until", until]
    result = CliRunner().invoke(main, [*command, *period, "--format", "json", "--limit", "2"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    expected = replay_rules(rig.settings, load_rules(rules_file), HOUR, HOUR + HOUR_MS)
    assert body["flipped_total"] == expected.flipped_total and len(body["flipped"]) == 2
    assert body["total"]["delta_clicks"] == expected.total.delta_clicks
    assert body["since"] == since and body["until"] == until
    table = CliRunner().invoke(main, [*command, *period])
    assert table.exit_code == 0, table.output
    assert f"shown of {expected.flipped_total}" in table.stdout and "ad-1" in table.stdout
    assert tree(rig.root) == before

    rules_file.write_text(CANDIDATE.replace('kind = "ip_click_velocity"', 'kind = "velocity"'))
    bad = CliRunner().invoke(main, [*command, *period])
    assert bad.exit_code == 2 and "unknown kind 'velocity'" in bad.output, bad.output
    rules_file.write_text("include_builtin = \n")
    bad = CliRunner().invoke(main, [*command, *period])
    assert bad.exit_code == 2 and "not a TOML file" in bad.output, bad.output
