"""Declared crawlers and non-browser clients, matched once per distinct user agent."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from clickagg.core.rules.base import RuleError, RuleSpec
from clickagg.core.rules.loading import load_rules
from clickagg.core.rules.useragent import declared_crawler, non_browser_client
from clickagg.traffic import USER_AGENTS
from tests.core.rules.events import Hit, log_frame

GOOGLEBOT = "Googlebot/2.1 (+http://www.google.com/bot.html)"


def crawler_instances() -> list[str]:
    data = resources.files("crawleruseragents") / "crawler-user-agents.json"
    return [ua for entry in json.loads(data.read_bytes()) for ua in entry.get("instances", [])]


def builtin_rule(rule_id: str) -> RuleSpec:
    return next(r.spec for r in load_rules().rules if r.name == rule_id)


def test_every_listed_crawler_instance_is_flagged_and_no_browser_is() -> None:
    rule = declared_crawler(builtin_rule("declared-crawler"))
    instances = crawler_instances()
    assert len(instances) > 1000
    flagged = rule(log_frame([Hit(user_agent=ua) for ua in instances])).to_list()
    assert all(flagged)
    assert rule(log_frame([Hit(user_agent=ua) for ua in USER_AGENTS])).to_list() == [None] * 6


def test_the_evidence_is_the_agent_and_what_matched_mapped_back_to_every_event() -> None:
    rule = declared_crawler(builtin_rule("declared-crawler"))
    hits = [Hit(user_agent=GOOGLEBOT), Hit(user_agent=USER_AGENTS[0]), Hit(user_agent=None)]
    expected = [f'{GOOGLEBOT} matches "Googlebot/"', None, None]
    assert rule(log_frame(hits * 3)).to_list() == expected * 3


@pytest.mark.parametrize(
    ("agent", "token"),
    [
        ("curl/8.5.0", "curl/"),
        ("Wget/1.21.4", "Wget/"),
        ("python-requests/2.32.3", "python-requests/"),
        ("Go-http-client/2.0", "Go-http-client/"),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/124.0.0.0 Safari/537.36",
            "HeadlessChrome",
        ),
        ("Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 PhantomJS/2.1.1", "PhantomJS"),
    ],
)
def test_non_browser_clients_are_flagged(agent: str, token: str) -> None:
    rule = non_browser_client(builtin_rule("non-browser-client"))
    assert rule(log_frame([Hit(user_agent=agent)])).to_list() == [f'{agent} matches "{token}"']


def test_non_browser_patterns_do_not_flag_browsers() -> None:
    rule = non_browser_client(builtin_rule("non-browser-client"))
    assert rule(log_frame([Hit(user_agent=ua) for ua in USER_AGENTS])).null_count() == 6


def test_long_agents_are_cut_in_the_evidence() -> None:
    rule = non_browser_client(RuleSpec("n", "non_browser_client", "n", {"patterns": ["^curl"]}))
    [evidence] = rule(log_frame([Hit(user_agent="curl/" + "x" * 1000)])).to_list()
    assert len(evidence) < 250


def test_excluded_patterns_and_case_insensitive_matching() -> None:
    params = {"patterns": ["^curl/", "bot"], "exclude": ["bot"], "case_sensitive": False}
    rule = non_browser_client(RuleSpec("n", "non_browser_client", "n", params))
    hits = [Hit(user_agent="CURL/1"), Hit(user_agent="somebot")]
    assert rule(log_frame(hits)).to_list() == ['CURL/1 matches "CURL/"', None]


@pytest.mark.parametrize(
    "params",
    [{}, {"patterns": []}, {"patterns": ["(unclosed"]}, {"patterns": ["a"], "unknown": 1}],
)
def test_bad_patterns_are_an_error_naming_the_rule(params: dict[str, object]) -> None:
    with pytest.raises(RuleError, match="'ua'"):
        non_browser_client(RuleSpec("ua", "non_browser_client", "r", params))


def test_remembered_verdicts_give_the_same_answers_across_batches_and_after_clearing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("clickagg.core.rules.useragent.VERDICT_CACHE_AGENTS", 4)
    rule = declared_crawler(builtin_rule("declared-crawler"))
    agents = [GOOGLEBOT, *USER_AGENTS[:3], "curl/8.5.0", *USER_AGENTS[3:]]
    expected = [rule(log_frame([Hit(user_agent=ua)])).to_list()[0] for ua in agents]
    for start in range(len(agents)):  # batches that overlap, some beyond the cache's size
        batch = agents[start:] + agents[: start % 3]
        assert rule(log_frame([Hit(user_agent=ua) for ua in batch])).to_list() == [
            expected[agents.index(ua)] for ua in batch
        ]
