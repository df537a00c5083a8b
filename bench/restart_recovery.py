"""Worker restart to caught up: how long a kill -9 (or a full restart) costs after N events.

One ``clickagg serve`` (temp data dir, 8 partitions) takes N production-shaped events
(bench/traffic_shapes.py; default 10,000,000) as fast as it can, until every event is
committed and archived: the dedup state then holds every id of the stream (its event times
span 10 minutes, well inside the 30-minute horizon), the store and the archive hold the
whole stream. Then, on that data dir:

a. idle: kill -9 of the worker process alone (the API process's supervisor restarts it);
   timed from the kill to a new worker process, to ``/healthz`` 200, to lag 0 (the sums of
   ``clickagg_partition_lag_events`` and ``clickagg_partition_archive_lag_events``);
b. under load: a background sender posts the stream's next events at a steady rate
   (``--load-rate``, default 50,000 events/s, for ``--load-seconds``); after ``--settle``
   seconds the lag is sampled for as long again (the pre-kill level: its maximum), then
   the worker is killed -9; timed from the kill to a new worker, to ``/healthz`` 200, and
   to the first sample with the lag (and, apart, the archive lag) back at or below its
   pre-kill level; after the load, until lag 0;
c. whole server: ``stop`` (SIGTERM, timed) then start on the same data dir; timed from
   the start to ``/healthz`` 200 and to lag 0.

Baseline, in the same run before the load: a fresh server on an empty data dir, start to
``/healthz`` 200 (median of ``--baseline-starts``, 3). The data dir's size by component is
printed after the bulk load and at the end. Last, the server is stopped and its minute rows
are compared with the generator's ground truth (every row equal) and its event fates with
the expected ones: nothing was lost or counted twice across the three restarts.

The traffic is built in chunks of ``--chunk`` events (the generator's columns take ~2 GB
per million events while it runs), each with its own seed (distinct ids) and its slice of
one 10-minute event-time span in stream order, so the chunks read as one stream; each
chunk's ground truth is kept, its columns dropped.

    .venv/bin/python bench/restart_recovery.py [--events 10000000] [--load-rate 50000]
        [--load-seconds 60] [--settle 5] [--batch 1000] [--concurrency 64] [--chunk 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

import common
import traffic_shapes
from clickagg.runtime.services import CLOSER_PID_FILE

SPAN_MS = 10 * 60_000


# -- traffic ------------------------------------------------------------------------------


@dataclass
class Stream:
    bodies: list[bytes]
    events: int
    truth: pl.DataFrame
    fates: dict[str, int]
    reorder_note: str | None


def build_stream(args: argparse.Namespace, events: int) -> Stream:
    """``events`` production events in chunks that read as one stream (see the docstring)."""
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - SPAN_MS
    bodies: list[bytes] = []
    truths = []
    fates = {"counted": 0, "duplicate": 0, "late": 0, "invalid": 0}
    done = 0
    note = None
    index = 0
    while done < events:
        size = min(args.chunk, events - done)
        end_ms = start_ms + round(SPAN_MS * (done + size) / events)
        span_ms = max(1, round(SPAN_MS * size / events))
        traffic = traffic_shapes.production(
            size,
            args.batch,
            seed=args.seed + index,
            shape=traffic_shapes.shape_of(args, span_ms=span_ms),
            now_ms=end_ms + 1_000,  # the generator ends its span 1 s before "now"
        )
        assert traffic.truth is not None
        bodies.extend(traffic.bodies)
        truths.append(traffic.truth)
        for name, n in traffic.fates.items():
            fates[name] += n
        note = note or traffic.reorder_note(args.concurrency)
        traffic.columns = None  # the big part: drop it before the next chunk
        done += size
        index += 1
    truth = (
        pl.concat(truths)
        .group_by("ad_id", "minute_ms")
        .agg(pl.col("clicks").sum(), pl.col("impressions").sum())
        .sort("ad_id", "minute_ms")
    )
    return Stream(bodies, events, truth, fates, note)


# -- the server's processes and state ---------------------------------------------------------


def worker_pid(server: common.ClickaggServer, *, not_one_of: tuple[int, ...] = ()) -> int | None:
    """The worker: the API process's ``spawn`` child that is not the hour closer (which
    writes its pid to the data dir) nor the resource tracker."""
    try:
        closer = int((server.data_dir / CLOSER_PID_FILE).read_text())
    except (OSError, ValueError):
        closer = None
    for child in common.children_of(server.pid):
        line = common.cmdline(child)
        if "spawn_main" in line and child != closer and child not in not_one_of:
            return child
    return None


def wait_worker(server: common.ClickaggServer, killed: int, timeout_s: float) -> float:
    """perf_counter when a worker other than ``killed`` is up."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if worker_pid(server, not_one_of=(killed,)) is not None:
            return time.perf_counter()
        time.sleep(0.01)
    raise RuntimeError(f"no new worker process in {timeout_s} s: {server.log_tail()}")


def healthy(port: int) -> bool:
    try:
        status, _ = common.http_get(port, "/healthz", timeout=2.0)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200


def wait_healthy(port: int, timeout_s: float) -> float:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if healthy(port):
            return time.perf_counter()
        time.sleep(0.02)
    raise RuntimeError(f"not healthy in {timeout_s} s")


@dataclass
class Lag:
    events: int  # durable, not committed yet
    archive: int  # committed, not archived yet
    committed: int
    restarts: int
    fates: dict[str, int] = field(default_factory=dict)


def lag(port: int) -> Lag | None:
    """The lags from /metrics, or None while the API cannot answer (it always should)."""
    try:
        status, body = common.http_get(port, "/metrics", timeout=10.0)
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    text = body.decode()
    return Lag(
        events=int(common.metric_sum(text, "clickagg_partition_lag_events")),
        archive=int(common.metric_sum(text, "clickagg_partition_archive_lag_events")),
        committed=int(common.metric_sum(text, "clickagg_partition_committed_offset")),
        restarts=int(common.metric_sum(text, "clickagg_worker_restarts")),
        fates={
            name: int(common.metric_sum(text, f"clickagg_partition_events_{name}"))
            for name in ("counted", "duplicate", "late", "invalid")
        },
    )


def wait_caught_up(port: int, timeout_s: float, expect_committed: int | None = None) -> float:
    """perf_counter when both lags are 0 (and, if given, that many events committed)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        now = lag(port)
        if (
            now is not None
            and now.events == 0
            and now.archive == 0
            and (expect_committed is None or now.committed == expect_committed)
        ):
            return time.perf_counter()
        time.sleep(0.05)
    raise RuntimeError(f"not caught up in {timeout_s} s: {lag(port)}")


def sizes(data_dir: Path) -> dict[str, int]:
    """Bytes on disk by component: log, store (DuckDB file and WAL), archive, snapshots,
    the rest."""

    def du(path: Path) -> int:
        if path.is_file():
            return path.stat().st_size
        total = 0
        for root, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total

    parts = {
        "log": du(data_dir / "log"),
        "store": sum(du(p) for p in data_dir.glob("aggregates.duckdb*")),
        "archive": du(data_dir / "archive"),
        "snapshots": du(data_dir / "snapshots"),
    }
    parts["other"] = du(data_dir) - sum(parts.values())
    parts["total"] = du(data_dir)
    return parts


def print_sizes(label: str, parts: dict[str, int], events: int) -> None:
    cells = ", ".join(f"{name} {n / 1e6:,.1f} MB" for name, n in parts.items())
    print(f"data dir {label}: {cells} ({parts['total'] / max(events, 1):.0f} B/event)")


# -- load ---------------------------------------------------------------------------------


class PacedSender:
    """POSTs bodies on a fixed schedule (body i at start + i x its events / rate) from a few
    keep-alive connections; 503 and lost connections are retried."""

    def __init__(self, port: int, bodies: list[bytes], events_per_body: int, rate: float):
        self.port = port
        self.bodies = bodies
        self.interval = events_per_body / rate
        self.accepted = 0
        self.retries = 0
        self.errors: list[str] = []
        self.max_behind_s = 0.0
        self.next = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]
        self.start_t = 0.0
        self.end_t = 0.0

    def start(self) -> None:
        self.start_t = time.perf_counter()
        for thread in self.threads:
            thread.start()

    def join(self, timeout_s: float) -> None:
        for thread in self.threads:
            thread.join(timeout=timeout_s)
        self.end_t = time.perf_counter()

    def _run(self) -> None:
        client = common.Client(self.port)
        try:
            while True:
                with self.lock:
                    index = self.next
                    if index >= len(self.bodies):
                        return
                    self.next += 1
                due = self.start_t + index * self.interval
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                for _ in range(200):
                    try:
                        status, data, _ = client.request(
                            "POST", "/events/batch", self.bodies[index], "application/x-ndjson"
                        )
                    except (OSError, http.client.HTTPException) as exc:
                        with self.lock:
                            self.errors.append(repr(exc))
                        time.sleep(0.1)
                        continue
                    if status == 503:
                        with self.lock:
                            self.retries += 1
                        time.sleep(0.05)
                        continue
                    with self.lock:
                        if status == 202:
                            self.accepted += json.loads(data)["accepted"]
                        else:
                            self.errors.append(f"{status}: {data[:200]!r}")
                        self.max_behind_s = max(self.max_behind_s, time.perf_counter() - due)
                    break
        finally:
            client.close()


# -- the phases ---------------------------------------------------------------------------


def start_timed(server: common.ClickaggServer) -> float:
    t0 = time.perf_counter()
    server.start(timeout_s=600)
    return time.perf_counter() - t0


def baseline_start(args: argparse.Namespace, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(args.baseline_starts):
        server = common.ClickaggServer(partitions=args.partitions, env=env)
        try:
            times.append(start_timed(server))
        finally:
            server.stop()
    return times


@dataclass
class Kill:
    """perf_counter at the kill -9 of the worker, at a new worker process, at /healthz 200."""

    at: float
    worker_up: float
    healthy: float


def kill_worker(server: common.ClickaggServer, args: argparse.Namespace) -> Kill:
    """kill -9 the worker process alone; return once the supervisor's new one is up and
    the server answers /healthz 200 again."""
    pid = worker_pid(server)
    assert pid is not None, "no worker process"
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    up = wait_worker(server, pid, args.timeout)
    return Kill(t0, up, wait_healthy(server.port, args.timeout))


def kill_idle(server: common.ClickaggServer, args: argparse.Namespace) -> dict[str, float]:
    kill = kill_worker(server, args)
    caught = wait_caught_up(server.port, args.timeout)
    return {
        "worker_up_s": kill.worker_up - kill.at,
        "healthy_s": kill.healthy - kill.at,
        "caught_up_s": caught - kill.at,
    }


def kill_under_load(
    server: common.ClickaggServer, args: argparse.Namespace, bodies: list[bytes]
) -> dict[str, Any]:
    sender = PacedSender(server.port, bodies, args.batch, args.load_rate)
    samples: list[tuple[float, Lag]] = []

    def sample() -> Lag | None:
        now = lag(server.port)
        if now is not None:
            samples.append((time.perf_counter(), now))
        return now

    sender.start()
    time.sleep(args.settle)
    pre_start = time.perf_counter()
    while time.perf_counter() - pre_start < args.settle:
        sample()
        time.sleep(0.1)
    pre = [s for _, s in samples]
    level = max(s.events for s in pre)
    archive_level = max(s.archive for s in pre)
    kill = kill_worker(server, args)
    t0 = kill.at
    back = archive_back = None
    peak = 0
    deadline = time.perf_counter() + args.timeout
    while (back is None or archive_back is None) and time.perf_counter() < deadline:
        now = sample()
        if now is not None:
            peak = max(peak, now.events)
            t = samples[-1][0]
            if back is None and now.events <= level:
                back = t
            if archive_back is None and now.archive <= archive_level:
                archive_back = t
        time.sleep(0.1)
    still_loaded = sender.next < len(bodies)
    sender.join(args.timeout + len(bodies) * sender.interval)
    load_s = sender.end_t - sender.start_t
    if sender.errors:
        print(f"  load sender errors: {len(sender.errors)}; first {sender.errors[0]}")
    caught = wait_caught_up(server.port, args.timeout)
    return {
        "load_rate_achieved_eps": sender.accepted / load_s,
        "load_events": sender.accepted,
        "sender_max_behind_s": sender.max_behind_s,
        "retries_503": sender.retries,
        "pre_kill_lag_max": level,
        "pre_kill_lag_median": statistics.median(s.events for s in pre),
        "pre_kill_archive_lag_max": archive_level,
        "lag_peak": peak,
        "worker_up_s": kill.worker_up - t0,
        "healthy_s": kill.healthy - t0,
        "lag_back_s": None if back is None else back - t0,
        "archive_lag_back_s": None if archive_back is None else archive_back - t0,
        "load_still_running_at_recovery": still_loaded,
        "caught_up_after_load_s": caught - sender.end_t,
    }


def full_restart(server: common.ClickaggServer, args: argparse.Namespace) -> dict[str, float]:
    t0 = time.perf_counter()
    server.stop_process()
    stopped = time.perf_counter()
    assert server.process is not None
    assert server.process.poll() is not None
    t1 = time.perf_counter()
    server.start(timeout_s=args.timeout)
    ok = time.perf_counter()
    caught = wait_caught_up(server.port, args.timeout)
    return {"stop_s": stopped - t0, "healthy_s": ok - t1, "caught_up_s": caught - t1}


# -- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace, snap: dict[str, Any]) -> None:
    env = snap["env"]
    info = common.machine() | {"code": snap["code"]}
    common.print_machine(info)
    load_events = round(args.load_rate * args.load_seconds / args.batch) * args.batch
    t = time.perf_counter()
    stream = build_stream(args, args.events + load_events)
    mb = sum(map(len, stream.bodies)) / 1e6
    print(
        f"generated {stream.events:,} production events ({args.events:,} bulk + "
        f"{load_events:,} for the load phase) in {len(stream.bodies)} bodies ({mb:,.0f} MB) "
        f"in {time.perf_counter() - t:.1f} s, chunks of {args.chunk:,}; expected fates "
        f"{stream.fates}"
    )
    if stream.reorder_note:
        print(f"  warning: {stream.reorder_note}")
    bulk_bodies = len(stream.bodies) - load_events // args.batch
    bulk, load = stream.bodies[:bulk_bodies], stream.bodies[bulk_bodies:]

    base = baseline_start(args, env)
    print(
        f"baseline: fresh server, empty data dir, start to /healthz 200: median "
        f"{statistics.median(base):.2f} s ({min(base):.2f}-{max(base):.2f}, {len(base)} starts)"
    )

    server = common.ClickaggServer(partitions=args.partitions, env=env)
    figures: dict[str, Any] = {"baseline_start_s": base}
    exact: dict[str, Any] | None = None
    try:
        figures["first_start_s"] = start_timed(server)
        t0 = time.perf_counter()
        sent = common.send_batches(
            server.port, bulk, concurrency=args.concurrency, max_seconds=args.timeout * 10
        )
        accepted_s = sent.last_ack - sent.first_send
        caught = wait_caught_up(server.port, args.timeout * 10, expect_committed=sent.accepted)
        figures["bulk"] = {
            "events": sent.accepted,
            "accept_s": accepted_s,
            "caught_up_s": caught - t0,
            "errors": len(sent.errors),
        }
        print(
            f"bulk: {sent.accepted:,} events accepted in {accepted_s:.1f} s, committed and "
            f"archived in {caught - t0:.1f} s ({sent.accepted / (caught - t0):,.0f} events/s)"
        )
        if sent.accepted != args.events:
            raise RuntimeError(f"accepted {sent.accepted} of {args.events}: {sent.errors[:3]}")
        figures["sizes_after_bulk"] = sizes(server.data_dir)
        print_sizes("after the bulk load", figures["sizes_after_bulk"], sent.accepted)

        idle = kill_idle(server, args)
        figures["kill_idle"] = idle
        print(
            f"(a) kill -9 worker, idle: worker up {idle['worker_up_s']:.2f} s, /healthz 200 "
            f"{idle['healthy_s']:.2f} s, lag 0 {idle['caught_up_s']:.2f} s after the kill"
        )

        loaded = kill_under_load(server, args, load)
        figures["kill_under_load"] = loaded
        after_kills = lag(server.port)
        figures["restarts"] = after_kills.restarts if after_kills is not None else -1

        def secs(value: float | None) -> str:
            return "not within the timeout" if value is None else f"{value:.2f} s"

        print(
            f"(b) kill -9 worker under load ({loaded['load_rate_achieved_eps']:,.0f} events/s "
            f"achieved, {args.load_rate:,.0f} asked; pre-kill lag median "
            f"{loaded['pre_kill_lag_median']:,.0f}, max {loaded['pre_kill_lag_max']:,} "
            f"events): worker up {loaded['worker_up_s']:.2f} s, /healthz 200 "
            f"{loaded['healthy_s']:.2f} s, lag back to pre-kill level "
            f"{secs(loaded['lag_back_s'])} (peak {loaded['lag_peak']:,} events), archive lag "
            f"back {secs(loaded['archive_lag_back_s'])} after the kill; load still running "
            f"then: {'yes' if loaded['load_still_running_at_recovery'] else 'NO'}; lag 0 "
            f"{loaded['caught_up_after_load_s']:.2f} s after the load ended"
        )

        whole = full_restart(server, args)
        figures["full_restart"] = whole
        print(
            f"(c) whole server stop {whole['stop_s']:.2f} s; start to /healthz 200 "
            f"{whole['healthy_s']:.2f} s, to lag 0 {whole['caught_up_s']:.2f} s"
        )
        final = lag(server.port)
        assert final is not None
        total = args.events + load_events
        figures["sizes_at_end"] = sizes(server.data_dir)
        print_sizes("at the end", figures["sizes_at_end"], total)
        server.stop_process()
        exact = traffic_shapes.compare(stream.truth, server.stored_minutes())
        exact["fates"] = final.fates
        exact["fates_expected"] = stream.fates
        exact["committed"] = final.committed
        exact["ok"] = (
            exact["rows_differing"] == 0
            and final.fates == stream.fates
            and final.committed == sent.accepted + loaded["load_events"]
        )
        figures["exact"] = exact
        if not exact["ok"]:
            figures["diagnosis"] = diagnose_store(server.data_dir)
            print(f"store diagnosis: {figures['diagnosis']}")
    finally:
        server.stop()
    assert exact is not None
    print(
        f"exact vs ground truth: {'yes' if exact['ok'] else 'NO'} "
        f"({exact['rows_expected']:,} minute rows expected, {exact['rows_stored']:,} stored, "
        f"{exact['rows_differing']} differ; clicks {exact['clicks_stored']:,}/"
        f"{exact['clicks_expected']:,}, impressions {exact['impressions_stored']:,}/"
        f"{exact['impressions_expected']:,}; fates {exact['fates']} expected "
        f"{exact['fates_expected']}; worker restarts counted before (c) {figures['restarts']})"
    )
    common.emit_json(
        {"bench": "restart_recovery", "machine": info, "params": vars(args), "figures": figures}
    )
    if not exact["ok"]:
        raise SystemExit(1)


def diagnose_store(data_dir: Path) -> dict[str, Any]:
    """Where a store that over-counts holds the surplus: base keys held by more than one row
    (a compaction applied twice), delta rows left, what compaction recorded."""
    import duckdb

    con = duckdb.connect(str(data_dir / "aggregates.duckdb"), read_only=True)
    try:

        def one(sql: str) -> Any:
            return con.sql(sql).fetchall()[0][0]

        return {
            "agg_minute_keys_with_several_rows": one(
                "SELECT count(*) FROM (SELECT ad_id, minute_ms, count(*) AS n FROM agg_minute "
                "GROUP BY ALL HAVING n > 1)"
            ),
            "agg_minute_rows": one("SELECT count(*) FROM agg_minute"),
            "delta_minute_rows": one("SELECT count(*) FROM delta_minute"),
            "delta_minute_seqs": one("SELECT count(DISTINCT seq) FROM delta_minute"),
            "delta_state": con.sql("SELECT * FROM delta_state").fetchall(),
        }
    finally:
        con.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=10_000_000, help="bulk events before the kills")
    p.add_argument("--load-rate", type=float, default=50_000, help="events/s during (b)")
    p.add_argument("--load-seconds", type=float, default=60.0, help="length of the load in (b)")
    p.add_argument("--settle", type=float, default=5.0, help="(b): seconds of load before "
                   "sampling the pre-kill lag, and seconds of sampling")  # fmt: skip
    p.add_argument("--batch", type=int, default=1_000, help="events per POST")
    p.add_argument("--concurrency", type=int, default=64, help="connections of the bulk load")
    p.add_argument("--chunk", type=int, default=1_000_000, help="events generated at once")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--baseline-starts", type=int, default=3, help="fresh-server starts of the baseline"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="max seconds per wait")
    p.add_argument(
        "--live-src", action="store_true", help="import the working tree, not a frozen copy"
    )
    traffic_shapes.add_arguments(p)
    args = p.parse_args()
    if args.baseline_starts < 1:
        p.error("--baseline-starts: at least 1")
    if args.shape != "production":
        p.error("--shape: production only (the check needs its ground truth)")
    common.install_sigterm_handler()
    with common.source_snapshot(not args.live_src) as snap:
        run(args, snap)


if __name__ == "__main__":
    main()
