"""The recent minutes and hours of every ad, in memory: what the API process answers itself.

A replica of the worker's per-ad minute rows for the last ``RECENT_SPAN_MS`` and hour rows
for the last ``RECENT_HOURS_MS``: sums and unique-user sketches, kept by the worker's feed
(``clickagg.realtime.feed``). Dashboards ask mostly about the last hour by minute and the
last day by hour; answering those queries here takes them off the worker process, whose
GIL the stream needs, and a dict lookup plus a walk over at most ~70 minute or ~26 hour
cells is far cheaper than a DuckDB scan of every ad's recent rows.

Exactness: the rows start from the store's own minute rows and offsets, read in one
snapshot, and every round committed after it is added once (the counters' fence,
:func:`clickagg.realtime.memory.advance`), so the sums are the store's at the applied
offsets. Unique users are DataSketches HLL unions of the same sketches the store merges
(the estimate is the store's within the sketch's error bound; identical in the exact
range, where most minute rows are). Minutes before ``complete_since_ms`` may be missing
(before the snapshot, or forgotten): a range that starts earlier is not answered here.

Hours: the snapshot's hour rows (the day before its minutes), then every minute row the
snapshot and the rounds carry, added to its hour as well as to its minute. Hours before
``hours_complete_since_ms`` (None: the snapshot had none) are not answered here.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Literal

import pyarrow as pa

from clickagg.core import hll
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.query.base import HeldCells
from clickagg.realtime.memory import advance
from clickagg.store.base import AggregateRow, Totals

# The last hour that dashboards ask for, plus room for event times a little ahead of the
# clock (the span is counted back from the newest minute seen).
RECENT_SPAN_MS = HOUR_MS + 10 * MINUTE_MS
# The last day by hour: 24 hours before the current one, plus one for event times ahead.
RECENT_HOURS_MS = 26 * HOUR_MS
_MERGE_AT = 16  # a cell's sketches are merged into one when it holds this many
# Minutes this far behind the newest, and hours before the previous one, are sealed (one
# compact sketch each; a late sketch may still arrive and is added as usual), at most
# _SEAL_PER_APPLY cells per round so that no round holds the lock for long.
_SEAL_AFTER_MS = 10 * MINUTE_MS
_SEAL_PER_APPLY = 128
_COLUMNS = (
    "ad_id",
    "minute_ms",
    "clicks",
    "impressions",
    "spend_micros",
    "invalid_clicks",
    "users",
)


class _Tally:
    """How many cells of one granularity are held and the bytes of their sketches, kept as
    cells are added, merged, sealed and forgotten: ``/metrics`` reads them without walking
    every cell (a day of hours is hundreds of thousands) under the lock queries take."""

    __slots__ = ("cells", "sketch_bytes")

    def __init__(self) -> None:
        self.cells = self.sketch_bytes = 0


class _Cell:
    __slots__ = (
        "clicks",
        "impressions",
        "invalid_clicks",
        "sketches",
        "spend_micros",
        "tally",
        "users",
    )

    def __init__(self, tally: _Tally) -> None:
        self.clicks = self.impressions = self.spend_micros = self.invalid_clicks = 0
        self.sketches: list[bytes] = []
        self.tally = tally
        tally.cells += 1
        # The estimate of the sketches, kept until a new sketch arrives: a minute's sketch
        # stops changing once the minute is past, and a busy ad's (4 KiB, HLL mode) costs
        # tens of µs to merge and read, for each of the 60 minutes of every query.
        self.users: int | None = 0

    def add_sketch(self, sketch: bytes) -> None:
        self.sketches.append(sketch)
        self.tally.sketch_bytes += len(sketch)
        self.users = None
        if len(self.sketches) >= _MERGE_AT:
            self.merged_sketches()

    def merged_sketches(self) -> list[bytes]:
        if len(self.sketches) > 1:
            self._replace_sketches([hll.union(self.sketches)])
        return self.sketches

    def _replace_sketches(self, sketches: list[bytes]) -> None:
        self.tally.sketch_bytes += _size(sketches) - _size(self.sketches)
        self.sketches = sketches

    def forget(self) -> None:
        """Take the cell out of its tally (it is no longer held)."""
        self.tally.cells -= 1
        self.tally.sketch_bytes -= _size(self.sketches)

    def unique_users(self) -> int:
        if self.users is None:
            sketches = self.merged_sketches()
            self.users = hll.estimate(sketches[0]) if sketches else 0
        return self.users

    def seal(self) -> None:
        """Keep one compact sketch: a closed minute or hour rarely changes again, and the
        per-round sketches of a busy one (up to 15, 4 KiB each) would otherwise stay."""
        if self.sketches:
            users = self.unique_users()  # merged first; the estimate stays the same
            self._replace_sketches([hll.compact(self.sketches[0])])
            self.users = users


def _size(sketches: list[bytes]) -> int:
    return sum(len(sketch) for sketch in sketches)


def _ceil(value: int, size: int) -> int:
    return -(-value // size) * size


def _forget(cells: dict[str, dict[int, _Cell]], before_ms: int) -> None:
    for ad_id in list(cells):
        windows = cells[ad_id]
        for start in [t for t in windows if t < before_ms]:
            windows.pop(start).forget()
        if not windows:
            del cells[ad_id]


def _row(window_ms: int, cells: list[_Cell]) -> AggregateRow:
    """One window's row from the cells it holds (one cell: its cached estimate)."""
    if len(cells) == 1:
        users = cells[0].unique_users()
    else:
        sketches = [sketch for cell in cells for sketch in cell.merged_sketches()]
        users = hll.estimate(hll.union(sketches)) if sketches else 0
    return AggregateRow(
        window_ms=window_ms,
        group=None,
        clicks=sum(cell.clicks for cell in cells),
        impressions=sum(cell.impressions for cell in cells),
        spend_micros=sum(cell.spend_micros for cell in cells),
        unique_users=users,
        invalid_clicks=sum(cell.invalid_clicks for cell in cells),
    )


class RecentAggregates:
    def __init__(
        self,
        *,
        since_ms: int,
        hours_since_ms: int | None = None,
        span_ms: int = RECENT_SPAN_MS,
        hours_span_ms: int = RECENT_HOURS_MS,
    ) -> None:
        self.span_ms = span_ms
        self.hours_span_ms = hours_span_ms
        self.complete_since_ms = since_ms  # every minute from here on is whole
        self.hours_complete_since_ms = hours_since_ms  # likewise every hour; None: no hours
        self._cells: dict[str, dict[int, _Cell]] = {}
        self._hours: dict[str, dict[int, _Cell]] = {}
        self._minute_tally, self._hour_tally = _Tally(), _Tally()
        self._offsets: dict[int, int] = {}
        self._newest_minute = 0
        self._newest_hour = 0
        # Cells to seal (hours?, ad, start), and where the next ones to queue begin.
        self._unsealed: deque[tuple[bool, str, int]] = deque()
        self._seal_minutes_from = since_ms - since_ms % MINUTE_MS
        self._seal_hours_from = hours_since_ms
        self._lock = threading.Lock()

    def applied_offsets(self) -> dict[int, int]:
        with self._lock:
            return dict(self._offsets)

    def covers(self, start_ms: int) -> bool:
        return start_ms >= self.complete_since_ms

    def covers_windows(self, start_ms: int, size_ms: int) -> bool:
        """Whether windows of ``size_ms`` (an hour or a day) from ``start_ms`` on (rounded
        up to the size, as the store does) are held whole."""
        since = self.hours_complete_since_ms
        return since is not None and _ceil(start_ms, size_ms) >= since

    def apply(
        self,
        rows: pa.Table,
        offsets: Mapping[int, tuple[int, int]],
        hours: pa.Table | None = None,
    ) -> bool:
        """Add minute rows (``MINUTE_SCHEMA``; owners unused, missing ``users``: none) of
        the offset ranges ``offsets``, fenced like the counters, to their minutes and their
        hours; and the snapshot's ``hours`` (rows whose ``minute_ms`` is their hour) to
        their hours. False: a redo."""
        columns = _columns(rows)
        hour_columns = None if hours is None else _columns(hours)
        track_hours = self.hours_complete_since_ms is not None
        add_minute = partial(_add, self._cells, self._minute_tally)
        add_hour = partial(_add, self._hours, self._hour_tally)
        with self._lock:
            if not advance(self._offsets, offsets):
                return False
            newest = self._newest_minute
            for ad_id, minute, clicks, impressions, spend, invalid, users in zip(
                *columns, strict=True
            ):
                add_minute(ad_id, minute, clicks, impressions, spend, invalid, users)
                if track_hours:
                    hour = minute - minute % HOUR_MS
                    add_hour(ad_id, hour, clicks, impressions, spend, invalid, users)
                newest = max(newest, minute)
            if hour_columns is not None:
                for ad_id, hour, clicks, impressions, spend, invalid, users in zip(
                    *hour_columns, strict=True
                ):
                    add_hour(ad_id, hour, clicks, impressions, spend, invalid, users)
            if newest > self._newest_minute + MINUTE_MS:
                self._forget_before(newest - self.span_ms)
                self._newest_minute = newest
            newest_hour = newest - newest % HOUR_MS
            if track_hours and newest_hour > self._newest_hour:
                self._forget_hours_before(newest_hour - self.hours_span_ms + HOUR_MS)
                self._newest_hour = newest_hour
            self._queue_closed()
            self._seal(_SEAL_PER_APPLY)
        return True

    def _queue_closed(self) -> None:
        """Queue the cells that closed since the last call (and any the snapshot held)."""
        until = self._newest_minute - _SEAL_AFTER_MS
        if until > self._seal_minutes_from:
            self._queue(False, self._cells, self._seal_minutes_from, until, self.span_ms)
            self._seal_minutes_from = until
        hours_from = self._seal_hours_from
        until = self._newest_hour - HOUR_MS
        if hours_from is not None and until > hours_from:
            self._queue(True, self._hours, hours_from, until, self.hours_span_ms)
            self._seal_hours_from = until

    def _queue(
        self, hours: bool, cells: dict[str, dict[int, _Cell]], lo: int, hi: int, span: int
    ) -> None:
        """Queue the cells starting in [lo, hi), within the span held."""
        size = HOUR_MS if hours else MINUTE_MS
        starts = range(_ceil(max(lo, hi - span), size), hi, size)
        for ad_id, windows in cells.items():
            self._unsealed.extend((hours, ad_id, t) for t in starts if t in windows)

    def sketch_bytes(self) -> int:
        """Bytes of unique-user sketches held, minutes and hours (their bulk in memory)."""
        held = self.held()
        return held["minute"].sketch_bytes + held["hour"].sketch_bytes

    def held(self) -> dict[Literal["minute", "hour"], HeldCells]:
        """Cells held and the bytes of their sketches, by granularity: counted as they
        change, so this costs nothing however many cells there are."""
        with self._lock:
            return {
                "minute": HeldCells(self._minute_tally.cells, self._minute_tally.sketch_bytes),
                "hour": HeldCells(self._hour_tally.cells, self._hour_tally.sketch_bytes),
            }

    def seal(self, budget: int) -> int:
        """Seal up to ``budget`` closed cells now; how many are still queued."""
        with self._lock:
            self._seal(budget)
            return len(self._unsealed)

    def _seal(self, budget: int) -> None:
        for _ in range(min(budget, len(self._unsealed))):
            hours, ad_id, start = self._unsealed.popleft()
            cell = (self._hours if hours else self._cells).get(ad_id, {}).get(start)
            if cell is not None:  # not forgotten meanwhile
                cell.seal()

    def _forget_before(self, minute_ms: int) -> None:
        if minute_ms <= self.complete_since_ms:
            return
        self.complete_since_ms = minute_ms
        _forget(self._cells, minute_ms)

    def _forget_hours_before(self, hour_ms: int) -> None:
        since = self.hours_complete_since_ms
        if since is None or hour_ms <= since:
            return
        self.hours_complete_since_ms = hour_ms
        _forget(self._hours, hour_ms)

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
        with self._lock:
            return [
                _row(minute, [cell])
                for minute, cell in _in_range(self._cells, ad_id, start_ms, end_ms, MINUTE_MS)
            ]

    def windows(
        self,
        *,
        ad_id: str,
        start_ms: int,
        end_ms: int,
        granularity: Literal["hour", "day"],
    ) -> list[AggregateRow]:
        """``QueryStore.aggregates`` by hour or day without ``group_by``: the rows of the
        windows starting in [start_ms, end_ms), bounds rounded up to the window size."""
        size = HOUR_MS if granularity == "hour" else DAY_MS
        grouped: dict[int, list[_Cell]] = {}
        with self._lock:
            for hour, cell in _in_range(self._hours, ad_id, start_ms, end_ms, size):
                grouped.setdefault(hour - hour % size, []).append(cell)
            return [_row(window, cells) for window, cells in grouped.items()]


_Columns = tuple[
    list[str], list[int], list[int], list[int], list[int], list[int], list[bytes | None]
]


def _columns(rows: pa.Table) -> _Columns:
    names = rows.schema.names
    lists = [
        rows[name].to_pylist() if name in names else [None] * rows.num_rows for name in _COLUMNS
    ]
    return tuple(lists)  # type: ignore[return-value]


def _add(
    cells: dict[str, dict[int, _Cell]],
    tally: _Tally,
    ad_id: str,
    start: int,
    clicks: int,
    impressions: int,
    spend: int,
    invalid: int,
    users: bytes | None,
) -> None:
    windows = cells.get(ad_id)
    if windows is None:
        windows = cells[ad_id] = {}
    cell = windows.get(start)
    if cell is None:
        cell = windows[start] = _Cell(tally)
    cell.clicks += clicks
    cell.impressions += impressions
    cell.spend_micros += spend
    cell.invalid_clicks += invalid
    if users is not None:
        cell.add_sketch(users)


def _in_range(
    cells: dict[str, dict[int, _Cell]], ad_id: str, start_ms: int, end_ms: int, size: int
) -> Iterator[tuple[int, _Cell]]:
    """An ad's cells starting in [start_ms, end_ms) rounded up to ``size``, oldest first."""
    lo, hi = _ceil(start_ms, size), _ceil(end_ms, size)
    found = [(t, cell) for t, cell in cells.get(ad_id, {}).items() if lo <= t < hi]
    return iter(sorted(found, key=lambda item: item[0]))
