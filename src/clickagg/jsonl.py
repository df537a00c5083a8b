"""Append-only change records as JSON lines (the ad registry, advertisers, the managed
blocklist): appended and fsynced whole, read back skipping a torn last line, which is all
a crash mid-append can leave."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """The records of ``text``, one JSON object a line; blank and torn lines skipped."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
    return records


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """:func:`parse_jsonl` of a file; none when it does not exist yet."""
    try:
        return parse_jsonl(path.read_text())
    except FileNotFoundError:
        return []


def append_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append the records durably (fsync) in one write; nothing to append, nothing done."""
    lines = "".join(json.dumps(dict(r), sort_keys=True) + "\n" for r in records)
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
