"""The demo's traffic against every built-in rule, as the batch layer applies them over
whole hours (the stream's stage-1 rules and keyed stage give the same verdicts): its
crawler and script clicks and its one-address burst are all flagged, with the right rule,
and its ordinary clicks almost never (the false-positive guard: under 0.5 %)."""

from __future__ import annotations

from collections import Counter

import msgspec
import polars as pl

from clickagg.cli.demo import DEMO_MIX
from clickagg.core.rules.loading import load_rules
from clickagg.traffic import TrafficGenerator

SECONDS, RATE, TICK_MS = 30, 2_000, 200  # the demo's defaults
START_MS = 1_764_547_200_000  # 2025-12-01T00:00Z


def demo_events() -> pl.DataFrame:
    """What ``clickagg demo`` posts (same mix, same pacing), decoded, copies merged."""
    generator = TrafficGenerator(mix=DEMO_MIX)
    per_tick = RATE * TICK_MS // 1000
    seen: dict[str, dict[str, object]] = {}
    for tick in range(SECONDS * 1000 // TICK_MS):
        body = generator.ndjson(per_tick, START_MS + tick * TICK_MS)
        for line in body.splitlines():
            event = msgspec.json.decode(line)
            if "event_id" in event:  # malformed lines (on purpose) have none
                seen.setdefault(event["event_id"], event)
    rows = [
        {
            "event_type": e["event_type"],
            "event_id": e["event_id"],
            "user_id": e.get("user_id"),
            "ip": e.get("ip"),
            "user_agent": e.get("user_agent"),
            "device": None,
            "ad_id": e["ad_id"],
            "ts_ms": e["timestamp"],
        }
        for e in seen.values()
    ]
    return pl.DataFrame(rows).sort("ts_ms")


def test_the_demos_invalid_traffic_is_flagged_and_its_ordinary_traffic_is_not() -> None:
    events = demo_events()
    reasons = load_rules(None).batch_reasons(events)
    clicks = events.with_columns(
        reasons.str.extract(r"^([^:]+):", 1).alias("rule"),
        pl.col("event_id").str.slice(0, 2).alias("kind"),
    ).filter(pl.col("event_type") == "click")
    by_kind: Counter[tuple[str, str | None]] = Counter(
        (kind, rule) for kind, rule in clicks.select("kind", "rule").iter_rows()
    )
    bots = sum(n for (kind, _), n in by_kind.items() if kind == "b-")
    bursts = sum(n for (kind, _), n in by_kind.items() if kind == "x-")
    ordinary = sum(n for (kind, _), n in by_kind.items() if kind == "c-")
    assert bots > 100 and bursts > 500 and ordinary > 1_000
    # Every crawler or script click by an agent rule, every burst click by velocity.
    assert by_kind[("b-", "declared-crawler")] + by_kind[("b-", "non-browser-client")] == bots
    assert by_kind[("x-", "ip-click-velocity")] == bursts
    flagged = sum(n for (kind, rule), n in by_kind.items() if kind == "c-" and rule is not None)
    assert flagged / ordinary < 0.005, by_kind
