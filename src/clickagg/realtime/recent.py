"""The recent minutes of every ad, in memory: what the API process answers itself.

A replica of the worker's per-ad minute rows for the last ``RECENT_SPAN_MS``: sums,
unique-user sketches and owners, kept by the worker's feed (``clickagg.realtime.feed``).
Dashboards ask mostly about the last hour; answering those queries here takes them off
the worker process, whose GIL the stream needs, and a dict lookup plus a walk over at most
~70 minute cells is far cheaper than a DuckDB scan of every ad's recent rows.

Exactness: the rows start from the store's own minute rows and offsets, read in one
snapshot, and every round committed after it is added once (the counters' fence,
:func:`clickagg.realtime.memory.advance`), so the sums are the store's at the applied
offsets. Unique users are DataSketches HLL unions of the same sketches the store merges
(the estimate is the store's within the sketch's error bound; identical in the exact
range, where most minute rows are). Minutes before ``complete_since_ms`` may be missing
(before the snapshot, or forgotten): a range that starts earlier is not answered here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pyarrow as pa

from clickagg.core import hll
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.realtime.memory import advance
from clickagg.store.base import AggregateRow, Totals

# The last hour that dashboards ask for, plus room for event times a little ahead of the
# clock (the span is counted back from the newest minute seen).
RECENT_SPAN_MS = HOUR_MS + 10 * MINUTE_MS
_MERGE_AT = 16  # a cell's sketches are merged into one when it holds this many
_COLUMNS = (
    "ad_id",
    "minute_ms",
    "clicks",
    "impressions",
    "spend_micros",
    "invalid_clicks",
    "users",
)


class _Cell:
    __slots__ = ("clicks", "impressions", "invalid_clicks", "sketches", "spend_micros", "users")

    def __init__(self) -> None:
        self.clicks = self.impressions = self.spend_micros = self.invalid_clicks = 0
        self.sketches: list[bytes] = []
        # The estimate of the sketches, kept until a new sketch arrives: a minute's sketch
        # stops changing once the minute is past, and a busy ad's (4 KiB, HLL mode) costs
        # tens of µs to merge and read, for each of the 60 minutes of every query.
        self.users: int | None = 0

    def add_sketch(self, sketch: bytes) -> None:
        self.sketches.append(sketch)
        self.users = None
        if len(self.sketches) >= _MERGE_AT:
            self.merged_sketches()

    def merged_sketches(self) -> list[bytes]:
        if len(self.sketches) > 1:
            self.sketches = [hll.union(self.sketches)]
        return self.sketches

    def unique_users(self) -> int:
        if self.users is None:
            sketches = self.merged_sketches()
            self.users = hll.estimate(sketches[0]) if sketches else 0
        return self.users


def _ceil(value: int, size: int) -> int:
    return -(-value // size) * size


class RecentMinutes:
    def __init__(self, *, since_ms: int, span_ms: int = RECENT_SPAN_MS) -> None:
        self.span_ms = span_ms
        self.complete_since_ms = since_ms  # every minute from here on is whole
        self._cells: dict[str, dict[int, _Cell]] = {}
        self._offsets: dict[int, int] = {}
        self._newest_minute = 0
        self._lock = threading.Lock()

    def applied_offsets(self) -> dict[int, int]:
        with self._lock:
            return dict(self._offsets)

    def covers(self, start_ms: int) -> bool:
        return start_ms >= self.complete_since_ms

    def apply(self, rows: pa.Table, offsets: Mapping[int, tuple[int, int]]) -> bool:
        """Add minute rows (``MINUTE_SCHEMA``; owners unused, missing ``users``: none) of
        the offset ranges ``offsets``, fenced like the counters. False: a redo."""
        names = rows.schema.names
        columns = [
            rows[name].to_pylist() if name in names else [None] * rows.num_rows for name in _COLUMNS
        ]
        with self._lock:
            if not advance(self._offsets, offsets):
                return False
            newest = self._newest_minute
            for ad_id, minute, clicks, impressions, spend, invalid, users in zip(
                *columns, strict=True
            ):
                minutes = self._cells.get(ad_id)
                if minutes is None:
                    minutes = self._cells[ad_id] = {}
                cell = minutes.get(minute)
                if cell is None:
                    cell = minutes[minute] = _Cell()
                cell.clicks += clicks
                cell.impressions += impressions
                cell.spend_micros += spend
                cell.invalid_clicks += invalid
                if users is not None:
                    cell.add_sketch(users)
                newest = max(newest, minute)
            if newest > self._newest_minute + MINUTE_MS:
                self._forget_before(newest - self.span_ms)
                self._newest_minute = newest
        return True

    def _forget_before(self, minute_ms: int) -> None:
        if minute_ms <= self.complete_since_ms:
            return
        self.complete_since_ms = minute_ms
        for ad_id in list(self._cells):
            minutes = self._cells[ad_id]
            for minute in [m for m in minutes if m < minute_ms]:
                del minutes[minute]
            if not minutes:
                del self._cells[ad_id]

    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        """The real-time counters' answer: sums over minutes in [start_ms, end_ms)."""
        return self.totals(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms, unique_users=False)

    def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        """``QueryStore.totals`` over minutes in [start_ms, end_ms)."""
        sums = [0, 0, 0, 0]
        sketches: list[bytes] = []
        with self._lock:
            for minute, cell in self._cells.get(ad_id, {}).items():
                if start_ms <= minute < end_ms:
                    sums[0] += cell.clicks
                    sums[1] += cell.impressions
                    sums[2] += cell.spend_micros
                    sums[3] += cell.invalid_clicks
                    if unique_users:
                        sketches.extend(cell.merged_sketches())
        users = 0
        if sketches:
            users = hll.estimate(sketches[0] if len(sketches) == 1 else hll.union(sketches))
        return Totals(
            clicks=sums[0],
            impressions=sums[1],
            spend_micros=sums[2],
            unique_users=users,
            invalid_clicks=sums[3],
        )

    def minutes(self, *, ad_id: str, start_ms: int, end_ms: int) -> list[AggregateRow]:
        """``QueryStore.aggregates`` by minute without ``group_by``: the rows of minutes
        starting in [start_ms, end_ms), the bounds rounded up to whole minutes as the
        store does."""
        lo, hi = _ceil(start_ms, MINUTE_MS), _ceil(end_ms, MINUTE_MS)
        found: list[tuple[int, int, int, int, int, int]] = []
        with self._lock:
            for minute, cell in self._cells.get(ad_id, {}).items():
                if lo <= minute < hi:
                    found.append(
                        (
                            minute,
                            cell.clicks,
                            cell.impressions,
                            cell.spend_micros,
                            cell.invalid_clicks,
                            cell.unique_users(),
                        )
                    )
        found.sort(key=lambda row: row[0])
        return [
            AggregateRow(
                window_ms=minute,
                group=None,
                clicks=clicks,
                impressions=impressions,
                spend_micros=spend,
                unique_users=users,
                invalid_clicks=invalid,
            )
            for minute, clicks, impressions, spend, invalid, users in found
        ]
