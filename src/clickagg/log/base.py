"""The log role as Protocols: one writer (ingest) and any number of readers (workers).

Offsets count events, not frames: a frame holding ``count`` events starting at
``base_offset`` covers offsets ``[base_offset, base_offset + count)``. That matches
JetStream sequences and Kafka offsets, so (partition, offset) addresses one event anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class LogFullError(OSError):
    """The log cannot take more right now (disk full, over its limits): retry later."""


class PartitionDamagedError(OSError):
    """A partition lost acknowledged data: it takes no new events until an operator has
    run ``clickagg log repair``, so no offset is ever reused and no loss goes unnoticed."""


class CorruptFrameError(ValueError):
    """A stored frame fails its checks where a reader needs it. The reader records the
    damage (see ``clickagg.log.integrity``) before raising, so ingest stops for the
    partition and ``/healthz`` names it."""

    def __init__(self, partition: int, offset: int, detail: str) -> None:
        super().__init__(f"corrupt frame in partition {partition} at offset {offset}: {detail}")
        self.partition = partition
        self.offset = offset


LOST_MAGIC = b"CLICKAGG-LOST-OFFSETS\n"
"""A frame whose payload starts with this marks offsets a repair could not recover: they
hold no events. Event payloads are Arrow IPC streams, which start with 0xFFFFFFFF."""


@dataclass(frozen=True)
class Frame:
    partition: int
    base_offset: int
    count: int
    payload: bytes

    @property
    def end_offset(self) -> int:
        return self.base_offset + self.count

    @property
    def lost(self) -> bool:
        """A repaired hole: ``count`` offsets whose events are gone (see LOST_MAGIC)."""
        return self.payload.startswith(LOST_MAGIC)


@dataclass(frozen=True)
class Recovery:
    """One action the writer's recovery took: logged, and exported as a metric."""

    partition: int
    action: str  # torn_tail_truncated | damage_found
    detail: str


class LogWriter(Protocol):
    partitions: int

    @property
    def recoveries(self) -> Sequence[Recovery]:
        """What opening the log had to do (each also logged), for ``/metrics``."""
        ...

    def append(self, partition: int, payload: bytes, count: int) -> int:
        """Buffer one frame of ``count`` events; return its base offset. Not yet durable."""
        ...

    def sync(self) -> None:
        """Make every frame appended so far durable (one fsync per touched partition), then
        publish the new durable end offsets to readers. Raises LogFullError or OSError."""
        ...

    def damaged(self) -> Mapping[int, str]:
        """Partitions that lost acknowledged data, with why: appends to them raise
        PartitionDamagedError until ``clickagg log repair`` has run."""
        ...

    def apply_retention(self, partition: int, *, keep_from: int, now_ms: int) -> int:
        """Delete whole closed segments that end at or before ``keep_from`` and are older
        than the retention age or beyond the retention size; return how many were deleted.
        ``keep_from`` is the oldest offset anyone still needs (worker state rebuild)."""
        ...

    def close(self) -> None: ...


class LogReader(Protocol):
    partitions: int

    def durable_end(self, partition: int) -> int:
        """Offset one past the last durable event: readers never see beyond it."""
        ...

    def start_offset(self, partition: int) -> int:
        """First offset still stored (retention removes whole old segments)."""
        ...

    def read(self, partition: int, from_offset: int, max_events: int) -> list[Frame]:
        """Durable frames covering ``[from_offset, …)``, about ``max_events`` events in all.

        The first frame may begin before ``from_offset`` (frames are not split); the caller
        skips what it has seen. Returns [] when nothing new is durable. Raises
        CorruptFrameError (after recording the damage) where a frame cannot be read.
        """
        ...

    def report_damage(self, partition: int, detail: str) -> None:
        """Record that ``partition`` lost acknowledged data a reader needs (e.g. the store
        committed beyond the log's end): ingest stops for it until it is repaired."""
        ...

    def close(self) -> None: ...
