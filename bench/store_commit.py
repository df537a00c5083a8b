"""Store commit and query cost: per-key upserts (main) against appended deltas (this tree).

Commits rounds of production-shaped deltas (10,000 ads Zipf s=1, 1M users, 20 countries,
3 devices, 5 browsers, ~50,000 events per round across 8 partitions, event times over 10
minutes) through the store of ``main`` (loaded from git into a temporary module) and the
store of the working tree, and reports the median ms per round and µs per event of the
commit alone (the round's deltas are computed beforehand), then query latency: minute rows
of the busiest ad over an hour, and a day of that ad by hour, with the deltas still pending
and after compaction. Short by default (the machine is shared): about a minute.

    .venv/bin/python bench/store_commit.py [--rounds 12] [--rev main]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from clickagg.core import aggregate, ids
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.store.base import PartitionCommit
from clickagg.store.duckdb_store import DuckDBStore

ADS = 10_000
USERS = 1_000_000
PARTITIONS = 8
EVENTS_PER_ROUND = 50_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
COUNTRIES = [f"C{i:02d}" for i in range(20)]
DEVICES = ["mobile", "desktop", "tablet"]
BROWSERS = ["chrome", "safari", "firefox", "edge", "other"]
OLD_DIMENSION_SCHEMA = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("minute_ms", pa.int64(), nullable=False),
        *(pa.field(d, pa.string(), nullable=False) for d in aggregate.DIMENSIONS),
        *aggregate.MEASURES,
    ]
)


def old_store_module(rev: str) -> ModuleType:
    """The store of ``rev`` as a module of its own (it imports only what still exists)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/clickagg/store/duckdb_store.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_duckdb_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_duckdb_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def round_events(rng: np.random.Generator, index: int) -> pl.DataFrame:
    weights = 1 / np.arange(1, ADS + 1)
    ads = rng.choice(ADS, size=EVENTS_PER_ROUND, p=weights / weights.sum())
    start = T0 + index * 5_000  # the 10-minute window slides 5 s per round
    click = rng.random(EVENTS_PER_ROUND) < 0.1
    df = pl.DataFrame(
        {
            "ad_id": [f"ad-{a:05d}" for a in ads],
            "advertiser_id": [f"adv-{a % 500}" for a in ads],
            "campaign_id": [f"camp-{a % 2000}" for a in ads],
            "ts_ms": start + rng.integers(0, 10 * MINUTE_MS, EVENTS_PER_ROUND),
            "event_type": np.where(click, ids.CLICK, ids.IMPRESSION).astype(np.int8),
            "invalid": rng.random(EVENTS_PER_ROUND) < 0.01,
            "cost_micros": np.full(EVENTS_PER_ROUND, -1, dtype=np.int64),
            "user_hash": (
                rng.integers(1, USERS + 1, EVENTS_PER_ROUND).astype(np.uint64)
                * np.uint64(0x9E3779B97F4A7C15)
            ),
            "country": rng.choice(COUNTRIES, EVENTS_PER_ROUND),
            "device": rng.choice(DEVICES, EVENTS_PER_ROUND),
            "browser": rng.choice(BROWSERS, EVENTS_PER_ROUND),
        }
    )
    return aggregate.with_minute_and_spend(df, {})


def old_dimension_deltas(counted: pl.DataFrame) -> pa.Table:
    grouped = counted.group_by("ad_id", "minute_ms", *aggregate.DIMENSIONS).agg(
        aggregate._measure_exprs()
    )
    return (
        grouped.sort("ad_id", "minute_ms", *aggregate.DIMENSIONS)
        .to_arrow()
        .cast(OLD_DIMENSION_SCHEMA)
    )


def commits(index: int, minute: pa.Table, dims: Any) -> list[PartitionCommit]:
    """A round as the worker commits it: every partition, the deltas on the first."""
    per = EVENTS_PER_ROUND // PARTITIONS
    empty_minute = minute.schema.empty_table()
    empty_dims = (
        dims.schema.empty_table()
        if isinstance(dims, pa.Table)
        else {k: v.schema.empty_table() for k, v in dims.items()}
    )
    return [
        PartitionCommit(
            partition=p,
            from_offset=index * per,
            to_offset=(index + 1) * per,
            minute_deltas=minute if p == 0 else empty_minute,
            dimension_deltas=dims if p == 0 else empty_dims,
            fates=aggregate.FATE_SCHEMA.empty_table(),
            late_events=aggregate.LATE_SCHEMA.empty_table(),
            max_event_ms=T0,
            watermark_ms=T0,
            counted=per,
            duplicates=0,
            late=0,
            invalid=0,
            committed_at_ms=T0,
        )
        for p in range(PARTITIONS)
    ]


def median_ms(fn: Callable[[], object], repeat: int = 15) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def queries(store: Any, ad: str) -> dict[str, float]:
    return {
        "minute_rows_1h_ms": median_ms(
            lambda: store.aggregates(
                ad_id=ad, start_ms=T0, end_ms=T0 + HOUR_MS, granularity="minute"
            )
        ),
        "day_by_hour_ms": median_ms(
            lambda: store.aggregates(
                ad_id=ad, start_ms=T0 - T0 % DAY_MS, end_ms=T0 + DAY_MS, granularity="hour"
            )
        ),
        "day_by_country_ms": median_ms(
            lambda: store.aggregates(
                ad_id=ad,
                start_ms=T0 - T0 % DAY_MS,
                end_ms=T0 + DAY_MS,
                granularity="day",
                group_by="country",
            )
        ),
    }


def run(
    store: Any, rounds: list[tuple[pa.Table, Any]], compact_every: int = 0
) -> tuple[list[float], list[float]]:
    commit_ms, compact_ms = [], []
    for i, (minute, dims) in enumerate(rounds):
        batch = commits(i, minute, dims)
        started = time.perf_counter()
        store.commit_many(batch)
        commit_ms.append((time.perf_counter() - started) * 1000)
        if compact_every and (i + 1) % compact_every == 0:
            started = time.perf_counter()
            store.compact()
            compact_ms.append((time.perf_counter() - started) * 1000)
    return commit_ms, compact_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--rev", default="main", help="git revision of the old store")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    events = [round_events(rng, i) for i in range(args.rounds)]

    started = time.perf_counter()
    new_rounds = [aggregate.round_deltas(e) for e in events]
    new_agg_ms = (time.perf_counter() - started) * 1000 / args.rounds
    started = time.perf_counter()
    old_rounds = [
        (aggregate.minute_deltas(e).drop_columns(list(aggregate.OWNERS)), old_dimension_deltas(e))
        for e in events
    ]
    old_agg_ms = (time.perf_counter() - started) * 1000 / args.rounds
    rows_new = statistics.median(
        m.num_rows + sum(t.num_rows for t in d.values()) for m, d in new_rounds
    )
    rows_old = statistics.median(m.num_rows + d.num_rows for m, d in old_rounds)
    ad = "ad-00000"  # Zipf rank 1: the busiest ad
    old_cls = old_store_module(args.rev).DuckDBStore
    result: dict[str, Any] = {"rounds": args.rounds, "events_per_round": EVENTS_PER_ROUND}
    with tempfile.TemporaryDirectory() as tmp:
        old = old_cls(Path(tmp) / "old.duckdb")
        try:
            old_commit, _ = run(old, old_rounds)
            result["old"] = {"commit_ms": old_commit, **queries(old, ad)}
        finally:
            old.close()
        with DuckDBStore(Path(tmp) / "new.duckdb") as new:
            new_commit, _ = run(new, new_rounds)
            pending = new.pending_delta_rows()
            result["new_pending"] = {"commit_ms": new_commit, **queries(new, ad)}
            compaction = new.compact()
            result["new_compacted"] = {
                "compact_ms": compaction.seconds * 1000,
                "compacted_rows": compaction.delta_rows,
                "pending_rows_before": pending,
                **queries(new, ad),
            }
        with DuckDBStore(Path(tmp) / "new2.duckdb") as new:
            commit_ms, compact_ms = run(new, new_rounds, compact_every=4)
            result["new_compact_every_4"] = {"commit_ms": commit_ms, "compact_ms": compact_ms}

    def per_event(ms: list[float]) -> str:
        med = statistics.median(ms)
        return f"{med:8.1f} ms/round  {med * 1000 / EVENTS_PER_ROUND:6.2f} µs/event"

    print(f"rounds: {args.rounds} x {EVENTS_PER_ROUND} events, {PARTITIONS} partitions")
    print(f"delta rows per round: old {rows_old:.0f} (minute + 5-tuple dims), new {rows_new:.0f}")
    print(f"aggregation (polars) per round: old {old_agg_ms:.1f} ms, new {new_agg_ms:.1f} ms")
    print(f"commit, old (upserts):          {per_event(result['old']['commit_ms'])}")
    print(f"commit, new (appends):          {per_event(result['new_pending']['commit_ms'])}")
    every4 = result["new_compact_every_4"]
    print(f"commit, new, compact every 4:   {per_event(every4['commit_ms'])}")
    print(
        f"compaction: {result['new_compacted']['compacted_rows']} rows of {args.rounds} rounds "
        f"in {result['new_compacted']['compact_ms']:.0f} ms; every 4 rounds: median "
        f"{statistics.median(every4['compact_ms']):.0f} ms"
    )
    print(f"{'query (median ms)':34} {'old':>8} {'new, pending':>13} {'new, compacted':>15}")
    for q in ("minute_rows_1h_ms", "day_by_hour_ms", "day_by_country_ms"):
        print(
            f"{q:34} {result['old'][q]:8.2f} {result['new_pending'][q]:13.2f} "
            f"{result['new_compacted'][q]:15.2f}"
        )
    summary = {
        "old_commit_ms": statistics.median(result["old"]["commit_ms"]),
        "new_commit_ms": statistics.median(result["new_pending"]["commit_ms"]),
        "new_commit_ms_compact_every_4": statistics.median(every4["commit_ms"]),
        "compact_ms": result["new_compacted"]["compact_ms"],
        "queries": {
            k: {q: result[k][q] for q in ("minute_rows_1h_ms", "day_by_hour_ms")}
            for k in ("old", "new_pending", "new_compacted")
        },
    }
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
