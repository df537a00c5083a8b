"""The Spark engine against the DuckDB engine on an archive the real stream wrote: the same
hours reconciled by both publish the same rows, sketches and reports, byte for byte; and
the unique-user sketches are Spark's own ``hll_sketch_agg`` bytes.

One Spark session (a JVM) serves the whole module; the engine borrows it, as it borrows any
session already active in the process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from clickagg.archive.parquet import ParquetArchiveReader
from clickagg.batch.published import FinalHours
from clickagg.batch.reconcile import (
    STREAM_SCHEMA,
    WINNERS_SCHEMA,
    PeriodView,
    month_of,
    reconcile_hour,
)
from clickagg.batch.runner import HourRun, batch_dir, reconcile_hours
from clickagg.batch.spark_engine import (
    SparkPeriodView,
    java_available,
    local_session,
    session_conf,
    stop_session,
)
from clickagg.cli.main import main
from clickagg.config import Settings
from clickagg.core import hll, ids
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from tests.conftest import Ev
from tests.e2e.server import free_port
from tests.worker.test_stream import T0, Rig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not java_available(),
        reason="the Spark engine needs Java 17+: no java on PATH and no JAVA_HOME",
    ),
]

HOUR = T0 - T0 % HOUR_MS
# An hour before any traffic (empty), the hour with every case, the next, the next day's.
HOURS = [HOUR - HOUR_MS, HOUR, HOUR + HOUR_MS, HOUR + 2 * HOUR_MS]
ADS = [f"ad-{i}" for i in range(4)]
TABLES = ("minute", "country", "device", "browser", "invalid_reason")


def traffic(prefix: str, n: int, start_ms: int) -> list[Ev]:
    """On-time events of several ads, users, addresses, countries, devices and browsers;
    every fifth without a cost (priced by the ad's CPC), another fifth impressions."""
    return [
        Ev(
            f"{prefix}{i}",
            ADS[i % len(ADS)],
            start_ms + i * 1_013,
            event_type=ids.IMPRESSION if i % 5 == 4 else ids.CLICK,
            user_id=f"u{i * 7 % 45}",
            ip=f"10.0.0.{i % 3}",
            country=("US", "DE", "FR")[i % 3],
            device=("mobile", "desktop")[i % 2],
            browser=("Chrome", "Firefox", "Safari", "Edge", "Other")[i % 5],
            cost_micros=-1 if i % 5 == 0 else 1_000 + i,
        )
        for i in range(n)
    ]


FARM_AGENT = "Mozilla/5.0 (Linux; Android 9; SM-J600G) AppleWebKit/537.36 Mobile Safari/537.36"


def farm(first: int, n: int, start_ms: int) -> list[Ev]:
    """Clicks on one ad by one agent and device, each from an address of its own."""
    return [
        Ev(
            f"farm{i}",
            ADS[2],
            start_ms + (i - first) * 10_000,
            user_id=f"f{i}",
            ip=f"192.0.2.{i}",
            user_agent=FARM_AGENT,
            device="mobile",
        )
        for i in range(first, first + n)
    ]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose archive the real stream wrote over 2 partitions: on-time traffic
    with copies it deduplicates, copies re-sent beyond its horizon (in the same hour and in
    the next), events it left out as late; and the ads' CPCs (ads.csv)."""
    root = tmp_path_factory.mktemp("stream")
    rig = Rig(root, partitions=2)
    rig.clock.advance(30 * MINUTE_MS)
    try:
        rig.start()
        first = traffic("e", 240, HOUR + MINUTE_MS)
        rig.send(first + first[::9])  # copies within the horizon: duplicates
        rig.run()
        rig.send([Ev(f"mid{i}", ADS[i % 4], HOUR + 45 * MINUTE_MS) for i in range(8)])
        rig.send(farm(0, 10, HOUR + 45 * MINUTE_MS))  # the behavioural rules' device farm
        rig.run()  # the stream has forgotten the first ids now
        again = [
            Ev(e.event_id, e.ad_id, ts, user_id=e.user_id, cost_micros=e.cost_micros)
            for e, ts in (
                (first[1], HOUR + 59 * MINUTE_MS),
                (first[2], HOUR + 59 * MINUTE_MS + 1),
                (first[6], HOUR + HOUR_MS + 10 * MINUTE_MS),
            )
        ]
        rig.send(again)
        rig.run()
        rig.send(traffic("n", 120, HOUR + HOUR_MS + 15 * MINUTE_MS))
        rig.send(farm(10, 4, HOUR + HOUR_MS + 16 * MINUTE_MS))
        rig.send([Ev(f"far{i}", ADS[i % 4], HOUR + HOUR_MS + 40 * MINUTE_MS) for i in range(8)])
        rig.run()  # the watermarks are past HOUR's end
        late = traffic("late", 30, HOUR + 5 * MINUTE_MS)
        # The next day's hour: ad-3's CTR far above its own baseline (the rules' case).
        spike = [
            Ev(f"spike{i}", ADS[3], HOUR + 2 * HOUR_MS + 20 * MINUTE_MS + i, user_id=f"s{i}")
            for i in range(40)
        ]
        rig.send(late + traffic("d", 60, HOUR + 2 * HOUR_MS + 3 * MINUTE_MS) + spike)
        rig.run()
        assert all(rig.appended.values())  # both partitions have traffic
    finally:
        rig.close()
    (root / "ads.csv").write_text(
        "ad_id,cpc_micros\n" + "".join(f"{a},{i * 250 + 100}\n" for i, a in enumerate(ADS))
    )
    return root


# The JVMs these tests start run for seconds: C1 alone compiles what they run, and the
# serial collector keeps to one thread, without C2 and parallel-GC threads taking these
# 2-core machines' cores from the work (the session and first reconciliation in half the
# time). Results do not depend on either.
FAST_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    session = local_session(extra={"spark.driver.extraJavaOptions": FAST_JVM})
    yield session
    stop_session(session)


def data_dir(archive: Path, into: Path) -> Settings:
    shutil.copytree(archive / "archive", into / "archive")
    return Settings(data_dir=into, partitions=2, ads_file=archive / "ads.csv")


@dataclass(frozen=True)
class Reconciled:
    duckdb: tuple[Settings, list[HourRun]]
    spark: tuple[Settings, list[HourRun]]


@pytest.fixture(scope="module")
def reconciled(
    archive: Path, spark: SparkSession, tmp_path_factory: pytest.TempPathFactory
) -> Reconciled:
    out = {}
    for engine in ("duckdb", "spark"):
        settings = data_dir(archive, tmp_path_factory.mktemp(engine))
        out[engine] = (settings, reconcile_hours(settings, HOURS, reason="t", engine=engine))
    return Reconciled(**out)


def test_both_engines_publish_the_same_rows_and_reports(reconciled: Reconciled) -> None:
    (mine, mine_runs), (theirs, their_runs) = reconciled.duckdb, reconciled.spark

    def summary(run: HourRun) -> tuple[object, ...]:
        version = run.published.version if run.published else None
        return (
            run.hour_ms,
            version,
            run.clicks,
            run.impressions,
            run.spend_micros,
            run.events,
            run.late_counted,
            run.invalid,
        )

    assert [summary(r) for r in mine_runs] == [summary(r) for r in their_runs]
    a, b = FinalHours(batch_dir(mine)), FinalHours(batch_dir(theirs))
    for hour in HOURS:
        for table in TABLES:
            assert a.read(hour, table) == b.read(hour, table), (hour, table)
        assert a.read_report(hour) == b.read_report(hour), hour

    # The case was the one meant: every kind of difference between stream and batch.
    by_hour = {run.hour_ms: run for run in mine_runs}
    assert by_hour[HOUR - HOUR_MS].events == 0
    assert by_hour[HOUR].late_counted == 30 and by_hour[HOUR + HOUR_MS].late_counted == 0
    assert all(by_hour[h].clicks > 0 for h in HOURS[1:])
    beyond = {
        hour: sum(r["beyond_horizon_clicks"] for r in a.read_report(hour).to_pylist())
        for hour in (HOUR, HOUR + HOUR_MS)
    }
    assert beyond == {HOUR: 2, HOUR + HOUR_MS: 1}
    minute = a.read(HOUR)
    assert minute is not None and set(minute["ad_id"].to_pylist()) == set(ADS)
    countries = a.read(HOUR, "country")
    assert countries is not None and {"US", "DE", "FR"} <= set(countries["country"].to_pylist())


def test_the_views_answer_the_same_tables_and_an_invalid_hook_works_with_both(
    archive: Path, spark: SparkSession
) -> None:
    files = ParquetArchiveReader(archive / "archive").files(*month_of(HOUR))
    span = (HOURS[0], HOUR + HOUR_MS)  # an empty hour and the busy one

    def bots(frame: pl.DataFrame, hour_ms: int) -> pl.Series:
        rule = pl.when(pl.col("user_id") == "u7").then(pl.lit("test rule")).otherwise(None)
        return frame.select(rule.alias("reason"))["reason"]

    with PeriodView(files, *span) as duck, SparkPeriodView(files, *span) as sparks:
        for hour in range(*span, HOUR_MS):
            ours, theirs = duck.hour(hour), sparks.hour(hour)
            assert ours is not None and theirs is not None
            assert ours[0].schema == WINNERS_SCHEMA and ours[1].schema == STREAM_SCHEMA
            assert ours[0].equals(theirs[0], check_metadata=True), hour
            assert ours[1].equals(theirs[1], check_metadata=True), hour
        x = reconcile_hour(duck, HOUR, cpc_micros={}, invalid=bots)
        y = reconcile_hour(sparks, HOUR, cpc_micros={}, invalid=bots)
    assert x.invalid > 0 and (x.events, x.late_counted, x.invalid) == (
        y.events,
        y.late_counted,
        y.invalid,
    )
    assert x.minute == y.minute and x.report == y.report
    assert all(x.dimensions[name] == y.dimensions[name] for name in x.dimensions)
    # The view borrowed the module's session: still running.
    assert spark.range(1).count() == 1


def test_the_cli_reconciles_with_spark(
    archive: Path, reconciled: Reconciled, spark: SparkSession, tmp_path: Path
) -> None:
    settings = data_dir(archive, tmp_path)
    hour = time.strftime("%Y-%m-%dT%H", time.gmtime(HOUR / 1000))
    args = ["reconcile", "--hour", hour, "--engine", "spark", "--report"]
    args += ["--data-dir", str(tmp_path), "--partitions", "2", "--ads", str(settings.ads_file)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "reconciled 1 hours (spark)" in result.output
    mine = FinalHours(batch_dir(reconciled.duckdb[0]))
    theirs = FinalHours(batch_dir(settings))
    assert all(mine.read(HOUR, table) == theirs.read(HOUR, table) for table in TABLES)
    assert mine.read_report(HOUR) == theirs.read_report(HOUR)


# -- unique users: clickagg's sketches are Spark's hll_sketch_agg bytes -----------------------


def spark_minute_sketches(
    spark: SparkSession, archive: Path, *, ordered: bool
) -> dict[tuple[str, int], bytes]:
    """``hll_sketch_agg(user_id)`` per (ad, minute) of the winning copies of the hours,
    ranked here again in Spark SQL (not the engine's code). ``ordered``: the users fed in the
    order clickagg feeds them, (group, user), in one pass; else in Spark's own plan (partial
    sketches per task, merged by a Union)."""
    files = ParquetArchiveReader(archive / "archive").files(*month_of(HOUR))
    spark.read.parquet(*(str(f) for f in files)).createOrReplaceTempView("decisions")
    winners = spark.sql(
        """
        SELECT ad_id, ts_ms - ts_ms % 60000 AS minute_ms, user_id FROM (
            SELECT *, row_number() OVER (
                PARTITION BY fp_high, fp_low, event_type ORDER BY partition, offset) AS copy
            FROM decisions)
        WHERE copy = 1 AND ts_ms >= :start AND ts_ms < :end
        """,
        args={"start": HOURS[0], "end": HOURS[-1] + HOUR_MS},
    )
    if ordered:
        winners = winners.repartition(1).sortWithinPartitions("ad_id", "minute_ms", "user_id")
    sketches = winners.groupBy("ad_id", "minute_ms").agg(
        F.hll_sketch_agg("user_id", 12).alias("users")
    )
    return {(r["ad_id"], r["minute_ms"]): r["users"] for r in sketches.toArrow().to_pylist()}


def coupons(sketch: bytes) -> list[int]:
    """The non-empty 32-bit coupons of a LIST/SET-mode sketch, sorted."""
    preamble = sketch[0] * 4
    words = struct.unpack_from(f"<{(len(sketch) - preamble) // 4}I", sketch, preamble)
    return sorted(w for w in words if w)


def test_minute_sketches_are_spark_hll_sketch_agg_bytes(
    reconciled: Reconciled, archive: Path, spark: SparkSession
) -> None:
    final = FinalHours(batch_dir(reconciled.spark[0]))
    ours: dict[tuple[str, int], bytes | None] = {}
    for hour in HOURS:
        minute = final.read(hour)
        assert minute is not None
        ours.update(((r["ad_id"], r["minute_ms"]), r["users"]) for r in minute.to_pylist())
    assert len(ours) > 20 and any(v is None for v in ours.values())
    theirs = spark_minute_sketches(spark, archive, ordered=True)
    # A row without a user: clickagg stores null, Spark the empty sketch.
    assert {k for k, v in ours.items() if v is None} == {
        k for k, v in theirs.items() if v == hll.empty()
    }
    assert theirs == {k: hll.empty() if v is None else v for k, v in ours.items()}
    # In another order a small sketch (LIST/SET mode) keeps the same header, coupons and
    # estimate, its coupons in other slots of its hash table (open addressing).
    for key, sketch in spark_minute_sketches(spark, archive, ordered=False).items():
        mine = ours[key] or hll.empty()
        assert sketch[:8] == mine[:8] and coupons(sketch) == coupons(mine)
        assert hll.estimate(sketch) == hll.estimate(mine)
        assert coupons(hll.union([sketch, mine])) == coupons(mine)


def test_large_sketches_share_their_registers_with_spark(spark: SparkSession) -> None:
    """Past 384 users a sketch is an HLL register array: the registers are Spark's, and a
    union of a Spark sketch and clickagg's estimates as clickagg's. The header may differ:
    clickagg marks its sketches out of order (composite estimator, the same for any split
    of the events), while Spark's one-pass sketch keeps its HIP accumulator, whose estimate
    depends on the update order."""
    users = [f"user-{i}" for i in range(2_000)]
    ours = hll.sketches_by_group(np.zeros(len(users), dtype=np.int64), pa.array(users), 1)
    mine: bytes = ours[0].as_py()
    frame = spark.createDataFrame([(u,) for u in users], "user_id string")
    ordered = frame.repartition(1).sortWithinPartitions("user_id")
    [row] = ordered.agg(
        F.hll_sketch_agg("user_id", 12).alias("users"),
        F.hll_sketch_estimate(F.lit(mine)).alias("estimate_of_ours"),
    ).collect()
    theirs = bytes(row["users"])
    header = 40  # HLL_8: a 40-byte preamble, then one byte per register (K = 4096)
    assert len(theirs) == len(mine) == header + hll.K
    assert theirs[header:] == mine[header:]  # the same registers
    differ = [i for i in range(header) if theirs[i] != mine[i]]
    # Only the flags byte (out of order) and the HIP accumulator (a double at 8).
    assert set(differ) <= {5} | set(range(8, 16)), differ
    assert row["estimate_of_ours"] == hll.estimate(mine)  # Spark reads our bytes
    assert hll.estimate(hll.union([theirs, mine])) == hll.estimate(mine)


# -- a cluster: --spark-master runs the same reconciliation on a standalone Spark cluster ------


@dataclass(frozen=True)
class Cluster:
    url: str
    work_dir: Path


def _spark_class(pyspark_home: Path, cls: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """One daemon of a standalone cluster, in the foreground (its pid is the JVM's)."""
    env = {
        **os.environ,
        "SPARK_HOME": str(pyspark_home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_NO_DAEMONIZE": "1",
        # No REST submission server (it would listen on 6066 whatever the master's port).
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
        "SPARK_DAEMON_JAVA_OPTS": FAST_JVM,
    }
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(pyspark_home / "bin" / "spark-class"), cls, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert process.poll() is None, log.read_text(errors="replace")[-2000:]
        time.sleep(0.25)
    raise AssertionError(f"no {text!r} in {log} after 90 s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A standalone Spark cluster on 127.0.0.1: one master, one worker with one core,
    started from pyspark's own launcher and stopped by pid."""
    import pyspark

    home = Path(pyspark.__file__).parent
    root = tmp_path_factory.mktemp("cluster")
    port = free_port()
    master_log, worker_log = root / "master.log", root / "worker.log"
    started: list[subprocess.Popen[bytes]] = []
    try:
        master = _spark_class(
            home,
            "org.apache.spark.deploy.master.Master",
            *("--host", "127.0.0.1", "--port", str(port), "--webui-port", str(free_port())),
            log=master_log,
        )
        started.append(master)
        _wait_for_line(master_log, "New state: ALIVE", master)
        url = f"spark://127.0.0.1:{port}"
        worker = _spark_class(
            home,
            "org.apache.spark.deploy.worker.Worker",
            *("--host", "127.0.0.1", "--webui-port", str(free_port())),
            *("--cores", "1", "--memory", "1g", "--work-dir", str(root / "work"), url),
            log=worker_log,
        )
        started.append(worker)
        _wait_for_line(master_log, "Registering worker", master)
        yield Cluster(url, root / "work")
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_spark_master_reconciles_on_a_cluster(
    archive: Path, reconciled: Reconciled, cluster: Cluster, tmp_path: Path
) -> None:
    """``--spark-master`` runs the ranking on the cluster's executors (the worker holds the
    application's directory afterwards) and publishes DuckDB's rows, byte for byte."""
    settings = data_dir(archive, tmp_path)
    hour = time.strftime("%Y-%m-%dT%H", time.gmtime(HOUR / 1000))
    args = ["reconcile", "--hour", hour, "--engine", "spark", "--spark-master", cluster.url]
    args += ["--spark-conf", "spark.executor.memory=512m"]
    for jvm in ("driver", "executor"):
        args += ["--spark-conf", f"spark.{jvm}.extraJavaOptions={FAST_JVM}"]
    args += ["--data-dir", str(tmp_path), "--partitions", "2", "--ads", str(settings.ads_file)]
    # Its own process, as from cron: the module's local session must not be borrowed.
    result = subprocess.run(
        [sys.executable, "-m", "clickagg", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reconciled 1 hours (spark)" in result.stdout
    assert [p.name for p in cluster.work_dir.iterdir() if p.name.startswith("app-")]
    mine = FinalHours(batch_dir(reconciled.duckdb[0]))
    theirs = FinalHours(batch_dir(settings))
    assert all(mine.read(HOUR, table) == theirs.read(HOUR, table) for table in TABLES)
    assert mine.read_report(HOUR) == theirs.read_report(HOUR)


def test_a_spark_master_needs_the_spark_engine(tmp_path: Path) -> None:
    args = ["reconcile", "--hour", "2026-01-05T10", "--spark-master", "spark://127.0.0.1:1"]
    result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--spark-master and --spark-conf apply to --engine spark" in result.output


def test_the_driver_stays_on_loopback_only_for_a_loopback_master() -> None:
    assert session_conf()["spark.driver.host"] == "127.0.0.1"
    assert session_conf("local[1]")["spark.master"] == "local[1]"
    assert session_conf("spark://127.0.0.1:7077")["spark.driver.bindAddress"] == "127.0.0.1"
    remote = session_conf("spark://spark-master.internal:7077")
    assert remote["spark.master"] == "spark://spark-master.internal:7077"
    assert "spark.driver.host" not in remote and "spark.driver.bindAddress" not in remote
    bigger = session_conf(None, {"spark.driver.memory": "3g"})
    assert bigger["spark.driver.memory"] == "3g" and bigger["spark.master"] == "local[2]"


# -- the behavioural rules: context before each hour, from both engines ----------------------

SIVT_RULES = """
# First: the farm's clicks have no impressions either. 10 clicks from 10 addresses in
# HOUR, 4 more in the next: the 12th on, judged with HOUR as context, are flagged.
[[rules]]
id = "farm"
kind = "shared_agent_ad_spread"
reason = "device farm"
params = { min_ips = 8, min_clicks = 12, window_hours = 1 }

[[rules]]
id = "repeat"
kind = "repeat_click"
reason = "repeat"
params = { window_seconds = 600 }

[[rules]]
id = "spread"
kind = "ip_ad_spread"
reason = "spread"
params = { max_ads = 3, window_minutes = 2 }

[[rules]]
id = "no-impression"
kind = "no_impression_click"
reason = "no impression"
# Not the next day's hour: 3 impressions per ad, so its spike clicks stay billable.
params = { window_minutes = 2, min_ad_impressions = 5 }

[[rules]]
id = "ctr"
kind = "ctr_spike"
reason = "ctr spike"
params = { factor = 3.0, baseline_hours = 2, min_clicks = 20 }
"""


def test_both_engines_agree_on_the_behavioural_rules_with_their_context(
    archive: Path, spark: SparkSession, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(SIVT_RULES)
    runs, finals = {}, {}
    for engine in ("duckdb", "spark"):
        settings = data_dir(archive, tmp_path / engine)
        settings = dataclasses.replace(settings, rules_file=rules)
        runs[engine] = reconcile_hours(settings, HOURS, reason="t", engine=engine)
        finals[engine] = FinalHours(batch_dir(settings))

    def unpublished(engine: str) -> list[HourRun]:
        return [dataclasses.replace(run, published=None) for run in runs[engine]]

    assert unpublished("duckdb") == unpublished("spark")
    for hour in HOURS:
        for table in TABLES:
            assert finals["duckdb"].read(hour, table) == finals["spark"].read(hour, table)
        assert finals["duckdb"].read_report(hour) == finals["spark"].read_report(hour)
    # Every rule had something to judge: invalid clicks of each rule, and a review.
    by_rule: dict[str, int] = {}
    for hour in HOURS:
        reasons = finals["duckdb"].read(hour, "invalid_reason")
        assert reasons is not None
        for row in reasons.to_pylist():
            by_rule[row["invalid_reason"]] = (
                by_rule.get(row["invalid_reason"], 0) + row["invalid_clicks"]
            )
    assert {"repeat", "spread", "no-impression"} <= set(by_rule), by_rule
    assert by_rule["farm"] == 3, by_rule  # the 12th to 14th clicks, all in the next hour
    review = {run.hour_ms: run.review for run in runs["duckdb"]}
    assert review[HOUR + 2 * HOUR_MS] > 0, review
