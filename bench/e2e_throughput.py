"""End-to-end throughput: HTTP NDJSON batches → durable log → committed minute rows.

Per repetition: a fresh ``clickagg serve`` (temp data dir), the same pre-encoded NDJSON
bodies POSTed to /events/batch from K keep-alive connections. Traffic (--shape, see
bench/traffic_shapes.py): ``production`` (default: 10,000 Zipf-popular ads, 1M users, 5 %
retransmissions, 2 % late, event times over 10 min) or ``legacy`` (TrafficGenerator: 50
ads, ~10 % duplicates, 2 % late, 0.5 % malformed lines); ``--shape production,legacy``
interleaves both so the two figures come from the same run. After each production run the
server's minute rows are compared with the generator's ground truth (must be exact).
The clock starts at the first send; "accept" ends at the last 202, "end to end" when the sum of
``clickagg_partition_committed_offset`` (/metrics, polled every 50 ms once the last
202 is in) equals the number of events accepted.

Baseline (same run, between repetitions): the same valid events, already in an in-memory
Arrow table, counted by one DuckDB ``GROUP BY ad_id, minute`` (clicks and impressions).

With ``--rules-compare`` the working tree runs twice per repetition, alternating: with no
invalid-traffic rules at all (``rules-off``: an empty rules file) and with every rule on
(``rules-on``: the built-in rules, the keyed second stage, and a blocklist rule of 10,000
IPv4 and 2,000 IPv6 CIDRs, about AWS's range file; its ranges lie outside the generator's
addresses, so it costs what a blocklist costs and flags nothing): both medians and the
ratio, the cost of the rules end to end.

With ``--baseline-commit [REV]`` (default 3a2a018) the same workload also runs against
``clickagg serve`` built from that commit (bench/common.py:build_commit, cached venv),
alternating commit and working tree (ABAB, --repeat pairs): both medians and their ratio.

    .venv/bin/python bench/e2e_throughput.py [--events 1000000] [--batch 10000]
        [--concurrency 8] [--repeat 3] [--shape production|legacy|production,legacy]
        [--ads N] [--users N] [--baseline-commit [REV] | --rules-compare]
        [--py-spy OUTDIR [--py-spy-side tree|rules-off|rules-on]]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

import common
import traffic_shapes
from clickagg.traffic import TrafficMix

MINUTE_MS = 60_000
CPU_NAMES = ("api", "worker", "client", "other_processes", "machine_busy", "machine_iowait")


class _Light(msgspec.Struct):
    ad_id: str | int
    timestamp: int
    event_type: str


def arrow_table(traffic: traffic_shapes.Traffic) -> pa.Table:
    """The valid events of the bodies as columns (malformed lines skipped, as ingest does)."""
    if traffic.columns is not None:
        return traffic.arrow_events()
    decoder = msgspec.json.Decoder(_Light)
    ad, ts, kind = [], [], []
    for body in traffic.bodies:
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
    traffic: traffic_shapes.Traffic,
    args: argparse.Namespace,
    env: dict[str, str],
    profile_dir: Path | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    bodies = traffic.bodies
    server = common.ClickaggServer(partitions=args.partitions, env=env, python=python)
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
        for spy in spies:
            common.stop_py_spy(spy)
        spies = []
        metrics = text.decode()
        fates = {
            name: int(common.metric_sum(metrics, f"clickagg_partition_events_{name}"))
            for name in ("counted", "duplicate", "late", "invalid")
        }
        exact = None
        if traffic.truth is not None and committed == sent.accepted:
            server.stop_process()
            exact = traffic_shapes.compare(traffic.truth, server.stored_minutes())
            exact["fates_expected"] = traffic.fates
            exact["ok"] = exact["rows_differing"] == 0 and fates == traffic.fates
    finally:
        for spy in spies:
            common.stop_py_spy(spy)
        server.stop()
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
        "exact": exact,
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
    traffic_shapes.add_arguments(p, multi=True)
    p.add_argument(
        "--baseline-commit",
        nargs="?",
        const=common.DEFAULT_BASELINE_COMMIT,
        metavar="REV",
        help=f"also run REV (default {common.DEFAULT_BASELINE_COMMIT}) alternately with the "
        "working tree, --repeat pairs",
    )
    p.add_argument(
        "--rules-compare",
        action="store_true",
        help="run the tree with no rules and with every rule on, alternately, --repeat pairs",
    )
    p.add_argument(
        "--ad-rules",
        action="store_true",
        help="with --rules-compare: the rules-on side also runs ctr_spike, one rule counting "
        "for review and one excluding (the ad-keyed family appends every event)",
    )
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
        "--py-spy-side",
        choices=("tree", "rules-off", "rules-on"),
        default="tree",
        help="with --py-spy: profile the tree as configured (default), or one side of "
        "--rules-compare (its rules file and keyed stage)",
    )
    p.add_argument(
        "--live-src", action="store_true", help="import the working tree, not a frozen copy"
    )
    args = p.parse_args()
    if args.rules_compare and args.baseline_commit:
        p.error("--rules-compare and --baseline-commit each make the run's pair: pick one")
    common.install_sigterm_handler()
    with common.source_snapshot(not args.live_src) as snap:
        run_all(args, snap)


def build_traffic(args: argparse.Namespace, shape: str) -> traffic_shapes.Traffic:
    t = time.perf_counter()
    legacy_mix = TrafficMix(duplicate_rate=0, late_rate=0, malformed_rate=0) if args.clean else None
    clean = {"duplicate_fraction": 0.0, "late_fraction": 0.0} if args.clean else {}
    traffic = traffic_shapes.build(
        shape, args, args.events, args.batch, seed=args.seed, legacy_mix=legacy_mix, **clean
    )
    mb = sum(map(len, traffic.bodies)) / 1e6
    print(
        f"generated {args.events:,} events in {len(traffic.bodies)} bodies ({mb:,.0f} MB) "
        f"in {time.perf_counter() - t:.1f} s: {traffic.description}"
    )
    note = traffic.reorder_note(args.concurrency)
    if note:
        print(f"  warning: {note}")
    return traffic


def run_all(args: argparse.Namespace, snap: dict[str, Any]) -> None:
    env = snap["env"]
    info = common.machine() | {"code": snap["code"]}
    shapes = traffic_shapes.shapes_of(args, multi=True)
    base_build = None
    if args.baseline_commit and args.py_spy is None:
        base_build = common.build_commit(args.baseline_commit)
        info["baseline_commit"] = base_build.commit
    common.print_machine(info)
    traffics = {shape: build_traffic(args, shape) for shape in shapes}
    if args.py_spy is not None:
        with tempfile.TemporaryDirectory(prefix="clickagg-rules-") as rules_dir:
            side_env = env
            if args.py_spy_side != "tree":
                side_env = dict(rules_sides(env, Path(rules_dir), args.ad_rules))[args.py_spy_side]
            run = one_run(traffics[shapes[0]], args, side_env, profile_dir=args.py_spy)
        print(
            f"profiled run: accept {run['ingest_eps']:,.0f} ev/s, e2e {run['e2e_eps']:,.0f} ev/s; "
            f"stacks in {args.py_spy}/api.txt and worker.txt "
            f"(summarise: bench/profile_summary.py {args.py_spy}/api.txt)"
        )
        return
    # (code label, interpreter, environment): the working tree, or commit and tree in turn
    sides: list[tuple[str, str | None, dict[str, str]]] = [("tree", None, env)]
    if base_build is not None:
        sides = [(base_build.short, base_build.python, base_build.env()), *sides]
    rules_dir = None
    if args.rules_compare:
        rules_dir = tempfile.TemporaryDirectory(prefix="clickagg-rules-")
        sides = [
            (label, None, side_env)
            for label, side_env in rules_sides(env, Path(rules_dir.name), args.ad_rules)
        ]
    tables = {shape: arrow_table(t) for shape, t in traffics.items()}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    baselines: dict[str, list[float]] = {shape: [] for shape in shapes}
    for rep in range(args.repeat):
        for label, python, side_env in sides:
            for shape in shapes:
                run = one_run(traffics[shape], args, side_env, python=python)
                runs.setdefault((label, shape), []).append(run)
                exact = run["exact"]
                check = (
                    ""
                    if exact is None
                    else f"; exact vs ground truth: {'yes' if exact['ok'] else 'NO'}"
                    + (
                        ""
                        if exact["ok"]
                        else f" ({exact['rows_differing']} rows differ, fates {run['fates']}"
                        f" expected {exact['fates_expected']})"
                    )
                )
                print(
                    f"rep {rep + 1} {label:<8} {shape:<10}: accepted {run['accepted']:,} in "
                    f"{run['ingest_s']:.2f} s, committed in {run['e2e_s']:.2f} s "
                    f"({run['e2e_eps']:,.0f} ev/s); cpu api {run['cpu_whole_run']['api']:.2f} "
                    f"worker {run['cpu_whole_run'].get('worker', float('nan')):.2f} "
                    f"client {run['cpu_whole_run']['client']:.2f} not-ours "
                    f"{run['cpu_whole_run']['other_processes']:.2f} cores{check}"
                )
        for shape in shapes:
            baselines[shape].append(baseline(tables[shape]))
    if rules_dir is not None:
        rules_dir.cleanup()
    report(args, info, shapes, sides, runs, baselines)


def rules_sides(
    env: dict[str, str], directory: Path, ad_rules: bool = False
) -> list[tuple[str, dict[str, str]]]:
    """The two environments of --rules-compare: no rule at all, and every rule on (the
    keyed stage included), their rules files written in ``directory``."""
    off, on = write_rules_files(directory, ad_rules)
    return [
        ("rules-off", env | {"CLICKAGG_RULES_FILE": str(off)}),
        ("rules-on", env | {"CLICKAGG_RULES_FILE": str(on), "CLICKAGG_KEYED_STAGE": "true"}),
    ]


def write_rules_files(directory: Path, ad_rules: bool = False) -> tuple[Path, Path]:
    """An empty rules file (no rule at all), and one with every rule: the built-in ones
    plus a blocklist of data-centre-sized CIDR lists in 211.0.0.0-223.255.255.255 and
    2a00::/12, which the generator's addresses (11-210.x.x.x) never fall in. ``ad_rules``:
    also ``ctr_spike``, for review and excluding (not ``no_impression_click``: the
    generator's clicks are not tied to impressions, so it would flag nearly all)."""
    rng = random.Random(11)
    v4 = []
    for _ in range(10_000):
        start = rng.randrange(211 << 24, 224 << 24)
        prefix = rng.randrange(16, 25)
        start &= ~((1 << (32 - prefix)) - 1)
        v4.append(
            f"{start >> 24}.{(start >> 16) & 255}.{(start >> 8) & 255}.{start & 255}/{prefix}"
        )
    v6 = [f"2a0{i % 10}:{i:x}::/{32 + i % 17}" for i in range(2_000)]
    (directory / "datacenter.txt").write_text("\n".join(v4 + v6) + "\n")
    off = directory / "no-rules.toml"
    off.write_text("# no invalid-traffic rules at all\n")
    on = directory / "all-rules.toml"
    on.write_text(
        "include_builtin = true\n\n[[rules]]\n"
        'id = "datacenter-ip"\nkind = "ip_blocklist"\nreason = "data-centre address"\n'
        '[[rules.params.lists]]\nname = "datacenter"\nfile = "datacenter.txt"\n'
        + (AD_RULES if ad_rules else "")
    )
    return off, on


AD_RULES = """
[[rules]]
id = "ctr-review"
kind = "ctr_spike"
reason = "CTR above the ad's baseline"
[rules.params]
factor = 3.0
baseline_hours = 1
min_clicks = 10

[[rules]]
id = "ctr-spike"
kind = "ctr_spike"
reason = "CTR far above the ad's baseline"
[rules.params]
factor = 10.0
baseline_hours = 1
min_clicks = 10
exclude = true
"""


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    shapes: list[str],
    sides: list[tuple[str, str | None, dict[str, str]]],
    runs: dict[tuple[str, str], list[dict[str, Any]]],
    baselines: dict[str, list[float]],
) -> None:
    def cpu(key: tuple[str, str], phase: str, name: str) -> float:
        return statistics.median(r[phase].get(name, float("nan")) for r in runs[key])

    figures: dict[str, Any] = {}
    rows = []
    for shape in shapes:
        base = common.summary(baselines[shape])
        for label, _, _ in sides:
            key = (label, shape)
            ingest = common.summary([r["ingest_eps"] for r in runs[key]])
            e2e = common.summary([r["e2e_eps"] for r in runs[key]])
            exact = [r["exact"]["ok"] for r in runs[key] if r["exact"] is not None]
            figures[f"{label}/{shape}"] = {
                "ingest_eps": ingest,
                "e2e_eps": e2e,
                "ratio_e2e_to_duckdb": e2e["median"] / base["median"],
                "exact_runs": f"{sum(exact)}/{len(exact)}" if exact else "n/a",
                "cpu_cores_median": {
                    phase: {n: cpu(key, phase, n) for n in CPU_NAMES}
                    for phase in ("cpu_during_ingest", "cpu_whole_run")
                },
            }
            for name, s in (("accept", ingest), ("end to end", e2e)):
                rows.append(
                    [
                        f"{name}, {shape}, {label}",
                        common.fmt(s["median"]),
                        common.fmt(s["min"]),
                        common.fmt(s["max"]),
                        f"{s['median'] / base['median']:.4f}",
                        figures[f"{label}/{shape}"]["exact_runs"],
                    ]
                )
        rows.append(
            [
                f"baseline: DuckDB GROUP BY on Arrow, {shape}",
                common.fmt(base["median"]),
                common.fmt(base["min"]),
                common.fmt(base["max"]),
                "1",
                "",
            ]
        )
        figures[f"duckdb/{shape}"] = base
    print()
    common.print_table(
        ["figure (events/s)", "median", "min", "max", "vs DuckDB", "exact"],
        [*rows, ["DESIGN target end to end", "1,000,000", "", "", "", ""]],
    )
    ratios: dict[str, Any] = {}
    if len(sides) == 2:
        base_label = sides[0][0]
        new_label = sides[1][0]
        print(f"\n{new_label} vs {base_label} (same run, alternating, medians):")
        ratio_rows = []
        for shape in shapes:
            for metric, name in (("ingest_eps", "accept"), ("e2e_eps", "end to end")):
                old = figures[f"{base_label}/{shape}"][metric]["median"]
                new = figures[f"{new_label}/{shape}"][metric]["median"]
                ratios[f"{shape}/{metric}"] = new / old
                ratio_rows.append(
                    [f"{name}, {shape}", common.fmt(old), common.fmt(new), f"{new / old:.3f}"]
                )
        common.print_table(
            ["figure (events/s)", base_label, new_label, f"{new_label} / {base_label}"], ratio_rows
        )
    if len(shapes) == 2:
        for label, _, _ in sides:
            prod = figures[f"{label}/production"]["e2e_eps"]["median"]
            leg = figures[f"{label}/legacy"]["e2e_eps"]["median"]
            ratios[f"{label}/production_to_legacy_e2e"] = prod / leg
            print(f"{label}: end to end production / legacy = {prod / leg:.3f}")
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
                f"{label}/{shape} {phase.replace('cpu_', '').replace('_', ' ')}",
                *(
                    f"{v:.2f}"
                    for v in figures[f"{label}/{shape}"]["cpu_cores_median"][phase].values()
                ),
            ]
            for shape in shapes
            for label, _, _ in sides
            for phase in ("cpu_during_ingest", "cpu_whole_run")
        ],
    )
    last = runs[(sides[-1][0], shapes[0])][-1]
    print(
        f"\nlast rep fates ({shapes[0]}): {last['fates']}; rejected at ingest {last['rejected']}; "
        f"lag at end of accept (median) "
        f"{statistics.median(r['lag_at_ingest_end'] for r in runs[(sides[-1][0], shapes[0])]):,.0f}"
        f" events; batch POST p50 {last['batch_p50_ms']:.0f} ms"
    )
    common.emit_json(
        {
            "bench": "e2e_throughput",
            "machine": info,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "figures": figures,
            "ratios": ratios,
            "runs": {f"{label}/{shape}": rs for (label, shape), rs in runs.items()},
        }
    )


if __name__ == "__main__":
    main()
