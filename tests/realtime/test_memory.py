"""In-process real-time counters: sums per sliding window, forgetting beyond the hour."""

from __future__ import annotations

import pyarrow as pa

from clickagg.core.aggregate import MINUTE_SCHEMA
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.realtime.memory import InMemoryCounters

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS


def deltas(*rows: tuple[str, int, int, int]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "ad_id": ad,
                "minute_ms": minute,
                "advertiser_id": "unknown",
                "campaign_id": "unknown",
                "clicks": clicks,
                "impressions": imps,
                "spend_micros": clicks * 10,
                "invalid_clicks": 0,
                "user_hashes": [],
            }
            for ad, minute, clicks, imps in rows
        ],
        schema=MINUTE_SCHEMA,
    )


def test_windows_sum_the_minutes_inside() -> None:
    counters = InMemoryCounters()
    counters.apply(deltas(("a", T0, 1, 10), ("a", T0 + MINUTE_MS, 2, 20), ("b", T0, 5, 0)))
    counters.apply(deltas(("a", T0 + MINUTE_MS, 3, 0)))
    both = counters.window(ad_id="a", start_ms=T0, end_ms=T0 + 2 * MINUTE_MS)
    assert (both.clicks, both.impressions, both.spend_micros) == (6, 30, 60)
    last = counters.window(ad_id="a", start_ms=T0 + MINUTE_MS, end_ms=T0 + 2 * MINUTE_MS)
    assert last.clicks == 5
    assert counters.window(ad_id="zzz", start_ms=0, end_ms=T0 * 2).clicks == 0


def test_minutes_older_than_the_retained_span_are_forgotten() -> None:
    counters = InMemoryCounters(retain_ms=10 * MINUTE_MS)
    counters.apply(deltas(("a", T0, 1, 0)))
    counters.apply(deltas(("a", T0 + 30 * MINUTE_MS, 1, 0)))
    assert counters.window(ad_id="a", start_ms=0, end_ms=T0 * 2).clicks == 1
