"""Throughput and memory of IdSet versus a Python ``set`` of 128-bit ints.

Workload: N events in batches of 100k over 30 one-minute buckets, 10% of them re-sent
copies of an earlier event (same fingerprint and minute, within the last two batches or the
same batch). ``stream`` mode advances event time through the 30 minutes with some late
events (cold minutes exist, as in the worker); ``uniform`` mode spreads every batch over all
30 minutes (the worst case: every bucket is hot in every call).

Each implementation runs in a fresh child process that loads the pre-generated workload from
disk, so RSS numbers are not polluted by the generator or by the other implementation:
"rest" is resident growth after the adds, "peak" is ru_maxrss after the adds minus resident
before (the snapshot is measured separately, after). "ids/s cpu" uses process CPU time, a
steadier figure than wall time on a shared machine (both implementations are single-threaded).

    .venv/bin/python bench/dedup_memory.py [--n 5000000] [--mode stream|uniform]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clickagg.core.dedup import IdSet

MINUTE_MS = 60_000
BASE_MS = 1_700_000_040_000  # a minute start


def generate(n: int, minutes: int, dup_frac: float, batch: int, mode: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    lo = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    if mode == "stream":
        k = np.arange(n, dtype=np.int64) * minutes // n
        late = rng.random(n) < 0.2
        k = np.maximum(k - late * rng.integers(1, 3, n), 0)
    else:
        k = rng.integers(0, minutes, n)
    m = BASE_MS + k.astype(np.int64) * MINUTE_MS
    is_dup = rng.random(n) < dup_frac
    is_dup[0] = False
    fresh = np.flatnonzero(~is_dup)
    dups = np.flatnonzero(is_dup)
    hi_i = np.searchsorted(fresh, dups)  # fresh events strictly before each copy
    lo_i = np.searchsorted(fresh, np.maximum(dups - 2 * batch, 0))
    src = fresh[lo_i + (rng.random(len(dups)) * (hi_i - lo_i)).astype(np.int64)]
    h[dups], lo[dups], m[dups] = h[src], lo[src], m[src]
    return {"h": h, "lo": lo, "m": m, "expected_dups": np.array(len(dups))}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(impl: str, path: str, batch: int) -> dict:
    with np.load(path) as z:
        h, lo, m = z["h"], z["lo"], z["m"]
        expected = int(z["expected_dups"])
    n = len(h)
    before = rss_bytes()
    dups, elapsed, cpu, worst = 0, 0.0, 0.0, 0.0
    result: dict = {"impl": impl}
    if impl == "idset":
        s = IdSet()
        for a in range(0, n, batch):
            t, c = time.perf_counter(), time.process_time()
            d = s.check_and_add(h[a : a + batch], lo[a : a + batch], m[a : a + batch])
            dt = time.perf_counter() - t
            elapsed, cpu, worst = elapsed + dt, cpu + time.process_time() - c, max(worst, dt)
            dups += int(d.sum())
        held = len(s)
        result["nbytes_per_id"] = s.nbytes / held
        peak, rest = peak_bytes(), rss_bytes()
        t = time.perf_counter()
        snap = s.snapshot()
        result["snapshot_s"] = time.perf_counter() - t
        result["snapshot_bytes_per_id"] = len(snap) / held
        result["snapshot_peak_rss_growth_per_id"] = (peak_bytes() - rest) / held
        del snap
    else:
        seen: set[int] = set()
        convert = 0.0
        for a in range(0, n, batch):
            t = time.perf_counter()
            hb, lb = h[a : a + batch].astype(object), lo[a : a + batch].astype(object)
            keys = ((hb << 64) | lb).tolist()
            t1, c = time.perf_counter(), time.process_time()
            out: list[bool] = []
            for key in keys:
                if key in seen:
                    out.append(True)
                else:
                    seen.add(key)
                    out.append(False)
            dt = time.perf_counter() - t1
            convert += t1 - t
            elapsed, cpu, worst = elapsed + dt, cpu + time.process_time() - c, max(worst, dt)
            dups += sum(out)
        held = len(seen)
        result["ids_per_s_incl_int_conversion"] = n / (elapsed + convert)
        peak, rest = peak_bytes(), rss_bytes()
    if dups != expected or held != n - expected:
        raise SystemExit(f"{impl}: wrong answer: {dups} dups, expected {expected}")
    result |= {
        "n": n,
        "held": held,
        "ids_per_s": n / elapsed,
        "ids_per_cpu_s": n / cpu,
        "worst_call_ms": worst * 1e3,
        "rest_rss_per_id": (rest - before) / held,
        "peak_rss_per_id": (peak - before) / held,
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5_000_000)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--minutes", type=int, default=30)
    p.add_argument("--dup", type=float, default=0.10)
    p.add_argument("--mode", choices=["stream", "uniform"], default="stream")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--child", choices=["idset", "set"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.data, args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "workload.npz")
        np.savez(path, **generate(args.n, args.minutes, args.dup, args.batch, args.mode, args.seed))
        results = []
        for impl in ("idset", "set"):
            cmd = [sys.executable, __file__, "--child", impl, "--data", path]
            out = subprocess.run(
                [*cmd, "--batch", str(args.batch)], check=True, capture_output=True
            )
            results.append(json.loads(out.stdout))
    idset, base = results
    print(f"n={args.n} batch={args.batch} minutes={args.minutes} dup={args.dup} mode={args.mode}")
    print(
        f"{'impl':<8}{'ids/s wall':>12}{'ids/s cpu':>12}{'worst call ms':>15}"
        f"{'rest B/id':>11}{'peak B/id':>11}"
    )
    for r in results:
        print(
            f"{r['impl']:<8}{r['ids_per_s']:>12,.0f}{r['ids_per_cpu_s']:>12,.0f}"
            f"{r['worst_call_ms']:>15.1f}"
            f"{r['rest_rss_per_id']:>11.1f}{r['peak_rss_per_id']:>11.1f}"
        )
    print(
        f"idset: nbytes/id at rest {idset['nbytes_per_id']:.2f}; snapshot "
        f"{idset['snapshot_bytes_per_id']:.2f} B/id in {idset['snapshot_s']:.2f} s, peak RSS "
        f"+{idset['snapshot_peak_rss_growth_per_id']:.1f} B/id while snapshotting"
    )
    print(
        "set: timed loop excludes building the 128-bit ints; including it: "
        f"{base['ids_per_s_incl_int_conversion']:,.0f} ids/s"
    )
    print(json.dumps({"bench": "dedup_memory", "mode": args.mode, "idset": idset, "set": base}))


if __name__ == "__main__":
    main()
