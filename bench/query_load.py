"""Queries under ingest load: latency of the three query kinds at a fixed query rate while
batches are being ingested, beside the same request rate against GET /healthz.

Per repetition, a fresh ``clickagg serve`` (8 partitions):
  - pre-load --preload events, timestamps spread over the last 10 minutes, via
    /events/batch, then wait until the worker has committed them all; traffic is --shape
    production (default: 10,000 Zipf-popular ads, 1M users) or legacy (TrafficGenerator,
    --ads 200 unless given), see bench/traffic_shapes.py; queried ads are drawn with the
    traffic's popularity (Zipf for production, uniform for legacy);
  - a loader process sends NDJSON batches at --rate events/s (paced, one connection);
  - after --warmup s, an asyncio client issues requests on a fixed schedule at --qps
    (open loop, --conns keep-alive HTTP/1.1 connections) for --seconds:
      50 % GET /aggregates?ad_id=..&granularity=minute&last=1h
      25 % GET /aggregates/realtime?ad_id=..&window=5m
      25 % GET /api/v1/ads/{ad}/metrics?granularity=hour&last=1d
    (--group-by-share F: that share of GET /aggregates?ad_id=..&granularity=hour&last=1h
    &group_by=country, the others scaled down);
    latency = send of the request -> last byte of the response; any non-200 is an error;
  - baseline, same server and load: the same schedule against GET /healthz (the HTTP floor).
  - with --rpc, the same queries on the same schedule sent by this process straight to the
    worker process's query server (RpcQueryStore on its Unix socket, no HTTP): the part of
    a query's latency spent in the worker process (under the stream's GIL) and the socket.
    The order of the phases rotates between repetitions.

    .venv/bin/python bench/query_load.py [--qps 1700] [--rate 20000] [--seconds 15] [--repeat 3]
        [--shape production|legacy] [--ads N] [--users N] [--group-by-share 0.25] [--rpc]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import common
import traffic_shapes

KINDS = ("aggregates_minute_1h", "realtime_5m", "ad_metrics_hour_1d", "country_hour_1h")
WEIGHTS = (0.50, 0.25, 0.25, 0.0)


def weights(group_by_share: float) -> list[float]:
    return [w * (1 - group_by_share) for w in WEIGHTS[:-1]] + [group_by_share]


def query_path(kind: str, ad: str) -> str:
    if kind == "aggregates_minute_1h":
        return f"/aggregates?ad_id={ad}&granularity=minute&last=1h"
    if kind == "realtime_5m":
        return f"/aggregates/realtime?ad_id={ad}&window=5m"
    if kind == "country_hour_1h":
        return f"/aggregates?ad_id={ad}&granularity=hour&last=1h&group_by=country"
    return f"/api/v1/ads/{ad}/metrics?granularity=hour&last=1d"


def query_call(store: Any, kind: str, ad: str) -> Any:
    """What the HTTP handler of ``query_path(kind, ad)`` asks the query store."""
    from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS, window_start

    now = int(time.time() * 1000)
    if kind == "realtime_5m":
        start = window_start(now, MINUTE_MS) - 4 * MINUTE_MS
        return store.window(ad_id=ad, start_ms=start, end_ms=now + MINUTE_MS)
    granularity, span, size, group_by = {
        "aggregates_minute_1h": ("minute", HOUR_MS, MINUTE_MS, None),
        "ad_metrics_hour_1d": ("hour", DAY_MS, HOUR_MS, None),
        "country_hour_1h": ("hour", HOUR_MS, HOUR_MS, "country"),
    }[kind]
    return store.aggregates(
        ad_id=ad,
        start_ms=window_start(now + 1 - span, size),
        end_ms=now + 1,
        granularity=granularity,
        group_by=group_by,
    )


@dataclass
class Phase:
    lat_ms: dict[str, list[float]] = field(default_factory=dict)
    sent: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0  # due, but no connection was free before the phase ended
    deadline: float = float("inf")
    first_error: str = ""
    late_ms: list[float] = field(default_factory=list)  # send time - scheduled time
    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def all_ms(self) -> list[float]:
        return [v for values in self.lat_ms.values() for v in values]

    def achieved(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0


# -- the query client ------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise ValueError("response without Content-Length")
    body = await reader.readexactly(length) if length else b""
    return status, body


async def _run_rpc_schedule(
    socket_path: str, plan: list[tuple[str, str]], qps: float, conns: int, out: Phase
) -> None:
    """Like _run_schedule, each query sent through RpcQueryStore (``plan`` holds ads)."""
    from pathlib import Path

    from clickagg.store.rpc import RpcQueryStore

    store = RpcQueryStore(Path(socket_path), pool_size=conns)
    work: asyncio.Queue[tuple[str, str, float] | None] = asyncio.Queue()

    async def connection() -> None:
        while True:
            item = await work.get()
            if item is None:
                return
            kind, ad, due = item
            t0 = time.perf_counter()
            if t0 > out.deadline:
                out.skipped += 1
                continue
            out.late_ms.append((t0 - due) * 1e3)
            out.sent += 1
            try:
                await query_call(store, kind, ad)
            except Exception as exc:
                out.errors += 1
                out.first_error = out.first_error or f"{kind}: {exc!r}"
                continue
            out.ok += 1
            out.lat_ms.setdefault(kind, []).append((time.perf_counter() - t0) * 1e3)

    await _drive(plan, qps, conns, out, work, connection)
    await store.close()


async def _drive(
    plan: list[tuple[str, str]],
    qps: float,
    conns: int,
    out: Phase,
    work: asyncio.Queue[tuple[str, str, float] | None],
    connection: Any,
) -> None:
    tasks = [asyncio.create_task(connection()) for _ in range(conns)]
    await asyncio.sleep(0.05)  # connections open before the clock starts
    start = time.perf_counter()
    out.deadline = start + len(plan) / qps + 1.0  # at most 1 s of backlog is still sent
    for i, (kind, path) in enumerate(plan):
        due = start + i / qps
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        work.put_nowait((kind, path, due))
    for _ in tasks:
        work.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    out.wall_s = time.perf_counter() - start


async def _run_schedule(
    port: int, plan: list[tuple[str, str]], qps: float, conns: int, out: Phase
) -> None:
    """Open loop: request i is due at start + i/qps and goes to the next free connection."""
    work: asyncio.Queue[tuple[str, str, float] | None] = asyncio.Queue()
    host = common.HOST.encode()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(common.HOST, port)
        try:
            while True:
                item = await work.get()
                if item is None:
                    return
                kind, path, due = item
                t0 = time.perf_counter()
                if t0 > out.deadline:
                    out.skipped += 1
                    continue
                out.late_ms.append((t0 - due) * 1e3)
                out.sent += 1
                try:
                    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host))
                    status, body = await asyncio.wait_for(_read_response(reader), 30)
                except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    out.errors += 1
                    out.first_error = out.first_error or f"{kind}: {exc!r}"
                    writer.close()
                    reader, writer = await asyncio.open_connection(common.HOST, port)
                    continue
                t1 = time.perf_counter()
                if status == 200:
                    out.ok += 1
                    out.lat_ms.setdefault(kind, []).append((t1 - t0) * 1e3)
                else:
                    out.errors += 1
                    out.first_error = out.first_error or f"{kind} {status}: {body[:120]!r}"
        finally:
            writer.close()

    await _drive(plan, qps, conns, out, work, connection)


def run_phase(
    port: int | str, plan: list[tuple[str, str]], qps: float, conns: int, meter: common.CpuMeter
) -> Phase:
    """``port`` an int: HTTP; a str: the worker's query socket (``plan`` then holds ads)."""
    out = Phase()
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    meter.start()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if isinstance(port, str):
            runner.run(_run_rpc_schedule(port, plan, qps, conns, out))
        else:
            runner.run(_run_schedule(port, plan, qps, conns, out))
    out.cpu = meter.stop()
    return out


# -- background ingest -----------------------------------------------------------------------


def loader(port: int, bodies: list[bytes], per_body: int, rate: float, stop: Any) -> None:
    """Child process: POST bodies on a fixed schedule until ``stop`` is set or they run out."""
    client = common.Client(port)
    period = per_body / rate
    start = time.perf_counter()
    try:
        for n, body in enumerate(bodies):
            wait = start + n * period - time.perf_counter()
            if wait > 0 and stop.wait(wait):
                return
            if stop.is_set():
                return
            with contextlib.suppress(OSError, http.client.HTTPException):
                client.request("POST", "/events/batch", body, "application/x-ndjson")
    finally:
        client.close()


def preload(port: int, bodies: list[bytes], expected_lines: int, timeout_s: float) -> int:
    result = common.send_batches(port, bodies, concurrency=2, max_seconds=timeout_s)
    if result.errors:
        raise RuntimeError(f"preload: {result.errors[0]}")
    target = result.accepted
    client = common.Client(port)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if common.committed_total(client) >= target:
                return result.accepted
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError(f"preload not committed within {timeout_s}s ({target} log records)")


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Rep:
    queries: Phase
    healthz: Phase
    preloaded: int
    rpc: Phase | None = None
    rss_mb: dict[str, float] = field(default_factory=dict)  # after the phases


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB; 0 when it cannot be read."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one_rep(args: argparse.Namespace, env: dict[str, str], data: dict[str, Any], rep: int) -> Rep:
    server = common.ClickaggServer(partitions=args.partitions, env=env)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    proc = None
    with common.running(server):
        try:
            preloaded = preload(server.port, data["preload"], args.preload, 60)
            proc = ctx.Process(
                target=loader,
                args=(server.port, data["background"], args.batch, args.rate, stop),
                daemon=True,
            )
            proc.start()
            time.sleep(args.warmup)
            pids = {"api": server.pid, "worker": server.worker_pid(), "loader": proc.pid}
            phases: dict[str, Phase] = {}
            names = ["queries", "healthz", *(["rpc"] if args.rpc else [])]
            order = names[rep % len(names) :] + names[: rep % len(names)]
            socket_path = str(server.data_dir / "worker.sock")  # Settings.rpc_socket
            for name in order:
                plan = data[{"queries": "plan", "healthz": "healthz_plan"}.get(name, "rpc_plan")]
                phases[name] = run_phase(
                    socket_path if name == "rpc" else server.port,
                    plan,
                    args.qps,
                    args.conns,
                    common.CpuMeter(pids),
                )
            rss = {name: rss_mb(pid) for name, pid in pids.items() if name != "loader"}
        finally:
            stop.set()
            if proc is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=10)
    return Rep(phases["queries"], phases["healthz"], preloaded, phases.get("rpc"), rss)


def build(args: argparse.Namespace) -> dict[str, Any]:
    from clickagg.traffic import TrafficMix

    now_ms = int(time.time() * 1000)
    bg_events = int(args.rate * (args.warmup + 2 * args.seconds + 10))
    if args.shape == "legacy":
        ads = args.ads or 200
        mix = TrafficMix(ads=ads, spread_ms=600_000, late_rate=0.0)
        pre = traffic_shapes.legacy(args.preload, args.batch, seed=5, mix=mix, now_ms=now_ms)
        bg_mix = TrafficMix(ads=ads, spread_ms=30_000)
        background = traffic_shapes.legacy(bg_events, args.batch, seed=6, mix=bg_mix)
    else:
        pre = traffic_shapes.build("production", args, args.preload, args.batch, seed=5)
        # the background continues where the preload ends: event times over the last 30 s
        background = traffic_shapes.build(
            "production", args, bg_events, args.batch, seed=6, span_ms=30_000
        )
    rng = np.random.default_rng(9)
    n = int(args.qps * args.seconds)
    kinds = rng.choice(len(KINDS), size=n, p=weights(args.group_by_share)).tolist()
    ad_index = rng.choice(len(pre.ad_ids), size=n, p=pre.ad_weights).tolist()
    plan = [
        (KINDS[kind], query_path(KINDS[kind], pre.ad_ids[ad]))
        for kind, ad in zip(kinds, ad_index, strict=True)
    ]
    healthz_plan = [("healthz", "/healthz")] * n
    rpc_plan = [(KINDS[kind], pre.ad_ids[ad]) for kind, ad in zip(kinds, ad_index, strict=True)]
    return {
        "rpc_plan": rpc_plan,
        "preload": pre.bodies,
        "background": background.bodies,
        "plan": plan,
        "healthz_plan": healthz_plan,
        "description": pre.description,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qps", type=float, default=1_700, help="target queries/s")
    p.add_argument("--rate", type=float, default=20_000, help="background events/s")
    p.add_argument("--batch", type=int, default=2_000, help="events per POST")
    p.add_argument("--seconds", type=float, default=15, help="each measured phase")
    p.add_argument("--warmup", type=float, default=2, help="background-only seconds first")
    p.add_argument("--preload", type=int, default=300_000, help="events over the last 10 min")
    p.add_argument("--conns", type=int, default=16, help="client keep-alive connections")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--live-src", action="store_true", help="import the working tree")
    p.add_argument(
        "--group-by-share", type=float, default=0.0, help="share of group_by=country queries"
    )
    p.add_argument(
        "--rpc", action="store_true", help="also the same queries straight to the worker"
    )
    traffic_shapes.add_arguments(p)
    args = p.parse_args()
    traffic_shapes.shapes_of(args)
    common.install_sigterm_handler()
    with common.source_snapshot(not args.live_src) as snap:
        run_all(args, snap)


def phase_json(ph: Phase) -> dict[str, Any]:
    return {
        "sent": ph.sent,
        "skipped": ph.skipped,
        "schedule_lag_p50_ms": common.percentile(ph.late_ms, 50),
        "ok": ph.ok,
        "errors": ph.errors,
        "first_error": ph.first_error,
        "achieved_per_s": ph.achieved(),
        "p50_ms": common.percentile(ph.all_ms(), 50),
        "p99_ms": common.percentile(ph.all_ms(), 99),
        "schedule_lag_p99_ms": common.percentile(ph.late_ms, 99),
        "cpu": ph.cpu,
    }


def run_all(args: argparse.Namespace, snap: dict[str, Any]) -> None:
    info = common.machine() | {"code": snap["code"]}
    common.print_machine(info)
    t = time.perf_counter()
    data = build(args)
    print(f"traffic: {data['description']}")
    print(
        f"built {args.preload:,} preload + {len(data['background']) * args.batch:,} background "
        f"events in {time.perf_counter() - t:.1f} s; {args.qps:,.0f} q/s for {args.seconds:g} s "
        f"over {args.conns} connections; background {args.rate:,.0f} events/s"
    )
    reps: list[Rep] = []
    for rep in range(args.repeat):
        r = one_rep(args, snap["env"], data, rep)
        reps.append(r)
        q, h = r.queries, r.healthz
        print(
            f"rep {rep + 1}: preloaded {r.preloaded:,}; queries {q.achieved():,.0f}/s p50 "
            f"{common.percentile(q.all_ms(), 50):.2f} p99 {common.percentile(q.all_ms(), 99):.2f}"
            f" ms, errors {q.errors}, not sent {q.skipped}, schedule lag p99 "
            f"{common.percentile(q.late_ms, 99):.1f} ms;"
            f" healthz {h.achieved():,.0f}/s p50 {common.percentile(h.all_ms(), 50):.2f} p99 "
            f"{common.percentile(h.all_ms(), 99):.2f} ms, errors {h.errors}; cores (queries): "
            f"api {q.cpu.get('api', 0):.2f} worker {q.cpu.get('worker', 0):.2f} loader "
            f"{q.cpu.get('loader', 0):.2f} client {q.cpu.get('client', 0):.2f} machine "
            f"{q.cpu.get('machine_busy', 0):.2f} not-ours {q.cpu.get('other_processes', 0):.2f};"
            " RSS MiB: " + ", ".join(f"{k} {v:,.0f}" for k, v in r.rss_mb.items())
        )
        if r.rpc is not None:
            print(
                f"  rpc (no HTTP): {r.rpc.achieved():,.0f}/s p50 "
                f"{common.percentile(r.rpc.all_ms(), 50):.2f} p99 "
                f"{common.percentile(r.rpc.all_ms(), 99):.2f} ms, errors {r.rpc.errors}"
            )
        for phase in (q, h, *([r.rpc] if r.rpc else [])):
            if phase.first_error:
                print(f"  first error: {phase.first_error}")

    def med(fn: Any) -> dict[str, float]:
        return common.summary([fn(r) for r in reps])

    def cell(s: dict[str, float], digits: int = 2) -> str:
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    rows = []
    figures: dict[str, Any] = {}
    for label, get in [
        *((k, lambda r, k=k: r.queries.lat_ms.get(k, [])) for k in KINDS),
        ("all queries", lambda r: r.queries.all_ms()),
        ("baseline GET /healthz", lambda r: r.healthz.all_ms()),
        *(
            ((f"rpc {k}", lambda r, k=k: r.rpc.lat_ms.get(k, []) if r.rpc else []) for k in KINDS)
            if args.rpc
            else ()
        ),
        *(
            [("rpc all (worker + socket, no HTTP)", lambda r: r.rpc.all_ms() if r.rpc else [])]
            if args.rpc
            else []
        ),
    ]:
        p50 = med(lambda r, get=get: common.percentile(get(r), 50))
        p99 = med(lambda r, get=get: common.percentile(get(r), 99))
        figures[label] = {"p50_ms": p50, "p99_ms": p99}
        rows.append([label, cell(p50), cell(p99)])
    print()
    common.print_table(["latency (ms)", "p50 median (min-max)", "p99 median (min-max)"], rows)
    rates = {
        "queries_per_s": med(lambda r: r.queries.achieved()),
        "healthz_per_s": med(lambda r: r.healthz.achieved()),
    }
    cpu = {
        phase: {
            key: med(lambda r, phase=phase, key=key: getattr(r, phase).cpu.get(key, 0.0))
            for key in ("api", "worker", "loader", "client", "machine_busy", "other_processes")
        }
        for phase in ("queries", "healthz")
    }
    errors = sum(r.queries.errors + r.healthz.errors for r in reps)
    skipped = sum(r.queries.skipped + r.healthz.skipped for r in reps)
    lag99 = {
        phase: med(lambda r, phase=phase: common.percentile(getattr(r, phase).late_ms, 99))
        for phase in ("queries", "healthz")
    }
    print(
        f"\nachieved: queries {cell(rates['queries_per_s'], 0)}/s, healthz "
        f"{cell(rates['healthz_per_s'], 0)}/s (target {args.qps:,.0f}); errors (non-200 or "
        f"failed) {errors}; due but not sent (client connections all busy) {skipped}; "
        f"send later than scheduled, p99: queries {cell(lag99['queries'], 1)} ms, healthz "
        f"{cell(lag99['healthz'], 1)} ms"
    )
    for phase in ("queries", "healthz"):
        c = cpu[phase]
        print(f"cores during {phase}: " + ", ".join(f"{k} {v['median']:.2f}" for k, v in c.items()))
    q99 = figures["all queries"]["p99_ms"]["median"]
    print(
        f"DESIGN target: query p99 < 10 ms at 1,700 q/s while ingesting 100K events/s; "
        f"measured p99 {q99:.2f} ms at {rates['queries_per_s']['median']:,.0f} q/s with "
        f"{args.rate:,.0f} events/s"
    )
    common.emit_json(
        {
            "bench": "query_load",
            "machine": info,
            "params": vars(args),
            "latency": figures,
            "rates": rates,
            "cpu": cpu,
            "errors": errors,
            "skipped": skipped,
            "schedule_lag_p99_ms": lag99,
            "runs": [
                {"preloaded": r.preloaded}
                | {phase: phase_json(getattr(r, phase)) for phase in ("queries", "healthz")}
                for r in reps
            ],
        }
    )


if __name__ == "__main__":
    main()
