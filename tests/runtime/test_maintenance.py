"""Log retention in the process that owns the log: a segment goes only once every event in
it is committed, archived and behind the snapshot a restart would start from."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from clickagg.core import columns
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.query.base import PartitionStatus
from clickagg.runtime.maintenance import retention_pass
from clickagg.worker.snapshots import SnapshotStore
from tests.conftest import Ev, build_columns

T0 = 1_700_000_000_000


def status(partition: int, committed: int) -> PartitionStatus:
    return PartitionStatus(partition, committed, T0, T0, committed, 0, 0, 0, T0)


def segments(log_dir: Path, partition: int) -> list[int]:
    names = os.listdir(log_dir / f"p{partition:04d}")
    return sorted(int(n.removesuffix(".seg")) for n in names if n.endswith(".seg"))


def test_a_segment_goes_only_behind_the_store_the_archive_and_the_snapshot(
    tmp_path: Path,
) -> None:
    log_dir = tmp_path / "log"
    writer = SegmentLogWriter(
        log_dir, 2, segment_bytes=4_000, retention_ms=60_000, retention_bytes=2**40
    )
    payload = columns.encode(build_columns([Ev(f"e{n}", "ad", T0) for n in range(5)]))
    for partition in (0, 1):
        for _ in range(40):  # 200 events, 5 per frame, several frames per segment
            writer.append(partition, payload, 5)
    writer.sync()
    bases = {p: segments(log_dir, p) for p in (0, 1)}
    assert all(len(b) > 6 for b in bases.values())
    old = time.time() - 3_600
    for p, found in bases.items():  # every closed segment is past the retention age
        for base in found[:-1]:
            os.utime(log_dir / f"p{p:04d}" / f"{base:020d}.seg", (old, old))
    snapshots = SnapshotStore(tmp_path / "snapshots")
    # Partition 0: committed 150, archived 120, the newest snapshot at or before it at 100.
    # Partition 1: committed 60, archived 190, snapshot at 50.
    snapshots.save(0, 100, b"state")
    snapshots.save(0, 130, b"state")  # after the archive's offset: a restart cannot use it
    snapshots.save(1, 50, b"state")

    async def run() -> int:
        return await retention_pass(
            [status(0, 150), status(1, 60)],
            {0: 120, 1: 190},
            snapshots=snapshots,
            writer=writer,
            writer_lock=asyncio.Lock(),
            now_ms=int(time.time() * 1000),
        )

    dropped = asyncio.run(run())
    for p, keep in ((0, 100), (1, 50)):
        left = segments(log_dir, p)
        # only whole segments that end at or before the offset still needed are gone
        assert left[0] <= keep < (left[1] if len(left) > 1 else 10**9)
        assert set(bases[p]) - set(left) == {b for b in bases[p] if b < left[0]}
    assert dropped == sum(len(bases[p]) - len(segments(log_dir, p)) for p in (0, 1)) > 0
    with SegmentLogReader(log_dir) as reader:
        assert reader.start_offset(0) <= 100 and reader.start_offset(1) <= 50
        frames = reader.read(0, 100, 10)
        assert frames and frames[0].base_offset <= 100
    writer.close()
