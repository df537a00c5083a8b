"""The keyed stage turned on for a data dir that already counted: a real worker session
(``runtime/worker.py``) passes the store's newest event time to stage 1, so the keyed
logs' first frames are marked complete only after everything counted before."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from clickagg.config import Settings
from clickagg.core import columns
from clickagg.core.windows import MINUTE_MS
from clickagg.keyed.stage1 import context_of, decode_records
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.runtime.worker import DiskBackoff, _Session
from tests.conftest import Ev, build_columns

T0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS


def append(settings: Settings, events: list[Ev]) -> None:
    writer = SegmentLogWriter.for_settings(settings)
    try:
        writer.append(0, columns.encode(build_columns(events)), len(events))
        writer.sync()
    finally:
        writer.close()


def run_worker(settings: Settings) -> None:
    session = _Session(settings)
    try:
        session.loop(lambda: False, DiskBackoff(settings), max_idle_loops=3)
    finally:
        session.close_gracefully()


def test_the_first_keyed_frames_are_marked_after_the_newest_event_counted_before(
    tmp_path: Path,
) -> None:
    off = Settings(data_dir=tmp_path, partitions=1, keyed_stage=False, keyed_partitions=2)
    on = dataclasses.replace(off, keyed_stage=True)
    before = [Ev(f"a{i}", "ad", T0 + i * 6_000, ip=f"198.51.100.{i % 5}") for i in range(11)]
    newest_before = T0 + 60_000
    append(off, before)
    run_worker(off)
    # Counted after the switch, yet older than the newest counted before (within the
    # lateness): the round's own events would put the mark too early.
    after = [
        Ev(f"b{i}", "ad", T0 + 10_000 + i * 1_000, ip=f"198.51.100.{i % 5}") for i in range(10)
    ]
    append(on, after)
    run_worker(on)
    reader = SegmentLogReader(on.keyed_dir / "log")
    try:
        firsts = [reader.read(k, 0, 10_000) for k in range(on.keyed_partitions)]
        marks = [context_of(decode_records(frames[0].payload)) for frames in firsts if frames]
        records = sum(f.end_offset - f.base_offset for frames in firsts for f in frames)
    finally:
        reader.close()
    assert records == len(after)  # only what was counted since: the rest is not re-derived
    assert marks and marks == [newest_before + 1] * len(marks)
