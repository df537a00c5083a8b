"""One contract per role, run over every adapter the registry lists.

A new adapter (JetStream, PostgreSQL, Redis, object storage) is added to
``clickagg.runtime.roles`` and from then on must pass these: they use the roles'
Protocols and the registry's factories only, never an adapter's own API.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from clickagg.archive.base import ArchiveGapError
from clickagg.config import Settings
from clickagg.core import aggregate, columns, ids
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.runtime import roles
from clickagg.store.base import FencedError, PartitionCommit
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
