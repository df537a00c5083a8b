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
in parallel and releases the GIL while executing. Commits are serialized by a lock (one
round at a time, each with the next ``seq``); DuckDB's optimistic conflict check on
``partition_offsets`` is a second fence: two stores opened on one file in one process
(DuckDB shares the database) cannot both advance a partition from the same offset.

Tables: aggregates are appended, never upserted, on the hot path (like Mesa's versioned
deltas or ClickHouse's SummingMergeTree). A commit appends the round's deltas, tagged with
the round's sequence number ``seq``, to four narrow tables without any index:
``delta_minute`` (ad_id, minute_ms, advertiser_id, campaign_id, measures) and one per
breakdown dimension, ``delta_country`` / ``delta_device`` / ``delta_browser`` (ad_id,
minute_ms, <dimension>, measures). The measures are those of
``clickagg.core.aggregate.MEASURES``: sums plus ``users``, the serialized DataSketches HLL
sketch of the row's users (``clickagg.core.hll``, Spark-compatible; null: no user).

:meth:`DuckDBStore.compact` (a background thread of the worker process) merges every delta
with ``seq <= cut`` into the minute base tables and deletes those deltas, in ONE
transaction, so a crash leaves either all of it or none: ``agg_minute`` (ad_id, minute_ms,
advertiser_id, campaign_id) and ``agg_minute_<dim>`` (ad_id, minute_ms, <dimension>). In
the same transaction it rolls the minutes that are final (wholly before the newest
partition watermark: they get almost no more deltas) up into the hour base tables ``agg_hour`` /
``agg_hour_<dim>``, once per minute; ``delta_state.rolled_ms`` is the first minute not
rolled up. Hours exist because merging sketches is what costs (a busy ad's day is 1440
sketches to merge, from hours 24); rolling a minute up once, when final, rather than at
every compaction that touches it, halves a compaction (hour rows hold the widest
sketches). A delta that still arrives for a rolled-up minute is merged into its minute and
its hour at once, so no answer depends on the watermark.

The base tables have one row per key but no PRIMARY KEY: replacing rows through its ART
index was 80-90 % of a compaction. DuckDB cannot merge HLL bytes here (its datasketches
extension is not available), so sums are added in SQL and sketches merged in Python: a
compaction fetches, per touched base key, the new sums, the stored row's rowid and
``list(users)`` (the stored sketch and the new ones) as Arrow, merges each list with
``hll.union_many`` (a lone sketch is kept as is), deletes the stored rows by rowid and
appends the merged ones (sorted by ad then time, which keeps zone maps selective).
Queries likewise fetch ``list(users)`` per result row and estimate in Python; queries
without unique users (sliding windows, ``minute_rows_since``,
``totals(unique_users=False)``) never read the sketch column.

Compaction does not hold the commit lock: see :meth:`DuckDBStore.compact`.

Every query reads base UNION ALL deltas (the deltas rolled up to the query's grain; for
hours, the hour rows plus the minute rows from ``rolled_ms`` on, read in the query's own
snapshot), so it is exact at every moment: a delta is in the base tables or in the delta
tables, never both, never neither; a minute is in its hour row or counted from its minute
row, never both. ``delta_state`` remembers the last compacted ``seq`` and ``rolled_ms``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from clickagg.core import hll
from clickagg.core.aggregate import DIMENSIONS, OWNERS, UNKNOWN
from clickagg.core.keyed import correction_deltas
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.disk import OutOfSpaceError, mentions_out_of_space
from clickagg.store.base import (
    AdTotals,
    AggregateRow,
    CompactionResult,
    Dimension,
    FencedError,
    Granularity,
    KeyedCommit,
    KeyedProgress,
    PartitionCommit,
    PartitionStatus,
    RankBy,
    RollupLevel,
    Totals,
)

_SUMS: Final = ("clicks", "impressions", "spend_micros", "invalid_clicks")
_WINDOW_MS: Final[dict[str, int]] = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}
_SUM_EXPRS: Final = ", ".join(f"sum({m})::BIGINT AS {m}" for m in _SUMS)
# A group's sketches as a list, merged in Python (DuckDB cannot merge HLL bytes here).
_SKETCHES: Final = "list(users) FILTER (WHERE users IS NOT NULL)"


@dataclass(frozen=True)
class _Family:
    """One kind of aggregate: its delta table, its minute and hour base tables, and the
    name a commit registers the round's Arrow deltas under."""

    dim: str | None  # None: the per-ad rows (which carry the owners instead)
    delta: str
    minute: str
    hour: str
    view: str

    @property
    def extra(self) -> tuple[str, ...]:
        return OWNERS if self.dim is None else (self.dim,)

    def key(self, time_col: str) -> tuple[str, ...]:
        return ("ad_id", time_col, *self.extra)

    @property
    def columns(self) -> tuple[str, ...]:
        """Delta columns besides ``seq``, in the order of the Arrow schema."""
        return ("ad_id", "minute_ms", *self.extra, *_SUMS, "users")


_ADS: Final = _Family(None, "delta_minute", "agg_minute", "agg_hour", "_clickagg_minute")
# group_by values map to tables through this whitelist only: nothing a caller passes is
# ever spliced into SQL (values are bound as parameters).
_BY_DIMENSION: Final[dict[str, _Family]] = {
    d: _Family(d, f"delta_{d}", f"agg_minute_{d}", f"agg_hour_{d}", f"_clickagg_{d}")
    for d in DIMENSIONS
}
_FAMILIES: Final = (_ADS, *_BY_DIMENSION.values())
_OWNER_COLUMNS: Final[dict[str, str]] = {
    "ad": "ad_id",
    "advertiser": "advertiser_id",
    "campaign": "campaign_id",
}


def _base_ddl(family: _Family, table: str, time_col: str) -> str:
    """No PRIMARY KEY: maintaining its ART index is what made compaction slow (replacing a
    key in place through it cost 20-50 µs a row). Compaction keeps each key on one row by
    deleting the row it merged (by rowid) and inserting the merged one."""
    cols = ", ".join(
        [
            "ad_id VARCHAR NOT NULL",
            f"{time_col} BIGINT NOT NULL",
            *(f"{c} VARCHAR NOT NULL" for c in family.extra),
            *(f"{m} BIGINT NOT NULL" for m in _SUMS),
            "users BLOB",
        ]
    )
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


def _delta_ddl(family: _Family) -> str:
    """No key, no index: appending is all a commit does to it."""
    cols = ", ".join(
        [
            "seq BIGINT NOT NULL",
            "ad_id VARCHAR NOT NULL",
            "minute_ms BIGINT NOT NULL",
            *(f"{c} VARCHAR NOT NULL" for c in family.extra),
            *(f"{m} BIGINT NOT NULL" for m in _SUMS),
            "users BLOB",
        ]
    )
    return f"CREATE TABLE IF NOT EXISTS {family.delta} ({cols})"


_FAMILY_TABLES: Final = {
    "ip": ("keyed_offsets", "keyed_high_water", "keyed_specs"),
    "visitor": ("visitor_offsets", "visitor_high_water", "visitor_specs"),
    "ad": ("ad_offsets", "ad_high_water", "ad_specs"),
}
"""Per keyed family: its (offsets, high-water marks, specs) tables."""


def _family_ddl(offsets: str, high_water: str, specs: str) -> tuple[str, ...]:
    """One keyed family's tables (a data dir of a build before a family gains its tables
    empty: the family starts where stage 1 starts appending to it). Per keyed partition,
    the keyed log offset consumed; per (keyed partition, source partition), the highest
    source offset taken (idempotence); and the keyed rules' spec each range of a keyed
    partition was judged under, a row when the spec changes (it applies from from_offset
    to the next row's), so that a recovery replays the range with the verdicts it was
    committed with (no key: a handful of rows)."""
    return (
        f"""CREATE TABLE IF NOT EXISTS {offsets} (
        keyed_partition INTEGER PRIMARY KEY, consumed_offset BIGINT NOT NULL,
        corrections BIGINT NOT NULL, committed_at_ms BIGINT NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {high_water} (
        keyed_partition INTEGER NOT NULL, source_partition INTEGER NOT NULL,
        source_offset BIGINT NOT NULL, PRIMARY KEY (keyed_partition, source_partition))""",
        f"""CREATE TABLE IF NOT EXISTS {specs} (
        keyed_partition INTEGER NOT NULL, from_offset BIGINT NOT NULL,
        spec_json VARCHAR NOT NULL)""",
    )


_SCHEMA_DDL: Final = (
    *(_delta_ddl(f) for f in _FAMILIES),
    *(_base_ddl(f, f.minute, "minute_ms") for f in _FAMILIES),
    *(_base_ddl(f, f.hour, "hour_ms") for f in _FAMILIES),
    "CREATE TABLE IF NOT EXISTS delta_state (compacted_seq BIGINT NOT NULL, "
    "rolled_ms BIGINT NOT NULL DEFAULT 0)",
    """CREATE TABLE IF NOT EXISTS partition_offsets (
        "partition" INTEGER PRIMARY KEY, committed_offset BIGINT NOT NULL,
        max_event_ms BIGINT NOT NULL, watermark_ms BIGINT NOT NULL,
        counted BIGINT NOT NULL, duplicates BIGINT NOT NULL, late BIGINT NOT NULL,
        invalid BIGINT NOT NULL, committed_at_ms BIGINT NOT NULL)""",
    # The keyed stage's stage 2, per family (``_family_ddl``).
    *(statement for tables in _FAMILY_TABLES.values() for statement in _family_ddl(*tables)),
    """CREATE TABLE IF NOT EXISTS keyed_rule_corrections (
        rule_id VARCHAR PRIMARY KEY, corrections BIGINT NOT NULL)""",
    # Clicks a review-only keyed rule flagged (billable, reported), per rule.
    """CREATE TABLE IF NOT EXISTS keyed_rule_reviews (
        rule_id VARCHAR PRIMARY KEY, clicks BIGINT NOT NULL)""",
    # Every click a keyed family corrected and the rule it stands corrected under now,
    # whichever family: a second family's verdict on it is settled against this row.
    # Clicks older than every family's settled bound are forgotten (no verdict comes).
    """CREATE TABLE IF NOT EXISTS keyed_corrected (
        event_id VARCHAR PRIMARY KEY, rule_id VARCHAR NOT NULL, ts_ms BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS keyed_settled (
        family VARCHAR PRIMARY KEY, before_ms BIGINT NOT NULL)""",
    # What each family's commits applied, by the commit's first keyed offset, and when: a
    # recovery hands the corrections archive exactly these again, stamped with the time
    # they were applied (null in rows of a build before the column: the recovery's time).
    # Rows before the keyed log's first retained offset are deleted (a recovery never
    # replays from before it).
    """CREATE TABLE IF NOT EXISTS keyed_applied (
        family VARCHAR NOT NULL, keyed_partition INTEGER NOT NULL,
        from_offset BIGINT NOT NULL, seq INTEGER NOT NULL, event_id VARCHAR NOT NULL,
        rule_id VARCHAR NOT NULL, previous_rule_id VARCHAR, applied_at_ms BIGINT)""",
    "ALTER TABLE keyed_applied ADD COLUMN IF NOT EXISTS applied_at_ms BIGINT",
)


def _family_tables(family: str) -> tuple[str, str, str]:
    if family not in _FAMILY_TABLES:
        raise ValueError(f"unknown keyed family {family!r}")
    return _FAMILY_TABLES[family]


def _append_delta_sql(family: _Family) -> str:
    """The hot path: a plain append of the round's deltas, tagged with its ``seq`` (?)."""
    cols = ", ".join(family.columns)
    return f"INSERT INTO {family.delta} (seq, {cols}) SELECT ?, {cols} FROM {family.view}"


def _gather_sql(family: _Family, table: str, time_col: str, source: str, lo: int, hi: int) -> str:
    """Each key of ``table`` that the rows of ``source`` (``<table> WHERE <condition>``:
    deltas, or minute base rows being rolled up into hours) touch, with its new sums (those
    rows plus the stored row), the stored row's rowid and the list of sketches to merge
    (the stored one first).

    The source rows are grouped by the target key first: that rolls minutes up to hours and
    merges the many rounds that touched one key. [lo, hi] bounds the source's times (ints
    computed by the store, never input): only the base's row groups in that range are read.
    The result is sorted by ad then time, so that appended rows keep zone maps selective.
    """
    size = HOUR_MS if time_col == "hour_ms" else MINUTE_MS
    key = family.key(time_col)
    select_key = ", ".join(
        f"minute_ms - minute_ms % {size} AS {k}" if k == time_col else k for k in key
    )
    on = " AND ".join(f"b.{k} = d.{k}" for k in key)
    sums = ", ".join(f"d.{m} + coalesce(b.{m}, 0) AS {m}" for m in _SUMS)
    return f"""
    SELECT {", ".join(f"d.{k}" for k in key)}, {sums}, b.rowid AS base_rowid,
        CASE WHEN b.users IS NULL THEN d.sk
             ELSE list_prepend(b.users, coalesce(d.sk, []::BLOB[])) END AS sk
    FROM (SELECT {select_key}, {_SUM_EXPRS}, {_SKETCHES} AS sk FROM {source} GROUP BY ALL) d
    LEFT JOIN {table} b
        ON {on} AND b.{time_col} >= {int(lo)} AND b.{time_col} <= {int(hi)}
    ORDER BY d.ad_id, d.{time_col}"""


def _write_back_sql(family: _Family, table: str, time_col: str) -> tuple[str, str]:
    """Store the merged rows (registered as ``_clickagg_merged``): delete the base rows they
    replace (by rowid, read in this transaction), then append them all."""
    cols = ", ".join([*family.key(time_col), *_SUMS, "users"])
    return (
        f"DELETE FROM {table} WHERE rowid IN "
        "(SELECT base_rowid FROM _clickagg_merged WHERE base_rowid IS NOT NULL)",
        f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _clickagg_merged",
    )


_MERGE_CHUNK: Final = 1_000


def _merge_sketch_lists(lists: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One sketch per row of a list-of-sketches column: a lone sketch is kept as it is
    (every stored sketch is already canonical; taken in Arrow, no Python object per row),
    two or more are merged (``hll.union_many``), none gives null."""
    column = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    one = np.flatnonzero(lengths == 1)
    many = np.flatnonzero(lengths > 1)
    # Row i takes position[i] of [lone sketches..., merged sketches..., null].
    position = np.full(len(lengths), len(one) + len(many), dtype=np.int64)
    position[one] = np.arange(len(one))
    position[many] = len(one) + np.arange(len(many))
    parts = [pc.list_flatten(column.take(pa.array(one))).cast(pa.binary())]
    for start in range(0, len(many), _MERGE_CHUNK):
        parts.append(hll.union_many(column.take(pa.array(many[start : start + _MERGE_CHUNK]))))
        # The unions hold the GIL; hand it over between chunks, so that a commit running
        # beside the compaction waits milliseconds for it, not the whole merge.
        time.sleep(0)
    parts.append(pa.nulls(1, pa.binary()))
    return pa.concat_arrays(parts).take(pa.array(position))


def _unique_users(lists: Sequence[Sequence[bytes] | None]) -> list[int]:
    """The estimate of the union of each row's sketches (no sketch: 0)."""
    return [
        0 if not row else hll.estimate(row[0] if len(row) == 1 else hll.union(row)) for row in lists
    ]


def _merge_into(cur: duckdb.DuckDBPyConnection, family: _Family, grain: str, source: str) -> int:
    """Merge the rows of ``source`` (``<table> WHERE <condition>``, with minute_ms, the
    family's key columns, sums and users) into the family's base table of ``grain``:
    gather the touched keys with their stored rows, merge the sketches, delete the stored
    rows by rowid, append the merged ones. Returns the number of source rows."""
    [(lo, hi, rows)] = cur.execute(
        f"SELECT min(minute_ms), max(minute_ms), count(*) FROM {source}"
    ).fetchall()
    if not rows:
        return 0
    size = HOUR_MS if grain == "hour" else MINUTE_MS
    table = getattr(family, grain)
    gathered = cur.sql(
        _gather_sql(family, table, f"{grain}_ms", source, lo - lo % size, hi)
    ).to_arrow_table()
    merged = gathered.set_column(
        gathered.schema.get_field_index("sk"), "users", _merge_sketch_lists(gathered["sk"])
    )
    cur.register("_clickagg_merged", merged)
    try:
        for statement in _WRITE_BACK[(family.dim, grain)]:
            cur.execute(statement).fetchall()
    finally:
        cur.unregister("_clickagg_merged")
    return int(rows)


_COMPACT_ATTEMPTS: Final = 5
# No automatic checkpoint: DuckDB starts one when a commit takes the WAL over its limit,
# also while a compaction's transaction is open, and a compaction that then deletes the
# base rows it read by rowid leaves some of them in place beside their merged
# replacements (duplicated base rows: counted twice; reproduced with commits and
# compactions on two threads, none with automatic checkpoints off). The compactor
# checkpoints itself instead, between compactions, with commits held off
# (:meth:`DuckDBStore.compact`), so the WAL stays about one compaction interval long.
_CONNECT_CONFIG: Final[dict[str, str | bool | int | float | list[str]]] = {
    "wal_autocheckpoint": "1TB"
}
_APPENDS: Final = {family.view: _append_delta_sql(family) for family in _FAMILIES}
_WRITE_BACK: Final = {
    (family.dim, grain): _write_back_sql(family, getattr(family, grain), f"{grain}_ms")
    for family in _FAMILIES
    for grain in ("minute", "hour")
}

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


# Minutes from this one on are in the minute base only, not yet rolled up into the hour
# base. A placeholder: :meth:`DuckDBStore._fetch_base` reads delta_state.rolled_ms in the
# query's own transaction (same snapshot) and puts it in as a literal, so that the scan of
# the minute base is pruned by its zone maps to the few minutes not rolled up.
_ROLLED: Final = "__clickagg_rolled_ms__"


def _minutes_sql(columns: str, where: str) -> str:
    """Rows covering the minutes in [$lo, $hi): whole hours [$hlo, $hhi) from agg_hour (the
    minutes rolled up into it), the ragged edges and the minutes not yet rolled up from
    agg_minute, and every delta in range (not yet in either base)."""
    return f"""
        SELECT {columns} FROM agg_hour
        WHERE {where} AND hour_ms >= $hlo AND hour_ms < $hhi
        UNION ALL
        SELECT {columns} FROM agg_minute
        WHERE {where} AND minute_ms >= $lo AND minute_ms < $hi
          AND (minute_ms < $hlo OR minute_ms >= $hhi OR minute_ms >= {_ROLLED})
        UNION ALL
        SELECT {columns} FROM delta_minute
        WHERE {where} AND minute_ms >= $lo AND minute_ms < $hi"""


def _totals_sql(with_users: bool) -> str:
    """Without users the sketch column is not even read: sliding windows need only sums."""
    part = f"{', '.join(_SUMS)}, users" if with_users else ", ".join(_SUMS)
    users = _SKETCHES if with_users else "NULL::BLOB[]"
    return f"""
    SELECT {", ".join(f"coalesce(sum({m}), 0)::BIGINT AS {m}" for m in _SUMS)}, {users} AS sk
    FROM ({_minutes_sql(part, "ad_id = $ad")})"""


_TOTALS: Final = {with_users: _totals_sql(with_users) for with_users in (True, False)}


def _top_ads_sql(by: str, one_advertiser: bool) -> str:
    where = "advertiser_id = $advertiser" if one_advertiser else "TRUE"
    part = f"ad_id, {', '.join(OWNERS)}, {', '.join(_SUMS)}, users"
    owners = ", ".join(
        f"coalesce(max({c}) FILTER (WHERE {c} <> '{UNKNOWN}'), '{UNKNOWN}') AS {c}" for c in OWNERS
    )
    return f"""
    WITH r AS ({_minutes_sql(part, where)}),
    top AS (SELECT ad_id FROM r GROUP BY ad_id ORDER BY sum({by}) DESC, ad_id LIMIT $n)
    SELECT ad_id, {", ".join(OWNERS)}, {", ".join(_SUMS)}, sk
    FROM (
        SELECT ad_id, {owners}, {_SUM_EXPRS}, {_SKETCHES} AS sk
        FROM r WHERE ad_id IN (SELECT ad_id FROM top) GROUP BY ad_id
    )
    ORDER BY {by} DESC, ad_id"""


_TOP_ADS: Final = {(by, one): _top_ads_sql(by, one) for by in _SUMS for one in (True, False)}


def _windows_sql(family: _Family, grain: str, owner_col: str) -> str:
    """Rows of windows of $size starting in [$lo, $hi) (multiples of $size): the base
    table of the grain plus the deltas rolled up to that grain, merged per window."""
    time_col = f"{grain}_ms"
    grain_ms = MINUTE_MS if grain == "minute" else HOUR_MS
    base = family.minute if grain == "minute" else family.hour
    grp = family.dim or "NULL::VARCHAR"
    measures = f"{', '.join(_SUMS)}, users"
    # Hours: the hour base holds the minutes before _ROLLED; later ones are minute rows.
    unrolled = (
        ""
        if grain == "minute"
        else f"""
            UNION ALL
            SELECT minute_ms - minute_ms % {HOUR_MS} AS t, {grp} AS grp, {measures}
            FROM {family.minute}
            WHERE {owner_col} = $id AND minute_ms >= $lo AND minute_ms < $hi
              AND minute_ms >= {_ROLLED}"""
    )
    return f"""
    SELECT window_ms, grp, {", ".join(_SUMS)}, sk
    FROM (
        SELECT t - t % $size AS window_ms, grp, {_SUM_EXPRS}, {_SKETCHES} AS sk
        FROM (
            SELECT {time_col} AS t, {grp} AS grp, {measures} FROM {base}
            WHERE {owner_col} = $id AND {time_col} >= $lo AND {time_col} < $hi{unrolled}
            UNION ALL
            SELECT minute_ms - minute_ms % {grain_ms} AS t, {grp} AS grp, {measures}
            FROM {family.delta}
            WHERE {owner_col} = $id AND minute_ms >= $lo AND minute_ms < $hi
        )
        GROUP BY window_ms, grp
    )
    ORDER BY window_ms, grp"""


_WINDOWS: Final = {
    (family.dim, grain, owner_col): _windows_sql(family, grain, owner_col)
    for family in _FAMILIES
    for grain in ("minute", "hour")
    for owner_col in (_OWNER_COLUMNS.values() if family.dim is None else ("ad_id",))
}
_MINUTE_ROWS_SINCE: Final = f"""
    SELECT ad_id, minute_ms, {_SUM_EXPRS}
    FROM (
        SELECT ad_id, minute_ms, {", ".join(_SUMS)} FROM agg_minute WHERE minute_ms >= $1
        UNION ALL
        SELECT ad_id, minute_ms, {", ".join(_SUMS)} FROM delta_minute WHERE minute_ms >= $1
    )
    GROUP BY ad_id, minute_ms"""


def _append_deltas(
    cur: duckdb.DuckDBPyConnection, commits: Sequence[PartitionCommit | KeyedCommit], seq: int
) -> None:
    """Append the commits' minute and dimension deltas, tagged with ``seq``."""
    deltas = {
        _ADS.view: pa.concat_tables([c.minute_deltas for c in commits]),
        **{
            f.view: pa.concat_tables([c.dimension_deltas[dim] for c in commits])
            for dim, f in _BY_DIMENSION.items()
        },
    }
    live: list[str] = []  # empty tables: no view, no statement
    try:
        for name, table in deltas.items():
            if table.num_rows > 0:
                cur.register(name, table)
                live.append(name)
        for family in _FAMILIES:
            if family.view in live:
                cur.execute(_APPENDS[family.view], [seq])
    finally:
        for name in live:
            cur.unregister(name)


def _create_schema(cur: duckdb.DuckDBPyConnection) -> None:
    """Create missing tables (idempotent). A file of an older build (per-key upserted
    aggregates, no owners, or KMV sketches) is refused rather than migrated: 0.1.0 is
    unreleased."""
    [(old,)] = cur.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND (table_name = 'agg_minute_dims' OR (table_name = 'agg_minute' AND EXISTS ("
        "SELECT * FROM duckdb_columns() WHERE database_name = current_database() "
        "AND table_name = 'agg_minute' AND column_name = 'user_hashes')))"
    ).fetchall()
    if old:
        raise RuntimeError(
            "this aggregates file was written by an older clickagg build (agg_minute_dims "
            "or KMV user_hashes); start with a new --data-dir"
        )
    for ddl in _SCHEMA_DDL:
        cur.execute(ddl)
    cur.execute("INSERT INTO delta_state SELECT 0, 0 WHERE NOT EXISTS (SELECT * FROM delta_state)")


@contextlib.contextmanager
def _out_of_space_as_oserror() -> Iterator[None]:
    """Raise DuckDB's reports of a full disk as OutOfSpaceError (an OSError, ENOSPC).

    DuckDB names the OS error in its message only, under several classes: a COMMIT whose
    WAL write failed (TransactionException, rolled back), an automatic checkpoint that
    failed after a durable COMMIT (FatalException: the database is invalidated until it is
    reopened), and every later call on it ("database has been invalidated", the original
    error quoted). The worker backs off on OutOfSpaceError and reopens the store; it must
    not be mistaken for a write conflict, which compaction retries at once."""
    try:
        yield
    except duckdb.Error as exc:
        if mentions_out_of_space(str(exc)):
            raise OutOfSpaceError(errno.ENOSPC, f"aggregate store: {exc}") from exc
        raise


def _record_specs(
    cur: duckdb.DuckDBPyConnection, family: str, commits: Sequence[KeyedCommit]
) -> None:
    """Record each commit's spec from its first offset if it is not the one in force in its
    keyed partition, and forget the specs of ranges before the keyed log's first retained
    offset (a replay starts there: only the spec in force at it is still needed); likewise
    what was applied before it. One family's commits (one per keyed partition), a few
    statements for all of them: a round's statements cost per statement, not per row."""
    if not commits:
        return
    specs = _family_tables(family)[2]
    partitions = [c.keyed_partition for c in commits]
    in_force = dict(
        cur.execute(
            f"SELECT keyed_partition, arg_max(spec_json, from_offset) FROM {specs} "
            "WHERE keyed_partition IN (SELECT unnest(?)) GROUP BY keyed_partition",
            [partitions],
        ).fetchall()
    )
    changed = [c for c in commits if in_force.get(c.keyed_partition) != c.spec_json]
    if changed:
        cur.execute(
            f"INSERT INTO {specs} SELECT unnest($k), unnest($at), unnest($spec)",
            {
                "k": [c.keyed_partition for c in changed],
                "at": [c.from_offset for c in changed],
                "spec": [c.spec_json for c in changed],
            },
        )
    starts = {"k": partitions, "start": [c.replay_from for c in commits]}
    cur.execute(
        f"DELETE FROM {specs} s USING (SELECT unnest($k) AS k, unnest($start) AS start) b "
        f"WHERE s.keyed_partition = b.k AND s.from_offset < (SELECT max(from_offset) "
        f"FROM {specs} WHERE keyed_partition = b.k AND from_offset <= b.start)",
        starts,
    )
    cur.execute(
        "DELETE FROM keyed_applied a USING (SELECT unnest($k) AS k, unnest($start) AS start) b "
        "WHERE a.family = $family AND a.keyed_partition = b.k AND a.from_offset < b.start",
        starts | {"family": family},
    )


def _settle(cur: duckdb.DuckDBPyConnection, commit: KeyedCommit) -> KeyedCommit:
    """The commit with the deltas of what its verdicts change, given what either family
    corrected before (``AggregateStore.commit_keyed``); records what it applied. The
    verdicts are taken in their order, so several on one click in one commit (a family
    re-attributing within itself) settle as they would one commit each."""
    assert commit.verdicts is not None
    if not commit.verdicts.num_rows:  # nothing to look up, apply or record
        minute, dimensions = correction_deltas(commit.verdicts)
        return dataclasses.replace(
            commit,
            minute_deltas=minute,
            dimension_deltas=dimensions,
            corrections=0,
            corrections_by_rule={},
        )
    verdicts = pl.from_arrow(commit.verdicts)
    assert isinstance(verdicts, pl.DataFrame)
    ids = pa.table({"event_id": verdicts["event_id"].unique().to_arrow()})
    cur.register("_clickagg_ids", ids)
    try:
        stored = cur.sql(
            "SELECT c.event_id, c.rule_id AS _stored FROM keyed_corrected c "
            "JOIN _clickagg_ids USING (event_id)"
        ).to_arrow_table()
    finally:
        cur.unregister("_clickagg_ids")
    stored_frame = pl.from_arrow(stored)
    assert isinstance(stored_frame, pl.DataFrame)
    rank = {rule: i for i, rule in enumerate(commit.rule_order)}
    gone, never = len(rank), len(rank) + 1  # a rule since gone; not corrected yet

    def ranked(column: str) -> pl.Expr:
        return pl.col(column).replace_strict(rank, default=gone, return_dtype=pl.Int64)

    # A click its own family says it corrected before (``previous_rule_id``) stands under
    # that rule where this table has no row: corrected by a build before the table. Only
    # the click's first verdict here says so: a later one's previous rule may be an
    # earlier verdict of this same commit (a read split by a context mark), not applied
    # yet, and taking it as applied would re-attribute a click never subtracted.
    own = pl.col("previous_rule_id").first().over("event_id")
    frame = (
        verdicts.with_row_index("_n")
        .join(stored_frame.cast({"_stored": pl.String}), on="event_id", how="left")
        .sort("_n")
        .with_columns(pl.coalesce("_stored", own).alias("_stored"))
        .drop("previous_rule_id")
        .with_columns(
            ranked("rule_id").alias("_rank"),
            pl.when(pl.col("_stored").is_null())
            .then(pl.lit(never, pl.Int64))
            .otherwise(ranked("_stored"))
            .alias("_was"),
        )
    )
    best_before = pl.min_horizontal("_was", pl.col("_rank").cum_min().shift(1).over("event_id"))
    applied = (
        frame.filter(pl.col("_rank") < best_before)
        .with_columns(
            pl.col("rule_id")
            .shift(1)
            .over("event_id")
            .fill_null(pl.col("_stored"))
            .alias("previous_rule_id")
        )
        .sort("_n")
    )
    table = applied.select(commit.verdicts.schema.names).to_arrow().cast(commit.verdicts.schema)
    if applied.height:
        final = applied.group_by("event_id").agg(pl.col("rule_id").last(), pl.col("ts_ms").last())
        log = applied.select(
            pl.lit(commit.family).alias("family"),
            pl.lit(commit.keyed_partition, pl.Int32).alias("keyed_partition"),
            pl.lit(commit.from_offset, pl.Int64).alias("from_offset"),
            pl.int_range(pl.len(), dtype=pl.Int32).alias("seq"),
            "event_id",
            "rule_id",
            "previous_rule_id",
            pl.lit(commit.committed_at_ms, pl.Int64).alias("applied_at_ms"),
        )
        cur.register("_clickagg_final", final.to_arrow())
        cur.register("_clickagg_applied", log.to_arrow())
        try:
            cur.execute(
                "INSERT INTO keyed_corrected SELECT event_id, rule_id, ts_ms "
                "FROM _clickagg_final ON CONFLICT (event_id) DO UPDATE SET "
                "rule_id = excluded.rule_id"
            )
            cur.execute(
                "INSERT INTO keyed_applied (family, keyed_partition, from_offset, seq, "
                "event_id, rule_id, previous_rule_id, applied_at_ms) "
                "SELECT * FROM _clickagg_applied"
            )
        finally:
            cur.unregister("_clickagg_final")
            cur.unregister("_clickagg_applied")
    minute, dimensions = correction_deltas(table)
    fresh = applied.filter(pl.col("previous_rule_id").is_null())
    by_rule = fresh.group_by("rule_id").len()
    return dataclasses.replace(
        commit,
        minute_deltas=minute,
        dimension_deltas=dimensions,
        corrections=fresh.height,
        corrections_by_rule=dict(zip(by_rule["rule_id"], by_rule["len"], strict=True)),
        verdicts=table,
    )


def _forget_settled(cur: duckdb.DuckDBPyConnection, commits: Sequence[KeyedCommit]) -> None:
    """Record each family's settled bound, and forget the corrected clicks older than
    every family's (no verdict can come for them any more). The IP and visitor families
    run whenever the keyed stage does (with no rule in force they still move their
    bounds); the ad family commits only while one of its rules is in force (stage 1
    appends it nothing otherwise), so its bound counts once it has one: from its first
    commit (0 until it has decided something, ``Family.settled_before``)."""
    bounds: dict[str, int] = {}
    for c in commits:
        if c.settled_before_ms is not None:
            bounds[c.family] = min(bounds.get(c.family, c.settled_before_ms), c.settled_before_ms)
    if not bounds:
        return
    cur.execute(
        "INSERT INTO keyed_settled AS s SELECT unnest($family), unnest($bound) "
        "ON CONFLICT (family) DO UPDATE SET before_ms = greatest(s.before_ms, excluded.before_ms)",
        {"family": sorted(bounds), "bound": [bounds[f] for f in sorted(bounds)]},
    )
    # Only once the IP and visitor families have a bound: one that never committed may
    # still judge anything.
    cur.execute(
        "DELETE FROM keyed_corrected WHERE ts_ms < (SELECT min(before_ms) FROM keyed_settled "
        "HAVING count(*) FILTER (WHERE family IN ('ip', 'visitor')) = 2)"
    )


def _add_per_rule(
    cur: duckdb.DuckDBPyConnection, table: str, column: str, counts: Sequence[Mapping[str, int]]
) -> None:
    """Add the commits' per-rule counts to ``table``'s running totals."""
    totals: dict[str, int] = {}
    for per_rule in counts:
        for rule, n in per_rule.items():
            totals[rule] = totals.get(rule, 0) + n
    if totals:
        rules = sorted(totals)
        cur.execute(
            f"INSERT INTO {table} AS r SELECT unnest($rule), unnest($n) "
            f"ON CONFLICT (rule_id) DO UPDATE SET {column} = r.{column} + excluded.{column}",
            {"rule": rules, "n": [totals[r] for r in rules]},
        )


def _ceil(value: int, size: int) -> int:
    return -(-value // size) * size


def _fence(stored: Mapping[Any, Any], read_from: Mapping[int, int], message: str) -> None:
    """The fenced commit's check: each key's stored offset (0 when none) must still be the
    offset its records were read from, else FencedError naming every stale key."""
    offsets = {int(k): int(o) for k, o in stored.items()}
    stale = [k for k, read in read_from.items() if offsets.get(k, 0) != read]
    if stale:
        raise FencedError(
            "; ".join(
                message.format(key=k, stored=offsets.get(k, 0), read=read_from[k]) for k in stale
            ),
            stale,
        )


class RecentSnapshot(NamedTuple):
    """What :meth:`DuckDBStore.recent_rows` read in one transaction."""

    minutes: pa.Table
    hours: pa.Table | None
    committed: dict[int, int]
    keyed: dict[str, dict[int, int]]


class DuckDBStore:
    """AggregateStore on a DuckDB file; safe to share between one writer and many readers."""

    def __init__(self, path: Path | str) -> None:
        created = not Path(path).exists()
        try:
            with _out_of_space_as_oserror():  # opening replays the WAL and may checkpoint
                self._conn = duckdb.connect(str(path), config=_CONNECT_CONFIG)
        except OutOfSpaceError:
            if created:  # a header DuckDB could not finish: no database, and never will be
                Path(path).unlink(missing_ok=True)
                Path(f"{path}.wal").unlink(missing_ok=True)
            raise
        self._local = threading.local()
        self._commit_lock = threading.Lock()  # one commit at a time
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._state_lock = threading.Lock()  # the counters below
        self._closed = False
        try:
            self._transaction(_create_schema)
            self._last_seq, self._compacted_seq, self._pending_rows = self._delta_backlog()
        except BaseException:
            self._conn.close()
            raise

    def _delta_backlog(self) -> tuple[int, int, int]:
        """(newest seq, last compacted seq, delta rows not yet compacted) as stored."""
        counts = " UNION ALL ".join(
            f"SELECT max(seq) AS seq, count(*) AS n FROM {f.delta}" for f in _FAMILIES
        )
        [(newest, rows)] = self._fetch(f"SELECT max(seq), sum(n) FROM ({counts})")
        [(compacted,)] = self._fetch("SELECT max(compacted_seq) FROM delta_state")
        compacted = int(compacted or 0)
        return max(int(newest or 0), compacted), compacted, int(rows or 0)

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
        with _out_of_space_as_oserror():
            return self._cursor().execute(sql, params).fetchall()

    def _fetch_base(self, sql: str, params: object) -> list[tuple[Any, ...]]:
        """Run a query that reads the base tables, with ``rolled_ms`` of its own snapshot."""
        cur = self._cursor()
        cur.execute("BEGIN")
        try:
            [(rolled,)] = cur.execute("SELECT max(rolled_ms) FROM delta_state").fetchall()
            rows = cur.execute(sql.replace(_ROLLED, str(int(rolled))), params).fetchall()
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")  # read only: nothing to lose, nothing to conflict
        return rows

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
            seq = self._last_seq + 1
            self._transaction(lambda cur: self._apply(cur, commits, seq))
            self._last_seq = seq
        appended = sum(
            c.minute_deltas.num_rows + sum(t.num_rows for t in c.dimension_deltas.values())
            for c in commits
        )
        with self._state_lock:
            self._pending_rows += appended

    def commit_keyed(self, commits: Sequence[KeyedCommit]) -> list[pa.Table]:
        """The keyed stage's corrections, consumed offsets and high-water marks, in one
        transaction (all or none), each fenced by its family's consumed offset; the
        corrections are deltas like any round's (compaction merges them the same way)."""
        if not commits:
            return []
        keys = [(c.family, c.keyed_partition) for c in commits]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a keyed partition appears twice in one commit: {keys}")
        settled: list[KeyedCommit] = []
        with self._commit_lock:
            seq = self._last_seq + 1
            self._transaction(lambda cur: settled.extend(self._apply_keyed(cur, commits, seq)))
            self._last_seq = seq
        appended = sum(
            c.minute_deltas.num_rows + sum(t.num_rows for t in c.dimension_deltas.values())
            for c in settled
        )
        with self._state_lock:
            self._pending_rows += appended
        return [
            done.verdicts
            if asked.verdicts is not None and done.verdicts is not None
            # a commit of deltas made by its caller: nothing settled here
            else pa.table({})
            for done, asked in zip(settled, commits, strict=True)
        ]

    def _apply_keyed(
        self, cur: duckdb.DuckDBPyConnection, commits: Sequence[KeyedCommit], seq: int
    ) -> list[KeyedCommit]:
        for family in sorted({c.family for c in commits}):
            offsets = _family_tables(family)[0]
            mine = [c for c in commits if c.family == family]
            rows = cur.execute(
                f"SELECT keyed_partition, consumed_offset FROM {offsets} "
                "WHERE keyed_partition IN (SELECT unnest(?))",
                [[c.keyed_partition for c in mine]],
            ).fetchall()
            _fence(
                dict(rows),
                {c.keyed_partition: c.from_offset for c in mine},
                f"{family} keyed partition {{key}}: consumed offset is {{stored}}, records "
                "were read from {read}",
            )
        commits = [_settle(cur, c) if c.verdicts is not None else c for c in commits]
        _append_deltas(cur, commits, seq)
        # One statement per table and family for all its commits: DuckDB costs about a
        # millisecond per statement (an upsert per row of executemany is one each).
        for family in sorted({c.family for c in commits}):
            offsets, high_water, _ = _family_tables(family)
            mine = [c for c in commits if c.family == family]
            cur.execute(
                f"INSERT INTO {offsets} AS k "
                "SELECT unnest($k), unnest($to), unnest($corrections), unnest($at) "
                "ON CONFLICT (keyed_partition) DO UPDATE SET "
                "consumed_offset = excluded.consumed_offset, "
                "corrections = k.corrections + excluded.corrections, "
                "committed_at_ms = excluded.committed_at_ms",
                {
                    "k": [c.keyed_partition for c in mine],
                    "to": [c.to_offset for c in mine],
                    "corrections": [c.corrections for c in mine],
                    "at": [c.committed_at_ms for c in mine],
                },
            )
            marks = [
                (c.keyed_partition, p, o) for c in mine for p, o in sorted(c.high_water.items())
            ]
            if marks:
                cur.execute(
                    f"INSERT INTO {high_water} SELECT unnest($k), unnest($p), unnest($o) "
                    "ON CONFLICT (keyed_partition, source_partition) DO UPDATE SET "
                    "source_offset = excluded.source_offset",
                    {
                        "k": [k for k, _, _ in marks],
                        "p": [p for _, p, _ in marks],
                        "o": [o for _, _, o in marks],
                    },
                )
            _record_specs(cur, family, mine)
        _forget_settled(cur, commits)
        _add_per_rule(
            cur, "keyed_rule_corrections", "corrections", [c.corrections_by_rule for c in commits]
        )
        _add_per_rule(cur, "keyed_rule_reviews", "clicks", [c.reviews_by_rule for c in commits])
        return commits

    def keyed_applied(self, family: str, keyed_partition: int, from_offset: int) -> pa.Table:
        _family_tables(family)
        return (
            self._cursor()
            .sql(
                "SELECT event_id, rule_id, previous_rule_id, applied_at_ms FROM keyed_applied "
                "WHERE family = $1 AND keyed_partition = $2 AND from_offset >= $3 "
                "ORDER BY from_offset, seq",
                params=[family, keyed_partition, from_offset],
            )
            .to_arrow_table()
        )

    def release_settled(self, family: str) -> None:
        _family_tables(family)  # a known family
        with self._commit_lock:
            self._transaction(
                lambda cur: cur.execute("DELETE FROM keyed_settled WHERE family = ?", [family])
            )

    def keyed_corrections_by_rule(self) -> dict[str, int]:
        rows = self._fetch("SELECT rule_id, corrections FROM keyed_rule_corrections")
        return {str(rule): int(n) for rule, n in rows}

    def keyed_reviews_by_rule(self) -> dict[str, int]:
        rows = self._fetch("SELECT rule_id, clicks FROM keyed_rule_reviews")
        return {str(rule): int(n) for rule, n in rows}

    def keyed_progress(self, family: str = "ip") -> dict[int, KeyedProgress]:
        offsets_table, high_water, specs_table = _family_tables(family)
        offsets = self._fetch(
            f"SELECT keyed_partition, consumed_offset, corrections FROM {offsets_table}"
        )
        marks = self._fetch(
            f"SELECT keyed_partition, source_partition, source_offset FROM {high_water}"
        )
        high: dict[int, dict[int, int]] = {}
        for k, p, o in marks:
            high.setdefault(int(k), {})[int(p)] = int(o)
        specs: dict[int, list[tuple[int, str]]] = {}
        for k, start, spec in self._fetch(
            f"SELECT keyed_partition, from_offset, spec_json FROM {specs_table} "
            "ORDER BY keyed_partition, from_offset"
        ):
            specs.setdefault(int(k), []).append((int(start), str(spec)))
        return {
            int(k): KeyedProgress(
                int(o), high.get(int(k), {}), int(n), tuple(specs.get(int(k), ()))
            )
            for k, o, n in offsets
        }

    def pending_delta_rows(self) -> int:
        """Delta rows appended and not yet compacted (what the next compaction merges)."""
        return self._pending_rows

    def compact(self, max_seq: int | None = None) -> CompactionResult:
        """Merge every delta with ``seq <= cut`` into the base tables and delete it, in ONE
        transaction; ``cut`` is ``max_seq`` or else the newest committed round. Off the hot
        path: it batches many rounds' deltas per key.

        It does NOT take the commit lock: commits go on meanwhile. DuckDB transactions are
        optimistic and conflict only on rows both write; compaction deletes delta rows with
        ``seq <= cut`` (committed before it began) and writes base rows and ``delta_state``,
        a commit appends delta rows with ``seq > cut`` and writes ``partition_offsets``:
        disjoint rows. Should DuckDB still report a conflict, the compaction is retried (it
        rolled back whole), never the commit. Queries are exact throughout."""
        started = time.perf_counter()
        with self._compact_lock:
            # _last_seq is set after its commit returned: every delta up to it is visible to
            # a transaction begun now.
            newest = self._last_seq
            cut = newest if max_seq is None else min(max_seq, newest)
            if cut <= self._compacted_seq:
                return CompactionResult(cut, 0, time.perf_counter() - started)
            merged = 0

            def body(cur: duckdb.DuckDBPyConnection) -> None:
                nonlocal merged
                [(rolled, watermark)] = cur.execute(
                    "SELECT (SELECT max(rolled_ms) FROM delta_state), "
                    "(SELECT max(watermark_ms) FROM partition_offsets)"
                ).fetchall()
                # Minutes wholly before the watermark get (almost) no more deltas: roll
                # them up into the hours now. The newest watermark, not the oldest, so an
                # idle partition cannot hold the roll-up back; a lagging partition's deltas
                # for rolled-up minutes just go to both tables. Answers never depend on
                # it, only how often a row is rewritten.
                roll_to = max(rolled, (watermark or 0) - (watermark or 0) % MINUTE_MS)
                merged = sum(
                    self._compact_family(cur, family, cut, rolled, roll_to) for family in _FAMILIES
                )
                cur.execute(
                    "UPDATE delta_state SET compacted_seq = ?, rolled_ms = ?", [cut, roll_to]
                ).fetchall()

            for attempt in range(_COMPACT_ATTEMPTS):
                try:
                    self._transaction(body)
                    break
                except duckdb.TransactionException:
                    if attempt == _COMPACT_ATTEMPTS - 1:
                        raise
            self._compacted_seq = cut
            with self._state_lock:
                self._pending_rows = max(0, self._pending_rows - merged)
            self._checkpoint()
        return CompactionResult(cut, merged, time.perf_counter() - started)

    def _checkpoint(self) -> None:
        """Fold the WAL into the database file while no write transaction is open: under the
        compaction lock (no compaction) and the commit lock (no commit), taken only if free:
        compaction never waits for commits. Queries may be reading meanwhile (they write
        nothing). Skipped, to be done after the next compaction, when a commit holds the
        lock or DuckDB declines."""
        if not self._commit_lock.acquire(blocking=False):
            return
        try:
            with _out_of_space_as_oserror():
                self._cursor().execute("CHECKPOINT").fetchall()
        except duckdb.TransactionException:
            pass
        finally:
            self._commit_lock.release()

    @staticmethod
    def _compact_family(
        cur: duckdb.DuckDBPyConnection, family: _Family, cut: int, rolled: int, roll_to: int
    ) -> int:
        """Merge one family's deltas up to ``cut`` into its minute table, and into its hour
        table only those of minutes already rolled up (before ``rolled``: rare, they were
        nearly late); then roll the minutes [rolled, roll_to) up into the hour table. Sums
        in SQL, sketches in Python; returns the delta rows merged (and deleted).

        Hour rows are the widest sketches (a busy ad's hour is in HLL mode, 4 KB); a minute
        goes into them once, when it is final, not at every compaction that touches it."""
        deltas = f"{family.delta} WHERE seq <= {int(cut)}"
        rows = _merge_into(cur, family, "minute", deltas)
        if rows:
            _merge_into(cur, family, "hour", f"{deltas} AND minute_ms < {int(rolled)}")
        if roll_to > rolled:
            _merge_into(
                cur,
                family,
                "hour",
                f"{family.minute} WHERE minute_ms >= {int(rolled)} AND minute_ms < {int(roll_to)}",
            )
        if rows:
            cur.execute(f"DELETE FROM {family.delta} WHERE seq <= ?", [cut]).fetchall()
        return rows

    def _transaction(self, body: Callable[[duckdb.DuckDBPyConnection], object]) -> None:
        with _out_of_space_as_oserror():
            cur = self._cursor()
            cur.execute("BEGIN")
            try:
                body(cur)
                cur.execute("COMMIT")
            except BaseException:
                # A failed statement aborts DuckDB's transaction and a failed COMMIT has
                # already rolled back; ROLLBACK just ends it, and must not hide the
                # original error.
                with contextlib.suppress(duckdb.Error):
                    cur.execute("ROLLBACK")
                raise

    def _apply(
        self, cur: duckdb.DuckDBPyConnection, commits: Sequence[PartitionCommit], seq: int
    ) -> None:
        # fetchall, not fetchone: DuckDB 2 refuses register() while a result is unfinished.
        rows = cur.execute(
            'SELECT "partition", committed_offset FROM partition_offsets '
            'WHERE "partition" IN (SELECT unnest(?))',
            [[c.partition for c in commits]],
        ).fetchall()
        _fence(
            dict(rows),
            {c.partition: c.from_offset for c in commits},
            "partition {key}: committed offset is {stored}, batch was read from {read}",
        )
        _append_deltas(cur, commits, seq)
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
        minute tables, hour and day windows the hour tables; both add the newer deltas.
        """
        if group_by is None:
            family = _ADS
        else:
            found = _BY_DIMENSION.get(group_by)
            if found is None:
                raise ValueError(f"cannot group by {group_by!r}")
            family = found
        return self._windows(family, "ad_id", ad_id, start_ms, end_ms, granularity)

    def rollup(
        self,
        *,
        level: RollupLevel,
        id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        """Windows of every ad of one advertiser or campaign (see :meth:`aggregates`)."""
        if level not in ("advertiser", "campaign"):
            raise ValueError(f"unknown roll-up level {level!r}")
        return self._windows(_ADS, _OWNER_COLUMNS[level], id, start_ms, end_ms, granularity)

    def _windows(
        self,
        family: _Family,
        owner_col: str,
        owner: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        size = _WINDOW_MS.get(granularity)
        if size is None:
            raise ValueError(f"unknown granularity {granularity!r}")
        grain = "minute" if granularity == "minute" else "hour"
        params = {
            "id": owner,
            "lo": _ceil(start_ms, size),
            "hi": _ceil(end_ms, size),
            "size": size,
        }
        rows = self._fetch_base(_WINDOWS[(family.dim, grain, owner_col)], params)
        users = _unique_users([row[-1] for row in rows])
        return [
            AggregateRow(
                window_ms=int(w),
                group=g,
                clicks=int(clicks),
                impressions=int(imps),
                spend_micros=int(spend),
                invalid_clicks=int(invalid),
                unique_users=n,
            )
            for (w, g, clicks, imps, spend, invalid, _), n in zip(rows, users, strict=True)
        ]

    @staticmethod
    def _minute_range(start_ms: int, end_ms: int) -> dict[str, object]:
        hour_lo, hour_hi = _ceil(start_ms, HOUR_MS), end_ms - end_ms % HOUR_MS
        if hour_lo >= hour_hi:  # no whole hour inside: every minute from the minute rows
            hour_lo = hour_hi = start_ms
        return {"lo": start_ms, "hi": end_ms, "hlo": hour_lo, "hhi": hour_hi}

    def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        """Sums over the minutes in [start_ms, end_ms); zeros when there are none."""
        params = {"ad": ad_id, **self._minute_range(start_ms, end_ms)}
        # An aggregate without GROUP BY yields exactly one row.
        [(clicks, imps, spend, invalid, sketches)] = self._fetch_base(_TOTALS[unique_users], params)
        [users] = _unique_users([sketches])
        return Totals(
            clicks=int(clicks),
            impressions=int(imps),
            spend_micros=int(spend),
            unique_users=users,
            invalid_clicks=int(invalid),
        )

    def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        """The ``limit`` ads with the largest ``by`` over the minutes in [start_ms, end_ms)
        (of one advertiser if given), largest first, ties by ad_id; one query."""
        if by not in _SUMS:
            raise ValueError(f"cannot rank by {by!r}")
        if limit < 0:
            raise ValueError("limit must not be negative")
        params: dict[str, object] = {"n": limit, **self._minute_range(start_ms, end_ms)}
        if advertiser_id is not None:
            params["advertiser"] = advertiser_id
        rows = self._fetch_base(_TOP_ADS[(by, advertiser_id is not None)], params)
        users = _unique_users([row[-1] for row in rows])
        return [
            AdTotals(
                ad_id=ad,
                advertiser_id=adv,
                campaign_id=campaign,
                clicks=int(clicks),
                impressions=int(imps),
                spend_micros=int(spend),
                invalid_clicks=int(invalid),
                unique_users=n,
            )
            for (ad, adv, campaign, clicks, imps, spend, invalid, _), n in zip(
                rows, users, strict=True
            )
        ]

    def minute_rows_since(self, since_ms: int) -> pa.Table:
        table: pa.Table = self._cursor().sql(_MINUTE_ROWS_SINCE, params=[since_ms]).to_arrow_table()
        return table

    def recent_rows(self, since_ms: int, hours_since_ms: int | None = None) -> RecentSnapshot:
        """Every per-ad minute row from ``since_ms`` on, base and deltas unmerged (sums and
        sketches add up; ``MINUTE_SCHEMA``), with the partitions' committed offsets and, per
        keyed family, its keyed partitions' consumed offsets, which they hold everything up
        to, all read in ONE snapshot: where a replica in another process starts from.

        With ``hours_since_ms`` (both bounds whole hours), also the rows of the hours in
        [hours_since_ms, since_ms), ``minute_ms`` holding the hour: the hour base, the
        minutes not rolled up yet and the deltas, each rolled to its hour, unmerged. The
        hours end where the minute rows begin, so a minute is in exactly one of the two."""
        cols = ", ".join(_ADS.columns)
        hour_cols = cols.replace("minute_ms", f"minute_ms - minute_ms % {HOUR_MS} AS minute_ms")
        cur = self._cursor()
        with _out_of_space_as_oserror():
            cur.execute("BEGIN")
            try:
                rows = cur.sql(
                    f"SELECT {cols} FROM agg_minute WHERE minute_ms >= $since "
                    f"UNION ALL SELECT {cols} FROM delta_minute WHERE minute_ms >= $since",
                    params={"since": since_ms},
                ).to_arrow_table()
                hours = None
                if hours_since_ms is not None:
                    if since_ms % HOUR_MS or hours_since_ms % HOUR_MS:
                        raise ValueError("recent hours must start and end on whole hours")
                    [(rolled,)] = cur.execute("SELECT max(rolled_ms) FROM delta_state").fetchall()
                    hours = cur.sql(
                        f"SELECT {cols.replace('minute_ms', 'hour_ms AS minute_ms')} "
                        "FROM agg_hour WHERE hour_ms >= $lo AND hour_ms < $hi "
                        f"UNION ALL SELECT {hour_cols} FROM agg_minute "
                        "WHERE minute_ms >= $lo AND minute_ms < $hi AND minute_ms >= $rolled "
                        f"UNION ALL SELECT {hour_cols} FROM delta_minute "
                        "WHERE minute_ms >= $lo AND minute_ms < $hi",
                        params={"lo": hours_since_ms, "hi": since_ms, "rolled": int(rolled)},
                    ).to_arrow_table()
                offsets = cur.execute(
                    'SELECT "partition", committed_offset FROM partition_offsets'
                ).fetchall()
                keyed = {
                    family: cur.execute(
                        f"SELECT keyed_partition, consumed_offset FROM {tables[0]}"
                    ).fetchall()
                    for family, tables in _FAMILY_TABLES.items()
                }
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")  # read only: nothing to lose, nothing to conflict
        return RecentSnapshot(
            minutes=rows,
            hours=hours,
            committed={int(p): int(o) for p, o in offsets},
            keyed={family: {int(k): int(o) for k, o in rows} for family, rows in keyed.items()},
        )

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
        with self._compact_lock, self._commit_lock:
            self._conn.close()

    def __enter__(self) -> DuckDBStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
