"""Maintenance beside serving, in the process that owns the log: retention.

The log writer is the API process's (it appends what ingest accepts), so its old segments
are dropped there, on a timer, while the worker process owns the store and the archive.
What may go is decided from what the others report: a segment is kept until every event in
it is committed and archived and no restart can need it (the worker rebuilds its state
from a snapshot at or before the archive's offset, which is at or before the store's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from clickagg.archive.base import ArchiveReader
from clickagg.clock import Clock
from clickagg.config import Settings
from clickagg.log.base import LogWriter
from clickagg.query.base import PartitionStatus, QueryStore
from clickagg.worker.snapshots import SnapshotStore

log = logging.getLogger(__name__)
RETENTION_INTERVAL_S = 60.0


def keep_from(
    status: PartitionStatus, archived: Mapping[int, int], snapshots: SnapshotStore
) -> int:
    """The oldest offset of the partition that anyone may still read: the snapshot a restart
    would start from, at or before both the committed and the archived offset."""
    needed = min(status.committed_offset, archived.get(status.partition, 0))
    return snapshots.oldest_needed(status.partition, needed)


async def retention_pass(
    statuses: Sequence[PartitionStatus],
    archived: Mapping[int, int],
    *,
    snapshots: SnapshotStore,
    writer: LogWriter,
    writer_lock: asyncio.Lock,
    now_ms: int,
) -> int:
    """Apply retention to every partition that has committed; the number of segments
    dropped. Under ``writer_lock``, so it never overlaps a group commit's append."""
    dropped = 0
    for status in statuses:
        oldest = keep_from(status, archived, snapshots)
        async with writer_lock:
            dropped += await asyncio.to_thread(
                writer.apply_retention, status.partition, keep_from=oldest, now_ms=now_ms
            )
    return dropped


async def retention_loop(
    settings: Settings,
    *,
    queries: QueryStore,
    archive: ArchiveReader,
    writer: LogWriter,
    writer_lock: asyncio.Lock,
    clock: Clock,
    interval_s: float = RETENTION_INTERVAL_S,
) -> None:
    """Run :func:`retention_pass` every ``interval_s`` until cancelled; a pass whose offsets
    cannot be read now (the worker restarting) is skipped, not retried early."""
    snapshots = SnapshotStore(settings.snapshot_dir)
    while True:
        await asyncio.sleep(interval_s)
        try:
            statuses = await queries.partition_status()
        except Exception as exc:
            log.warning("retention skipped: %s", exc)
            continue
        archived = await asyncio.to_thread(archive.archived_offsets)
        await retention_pass(
            statuses,
            archived,
            snapshots=snapshots,
            writer=writer,
            writer_lock=writer_lock,
            now_ms=clock.now_ms(),
        )
