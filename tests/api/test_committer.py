"""Group commit: concurrent requests share fsyncs; nothing is acknowledged before it is durable."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from clickagg.api.committer import Backpressure, GroupCommitter, merge_columns
from clickagg.core import columns
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from tests.conftest import Ev, build_columns

DAY = 86_400_000
T = 1_700_000_000_000


class CountingWriter(SegmentLogWriter):
    """The real segment writer, counting syncs."""

    syncs = 0

    def sync(self) -> None:
        self.syncs += 1
        super().sync()


class GatedWriter(SegmentLogWriter):
    """The real segment writer whose sync waits for the test to open a gate, and which
    counts the syncs that have completed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.completed = 0

    def sync(self) -> None:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        super().sync()
        self.completed += 1


def test_merge_columns_concatenates_in_order() -> None:
    a = build_columns([Ev("1", "x", 1), Ev("2", "y", 2)])
    b = build_columns([Ev("3", "z", 3)])
    merged = merge_columns([a, b])
    assert merged.count == 3
    assert merged.text("event_id").to_pylist() == ["1", "2", "3"]
    assert columns.decode(columns.encode(merged))["ad_id"].to_pylist() == ["x", "y", "z"]


def test_concurrent_appends_share_syncs_and_are_durable_when_answered(tmp_path: Path) -> None:
    writer = CountingWriter(tmp_path, 2, retention_ms=DAY, retention_bytes=2**40)
    reader = SegmentLogReader(tmp_path)
    queued = [0, 0]

    async def scenario() -> None:
        committer = GroupCommitter(writer, max_pending_events=10_000)
        committer.start()

        async def one(n: int) -> None:
            partition = n % 2
            queued[partition] += 1
            position = queued[partition]  # the log keeps each partition's queue order
            await committer.append({partition: build_columns([Ev(f"e{n}", "ad", T)])})
            # answered only once durable: the reader (which trusts only synced ends) has it
            assert reader.durable_end(partition) >= position

        await asyncio.gather(*(one(n) for n in range(200)))
        await committer.stop()

    asyncio.run(scenario())
    assert reader.durable_end(0) + reader.durable_end(1) == 200
    assert writer.syncs < 100  # requests were grouped
    reader.close()
    writer.close()


def test_no_answer_before_the_sync_completes(tmp_path: Path) -> None:
    """Hold the log's sync: while it is held, no append may return."""
    writer = GatedWriter(tmp_path, 2, retention_ms=DAY, retention_bytes=2**40)
    answered: list[int] = []  # completed syncs seen by each answer

    async def scenario() -> None:
        committer = GroupCommitter(writer, max_pending_events=10_000)
        committer.start()

        async def one(n: int) -> None:
            await committer.append({n % 2: build_columns([Ev(f"g{n}", "ad", T)])})
            answered.append(writer.completed)

        tasks = [asyncio.create_task(one(n)) for n in range(20)]
        try:
            assert await asyncio.to_thread(writer.entered.wait, 30)
            await asyncio.sleep(0.2)  # ample time for an early answer to arrive
            assert answered == [], "acknowledged before the log's sync completed"
        finally:
            writer.gate.set()
        await asyncio.gather(*tasks)
        await committer.stop()

    asyncio.run(scenario())
    assert len(answered) == 20 and min(answered) >= 1
    writer.close()


def test_backpressure_refuses_beyond_the_pending_limit(tmp_path: Path) -> None:
    writer = SegmentLogWriter(tmp_path, 1, retention_ms=DAY, retention_bytes=2**40)

    async def scenario() -> None:
        committer = GroupCommitter(writer, max_pending_events=3)
        committer.start()
        with pytest.raises(Backpressure, match="waiting"):
            await committer.append({0: build_columns([Ev(str(n), "a", 1) for n in range(4)])})
        await committer.append({0: build_columns([Ev("ok", "a", 1)])})
        await committer.stop()

    asyncio.run(scenario())
    writer.close()
