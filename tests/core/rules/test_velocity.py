"""Per-IP click velocity: exact only over every partition, so the batch layer applies it."""

from __future__ import annotations

import polars as pl

from clickagg.core.rules import RuleSet, RuleSpec, compile_rule

MINUTE = 60_000
T = 1_700_000_040_000 - 1_700_000_040_000 % MINUTE


def decisions(rows: list[tuple[str | None, int, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(ip, ts, kind, None) for ip, ts, kind in rows],
        schema={
            "ip": pl.String,
            "ts_ms": pl.Int64,
            "event_type": pl.String,
            "user_agent": pl.String,
        },
        orient="row",
    )


def test_every_click_of_an_address_over_the_limit_in_a_minute_is_flagged() -> None:
    rule = compile_rule(
        RuleSpec("burst", "ip_click_velocity", "burst", {"max_clicks_per_minute": 3})
    )
    rows = [("203.0.113.7", T + i, "click") for i in range(4)]  # 4 in one minute: flagged
    rows += [("203.0.113.7", T + MINUTE + i, "click") for i in range(3)]  # 3: not
    rows += [("198.51.100.1", T + i, "click") for i in range(2)]
    rows += [("203.0.113.7", T + 5, "impression"), (None, T, "click")]
    reasons = RuleSet((rule,)).batch_reasons(decisions(rows)).to_list()
    flagged = "burst: burst: ip 203.0.113.7: 4 clicks in minute "
    assert all(r is not None and r.startswith(flagged) for r in reasons[:4])
    assert reasons[4:] == [None] * 7  # impressions are never judged, nor unknown addresses
    assert RuleSet((rule,)).stream_rules == ()  # keyed: not applied per partition
