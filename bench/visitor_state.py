"""The visitor-keyed family's state at production click rates: its size and consume time as
event time goes on, in one process (``VisitorWindows`` alone, no server).

Clicks are production-shaped (10,000 Zipf ads, 1M users with real user agents, 32-hex event
ids), ``--rate`` of them per second of event time in order, one consume per second, one
repeat window (``--window``, 30 s by default) and the default horizon (the 5 min lateness
+ 2 min). Every ``--report`` minutes of event time it prints the rows and bytes the state
holds and the consume time so far; at the end the verdict count, so two builds can be
checked to agree. The state is whatever ``VisitorWindows`` keeps: to compare a commit,
freeze it and put it first on the path:

    .venv/bin/python bench/visitor_state.py --minutes 20
    .venv/bin/python bench/common.py freeze /tmp/src-d0c3035 --rev d0c3035
    PYTHONPATH=/tmp/src-d0c3035 .venv/bin/python bench/visitor_state.py --minutes 20
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import polars as pl
import pyarrow as pa

import traffic_shapes
from clickagg.core.visitor import VISITOR_RECORD_SCHEMA, RepeatRule, VisitorRules, VisitorWindows
from clickagg.core.windows import HOUR_MS, MINUTE_MS


def clicks(second: int, rate: int, rng: np.random.Generator, weights: np.ndarray) -> pa.Table:
    """One second of production-shaped clicks, in event time order."""
    base = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS + second * 1000
    user = rng.integers(0, 1_000_000, size=rate)
    ad = rng.choice(len(weights), size=rate, p=weights)
    agents = [a for _, _, group in traffic_shapes.DEVICES for a in group]
    agent = np.array(agents, dtype=object)[user % len(agents)]
    ts = base + np.sort(rng.integers(0, 1000, size=rate))
    first = second * rate
    frame = pl.DataFrame(
        {
            "user_id": [f"u-{u}" for u in user],
            "ad_id": [f"ad-{a:05d}" for a in ad],
            "ts_ms": ts,
            "event_id": [f"{first + n:032x}" for n in range(rate)],
            "source_offset": np.arange(first, first + rate),
            "user_agent": agent.tolist(),
        }
    )
    return (
        frame.with_columns(
            pl.concat_str(pl.lit("u:"), "user_id").alias("visitor"),
            pl.format("10.{}.{}.{}", pl.col("ts_ms") % 200, pl.col("ts_ms") % 250, 7).alias("ip"),
            pl.format("adv-{}", pl.col("ad_id").str.slice(3, 3)).alias("advertiser_id"),
            pl.format("cmp-{}", pl.col("ad_id").str.slice(3, 4)).alias("campaign_id"),
            pl.lit("US").alias("country"),
            pl.lit("mobile").alias("device"),
            pl.lit("Chrome").alias("browser"),
            pl.lit(0, pl.Int32).alias("source_partition"),
            pl.lit(0, pl.Int64).alias("spend_micros"),
            pl.lit(True).alias("counted"),
        )
        .select(VISITOR_RECORD_SCHEMA.names)
        .to_arrow()
        .cast(VISITOR_RECORD_SCHEMA)
    )


def state_bytes(windows: VisitorWindows) -> tuple[int, int, int, int]:
    """Rows and bytes of the clicks kept whole, and of the chains where the build has them."""
    kept = windows.kept()
    chains = getattr(windows, "chains", None)
    anchors = chains()[1] if chains is not None else None
    return (
        kept.height,
        int(kept.estimated_size()),
        anchors.num_rows if anchors is not None else 0,
        anchors.nbytes if anchors is not None else 0,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=5_000, help="clicks per second of event time")
    p.add_argument("--minutes", type=int, default=20, help="minutes of event time")
    p.add_argument("--window", type=int, default=30, help="repeat window, seconds")
    p.add_argument("--report", type=int, default=5, help="minutes between reports")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    weights = traffic_shapes.zipf_weights(10_000, 1.0)
    rules = VisitorRules((RepeatRule("repeat-click", "repeat-click", args.window),))
    windows = VisitorWindows(horizon_ms=7 * MINUTE_MS)
    consume_s = worst_s = 0.0
    flagged = 0
    print(f"{args.rate:,} clicks/s, window {args.window} s, horizon 7 min")
    print("minute  kept rows   kept MiB   anchors  anchor MiB  consume s  worst ms  maxrss MiB")
    for second in range(args.minutes * 60):
        batch = clicks(second, args.rate, rng, weights)
        start = time.perf_counter()
        flagged += windows.consume(batch, rules).num_rows
        took = time.perf_counter() - start
        consume_s += took
        worst_s = max(worst_s, took)
        if (second + 1) % (args.report * 60) == 0:
            rows, size, anchors, anchor_size = state_bytes(windows)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"{(second + 1) // 60:>6}  {rows:>9,}  {size / 2**20:>9,.0f}  {anchors:>8,}"
                f"  {anchor_size / 2**20:>10,.1f}  {consume_s:>9.1f}  {worst_s * 1000:>8,.0f}"
                f"  {rss:>10,.0f}"
            )
    rows, size, anchors, anchor_size = state_bytes(windows)
    print(
        json.dumps(
            {
                "bench": "visitor_state",
                "rate": args.rate,
                "minutes": args.minutes,
                "window_s": args.window,
                "flagged": flagged,
                "kept_rows": rows,
                "kept_bytes": size,
                "anchors": anchors,
                "anchor_bytes": anchor_size,
                "consume_s": round(consume_s, 2),
                "worst_consume_ms": round(worst_s * 1000, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
