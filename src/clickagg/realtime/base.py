"""Real-time counters as a Protocol: fed with committed minute deltas, read by windows.

They hold only what the store has committed (the worker applies a round's deltas after
its transaction), so they never show a count the store would not; after a restart they
are refilled from the store's recent minute rows.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from clickagg.store.base import Totals


class RealtimeCounters(Protocol):
    def apply(self, minute_deltas: pa.Table) -> None:
        """Add committed deltas (``clickagg.core.aggregate.MINUTE_SCHEMA``)."""
        ...

    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        """Sums over minutes in [start_ms, end_ms) within the retained span; unique users
        are not kept here (0)."""
        ...
