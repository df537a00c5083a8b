"""The embedded AggregateStore: one DuckDB file holding minute rows and offsets.

Exactly-once rests on one fact: a commit's deltas and the partition's new offset are
written in ONE DuckDB transaction, and only if the stored offset is still the
``from_offset`` the batch was read from. A crash at any point leaves either all of a batch
or none of it (DuckDB's WAL replays committed transactions only), so after a restart the
worker resumes from the stored offset and re-applies nothing twice.

Threading: one ``duckdb.connect(path)`` per store (a DuckDB file admits a single read-write
process), and one ``connection.cursor()`` per thread (a ``threading.local``). Each cursor is
its own DuckDB connection with its own transaction, so readers see committed snapshots and
never wait for the worker's transaction (MVCC); DuckDB runs statements of different cursors
in parallel and releases the GIL while executing. Commits are serialized by a lock: DuckDB
transactions are optimistic, so two writers upserting the same (ad, minute) row (two
partitions' batches share ads) would make one of them fail at COMMIT. That same conflict
check is a second fence: two stores opened on one file in one process (DuckDB shares the
database) cannot both advance a partition from the same offset.

Tables: ``agg_minute`` keyed by (ad_id, minute_ms) and ``agg_minute_dims`` keyed also by the
three dimensions hold the measures of ``clickagg.core.aggregate.MEASURES`` (sums, plus the
sorted KMV sketch ``user_hashes`` as ``UBIGINT[]``). ``agg_hour`` / ``agg_hour_dims`` are
the same rolled up to hours, written in the same transaction: merging sketches is what costs
(a busy ad's day is 1440 full sketches, 368k hashes, 100+ ms to merge; from hours, 24),
so hour and day queries read the hour tables and stay in single-digit milliseconds.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import duckdb
import pyarrow as pa

from clickagg.core import sketch
from clickagg.core.aggregate import DIMENSIONS
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.store.base import (
    AggregateRow,
    Dimension,
    FencedError,
    Granularity,
    PartitionCommit,
    PartitionStatus,
    Totals,
)

_SUMS: Final = ("clicks", "impressions", "spend_micros", "invalid_clicks")
_WINDOW_MS: Final[dict[str, int]] = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}
# group_by values map to column names through this whitelist only: nothing a caller passes
# is ever spliced into SQL (values are bound as parameters).
_GROUP_COLUMNS: Final[dict[str, str]] = {name: name for name in DIMENSIONS}
_MERGED_SKETCH: Final = f"list_sort(list_distinct(flatten(list(user_hashes))))[1:{sketch.K}]"
_SUM_EXPRS: Final = ", ".join(f"sum({m})::BIGINT AS {m}" for m in _SUMS)


def _key(time_col: str, dims: bool) -> tuple[str, ...]:
    return ("ad_id", time_col, *(DIMENSIONS if dims else ()))


def _aggregate_ddl(table: str, time_col: str, dims: bool) -> str:
    key = _key(time_col, dims)
    keys = ", ".join(f"{k} {'BIGINT' if k == time_col else 'VARCHAR'} NOT NULL" for k in key)
    sums = ", ".join(f"{m} BIGINT NOT NULL" for m in _SUMS)
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ({keys}, {sums}, "
        f"user_hashes UBIGINT[] NOT NULL, PRIMARY KEY ({', '.join(key)}))"
    )


# (table, time column, has dimensions, Arrow view the commit registers its delta as)
_AGG_TABLES: Final = (
    ("agg_minute", "minute_ms", False, "_clickagg_minute"),
    ("agg_hour", "hour_ms", False, "_clickagg_minute"),
    ("agg_minute_dims", "minute_ms", True, "_clickagg_dims"),
    ("agg_hour_dims", "hour_ms", True, "_clickagg_dims"),
)
_SCHEMA_DDL: Final = (
    *(_aggregate_ddl(table, col, dims) for table, col, dims, _ in _AGG_TABLES),
    """CREATE TABLE IF NOT EXISTS partition_offsets (
        "partition" INTEGER PRIMARY KEY, committed_offset BIGINT NOT NULL,
        max_event_ms BIGINT NOT NULL, watermark_ms BIGINT NOT NULL,
        counted BIGINT NOT NULL, duplicates BIGINT NOT NULL, late BIGINT NOT NULL,
        invalid BIGINT NOT NULL, committed_at_ms BIGINT NOT NULL)""",
)


def _upsert_sql(table: str, time_col: str, dims: bool, source: str) -> str:
    """Add a minute-delta view into ``table``: sums add, sketches merge.

    The source is grouped by the target key first: that rolls minutes up to hours, and lets
    a delta holding one key twice still apply (ON CONFLICT may not touch a row twice in one
    statement). A key met once (every minute key of a well-formed delta) skips the merge.
    """
    size = HOUR_MS if time_col == "hour_ms" else MINUTE_MS
    key = _key(time_col, dims)
    keys = ", ".join(key)
    select_keys = ", ".join(
        f"minute_ms - minute_ms % {size} AS {k}" if k == time_col else k for k in key
    )
    updates = ", ".join(f"{m} = t.{m} + excluded.{m}" for m in _SUMS)
    merged = sketch.sql_merge("t.user_hashes", "excluded.user_hashes")
    return (
        f"INSERT INTO {table} AS t ({keys}, {', '.join(_SUMS)}, user_hashes) "
        f"SELECT {select_keys}, {_SUM_EXPRS}, "
        f"CASE WHEN count(*) = 1 THEN any_value(user_hashes) ELSE {_MERGED_SKETCH} END "
        "AS user_hashes "
        f"FROM {source} GROUP BY ALL "
        f"ON CONFLICT ({keys}) DO UPDATE SET {updates}, user_hashes = {merged}"
    )


# (view the statement reads, statement), in commit order
_COMMIT_STATEMENTS: Final = tuple(
    (view, _upsert_sql(table, col, dims, view)) for table, col, dims, view in _AGG_TABLES
)
_OFFSET_COLUMNS: Final = (
    "committed_offset, max_event_ms, watermark_ms, counted, duplicates, late, invalid, "
    "committed_at_ms"
)


def _upsert_offsets_sql(rows: int) -> str:
    """One statement for every partition of a round (a statement costs ~2 ms whatever its
    size, so not one per partition)."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"""
    INSERT INTO partition_offsets AS p ("partition", {_OFFSET_COLUMNS})
    VALUES {values}
    ON CONFLICT ("partition") DO UPDATE SET
        committed_offset = excluded.committed_offset,
        max_event_ms = excluded.max_event_ms, watermark_ms = excluded.watermark_ms,
        counted = p.counted + excluded.counted,
        duplicates = p.duplicates + excluded.duplicates,
        late = p.late + excluded.late, invalid = p.invalid + excluded.invalid,
        committed_at_ms = excluded.committed_at_ms"""


_TOTALS_PART: Final = f"{', '.join(_SUMS)}, user_hashes"
# Whole hours come from agg_hour, the ragged edges (if any) from agg_minute.


def _totals_sql(with_users: bool) -> str:
    """Whole hours from agg_hour, the ragged edges (if any) from agg_minute. Without
    users the sketch column is not even read: sliding windows need only the sums."""
    part = _TOTALS_PART if with_users else ", ".join(_SUMS)
    users = f"coalesce({_MERGED_SKETCH}, []::UBIGINT[])" if with_users else "[]::UBIGINT[]"
    return f"""
    SELECT {", ".join(f"coalesce(sum({m}), 0)::BIGINT AS {m}" for m in _SUMS)}, {users} AS sk
    FROM (
        SELECT {part} FROM agg_hour
        WHERE ad_id = $ad AND hour_ms >= $hlo AND hour_ms < $hhi
        UNION ALL
        SELECT {part} FROM agg_minute
        WHERE ad_id = $ad AND minute_ms >= $lo AND minute_ms < $hi
          AND (minute_ms < $hlo OR minute_ms >= $hhi)
    )"""


_TOTALS: Final = {with_users: _totals_sql(with_users) for with_users in (True, False)}


def _create_schema(cur: duckdb.DuckDBPyConnection) -> None:
    """Create missing tables (idempotent). A file written before the hour tables existed gets
    them filled from its minute tables, so hour and day queries see its history."""
    existing = {
        name
        for (name,) in cur.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
    }
    for ddl in _SCHEMA_DDL:
        cur.execute(ddl)
    for table, col, dims, _ in _AGG_TABLES:
        source = "agg_minute_dims" if dims else "agg_minute"
        if col == "hour_ms" and table not in existing and source in existing:
            cur.execute(_upsert_sql(table, col, dims, source))


def _ceil(value: int, size: int) -> int:
    return -(-value // size) * size


class DuckDBStore:
    """AggregateStore on a DuckDB file; safe to share between one writer and many readers."""

    def __init__(self, path: Path | str) -> None:
        self._conn = duckdb.connect(str(path))
        self._local = threading.local()
        self._commit_lock = threading.Lock()
        self._closed = False
        try:
            self._transaction(_create_schema)
        except BaseException:
            self._conn.close()
            raise

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (its own DuckDB connection and transaction)."""
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            if self._closed:
                raise RuntimeError("DuckDBStore is closed")
            cur = self._conn.cursor()
            self._local.cursor = cur
        return cur

    def _fetch(self, sql: str, params: object = None) -> list[tuple[Any, ...]]:
        # Always fetchall: DuckDB 2 blocks some calls on a cursor with an unfinished result.
        return self._cursor().execute(sql, params).fetchall()

    # -- writes ---------------------------------------------------------------------------

    def commit(self, commit: PartitionCommit) -> None:
        """Apply one micro-batch atomically, or raise FencedError leaving the store as it was."""
        self.commit_many([commit])

    def commit_many(self, commits: Sequence[PartitionCommit]) -> None:
        """Apply several partitions' micro-batches in one transaction (all or none)."""
        if not commits:
            return
        partitions = [c.partition for c in commits]
        if len(set(partitions)) != len(partitions):
            raise ValueError(f"a partition appears twice in one commit: {partitions}")
        for c in commits:
            if c.to_offset < c.from_offset:
                raise ValueError(f"to_offset {c.to_offset} < from_offset {c.from_offset}")
        with self._commit_lock:
            self._transaction(lambda cur: self._apply(cur, commits))

    def _transaction(self, body: Callable[[duckdb.DuckDBPyConnection], object]) -> None:
        cur = self._cursor()
        cur.execute("BEGIN")
        try:
            body(cur)
            cur.execute("COMMIT")
        except BaseException:
            # A failed statement aborts DuckDB's transaction and a failed COMMIT has already
            # rolled back; ROLLBACK just ends it, and must not hide the original error.
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            raise

    def _apply(self, cur: duckdb.DuckDBPyConnection, commits: Sequence[PartitionCommit]) -> None:
        # fetchall, not fetchone: DuckDB 2 refuses register() while a result is unfinished.
        rows = cur.execute(
            'SELECT "partition", committed_offset FROM partition_offsets '
            'WHERE "partition" IN (SELECT unnest(?))',
            [[c.partition for c in commits]],
        ).fetchall()
        stored = {int(p): int(o) for p, o in rows}
        stale = [c for c in commits if stored.get(c.partition, 0) != c.from_offset]
        if stale:
            raise FencedError(
                "; ".join(
                    f"partition {c.partition}: committed offset is "
                    f"{stored.get(c.partition, 0)}, batch was read from {c.from_offset}"
                    for c in stale
                ),
                [c.partition for c in stale],
            )
        views = {
            name: pa.concat_tables([getattr(c, attr) for c in commits])
            for name, attr in (
                ("_clickagg_minute", "minute_deltas"),
                ("_clickagg_dims", "dimension_deltas"),
            )
        }
        live: list[str] = []  # empty tables: no view, no statement
        try:
            for name, table in views.items():
                if table.num_rows > 0:
                    cur.register(name, table)
                    live.append(name)
            for view, sql in _COMMIT_STATEMENTS:
                if view in live:
                    cur.execute(sql)
        finally:
            for name in live:
                cur.unregister(name)
        cur.execute(
            _upsert_offsets_sql(len(commits)),
            [
                value
                for c in commits
                for value in (
                    c.partition,
                    c.to_offset,
                    c.max_event_ms,
                    c.watermark_ms,
                    c.counted,
                    c.duplicates,
                    c.late,
                    c.invalid,
                    c.committed_at_ms,
                )
            ],
        )

    # -- reads ----------------------------------------------------------------------------

    def committed_offsets(self) -> dict[int, int]:
        rows = self._fetch('SELECT "partition", committed_offset FROM partition_offsets')
        return {int(p): int(o) for p, o in rows}

    def aggregates(
        self,
        *,
        ad_id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        """Rows for the windows starting in [start_ms, end_ms), oldest first, then by group.

        Windows are UTC-aligned (``t - t % size``). The bounds are rounded up to the window
        size before filtering the stored rows, so a window is either whole or absent; for
        aligned bounds that is exactly ``start <= minute_ms < end``. Filtering on the stored
        column (not on the computed window) keeps the scan prunable. Minute windows read the
        minute tables, hour and day windows the hour tables.
        """
        size = _WINDOW_MS.get(granularity)
        if size is None:
            raise ValueError(f"unknown granularity {granularity!r}")
        grain = "minute" if granularity == "minute" else "hour"
        time_col = f"{grain}_ms"
        params: dict[str, object] = {
            "ad": ad_id,
            "lo": _ceil(start_ms, size),
            "hi": _ceil(end_ms, size),
        }
        where = f"WHERE ad_id = $ad AND {time_col} >= $lo AND {time_col} < $hi"
        if group_by is None and granularity == grain:
            # One stored row per window: no merge, just estimate each row's sketch.
            sql = f"""
                SELECT {time_col}, NULL, {", ".join(_SUMS)},
                       {sketch.sql_estimate("user_hashes")}
                FROM agg_{grain} {where} ORDER BY {time_col}"""
        else:
            if group_by is None:
                table, group_col = f"agg_{grain}", "NULL::VARCHAR"
            else:
                column = _GROUP_COLUMNS.get(group_by)
                if column is None:
                    raise ValueError(f"cannot group by {group_by!r}")
                table, group_col = f"agg_{grain}_dims", column
            params["size"] = size
            sql = f"""
                SELECT window_ms, grp, {", ".join(_SUMS)}, {sketch.sql_estimate("sk")}
                FROM (
                    SELECT {time_col} - {time_col} % $size AS window_ms, {group_col} AS grp,
                           {_SUM_EXPRS}, {_MERGED_SKETCH} AS sk
                    FROM {table} {where}
                    GROUP BY window_ms, grp
                )
                ORDER BY window_ms, grp"""
        rows = self._fetch(sql, params)
        return [
            AggregateRow(
                window_ms=int(w),
                group=g,
                clicks=int(clicks),
                impressions=int(imps),
                spend_micros=int(spend),
                invalid_clicks=int(invalid),
                unique_users=int(users),
            )
            for w, g, clicks, imps, spend, invalid, users in rows
        ]

    def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        """Sums over the minutes in [start_ms, end_ms); zeros when there are none."""
        hour_lo, hour_hi = _ceil(start_ms, HOUR_MS), end_ms - end_ms % HOUR_MS
        if hour_lo >= hour_hi:  # no whole hour inside: every minute from agg_minute
            hour_lo = hour_hi = start_ms
        params = {"ad": ad_id, "lo": start_ms, "hi": end_ms, "hlo": hour_lo, "hhi": hour_hi}
        sql = (
            f"SELECT {', '.join(_SUMS)}, {sketch.sql_estimate('sk')} FROM ({_TOTALS[unique_users]})"
        )
        # An aggregate without GROUP BY yields exactly one row.
        [row] = self._fetch(sql, params)
        clicks, imps, spend, invalid, users = (int(v) for v in row)
        return Totals(
            clicks=clicks,
            impressions=imps,
            spend_micros=spend,
            unique_users=users,
            invalid_clicks=invalid,
        )

    def minute_rows_since(self, since_ms: int) -> pa.Table:
        sql = (
            "SELECT ad_id, minute_ms, clicks, impressions, spend_micros, invalid_clicks "
            "FROM agg_minute WHERE minute_ms >= $1"
        )
        table: pa.Table = self._cursor().sql(sql, params=[since_ms]).to_arrow_table()
        return table

    def partition_status(self) -> list[PartitionStatus]:
        rows = self._fetch(
            f'SELECT "partition", {_OFFSET_COLUMNS} FROM partition_offsets ORDER BY "partition"'
        )
        return [PartitionStatus(*(int(v) for v in row)) for row in rows]

    def close(self) -> None:
        """Close the connection; DuckDB closes every thread's cursor along with it."""
        if self._closed:
            return
        self._closed = True
        with self._commit_lock:
            self._conn.close()

    def __enter__(self) -> DuckDBStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
