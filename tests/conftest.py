"""Shared test helpers: building event frames the way the log would hold them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl
import pytest
from hypothesis import settings

from clickagg.core import ids
from clickagg.core.columns import ColumnBuilder, EventColumns, decode, encode, to_frame

# No per-example deadline: these 2-core machines run servers, Spark and benchmarks beside
# the tests, and a property test that took 280 ms once is not wrong. Timings are measured
# in bench/, never asserted here.
settings.register_profile("clickagg", deadline=None)
settings.load_profile("clickagg")


@dataclass(frozen=True)
class Ev:
    event_id: str
    ad_id: str
    ts_ms: int
    event_type: int = ids.CLICK
    user_id: str | None = None
    country: str | None = None
    device: str | None = None
    browser: str | None = None
    cost_micros: int = -1
    advertiser_id: str | None = None
    user_agent: str | None = None
    ip: str | None = None


def build_columns(events: Iterable[Ev], *, received_ms: int = 0) -> EventColumns:
    builder = ColumnBuilder()
    for ev in events:
        fp_high, fp_low = ids.fingerprint(ev.event_type, ev.event_id)
        builder.add(
            event_id=ev.event_id,
            fp_high=fp_high,
            fp_low=fp_low,
            event_type=ev.event_type,
            ts_ms=ev.ts_ms,
            received_ms=received_ms or ev.ts_ms,
            cost_micros=ev.cost_micros,
            user_hash=ids.user_hash(ev.user_id),
            ad_id=ev.ad_id,
            advertiser_id=ev.advertiser_id,
            campaign_id=None,
            user_id=ev.user_id,
            ip=ev.ip,
            user_agent=ev.user_agent,
            country=ev.country,
            device=ev.device,
            browser=ev.browser,
        )
    return builder.build()


def frame_of(events: Iterable[Ev], *, partition: int = 0, base_offset: int = 0) -> pl.DataFrame:
    """A frame of these events as the worker gets it: through the log's encoding."""
    payload = encode(build_columns(events))
    return to_frame(decode(payload), partition=partition, base_offset=base_offset)


@pytest.fixture
def make_frame() -> type:
    return Ev


@pytest.fixture(autouse=True)
def _no_hour_closer_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers a test starts do not close hours on their own schedule: a batch layer that
    turned an hour final mid-test would serve batch numbers where a test compares the
    stream's. Tests of the schedule turn it on (``CLICKAGG_CLOSE_INTERVAL``)."""
    monkeypatch.setenv("CLICKAGG_CLOSE_INTERVAL", "0")


@pytest.fixture(autouse=True)
def _short_worker_restart_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers a test starts restart a killed worker after 100 ms doubling to 400 ms, not
    0.5 s doubling to 5 s: the kill -9 runs kill it eight times in a row, and the default
    waits (27 s of such a run) check nothing those runs assert. The default backoff and its
    doubling are tests/runtime/test_supervisor.py's."""
    monkeypatch.setenv("CLICKAGG_WORKER_RESTART_BACKOFF", "100ms")
    monkeypatch.setenv("CLICKAGG_WORKER_RESTART_MAX_BACKOFF", "400ms")
