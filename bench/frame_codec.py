"""Cost of the log frame format on the hot paths, in one process, µs per event.

* build+encode, 1,000 events: ``columns.build`` from numeric arrays and Arrow text (what
  ``split_by_partition`` does for a large request), then ``columns.encode``.
* build+encode, 1 event: the single-event request (``normalize`` of one event, which has
  its own plain-Python path), then ``columns.encode`` of its columns.
* merge, 64 x 1,000 events: ``columns.merge`` (the group committer), then encode.
* decode+to_frame, 50,000 events: ``stream.frames_to_events`` over 50 frames of 1,000
  events, and over 5,000 frames of 10 (the worker under single-event traffic).

Each figure is the best of ``--repeat`` runs (the box is shared; the best run is the least
disturbed one). Frame sizes are bytes per event of the encoded payloads.

    .venv/bin/python bench/frame_codec.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from clickagg.core import columns
from clickagg.core.events import decode_many, decode_one, normalize
from clickagg.log.base import Frame
from clickagg.traffic import TrafficGenerator, TrafficMix
from clickagg.worker import stream

NOW_MS = 1_700_000_000_000


def best_us(run: Callable[[], Any], calls: int, repeat: int) -> float:
    """Best per-call time of ``calls`` calls, in µs."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def source_columns(count: int, seed: int) -> tuple[dict[str, Any], dict[str, pa.Array]]:
    """Numeric arrays and Arrow text of ``count`` normalized events, as ``normalize`` makes
    them (taken back out of one normalized batch)."""
    mix = TrafficMix(duplicate_rate=0, late_rate=0, malformed_rate=0)
    body = TrafficGenerator(seed=seed, mix=mix).ndjson(count, NOW_MS)
    events, _ = decode_many(body, ndjson=True)
    batch = normalize(events, default_type=None, partitions=1, now_ms=NOW_MS, max_future_ms=0)
    frame = columns.to_frame(
        columns.decode(columns.encode(batch.by_partition[0])), partition=0, base_offset=0
    )
    numeric = {name: frame[name].to_numpy() for name in columns.NUMERIC_COLUMNS}
    text = {name: frame[name].to_arrow().cast(pa.string()) for name in columns.TEXT_COLUMNS}
    return numeric, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    repeat = parser.parse_args().repeat

    numeric, text = source_columns(1_000, seed=1)
    rows = np.arange(1_000)
    results: dict[str, float] = {}
    sizes: dict[str, float] = {}

    def build_encode_1000() -> bytes:
        return columns.encode(columns.build(numeric, text, rows))

    results["build+encode, 1,000 events"] = best_us(build_encode_1000, 200, repeat) / 1_000
    sizes["1,000-event frame"] = len(build_encode_1000()) / 1_000

    one = decode_one(
        b'{"click_id":"c-1","ad_id":"ad-0001","advertiser_id":"adv-1","user_id":"u-1",'
        b'"timestamp":1700000000000,"ip":"203.0.113.1","user_agent":"Mozilla/5.0 (iPhone; '
        b"CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        b'Version/17.4 Mobile/15E148 Safari/604.1"}'
    )

    def normalize_one() -> Any:
        batch = normalize([one], default_type=0, partitions=8, now_ms=NOW_MS, max_future_ms=0)
        return next(iter(batch.by_partition.values()))

    single = normalize_one()
    results["normalize, 1 event (no encode)"] = best_us(normalize_one, 20_000, repeat)
    results["encode, 1 event"] = best_us(lambda: columns.encode(single), 20_000, repeat)
    results["build+encode, 1 event"] = (
        results["normalize, 1 event (no encode)"] + results["encode, 1 event"]
    )
    sizes["1-event frame"] = len(columns.encode(single))

    sources = [(numeric, text), *(source_columns(1_000, seed=n) for n in range(2, 65))]
    parts = [columns.build(n, t, rows) for n, t in sources]
    merged = columns.merge(parts)
    results["merge, 64 x 1,000 events"] = best_us(lambda: columns.merge(parts), 10, repeat) / 64_000
    results["encode of the merged 64,000"] = (
        best_us(lambda: columns.encode(merged), 10, repeat) / 64_000
    )

    for size in (1_000, 10):
        frames = []
        for offset in range(0, 50_000, size):
            source_numeric, source_text = sources[offset // 1_000 % 64]
            first = offset % 1_000
            picked = columns.build(source_numeric, source_text, rows[first : first + size])
            frames.append(Frame(0, offset, size, columns.encode(picked)))
        assert stream.frames_to_events(frames, 0).height == 50_000
        label = f"decode+to_frame, 50,000 events in frames of {size:,}"
        run = lambda f=frames: stream.frames_to_events(f, 0)  # noqa: E731
        results[label] = best_us(run, 1, repeat) / 50_000

    width = max(map(len, results))
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.3f} µs/event")
    for name, per_event in sizes.items():
        print(f"{name:<{width}}  {per_event:8.1f} bytes/event")


if __name__ == "__main__":
    main()
