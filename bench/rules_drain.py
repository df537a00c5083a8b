"""The worker's cost of every rule, in one process: the same log drained with no rules and with
every rule on (the keyed stage's both families included), alternating.

The production traffic of bench/e2e_throughput.py (10,000 Zipf ads, 1M users, 5 %
retransmissions, 2 % late) is written once to a log of 8 partitions, as the API process
would; each run copies it to a fresh data dir and runs the worker (``process.run``: every
partition's rounds, the store, the archive, the keyed stage) until it has been idle for 20
loops. The rules files are --rules-compare's (``write_rules_files``). Reported: per side
the median CPU seconds of this process (all its threads) and wall seconds, and on / off.
No HTTP and no second process, so the CPU figure moves much less with the box's load than
end-to-end throughput does; the log is drained in full rounds (50,000 events per
partition), as a backlogged worker would.

    .venv/bin/python bench/rules_drain.py [--events 1000000] [--repeat 3] [--ad-rules]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import e2e_throughput
import traffic_shapes
from clickagg.config import Settings
from clickagg.runtime import worker as process
from stage_breakdown import ingest_side


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--ad-rules", action="store_true", help="rules-on also runs ctr_spike (the ad family)"
    )
    traffic_shapes.add_arguments(p, multi=True)
    args = p.parse_args()
    traffic = traffic_shapes.build("production", args, args.events, 10_000, seed=args.seed)
    root = Path(tempfile.mkdtemp(prefix="clickagg-drain-"))
    try:
        template = root / "log-only"
        ingest_side(
            traffic.bodies, Settings(data_dir=template, partitions=8), 8, defaultdict(float)
        )
        off, on = e2e_throughput.write_rules_files(root, args.ad_rules)
        runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for rep in range(args.repeat):
            for side, rules in (("rules-off", off), ("rules-on", on)):
                data_dir = root / f"{side}-{rep}"
                shutil.copytree(template, data_dir)
                settings = Settings(
                    data_dir=data_dir,
                    partitions=8,
                    rules_file=rules,
                    keyed_stage=side == "rules-on",
                )
                cpu, wall = time.process_time(), time.perf_counter()
                process.run(settings, max_idle_loops=20)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                runs[side].append((cpu, wall))
                print(f"rep {rep + 1} {side:<9}: cpu {cpu:.2f} s, wall {wall:.2f} s", flush=True)
                shutil.rmtree(data_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {
        side: (statistics.median(c for c, _ in r), statistics.median(w for _, w in r))
        for side, r in runs.items()
    }
    for side, (cpu, wall) in median.items():
        print(f"{side:<9}: median cpu {cpu:.2f} s, wall {wall:.2f} s")
    (off_cpu, off_wall), (on_cpu, on_wall) = median["rules-off"], median["rules-on"]
    print(
        f"on / off (as throughput: off time / on time): cpu {off_cpu / on_cpu:.3f}, "
        f"wall {off_wall / on_wall:.3f}"
    )


if __name__ == "__main__":
    main()
