"""One event hour archived as a trickle (a small file per flush) against the same hour
compacted: the audit lookup and an hour's ``decisions()`` / DuckDB scan, before and after.

Writes ``--flushes`` flushes of ``--per-flush`` decisions of one event hour through the
real writer (what a 1 s flush interval makes of a trickle in an hour), times lookups of
random archived ids from a fresh reader, the hour's ``decisions()`` and a DuckDB count over
``files()``; then compacts (the writer's own maintenance) and times the same again.

    .venv/bin/python bench/archive_compaction.py --flushes 3600 --per-flush 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from archive_lookup import PARTITIONS, T0, synthetic_flush
from clickagg.archive.parquet import ParquetArchiveReader, ParquetArchiveWriter
from clickagg.core.windows import HOUR_MS


def build(directory: Path, flushes: int, per_flush: int) -> ParquetArchiveWriter:
    """The trickle's archive. Its fsyncs are skipped (what is timed is reading it; a real
    trickle spreads them over the hour)."""
    real_fsync, os.fsync = os.fsync, lambda fd: None
    try:
        return _build(directory, flushes, per_flush)
    finally:
        os.fsync = real_fsync


def _build(directory: Path, flushes: int, per_flush: int) -> ParquetArchiveWriter:
    rng = np.random.default_rng(7)
    writer = ParquetArchiveWriter(
        directory,
        flush_events=200_000,  # the default: a merged file holds up to 800,000
        flush_interval_ms=10**9,
        compact_after_ms=0,
        compact_grace_ms=0,
    )
    next_offsets = [0] * PARTITIONS
    total = flushes * per_flush
    for n in range(flushes):
        table, ranges = synthetic_flush(n * per_flush, per_flush, total, next_offsets, rng)
        ts = T0 + np.arange(n * per_flush, (n + 1) * per_flush) * (HOUR_MS // total)
        table = table.set_column(
            table.schema.get_field_index("ts_ms"), "ts_ms", pa.array(ts, pa.int64())
        )
        writer.append(table, ranges)
        writer.flush()
    return writer


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(directory: Path, total: int, lookups: int, label: str) -> None:
    reader = ParquetArchiveReader(directory)
    files = reader.files(T0, T0 + HOUR_MS)
    rng = np.random.default_rng(11)
    ids = [f"c{n}" for n in rng.integers(0, total, lookups)]
    start = time.perf_counter()
    reader.fates(ids[0])  # opens the index runs
    first = time.perf_counter() - start
    found = 0
    times = []
    for event_id in ids:
        start = time.perf_counter()
        found += len(reader.fates(event_id))
        times.append(time.perf_counter() - start)
    assert found == lookups, (found, lookups)
    times.sort()
    scans = timed(lambda: reader.decisions(start_ms=T0, end_ms=T0 + HOUR_MS), 3)
    rows = reader.decisions(start_ms=T0, end_ms=T0 + HOUR_MS).num_rows
    assert rows == total
    listing = ", ".join(f"'{p}'" for p in files)
    duck = timed(
        lambda: duckdb.sql(f"SELECT count(*) FROM read_parquet([{listing}])").fetchall(), 3
    )
    print(
        f"{label}: {len(files):,} files; lookup first {first * 1e3:.1f} ms, "
        f"p50 {times[len(times) // 2] * 1e3:.2f} ms, "
        f"p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms; "
        f"decisions() of the hour {statistics.median(scans) * 1e3:.0f} ms; "
        f"DuckDB count over files() {statistics.median(duck) * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flushes", type=int, default=3_600)
    parser.add_argument("--per-flush", type=int, default=100)
    parser.add_argument("--lookups", type=int, default=300)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="clickagg-compaction-"))
    try:
        start = time.perf_counter()
        writer = build(directory, args.flushes, args.per_flush)
        print(f"wrote {args.flushes:,} flushes in {time.perf_counter() - start:.0f} s")
        total = args.flushes * args.per_flush
        measure(directory, total, args.lookups, "small files")
        start = time.perf_counter()
        merged = writer.compact()
        print(f"compacted {merged:,} files in {time.perf_counter() - start:.1f} s")
        writer.close()
        measure(directory, total, args.lookups, "compacted  ")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
