"""Where the time goes, stage by stage, in one process (no HTTP, no second process).

Drives the same code paths as the server on --shape traffic (bench/traffic_shapes.py:
production, the default: 10,000 Zipf ads, 1M users; or legacy: TrafficGenerator's 50 ads):
  ingest side, per request body: decode_many, normalize, then per group of --group bodies
    (as the group committer does) merge_columns + columns.encode, log append, log sync;
  worker side: the real ``PartitionWorker.step`` over the written log, its parts timed by
    wrapping them on the instances: log read, frames_to_events, decide (dedup, lateness),
    outcomes (rules, prices, decision records; processor.process in builds before both: dedup,
    lateness, rules), the round's aggregation (deltas and unique-user sketches),
    store.commit (broken down by SQL statement), snapshot, archive; then one compaction of
    every delta (the server's background compactions, paid here at the end).
Run per micro-batch size (--micro-batch, comma-separated) on a fresh store, so the fixed
cost per commit shows beside the cost per event. --cprofile adds cProfile's top functions.

    .venv/bin/python bench/stage_breakdown.py [--events 400000] [--micro-batch 2000,20000,50000]
        [--shape production|legacy] [--ads N] [--users N]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import traffic_shapes
from clickagg.api.committer import merge_columns
from clickagg.archive.parquet import ParquetArchiveWriter
from clickagg.clock import SystemClock
from clickagg.config import Settings
from clickagg.core import columns
from clickagg.core.events import decode_many, decode_one, normalize
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.worker import stream
from clickagg.worker.snapshots import SnapshotStore

_INSERT = re.compile(r"INSERT\s+INTO\s+(\w+)", re.IGNORECASE)


def sql_label(sql: str) -> str:
    head = " ".join(sql.split())[:80]
    match = _INSERT.search(head)
    if match:
        return f"sql: insert {match.group(1)}"
    table = " partition_offsets" if "partition_offsets" in head else ""
    return f"sql: {head.split(' ')[0].lower()}{table}"


class TimedCursor:
    """Passes everything to a DuckDB cursor, timing execute/register by statement."""

    def __init__(self, cursor: Any, timings: dict[str, float]) -> None:
        self._cursor = cursor
        self._timings = timings

    def execute(self, sql: str, *params: Any) -> Any:
        t = time.perf_counter()
        try:
            return self._cursor.execute(sql, *params)
        finally:
            self._timings[sql_label(sql)] += time.perf_counter() - t

    def register(self, *a: Any) -> Any:
        t = time.perf_counter()
        try:
            return self._cursor.register(*a)
        finally:
            self._timings["sql: register arrow"] += time.perf_counter() - t

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def timed(fn: Callable[..., Any], timings: dict[str, float], label: str) -> Callable[..., Any]:
    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timings[label] += time.perf_counter() - t

    return wrapper


def ingest_side(
    bodies: list[bytes], settings: Settings, group: int, timings: dict[str, float]
) -> int:
    writer = SegmentLogWriter.for_settings(settings)
    accepted = 0
    try:
        for start in range(0, len(bodies), group):
            parts: dict[int, list[columns.EventColumns]] = defaultdict(list)
            for body in bodies[start : start + group]:
                t0 = time.perf_counter()
                events, rejected = decode_many(body, ndjson=True)
                t1 = time.perf_counter()
                batch = normalize(
                    events,
                    default_type=None,
                    partitions=settings.partitions,
                    now_ms=int(time.time() * 1000),
                    max_future_ms=settings.max_future_ms,
                    rejected=rejected,
                )
                t2 = time.perf_counter()
                timings["decode_many"] += t1 - t0
                timings["normalize"] += t2 - t1
                accepted += batch.accepted
                for p, cols in batch.by_partition.items():
                    parts[p].append(cols)
            for p, cols_list in sorted(parts.items()):
                t0 = time.perf_counter()
                merged = merge_columns(cols_list)
                t1 = time.perf_counter()
                payload = columns.encode(merged)
                t2 = time.perf_counter()
                writer.append(p, payload, merged.count)
                t3 = time.perf_counter()
                timings["merge_columns"] += t1 - t0
                timings["columns.encode"] += t2 - t1
                timings["log append (crc, buffer)"] += t3 - t2
            t0 = time.perf_counter()
            writer.sync()
            timings["log sync (write+fsync)"] += time.perf_counter() - t0
    finally:
        writer.close()
    return accepted


def single_event_costs(settings: Settings, count: int = 20_000) -> dict[str, float]:
    """µs per call of the single-event ingest path: decode_one, normalize([event]), encode."""
    body = (
        b'{"click_id":"c-1","ad_id":"ad-0001","advertiser_id":"adv-1","user_id":"u-1",'
        b'"timestamp":%d,"ip":"203.0.113.1","user_agent":"Mozilla/5.0 (iPhone; CPU iPhone '
        b"OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 "
        b'Mobile/15E148 Safari/604.1"}' % int(time.time())
    )
    timings: dict[str, float] = defaultdict(float)
    for _ in range(count):
        t0 = time.perf_counter()
        event = decode_one(body)
        t1 = time.perf_counter()
        batch = normalize(
            [event],
            default_type=0,
            partitions=settings.partitions,
            now_ms=int(time.time() * 1000),
            max_future_ms=settings.max_future_ms,
        )
        t2 = time.perf_counter()
        for cols in batch.by_partition.values():
            columns.encode(cols)
        t3 = time.perf_counter()
        timings["decode_one"] += t1 - t0
        timings["normalize (1 event)"] += t2 - t1
        timings["columns.encode (1 event)"] += t3 - t2
    return {k: v / count * 1e6 for k, v in timings.items()}


def worker_side(settings: Settings, timings: dict[str, float]) -> tuple[int, int]:
    """Drain the log with the real worker code; return (events, store transactions).

    With ``stream.step_all`` (one transaction per round over all partitions) that is what
    runs, as in runtime.worker; otherwise each PartitionWorker.step commits on its own."""
    reader = SegmentLogReader(settings.log_dir)
    store = DuckDBStore(settings.store_path)
    if hasattr(store, "_cursor"):
        plain_cursor = store._cursor
        store._cursor = lambda: TimedCursor(plain_cursor(), timings)  # type: ignore[method-assign]
    snapshots = SnapshotStore(settings.snapshot_dir)
    archive = ParquetArchiveWriter(
        settings.archive_dir,
        flush_events=settings.archive_flush_events,
        flush_interval_ms=settings.archive_flush_interval_ms,
    )
    archive.append = timed(archive.append, timings, "archive.append")  # type: ignore[method-assign]
    archive.flush = timed(archive.flush, timings, "archive.flush")  # type: ignore[method-assign]
    clock = SystemClock()
    original_frames_to_events = stream.frames_to_events
    stream.frames_to_events = timed(original_frames_to_events, timings, "frames_to_events")
    original_round_deltas = stream.aggregate.round_deltas
    stream.aggregate.round_deltas = timed(  # type: ignore[method-assign]
        original_round_deltas, timings, "aggregate (round deltas, sketches)"
    )
    # Since 0004a79 a round is decided per partition (PartitionWorker.decide: dedup,
    # lateness) and labelled once (processor.outcomes: rules, prices, decision records);
    # before, PartitionProcessor.process did both per partition.
    original_outcomes = getattr(stream, "outcomes", None)
    if original_outcomes is not None:
        stream.outcomes = timed(original_outcomes, timings, "rules, prices, decisions (outcomes)")
    timed_store = _TimedStore(store, timings)
    transactions = processed = 0
    try:
        workers = [
            stream.PartitionWorker(
                p,
                reader=reader,
                store=store,
                archive=archive,
                snapshots=snapshots,
                settings=settings,
                clock=clock,
            )
            for p in range(settings.partitions)
        ]
        for w in workers:
            w.reader = _TimedReader(reader, timings)  # type: ignore[assignment]
            if hasattr(w, "decide"):
                w.decide = timed(w.decide, timings, "dedup, lateness (decide)")  # type: ignore[method-assign]
            else:
                w.processor.process = timed(w.processor.process, timings, "processor.process")  # type: ignore[method-assign]
            w.store = timed_store  # type: ignore[assignment]
            for name in ("maybe_snapshot", "_maybe_snapshot"):
                if hasattr(w, name):
                    setattr(w, name, timed(getattr(w, name), timings, "snapshot"))
        step_all = getattr(stream, "step_all", None)
        for _ in range(100_000):  # bounded: ends when every partition is drained
            if step_all is not None:
                done = [step_all(workers, timed_store)]
            else:
                done = [w.step() for w in workers]
            transactions += sum(1 for n in done if n)
            processed += sum(done)
            if not any(done):
                break
        archive.flush()  # what the background flushes cost, paid here at the end
        t = time.perf_counter()  # what the background compactions cost, likewise
        store.compact()
        timings["compaction (background)"] += time.perf_counter() - t
    finally:
        stream.frames_to_events = original_frames_to_events
        stream.aggregate.round_deltas = original_round_deltas  # type: ignore[method-assign]
        if original_outcomes is not None:
            stream.outcomes = original_outcomes
        archive.close()
        store.close()
        reader.close()
    return processed, transactions


class _TimedReader:
    def __init__(self, reader: SegmentLogReader, timings: dict[str, float]) -> None:
        self._reader = reader
        self.read = timed(reader.read, timings, "log read")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class _TimedStore:
    def __init__(self, store: DuckDBStore, timings: dict[str, float]) -> None:
        self._store = store
        for name in ("commit", "commit_many"):
            if hasattr(store, name):
                setattr(self, name, timed(getattr(store, name), timings, "store.commit"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def report(
    title: str, timings: dict[str, float], events: int, keys: list[str], total_key: str | None
) -> dict[str, Any]:
    total = timings[total_key] if total_key else sum(timings[k] for k in keys)
    rows = []
    out = {}
    for key in keys:
        seconds = timings.get(key, 0.0)
        if seconds == 0.0 and key.startswith("sql"):
            continue
        rows.append(
            [
                key,
                f"{seconds:.2f}",
                f"{seconds / events * 1e6:.2f}",
                f"{100 * seconds / total:.0f}%" if total else "",
                common.fmt(events / seconds) if seconds else "",
            ]
        )
        out[key] = seconds
    print(f"\n{title}")
    common.print_table(["stage", "seconds", "µs/event", "share", "events/s alone"], rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=400_000)
    p.add_argument("--batch", type=int, default=10_000, help="events per request body")
    p.add_argument("--group", type=int, default=4, help="request bodies per group commit")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument(
        "--micro-batch",
        default="2000,20000,50000",
        help="worker max events per partition per step (comma-separated runs)",
    )
    p.add_argument("--clean", action="store_true", help="no duplicates, late or malformed")
    traffic_shapes.add_arguments(p)
    p.add_argument("--cprofile", action="store_true", help="print cProfile top functions")
    p.add_argument("--live-src", action="store_true", help="import the working tree")
    args = p.parse_args()
    if not args.live_src and "CLICKAGG_BENCH_CODE" not in os.environ:
        # Re-run this script on a frozen copy of src/ (see common.source_snapshot).
        common.install_sigterm_handler()
        with common.source_snapshot() as snap:
            env = snap["env"] | {"CLICKAGG_BENCH_CODE": json.dumps(snap["code"])}
            code = subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode
        raise SystemExit(code)
    info = common.machine() | {"code": json.loads(os.environ.get("CLICKAGG_BENCH_CODE", "{}"))}
    common.print_machine(info)
    from clickagg.traffic import TrafficMix

    [shape] = traffic_shapes.shapes_of(args)
    mix = TrafficMix(duplicate_rate=0, late_rate=0, malformed_rate=0) if args.clean else None
    clean = {"duplicate_fraction": 0.0, "late_fraction": 0.0} if args.clean else {}
    traffic = traffic_shapes.build(
        shape, args, args.events, args.batch, seed=3, legacy_mix=mix, **clean
    )
    bodies = traffic.bodies
    print(traffic.description)
    results: dict[str, Any] = {"bench": "stage_breakdown", "machine": info, "params": vars(args)}
    profiler = cProfile.Profile() if args.cprofile else None
    sizes = [int(x) for x in args.micro_batch.split(",")]
    for index, size in enumerate(sizes):
        with tempfile.TemporaryDirectory(prefix="clickagg-stages-") as tmp:
            settings = dataclasses.replace(
                Settings(data_dir=Path(tmp), partitions=args.partitions),
                micro_batch_events=size,
            )
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            timings: dict[str, float] = defaultdict(float)
            if profiler:
                profiler.enable()
            t = time.perf_counter()
            accepted = ingest_side(bodies, settings, args.group, timings)
            timings["ingest total"] = time.perf_counter() - t
            t = time.perf_counter()
            processed, steps = worker_side(settings, timings)
            timings["worker total"] = time.perf_counter() - t
            if profiler:
                profiler.disable()
            if processed != accepted:
                raise SystemExit(f"worker processed {processed}, ingest accepted {accepted}")
            if index == 0:
                ingest_keys = [
                    "decode_many",
                    "normalize",
                    "merge_columns",
                    "columns.encode",
                    "log append (crc, buffer)",
                    "log sync (write+fsync)",
                ]
                results["ingest"] = report(
                    f"ingest side: {accepted:,} events accepted, {args.batch:,} per body, "
                    f"{args.group} bodies per group commit "
                    f"({accepted / timings['ingest total']:,.0f} events/s single-threaded)",
                    timings,
                    accepted,
                    [*ingest_keys, "ingest total"],
                    "ingest total",
                )
            sql_keys = sorted(k for k in timings if k.startswith("sql"))
            results[f"worker_micro_batch_{size}"] = report(
                f"worker side, micro-batch <= {size:,}: {steps:,} store transactions, "
                f"{processed / max(steps, 1):,.0f} events per transaction "
                f"({processed / timings['worker total']:,.0f} events/s)",
                timings,
                processed,
                [
                    "log read",
                    "frames_to_events",
                    *(
                        name
                        for name in (
                            "processor.process",  # builds before 0004a79
                            "dedup, lateness (decide)",
                            "rules, prices, decisions (outcomes)",
                        )
                        if name in timings
                    ),
                    "aggregate (round deltas, sketches)",
                    "store.commit",
                    *sql_keys,
                    "compaction (background)",
                    "snapshot",
                    "archive.append",
                    "archive.flush",
                    "worker total",
                ],
                "worker total",
            ) | {"commits": steps, "events": processed}
    single = single_event_costs(Settings(data_dir=Path("."), partitions=args.partitions))
    print("\nsingle-event ingest path, µs per request (in process, no HTTP):")
    common.print_table(["stage", "µs"], [[k, f"{v:.1f}"] for k, v in single.items()])
    results["single_event_us"] = single
    if profiler:
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.sort_stats("tottime").print_stats(30)
        print("\ncProfile, all runs, top 30 by own time:")
        print(buffer.getvalue()[:12000])
    common.emit_json(results)


if __name__ == "__main__":
    main()
