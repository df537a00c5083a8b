"""Store cost per worker round: commit, compaction, commit latency while compacting, queries.

Commits rounds of production-shaped deltas (10,000 ads Zipf s=1, 1M users, 20 countries,
3 devices, 5 browsers, ~50,000 events per round across 8 partitions, event times over 10
minutes) to the store of the working tree (or of any tree on PYTHONPATH: the script only
uses ``commit_many``, ``compact`` and the queries), and reports:

* serial: the median ms of a commit alone (deltas computed beforehand), and compaction
  every 4 rounds, as ms per round of deltas (total compaction time / rounds): the worker's
  store cost per round is commit + that share;
* concurrent: a compaction thread compacting back to back while the main thread commits
  the rounds again on a fresh store; commit latency p50 / p99 / max of the commits that
  overlapped a compaction;
* query latency after the last compaction (median ms): minute rows of the busiest ad over
  an hour, a day of it by hour, a day of it by country.

For reference, the per-key upsert store (before deltas, 22b9858) committed such a round in
1,962 ms. Short by default (the machine is shared): about a minute.

    .venv/bin/python bench/store_commit.py [--rounds 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
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


def round_events(rng: np.random.Generator, index: int) -> pl.DataFrame:
    weights = 1 / np.arange(1, ADS + 1)
    ads = rng.choice(ADS, size=EVENTS_PER_ROUND, p=weights / weights.sum())
    start = T0 + index * 5_000  # the 10-minute window slides 5 s per round
    click = rng.random(EVENTS_PER_ROUND) < 0.1
    users = rng.integers(1, USERS + 1, EVENTS_PER_ROUND)
    df = pl.DataFrame(
        {
            "ad_id": [f"ad-{a:05d}" for a in ads],
            "advertiser_id": [f"adv-{a % 500}" for a in ads],
            "campaign_id": [f"camp-{a % 2000}" for a in ads],
            "ts_ms": start + rng.integers(0, 10 * MINUTE_MS, EVENTS_PER_ROUND),
            "event_type": np.where(click, ids.CLICK, ids.IMPRESSION).astype(np.int8),
            "invalid": rng.random(EVENTS_PER_ROUND) < 0.01,
            "cost_micros": np.full(EVENTS_PER_ROUND, -1, dtype=np.int64),
            "user_hash": users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15),
            "user_id": [f"u{u}" for u in users],
            "country": rng.choice(COUNTRIES, EVENTS_PER_ROUND),
            "device": rng.choice(DEVICES, EVENTS_PER_ROUND),
            "browser": rng.choice(BROWSERS, EVENTS_PER_ROUND),
        }
    )
    return aggregate.with_minute_and_spend(df, {})


def commits(index: int, minute: pa.Table, dims: Any) -> list[PartitionCommit]:
    """A round as the worker commits it: every partition, the deltas on the first."""
    per = EVENTS_PER_ROUND // PARTITIONS
    empty_minute = minute.schema.empty_table()
    empty_dims = {k: v.schema.empty_table() for k, v in dims.items()}
    return [
        PartitionCommit(
            partition=p,
            from_offset=index * per,
            to_offset=(index + 1) * per,
            minute_deltas=minute if p == 0 else empty_minute,
            dimension_deltas=dims if p == 0 else empty_dims,
            # The round's events span [start, start + 10 min): none is older than the
            # watermark, so minutes before it are final and get rolled up into hours.
            max_event_ms=T0 + index * 5_000 + 10 * MINUTE_MS,
            watermark_ms=T0 + index * 5_000,
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


def run_serial(
    store: Any, rounds: list[tuple[pa.Table, Any]], compact_every: int
) -> tuple[list[float], list[float]]:
    commit_ms, compact_ms = [], []
    for i, (minute, dims) in enumerate(rounds):
        batch = commits(i, minute, dims)
        started = time.perf_counter()
        store.commit_many(batch)
        commit_ms.append((time.perf_counter() - started) * 1000)
        if (i + 1) % compact_every == 0 or i == len(rounds) - 1:
            started = time.perf_counter()
            store.compact()
            compact_ms.append((time.perf_counter() - started) * 1000)
    return commit_ms, compact_ms


def run_concurrent(store: Any, rounds: list[tuple[pa.Table, Any]]) -> dict[str, Any]:
    """Commit every round while another thread compacts back to back."""
    stop = threading.Event()
    busy: list[tuple[float, float]] = []  # (start, end) of each compaction
    compact_ms: list[float] = []

    def compactor() -> None:
        while not stop.is_set():
            if store.pending_delta_rows() == 0:
                time.sleep(0.01)
                continue
            started = time.perf_counter()
            store.compact()
            ended = time.perf_counter()
            busy.append((started, ended))
            compact_ms.append((ended - started) * 1000)

    thread = threading.Thread(target=compactor)
    thread.start()
    spans = []
    try:
        for i, (minute, dims) in enumerate(rounds):
            batch = commits(i, minute, dims)
            started = time.perf_counter()
            store.commit_many(batch)
            spans.append((started, time.perf_counter()))
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    store.compact()
    during = [
        (end - start) * 1000
        for start, end in spans
        if any(b_start < end and start < b_end for b_start, b_end in busy)
    ]
    return {
        "commits_during_compaction": len(during),
        "commit_p50_ms": percentile(during, 50),
        "commit_p99_ms": percentile(during, 99),
        "commit_max_ms": max(during, default=float("nan")),
        "compactions": len(compact_ms),
        "compact_median_ms": statistics.median(compact_ms) if compact_ms else float("nan"),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--compact-every", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    events = [round_events(rng, i) for i in range(args.rounds)]
    started = time.perf_counter()
    rounds = [aggregate.round_deltas(e) for e in events]
    agg_ms = (time.perf_counter() - started) * 1000 / args.rounds
    rows = statistics.median(m.num_rows + sum(t.num_rows for t in d.values()) for m, d in rounds)
    ad = "ad-00000"  # Zipf rank 1: the busiest ad
    with tempfile.TemporaryDirectory() as tmp:
        with DuckDBStore(Path(tmp) / "serial.duckdb") as store:
            commit_ms, compact_ms = run_serial(store, rounds, args.compact_every)
            query_ms = queries(store, ad)
        with DuckDBStore(Path(tmp) / "concurrent.duckdb") as store:
            concurrent = run_concurrent(store, rounds)
    commit_med = statistics.median(commit_ms)
    compact_per_round = sum(compact_ms) / args.rounds
    print(f"rounds: {args.rounds} x {EVENTS_PER_ROUND} events, {PARTITIONS} partitions")
    print(f"delta rows per round: {rows:.0f}; aggregation (polars + sketches) {agg_ms:.0f} ms")
    print(f"commit (median):                    {commit_med:8.1f} ms/round")
    print(
        f"compaction every {args.compact_every} rounds: median "
        f"{statistics.median(compact_ms):.0f} ms, {compact_per_round:.1f} ms per round of deltas"
    )
    print(
        f"store cost per round (commit + compaction share): {commit_med + compact_per_round:.1f} ms"
    )
    print(
        f"while compacting back to back ({concurrent['compactions']} compactions, median "
        f"{concurrent['compact_median_ms']:.0f} ms): {concurrent['commits_during_compaction']} "
        f"commits overlapped, p50 {concurrent['commit_p50_ms']:.1f} ms, "
        f"p99 {concurrent['commit_p99_ms']:.1f} ms, max {concurrent['commit_max_ms']:.1f} ms"
    )
    for q, ms in query_ms.items():
        print(f"query {q:24} {ms:8.2f} ms (median, after compaction)")
    summary = {
        "commit_ms": commit_med,
        "compact_ms_per_round": compact_per_round,
        "store_ms_per_round": commit_med + compact_per_round,
        "concurrent": concurrent,
        "queries_ms": query_ms,
    }
    json.dump(summary, __import__("sys").stdout)
    print()


if __name__ == "__main__":
    main()
