"""Batch layer throughput: ``reconcile_hours`` over a big archive, DuckDB and Spark, beside a
raw DuckDB distinct count of the same files.

Builds (or reuses, keyed by its parameters) a synthetic archive of N decisions written
through the real ``ParquetArchiveWriter`` in flushes of ``--flush`` decisions over 8
partitions, stream time spread evenly over ``--hours`` event hours of one month
(2026-01-05 onwards), production-shaped: 10,000 ads with Zipf popularity, 1M users, 20
countries, the real user agents of bench/traffic_shapes.py, 1 click per 20 impressions,
5 % exact copies (same id and fingerprint, status ``duplicate``, a few seconds after their
original), 1 % ``late`` originals (5.5-20 min behind the stream), and 0.1 % copies re-sent
with a new timestamp more than the dedup horizon (30 min) after their original (status
``counted``: the stream could not recognise them; the batch does). Generation is numpy and
pyarrow column work per flush, no per-event Python. The fingerprints are a 128-bit mix of
the event's number, not xxh3 of its id (which costs a Python call per event): the engines
only compare them, and every copy of an event carries its original's.

Then, per repetition (medians of ``--runs``), on the same files:

* ``duckdb``: ``reconcile_hours(settings, every archived hour, engine="duckdb")``, the code
  path of ``clickagg reconcile``: rank the month, then per hour select the winners,
  aggregate them with the stream's code and publish the final rows and report, into a fresh
  data dir whose ``archive`` links to the cached one;
* ``spark``: the same with ``engine="spark"`` (skipped, with the reason, without Java or
  pyspark), each run in a fresh process with its own JVM, as ``clickagg reconcile`` runs;
  the session's start is timed apart (the engine uses the session active in the process);
* ``baseline``: ``SELECT ad_id, count(DISTINCT (fp_high, fp_low)) ... GROUP BY ad_id``
  over the same files in DuckDB: exact dedup over the period and nothing else (by ad, not
  by hour: a copy re-sent with a new timestamp would count again in another hour).

Each run's winners are checked against the generator's number of distinct events.

``--last-hour-only`` reconciles only the archive's last hour in the ``duckdb`` and ``spark``
runs: what the server's hour closer does when an hour ends, the hour a month ranking makes
pay for the whole month to date. Its winners are checked against a count of the hour's
first copies computed here in DuckDB over every file (once, untimed).

    .venv/bin/python bench/reconcile_throughput.py [--events 10000000] [--runs 3]
        [--hours 24] [--flush 200000] [--engines duckdb,spark,baseline] [--dir DIR]
        [--spark-driver-memory 4g] [--last-hour-only]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

import common
import traffic_shapes
from clickagg.archive.parquet import INDEX_DIR, ParquetArchiveReader, ParquetArchiveWriter
from clickagg.batch.reconcile import MonthRankedView, PeriodView
from clickagg.batch.runner import Progress, reconcile_hours
from clickagg.config import Settings
from clickagg.core import fates
from clickagg.core.decisions import DECISION_SCHEMA, DUPLICATE_REASON, LATE_REASON
from clickagg.core.useragent import device_and_browser
from clickagg.core.windows import HOUR_MS

T0 = 1_767_571_200_000  # 2026-01-05T00:00:00Z: 24 hours stay inside one billing month
GENERATOR_VERSION = 1  # bump when the archive it writes changes: cached ones are rebuilt
RATE = 100_000  # events/s: the hour the extrapolation is about
MINUTE_MS = 60_000
ENGINES = ("duckdb", "spark", "baseline")
_STATUSES = pa.array([fates.COUNTED, fates.DUPLICATE, fates.LATE], pa.string())
_REASONS = pa.array([None, DUPLICATE_REASON, LATE_REASON], pa.string())


@dataclass(frozen=True)
class ArchiveSpec:
    events: int
    hours: int
    flush: int
    partitions: int = 8
    seed: int = 7
    duplicate_fraction: float = 0.05
    late_fraction: float = 0.01
    resent_fraction: float = 0.001  # copies with a new timestamp beyond the dedup horizon
    dedup_horizon_ms: int = 30 * MINUTE_MS
    allowed_lateness_ms: int = 5 * MINUTE_MS
    late_max_behind_ms: int = 20 * MINUTE_MS
    jitter_ms: int = 5_000
    retry_delay_mean_ms: int = 2_000
    retry_delay_max_ms: int = 20_000

    def key(self) -> str:
        return (
            f"e{self.events}-h{self.hours}-f{self.flush}-p{self.partitions}-s{self.seed}"
            f"-v{GENERATOR_VERSION}"
        )


# -- the synthetic archive -------------------------------------------------------------------


def _mix(x: npt.NDArray[np.uint64], salt: int) -> npt.NDArray[np.uint64]:
    return traffic_shapes._splitmix64(x ^ np.uint64(salt))


def _text(prefix: str, values: npt.NDArray[Any]) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")


class ArchiveGenerator:
    """Decisions of a production-shaped stream, one flush at a time, in log order."""

    def __init__(self, spec: ArchiveSpec, shape: traffic_shapes.Shape | None = None) -> None:
        self.spec = spec
        self.shape = shape = shape or traffic_shapes.Shape()
        self.rng = rng = np.random.default_rng(spec.seed)
        self.line_ms = spec.hours * HOUR_MS / spec.events  # stream time per decision
        self.ad_p = traffic_shapes.zipf_weights(shape.ads, shape.zipf_s)
        numbers = rng.permutation(shape.ads)  # popularity is not the id order
        width = max(6, len(str(shape.ads - 1)))
        per_campaign, per_advertiser = shape.ads_per_campaign, shape.campaigns_per_advertiser
        self.ad_ids = [f"ad-{n:0{width}d}" for n in numbers.tolist()]
        self.campaign_ids = [f"cmp-{n // per_campaign:0{width - 1}d}" for n in numbers.tolist()]
        self.advertiser_ids = [
            f"adv-{n // per_campaign // per_advertiser:0{width - 2}d}" for n in numbers.tolist()
        ]
        self.ctr = np.minimum(
            rng.uniform(0.5, 1.5, size=shape.ads) / (1.0 + shape.impressions_per_click), 1.0
        )
        cpc = np.exp(rng.normal(np.log(400_000), 0.6, size=shape.ads)) // 10_000 * 10_000
        self.cpc = cpc.astype(np.int64) + 10_000
        ua_lists = [agents for _, _, agents in traffic_shapes.DEVICES[: shape.devices]]
        self.user_agents = [ua for agents in ua_lists for ua in agents]
        self.ua_offset = np.cumsum([0, *(len(a) for a in ua_lists)])[:-1]
        self.ua_count = np.array([len(a) for a in ua_lists], dtype=np.uint64)
        parsed = [device_and_browser(ua) for ua in self.user_agents]  # 10 agents, not events
        self.ua_device = [device for device, _ in parsed]
        self.ua_browser = [browser for _, browser in parsed]
        weights = np.array([w for _, w, _ in traffic_shapes.DEVICES[: shape.devices]])
        self.device_cdf = np.cumsum(weights / weights.sum())
        countries = traffic_shapes.COUNTRIES[: shape.countries]
        self.country_names = [c for c, _ in countries]
        country_w = np.array([w for _, w in countries], dtype=np.float64)
        self.country_cdf = np.cumsum(country_w / country_w.sum())
        self.next_event = 0
        self.next_offsets = [0] * spec.partitions
        self.written = 0
        # Samples of earlier flushes' events, (stream time of their last line, table): what
        # a client re-sends with a new timestamp after the stream forgot the id.
        self.pool: list[tuple[int, pa.Table]] = []
        self.distinct = 0  # distinct (type, id) so far: what every engine must find

    def ads_csv(self, path: Path) -> None:
        """The ad registry (ad_id, cpc_micros): unpriced clicks are charged the ad's CPC."""
        lines = [f"{a},{c}" for a, c in zip(self.ad_ids, self.cpc.tolist(), strict=True)]
        path.write_text("ad_id,cpc_micros\n" + "\n".join(lines) + "\n")

    def _events(self, count: int, ts: npt.NDArray[np.int64]) -> pa.Table:
        """``count`` new distinct events with event times ``ts`` (plus the internal columns
        _click and _cpc), numbered on from the previous flush."""
        shape, rng = self.shape, self.rng
        number = np.arange(self.next_event, self.next_event + count, dtype=np.uint64)
        self.next_event += count
        mix = traffic_shapes._splitmix64  # a bijection: each step stays distinct per event
        id_high = _mix(number, self.spec.seed << 40)
        id_low = mix(id_high)
        fp_high = mix(id_low)
        fp_low = mix(fp_high)
        rank = rng.choice(shape.ads, size=count, p=self.ad_p)
        click = rng.random(count) < self.ctr[rank]
        priced = click & (rng.random(count) < shape.priced_click_fraction)
        user = rng.integers(0, shape.users, size=count, dtype=np.uint64)
        h_user = _mix(user, self.spec.seed * 0x1000193 + 1)
        h_dev = mix(h_user)
        h_ua = mix(h_dev)
        unit = traffic_shapes._unit
        country = np.minimum(
            np.searchsorted(self.country_cdf, unit(h_user), "right"), len(self.country_cdf) - 1
        )
        device = np.minimum(
            np.searchsorted(self.device_cdf, unit(h_dev), "right"), len(self.device_cdf) - 1
        )
        ua = self.ua_offset[device] + (h_ua % self.ua_count[device]).astype(np.int64)
        ip = (h_user >> np.uint64(32)).astype(np.int64)
        octets = [11 + ip % 200, (ip >> 8) % 256, (ip >> 16) % 256, (ip >> 24) % 254 + 1]
        take = traffic_shapes._take
        cpc = self.cpc[rank]
        return pa.table(
            {
                "partition": (fp_low % np.uint64(self.spec.partitions)).astype(np.int32),
                "event_id": traffic_shapes._hex128(id_high, id_low),
                "event_type": take(["impression", "click"], click.astype(np.int64)),
                "ad_id": take(self.ad_ids, rank),
                "advertiser_id": take(self.advertiser_ids, rank),
                "campaign_id": take(self.campaign_ids, rank),
                "user_id": _text("u-", user.astype(np.int64)),
                "ip": pc.binary_join_element_wise(
                    *(pc.cast(pa.array(o), pa.string()) for o in octets), "."
                ),
                "user_agent": take(self.user_agents, ua),
                "country": take(self.country_names, country),
                "device": take(self.ua_device, ua),
                "browser": take(self.ua_browser, ua),
                "ts_ms": ts,
                "cost_micros": pa.array(cpc, mask=~priced),
                "fp_high": fp_high,
                "fp_low": fp_low,
                "_click": click,
                "_cpc": cpc,
            }
        )

    def flush(self, count: int) -> tuple[pa.Table, dict[int, tuple[int, int]]]:
        """The next ``count`` decisions in log order and their offset ranges per partition."""
        spec, rng = self.spec, self.rng
        first = self.written
        self.written += count
        received = T0 + ((first + np.arange(count)) * self.line_ms).astype(np.int64)
        resend = self._resend_source(int(received[0]))
        n_resent = min(round(count * spec.resent_fraction), resend.num_rows)
        n_dup = round(count * spec.duplicate_fraction)
        uniq = count - n_dup - n_resent
        self.distinct += uniq

        # Log layout: the new events in order; each exact copy a few seconds after its
        # original; re-sent copies anywhere.
        originals = rng.choice(uniq, size=n_dup)
        delay_ms = np.minimum(
            rng.exponential(spec.retry_delay_mean_ms, n_dup), spec.retry_delay_max_ms
        )
        keys = np.concatenate(
            [
                np.arange(uniq, dtype=np.float64),
                originals + np.maximum(1.0, delay_ms / self.line_ms) + 0.5,
                rng.uniform(0, uniq, n_resent),
            ]
        )
        order = np.argsort(keys, kind="stable")
        source = np.concatenate(
            [np.arange(uniq), originals, uniq + rng.choice(resend.num_rows, n_resent, False)]
        )[order]
        is_copy = (order >= uniq) & (order < uniq + n_dup)
        is_resent = order >= uniq + n_dup
        is_new = ~is_copy & ~is_resent
        position = np.empty(uniq, dtype=np.int64)
        position[source[is_new]] = np.flatnonzero(is_new)

        # Event times: the stream's time less a delivery jitter; late originals (never
        # copied) further behind than the lateness allows.
        stream = received[position]
        ts = np.maximum(T0, stream - rng.integers(0, spec.jitter_ms + 1, uniq))
        copied = np.zeros(uniq, dtype=np.bool_)
        copied[originals] = True
        eligible = np.flatnonzero(~copied & (stream - T0 >= spec.late_max_behind_ms))
        late = np.zeros(uniq, dtype=np.bool_)
        n_late = min(round(count * spec.late_fraction), len(eligible))
        late[rng.choice(eligible, size=n_late, replace=False)] = True
        ts[late] = stream[late] - rng.integers(
            spec.allowed_lateness_ms + 90_000, spec.late_max_behind_ms + 1, n_late
        )
        events = self._events(uniq, ts)
        lines = pa.concat_tables([events, resend]).take(pa.array(source))
        line_ts = np.where(
            is_resent,
            np.maximum(T0, received - rng.integers(0, spec.jitter_ms + 1, count)),
            lines["ts_ms"].to_numpy(),
        )
        late_line = np.zeros(count, dtype=np.bool_)
        late_line[is_new] = late[source[is_new]]
        fate = np.where(is_copy, 1, np.where(late_line, 2, 0))  # counted, duplicate, late
        counted_click = (fate == 0) & lines["_click"].to_numpy()

        # Offsets: every copy of an id is in its original's partition, later in the log.
        partition = lines["partition"].to_numpy()
        offsets = np.empty(count, dtype=np.int64)
        ranges = {}
        by_partition = np.argsort(partition, kind="stable")
        counts = np.bincount(partition, minlength=spec.partitions)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for p in range(spec.partitions):
            lo = self.next_offsets[p]
            rows = by_partition[starts[p] : starts[p] + counts[p]]
            offsets[rows] = np.arange(lo, lo + counts[p])
            ranges[p] = (lo, lo + int(counts[p]))
            self.next_offsets[p] = lo + int(counts[p])

        sample = np.flatnonzero(~late)
        sample = rng.choice(sample, size=min(len(sample), 4 * n_resent + 64), replace=False)
        self.pool.append((int(received[-1]), events.take(pa.array(np.sort(sample)))))
        fate_index = pa.array(fate, pa.int8())
        table = (
            lines.drop_columns(["_click", "_cpc", "ts_ms"])
            .append_column("offset", pa.array(offsets))
            .append_column("status", _STATUSES.take(fate_index))
            .append_column("reason", _REASONS.take(fate_index))
            .append_column("ts_ms", pa.array(line_ts))
            .append_column("received_ms", pa.array(received))
            .append_column(
                "spend_micros", pa.array(np.where(counted_click, lines["_cpc"].to_numpy(), 0))
            )
        )
        return table.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA), ranges

    def _resend_source(self, now_ms: int) -> pa.Table:
        """The newest sample of events the stream has forgotten by ``now_ms`` (empty if
        none yet); older samples are dropped."""
        old = [i for i, (at, _) in enumerate(self.pool) if at < now_ms - self.spec.dedup_horizon_ms]
        if not old:
            return self.pool[0][1].schema.empty_table() if self.pool else self._events(0, _i64())
        self.pool = self.pool[old[-1] :]
        return self.pool[0][1]


def _i64() -> npt.NDArray[np.int64]:
    return np.zeros(0, dtype=np.int64)


def build_archive(spec: ArchiveSpec, root: Path) -> dict[str, Any]:
    """Write the archive under ``root`` (``archive/``, ``ads.csv``, ``spec.json`` last);
    return what spec.json records."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    gen = ArchiveGenerator(spec)
    gen.ads_csv(root / "ads.csv")
    writer = ParquetArchiveWriter(
        root / "archive", flush_events=spec.flush, flush_interval_ms=10**9
    )
    generating = writing = 0.0
    try:
        done = 0
        while done < spec.events:
            count = min(spec.flush, spec.events - done)
            start = time.perf_counter()
            table, ranges = gen.flush(count)
            generating += time.perf_counter() - start
            start = time.perf_counter()
            writer.append(table, ranges)
            writer.flush()
            writing += time.perf_counter() - start
            done += count
            if done // spec.flush % 10 == 0 or done == spec.events:
                print(f"  built {done:,} / {spec.events:,}", flush=True)
    finally:
        writer.close()
    record = {
        "spec": dataclasses.asdict(spec),
        "distinct_events": gen.distinct,
        "generate_s": generating,
        "write_s": writing,
    }
    (root / "spec.json").write_text(json.dumps(record))
    return record


def cached_archive(spec: ArchiveSpec, base: Path, rebuild: bool) -> tuple[Path, dict[str, Any]]:
    """The archive of ``spec`` under ``base``: reused when a complete one is there."""
    root = base / spec.key()
    marker = root / "spec.json"
    if not rebuild and marker.exists():
        record: dict[str, Any] = json.loads(marker.read_text())
        if record.get("spec") == dataclasses.asdict(spec):
            print(f"archive: reusing {root}")
            return root, record
    print(f"archive: building {root}")
    record = build_archive(spec, root)
    print(
        f"  generated in {record['generate_s']:.1f} s, written in {record['write_s']:.1f} s "
        f"({record['write_s'] / spec.events * 1e6:.2f} µs per decision in the writer)"
    )
    return root, record


def disk_bytes(directory: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in directory.rglob(pattern) if f.is_file())


# -- the measured runs -----------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    winners: int
    other_cores: float  # CPU of processes not ours during the run (concurrent load)
    first_hour_s: float = float("nan")  # until the first hour was published (ranking incl.)
    first_hour_winners: int = 0
    start_s: float = float("nan")  # Spark: JVM and session start, before ``seconds``
    process_s: float = float("nan")  # Spark: the whole process of the run
    heap_mib: int = 0  # Spark: the driver's heap (in local mode, the executors' too)


@contextlib.contextmanager
def fresh_data_dir(root: Path) -> Iterator[Settings]:
    """A new data dir whose archive is the cached one: each run publishes from scratch."""
    with tempfile.TemporaryDirectory(prefix="clickagg-reconcile-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "archive").symlink_to((root / "archive").resolve())
        yield Settings(data_dir=data, ads_file=root / "ads.csv")


def metered(measure: Callable[[], Run], pids: dict[str, int | None] | None = None) -> Run:
    """Run ``measure`` under a CPU meter; fill in the load of processes not ours."""
    meter = common.CpuMeter(pids or {})
    meter.start()
    run = measure()
    run.other_cores = meter.stop()["other_processes"]
    return run


def first_copies_in(root: Path, hours: list[int], hour_ms: int) -> int:
    """How many (event type, id) of the period have their first copy in log order in the
    hour ``hour_ms``: the winners an engine must find there (the reference of
    ``--last-hour-only``, computed apart from the engines, over every file)."""
    reader = ParquetArchiveReader(root / "archive")
    try:
        files = [str(f) for f in reader.files(min(hours), max(hours) + HOUR_MS)]
    finally:
        reader.close()
    con = duckdb.connect()
    try:
        [(count,)] = con.sql(
            'SELECT count(*) FROM (SELECT arg_min(ts_ms, (partition, "offset")) AS ts '
            "FROM read_parquet($files) GROUP BY fp_high, fp_low, event_type) "
            "WHERE ts >= $start AND ts < $end",
            params={"files": files, "start": hour_ms, "end": hour_ms + HOUR_MS},
        ).fetchall()
    finally:
        con.close()
    return int(count)


def selection_times(root: Path, hours: list[int], runs: int) -> list[tuple[str, int, float]]:
    """(DuckDB view, hour's index, median seconds) of selecting one hour's winners and the
    stream's view of it alone, each view opened on the month's files for that hour only:
    the engine's part of closing the hour (the rest, aggregating and publishing, is the
    same whichever view), for the first and the last hour of the archive."""
    reader = ParquetArchiveReader(root / "archive")
    try:
        files = reader.files(min(hours), max(hours) + HOUR_MS)
    finally:
        reader.close()
    out = []
    for view in (PeriodView, MonthRankedView):
        for position in (0, len(hours) - 1):
            hour = hours[position]
            seconds = []
            for _ in range(runs):
                start = time.perf_counter()
                with view(files, hour, hour + HOUR_MS) as selecting:
                    selecting.hour(hour)
                seconds.append(time.perf_counter() - start)
            out.append((view.__name__, position, median(seconds)))
    return out


def reconcile_run(root: Path, hours: list[int], engine: str) -> Run:
    with fresh_data_dir(root) as settings:
        seen: list[Progress] = []
        start = time.perf_counter()
        runs = reconcile_hours(
            settings, hours, reason="benchmark", engine=engine, progress=seen.append
        )
        seconds = time.perf_counter() - start
    return Run(
        seconds,
        sum(r.events for r in runs),
        0.0,
        first_hour_s=seen[0].elapsed_s,
        first_hour_winners=runs[0].events,
    )


def baseline_run(root: Path, hours: list[int]) -> Run:
    """Exact distinct events per ad over the same files (the billing period: the dedup the
    batch does), and nothing else."""
    reader = ParquetArchiveReader(root / "archive")
    try:
        files = [str(f) for f in reader.files(min(hours), max(hours) + HOUR_MS)]
    finally:
        reader.close()
    start = time.perf_counter()
    con = duckdb.connect()
    try:
        table = con.sql(
            "SELECT ad_id, count(DISTINCT (fp_high, fp_low)) AS events "
            "FROM read_parquet($files) GROUP BY ad_id",
            params={"files": files},
        ).to_arrow_table()
    finally:
        con.close()
    seconds = time.perf_counter() - start
    return Run(seconds, int(pc.sum(table["events"]).as_py() or 0), 0.0)


def spark_run(root: Path, driver_memory: str, last_hour_only: bool = False) -> Run:
    """One Spark run in a fresh process, as ``clickagg reconcile --engine spark`` runs: its
    own JVM, started, used and stopped (a reused JVM ran out of heap on a later run)."""
    start = time.perf_counter()
    child = subprocess.run(
        [
            *(sys.executable, str(Path(__file__).resolve()), "--spark-child", str(root)),
            *("--spark-driver-memory", driver_memory),
            *(["--last-hour-only"] if last_hour_only else []),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    process_s = time.perf_counter() - start
    lines = child.stdout.strip().splitlines()
    answer: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if child.returncode or "error" in answer:
        raise RuntimeError(answer.get("error") or _why(RuntimeError(child.stderr)))
    return Run(**answer, process_s=process_s)


def spark_child(root: Path, driver_memory: str, last_hour_only: bool = False) -> int:
    """The child of :func:`spark_run`: one JSON line, its :class:`Run` or the error."""
    from clickagg.batch.spark_engine import local_session, stop_session

    try:
        start = time.perf_counter()
        # As `clickagg reconcile --engine spark --spark-conf spark.driver.memory=...`.
        session = local_session(extra={"spark.driver.memory": driver_memory})
        start_s = time.perf_counter() - start
        context = session.sparkContext
        heap_mib = int(context._jvm.java.lang.Runtime.getRuntime().maxMemory()) // 2**20
        proc = getattr(getattr(context, "_gateway", None), "proc", None)
        try:
            reader = ParquetArchiveReader(root / "archive")
            try:
                hours = reader.event_hours()
            finally:
                reader.close()
            hours = hours[-1:] if last_hour_only else hours
            # The engine uses the active session: this one, started (and timed) apart.
            run = metered(
                lambda: reconcile_run(root, hours, "spark"), {"jvm": getattr(proc, "pid", None)}
            )
        finally:
            with contextlib.suppress(Exception):  # a JVM that died with its task is gone
                stop_session(session)
    except Exception as e:
        print(json.dumps({"error": _why(e)}))
        return 1
    run.start_s, run.heap_mib = start_s, heap_mib
    answer = dataclasses.asdict(run)
    del answer["process_s"]
    print(json.dumps(answer))
    return 0


def spark_unavailable() -> str | None:
    """Why the Spark engine cannot run here, or None."""
    try:
        from clickagg.batch.spark_engine import java_available
    except ImportError as e:
        return f"pyspark is not installed ({e.name}): pip install -e '.[spark]'"
    if not java_available():
        return "no Java 17+ (java on PATH or JAVA_HOME)"
    return None


# -- report ----------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    results: dict[str, list[Run]],
    *,
    decisions: int,
    distinct: int,
    hours: list[int],
    hour_decisions: int,
    last_hour_only: bool = False,
) -> None:
    fmt = common.fmt
    base = median([r.seconds for r in results.get("baseline", [])])
    rows = []
    for engine, runs in results.items():
        if not runs:
            continue
        seconds = [r.seconds for r in runs]
        med = median(seconds)
        rows.append(
            [
                engine,
                f"{med:.2f} s ({min(seconds):.2f}-{max(seconds):.2f})",
                fmt(decisions / med),
                fmt(distinct / med),
                f"{med / base:.1f}x" if base == base else "n/a",
                fmt(median([r.other_cores for r in runs])),
            ]
        )
    print()
    print(
        f"{decisions:,} archived decisions ({distinct:,} distinct events) over "
        f"{len(hours)} hours, medians of {max(len(r) for r in results.values())} runs:"
    )
    common.print_table(
        [
            "engine",
            "time (min-max)",
            "decisions/s",
            "distinct events/s",
            "time / baseline",
            "other load (cores)",
        ],
        rows,
    )
    spark = results.get("spark", [])
    if spark:
        print(
            "spark: each run in a fresh process, as `clickagg reconcile --engine spark`: JVM "
            f"and session start {median([r.start_s for r in spark]):.1f} s (not in the times "
            f"above), {median([r.process_s for r in spark]):.1f} s for the whole process; "
            f"local[2], {spark[0].heap_mib:,} MiB heap"
        )

    if last_hour_only:
        _report_last_hour(results, decisions=decisions, hour_decisions=hour_decisions)
        return

    # Closing ONE hour: an engine that ranks the whole month to date (every file of the
    # billing period) does so before it selects the hour, so its cost has two parts, read
    # from the progress of the same runs: until the first hour was published (ranking the
    # month, if the engine does, + that hour), and each further hour (select + aggregate +
    # publish).
    hour_events = RATE * 3600
    month_events = hour_events * 24 * 30
    print()
    print(
        f"closing ONE hour at {RATE:,} events/s ({hour_events / 1e6:,.0f}M decisions): "
        f"LINEAR EXTRAPOLATION from this archive ({hour_decisions:,} decisions an hour), "
        "not measured at that size"
    )
    for engine in ("duckdb", "spark"):
        runs = results.get(engine, [])
        if not runs:
            continue
        first = median([r.first_hour_s for r in runs])
        per_winner = median(
            [(r.seconds - r.first_hour_s) / max(r.winners - r.first_hour_winners, 1) for r in runs]
        )
        first_winners = median([r.first_hour_winners for r in runs])
        rank = max(0.0, first - per_winner * first_winners) / decisions  # s per decision
        hour_part = per_winner * hour_events * distinct / decisions
        print(
            f"  {engine}: first hour published after {first:.2f} s = what precedes the "
            f"hours (~{rank * 1e9:,.0f} ns per decision of the {decisions:,}: ranking them, "
            "where the engine ranks the month) + the hour; each further "
            f"hour ~{per_winner * 1e9:,.0f} ns per winner. So one {RATE // 1000}K/s hour: "
            f"~{fmt((rank * hour_events + hour_part) / 60)} min as the first hour of a month, "
            f"~{fmt((rank * month_events + hour_part) / 3600)} h as the last hour of a 30-day "
            f"month (where the engine ranks its {month_events / 1e9:,.0f}G decisions to close it)"
        )
    if results.get("duckdb") or results.get("spark"):
        whole = ", ".join(
            f"{engine} ~{fmt(median([r.seconds for r in runs]) / decisions * hour_events / 60)} min"
            for engine, runs in results.items()
            if runs
        )
        print(
            f"  assumes cost linear in decisions (a ranking that outgrows memory spills to "
            f"disk); whole run's time per decision x {hour_events / 1e6:,.0f}M: {whole}"
        )
    if hour_decisions < 100_000:
        print(
            "  note: hours this small are dominated by fixed per-hour costs (publishing "
            "files, a Spark job per query): the extrapolation overstates"
        )


def _report_last_hour(
    results: dict[str, list[Run]], *, decisions: int, hour_decisions: int
) -> None:
    """What closing the archive's last hour took, and the two ways to extrapolate it: by the
    month to date (an engine that ranks the month) or by the hour (one that does not)."""
    fmt = common.fmt
    hour_events = RATE * 3600
    month_events = hour_events * 24 * 30
    print()
    print(
        f"closing the LAST hour only (~{hour_decisions:,} decisions of {decisions:,} in the "
        f"month to date); LINEAR EXTRAPOLATIONS to {RATE:,} events/s, not measured:"
    )
    for engine in ("duckdb", "spark"):
        runs = results.get(engine, [])
        if not runs:
            continue
        seconds = median([r.seconds for r in runs])
        print(
            f"  {engine}: {seconds:.2f} s ({min(r.seconds for r in runs):.2f}-"
            f"{max(r.seconds for r in runs):.2f}); per decision of the month to date "
            f"{seconds / decisions * 1e9:,.0f} ns -> last hour of a 30-day month "
            f"~{fmt(seconds / decisions * month_events / 3600)} h if it grows with the month; "
            f"per decision of the hour {seconds / hour_decisions * 1e9:,.0f} ns -> "
            f"~{fmt(seconds / hour_decisions * hour_events / 60)} min if it grows with the hour"
        )


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="archived decisions")
    parser.add_argument("--hours", type=int, default=24, help="event hours (from 2026-01-05)")
    parser.add_argument("--flush", type=int, default=200_000, help="decisions per flush")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (medians)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated: duckdb, spark, baseline"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "clickagg-bench-reconcile",
        help="where archives are cached, one subdirectory per parameter set",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached archive")
    parser.add_argument(
        "--spark-driver-memory",
        default="4g",
        help="spark.driver.memory of the Spark runs (local mode: the executors' heap too)",
    )
    parser.add_argument(
        "--last-hour-only",
        action="store_true",
        help="the duckdb and spark runs reconcile only the last hour (what the closer does)",
    )
    parser.add_argument("--spark-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spark_child:
        return spark_child(args.spark_child, args.spark_driver_memory, args.last_hour_only)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines: some of {', '.join(ENGINES)}")
    if not 1 <= args.hours <= 26 * 24:
        parser.error("--hours: 1 to 624 (one billing month from 2026-01-05)")
    if args.events < args.hours:
        parser.error("--events: at least one decision per hour")

    info = common.machine()
    info["code"] = common._git_info()
    common.print_machine(info)
    spec = ArchiveSpec(events=args.events, hours=args.hours, flush=args.flush, seed=args.seed)
    root, record = cached_archive(spec, args.dir, args.rebuild)
    archive = root / "archive"
    reader = ParquetArchiveReader(archive)
    try:
        hours = reader.event_hours()
        files = reader.files(min(hours), max(hours) + HOUR_MS)
    finally:
        reader.close()
    total = disk_bytes(archive)
    parquet = sum(f.stat().st_size for f in files)
    index = disk_bytes(archive / INDEX_DIR)
    distinct = int(record["distinct_events"])
    print(
        f"archive: {spec.events:,} decisions ({distinct:,} distinct events), {len(hours)} "
        f"hours, {len(files)} Parquet files, {spec.flush:,} decisions per flush"
    )
    print(
        f"archive bytes per event: {parquet / spec.events:.1f} Parquet "
        f"(+ {index / spec.events:.1f} audit index, {total / spec.events:.1f} in all; "
        f"{total / 2**20:,.0f} MiB)"
    )

    results: dict[str, list[Run]] = {e: [] for e in ENGINES if e in engines}
    if "spark" in results:
        reason = spark_unavailable()
        if reason is not None:
            print(f"spark: skipped: {reason}")
            del results["spark"]
    elif "spark" not in engines:
        print("spark: skipped: not in --engines")

    # What each engine's run must find: every distinct event, or the last hour's winners.
    expected = {engine: distinct for engine in ENGINES}
    meaning = {engine: "= distinct events" for engine in ENGINES}
    reconciled = hours
    if args.last_hour_only:
        reconciled = hours[-1:]
        expected["duckdb"] = expected["spark"] = first_copies_in(root, hours, hours[-1])
        meaning["duckdb"] = meaning["spark"] = "= the hour's first copies"
        print(f"last hour only: {expected['duckdb']:,} winners in the last hour")
    measures: dict[str, Callable[[], Run]] = {
        "duckdb": lambda: metered(lambda: reconcile_run(root, reconciled, "duckdb")),
        "spark": lambda: spark_run(root, args.spark_driver_memory, args.last_hour_only),
        "baseline": lambda: metered(lambda: baseline_run(root, hours)),
    }
    failed: dict[str, str] = {}  # engine -> why a run failed; its further runs are skipped
    for rep in range(args.runs):
        for engine in results:
            if engine in failed:
                continue
            try:
                run = measures[engine]()
            except Exception as e:  # e.g. Spark out of heap: report it, keep the others
                failed[engine] = f"run {rep + 1} of {args.runs} failed: {_why(e)}"
                print(f"  run {rep + 1}/{args.runs} {engine}: FAILED: {_why(e)}", flush=True)
                continue
            if run.winners != expected[engine]:
                raise AssertionError(
                    f"{engine}: {run.winners:,} winners, the archive holds {expected[engine]:,}"
                )
            results[engine].append(run)
            print(
                f"  run {rep + 1}/{args.runs} {engine}: {run.seconds:.2f} s, "
                f"{run.winners:,} winners ({meaning[engine]}), other load "
                f"{run.other_cores:.2f} cores",
                flush=True,
            )
    report(
        results,
        decisions=spec.events,
        distinct=distinct,
        hours=hours,
        hour_decisions=spec.events // len(hours),
        last_hour_only=args.last_hour_only,
    )
    if args.last_hour_only and results.get("duckdb"):
        print("  selecting the hour alone (its winners and the stream's view), medians:")
        for view, position, seconds in selection_times(root, hours, args.runs):
            print(f"    {view}: hour {position + 1} of {len(hours)}: {seconds * 1000:,.0f} ms")
    for engine, why in failed.items():
        done = len(results[engine])
        print(f"{engine}: {why}; figures above from its {done} completed run(s)")
    return 1 if failed else 0


def _why(error: Exception) -> str:
    """One line for a failure: the innermost cause a Java stack trace names, if any."""
    text = str(error)
    causes = re.findall(r"Caused by: ([^\n]+)", text)
    line = causes[-1] if causes else (text.strip().splitlines() or [type(error).__name__])[0]
    return line.strip()[:200]


if __name__ == "__main__":
    sys.exit(main())
