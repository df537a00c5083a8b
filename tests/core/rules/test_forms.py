"""The stream form (in the processor) and the batch form (over archived decisions) agree."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core import fates, ids
from clickagg.core.processor import PartitionProcessor, PartitionState
from clickagg.core.rules.base import RuleSet, RuleSpec
from clickagg.core.rules.loading import load_rules
from clickagg.core.rules.registry import compile_rules
from clickagg.core.windows import MINUTE_MS
from clickagg.traffic import USER_AGENTS
from tests.core.rules.events import T0, Hit, log_frame

AGENTS = [
    *USER_AGENTS[:3],
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    None,
]
IPS = ["203.0.113.7", "203.0.114.1", "198.51.100.9", "2001:db8:bad::2", "2001:db8::1", None]


def rules() -> RuleSet:
    blocklist = RuleSpec(
        "blocklist",
        "ip_blocklist",
        "blocklisted address",
        {
            "lists": [
                {"name": "datacenter-aws", "cidrs": ["203.0.113.0/24"]},
                {"name": "abuse", "cidrs": ["2001:db8:bad::/48", "198.51.100.9"]},
            ]
        },
        effective_from_ms=T0 + 2 * MINUTE_MS,
    )
    builtin = load_rules()
    return RuleSet(rules=(*builtin.rules, *compile_rules([blocklist])))


hits = st.builds(
    Hit,
    user_agent=st.sampled_from(AGENTS),
    ip=st.sampled_from(IPS),
    event_type=st.sampled_from([ids.CLICK, ids.IMPRESSION]),
    ts_ms=st.integers(0, 4 * MINUTE_MS).map(lambda d: T0 + d),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(hits, min_size=1, max_size=80), st.integers(1, 80))
def test_the_batch_form_on_archived_decisions_gives_the_stream_reasons(
    events: list[Hit], batch: int
) -> None:
    # The rules the stream applies: a keyed rule's verdict needs more than one micro-batch.
    ruleset = RuleSet(rules().stream_rules)
    processor = PartitionProcessor(
        PartitionState.empty(0),
        allowed_lateness_ms=10 * MINUTE_MS,
        dedup_horizon_ms=30 * MINUTE_MS,
        rules=ruleset.rules,
    )
    decided = []
    for start in range(0, len(events), batch):
        outcome = processor.process(log_frame(events[start : start + batch], base_offset=start))
        assert outcome is not None
        decided.append(outcome.decisions)
    decisions = pl.concat([pl.from_arrow(t) for t in decided])  # type: ignore[misc]
    assert isinstance(decisions, pl.DataFrame)
    assert decisions.height == len(events)
    batch_reasons = ruleset.batch_reasons(decisions).to_list()
    for row, batch_reason, hit in zip(
        decisions.iter_rows(named=True), batch_reasons, events, strict=True
    ):
        assert row["status"] in (fates.COUNTED, fates.INVALID)  # no copies, nothing late
        assert row["reason"] == batch_reason
        assert (row["status"] == fates.INVALID) == (batch_reason is not None)
        if hit.event_type == ids.IMPRESSION:
            assert batch_reason is None  # only clicks are judged
        if batch_reason is not None:
            assert batch_reason.split(": ", 1)[0] in ruleset.ids


def test_reasons_name_the_rule_and_its_evidence_and_clicks_are_not_billed() -> None:
    # The rules the stream applies: a keyed rule's verdict needs more than one micro-batch.
    ruleset = RuleSet(rules().stream_rules)
    processor = PartitionProcessor(
        PartitionState.empty(0),
        allowed_lateness_ms=10 * MINUTE_MS,
        dedup_horizon_ms=30 * MINUTE_MS,
        rules=ruleset.rules,
    )
    late_enough = T0 + 3 * MINUTE_MS
    events = [
        Hit(user_agent=AGENTS[3]),
        Hit(user_agent="curl/8.5.0"),
        Hit(user_agent=USER_AGENTS[0], ip="203.0.113.7"),  # before the blocklist's time
        Hit(user_agent=USER_AGENTS[0], ip="203.0.113.7", ts_ms=late_enough),
        Hit(user_agent=USER_AGENTS[0], ip="203.0.113.7", event_type=ids.IMPRESSION),
        Hit(user_agent=USER_AGENTS[1], ip="192.0.2.1"),
    ]
    outcome = processor.process(log_frame(events))
    assert outcome is not None
    rows = outcome.decisions.to_pylist()
    assert [r["reason"] for r in rows] == [
        "declared-crawler: declared bot or crawler: "
        'Googlebot/2.1 (+http://www.google.com/bot.html) matches "Googlebot/"',
        'non-browser-client: HTTP library, tool or automated browser: curl/8.5.0 matches "curl/"',
        None,
        "blocklist: blocklisted address: 203.0.113.7 in datacenter-aws 203.0.113.0/24",
        None,
        None,
    ]
    assert [r["spend_micros"] for r in rows] == [0, 0, 1000, 0, 0, 1000]
    assert outcome.invalid == 3
    [minute] = [r for r in outcome.minute_deltas.to_pylist() if r["minute_ms"] == T0]
    assert (minute["clicks"], minute["invalid_clicks"], minute["spend_micros"]) == (2, 2, 2000)
