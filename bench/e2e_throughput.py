"""End-to-end throughput: HTTP NDJSON batches → durable log → committed minute rows.

Per repetition: a fresh ``clickagg serve`` (temp data dir), the same pre-encoded NDJSON
bodies (TrafficGenerator: ~10 % duplicates, 2 % late, 0.5 % malformed lines) POSTed to
/events/batch from K keep-alive connections. The clock starts at the first send;
"accept" ends at the last 202, "end to end" when the sum of
``clickagg_partition_committed_offset`` (/metrics, polled every 50 ms once the last
202 is in) equals the number of events accepted.

Baseline (same run, between repetitions): the same valid events, already in an in-memory
Arrow table, counted by one DuckDB ``GROUP BY ad_id, minute`` (clicks and impressions).

    .venv/bin/python bench/e2e_throughput.py [--events 1000000] [--batch 10000]
        [--concurrency 8] [--repeat 3] [--py-spy OUTDIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

import common
from clickagg.traffic import TrafficMix

MINUTE_MS = 60_000
CPU_NAMES = ("api", "worker", "client", "other_processes", "machine_busy", "machine_iowait")


class _Light(msgspec.Struct):
    ad_id: str | int
    timestamp: int
    event_type: str


def arrow_table(bodies: list[bytes]) -> pa.Table:
    """The valid events of the bodies as columns (malformed lines skipped, as ingest does)."""
    decoder = msgspec.json.Decoder(_Light)
    ad, ts, kind = [], [], []
    for body in bodies:
        for line in body.split(b"\n"):
            if not line:
                continue
            try:
                event = decoder.decode(line)
            except msgspec.DecodeError:
                continue
            ad.append(str(event.ad_id))
            ts.append(event.timestamp)
            kind.append(event.event_type)
    return pa.table({"ad_id": ad, "ts_ms": pa.array(ts, pa.int64()), "event_type": kind})


BASELINE_SQL = """
    SELECT ad_id, ts_ms - ts_ms % 60000 AS minute_ms,
           count(*) FILTER (WHERE event_type = 'click') AS clicks,
           count(*) FILTER (WHERE event_type = 'impression') AS impressions
    FROM events GROUP BY ad_id, minute_ms"""


def baseline(table: pa.Table, repeat: int = 3) -> float:
    """Median events/s of DuckDB counting the table by (ad_id, minute)."""
    con = duckdb.connect()
    con.register("events", table)
    con.sql(BASELINE_SQL).fetchall()  # warm-up
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        con.sql(BASELINE_SQL).to_arrow_table()
        rates.append(table.num_rows / (time.perf_counter() - t))
    con.close()
    return statistics.median(rates)


def one_run(
    bodies: list[bytes],
    args: argparse.Namespace,
    env: dict[str, str],
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    server = common.ClickaggServer(partitions=args.partitions, env=env)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        server.start()
        worker = server.worker_pid()
        meter = common.CpuMeter({"api": server.pid, "worker": worker})
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            idle = args.py_spy_idle
            spies.append(common.start_py_spy(server.pid, profile_dir / "api.txt", idle=idle))
            if worker is not None:
                spies.append(common.start_py_spy(worker, profile_dir / "worker.txt", idle=idle))
            time.sleep(1.0)  # let py-spy attach
        sent = common.send_batches(
            server.port,
            bodies,
            concurrency=args.concurrency,
            max_seconds=args.timeout,
            on_start=meter.start,
        )
        cpu_ingest = meter.stop()
        client = common.Client(server.port)
        try:
            committed_at_ingest_end = common.committed_total(client)
            committed = committed_at_ingest_end
            deadline = time.perf_counter() + args.timeout
            while committed < sent.accepted and time.perf_counter() < deadline:
                time.sleep(0.05)
                committed = common.committed_total(client)
            t_commit = time.perf_counter()
            cpu_total = meter.stop()
            _, text, _ = client.request("GET", "/metrics")
        finally:
            client.close()
    finally:
        for spy in spies:
            common.stop_py_spy(spy)
        server.stop()
    metrics = text.decode()
    fates = {
        name: int(common.metric_sum(metrics, f"clickagg_partition_events_{name}"))
        for name in ("counted", "duplicate", "late", "invalid")
    }
    if sent.errors:
        print(f"  client errors: {len(sent.errors)}; first: {sent.errors[0]}", file=sys.stderr)
    if committed != sent.accepted:
        raise RuntimeError(f"committed {committed} != accepted {sent.accepted} before timeout")
    ingest_s = sent.last_ack - sent.first_send
    e2e_s = t_commit - sent.first_send
    return {
        "accepted": sent.accepted,
        "rejected": sent.rejected,
        "retries_503": sent.retries_503,
        "client_errors": len(sent.errors),
        "ingest_s": ingest_s,
        "e2e_s": e2e_s,
        "ingest_eps": sent.accepted / ingest_s,
        "e2e_eps": sent.accepted / e2e_s,
        "lag_at_ingest_end": sent.accepted - committed_at_ingest_end,
        "batch_p50_ms": common.percentile(sent.latencies, 50) * 1e3,
        "batch_p99_ms": common.percentile(sent.latencies, 99) * 1e3,
        "cpu_during_ingest": cpu_ingest,
        "cpu_whole_run": cpu_total,
        "fates": fates,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000, help="events per repetition")
    p.add_argument("--batch", type=int, default=10_000, help="events per POST (5k-20k)")
    p.add_argument("--concurrency", type=int, default=8, help="client connections")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=120.0, help="max seconds per phase")
    p.add_argument("--clean", action="store_true", help="no duplicates, late or malformed")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="OUTDIR",
        help="instead of measuring: one run under py-spy (api.txt, worker.txt raw stacks)",
    )
    p.add_argument(
        "--py-spy-idle", action="store_true", help="with --py-spy: record idle threads too"
    )
    p.add_argument(
        "--live-src", action="store_true", help="import the working tree, not a frozen copy"
    )
    args = p.parse_args()
    common.install_sigterm_handler()
    with common.source_snapshot(not args.live_src) as snap:
        run_all(args, snap)


def run_all(args: argparse.Namespace, snap: dict[str, Any]) -> None:
    env = snap["env"]
    info = common.machine() | {"code": snap["code"]}
    common.print_machine(info)
    mix = TrafficMix(duplicate_rate=0, late_rate=0, malformed_rate=0) if args.clean else None
    t = time.perf_counter()
    bodies = common.make_bodies(args.events, args.batch, seed=args.seed, mix=mix)
    mb = sum(map(len, bodies)) / 1e6
    print(
        f"generated {args.events:,} events in {len(bodies)} bodies ({mb:,.0f} MB) "
        f"in {time.perf_counter() - t:.1f} s"
    )
    if args.py_spy is not None:
        run = one_run(bodies, args, env, profile_dir=args.py_spy)
        print(
            f"profiled run: accept {run['ingest_eps']:,.0f} ev/s, e2e {run['e2e_eps']:,.0f} ev/s; "
            f"stacks in {args.py_spy}/api.txt and worker.txt "
            f"(summarise: bench/profile_summary.py {args.py_spy}/api.txt)"
        )
        return
    table = arrow_table(bodies)
    runs, baselines = [], []
    for rep in range(args.repeat):
        run = one_run(bodies, args, env)
        runs.append(run)
        baselines.append(baseline(table))
        print(
            f"rep {rep + 1}: accepted {run['accepted']:,} in {run['ingest_s']:.2f} s, "
            f"committed in {run['e2e_s']:.2f} s; cpu api {run['cpu_whole_run']['api']:.2f} "
            f"worker {run['cpu_whole_run'].get('worker', float('nan')):.2f} "
            f"client {run['cpu_whole_run']['client']:.2f} cores; "
            f"baseline {baselines[-1]:,.0f} ev/s"
        )
    ingest = common.summary([r["ingest_eps"] for r in runs])
    e2e = common.summary([r["e2e_eps"] for r in runs])
    base = common.summary(baselines)

    def cpu(phase: str, name: str) -> float:
        return statistics.median(r[phase].get(name, float("nan")) for r in runs)

    print()
    common.print_table(
        ["figure (events/s)", "median", "min", "max", "vs DuckDB baseline"],
        [
            [
                "accept (HTTP → durable log)",
                common.fmt(ingest["median"]),
                common.fmt(ingest["min"]),
                common.fmt(ingest["max"]),
                f"{ingest['median'] / base['median']:.4f}",
            ],
            [
                "end to end (→ committed rows)",
                common.fmt(e2e["median"]),
                common.fmt(e2e["min"]),
                common.fmt(e2e["max"]),
                f"{e2e['median'] / base['median']:.4f}",
            ],
            [
                "baseline: DuckDB GROUP BY on Arrow",
                common.fmt(base["median"]),
                common.fmt(base["min"]),
                common.fmt(base["max"]),
                "1",
            ],
            ["DESIGN target end to end", "1,000,000", "", "", ""],
        ],
    )
    print()
    common.print_table(
        [
            "cores used (median)",
            "api",
            "worker",
            "client (this script)",
            "not ours",
            "machine busy",
            "iowait",
        ],
        [
            [
                phase.replace("_", " "),
                *(f"{cpu(phase, name):.2f}" for name in CPU_NAMES),
            ]
            for phase in ("cpu_during_ingest", "cpu_whole_run")
        ],
    )
    fates = runs[-1]["fates"]
    print(
        f"\nlast rep fates: {fates}; rejected at ingest {runs[-1]['rejected']}; "
        f"lag at end of accept (median) "
        f"{statistics.median(r['lag_at_ingest_end'] for r in runs):,.0f} events; "
        f"batch POST p50 {statistics.median(r['batch_p50_ms'] for r in runs):.0f} ms"
    )
    common.emit_json(
        {
            "bench": "e2e_throughput",
            "machine": info,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "ingest_eps": ingest,
            "e2e_eps": e2e,
            "baseline_duckdb_eps": base,
            "ratio_e2e_to_baseline": e2e["median"] / base["median"],
            "ratio_ingest_to_baseline": ingest["median"] / base["median"],
            "cpu_cores_median": {
                phase: {n: cpu(phase, n) for n in CPU_NAMES}
                for phase in ("cpu_during_ingest", "cpu_whole_run")
            },
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
