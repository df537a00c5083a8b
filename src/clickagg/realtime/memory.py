"""In-process real-time counters: per ad, per minute, for the last hour or so.

A dict lookup and a sum over at most ~60 minute cells answers a sliding window, where the
store would scan minute rows: the embedded default of the role Redis plays at scale.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping

import pyarrow as pa

from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.store.base import FencedError, Totals

_CLICKS, _IMPRESSIONS, _SPEND, _INVALID = range(4)
# What the counters keep of a round's minute deltas (``MINUTE_SCHEMA``'s sums).
SUM_COLUMNS = ("ad_id", "minute_ms", "clicks", "impressions", "spend_micros", "invalid_clicks")


def advance(applied: dict[int, int], offsets: Mapping[int, tuple[int, int]]) -> bool:
    """The sink fence of the round commit, shared by every in-memory copy of the counts:
    move ``applied`` to the ends of ``offsets`` and return True when the round continues
    every partition's applied offset (a partition never applied accepts any start); return
    False, changing nothing, when every range is already applied (a redo); raise
    FencedError, changing nothing, otherwise (a gap, or half applied)."""
    if all(applied.get(p, lo) >= hi for p, (lo, hi) in offsets.items()):
        return False
    stale = {p: applied[p] for p, (lo, _) in offsets.items() if applied.get(p, lo) != lo}
    if stale:
        raise FencedError(
            "; ".join(
                f"partition {p}: counters hold up to {at}, deltas start at {offsets[p][0]}"
                for p, at in stale.items()
            ),
            list(stale),
        )
    for p, (_, hi) in offsets.items():
        applied[p] = hi
    return True


class InMemoryCounters:
    def __init__(self, *, retain_ms: int = HOUR_MS + 2 * MINUTE_MS) -> None:
        self.retain_ms = retain_ms
        self._cells: dict[str, dict[int, list[int]]] = defaultdict(dict)
        self._newest_minute = 0
        self._offsets: dict[int, int] = {}
        self._lock = threading.Lock()  # applied by the stream loop, read by query threads

    def applied_offsets(self) -> dict[int, int]:
        with self._lock:
            return dict(self._offsets)

    def apply(self, minute_deltas: pa.Table, offsets: Mapping[int, tuple[int, int]]) -> bool:
        columns = minute_deltas.select(list(SUM_COLUMNS)).to_pydict()
        rows = zip(*columns.values(), strict=True)
        with self._lock:
            if not advance(self._offsets, offsets):
                return False  # a redo of what these counters already hold
            if minute_deltas.num_rows == 0:
                return True
            for ad_id, minute, clicks, impressions, spend, invalid in rows:
                cell = self._cells[ad_id].get(minute)
                if cell is None:
                    self._cells[ad_id][minute] = [clicks, impressions, spend, invalid]
                else:
                    cell[_CLICKS] += clicks
                    cell[_IMPRESSIONS] += impressions
                    cell[_SPEND] += spend
                    cell[_INVALID] += invalid
            newest = max(columns["minute_ms"])
            if newest > self._newest_minute + MINUTE_MS:
                self._newest_minute = newest
                self._forget_before(newest - self.retain_ms)
        return True

    def _forget_before(self, minute_ms: int) -> None:
        for ad_id in list(self._cells):
            minutes = self._cells[ad_id]
            for minute in [m for m in minutes if m < minute_ms]:
                del minutes[minute]
            if not minutes:
                del self._cells[ad_id]

    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        sums = [0, 0, 0, 0]
        with self._lock:
            for minute, cell in self._cells.get(ad_id, {}).items():
                if start_ms <= minute < end_ms:
                    for index in range(4):
                        sums[index] += cell[index]
        return Totals(
            clicks=sums[_CLICKS],
            impressions=sums[_IMPRESSIONS],
            spend_micros=sums[_SPEND],
            unique_users=0,
            invalid_clicks=sums[_INVALID],
        )
