"""Tumbling one-minute event-time windows and the per-partition watermark.

All times are UTC epoch milliseconds. The watermark is the partition's max event time seen
minus the allowed lateness; an event older than the watermark (as it stood when the event
was read, the event itself included) is late.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
NO_EVENT_MS = -(2**62)  # max event time of a partition that has seen nothing


def minute_start(ts_ms: int) -> int:
    return ts_ms - ts_ms % MINUTE_MS


def window_start(ts_ms: int, size_ms: int) -> int:
    return ts_ms - ts_ms % size_ms


def late_mask(
    ts_ms: npt.NDArray[np.int64], *, max_event_ms: int, allowed_lateness_ms: int
) -> tuple[npt.NDArray[np.bool_], int]:
    """Which events are late, read in order after a partition max of ``max_event_ms``.

    Returns the mask and the new max event time. Vectorized: the running max of event time
    is what the watermark was when each event arrived.
    """
    if len(ts_ms) == 0:
        return np.zeros(0, dtype=np.bool_), max_event_ms
    running_max = np.maximum.accumulate(np.maximum(ts_ms, max_event_ms))
    late = ts_ms < running_max - allowed_lateness_ms
    return late, int(running_max[-1])
