"""Window math and the watermark's late mask."""

from __future__ import annotations

import numpy as np

from clickagg.core.windows import MINUTE_MS, NO_EVENT_MS, late_mask, minute_start, window_start


def test_minute_and_window_starts() -> None:
    assert minute_start(125_000) == 120_000
    assert window_start(3 * 3_600_000 + 5, 3_600_000) == 3 * 3_600_000


def test_late_is_relative_to_the_running_max_including_earlier_events_of_the_batch() -> None:
    ts = np.array([10, 20, 14, 15, 9], dtype=np.int64) * MINUTE_MS
    late, new_max = late_mask(ts, max_event_ms=NO_EVENT_MS, allowed_lateness_ms=5 * MINUTE_MS)
    assert late.tolist() == [False, False, True, False, True]
    assert new_max == 20 * MINUTE_MS
    again, same = late_mask(
        np.array([15 * MINUTE_MS], dtype=np.int64),
        max_event_ms=new_max,
        allowed_lateness_ms=5 * MINUTE_MS,
    )
    assert again.tolist() == [False] and same == new_max


def test_empty_batch_keeps_the_max() -> None:
    late, new_max = late_mask(np.zeros(0, dtype=np.int64), max_event_ms=7, allowed_lateness_ms=1)
    assert late.size == 0 and new_max == 7
