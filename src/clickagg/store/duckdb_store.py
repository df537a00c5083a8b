"""The embedded AggregateStore: one DuckDB file holding minute rows, offsets and fates.

Exactly-once rests on one fact: a commit's deltas, fates, late events and the partition's
new offset are written in ONE DuckDB transaction, and only if the stored offset is still the
``from_offset`` the batch was read from. A crash at any point leaves either all of a batch
or none of it (DuckDB's WAL replays committed transactions only), so after a restart the
worker resumes from the stored offset and re-applies nothing twice.

Threading: one ``duckdb.connect(path)`` per store (a DuckDB file admits a single read-write
process), and one ``connection.cursor()`` per thread (a ``threading.local``). Each cursor is
its own DuckDB connection with its own transaction, so readers see committed snapshots and
never wait for the worker's transaction (MVCC); DuckDB runs statements of different cursors
in parallel and releases the GIL while executing. Commits are serialized by a lock: DuckDB
transactions are optimistic, so two writers upserting the same (ad, minute) row (two
partitions' batches share ads) would make one of them fail at COMMIT.

Table layout: the measure columns of ``clickagg.core.aggregate.MEASURES`` (sums, plus the
sorted KMV sketch ``user_hashes`` as ``UBIGINT[]``), keyed by (ad_id, minute_ms) in
``agg_minute`` and additionally by the three dimensions in ``agg_minute_dims``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Final

import duckdb
import pyarrow as pa

from clickagg.core import sketch
from clickagg.core.aggregate import DIMENSIONS, FATE_SCHEMA, LATE_SCHEMA
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.store.base import (
    AggregateRow,
    Dimension,
    Fate,
    FencedError,
    Granularity,
    PartitionCommit,
    PartitionStatus,
    Totals,
)

_SUMS: Final = ("clicks", "impressions", "spend_micros", "invalid_clicks")
_MINUTE_KEY: Final = ("ad_id", "minute_ms")
_DIMS_KEY: Final = (*_MINUTE_KEY, *DIMENSIONS)
_WINDOW_MS: Final[dict[str, int]] = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}
# group_by values map to column names through this whitelist only: nothing a caller passes
# is ever spliced into SQL (values are bound as parameters).
_GROUP_COLUMNS: Final[dict[str, str]] = {name: name for name in DIMENSIONS}

_SQL_TYPES: Final[dict[pa.DataType, str]] = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
}


def _q(name: str) -> str:
    """Quote an identifier (``partition`` and ``offset`` are SQL keywords)."""
    return f'"{name}"'


def _columns_ddl(schema: pa.Schema) -> str:
    """Column definitions mirroring an Arrow schema, nullability included."""
    return ", ".join(
        f"{_q(f.name)} {_SQL_TYPES[f.type]}{'' if f.nullable else ' NOT NULL'}" for f in schema
    )


def _aggregate_table_ddl(name: str, key: tuple[str, ...]) -> str:
    keys = ", ".join(f"{k} {'BIGINT' if k == 'minute_ms' else 'VARCHAR'} NOT NULL" for k in key)
    sums = ", ".join(f"{m} BIGINT NOT NULL" for m in _SUMS)
    return (
        f"CREATE TABLE IF NOT EXISTS {name} ({keys}, {sums}, "
        f"user_hashes UBIGINT[] NOT NULL, PRIMARY KEY ({', '.join(key)}))"
    )


_MERGED_SKETCH: Final = f"list_sort(list_distinct(flatten(list(user_hashes))))[1:{sketch.K}]"

_SCHEMA_DDL: Final = (
    _aggregate_table_ddl("agg_minute", _MINUTE_KEY),
    _aggregate_table_ddl("agg_minute_dims", _DIMS_KEY),
    """CREATE TABLE IF NOT EXISTS partition_offsets (
        "partition" INTEGER PRIMARY KEY, committed_offset BIGINT NOT NULL,
        max_event_ms BIGINT NOT NULL, watermark_ms BIGINT NOT NULL,
        counted BIGINT NOT NULL, duplicates BIGINT NOT NULL, late BIGINT NOT NULL,
        invalid BIGINT NOT NULL, committed_at_ms BIGINT NOT NULL)""",
    # No index on fates / late events: they grow by one row per event, and an ART index
    # would cost memory and insert time for what is a rare debugging lookup.
    f"CREATE TABLE IF NOT EXISTS event_fates ({_columns_ddl(FATE_SCHEMA)})",
    f"CREATE TABLE IF NOT EXISTS late_events ({_columns_ddl(LATE_SCHEMA)})",
)


def _upsert_sql(table: str, key: tuple[str, ...], source: str) -> str:
    """Add a delta table into ``table``: sums add, sketches merge.

    The source is first grouped by key so a delta holding one key twice still applies
    (ON CONFLICT may not touch a row twice in one statement); deltas from
    ``clickagg.core.aggregate`` are already unique, so this costs one cheap hash aggregate.
    """
    keys = ", ".join(key)
    sums = ", ".join(f"sum({m})::BIGINT AS {m}" for m in _SUMS)
    updates = ", ".join(f"{m} = t.{m} + excluded.{m}" for m in _SUMS)
    merged = sketch.sql_merge("t.user_hashes", "excluded.user_hashes")
    return (
        f"INSERT INTO {table} AS t ({keys}, {', '.join(_SUMS)}, user_hashes) "
        f"SELECT {keys}, {sums}, {_MERGED_SKETCH} AS user_hashes FROM {source} "
        f"GROUP BY {keys} "
        f"ON CONFLICT ({keys}) DO UPDATE SET {updates}, user_hashes = {merged}"
    )


def _append_sql(table: str, schema: pa.Schema, source: str) -> str:
    """Append by column name, so a source with a missing or renamed column is rejected."""
    cols = ", ".join(_q(f.name) for f in schema)
    return f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {source}"


_UPSERT_MINUTE: Final = _upsert_sql("agg_minute", _MINUTE_KEY, "_clickagg_minute")
_UPSERT_DIMS: Final = _upsert_sql("agg_minute_dims", _DIMS_KEY, "_clickagg_dims")
_APPEND_FATES: Final = _append_sql("event_fates", FATE_SCHEMA, "_clickagg_fates")
_APPEND_LATE: Final = _append_sql("late_events", LATE_SCHEMA, "_clickagg_late")
_OFFSET_COLUMNS: Final = (
    "committed_offset, max_event_ms, watermark_ms, counted, duplicates, late, invalid, "
    "committed_at_ms"
)
_UPSERT_OFFSET: Final = f"""
    INSERT INTO partition_offsets AS p ("partition", {_OFFSET_COLUMNS})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT ("partition") DO UPDATE SET
        committed_offset = excluded.committed_offset,
        max_event_ms = excluded.max_event_ms, watermark_ms = excluded.watermark_ms,
        counted = p.counted + excluded.counted,
        duplicates = p.duplicates + excluded.duplicates,
        late = p.late + excluded.late, invalid = p.invalid + excluded.invalid,
        committed_at_ms = excluded.committed_at_ms"""


def _ceil(value: int, size: int) -> int:
    return -(-value // size) * size


class DuckDBStore:
    """AggregateStore on a DuckDB file; safe to share between one writer and many readers."""

    def __init__(self, path: Path | str) -> None:
        self._conn = duckdb.connect(str(path))
        self._local = threading.local()
        self._commit_lock = threading.Lock()
        self._closed = False
        cur = self._cursor()
        cur.execute("BEGIN")
        try:
            for ddl in _SCHEMA_DDL:
                cur.execute(ddl)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
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

    # -- writes ---------------------------------------------------------------------------

    def commit(self, commit: PartitionCommit) -> None:
        """Apply one micro-batch atomically, or raise FencedError leaving the store as it was."""
        if commit.to_offset < commit.from_offset:
            raise ValueError(f"to_offset {commit.to_offset} < from_offset {commit.from_offset}")
        with self._commit_lock:
            cur = self._cursor()
            cur.execute("BEGIN")
            try:
                self._apply(cur, commit)
                cur.execute("COMMIT")
            except BaseException:
                # A failed statement aborts DuckDB's transaction; ROLLBACK ends it cleanly.
                cur.execute("ROLLBACK")
                raise

    def _apply(self, cur: duckdb.DuckDBPyConnection, c: PartitionCommit) -> None:
        # fetchall, not fetchone: DuckDB 2 refuses register() while a result is unfinished.
        rows = cur.execute(
            'SELECT committed_offset FROM partition_offsets WHERE "partition" = ?',
            [c.partition],
        ).fetchall()
        stored = int(rows[0][0]) if rows else 0
        if stored != c.from_offset:
            raise FencedError(
                f"partition {c.partition}: committed offset is {stored}, "
                f"batch was read from {c.from_offset}"
            )
        for sql, name, table in (
            (_UPSERT_MINUTE, "_clickagg_minute", c.minute_deltas),
            (_UPSERT_DIMS, "_clickagg_dims", c.dimension_deltas),
            (_APPEND_FATES, "_clickagg_fates", c.fates),
            (_APPEND_LATE, "_clickagg_late", c.late_events),
        ):
            if table.num_rows == 0:
                continue
            cur.register(name, table)
            try:
                cur.execute(sql)
            finally:
                cur.unregister(name)
        cur.execute(
            _UPSERT_OFFSET,
            [
                c.partition,
                c.to_offset,
                c.max_event_ms,
                c.watermark_ms,
                c.counted,
                c.duplicates,
                c.late,
                c.invalid,
                c.committed_at_ms,
            ],
        )

    # -- reads ----------------------------------------------------------------------------

    def committed_offsets(self) -> dict[int, int]:
        rows = self._cursor().execute(
            'SELECT "partition", committed_offset FROM partition_offsets'
        ).fetchall()
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

        Windows are UTC-aligned (``minute_ms - minute_ms % size``). The bounds are rounded
        up to the window size before filtering minutes, so a window is either whole or
        absent; for aligned bounds that is exactly ``start <= minute_ms < end``. Filtering
        on the stored column (not on the computed window) keeps the scan prunable.
        """
        size = _WINDOW_MS.get(granularity)
        if size is None:
            raise ValueError(f"unknown granularity {granularity!r}")
        if group_by is None:
            table, group_col = "agg_minute", "NULL::VARCHAR"
        else:
            column = _GROUP_COLUMNS.get(group_by)
            if column is None:
                raise ValueError(f"cannot group by {group_by!r}")
            table, group_col = "agg_minute_dims", column
        sql = f"""
            SELECT window_ms, grp, {", ".join(_SUMS)}, {sketch.sql_estimate("sk")}
            FROM (
                SELECT minute_ms - minute_ms % $size AS window_ms, {group_col} AS grp,
                       {", ".join(f"sum({m})::BIGINT AS {m}" for m in _SUMS)},
                       {_MERGED_SKETCH} AS sk
                FROM {table}
                WHERE ad_id = $ad AND minute_ms >= $lo AND minute_ms < $hi
                GROUP BY window_ms, grp
            )
            ORDER BY window_ms, grp"""
        params = {
            "size": size,
            "ad": ad_id,
            "lo": _ceil(start_ms, size),
            "hi": _ceil(end_ms, size),
        }
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
            for w, g, clicks, imps, spend, invalid, users in self._cursor()
            .execute(sql, params)
            .fetchall()
        ]

    def totals(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        """Sums over the minutes in [start_ms, end_ms); zeros when there are none."""
        sums = ", ".join(f"coalesce(sum({m}), 0)::BIGINT" for m in _SUMS)
        sql = f"""
            SELECT {", ".join(_SUMS)}, {sketch.sql_estimate("sk")}
            FROM (
                SELECT {sums}, coalesce({_MERGED_SKETCH}, []::UBIGINT[]) AS sk
                FROM agg_minute WHERE ad_id = ? AND minute_ms >= ? AND minute_ms < ?
            ) AS s({", ".join(_SUMS)}, sk)"""
        # An aggregate without GROUP BY yields exactly one row.
        [row] = self._cursor().execute(sql, [ad_id, start_ms, end_ms]).fetchall()
        clicks, imps, spend, invalid, users = (int(v) for v in row)
        return Totals(
            clicks=clicks,
            impressions=imps,
            spend_micros=spend,
            unique_users=users,
            invalid_clicks=invalid,
        )

    def fates(self, *, event_id: str) -> list[Fate]:
        """Every recorded decision about ``event_id``, in log order (a full scan: see DDL)."""
        rows = self._cursor().execute(
            'SELECT event_id, event_type, "partition", "offset", status, reason, ad_id, ts_ms '
            'FROM event_fates WHERE event_id = ? ORDER BY "partition", "offset"',
            [event_id],
        ).fetchall()
        return [
            Fate(
                event_id=e,
                event_type=t,
                partition=int(p),
                offset=int(o),
                status=s,
                reason=r,
                ad_id=a,
                ts_ms=int(ts),
            )
            for e, t, p, o, s, r, a, ts in rows
        ]

    def partition_status(self) -> list[PartitionStatus]:
        rows = self._cursor().execute(
            f'SELECT "partition", {_OFFSET_COLUMNS} FROM partition_offsets ORDER BY "partition"'
        ).fetchall()
        return [PartitionStatus(*(int(v) for v in row)) for row in rows]

    def late_event_count(self) -> int:
        [(count,)] = self._cursor().execute("SELECT count(*) FROM late_events").fetchall()
        return int(count)

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
