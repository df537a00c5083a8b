"""Events with an ip and a user agent, as the log holds them and as the archive does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from clickagg.core import ids
from clickagg.core.columns import ColumnBuilder, decode, encode, to_frame

T0 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000  # a whole minute


@dataclass(frozen=True)
class Hit:
    user_agent: str | None = None
    ip: str | None = None
    event_type: int = ids.CLICK
    ts_ms: int = T0


def log_frame(hits: Sequence[Hit], *, base_offset: int = 0) -> pl.DataFrame:
    """The events as the worker reads them from the log (``event_type`` a code)."""
    builder = ColumnBuilder()
    for i, hit in enumerate(hits):
        event_id = f"e{base_offset + i}"
        fp_high, fp_low = ids.fingerprint(hit.event_type, event_id)
        builder.add(
            event_id=event_id,
            fp_high=fp_high,
            fp_low=fp_low,
            event_type=hit.event_type,
            ts_ms=hit.ts_ms,
            received_ms=hit.ts_ms,
            cost_micros=1000,
            user_hash=0,
            ad_id="ad",
            advertiser_id=None,
            campaign_id=None,
            user_id=None,
            ip=hit.ip,
            user_agent=hit.user_agent,
            country=None,
            device=None,
            browser=None,
        )
    return to_frame(decode(encode(builder.build())), partition=0, base_offset=base_offset)
