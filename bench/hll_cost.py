"""Cost of the HLL unique-users sketches: µs per event to build them, µs per union.

Builds the sketches of 500,000 events over 10,000 groups (Zipf-distributed group sizes) drawn
from 1,000,000 distinct users, as one worker round would, then unions rows of 60 sketches
(an hour of minute sketches). Prints the best of a few runs.

    .venv/bin/python bench/hll_cost.py [--events N] [--groups G] [--users U]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from clickagg.core import hll


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(1)
    groups = (rng.zipf(1.2, args.events) - 1) % args.groups
    user_numbers = rng.integers(0, args.users, args.events)
    users = pa.array([f"user-{u}" for u in user_numbers.tolist()], type=pa.string())
    group_index = groups.astype(np.int64)

    sketches = hll.sketches_by_group(group_index, users, args.groups)
    filled = [s for s in sketches.to_pylist() if s is not None]
    build = best_seconds(
        lambda: hll.sketches_by_group(group_index, users, args.groups), args.repeat
    )
    print(
        f"sketches_by_group: {args.events:,} events, {len(filled):,} non-empty groups "
        f"of {args.groups:,}: {build * 1e3:.1f} ms = {build / args.events * 1e6:.3f} µs/event, "
        f"{build / len(filled) * 1e6:.1f} µs/group"
    )
    sizes = np.array([len(s) for s in filled])
    print(f"  sketch bytes: mean {sizes.mean():.0f}, max {sizes.max()}, total {sizes.sum():,}")

    # Unions of 60 sketches: the biggest (HLL mode) and typical (mixed) groups.
    by_size = sorted(filled, key=len, reverse=True)
    for label, pool in (("largest sketches", by_size[:60]), ("random sketches", filled)):
        rows = [[pool[i] for i in rng.integers(0, len(pool), 60)] for _ in range(200)]
        column = pa.array(rows, type=pa.list_(pa.binary()))
        took = best_seconds(lambda column=column: hll.union_many(column), args.repeat)
        print(f"union of 60 ({label}): {took / len(rows) * 1e6:.0f} µs per union")

    estimate = best_seconds(lambda: hll.estimates(sketches), args.repeat)
    print(f"estimate: {estimate / len(filled) * 1e6:.2f} µs per sketch")


if __name__ == "__main__":
    main()
