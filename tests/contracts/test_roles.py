"""One contract per role, run over every adapter the registry lists.

A new adapter (JetStream, PostgreSQL, Redis, object storage) is added to
``clickagg.runtime.roles`` and from then on must pass these: they use the roles'
Protocols and the registry's factories only, never an adapter's own API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from clickagg.archive.base import ArchiveGapError
from clickagg.clock import SystemClock
from clickagg.config import Settings
from clickagg.core import aggregate, columns, ids
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.query.base import QueryStore, StoreUnavailable, Totals
from clickagg.realtime.feed import FeedServer, PublishingCounters
from clickagg.realtime.memory import InMemoryCounters
from clickagg.runtime import roles
from clickagg.runtime.worker import feed_snapshot, refill_counters
from clickagg.store.base import FencedError, PartitionCommit
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.store.rpc import QueryServer
from tests.conftest import Ev, build_columns, frame_of

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS


def settings_for(tmp_path: Path, **backends: str) -> Settings:
    return Settings(
        data_dir=tmp_path,
        partitions=2,
        archive_flush_events=1_000_000,
        archive_flush_interval_ms=3_600_000,
        **backends,
    )


# -- log ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(roles.LOG_WRITERS))
def test_log_offsets_count_events_and_only_durable_frames_are_read(
    tmp_path: Path, backend: str
) -> None:
    settings = settings_for(tmp_path, log_backend=backend)
    writer = roles.log_writer(settings)
    reader = roles.log_reader(settings)
    try:
        three = build_columns([Ev(f"e{n}", "ad", T0) for n in range(3)])
        two = build_columns([Ev(f"f{n}", "ad", T0) for n in range(2)])
        assert writer.append(1, columns.encode(three), 3) == 0
        assert writer.append(1, columns.encode(two), 2) == 3
        assert reader.durable_end(1) == 0 and reader.read(1, 0, 10) == []  # not synced yet
        writer.sync()
        assert reader.durable_end(1) == 5 and reader.durable_end(0) == 0
        frames = reader.read(1, 3, 10)
        assert [(f.base_offset, f.count) for f in frames][-1] == (3, 2)
        assert reader.start_offset(1) == 0
    finally:
        reader.close()
        writer.close()


# -- commit store ---------------------------------------------------------------------


def commit_of(partition: int, start: int, events: list[Ev]) -> PartitionCommit:
    frame = frame_of(events, partition=partition, base_offset=start)
    kept = aggregate.with_minute_and_spend(frame.with_columns(invalid=pl.lit(False)), {})
    minute, dimensions = aggregate.round_deltas(kept)
    return PartitionCommit(
        partition=partition,
        from_offset=start,
        to_offset=start + len(events),
        minute_deltas=minute,
        dimension_deltas=dimensions,
        max_event_ms=T0,
        watermark_ms=T0 - 5 * MINUTE_MS,
        counted=len(events),
        duplicates=0,
        late=0,
        invalid=0,
        committed_at_ms=T0,
    )


@pytest.mark.parametrize("backend", sorted(roles.COMMIT_STORES))
def test_commit_store_applies_a_round_once_and_fences_stale_owners(
    tmp_path: Path, backend: str
) -> None:
    store = roles.commit_store(settings_for(tmp_path, store_backend=backend))
    try:
        first = [commit_of(0, 0, [Ev("a", "ad1", T0)]), commit_of(1, 0, [Ev("b", "ad1", T0)])]
        store.commit_many(first)
        assert store.committed_offsets() == {0: 1, 1: 1}
        with pytest.raises(FencedError):  # the same round again: both offsets moved on
            store.commit_many(first)
        with pytest.raises(FencedError):  # all or nothing: partition 1 is stale
            store.commit_many([commit_of(0, 1, [Ev("c", "ad1", T0)]), first[1]])
        store.commit_many([commit_of(0, 1, [Ev("c", "ad1", T0, ids.IMPRESSION)])])
        [row] = store.aggregates(ad_id="ad1", start_ms=T0, end_ms=T0 + HOUR_MS, granularity="hour")
        assert (row.clicks, row.impressions) == (2, 1)
        assert store.committed_offsets() == {0: 2, 1: 1}
    finally:
        store.close()


# -- real-time counters ---------------------------------------------------------------


def minute_rows(clicks: int) -> pa.Table:
    return pa.table(
        {
            "ad_id": ["ad"],
            "minute_ms": [T0],
            "clicks": [clicks],
            "impressions": [0],
            "spend_micros": [0],
            "invalid_clicks": [0],
        }
    )


@pytest.mark.parametrize("backend", sorted(roles.COUNTERS))
def test_counters_apply_is_fenced_and_idempotent(tmp_path: Path, backend: str) -> None:
    counters = roles.counters(settings_for(tmp_path, counters_backend=backend))
    assert counters.apply(minute_rows(2), {0: (0, 5)})
    assert not counters.apply(minute_rows(2), {0: (0, 5)})  # a redo
    with pytest.raises(FencedError):
        counters.apply(minute_rows(1), {0: (7, 9)})  # a gap
    assert counters.apply(minute_rows(1), {0: (5, 9), 1: (0, 1)})
    assert counters.window(ad_id="ad", start_ms=T0, end_ms=T0 + MINUTE_MS).clicks == 3
    assert counters.applied_offsets() == {0: 9, 1: 1}
    assert counters.retain_ms >= HOUR_MS  # the longest sliding window the API serves


# -- archive --------------------------------------------------------------------------


def decisions(partition: int, start: int, count: int) -> pa.Table:
    event_ids = [f"d{partition}-{o}" for o in range(start, start + count)]
    fps = [ids.fingerprint(ids.CLICK, e) for e in event_ids]
    rows = {f.name: [None] * count for f in DECISION_SCHEMA}
    rows.update(
        partition=[partition] * count,
        offset=list(range(start, start + count)),
        event_id=event_ids,
        event_type=["click"] * count,
        status=["counted"] * count,
        ad_id=["ad"] * count,
        ts_ms=[T0] * count,
        received_ms=[T0] * count,
        spend_micros=[0] * count,
        fp_high=[h for h, _ in fps],
        fp_low=[lo for _, lo in fps],
    )
    return pa.table(rows, schema=DECISION_SCHEMA)


@pytest.mark.parametrize("backend", sorted(roles.ARCHIVE_WRITERS))
def test_archive_publishes_each_decision_once_and_finds_it_by_id(
    tmp_path: Path, backend: str
) -> None:
    settings = settings_for(tmp_path, archive_backend=backend)
    writer = roles.archive_writer(settings)
    reader = roles.archive_reader(settings)
    try:
        writer.append(
            pa.concat_tables([decisions(0, 0, 4), decisions(1, 0, 2)]), {0: (0, 4), 1: (0, 2)}
        )
        writer.maybe_flush()  # neither enough events nor old enough: nothing published
        assert reader.archived_offsets() == {}
        writer.flush()
        assert reader.archived_offsets() == {0: 4, 1: 2}
        writer.append(decisions(0, 2, 4), {0: (2, 6)})  # 2, 3 again (a redo): dropped
        with pytest.raises(ArchiveGapError):
            writer.append(decisions(1, 5, 1), {1: (5, 6)})
        assert writer.next_offset(0) == 6 and writer.next_offset(1) == 2
        writer.flush()
        table = reader.decisions(start_ms=T0, end_ms=T0 + HOUR_MS)
        located = zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True)
        assert sorted(located) == [
            *((0, o) for o in range(6)),
            *((1, o) for o in range(2)),
        ]
        [fate] = reader.fates("d0-5")
        assert (fate.partition, fate.offset, fate.status) == (0, 5, "counted")
        assert reader.decisions(start_ms=T0, end_ms=T0 + HOUR_MS, statuses=("late",)).num_rows == 0
    finally:
        writer.close()
        reader.close()


def test_unknown_backends_are_named(tmp_path: Path) -> None:
    for field, role in (("log_backend", "log"), ("store_backend", "store")):
        bad = dataclasses.replace(settings_for(tmp_path), **{field: "nope"})
        with pytest.raises(ValueError, match=f"unknown {role} backend 'nope': choose one of"):
            roles.check(bad)


# -- query store ----------------------------------------------------------------------


class EmbeddedServing:
    """What serves the embedded ``duckdb`` query store: the worker process's query server
    and feed over its store and counters (``clickagg.runtime.worker``), started, stopped
    and restarted here as a worker is. A backend whose queries need no server beside the
    commit store (PostgreSQL) would serve with a no-op."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: DuckDBStore | None = None

    def start(self) -> None:
        settings = self.settings
        self.store = store = roles.commit_store(settings)
        inner = refill_counters(roles.counters(settings), store, now_ms=SystemClock().now_ms())
        assert isinstance(inner, InMemoryCounters)
        self.counters = PublishingCounters(
            inner,
            snapshot=functools.partial(
                feed_snapshot, store, SystemClock(), hours_ms=settings.replica_hours_ms
            ),
        )
        self.feed = FeedServer(settings.feed_socket, self.counters)
        self.server = QueryServer(settings.rpc_socket, store, self.counters)
        self.server.start()
        self.feed.start()

    def commit(self, commits: list[PartitionCommit]) -> None:
        """A worker round: the fenced store commit, then the counters with its offsets."""
        assert self.store is not None
        self.store.commit_many(commits)
        minute = pa.concat_tables([c.minute_deltas for c in commits])
        self.counters.apply(minute, {c.partition: (c.from_offset, c.to_offset) for c in commits})

    def stop(self) -> None:
        assert self.store is not None
        self.server.stop()
        self.feed.stop()
        self.store.close()
        self.store = None


SERVING = {"duckdb": EmbeddedServing}


def test_every_query_store_has_its_serving_side_here() -> None:
    assert set(SERVING) == set(roles.QUERY_STORES)


def expected_totals(events: list[Ev]) -> Totals:
    clicks = [e for e in events if e.event_type == ids.CLICK]
    return Totals(
        clicks=len(clicks),
        impressions=len(events) - len(clicks),
        spend_micros=sum(e.cost_micros for e in clicks),
        unique_users=len({e.user_id for e in events if e.user_id}),
        invalid_clicks=0,
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """The replica follows the feed: what a round committed shows within moments."""
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("backend", sorted(roles.QUERY_STORES))
def test_query_store_answers_what_was_committed_and_survives_a_restart(
    tmp_path: Path, backend: str
) -> None:
    """Recent minutes (which the embedded adapter answers from its replica) and old ones
    (from the store) alike; a new round shows; after a restart of the serving side every
    query answers, on connections opened before it too; while it is down, a query is a
    StoreUnavailable at worst, never another error."""
    settings = settings_for(tmp_path, store_backend=backend)
    recent = (int(time.time() * 1000) // MINUTE_MS - 2) * MINUTE_MS
    hour = recent - recent % HOUR_MS
    spans = {"old": (T0, T0 + HOUR_MS), "recent": (hour, hour + HOUR_MS)}

    def events_at(t: int, tag: str) -> list[Ev]:
        return [
            Ev(f"{tag}1", "ad1", t + 1_000, user_id="u1", country="US", cost_micros=300),
            Ev(f"{tag}2", "ad1", t + 2_000, user_id="u2", country="DE", cost_micros=500),
            Ev(f"{tag}3", "ad1", t + 3_000, ids.IMPRESSION, user_id="u1", country="US"),
        ]

    by_span = {"old": events_at(T0, "o"), "recent": events_at(recent, "r")}
    later = [Ev("late1", "ad1", recent + 4_000, user_id="u3", country="US", cost_micros=200)]
    serving = SERVING[backend](settings)
    serving.start()
    serving.commit([commit_of(0, 0, by_span["old"]), commit_of(1, 0, by_span["recent"])])

    async def matches(queries: QueryStore, span: str, events: list[Ev]) -> bool:
        start, end = spans[span]
        want = expected_totals(events)
        if await queries.totals(ad_id="ad1", start_ms=start, end_ms=end) != want:
            return False
        [hour_row] = await queries.aggregates(
            ad_id="ad1", start_ms=start, end_ms=end, granularity="hour"
        )
        minutes = await queries.aggregates(
            ad_id="ad1", start_ms=start, end_ms=end, granularity="minute"
        )
        by_country = await queries.aggregates(
            ad_id="ad1", start_ms=start, end_ms=end, granularity="hour", group_by="country"
        )
        # The real-time counters hold the last hour or so (a sliding window's span).
        window = await queries.window(ad_id="ad1", start_ms=start, end_ms=end)
        in_window = (window.clicks, window.spend_micros)
        countries = {e.country for e in events}
        return (
            (hour_row.window_ms, hour_row.clicks, hour_row.unique_users)
            == (start, want.clicks, want.unique_users)
            and [(m.window_ms, m.clicks, m.impressions) for m in minutes]
            == [(events[0].ts_ms - events[0].ts_ms % MINUTE_MS, want.clicks, want.impressions)]
            and {(r.group, r.clicks) for r in by_country}
            == {
                (c, sum(e.country == c and e.event_type == ids.CLICK for e in events))
                for c in countries
            }
            and in_window == ((want.clicks, want.spend_micros) if span == "recent" else (0, 0))
        )

    async def eight_old_totals(queries: QueryStore) -> list[Totals | BaseException]:
        span = {"ad_id": "ad1", "start_ms": spans["old"][0], "end_ms": spans["old"][1]}
        return await asyncio.gather(
            *(queries.totals(**span) for _ in range(8)), return_exceptions=True
        )

    async def scenario() -> None:
        queries = roles.query_store(settings)
        await queries.start()
        try:
            await eventually(queries.ping)
            for span, events in by_span.items():
                await eventually(functools.partial(matches, queries, span, events))
            top = await queries.top_ads(start_ms=T0, end_ms=hour + HOUR_MS)
            assert [(t.ad_id, t.clicks) for t in top] == [("ad1", 4)]
            statuses = await queries.partition_status()
            assert {(s.partition, s.committed_offset) for s in statuses} == {(0, 3), (1, 3)}

            serving.commit([commit_of(1, 3, later)])  # a new round shows
            recent_now = [*by_span["recent"], *later]
            await eventually(functools.partial(matches, queries, "recent", recent_now))

            # Eight at once, so that an adapter with a pool holds several connections;
            # then a quick restart (the supervisor's): every query answers.
            old = expected_totals(by_span["old"])
            assert await eight_old_totals(queries) == [old] * 8
            serving.stop()
            serving.start()
            assert await eight_old_totals(queries) == [old] * 8

            # Down for a while: StoreUnavailable at worst; then back, the same answers.
            serving.stop()
            for answer in await eight_old_totals(queries):
                assert isinstance(answer, StoreUnavailable) or answer == old, answer
            assert await queries.ping() is False
            serving.start()
            await eventually(queries.ping)
            await eventually(functools.partial(matches, queries, "old", by_span["old"]))
            await eventually(functools.partial(matches, queries, "recent", recent_now))
        finally:
            await queries.close()

    try:
        asyncio.run(scenario())
    finally:
        if serving.store is not None:
            serving.stop()
