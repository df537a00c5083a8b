"""The log role as Protocols: one writer (ingest) and any number of readers (workers).

Offsets count events, not frames: a frame holding ``count`` events starting at
``base_offset`` covers offsets ``[base_offset, base_offset + count)``. That matches
JetStream sequences and Kafka offsets, so (partition, offset) addresses one event anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class LogFullError(OSError):
    """The log cannot take more right now (disk full, over its limits): retry later."""


@dataclass(frozen=True)
class Frame:
    partition: int
    base_offset: int
    count: int
    payload: bytes

    @property
    def end_offset(self) -> int:
        return self.base_offset + self.count


class LogWriter(Protocol):
    partitions: int

    def append(self, partition: int, payload: bytes, count: int) -> int:
        """Buffer one frame of ``count`` events; return its base offset. Not yet durable."""
        ...

    def sync(self) -> None:
        """Make every frame appended so far durable (one fsync per touched partition), then
        publish the new durable end offsets to readers. Raises LogFullError or OSError."""
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
        skips what it has seen. Returns [] when nothing new is durable.
        """
        ...

    def close(self) -> None: ...
