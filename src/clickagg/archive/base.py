"""The archive role: every decision the stream made, kept for audit and billing.

The stream commits aggregate deltas and offsets first; the archive follows, fenced by the
same offsets: per partition it holds exactly the decisions of ``[0, archived_offset)``,
each once. A writer appends only the range that continues a partition's archived offset,
so after a crash the worker re-derives the decisions of ``[archived, committed)`` from the
log (the processor is deterministic) and the archive ends up as if nothing had happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa


class ArchiveGapError(RuntimeError):
    """Decisions were appended that do not continue a partition's archived offset."""


class ArchiveFencedError(RuntimeError):
    """Another writer published to this archive: this one no longer owns it."""


@dataclass(frozen=True)
class Fate:
    """One recorded decision about one copy of an event (the audit trail's row)."""

    event_id: str
    event_type: str
    partition: int
    offset: int
    status: str  # counted | duplicate | late | invalid
    reason: str | None
    ad_id: str
    ts_ms: int


@dataclass(frozen=True)
class Correction:
    """The keyed stage's later verdict on a click the stream counted (its final fate)."""

    event_id: str
    source_partition: int
    source_offset: int
    keyed_partition: int
    keyed_offset: int
    ad_id: str
    ts_ms: int
    rule_id: str
    reason: str
    evidence: str
    spend_micros: int
    corrected_at_ms: int
    previous_rule_id: str | None = None  # set: this moved the reason from that rule


class ArchiveWriter(Protocol):
    def next_offset(self, partition: int) -> int:
        """The offset the next appended decisions of ``partition`` must start at."""
        ...

    def published_offset(self, partition: int) -> int:
        """What a restart finds archived: decisions of ``partition`` below this offset are
        durable and visible (``next_offset`` counts the buffered ones too)."""
        ...

    def append(self, decisions: pa.Table, ranges: Mapping[int, tuple[int, int]]) -> None:
        """Take the decisions (``clickagg.core.decisions.DECISION_SCHEMA``) of the offset
        ranges ``{partition: (from, to)}``. Rows below a partition's ``next_offset`` are
        dropped (a redo after a crash); a range starting beyond it raises ArchiveGapError.
        Durable only once flushed."""
        ...

    def maybe_flush(self) -> None:
        """Flush if enough decisions are buffered or the oldest waited long enough;
        raises the error of an earlier background flush, if any."""
        ...

    def flush(self) -> None:
        """Make everything appended so far durable and visible, then return."""
        ...

    def close(self) -> None: ...


class ArchiveReader(Protocol):
    def archived_offsets(self) -> dict[int, int]:
        """Per partition, the end of the durable archived range."""
        ...

    def fates(self, event_id: str) -> list[Fate]:
        """Every archived decision about ``event_id`` (any event type), in log order."""
        ...

    def decisions(
        self, *, start_ms: int, end_ms: int, statuses: tuple[str, ...] | None = None
    ) -> pa.Table:
        """Archived decisions of events with event time in [start_ms, end_ms), optionally
        only those with the given statuses (e.g. ``("late",)``: the late log)."""
        ...

    def decisions_at(self, partition: int, start: int, end: int) -> pa.Table:
        """Archived decisions of the log offsets ``[start, end)`` of ``partition``, in
        offset order: what a log repair rebuilds lost frames from."""
        ...

    def close(self) -> None: ...


class CorrectionReader(Protocol):
    """Read side of the keyed stage's corrections (``clickagg.core.corrections``), kept
    like the decisions: per keyed partition, exactly the corrections of ``[0, archived)``."""

    def archived_offsets(self) -> dict[int, int]:
        """Per keyed partition, the end of the keyed offsets whose corrections are published."""
        ...

    def corrections(self, event_id: str) -> list[Correction]:
        """Every published correction of the click ``event_id``, in source (partition,
        offset) order: per copy the stream counted, its correction, then any move of its
        reason to another rule, in the order they were made."""
        ...

    def close(self) -> None: ...
