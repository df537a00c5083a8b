"""Audit lookups on a big archive: p50/p99 of ``GET /events/{id}``'s archive read.

Builds (or reuses) a synthetic archive of N decisions through the real writer, in flushes
of ``--flush`` events over 8 partitions, event times spread over ten days, then times
``ParquetArchiveReader.fates(id)`` for random archived ids and for ids never seen, from a
fresh reader (cold page cache for the index runs is not forced: the OS keeps what it read).
Also reports what writing the archive cost per event.

    .venv/bin/python bench/archive_lookup.py --events 100000000 [--dir /tmp/archive-100m]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clickagg.archive.parquet import INDEX_DIR, ParquetArchiveReader, ParquetArchiveWriter
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.events import _fingerprints

PARTITIONS = 8
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SPAN_MS = 10 * 86_400_000  # 100M events: ~400,000 per event hour
USER_AGENTS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/124.0 Mobile Safari",
]


def synthetic_flush(
    first: int, count: int, total: int, next_offsets: list[int], rng: np.random.Generator
) -> tuple[pa.Table, dict[int, tuple[int, int]]]:
    """Decisions of events ``first .. first+count`` (ids ``c<n>``), their partitions from
    the real fingerprint, offsets continuing ``next_offsets``."""
    numbers = pa.array(np.arange(first, first + count))
    event_ids = pc.binary_join_element_wise("c", pc.cast(numbers, pa.string()), "")
    high, low = _fingerprints(event_ids.to_pylist(), np.zeros(count, dtype=np.int64))
    partitions = (low % np.uint64(PARTITIONS)).astype(np.int32)
    offsets = np.empty(count, dtype=np.int64)
    ranges = {}
    for p in range(PARTITIONS):
        mask = partitions == p
        n = int(mask.sum())
        offsets[mask] = np.arange(next_offsets[p], next_offsets[p] + n)
        ranges[p] = (next_offsets[p], next_offsets[p] + n)
        next_offsets[p] += n
    ads = rng.zipf(1.1, count) % 10_000
    users = rng.integers(0, 1_000_000, count)
    status = np.where(rng.random(count) < 0.05, "duplicate", "counted")

    def text(prefix: str, values: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")

    table = pa.table(
        {
            "partition": partitions,
            "offset": offsets,
            "event_id": event_ids,
            "event_type": pa.array(["click"] * count),
            "status": pa.array(status),
            "reason": pa.nulls(count, pa.string()),
            "ad_id": text("ad", ads),
            "advertiser_id": text("adv", ads // 200),
            "campaign_id": text("cmp", ads // 20),
            "user_id": text("u", users),
            "ip": text("10.0.", users % 65_000),
            "user_agent": pa.array(USER_AGENTS).take(pa.array(users % 3)),
            "country": pa.array(["US", "DE", "IN", "BR"]).take(pa.array(users % 4)),
            "device": pa.array(["mobile", "desktop", "mobile"]).take(pa.array(users % 3)),
            "browser": pa.array(["Safari", "Chrome", "Chrome"]).take(pa.array(users % 3)),
            "ts_ms": T0 + np.arange(first, first + count) * (SPAN_MS // total),
            "received_ms": T0 + np.arange(first, first + count) * (SPAN_MS // total),
            "cost_micros": pa.nulls(count, pa.int64()),
            "spend_micros": np.where(status == "counted", 500_000, 0),
            "fp_high": high,
            "fp_low": low,
        }
    )
    return table.cast(DECISION_SCHEMA), ranges


def build(directory: Path, events: int, flush: int) -> tuple[float, int]:
    """Write the archive; return seconds spent in the writer and events written."""
    rng = np.random.default_rng(7)
    writer = ParquetArchiveWriter(directory, flush_events=flush, flush_interval_ms=10**9)
    next_offsets = [0] * PARTITIONS
    spent = 0.0
    for first in range(0, events, flush):
        count = min(flush, events - first)
        table, ranges = synthetic_flush(first, count, events, next_offsets, rng)
        start = time.perf_counter()
        writer.append(table, ranges)
        writer.flush()
        spent += time.perf_counter() - start
        if first // flush % 10 == 0:
            print(f"  built {first + count:,} / {events:,}", flush=True)
    writer.close()
    return spent, events


def disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--flush", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    directory = args.dir or Path(f"/tmp/clickagg-archive-{args.events}")
    if args.rebuild and directory.exists():
        shutil.rmtree(directory)
    reader = ParquetArchiveReader(directory)
    if sum(reader.archived_offsets().values()) != args.events:
        shutil.rmtree(directory, ignore_errors=True)
        spent, written = build(directory, args.events, args.flush)
        print(f"write: {spent / written * 1e6:.2f} µs per decision ({written:,} in {spent:.0f} s)")
        reader = ParquetArchiveReader(directory)
    runs = len(os.listdir(directory / INDEX_DIR))
    files = len(list(directory.glob("hour=*/*.parquet")))
    print(
        f"archive: {args.events:,} decisions, {files:,} files, {runs} index runs, "
        f"{disk_bytes(directory) / 2**30:.2f} GiB"
    )
    rng = np.random.default_rng(11)
    timings: dict[str, list[float]] = {"archived id": [], "unknown id": []}
    start = time.perf_counter()
    reader.archived_offsets()
    print(f"first open (manifests): {(time.perf_counter() - start) * 1000:.0f} ms")
    for n in rng.integers(0, args.events, args.lookups).tolist():
        for kind, event_id in (("archived id", f"c{n}"), ("unknown id", f"x{n}")):
            start = time.perf_counter()
            found = reader.fates(event_id)
            timings[kind].append((time.perf_counter() - start) * 1000)
            if (len(found) == 1) != (kind == "archived id"):
                raise AssertionError(f"{event_id}: {found}")
    for kind, values in timings.items():
        values.sort()
        p99 = values[int(len(values) * 0.99) - 1]
        print(
            f"lookup, {kind}: p50 {statistics.median(values):.2f} ms, p99 {p99:.2f} ms, "
            f"max {values[-1]:.2f} ms ({len(values)} lookups)"
        )


if __name__ == "__main__":
    main()
