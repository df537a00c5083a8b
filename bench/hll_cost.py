"""Cost of the HLL unique-users sketches: µs per event to build them, µs per union.

Builds the sketches of 500,000 events over 10,000 groups (Zipf-distributed group sizes) drawn
from 1,000,000 distinct users, as one worker round would, twice: with one DataSketches
``update`` per distinct (group, user) (``sketches_by_group_via_library``, the path before
issue 9) and vectorized (``sketches_by_group``), checks that both give the same bytes, and
prints the median of a few runs of each, interleaved, and their ratio. Then unions rows of 60
sketches (an hour of minute sketches).

    .venv/bin/python bench/hll_cost.py [--events N] [--groups G] [--users U] [--repeat R]
        [--by-mode]

``--by-mode`` also times both builders on the events of the LIST/SET groups alone and of
the HLL groups alone: where the vectorized path gains, and whether replaying the library's
SET layout pays for itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import pyarrow as pa

from clickagg.core import hll


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def wall_and_cpu_seconds(run: Callable[[], object]) -> tuple[float, float]:
    """Elapsed time and the process's CPU time (all its threads: polars sorts in parallel)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_seconds(run: Callable[[], object], repeat: int) -> float:
    return statistics.median(seconds(run) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--by-mode", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(1)
    groups = (rng.zipf(1.2, args.events) - 1) % args.groups
    user_numbers = rng.integers(0, args.users, args.events)
    users = pa.array([f"user-{u}" for u in user_numbers.tolist()], type=pa.string())
    group_index = groups.astype(np.int64)

    sketches = hll.sketches_by_group(group_index, users, args.groups)
    if not sketches.equals(hll.sketches_by_group_via_library(group_index, users, args.groups)):
        raise SystemExit("the vectorized sketches differ from the library's")
    filled = [s for s in sketches.to_pylist() if s is not None]
    modes = np.bincount([s[7] & 3 for s in filled], minlength=3)
    print(
        f"{args.events:,} events, {len(filled):,} non-empty groups of {args.groups:,} "
        f"(LIST {modes[0]:,}, SET {modes[1]:,}, HLL {modes[2]:,}); load average "
        f"{os.getloadavg()[0]:.1f}; median of {args.repeat}, interleaved:"
    )
    builders: dict[str, Callable[[], object]] = {
        "library": lambda: hll.sketches_by_group_via_library(group_index, users, args.groups),
        "vectorized": lambda: hll.sketches_by_group(group_index, users, args.groups),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in builders}
    for _ in range(args.repeat):
        for name, build in builders.items():
            runs[name].append(wall_and_cpu_seconds(build))
    medians = {
        name: (statistics.median(w for w, _ in times), statistics.median(c for _, c in times))
        for name, times in runs.items()
    }
    for name, (wall, cpu) in medians.items():
        walls = ", ".join(f"{w * 1e3:.0f}" for w, _ in runs[name])
        print(
            f"  {name:>10}: {wall * 1e3:6.1f} ms = {wall / args.events * 1e6:.3f} µs/event, "
            f"{wall / len(filled) * 1e6:.1f} µs/group; CPU {cpu * 1e3:.1f} ms "
            f"(runs: {walls} ms)"
        )
    print(
        f"  ratio library / vectorized: {medians['library'][0] / medians['vectorized'][0]:.2f} "
        f"elapsed, {medians['library'][1] / medians['vectorized'][1]:.2f} CPU"
    )
    if args.by_mode:
        mode = np.array([-1 if s is None else s[7] & 3 for s in sketches.to_pylist()])
        for label, keep in (
            ("LIST/SET groups", (mode >= 0) & (mode < 2)),
            ("HLL groups", mode == 2),
        ):
            events = keep[group_index]
            part_groups, part_users = group_index[events], users.filter(pa.array(events))
            part = {
                name: statistics.median(
                    wall_and_cpu_seconds(partial(build, part_groups, part_users, args.groups))[1]
                    for _ in range(args.repeat)
                )
                for name, build in (
                    ("library", hll.sketches_by_group_via_library),
                    ("vectorized", hll.sketches_by_group),
                )
            }
            print(
                f"  {label} alone ({np.count_nonzero(events):,} events): CPU library "
                f"{part['library'] * 1e3:.1f} ms, vectorized {part['vectorized'] * 1e3:.1f} ms"
            )
    sizes = np.array([len(s) for s in filled])
    print(f"  sketch bytes: mean {sizes.mean():.0f}, max {sizes.max()}, total {sizes.sum():,}")

    # Unions of 60 sketches: the biggest (HLL mode) and typical (mixed) groups.
    by_size = sorted(filled, key=len, reverse=True)
    for label, pool in (("largest sketches", by_size[:60]), ("random sketches", filled)):
        rows = [[pool[i] for i in rng.integers(0, len(pool), 60)] for _ in range(200)]
        column = pa.array(rows, type=pa.list_(pa.binary()))
        took = median_seconds(lambda column=column: hll.union_many(column), args.repeat)
        print(f"union of 60 ({label}): {took / len(rows) * 1e6:.0f} µs per union")

    estimate = median_seconds(lambda: hll.estimates(sketches), args.repeat)
    print(f"estimate: {estimate / len(filled) * 1e6:.2f} µs per sketch")


if __name__ == "__main__":
    main()
