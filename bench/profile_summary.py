"""Summarise py-spy raw (collapsed) stacks: top functions by self and inclusive share.

    .venv/bin/python bench/profile_summary.py /tmp/prof/api.txt [--top 20] [--thread NAME]

py-spy ``--format raw`` writes one line per distinct stack, ``frame;frame;... count``, each
frame ``function (file:line)``; with ``--threads`` the first frame names the thread.
Shares are of all recorded (non-idle) samples of the file, or of the selected threads.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/src/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def frame_key(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{_short(match['file'])}:{match['func']}"


def load(path: Path, thread: str | None) -> tuple[list[tuple[list[str], int]], Counter[str]]:
    stacks: list[tuple[list[str], int]] = []
    threads: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0] if frames and frames[0].startswith(("thread", "process")) else ""
        if frames and frames[0].startswith("process"):
            frames = frames[1:]
            name = frames[0] if frames and frames[0].startswith("thread") else name
        if frames and frames[0].startswith("thread"):
            frames = frames[1:]
        threads[name] += int(count_text)
        if thread is not None and thread not in name:
            continue
        stacks.append((frames, int(count_text)))
    return stacks, threads


def summarise(path: Path, top: int, thread: str | None) -> dict[str, object]:
    stacks, threads = load(path, thread)
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        keys = [frame_key(f) for f in frames]
        if keys:
            own[keys[-1]] += count
        for key in set(keys):
            incl[key] += count
    return {
        "file": str(path),
        "samples": total,
        "threads": dict(threads.most_common()),
        "self": [(k, round(100 * v / total, 1)) for k, v in own.most_common(top)],
        "inclusive": [(k, round(100 * v / total, 1)) for k, v in incl.most_common(top)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--thread", help="only threads whose label contains this")
    args = p.parse_args()
    results = []
    for path in args.files:
        result = summarise(path, args.top, args.thread)
        results.append(result)
        print(f"== {path}: {result['samples']} samples")
        threads = result["threads"]
        assert isinstance(threads, dict)
        for name, count in threads.items():
            print(f"   thread {name or '?'}: {count}")
        for title in ("self", "inclusive"):
            print(f"-- top by {title} time (% of samples)")
            rows = result[title]
            assert isinstance(rows, list)
            for key, share in rows:
                print(f"{share:6.1f}%  {key}")
        print()
    print(json.dumps({"bench": "profile_summary", "results": results}))


if __name__ == "__main__":
    main()
