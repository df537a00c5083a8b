"""DuckDBStore against real DuckDB files: sums, sketches, fencing, atomicity, crash safety."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import datasketches
import duckdb
import polars as pl
import pyarrow as pa
import pytest

from clickagg.core import aggregate, hll, ids
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.store.base import AggregateRow, FencedError, KeyedCommit, PartitionCommit, Totals
from clickagg.store.duckdb_store import DuckDBStore

T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS  # a UTC midnight
CPC = {"ad1": 250, "ad2": 100}


@dataclass(frozen=True)
class Ev:
    ad_id: str
    ts_ms: int
    click: bool = True
    invalid: bool = False
    cost_micros: int = -1  # < 0: use the ad's CPC
    user: str | None = None
    country: str | None = "US"
    device: str | None = "mobile"
    browser: str | None = "chrome"
    advertiser: str | None = None
    campaign: str | None = None

    @property
    def spend(self) -> int:
        if not self.click or self.invalid:
            return 0
        return self.cost_micros if self.cost_micros >= 0 else CPC.get(self.ad_id, 0)


def frame(events: list[Ev]) -> pl.DataFrame:
    df = pl.DataFrame(
        {
            "ad_id": [e.ad_id for e in events],
            "ts_ms": [e.ts_ms for e in events],
            "event_type": [ids.CLICK if e.click else ids.IMPRESSION for e in events],
            "invalid": [e.invalid for e in events],
            "cost_micros": [e.cost_micros for e in events],
            "user_hash": pl.Series([ids.user_hash(e.user) for e in events], dtype=pl.UInt64),
            "user_id": pl.Series([e.user for e in events], dtype=pl.String),
            "country": [e.country for e in events],
            "device": [e.device for e in events],
            "browser": [e.browser for e in events],
            "advertiser_id": pl.Series([e.advertiser for e in events], dtype=pl.String),
            "campaign_id": pl.Series([e.campaign for e in events], dtype=pl.String),
        },
        schema_overrides={"ts_ms": pl.Int64, "cost_micros": pl.Int64, "event_type": pl.Int8},
    )
    return aggregate.with_minute_and_spend(df, CPC)


def make_commit(
    partition: int,
    from_offset: int,
    to_offset: int,
    events: list[Ev],
    *,
    late: int = 0,
    duplicates: int = 0,
) -> PartitionCommit:
    if events:
        df = frame(events)
        minute, dims = aggregate.round_deltas(df)
    else:
        minute = aggregate.MINUTE_SCHEMA.empty_table()
        dims = aggregate.empty_dimension_deltas()
    return PartitionCommit(
        partition=partition,
        from_offset=from_offset,
        to_offset=to_offset,
        minute_deltas=minute,
        dimension_deltas=dims,
        max_event_ms=max((e.ts_ms for e in events), default=T0),
        watermark_ms=max((e.ts_ms for e in events), default=T0) - MINUTE_MS,
        counted=len(events),
        duplicates=duplicates,
        late=late,
        invalid=sum(e.invalid for e in events),
        committed_at_ms=T0 + DAY_MS + to_offset,
    )


def expected_rows(
    events: list[Ev], ad_id: str, start: int, end: int, size: int, group_by: str | None
) -> list[AggregateRow]:
    """Brute force over the events (exact user counts: keep sets below hll.EXACT_UP_TO)."""
    acc: dict[tuple[int, str | None], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    users: dict[tuple[int, str | None], set[int]] = defaultdict(set)
    for e in events:
        window = e.ts_ms - e.ts_ms % size
        if e.ad_id != ad_id or not start <= window < end:
            continue
        key = (window, None if group_by is None else getattr(e, group_by) or "unknown")
        a = acc[key]
        a[0] += e.click and not e.invalid
        a[1] += not e.click
        a[2] += e.spend
        a[3] += e.click and e.invalid
        if e.user is not None:
            users[key].add(ids.user_hash(e.user))
    return [
        AggregateRow(
            window_ms=w,
            group=g,
            clicks=a[0],
            impressions=a[1],
            spend_micros=a[2],
            unique_users=len(users[(w, g)]),
            invalid_clicks=a[3],
        )
        for (w, g), a in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
    ]


OWNERS = {"ad1": ("advA", "c1"), "ad2": ("advA", "c2"), "ad3": ("advB", "c3")}


def random_events(rng: random.Random, n: int, span_ms: int) -> list[Ev]:
    return [
        Ev(
            ad_id=(ad := rng.choice(["ad1", "ad2", "ad3"])),
            ts_ms=T0 + rng.randrange(span_ms),
            click=rng.random() < 0.6,
            invalid=rng.random() < 0.1,
            cost_micros=rng.choice([-1, -1, 0, 37, 1000]),
            user=rng.choice([None, *(f"u{i}" for i in range(40))]),
            country=rng.choice(["US", "DE", None]),
            device=rng.choice(["mobile", "desktop"]),
            browser=rng.choice(["chrome", "firefox", None]),
            # an ad's owners are fixed; some events do not say (e.g. seed 001 shapes)
            advertiser=OWNERS[ad][0] if rng.random() < 0.8 else None,
            campaign=OWNERS[ad][1] if rng.random() < 0.8 else None,
        )
        for _ in range(n)
    ]


def snapshot(store: DuckDBStore) -> tuple[object, ...]:
    """Everything observable, to compare before and after a refused commit."""
    return (
        store.committed_offsets(),
        store.partition_status(),
        [
            store.aggregates(ad_id=ad, start_ms=T0, end_ms=T0 + DAY_MS, granularity=g, group_by=d)
            for ad in ("ad1", "ad2")
            for g in ("minute", "hour")
            for d in (None, "country")
        ],
        store.totals(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS),
        store.top_ads(start_ms=T0, end_ms=T0 + DAY_MS, limit=2),
        store.rollup(
            level="advertiser", id="advA", start_ms=T0, end_ms=T0 + DAY_MS, granularity="hour"
        ),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBStore]:
    s = DuckDBStore(tmp_path / "agg.duckdb")
    yield s
    s.close()


def test_queries_match_brute_force(store: DuckDBStore) -> None:
    rng = random.Random(7)
    events = random_events(rng, 600, 2 * DAY_MS)
    for i in range(0, 600, 150):  # four commits, some windows split across them
        store.commit(make_commit(0, i, i + 150, events[i : i + 150]))
    for granularity, size in (("minute", MINUTE_MS), ("hour", HOUR_MS), ("day", DAY_MS)):
        for group_by in (None, "country", "device", "browser"):
            for ad in ("ad1", "ad2", "nope"):
                got = store.aggregates(
                    ad_id=ad,
                    start_ms=T0,
                    end_ms=T0 + 2 * DAY_MS,
                    granularity=granularity,  # type: ignore[arg-type]
                    group_by=group_by,
                )
                assert got == expected_rows(events, ad, T0, T0 + 2 * DAY_MS, size, group_by)
    # A sub-range: windows starting in [start, end) only.
    got = store.aggregates(
        ad_id="ad1", start_ms=T0 + 3 * HOUR_MS, end_ms=T0 + 5 * HOUR_MS, granularity="hour"
    )
    assert [r.window_ms for r in got] == [T0 + 3 * HOUR_MS, T0 + 4 * HOUR_MS]
    assert got == expected_rows(events, "ad1", T0 + 3 * HOUR_MS, T0 + 5 * HOUR_MS, HOUR_MS, None)


def test_unaligned_bounds_give_whole_windows(store: DuckDBStore) -> None:
    events = [Ev("ad1", T0 + m * MINUTE_MS) for m in range(0, 180, 7)]
    store.commit(make_commit(0, 0, 1, events))
    got = store.aggregates(
        ad_id="ad1", start_ms=T0 + 30 * MINUTE_MS, end_ms=T0 + 150 * MINUTE_MS, granularity="hour"
    )
    # 00:00 starts before the range, 01:00 and 02:00 start inside and are whole.
    assert got == expected_rows(events, "ad1", T0 + HOUR_MS, T0 + 3 * HOUR_MS, HOUR_MS, None)
    minutes = store.aggregates(
        ad_id="ad1", start_ms=T0 + 1, end_ms=T0 + 8 * MINUTE_MS, granularity="minute"
    )
    assert [r.window_ms for r in minutes] == [T0 + 7 * MINUTE_MS]


def test_totals_over_ragged_ranges(store: DuckDBStore) -> None:
    rng = random.Random(3)
    events = random_events(rng, 400, 5 * HOUR_MS)
    store.commit(make_commit(0, 0, 400, events))
    assert store.totals(ad_id="zzz", start_ms=T0, end_ms=T0 + DAY_MS) == Totals(0, 0, 0, 0, 0)
    for _ in range(40):  # hour rows for whole hours plus minute rows at the edges
        start = T0 + rng.randrange(-HOUR_MS, 5 * HOUR_MS)
        end = start + rng.randrange(0, 5 * HOUR_MS)
        inside = [
            e for e in events if e.ad_id == "ad1" and start <= e.ts_ms - e.ts_ms % MINUTE_MS < end
        ]
        want = expected_rows(inside, "ad1", T0 - DAY_MS, T0 + DAY_MS, 2 * DAY_MS, None)
        got = store.totals(ad_id="ad1", start_ms=start, end_ms=end)
        if not want:
            assert got == Totals(0, 0, 0, 0, 0)
            continue
        w = want[0]
        assert got == Totals(
            w.clicks, w.impressions, w.spend_micros, w.unique_users, w.invalid_clicks
        )


def test_commits_to_one_minute_add_up_and_sketches_merge(store: DuckDBStore) -> None:
    a = [Ev("ad1", T0 + 5, user="alice"), Ev("ad1", T0 + 6, user="bob", click=False)]
    b = [Ev("ad1", T0 + 7, user="bob", cost_micros=9), Ev("ad1", T0 + 8, user="carol")]
    store.commit(make_commit(0, 0, 2, a))
    store.commit(make_commit(1, 0, 2, b))  # another partition, same (ad, minute)
    [row] = store.aggregates(ad_id="ad1", start_ms=T0, end_ms=T0 + MINUTE_MS, granularity="minute")
    assert (row.clicks, row.impressions, row.spend_micros, row.unique_users) == (3, 1, 509, 3)
    [by_country] = store.aggregates(
        ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="day", group_by="country"
    )
    assert (by_country.group, by_country.clicks, by_country.unique_users) == ("US", 3, 3)


def test_sketch_estimate_beyond_exact(store: DuckDBStore) -> None:
    users = [f"user-{i}" for i in range(4600)]
    offset = 0
    for chunk in range(10):  # users repeat across commits and minutes: duplicates must not count
        events = [
            Ev("ad1", T0 + ((i * 7 + chunk) % 300) * MINUTE_MS, user=u)
            for i, u in enumerate(users[chunk * 400 : chunk * 400 + 1000])
        ]
        store.commit(make_commit(0, offset, offset + len(events), events))
        offset += len(events)
    n_users = len(users)
    [day] = store.aggregates(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="day")
    total = store.totals(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS)
    # Merging is exact: same estimate as one sketch built from every user at once ...
    assert day.unique_users == total.unique_users == hll.estimate(reference_sketch(users))
    # ... and that estimate is within 3 standard errors of the truth.
    assert abs(day.unique_users - n_users) <= 3 * hll.RELATIVE_STANDARD_ERROR * n_users
    hours = store.aggregates(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="hour")
    assert len(hours) == 5 and all(h.unique_users > hll.EXACT_UP_TO for h in hours)


def reference_sketch(users: list[str]) -> bytes:
    """The sketch of ``users`` built directly, as Spark's hll_sketch_agg(user_id) would."""
    sketch = datasketches.hll_sketch(hll.LG_K, hll.TARGET)
    for user in users:
        sketch.update(user)
    return hll.union([sketch.serialize_updatable()])


@pytest.mark.parametrize("compact", [False, True])
def test_day_from_hours_counts_every_user_of_the_ad_once(tmp_path: Path, compact: bool) -> None:
    """Unique users of an ad's day, merged from its hour (and minute, delta) sketches, equal
    the estimate of one sketch of all its users; other ads' users do not leak in."""
    rng = random.Random(7)
    pool = [f"user-{i}" for i in range(6000)]
    seen: set[str] = set()
    with DuckDBStore(tmp_path / "day.duckdb") as store:
        offset = 0
        for round_ in range(12):
            events = []
            for _ in range(900):
                user = rng.choice(pool)
                ad = "ad1" if rng.random() < 0.8 else "ad2"
                if ad == "ad1":
                    seen.add(user)
                ts = T0 + rng.randrange(DAY_MS)
                events.append(Ev(ad, ts, user=user, country=rng.choice(["US", "DE"])))
            store.commit(make_commit(0, offset, offset + len(events), events))
            offset += len(events)
            if compact and round_ % 4 == 3:
                store.compact()
        want = hll.estimate(reference_sketch(sorted(seen)))
        [day] = store.aggregates(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="day")
        total = store.totals(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS)
        assert day.unique_users == total.unique_users == want
        assert abs(want - len(seen)) <= 3 * hll.RELATIVE_STANDARD_ERROR * len(seen)
        by_country = store.aggregates(
            ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="day", group_by="country"
        )
        assert sum(r.unique_users for r in by_country) >= want  # a user in two countries


def test_stored_sketches_are_datasketches_hll_bytes(store: DuckDBStore) -> None:
    users = [f"u{i}" for i in range(1000)]
    events = [Ev("ad1", T0 + (i % 3) * MINUTE_MS, user=u) for i, u in enumerate(users)]
    store.commit(make_commit(0, 0, 500, events[:500]))
    store.commit(make_commit(0, 500, 1000, events[500:]))
    store.compact()
    # A later event moves the watermark past those minutes: they are rolled up into hours.
    store.commit(make_commit(0, 1000, 1001, [Ev("ad2", T0 + 10 * MINUTE_MS)]))
    store.compact()
    blobs = [
        row[0]
        for table in ("agg_minute", "agg_hour", "agg_minute_country", "agg_hour_device")
        for row in store._fetch(f"SELECT users FROM {table} WHERE ad_id = 'ad1'")
    ]
    assert len(blobs) == 3 + 1 + 3 + 1
    for data in blobs:
        sketch = datasketches.hll_sketch.deserialize(data)
        assert sketch.lg_config_k == hll.LG_K and sketch.tgt_type == hll.TARGET
    [hour] = store._fetch("SELECT users FROM agg_hour WHERE ad_id = 'ad1'")
    assert hll.estimate(hour[0]) == hll.estimate(reference_sketch(users))


def test_fenced_commit_changes_nothing(store: DuckDBStore) -> None:
    store.commit(
        make_commit(
            0,
            0,
            3,
            random_events(random.Random(1), 3, HOUR_MS),
            late=1,
        )
    )
    before = snapshot(store)
    stale = make_commit(0, 1, 5, [Ev("ad1", T0)], late=2)
    with pytest.raises(FencedError):
        store.commit(stale)
    with pytest.raises(FencedError):  # a partition that never committed is at 0
        store.commit(make_commit(9, 4, 5, [Ev("ad1", T0)]))
    assert snapshot(store) == before
    store.commit(replace(stale, from_offset=3))  # the rightful owner continues
    assert store.committed_offsets() == {0: 5}
    assert store.partition_status()[0].late == 3


@pytest.mark.parametrize("breakage", ["dims_schema", "null_in_minute", "bad_offsets"])
def test_failed_commit_leaves_nothing_behind(store: DuckDBStore, breakage: str) -> None:
    store.commit(make_commit(0, 0, 1, [Ev("ad1", T0, user="x")]))
    before = snapshot(store)
    good = make_commit(
        0,
        1,
        3,
        [Ev("ad1", T0, user="y"), Ev("ad2", T0 + HOUR_MS)],
        late=1,
    )
    if breakage == "dims_schema":  # rejected after the minute upserts ran
        broken = good.dimension_deltas["country"].drop_columns(["country"])
        bad = replace(good, dimension_deltas={**good.dimension_deltas, "country": broken})
    elif breakage == "null_in_minute":  # a NOT NULL key, rejected inside the transaction
        nullable = pa.schema([f.with_nullable(True) for f in aggregate.MINUTE_SCHEMA])
        cols = good.minute_deltas.to_pydict()
        cols["ad_id"] = [None] * len(cols["ad_id"])
        bad = replace(good, minute_deltas=pa.table(cols, schema=nullable))
    else:  # rejected by the offset upsert itself, the very last statement
        bad = replace(good, watermark_ms=None)  # type: ignore[arg-type]
    with pytest.raises(duckdb.Error):
        store.commit(bad)
    assert snapshot(store) == before
    store.commit(good)  # the store is still usable and the batch applies once
    assert store.totals(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS).unique_users == 2


def test_empty_commit_and_duplicate_delta_keys(store: DuckDBStore) -> None:
    store.commit(make_commit(0, 0, 10, [], duplicates=10))
    assert store.committed_offsets() == {0: 10}
    delta = make_commit(0, 10, 11, [Ev("ad1", T0, user="a")])
    doubled = pa.concat_tables([delta.minute_deltas, delta.minute_deltas])
    store.commit(replace(delta, minute_deltas=doubled))  # one key twice in one delta
    [row] = store.aggregates(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="day")
    assert (row.clicks, row.unique_users) == (2, 1)


def test_persistence_and_status(tmp_path: Path) -> None:
    path = tmp_path / "p.duckdb"
    events = random_events(random.Random(5), 200, DAY_MS)
    with DuckDBStore(path) as s:
        s.commit(
            make_commit(
                2,
                0,
                100,
                events[:100],
                duplicates=4,
                late=3,
            )
        )
        s.commit(make_commit(0, 0, 50, events[100:150], duplicates=1))
        s.commit(
            make_commit(
                2,
                100,
                150,
                events[150:],
                duplicates=2,
            )
        )
        before = snapshot(s)
    with DuckDBStore(path) as s:  # reopen: schema creation is idempotent, data is there
        assert snapshot(s) == before
        assert s.committed_offsets() == {0: 50, 2: 150}
        status = s.partition_status()
        assert [p.partition for p in status] == [0, 2]
        p2 = status[1]
        assert (p2.committed_offset, p2.counted, p2.duplicates, p2.late) == (150, 150, 6, 3)
        assert p2.invalid == sum(e.invalid for e in events[:100] + events[150:])
        assert p2.committed_at_ms == T0 + DAY_MS + 150
        total = s.totals(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS)
        want = expected_rows(events, "ad1", T0, T0 + DAY_MS, DAY_MS, None)[0]
        assert (total.clicks, total.spend_micros) == (want.clicks, want.spend_micros)


def test_a_file_of_an_older_build_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # the per-key upserted layout of 0.1.0 builds
        con.execute("CREATE TABLE agg_minute_dims (ad_id VARCHAR, minute_ms BIGINT)")
    with pytest.raises(RuntimeError, match="older clickagg build"):
        DuckDBStore(path)


def test_rejects_unknown_group_and_granularity(store: DuckDBStore) -> None:
    with pytest.raises(ValueError):
        store.aggregates(
            ad_id="a",
            start_ms=0,
            end_ms=1,
            granularity="hour",
            group_by="ad_id; DROP TABLE agg_minute",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError):
        store.aggregates(ad_id="a", start_ms=0, end_ms=1, granularity="week")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.commit(make_commit(0, 5, 4, []))


def test_queries_run_while_commits_land(store: DuckDBStore) -> None:
    n_commits = 25
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(n_commits):
                ev = Ev("ad1", T0 + (i % 90) * MINUTE_MS, user=f"u{i}")
                store.commit(make_commit(0, i, i + 1, [ev]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def read() -> None:
        """Each commit adds one click and moves the offset by one in one transaction, so
        reads in this order can only see: totals <= the device breakdown <= the offset."""
        try:
            last, last_users = -1, -1
            while not done.is_set():
                t = store.totals(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS)
                assert t.clicks >= last and t.unique_users >= last_users
                last, last_users = t.clicks, t.unique_users
                rows = store.aggregates(
                    ad_id="ad1",
                    start_ms=T0,
                    end_ms=T0 + DAY_MS,
                    granularity="hour",
                    group_by="device",
                )
                assert {r.group for r in rows} <= {"mobile"}
                by_device = sum(r.clicks for r in rows)
                offset = store.committed_offsets().get(0, 0)
                assert t.clicks <= by_device <= offset <= n_commits
                time.sleep(0.002)  # an RPC server, not a busy loop: let the writer run
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(3)]
    threads.append(threading.Thread(target=write))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert store.totals(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS).clicks == n_commits
    assert store.committed_offsets() == {0: n_commits}


CRASH_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import pyarrow as pa
    from clickagg.core import aggregate, hll
    from clickagg.store.base import PartitionCommit
    from clickagg.store.duckdb_store import DuckDBStore

    def user_sketch(offset):
        return hll.sketches_by_group(np.zeros(1, np.int64), pa.array([f"u{offset}"]), 1)[0]

    store = DuckDBStore(sys.argv[1])
    offset = store.committed_offsets().get(0, 0)
    while True:
        measures = {"clicks": [1], "impressions": [0], "spend_micros": [10],
                    "invalid_clicks": [0], "users": [user_sketch(offset)]}
        key = {"ad_id": ["ad1"], "minute_ms": [offset % 7 * 60_000]}
        minute = pa.table(
            {**key, "advertiser_id": ["adv"], "campaign_id": ["c"], **measures},
            schema=aggregate.MINUTE_SCHEMA,
        )
        dims = {
            name: pa.table({**key, name: ["x"], **measures}, schema=schema)
            for name, schema in aggregate.DIMENSION_SCHEMAS.items()
        }
        store.commit(PartitionCommit(0, offset, offset + 1, minute, dims,
                                     0, 0, 1, 0, 0, 0, 0))
        offset += 1
        print(offset, flush=True)
    """
)


def test_kill_9_mid_commit_loses_or_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "crash.duckdb"
    last_printed = 0
    for round_ in range(2):  # the second round also checks recovery of a crashed file
        with subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(path)], stdout=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdout is not None
            target = last_printed + random.randint(20, 60)
            for line in proc.stdout:
                last_printed = int(line)
                if last_printed >= target:
                    break
            os.kill(proc.pid, signal.SIGKILL)  # likely mid-commit: it commits back to back
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"writer died on its own in round {round_}"
        with DuckDBStore(path) as s:
            committed = s.committed_offsets()[0]
            totals = s.totals(ad_id="ad1", start_ms=0, end_ms=DAY_MS)
            minute_sum = sum(
                r.clicks
                for r in s.aggregates(ad_id="ad1", start_ms=0, end_ms=DAY_MS, granularity="minute")
            )
            dims_sum = sum(
                r.clicks
                for r in s.aggregates(
                    ad_id="ad1", start_ms=0, end_ms=DAY_MS, granularity="day", group_by="country"
                )
            )
        assert committed >= last_printed
        assert totals.clicks == minute_sum == dims_sum == committed
        assert totals.spend_micros == 10 * committed
        if committed <= hll.EXACT_UP_TO:
            assert totals.unique_users == committed
        last_printed = committed


def test_commit_many_is_all_or_nothing_across_partitions(tmp_path: Path) -> None:
    """A fenced partition in a round leaves every partition of the round untouched."""
    with DuckDBStore(tmp_path / "many.duckdb") as store:
        store.commit_many([_one_click_commit(0, 0, 1), _one_click_commit(1, 0, 1)])
        assert store.committed_offsets() == {0: 1, 1: 1}
        with pytest.raises(FencedError) as raised:
            store.commit_many([_one_click_commit(0, 1, 2), _one_click_commit(1, 0, 1)])
        assert raised.value.partitions == (1,)
        assert store.committed_offsets() == {0: 1, 1: 1}
        assert store.totals(ad_id="ad", start_ms=0, end_ms=10**13).clicks == 2
        with pytest.raises(ValueError, match="twice"):
            store.commit_many([_one_click_commit(0, 1, 2), _one_click_commit(0, 2, 3)])


def _one_click_commit(partition: int, from_offset: int, to_offset: int) -> PartitionCommit:
    minute = pa.Table.from_pylist(
        [
            {
                "ad_id": "ad",
                "minute_ms": 60_000,
                "advertiser_id": "adv",
                "campaign_id": "unknown",
                "clicks": 1,
                "impressions": 0,
                "spend_micros": 0,
                "invalid_clicks": 0,
                "users": None,
            }
        ],
        schema=aggregate.MINUTE_SCHEMA,
    )
    return PartitionCommit(
        partition=partition,
        from_offset=from_offset,
        to_offset=to_offset,
        minute_deltas=minute,
        dimension_deltas=aggregate.empty_dimension_deltas(),
        max_event_ms=60_000,
        watermark_ms=0,
        counted=1,
        duplicates=0,
        late=0,
        invalid=0,
        committed_at_ms=0,
    )


def test_totals_without_users_skips_the_sketch_but_not_the_sums(tmp_path: Path) -> None:
    """The commit carries users (a sketch), so a skipped sketch shows: 2 users, then 0."""
    events = [
        Ev("ad", T0, user="u1", cost_micros=250),
        Ev("ad", T0 + 1_000, user="u2", cost_micros=250),
        Ev("ad", T0, click=False),
    ]
    with DuckDBStore(tmp_path / "t.duckdb") as store:
        store.commit(make_commit(0, 0, 3, events))
        full = store.totals(ad_id="ad", start_ms=0, end_ms=10**13)
        fast = store.totals(ad_id="ad", start_ms=0, end_ms=10**13, unique_users=False)
        assert (fast.clicks, fast.impressions, fast.spend_micros) == (
            full.clicks,
            full.impressions,
            full.spend_micros,
        )
        assert (full.clicks, full.impressions, full.unique_users) == (2, 1, 2)
        assert full.spend_micros == 500
        assert fast.unique_users == 0


def _keyed(k: int, lo: int, hi: int, spec: str, *, replay_from: int = 0) -> KeyedCommit:
    return KeyedCommit(
        keyed_partition=k,
        from_offset=lo,
        to_offset=hi,
        high_water={0: hi - 1},
        minute_deltas=aggregate.MINUTE_SCHEMA.empty_table(),
        dimension_deltas=aggregate.empty_dimension_deltas(),
        corrections=0,
        committed_at_ms=0,
        spec_json=spec,
        replay_from=replay_from,
    )


def test_keyed_specs_are_recorded_when_they_change_and_pruned_behind_the_replay(
    store: DuckDBStore,
) -> None:
    for lo, hi, spec in [(0, 5, "a"), (5, 9, "a"), (9, 12, "b"), (12, 20, "a")]:
        store.commit_keyed([_keyed(0, lo, hi, spec), _keyed(1, lo, hi, "a")])
    progress = store.keyed_progress()
    assert progress[0].specs == ((0, "a"), (9, "b"), (12, "a"))
    assert progress[1].specs == ((0, "a"),)
    with pytest.raises(FencedError):  # a fenced commit records no spec either
        store.commit_keyed([_keyed(0, 12, 25, "c")])
    assert store.keyed_progress()[0].specs == ((0, "a"), (9, "b"), (12, "a"))
    # The keyed log now starts at 10: the spec in force there (from 9) is kept, not before.
    store.commit_keyed([_keyed(0, 20, 25, "a", replay_from=10)])
    assert store.keyed_progress()[0].specs == ((9, "b"), (12, "a"))
    store.commit_keyed([_keyed(0, 25, 30, "a", replay_from=12)])
    assert store.keyed_progress()[0].specs == ((12, "a"),)
