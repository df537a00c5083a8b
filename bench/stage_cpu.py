"""CPU µs per event by stage, end to end, for any build: py-spy stacks split into stages.

``bench/stage_breakdown.py`` times the stages in one process, but only on builds that have
today's functions. This script instead reads the raw stacks ``bench/e2e_throughput.py
--py-spy DIR`` records from the real server (API process and worker), assigns each sample
to a stage by the functions on its stack, and scales each process's shares by the CPU it
spent per event in an UNPROFILED run of the same build (py-spy itself slows the processes,
so its sample counts are not CPU time):

    CLICKAGG_BENCH_SRC=/tmp/src-REV .venv/bin/python bench/e2e_throughput.py \\
        --events 2000000 --batch 1000 --concurrency 64 --py-spy /tmp/spy-REV
    .venv/bin/python bench/stage_cpu.py /tmp/spy-REV --api-cores 0.74 --worker-cores 1.12 \\
        --rate 114568

``--api-cores``, ``--worker-cores`` and ``--rate`` are what the unprofiled runs of that build
printed (median). The stage rules match functions of both the current layout and the
issue-9 baseline 3a2a018 (where the audit rows were part of the store commit).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from profile_summary import frame_key, load

# A stage owned by a thread or a background job: the OUTERMOST match decides, so the
# compactor's sketch unions count as compaction, not as aggregation.
_OWNERS: list[tuple[str, tuple[str, ...]]] = [
    ("compaction (background)", ("DuckDBStore.compact", "Compactor.")),
    ("archive (Parquet flush)", ("clickagg/archive/",)),
    ("snapshots", ("worker/snapshots.py", "maybe_snapshot", "snapshot_now")),
    ("real-time counters", ("clickagg/realtime/",)),
    ("queries", ("store/rpc.py", "query-server", "clickagg/query/")),
]
# Stages of the stream itself: the INNERMOST match decides (aggregation called from the
# processor is aggregation).
_STREAM: list[tuple[str, tuple[str, ...]]] = [
    ("decode", ("events.py:decode_many", "events.py:decode_one")),
    ("validate (normalize)", ("events.py:normalize", "ingest.py:_normalize", "useragent.py")),
    ("log append (encode, write, fsync)", ("api/committer.py", "log/segments.py:SegmentLogWriter")),
    ("log read + frame decode", ("read_pending", "frames_to_events", "SegmentLogReader")),
    ("dedup, lateness, rules", ("core/processor.py", "core/dedup.py", "clickagg/rules/")),
    ("aggregate (deltas, sketches)", ("core/aggregate.py", "core/hll.py", "core/sketch.py")),
    ("audit rows (3a2a018: in the store)", ("processor.py:_fates_table", "_late_table")),
    ("commit (store transaction)", ("clickagg/store/",)),
]


def stage_of(frames: list[str]) -> str:
    keys = [frame_key(f) for f in frames]
    for key in keys:  # outermost first
        for stage, needles in _OWNERS:
            if any(n in key for n in needles):
                return stage
    for key in reversed(keys):  # innermost first
        for stage, needles in _STREAM:
            if any(n in key for n in needles):
                return stage
    return "HTTP, event loop, other"


def shares(path: Path) -> dict[str, float]:
    stacks, _ = load(path, None)
    counts: Counter[str] = Counter()
    for frames, count in stacks:
        counts[stage_of(frames)] += count
    total = sum(counts.values()) or 1
    return {stage: count / total for stage, count in counts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile_dir", type=Path, help="holds api.txt and worker.txt")
    p.add_argument("--api-cores", type=float, required=True)
    p.add_argument("--worker-cores", type=float, required=True)
    p.add_argument("--rate", type=float, required=True, help="events/s of the unprofiled runs")
    args = p.parse_args()
    result: dict[str, dict[str, float]] = {}
    for side, cores in (("api", args.api_cores), ("worker", args.worker_cores)):
        per_event_us = cores / args.rate * 1e6
        split = shares(args.profile_dir / f"{side}.txt")
        result[side] = {s: round(share * per_event_us, 2) for s, share in split.items()}
        print(f"== {side}: {per_event_us:.2f} µs/event ({cores} cores at {args.rate:,.0f}/s)")
        for stage, us in sorted(result[side].items(), key=lambda kv: -kv[1]):
            print(f"   {us:6.2f}  {100 * split[stage]:5.1f} %  {stage}")
    print(json.dumps({"bench": "stage_cpu", "dir": str(args.profile_dir), "us": result}))


if __name__ == "__main__":
    main()
