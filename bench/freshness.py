"""Freshness: time from a click's 202 until queries count it, under steady batch load.

Per repetition, a fresh ``clickagg serve``:
  - background: NDJSON batches at --rate events/s (paced, one connection) of --shape
    production (default) or legacy traffic (bench/traffic_shapes.py);
  - markers: every --interval ms one ``POST /events/click`` to a new ad_id, stamped now;
    right after its 202, one ``GET /healthz`` round trip is timed (the baseline);
  - a poller asks ``GET /aggregates/realtime?ad_id=<marker ad>&window=5m`` each cycle
    (--poll ms apart) for the oldest pending marker of each partition (commits are in
    offset order) until clicks >= 1: visible latency = arrival of that answer - arrival of
    the 202. (window=5m, not 1m: the 1m window is the current
    minute only, so a marker sent just before a minute boundary would never show in it.)

    .venv/bin/python bench/freshness.py [--rate 20000] [--seconds 20] [--repeat 3]
        [--shape production|legacy] [--ads N] [--users N]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import common
import traffic_shapes


@dataclass
class Marker:
    ad_id: str
    partition: int
    t_ack: float


@dataclass
class RepResult:
    visible_ms: list[float] = field(default_factory=list)
    healthz_ms: list[float] = field(default_factory=list)
    poll_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    markers_sent: int = 0
    not_visible: int = 0
    background_events: int = 0
    background_behind_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)


def background(
    port: int,
    bodies: list[bytes],
    per_body: int,
    rate: float,
    stop: threading.Event,
    out: RepResult,
) -> None:
    """Send bodies on a fixed schedule (rate events/s); never faster, bounded by ``stop``."""
    client = common.Client(port)
    period = per_body / rate
    start = time.perf_counter()
    try:
        for n, body in enumerate(bodies):
            due = start + n * period
            wait = due - time.perf_counter()
            if wait > 0 and stop.wait(wait):
                return
            if stop.is_set():
                return
            try:
                status, data, _ = client.request(
                    "POST", "/events/batch", body, "application/x-ndjson"
                )
            except (OSError, http.client.HTTPException) as exc:
                out.errors.append(f"background: {exc!r}")
                continue
            if status == 202:
                out.background_events += json.loads(data)["accepted"]
            else:
                out.errors.append(f"background {status}")
            out.background_behind_s = max(out.background_behind_s, time.perf_counter() - due)
    finally:
        client.close()


def markers(
    port: int,
    run_id: str,
    interval_s: float,
    seconds: float,
    pending: queue.Queue[Marker | None],
    out: RepResult,
) -> None:
    client = common.Client(port)
    health = common.Client(port)
    end = time.perf_counter() + seconds
    n = 0
    try:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            n += 1
            ad_id = f"fresh-{run_id}-{n}"
            body = json.dumps(
                {
                    "click_id": f"mk-{run_id}-{n}",
                    "ad_id": ad_id,
                    "user_id": "marker",
                    "timestamp": int(time.time() * 1000),
                }
            ).encode()
            try:
                status, data, _ = client.request("POST", "/events/click", body, "application/json")
            except (OSError, http.client.HTTPException) as exc:
                out.errors.append(f"marker: {exc!r}")
                continue
            t_ack = time.perf_counter()
            if status != 202:
                out.errors.append(f"marker {status}: {data[:100]!r}")
                continue
            out.markers_sent += 1
            pending.put(Marker(ad_id, int(json.loads(data)["partition"]), t_ack))
            t = time.perf_counter()
            try:
                status, _, _ = health.request("GET", "/healthz")
                if status == 200:
                    out.healthz_ms.append((time.perf_counter() - t) * 1e3)
            except (OSError, http.client.HTTPException) as exc:
                out.errors.append(f"healthz: {exc!r}")
            time.sleep(max(0.0, interval_s - (time.perf_counter() - t0)))
    finally:
        pending.put(None)
        client.close()
        health.close()


def poller(
    port: int,
    pending: queue.Queue[Marker | None],
    poll_s: float,
    give_up_s: float,
    out: RepResult,
) -> None:
    """Poll the oldest waiting marker of each partition: a partition commits in offset
    order, so while its oldest marker is not counted, none after it is either."""
    client = common.Client(port)
    waiting: dict[int, collections.deque[Marker]] = collections.defaultdict(collections.deque)
    done_sending = False
    try:
        while not done_sending or any(waiting.values()):
            cycle = time.perf_counter()
            while True:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done_sending = True
                else:
                    waiting[item.partition].append(item)
            for line in waiting.values():
                while line:
                    marker = line[0]
                    t = time.perf_counter()
                    try:
                        status, data, _ = client.request(
                            "GET", f"/aggregates/realtime?ad_id={marker.ad_id}&window=5m"
                        )
                    except (OSError, http.client.HTTPException) as exc:
                        out.errors.append(f"poll: {exc!r}")
                        break
                    now = time.perf_counter()
                    out.poll_ms.append((now - t) * 1e3)
                    if status == 200 and json.loads(data)["clicks"] >= 1:
                        out.visible_ms.append((now - marker.t_ack) * 1e3)
                    elif now - marker.t_ack > give_up_s:
                        out.not_visible += 1
                    else:
                        break
                    line.popleft()
            out.cycle_ms.append((time.perf_counter() - cycle) * 1e3)
            time.sleep(max(0.0, poll_s - (time.perf_counter() - cycle)))
    finally:
        client.close()


def one_rep(
    args: argparse.Namespace, env: dict[str, str], bodies: list[bytes], rep: int
) -> RepResult:
    out = RepResult()
    server = common.ClickaggServer(partitions=args.partitions, env=env)
    stop = threading.Event()
    pending: queue.Queue[Marker | None] = queue.Queue()
    threads: list[threading.Thread] = []
    try:
        server.start()
        threads.append(
            threading.Thread(
                target=background,
                args=(server.port, bodies, args.batch, args.rate, stop, out),
                daemon=True,
            )
        )
        threads[0].start()
        time.sleep(args.warmup)
        threads.append(
            threading.Thread(
                target=poller,
                args=(server.port, pending, args.poll / 1e3, args.give_up, out),
                daemon=True,
            )
        )
        threads[1].start()
        meter = common.CpuMeter({"api": server.pid, "worker": server.worker_pid()})
        meter.start()
        markers(server.port, f"{rep}", args.interval / 1e3, args.seconds, pending, out)
        out.cpu = meter.stop()
        threads[1].join(timeout=args.give_up + 30)
    finally:
        stop.set()
        pending.put(None)
        for thread in threads:
            thread.join(timeout=60)
        server.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=20_000, help="background events/s")
    p.add_argument("--batch", type=int, default=2_000, help="background events per POST")
    p.add_argument("--seconds", type=float, default=20, help="marker phase per repetition")
    p.add_argument("--warmup", type=float, default=2, help="background-only seconds first")
    p.add_argument("--interval", type=float, default=50, help="ms between markers")
    p.add_argument("--poll", type=float, default=10, help="ms between poll cycles")
    p.add_argument("--give-up", type=float, default=30, help="s until a marker counts as lost")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--live-src", action="store_true", help="import the working tree")
    traffic_shapes.add_arguments(p)
    args = p.parse_args()
    traffic_shapes.shapes_of(args)
    common.install_sigterm_handler()
    with common.source_snapshot(not args.live_src) as snap:
        run_all(args, snap)


def run_all(args: argparse.Namespace, snap: dict[str, Any]) -> None:
    info = common.machine() | {"code": snap["code"]}
    common.print_machine(info)
    total = int(args.rate * (args.warmup + args.seconds + 5))
    traffic = traffic_shapes.build(args.shape, args, total, args.batch, seed=11)
    bodies = traffic.bodies
    print(f"background traffic: {traffic.description}")
    print(
        f"background {args.rate:,.0f} events/s in batches of {args.batch:,}; a marker every "
        f"{args.interval:g} ms for {args.seconds:g} s; poll cycle {args.poll:g} ms"
    )
    reps: list[RepResult] = []
    for rep in range(args.repeat):
        r = one_rep(args, snap["env"], bodies, rep)
        reps.append(r)
        print(
            f"rep {rep + 1}: {len(r.visible_ms)} markers visible, {r.not_visible} not within "
            f"{args.give_up:g} s; freshness p50 {common.percentile(r.visible_ms, 50):.0f} ms "
            f"p99 {common.percentile(r.visible_ms, 99):.0f} ms; healthz p50 "
            f"{common.percentile(r.healthz_ms, 50):.1f} ms; background sent "
            f"{r.background_events:,} (max {r.background_behind_s:.2f} s behind schedule); "
            f"errors {len(r.errors)}; cores: api {r.cpu.get('api', 0):.2f} worker "
            f"{r.cpu.get('worker', 0):.2f} client {r.cpu.get('client', 0):.2f} not-ours "
            f"{r.cpu.get('other_processes', 0):.2f}; realtime queries "
            f"{len(r.poll_ms) / args.seconds:.0f}/s"
        )
        if r.errors:
            print(f"  first error: {r.errors[0]}")

    def med(fn: Any) -> dict[str, float]:
        return common.summary([fn(r) for r in reps])

    fresh50 = med(lambda r: common.percentile(r.visible_ms, 50))
    fresh99 = med(lambda r: common.percentile(r.visible_ms, 99))
    health50 = med(lambda r: common.percentile(r.healthz_ms, 50))
    health99 = med(lambda r: common.percentile(r.healthz_ms, 99))
    poll50 = med(lambda r: common.percentile(r.poll_ms, 50))
    cycle50 = med(lambda r: common.percentile(r.cycle_ms, 50))
    print()
    common.print_table(
        ["figure (ms)", "median of reps", "min", "max"],
        [
            [name, f"{s['median']:.1f}", f"{s['min']:.1f}", f"{s['max']:.1f}"]
            for name, s in (
                ("freshness p50 (202 → counted)", fresh50),
                ("freshness p99", fresh99),
                ("baseline: GET /healthz p50", health50),
                ("baseline: GET /healthz p99", health99),
                ("realtime query round trip p50", poll50),
                ("poll cycle p50 (resolution)", cycle50),
            )
        ]
        + [["DESIGN target freshness p99", "< 1000", "", ""]],
    )
    print(
        f"\nratio freshness p50 / healthz p50: {fresh50['median'] / health50['median']:.1f}; "
        f"p99 / healthz p99: {fresh99['median'] / health99['median']:.1f}; markers not "
        f"visible in {args.give_up:g} s: {sum(r.not_visible for r in reps)}"
    )
    common.emit_json(
        {
            "bench": "freshness",
            "machine": info,
            "params": vars(args),
            "freshness_p50_ms": fresh50,
            "freshness_p99_ms": fresh99,
            "healthz_p50_ms": health50,
            "healthz_p99_ms": health99,
            "realtime_query_p50_ms": poll50,
            "poll_cycle_p50_ms": cycle50,
            "not_visible": sum(r.not_visible for r in reps),
            "runs": [
                {
                    "markers_visible": len(r.visible_ms),
                    "not_visible": r.not_visible,
                    "background_events": r.background_events,
                    "background_behind_s": r.background_behind_s,
                    "errors": len(r.errors),
                    "freshness_p50_ms": common.percentile(r.visible_ms, 50),
                    "freshness_p99_ms": common.percentile(r.visible_ms, 99),
                    "freshness_max_ms": max(r.visible_ms, default=float("nan")),
                    "healthz_p50_ms": common.percentile(r.healthz_ms, 50),
                    "healthz_p99_ms": common.percentile(r.healthz_ms, 99),
                    "cpu": r.cpu,
                    "queries_per_s": len(r.poll_ms) / args.seconds,
                }
                for r in reps
            ],
        }
    )


if __name__ == "__main__":
    main()
