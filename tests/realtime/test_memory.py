"""In-process real-time counters: sums per sliding window, forgetting beyond the hour."""

from __future__ import annotations

import pyarrow as pa
import pytest

from clickagg.core.aggregate import MINUTE_SCHEMA
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.realtime.memory import InMemoryCounters
from clickagg.store.base import FencedError

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
                "users": None,
            }
            for ad, minute, clicks, imps in rows
        ],
        schema=MINUTE_SCHEMA,
    )


def test_windows_sum_the_minutes_inside() -> None:
    counters = InMemoryCounters()
    counters.apply(
        deltas(("a", T0, 1, 10), ("a", T0 + MINUTE_MS, 2, 20), ("b", T0, 5, 0)), {0: (0, 3)}
    )
    counters.apply(deltas(("a", T0 + MINUTE_MS, 3, 0)), {0: (3, 4)})
    both = counters.window(ad_id="a", start_ms=T0, end_ms=T0 + 2 * MINUTE_MS)
    assert (both.clicks, both.impressions, both.spend_micros) == (6, 30, 60)
    last = counters.window(ad_id="a", start_ms=T0 + MINUTE_MS, end_ms=T0 + 2 * MINUTE_MS)
    assert last.clicks == 5
    assert counters.window(ad_id="zzz", start_ms=0, end_ms=T0 * 2).clicks == 0


def test_minutes_older_than_the_retained_span_are_forgotten() -> None:
    counters = InMemoryCounters(retain_ms=10 * MINUTE_MS)
    counters.apply(deltas(("a", T0, 1, 0)), {0: (0, 1)})
    counters.apply(deltas(("a", T0 + 30 * MINUTE_MS, 1, 0)), {0: (1, 2)})
    assert counters.window(ad_id="a", start_ms=0, end_ms=T0 * 2).clicks == 1


def test_apply_is_fenced_and_idempotent_by_offsets() -> None:
    """The sink contract of the round commit: a redo never doubles, a gap is refused."""
    counters = InMemoryCounters()
    assert counters.apply(deltas(("a", T0, 1, 0)), {0: (0, 10), 1: (0, 4)})
    assert counters.apply(deltas(("a", T0, 2, 0)), {0: (10, 20)})
    # the same round again (a crash between the store commit and the counters): ignored
    assert not counters.apply(deltas(("a", T0, 2, 0)), {0: (10, 20)})
    assert not counters.apply(deltas(("a", T0, 1, 0)), {0: (0, 10), 1: (0, 4)})
    with pytest.raises(FencedError) as gap:  # offsets 20..30 of partition 0 never came
        counters.apply(deltas(("a", T0, 5, 0)), {0: (30, 40)})
    assert gap.value.partitions == (0,)
    with pytest.raises(FencedError):  # half applied, half new: refused whole
        counters.apply(deltas(("a", T0, 5, 0)), {0: (20, 25), 1: (2, 6)})
    assert counters.window(ad_id="a", start_ms=T0, end_ms=T0 + MINUTE_MS).clicks == 3
    assert counters.applied_offsets() == {0: 20, 1: 4}
    # an empty round still moves the offsets: the next round continues from it
    assert counters.apply(deltas(), {0: (20, 25), 1: (4, 6)})
    assert counters.apply(deltas(("a", T0, 1, 0)), {0: (25, 26)})
    assert counters.window(ad_id="a", start_ms=T0, end_ms=T0 + MINUTE_MS).clicks == 4
