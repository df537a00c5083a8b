"""Real-time counters as a Protocol: a second fenced sink of the round commit.

They hold only what the store has committed: the worker applies a round's deltas after the
store's transaction, with the round's offsets ``{partition: (from, to)}``. The counters
keep the offset each partition is applied up to, so applying is fenced and idempotent,
exactly like the store's commit: a round they already hold is ignored (a redo after a
crash between the two sinks never doubles a count) and a round that does not continue
their offsets is refused with FencedError (a gap would lose counts). The in-process
adapter starts empty and is refilled from the store's minute rows at the store's offsets;
a durable adapter (Redis) keeps its offsets and is brought up to the store's by the
worker's recovery replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import pyarrow as pa

from clickagg.store.base import Totals


class RealtimeCounters(Protocol):
    retain_ms: int  # how far back (event time) windows can be answered

    def apply(self, minute_deltas: pa.Table, offsets: Mapping[int, tuple[int, int]]) -> bool:
        """Add a committed round's deltas (``clickagg.core.aggregate.MINUTE_SCHEMA``, or at
        least its sums) for the offset ranges ``offsets``. Returns False, changing nothing,
        when every range is already applied; raises FencedError when a range does not start
        at its partition's applied offset (a partition never applied accepts any start)."""
        ...

    def applied_offsets(self) -> dict[int, int]:
        """Per partition, the offset the counters hold every committed delta up to."""
        ...

    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        """Sums over minutes in [start_ms, end_ms) within the retained span; unique users
        are not kept here (0)."""
        ...
