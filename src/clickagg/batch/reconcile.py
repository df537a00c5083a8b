"""Reconcile one event hour from the archive: the billing-grade numbers of that hour.

The stream decides within its horizon; the batch layer decides over the billing period
(the UTC calendar month of the hour) with every copy of every event in the archive:

* **Exact dedup by id over the month.** Of all archived copies of one (event type, id) —
  the 128-bit fingerprint — the first in log order wins (every copy of an id goes to the
  same partition, so that is the order they were acknowledged): the copy the stream saw
  first. It counts in the hour of its own event time. So a copy the stream
  could not recognise (re-sent beyond its horizon, with another timestamp) never counts
  twice, and a copy the stream left out as late counts where it belongs.
* **Invalid traffic** keeps the stream's verdict (status ``invalid`` with its reason) and
  adds the batch-only verdicts of :data:`InvalidHook` (the keyed, behavioural rules): the
  hour's winners are judged with the winners of the ``lookback`` before the hour as context
  (a repeat click at ``:00:05`` of one at ``:59:55``), and only the hour's are flagged. A
  review hook's verdicts (e.g. an ad's CTR spike) are counted in the report
  (``review_clicks``) and stay billable.
* **Spend** is the event's own cost, else the ad's CPC from the registry: the stream's
  definition (``aggregate.with_minute_and_spend``), applied to late events too.
* **The rows** come from the stream's own aggregation (``aggregate.round_deltas``): one
  definition of a minute row, its breakdowns and its unique-user sketch for both layers.

The engine only selects the winning copies (SQL over the archive's Parquet files); what
they add up to is computed by the same core code as the stream's. Engines are adapters of
:class:`PeriodSource`: :class:`PeriodView` (DuckDB, in process, the default: it reads an
hour and, through the archive's id index, the copies of its ids elsewhere in the month, so
closing an hour costs the hour, not the month to date) and
``clickagg.batch.spark_engine.SparkPeriodView`` (Spark, which ranks the whole period: for
archives a single process should not rank). Both return the same tables,
:data:`WINNERS_SCHEMA` and :data:`STREAM_SCHEMA` in the same row order, so the final rows do
not depend on the engine.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from clickagg.archive.parquet import COPY_KEY_COLUMNS, PeriodIndex
from clickagg.core import aggregate, fates, ids
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.prices import PriceBook
from clickagg.core.windows import HOUR_MS

InvalidHook = Callable[[pl.DataFrame, int], pl.Series]
"""Given the hour's winning events preceded by the lookback's (context: before the hour), and
the hour's start, a reason per event (null: valid): batch-only verdicts. Only the hour's
reasons are used."""

WINNER_COLUMNS = (
    "partition",
    "offset",
    "event_id",
    "event_type",
    "status",
    "reason",
    "ad_id",
    "advertiser_id",
    "campaign_id",
    "user_id",
    "ip",  # what the invalid-traffic rules judge
    "user_agent",
    "country",
    "device",
    "browser",
    "ts_ms",
    "received_ms",
    "cost_micros",
    "fp_high",
    "fp_low",
)
WINNERS_SCHEMA = pa.schema([DECISION_SCHEMA.field(name) for name in WINNER_COLUMNS])
"""The winning copies of an hour's events, in log order (partition, offset)."""

STREAM_SCHEMA = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        *(
            pa.field(name, pa.int64(), nullable=False)
            for name in (
                "stream_clicks",
                "stream_impressions",
                "stream_spend_micros",
                "beyond_horizon_clicks",
                "beyond_horizon_spend_micros",
            )
        ),
    ]
)
"""The stream's view of an hour per ad, by ad_id: what it counted (every archived copy of
the hour's events, each with the stream's verdict) and which of that was a copy the batch
does not count (not the first of its id over the period: beyond the stream's horizon)."""

_COLUMNS = ", ".join(f'"{name}"' for name in WINNER_COLUMNS)


class PeriodSource(Protocol):
    """A batch engine's view of one billing period of the archive: every copy of each
    (event type, id) ranked in log order over the whole period, asked one hour at a time.
    What the winners add up to is not the engine's business (:func:`reconcile_hour`)."""

    def hour(self, hour_ms: int) -> tuple[pa.Table, pa.Table] | None:
        """(the winning copy of every event of the hour, :data:`WINNERS_SCHEMA` in log
        order; the stream's view of it per ad, :data:`STREAM_SCHEMA` by ad_id), or None when
        the period holds nothing."""
        ...

    def winners(self, start_ms: int, end_ms: int) -> pa.Table:
        """The winning copy of every event in [start_ms, end_ms), :data:`WINNERS_SCHEMA` in
        log order: an hour's context for the rules. Each event is the winner of its own
        billing period (context before the month's start ranks in the month before)."""
        ...

    def close(self) -> None: ...


EngineFactory = Callable[[Sequence[Path], int, int], PeriodSource]
"""Opens an engine's :class:`PeriodSource` on (the period's archive files, the first event
time it must answer for, the end of the last): the engine ranks the whole files. The billing
period is the month of the last hour; events before its start (the rules' context of its
first hours, with the files of their own month) rank within their own month."""

ENGINES = ("duckdb", "spark")


class EngineError(RuntimeError):
    """The engine asked for cannot run here (an optional dependency missing): a user's
    error to show, not a bug."""


def engine_factory(
    engine: str,
    *,
    spark_master: str | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> EngineFactory:
    """The factory of the engine named ``engine`` (one of :data:`ENGINES`). Spark is
    imported only when asked for: it is an optional dependency (and a JVM).
    ``spark_master`` (a Spark master URL, e.g. ``spark://host:7077``) runs the Spark engine
    on that cluster instead of in local mode; ``spark_conf`` adds Spark settings."""
    if (spark_master is not None or spark_conf) and engine != "spark":
        raise ValueError("a Spark master or Spark settings apply to the spark engine only")
    if engine == "duckdb":
        return PeriodView
    if engine == "spark":
        try:
            from clickagg.batch.spark_engine import SparkPeriodView
        except ImportError as e:
            if (e.name or "").split(".")[0] not in ("pyspark", "py4j"):
                raise
            raise EngineError(
                "the spark engine needs pyspark, the spark extra: pip install -e '.[spark]'"
            ) from e
        if spark_master is None and not spark_conf:
            return SparkPeriodView
        return functools.partial(SparkPeriodView, master=spark_master, conf=spark_conf)
    raise ValueError(f"unknown batch engine {engine!r}: one of {', '.join(ENGINES)}")


@dataclass(frozen=True)
class HourResult:
    hour_ms: int
    minute: pa.Table  # aggregate.MINUTE_SCHEMA
    dimensions: Mapping[str, pa.Table]  # aggregate.DIMENSION_SCHEMAS
    report: pa.Table  # REPORT_SCHEMA: stream vs batch per ad, and why
    events: int  # winning events of the hour (counted + invalid)
    late_counted: int  # winners the stream had left out as late
    invalid: int
    review: int = 0  # billable clicks flagged for review
    # Each winner with its verdict (``invalid``, ``reason``) and ``spend_micros``, in log
    # order: what a what-if replay compares click by click.
    judged: pl.DataFrame | None = None


def period_rank(start_ms: int, end_ms: int) -> str:
    """The SQL (DuckDB's and Spark's alike, no time zone involved) of the billing period an
    event of a view of [start_ms, end_ms) is deduplicated in: the number of month starts
    after ``start_ms`` at or before its time. A view is one month's hours and maybe the
    rules' context before them, from the months before."""
    starts = []
    month = month_of(start_ms)[1]
    while month < end_ms:
        starts.append(month)
        month = month_of(month)[1]
    if not starts:
        return "0"
    cases = " ".join(f"WHEN ts_ms < {m} THEN {i}" for i, m in enumerate(starts))
    return f"CASE {cases} ELSE {len(starts)} END"


def month_of(hour_ms: int) -> tuple[int, int]:
    """[start, end) of the UTC calendar month holding ``hour_ms``: the billing period."""
    day = dt.datetime.fromtimestamp(hour_ms / 1000, dt.UTC)
    start = dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC)
    days = calendar.monthrange(day.year, day.month)[1]
    end = start + dt.timedelta(days=days)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


REPORT_SCHEMA = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        *(
            pa.field(f"{side}_{measure}", pa.int64(), nullable=False)
            for side in ("stream", "batch")
            for measure in ("clicks", "impressions", "spend_micros")
        ),
        # The causes of batch - stream, in clicks and spend (late: +, duplicates beyond
        # the stream's horizon: -, invalid traffic found by the batch: -).
        pa.field("late_clicks", pa.int64(), nullable=False),
        pa.field("late_spend_micros", pa.int64(), nullable=False),
        pa.field("beyond_horizon_clicks", pa.int64(), nullable=False),
        pa.field("beyond_horizon_spend_micros", pa.int64(), nullable=False),
        pa.field("newly_invalid_clicks", pa.int64(), nullable=False),
        # Billable clicks a review-only rule flagged (e.g. a CTR spike): reported, not removed.
        pa.field("review_clicks", pa.int64(), nullable=False),
    ]
)
"""Per ad of one hour: what the stream counted, what the batch counts, and why they differ."""


class PeriodView:
    """The DuckDB engine: the first copies of an hour's events, found from that hour.

    A copy of hour H loses to an earlier copy (log order) of its (event type, id) in the
    same billing period, in H or in another hour of the month. So the view reads H's rows,
    plus the rows elsewhere in the month that share a fingerprint with one of them, and ranks
    that union as the month's ranking would rank it (:class:`MonthRankedView`, its
    reference): the same winners and the same ``copy > 1`` for the stream's view, for work
    that grows with the hour, not with the month to date.

    Where else a fingerprint occurs comes from the archive's id index
    (:class:`~clickagg.archive.parquet.PeriodIndex`: a binary search per fingerprint, then
    the few matching rows read in full and compared on the whole key). Files that are not
    an indexed archive's (a test's, a copy) are asked the same question with a semi-join
    that reads only the key columns of the period's other rows."""

    def __init__(self, files: Sequence[Path], start_ms: int, end_ms: int) -> None:
        self.start_ms, self.end_ms = start_ms, end_ms
        self.files = [str(f) for f in files]
        self.con = duckdb.connect()
        self.empty = not files
        self.index = PeriodIndex.over(list(files)) if files else None
        self._ranked: tuple[int, int] | None = None  # the range the table ``ranked`` holds

    def hour(self, hour_ms: int) -> tuple[pa.Table, pa.Table] | None:
        """(the winning copy of every event of the hour, the stream's view of it per ad),
        or None when the period holds nothing."""
        if not self.start_ms <= hour_ms < self.end_ms:
            raise ValueError("hour outside the view")
        if self.empty:
            return None
        bounds = (hour_ms, hour_ms + HOUR_MS)
        winners = self.winners(*bounds)
        return winners, _stream_view(self.con)

    def winners(self, start_ms: int, end_ms: int) -> pa.Table:
        """The winning copies of the events in [start_ms, end_ms), in log order."""
        if start_ms < self.start_ms or end_ms > self.end_ms:
            raise ValueError("winners asked for outside the view")
        if self.empty:
            return WINNERS_SCHEMA.empty_table()
        self._rank(start_ms, end_ms)
        return (
            self.con.sql(
                f'SELECT {_COLUMNS} FROM ranked WHERE copy = 1 ORDER BY partition, "offset"'
            )
            .to_arrow_table()
            .cast(WINNERS_SCHEMA)
        )

    def _rank(self, start_ms: int, end_ms: int) -> None:
        """Fill ``ranked``: every copy of [start_ms, end_ms) with its number among the
        copies of its (event type, id) in its billing period, in log order."""
        if self._ranked == (start_ms, end_ms):
            return
        # The months of the range: where an earlier copy of its events may be.
        months = (month_of(start_ms)[0], month_of(end_ms - 1)[1])
        sources = self.index.files_of(start_ms, end_ms) if self.index else self.files
        if sources:
            rows = self.con.sql(
                "SELECT * FROM read_parquet($files) WHERE ts_ms >= $start AND ts_ms < $end",
                params={"files": [str(f) for f in sources], "start": start_ms, "end": end_ms},
            ).to_arrow_table()
        else:
            rows = DECISION_SCHEMA.empty_table()
        self.con.register("in_range", rows)
        if self.index is not None:
            elsewhere = self.index.copies_elsewhere(
                rows["fp_high"].to_numpy(), (start_ms, end_ms), months
            )
        else:
            elsewhere = self.con.sql(
                f"""
                SELECT {", ".join(f'"{c}"' for c in COPY_KEY_COLUMNS)} FROM read_parquet($files)
                WHERE (ts_ms < $start OR ts_ms >= $end) AND ts_ms >= $lo AND ts_ms < $hi
                    AND fp_high IN (SELECT fp_high FROM in_range)
                """,
                params={
                    "files": self.files,
                    "start": start_ms,
                    "end": end_ms,
                    "lo": months[0],
                    "hi": months[1],
                },
            ).to_arrow_table()
        self.con.register("other_copies", elsewhere)
        self.con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE ranked AS
            SELECT * EXCLUDE (inside) FROM (
                SELECT *, row_number() OVER (
                    PARTITION BY fp_high, fp_low, event_type, {period_rank(*months)}
                    ORDER BY partition, "offset") AS copy
                FROM (
                    SELECT *, true AS inside FROM in_range
                    UNION ALL BY NAME
                    SELECT *, false AS inside FROM other_copies
                )
            ) WHERE inside
            """
        )
        self.con.unregister("in_range")
        self.con.unregister("other_copies")
        self._ranked = (start_ms, end_ms)

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
        self.con.close()

    def __enter__(self) -> PeriodView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream_view(con: duckdb.DuckDBPyConnection, bounds: tuple[int, int] | None = None) -> pa.Table:
    """The stream's view per ad of the copies in ``ranked`` (those with an event time in
    ``bounds``, if given): what it counted, and which of that was not the first copy of its
    id in the period (:data:`STREAM_SCHEMA`)."""
    where = "WHERE ts_ms >= $1 AND ts_ms < $2" if bounds else ""
    # sum() of BIGINT is HUGEINT in DuckDB: back to int64 (a month of micros fits).
    return (
        con.sql(
            f"""
            SELECT ad_id,
                count(*) FILTER (WHERE status = 'counted' AND event_type = 'click')
                    AS stream_clicks,
                count(*) FILTER (WHERE status IN ('counted', 'invalid')
                                 AND event_type = 'impression') AS stream_impressions,
                CAST(coalesce(sum(spend_micros), 0) AS BIGINT) AS stream_spend_micros,
                count(*) FILTER (WHERE copy > 1 AND status = 'counted'
                                 AND event_type = 'click') AS beyond_horizon_clicks,
                CAST(coalesce(sum(spend_micros) FILTER (WHERE copy > 1), 0) AS BIGINT)
                    AS beyond_horizon_spend_micros
            FROM ranked {where} GROUP BY ad_id ORDER BY ad_id
            """,
            params=list(bounds) if bounds else None,
        )
        .to_arrow_table()
        .cast(STREAM_SCHEMA)
    )


class MonthRankedView:
    """The reference the DuckDB engine answers as: every copy of the whole billing period
    (all the files) numbered in log order per (event type, id) with a window function, kept
    for the hours asked for. Exact and simple, but closing the last hour of a month ranks the
    whole month to date; :class:`PeriodView` gives the same tables from the hour's rows."""

    def __init__(self, files: Sequence[Path], start_ms: int, end_ms: int) -> None:
        self.start_ms, self.end_ms = start_ms, end_ms
        self.con = duckdb.connect()
        self.empty = not files
        if self.empty:
            return
        self.con.execute(
            f"""
            CREATE TEMP TABLE ranked AS
            SELECT * FROM (
                SELECT *, row_number() OVER (
                    PARTITION BY fp_high, fp_low, event_type, {period_rank(start_ms, end_ms)}
                    ORDER BY partition, "offset") AS copy
                FROM read_parquet(?)
            ) WHERE ts_ms >= ? AND ts_ms < ?
            """,
            [[str(f) for f in files], start_ms, end_ms],
        )

    def hour(self, hour_ms: int) -> tuple[pa.Table, pa.Table] | None:
        """(the winning copy of every event of the hour, the stream's view of it per ad),
        or None when the period holds nothing."""
        if not self.start_ms <= hour_ms < self.end_ms:
            raise ValueError("hour outside the view")
        if self.empty:
            return None
        bounds = (hour_ms, hour_ms + HOUR_MS)
        return self.winners(*bounds), _stream_view(self.con, bounds)

    def winners(self, start_ms: int, end_ms: int) -> pa.Table:
        """The winning copies of the events in [start_ms, end_ms), in log order."""
        if start_ms < self.start_ms or end_ms > self.end_ms:
            raise ValueError("winners asked for outside the view")
        if self.empty:
            return WINNERS_SCHEMA.empty_table()
        return (
            self.con.sql(
                f"SELECT {_COLUMNS} FROM ranked WHERE copy = 1 AND ts_ms >= $1 AND ts_ms < $2 "
                'ORDER BY partition, "offset"',
                params=[start_ms, end_ms],
            )
            .to_arrow_table()
            .cast(WINNERS_SCHEMA)
        )

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> MonthRankedView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _report(priced: pl.DataFrame, stream: pa.Table) -> pa.Table:
    """Join the batch's per-ad sums to the stream's, with the causes of the difference."""
    click = pl.col("event_type") == ids.CLICK
    valid_click = click & ~pl.col("invalid")
    late = pl.col("status") == fates.LATE
    batch = priced.group_by("ad_id").agg(
        valid_click.sum().cast(pl.Int64).alias("batch_clicks"),
        (pl.col("event_type") == ids.IMPRESSION).sum().cast(pl.Int64).alias("batch_impressions"),
        pl.col("spend_micros").filter(valid_click).sum().cast(pl.Int64).alias("batch_spend_micros"),
        (valid_click & late).sum().cast(pl.Int64).alias("late_clicks"),
        pl.col("spend_micros")
        .filter(valid_click & late)
        .sum()
        .cast(pl.Int64)
        .alias("late_spend_micros"),
        # Counted by the stream, invalid by a verdict only the batch made. (A late click the
        # batch finds invalid was never counted by the stream: no difference to explain.)
        (click & pl.col("invalid") & (pl.col("status") == fates.COUNTED))
        .sum()
        .cast(pl.Int64)
        .alias("newly_invalid_clicks"),
        (valid_click & pl.col("review")).sum().cast(pl.Int64).alias("review_clicks"),
    )
    streamed = pl.from_arrow(stream)
    assert isinstance(streamed, pl.DataFrame)
    joined = streamed.join(batch, on="ad_id", how="full", coalesce=True).fill_null(0)
    return joined.select(REPORT_SCHEMA.names).sort("ad_id").to_arrow().cast(REPORT_SCHEMA)


def reconcile_hour(
    view: PeriodSource,
    hour_ms: int,
    *,
    cpc_micros: PriceBook | Mapping[str, int],
    invalid: InvalidHook | None = None,
    review: InvalidHook | None = None,
    lookback_ms: int = 0,
    recent: dict[int, pa.Table] | None = None,
    stream_verdicts: bool = True,
) -> HourResult:
    """The final rows of one event hour, from its billing period's view. The hooks judge
    the hour's winners with the whole hours reaching ``lookback_ms`` before it as context
    (the view must hold them, from :func:`context_start`); ``review`` flags billable clicks
    for the report only. ``recent``: winners of hours already asked for, by hour, kept
    across calls by a caller reconciling consecutive hours (their contexts overlap).

    ``stream_verdicts=False`` sets the stream's invalid-traffic verdicts aside and lets
    ``invalid`` alone judge every winner: what the hour would be had those rules been in
    force when its events arrived (the stream judged with the rules then in force). A
    what-if (``clickagg rules replay``); reconciling keeps them."""
    if hour_ms % HOUR_MS:
        raise ValueError("an hour starts on a whole UTC hour")
    selected = view.hour(hour_ms)
    if selected is None:
        empty = aggregate.MINUTE_SCHEMA.empty_table()
        dims = aggregate.empty_dimension_deltas()
        return HourResult(hour_ms, empty, dims, REPORT_SCHEMA.empty_table(), 0, 0, 0)
    table, stream = selected
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    lookback_ms = lookback_ms if invalid or review else 0
    seen = _with_context(view, frame, hour_ms, lookback_ms, recent)
    if recent is not None:
        recent[hour_ms] = table
    context = seen.height - frame.height

    def verdicts(hook: InvalidHook) -> pl.Series:
        return hook(seen, hour_ms).slice(context).cast(pl.String)

    flagged = pl.col("status") == fates.INVALID
    if not stream_verdicts:
        frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("reason"))
        flagged = pl.lit(False)
    if invalid is not None:
        extra = verdicts(invalid)
        frame = frame.with_columns(
            pl.when(flagged).then(pl.col("reason")).otherwise(extra).alias("reason")
        )
        flagged = flagged | pl.col("reason").is_not_null()
    for_review = (
        verdicts(review).is_not_null()
        if review is not None
        else pl.repeat(False, frame.height, eager=True)
    ).alias("review")
    events = frame.with_columns(
        pl.col("event_type").replace_strict(ids.EVENT_TYPE_CODES, return_dtype=pl.UInt8),
        flagged.alias("invalid"),
        pl.col("cost_micros").fill_null(-1),
    )
    priced = aggregate.with_minute_and_spend(events, cpc_micros)
    minute, dimensions = aggregate.round_deltas(priced)
    report = _report(priced.with_columns(for_review), stream)
    return HourResult(
        hour_ms,
        minute,
        dimensions,
        report,
        events=events.height,
        late_counted=int((events["status"] == fates.LATE).sum()),
        invalid=int(events["invalid"].sum()),
        review=int(pc.sum(report["review_clicks"]).as_py() or 0),
        judged=priced,
    )


def context_start(hour_ms: int, lookback_ms: int) -> int:
    """Where an hour's context starts: the start of the hour holding ``hour_ms -
    lookback_ms`` (whole hours: each rule sees its own lookback of them)."""
    start = hour_ms - lookback_ms
    return start - start % HOUR_MS


def _with_context(
    view: PeriodSource,
    hour: pl.DataFrame,
    hour_ms: int,
    lookback_ms: int,
    recent: dict[int, pa.Table] | None,
) -> pl.DataFrame:
    """The hour's winners preceded by those of the whole hours of its context, each hour in
    log order (events of equal times are in one hour: the same order whatever asks)."""
    if not lookback_ms:
        return hour
    first = context_start(hour_ms, lookback_ms)
    parts = []
    for start in range(first, hour_ms, HOUR_MS):
        table = recent.get(start) if recent is not None else None
        parts.append(table if table is not None else view.winners(start, start + HOUR_MS))
    if recent is not None:
        for start in [h for h in recent if h < first]:
            del recent[start]
    context = pl.from_arrow(pa.concat_tables(parts))
    assert isinstance(context, pl.DataFrame)
    return pl.concat([context, hour], how="vertical")
