"""The Spark engine of the batch layer: the same billing-period view as DuckDB's
(:class:`clickagg.batch.reconcile.PeriodView`), computed by Spark over the same Parquet files.

Why a second engine: the archive is plain Parquet in a documented schema, so any engine can
reconcile it, and a month of a busy archive is a job for a cluster, not one process. This
adapter is that job in local mode; it ranks every copy of each (event type, id) over the
period in log order with a window function and answers, per hour, the same two tables as
DuckDB (:data:`~clickagg.batch.reconcile.WINNERS_SCHEMA` in log order,
:data:`~clickagg.batch.reconcile.STREAM_SCHEMA` by ad), as Arrow. What the winners add up to
is still computed by the stream's core code, so the final rows are the same bytes whichever
engine selected them.

Types: Spark has no unsigned integers and reads the archive's ``uint64`` fingerprints as
``decimal(20,0)``; they partition the window exactly as well, and go back to ``uint64`` in
Arrow. By default the session runs ``local[2]`` on the loopback interface with the UI off;
``master`` (``clickagg reconcile --spark-master URL``) runs it on a cluster instead, e.g. a
standalone ``spark://host:7077``: the executors then read the archive files by the same
paths, so the data dir must be on storage every node mounts at the same path. A session
already active in the process (a notebook's, a test module's) is used as it is and left
running, one this adapter started is stopped on :meth:`SparkPeriodView.close`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from clickagg.batch.reconcile import (
    STREAM_SCHEMA,
    WINNER_COLUMNS,
    WINNERS_SCHEMA,
    EngineError,
    period_rank,
)
from clickagg.core import fates, ids
from clickagg.core.windows import HOUR_MS

LOCAL_CONF: Mapping[str, str] = {
    "spark.master": "local[2]",
    "spark.app.name": "clickagg-reconcile",
    # Loopback only: the driver, its block manager and the executors of local mode.
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    # A period's ranking is one shuffle; the default 200 partitions are 200 tiny tasks here.
    "spark.sql.shuffle.partitions": "4",
    "spark.sql.session.timeZone": "UTC",
}


def java_available() -> bool:
    """Whether a JVM can be launched: Spark (4.x) needs Java 17+ on PATH or JAVA_HOME."""
    home = os.environ.get("JAVA_HOME")
    return bool(shutil.which("java") or (home and (Path(home) / "bin" / "java").exists()))


_WAREHOUSE_PREFIX = "clickagg-spark-"


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def on_loopback(master: str) -> bool:
    """Whether the driver can stay on 127.0.0.1 for this master: local mode, or a cluster
    whose master (and so, here, whose workers) listen on this machine's loopback."""
    if master.startswith("local"):
        return True
    host = urlsplit(master).hostname or ""
    return host in _LOOPBACK_HOSTS or f"[{host}]" in _LOOPBACK_HOSTS


def session_conf(
    master: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The session's settings: :data:`LOCAL_CONF`, on ``master`` if given, then ``extra``
    (``--spark-conf``, e.g. ``spark.driver.memory=8g`` for a big month in local mode).
    For a master off this machine the driver's address is left to Spark
    (``SPARK_LOCAL_IP`` or the host name), since executors elsewhere must reach it, and the
    shuffle width to the cluster."""
    if master is None:
        return {**LOCAL_CONF, **(extra or {})}
    conf = {**LOCAL_CONF, "spark.master": master}
    if not on_loopback(master):
        for key in ("spark.driver.host", "spark.driver.bindAddress"):
            del conf[key]
        del conf["spark.sql.shuffle.partitions"]
    return {**conf, **(extra or {})}


def local_session(
    master: str | None = None, extra: Mapping[str, str] | None = None
) -> SparkSession:
    """A Spark session (:func:`session_conf`: local and bound to 127.0.0.1 unless
    ``master`` says otherwise), quiet but for errors; end it with :func:`stop_session`."""
    if not java_available():
        raise EngineError("the spark engine needs Java 17+ (java on PATH, or JAVA_HOME)")
    conf = session_conf(master, extra)
    if "spark.driver.host" in conf:
        # Read by the JVM's launcher before any conf: without it Spark resolves the host
        # name and may pick another interface for its own services.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Spark makes its (unused) warehouse directory on start, by default in the working
    # directory: a temporary one instead, removed by stop_session.
    warehouse = tempfile.mkdtemp(prefix=_WAREHOUSE_PREFIX)
    builder = SparkSession.builder.config("spark.sql.warehouse.dir", warehouse)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def stop_session(spark: SparkSession) -> None:
    """Stop a session of :func:`local_session` and remove its warehouse directory."""
    warehouse = Path(spark.conf.get("spark.sql.warehouse.dir", "") or "")
    spark.stop()
    local = Path(str(warehouse).removeprefix("file:"))
    if local.name.startswith(_WAREHOUSE_PREFIX) and local.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(local, ignore_errors=True)


def _count(condition: Column) -> Column:
    return F.count_if(condition).cast("long")


def _spend(condition: Column | None = None) -> Column:
    spend = F.col("spend_micros")
    summed = F.sum(spend if condition is None else F.when(condition, spend))
    return F.coalesce(summed, F.lit(0)).cast("long")


class SparkPeriodView:
    """The Spark engine: :class:`clickagg.batch.reconcile.PeriodSource` over one billing
    period's archive files, ranked once (cached) for the hours in [start_ms, end_ms)."""

    def __init__(
        self,
        files: Sequence[Path],
        start_ms: int,
        end_ms: int,
        *,
        session: SparkSession | None = None,
        master: str | None = None,
        conf: Mapping[str, str] | None = None,
    ) -> None:
        self.start_ms, self.end_ms = start_ms, end_ms
        self._owned = False
        self._ranked: DataFrame | None = None
        if not files:  # nothing to rank: no JVM either
            return
        spark = session or SparkSession.getActiveSession()
        if spark is None:
            spark = local_session(master, conf)
            self._owned = True
        self._spark = spark
        # Every copy of an id is in one partition, so (partition, offset) is the order the
        # log acknowledged them; the first is the one the stream saw first. Per billing
        # period: the context before the month's start ranks in its own month.
        period = F.expr(period_rank(start_ms, end_ms))
        by_id = Window.partitionBy("fp_high", "fp_low", "event_type", period).orderBy(
            "partition", "offset"
        )
        ranked = (
            spark.read.parquet(*(str(f) for f in files))
            .select(*WINNER_COLUMNS, "spend_micros")
            .withColumn("copy", F.row_number().over(by_id))
            # After the window (Spark pushes no filter on other columns below it): copies
            # of other hours of the period still rank.
            .where((F.col("ts_ms") >= start_ms) & (F.col("ts_ms") < end_ms))
        )
        self._ranked = ranked.persist(StorageLevel.MEMORY_AND_DISK)

    def hour(self, hour_ms: int) -> tuple[pa.Table, pa.Table] | None:
        """(the winning copy of every event of the hour, the stream's view of it per ad),
        or None when the period holds nothing: the tables DuckDB's view returns."""
        if not self.start_ms <= hour_ms < self.end_ms:
            raise ValueError("hour outside the view")
        if self._ranked is None:
            return None
        ts = F.col("ts_ms")
        rows = self._ranked.where((ts >= hour_ms) & (ts < hour_ms + HOUR_MS))
        winners = self.winners(hour_ms, hour_ms + HOUR_MS)
        status, event_type = F.col("status"), F.col("event_type")
        click = event_type == ids.EVENT_TYPES[ids.CLICK]
        impression = event_type == ids.EVENT_TYPES[ids.IMPRESSION]
        counted = status == fates.COUNTED
        beyond = F.col("copy") > 1
        stream = (
            rows.groupBy("ad_id")
            .agg(
                _count(counted & click).alias("stream_clicks"),
                _count(status.isin(fates.COUNTED, fates.INVALID) & impression).alias(
                    "stream_impressions"
                ),
                _spend().alias("stream_spend_micros"),
                _count(beyond & counted & click).alias("beyond_horizon_clicks"),
                _spend(beyond).alias("beyond_horizon_spend_micros"),
            )
            .orderBy("ad_id")
            .toArrow()
        )
        return winners, stream.cast(STREAM_SCHEMA)

    def winners(self, start_ms: int, end_ms: int) -> pa.Table:
        """The winning copies of the events in [start_ms, end_ms), in log order: the same
        table as DuckDB's view."""
        if start_ms < self.start_ms or end_ms > self.end_ms:
            raise ValueError("winners asked for outside the view")
        if self._ranked is None:
            return WINNERS_SCHEMA.empty_table()
        ts = F.col("ts_ms")
        return (
            self._ranked.where((ts >= start_ms) & (ts < end_ms) & (F.col("copy") == 1))
            .select(*WINNER_COLUMNS)
            .orderBy("partition", "offset")
            .toArrow()
            .cast(WINNERS_SCHEMA)
        )

    def close(self) -> None:
        """Drop the cached ranking; stop the session if this view started it."""
        if self._ranked is not None:
            self._ranked.unpersist()
            self._ranked = None
            if self._owned:
                stop_session(self._spark)
                self._owned = False

    def __enter__(self) -> SparkPeriodView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
