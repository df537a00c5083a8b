"""Single-event ``POST /events/click``: requests/s and latency at C concurrent connections.

Load: wrk (C, keep-alive) with bench/single_event.lua, a unique click_id per request; if
wrk is missing, an asyncio raw-socket HTTP/1.1 keep-alive client. Click fields: --shape
production (default: ad, campaign, advertiser, user, IP, user agent, country and price of
50,000 production clicks, bench/traffic_shapes.py, cycled) or legacy (50 ads, 5,000 users,
one user agent). The load generator runs
on the same 2 cores as the server: its CPU share is reported.

Targets, interleaved per repetition, each on a fresh process (clickagg: fresh data dir):
  clickagg   ``clickagg serve`` (uvicorn, uvloop, httptools; durable before 202)
  base       the same, importing the src/ of ``--baseline REV`` (added when it is given)
  batch      ``clickagg serve`` fed the same clicks as NDJSON ``POST /events/batch`` bodies
             of ``--batch-events`` from ``--batch-connections`` keep-alive connections: what
             one event costs when it is not alone (figures per event, not per request)
  bare-asgi  bench/bare_app.py:app under uvicorn with the same options (reads body, 202)
  starlette  bench/bare_app.py:starlette_app (a Starlette route, reads body, 202 JSON)

"API µs/request" is the server process's CPU time (all its threads: event loop and group
commit; /proc/<pid>/stat) over the measurement divided by the requests answered (events,
for batch); the stream worker is a separate process and reported apart.

    .venv/bin/python bench/single_event.py [--connections 64] [--duration 8] [--repeat 3]
        [--targets clickagg,base,batch] [--baseline REV]
        [--shape production|legacy] [--ads N] [--users N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
import traffic_shapes

LUA = common.BENCH_DIR / "single_event.lua"
UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(port: int, args: argparse.Namespace, duration: float, run_id: str) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://{common.HOST}:{port}/events/click",
        "--",
        run_id,
        *([args.fields_file] if args.fields_file else []),
    ]
    before = children_cpu()
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    cpu = children_cpu() - before
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            data["loadgen_cpu_s"] = cpu
            return data
    raise RuntimeError(f"wrk said: {out.stdout[-2000:]} {out.stderr[-2000:]}")


async def _async_load(
    port: int, connections: int, duration: float, run_id: str, fields: list[str]
) -> tuple[int, int, list[float]]:
    """Closed-loop keep-alive POSTs from ``connections`` raw sockets for ``duration`` s."""
    deadline = time.perf_counter() + duration
    latencies: list[float] = []
    errors = 0

    async def one(conn_id: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(common.HOST, port)
        try:
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                if fields:
                    tail = fields[(n + conn_id * 7919) % len(fields)]
                    body = (
                        f'{{"click_id":"{run_id}-{conn_id}-{n}",'
                        f'"timestamp":{int(time.time())},{tail}'
                    ).encode()
                else:
                    body = (
                        f'{{"click_id":"{run_id}-{conn_id}-{n}","ad_id":"ad-{n % 50:04d}",'
                        f'"advertiser_id":"adv-{n % 7}","user_id":"u-{n % 5000}",'
                        f'"timestamp":{int(time.time())},"ip":"203.0.113.{n % 256}",'
                        f'"user_agent":"{UA}"}}'
                    ).encode()
                head = (
                    f"POST /events/click HTTP/1.1\r\nHost: {common.HOST}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                t = time.perf_counter()
                writer.write(head + body)
                headers = await reader.readuntil(b"\r\n\r\n")
                status = int(headers[9:12])
                length = 0
                chunked = False
                for line in headers.split(b"\r\n"):
                    lowered = line.lower()
                    if lowered.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                    elif lowered.startswith(b"transfer-encoding:") and b"chunked" in lowered:
                        chunked = True
                if chunked:  # clickagg's JSON responses are chunked: read to the last chunk
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - t)
                if not 200 <= status < 300:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))
    return len(latencies), errors, latencies


def run_python_client(
    port: int, args: argparse.Namespace, duration: float, run_id: str
) -> dict[str, Any]:
    t_cpu, t = time.process_time(), time.perf_counter()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    fields = Path(args.fields_file).read_text().splitlines() if args.fields_file else []
    count, errors, lat = runner(_async_load(port, args.connections, duration, run_id, fields))
    wall = time.perf_counter() - t
    return {
        "requests": count,
        "duration_us": wall * 1e6,
        "status": errors,
        "p50_us": common.percentile(lat, 50) * 1e6,
        "p90_us": common.percentile(lat, 90) * 1e6,
        "p99_us": common.percentile(lat, 99) * 1e6,
        "p999_us": common.percentile(lat, 99.9) * 1e6,
        "max_us": max(lat) * 1e6,
        "loadgen_cpu_s": time.process_time() - t_cpu,
    }


def run_batches(
    port: int, args: argparse.Namespace, duration: float, run_id: str
) -> dict[str, Any]:
    """NDJSON bodies of ``--batch-events`` clicks (the single-event load's fields, each
    with a unique click_id) from ``--batch-connections`` threads for ``duration`` s."""
    fields = Path(args.fields_file).read_text().splitlines() if args.fields_file else []
    if not fields:  # legacy shape: one fixed tail
        fields = [f'"ad_id":"ad-0001","advertiser_id":"adv-1","user_agent":"{UA}"}}']
    deadline = time.perf_counter() + duration
    lock = threading.Lock()
    latencies: list[float] = []
    totals = {"events": 0, "errors": 0}

    def one(conn_id: int) -> None:
        client = common.Client(port)
        n = 0
        try:
            while time.perf_counter() < deadline:
                now = int(time.time())
                lines = []
                for _ in range(args.batch_events):
                    n += 1
                    tail = fields[(n + conn_id * 7919) % len(fields)]
                    lines.append(
                        f'{{"click_id":"{run_id}-{conn_id}-{n}","event_type":"click",'
                        f'"timestamp":{now},{tail}'
                    )
                body = ("\n".join(lines) + "\n").encode()
                t = time.perf_counter()
                status, data, _ = client.request(
                    "POST", "/events/batch", body, "application/x-ndjson"
                )
                elapsed = time.perf_counter() - t
                with lock:
                    latencies.append(elapsed)
                    if status == 202:
                        totals["events"] += json.loads(data)["accepted"]
                    else:
                        totals["errors"] += 1
        finally:
            client.close()

    t_cpu, t = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.batch_connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t
    return {
        "requests": totals["events"],  # per event: the figures compare with one-event requests
        "duration_us": wall * 1e6,
        "status": totals["errors"],
        "p50_us": common.percentile(latencies, 50) * 1e6,
        "p90_us": common.percentile(latencies, 90) * 1e6,
        "p99_us": common.percentile(latencies, 99) * 1e6,
        "p999_us": common.percentile(latencies, 99.9) * 1e6,
        "max_us": max(latencies) * 1e6,
        "loadgen_cpu_s": time.process_time() - t_cpu,
    }


def make_server(target: str, env: dict[str, str], tmp: Path) -> common.ManagedProcess:
    if target in ("clickagg", "base", "batch"):
        return common.ClickaggServer(partitions=8, env=env)
    port = common.free_port()
    app = {"bare-asgi": "bare_app:app", "starlette": "bare_app:starlette_app"}[target]
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--app-dir",
        str(common.BENCH_DIR),
        "--host",
        common.HOST,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return common.ManagedProcess(
        command, port=port, log_path=tmp / f"{target}.log", ready_path="/healthz", env=env
    )


def measure(
    target: str,
    args: argparse.Namespace,
    env: dict[str, str],
    tmp: Path,
    rep: int,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    load = run_wrk if args.client == "wrk" else run_python_client
    if target == "batch":
        load = run_batches
    server = make_server(target, env, tmp)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        server.start()
        pids = {"server": server.pid}
        if isinstance(server, common.ClickaggServer):
            pids["worker"] = server.worker_pid()  # type: ignore[assignment]
        load(server.port, args, args.warmup, f"w{rep}{target[0]}")
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            for name, pid in pids.items():
                if pid is not None:
                    spies.append(common.start_py_spy(pid, profile_dir / f"{name}.txt"))
            time.sleep(1.0)
        meter = common.CpuMeter(pids)
        meter.start()
        result = load(server.port, args, args.duration, f"r{rep}{target[0]}")
        cpu = meter.stop()
        accepted = durable_mean_ms = None
        if isinstance(server, common.ClickaggServer):
            _, raw = common.http_get(server.port, "/metrics")
            text = raw.decode()
            accepted = int(common.metric_sum(text, "clickagg_events_accepted_total"))
            waits = common.metric_sum(text, "clickagg_ingest_durable_seconds_count")
            if waits:
                total = common.metric_sum(text, "clickagg_ingest_durable_seconds_sum")
                durable_mean_ms = total / waits * 1e3
    finally:
        for spy in spies:
            common.stop_py_spy(spy)
        server.stop()
    seconds = result["duration_us"] / 1e6
    per_request = seconds / max(1, result["requests"]) * 1e6  # µs of wall per request
    cpu_us = {k: cpu.get(k, 0.0) * per_request for k in ("server", "worker")}
    cpu["loadgen"] = result["loadgen_cpu_s"] / seconds
    cpu["other_processes"] = max(0.0, cpu["other_processes"] - cpu["loadgen"])
    errors = sum(result.get(k, 0) for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "target": target,
        "rps": result["requests"] / seconds,
        "requests": result["requests"],
        "errors": errors,
        "p50_ms": result["p50_us"] / 1e3,
        "p99_ms": result["p99_us"] / 1e3,
        "p999_ms": result["p999_us"] / 1e3,
        "max_ms": result["max_us"] / 1e3,
        "accepted_by_server_incl_warmup": accepted,
        "durable_wait_mean_ms": durable_mean_ms,
        "cpu": cpu,
        "api_cpu_us": cpu_us["server"],
        "worker_cpu_us": cpu_us["worker"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up load")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--targets", default="clickagg,bare-asgi,starlette", help="comma-separated subset"
    )
    p.add_argument("--client", choices=["wrk", "python"], default=None)
    p.add_argument("--live-src", action="store_true", help="import the working tree")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure target 'base': clickagg serve importing the src/ of this commit",
    )
    p.add_argument("--batch-events", type=int, default=1000, help="events per batch body")
    p.add_argument("--batch-connections", type=int, default=4)
    traffic_shapes.add_arguments(p)
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="OUTDIR",
        help="instead of measuring: one clickagg run under py-spy (server.txt, worker.txt)",
    )
    args = p.parse_args()
    traffic_shapes.shapes_of(args)
    if args.client is None:
        args.client = "wrk" if shutil.which("wrk") else "python"
    common.install_sigterm_handler()
    with (
        common.source_snapshot(not args.live_src) as snap,
        tempfile.TemporaryDirectory(prefix="clickagg-single-") as tmp,
    ):
        args.fields_file = None
        if args.shape == "production":
            fields = traffic_shapes.click_fields(
                50_000, seed=13, shape=traffic_shapes.shape_of(args)
            )
            args.fields_file = str(Path(tmp) / "click_fields.txt")
            Path(args.fields_file).write_text("\n".join(fields) + "\n")
        envs = {"": snap["env"]}
        if args.baseline:
            base_src = Path(tmp) / "baseline-src"
            snap["code"]["baseline"] = common.freeze(base_src, args.baseline)
            envs["base"] = dict(snap["env"])
            envs["base"]["PYTHONPATH"] = str(base_src)
            if "base" not in args.targets.split(","):
                args.targets = "base," + args.targets
        run_all(args, snap, envs, Path(tmp))


def run_all(
    args: argparse.Namespace, snap: dict[str, Any], envs: dict[str, dict[str, str]], tmp: Path
) -> None:
    info = common.machine() | {"code": snap["code"]}
    common.print_machine(info)
    if args.py_spy is not None:
        run = measure("clickagg", args, snap["env"], tmp, 0, profile_dir=args.py_spy)
        print(
            f"profiled run: {run['rps']:,.0f} req/s, p99 {run['p99_ms']:.1f} ms; stacks in "
            f"{args.py_spy}/server.txt and worker.txt (bench/profile_summary.py)"
        )
        return
    targets = args.targets.split(",")
    print(
        f"load: {args.client} ({args.threads} thread(s)), {args.connections} connections, "
        f"{args.duration:g} s per measurement, on the same machine as the server"
    )
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    for rep in range(args.repeat):
        for target in targets:
            run = measure(target, args, envs.get(target, envs[""]), tmp, rep)
            runs[target].append(run)
            print(
                f"rep {rep + 1} {target:<10} {run['rps']:>9,.0f} req/s  API "
                f"{run['api_cpu_us']:.0f} µs/req  p50 {run['p50_ms']:.2f} "
                f"ms  p99 {run['p99_ms']:.2f} ms  errors {run['errors']}  cores: server "
                f"{run['cpu']['server']:.2f} worker {run['cpu'].get('worker', 0):.2f} "
                f"loadgen {run['cpu']['loadgen']:.2f} not-ours {run['cpu']['other_processes']:.2f}"
                + (
                    f"; mean wait for the durable append {run['durable_wait_mean_ms']:.1f} ms"
                    if run["durable_wait_mean_ms"] is not None
                    else ""
                )
            )
    summary = {
        t: {
            "rps": common.summary([r["rps"] for r in rs]),
            "p50_ms": common.summary([r["p50_ms"] for r in rs]),
            "p99_ms": common.summary([r["p99_ms"] for r in rs]),
            "api_cpu_us": common.summary([r["api_cpu_us"] for r in rs]),
            "worker_cpu_us": common.summary([r["worker_cpu_us"] for r in rs]),
            "cpu_median": {
                k: statistics.median(r["cpu"].get(k, 0.0) for r in rs)
                for k in ("server", "worker", "loadgen", "other_processes", "machine_busy")
            },
        }
        for t, rs in runs.items()
    }
    ref = "bare-asgi" if "bare-asgi" in summary else targets[0]
    base = summary[ref]["rps"]["median"]
    print()
    common.print_table(
        ["target", "req/s median", "min", "max", f"vs {ref}", "p50 ms", "p99 ms"],
        [
            [
                t,
                common.fmt(s["rps"]["median"]),
                common.fmt(s["rps"]["min"]),
                common.fmt(s["rps"]["max"]),
                f"{s['rps']['median'] / base:.3f}",
                f"{s['p50_ms']['median']:.2f}",
                f"{s['p99_ms']['median']:.2f}",
            ]
            for t, s in summary.items()
        ]
        + [["DESIGN target (clickagg)", ">= 50,000", "", "", "", "", "< 10"]],
    )
    print()
    common.print_table(
        ["cores used (median)", "server", "worker", "load generator", "not ours", "machine"],
        [[t, *(f"{s['cpu_median'][k]:.2f}" for k in s["cpu_median"])] for t, s in summary.items()],
    )
    print()
    cpu_ref = "base" if "base" in summary else None
    common.print_table(
        [
            "CPU per request (events for batch)",
            "API µs median",
            "min",
            "max",
            *([f"vs {cpu_ref}"] if cpu_ref else []),
            "worker µs median",
        ],
        [
            [
                t,
                f"{s['api_cpu_us']['median']:.1f}",
                f"{s['api_cpu_us']['min']:.1f}",
                f"{s['api_cpu_us']['max']:.1f}",
                *(
                    [f"{s['api_cpu_us']['median'] / summary[cpu_ref]['api_cpu_us']['median']:.3f}"]
                    if cpu_ref
                    else []
                ),
                f"{s['worker_cpu_us']['median']:.1f}",
            ]
            for t, s in summary.items()
        ],
    )
    common.emit_json(
        {
            "bench": "single_event",
            "machine": info,
            "params": vars(args),
            "summary": summary,
            "ratio_clickagg_to_bare": (
                summary["clickagg"]["rps"]["median"] / base if "clickagg" in summary else None
            ),
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
