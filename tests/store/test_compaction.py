"""Deltas and compaction: answers are exact before, during and after any compaction."""

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
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.store.base import AdTotals, PartitionCommit
from clickagg.store.duckdb_store import DuckDBStore
from tests.store.test_duckdb_store import (
    OWNERS,
    T0,
    Ev,
    expected_rows,
    make_commit,
    random_events,
)


def answers(store: DuckDBStore) -> tuple[object, ...]:
    """Every kind of answer the store gives, over the test data's range."""
    minute_rows = store.minute_rows_since(T0).sort_by(
        [("ad_id", "ascending"), ("minute_ms", "ascending")]
    )
    return (
        [
            store.aggregates(
                ad_id=ad,
                start_ms=T0,
                end_ms=T0 + 2 * DAY_MS,
                granularity=g,  # type: ignore[arg-type]
                group_by=d,  # type: ignore[arg-type]
            )
            for ad in ("ad1", "ad2")
            for g in ("minute", "hour", "day")
            for d in (None, "country", "device", "browser")
        ],
        [
            store.totals(ad_id="ad1", start_ms=lo, end_ms=hi)
            for lo, hi in ((T0, T0 + DAY_MS), (T0 + 17 * MINUTE_MS, T0 + 3 * HOUR_MS + 5))
        ],
        store.top_ads(start_ms=T0, end_ms=T0 + 2 * DAY_MS, by="spend_micros", limit=2),
        store.top_ads(start_ms=T0 + 30 * MINUTE_MS, end_ms=T0 + DAY_MS, advertiser_id="advA"),
        store.rollup(
            level="advertiser", id="advA", start_ms=T0, end_ms=T0 + DAY_MS, granularity="hour"
        ),
        store.rollup(
            level="campaign", id="c3", start_ms=T0, end_ms=T0 + DAY_MS, granularity="minute"
        ),
        minute_rows.to_pylist(),
    )


def delta_rows(store: DuckDBStore) -> int:
    return store.pending_delta_rows()


def test_compaction_changes_no_answer_and_empties_the_deltas(tmp_path: Path) -> None:
    events = random_events(random.Random(21), 900, 2 * DAY_MS)
    chunks = [events[i : i + 150] for i in range(0, 900, 150)]
    with DuckDBStore(tmp_path / "once.duckdb") as once:
        once.commit(make_commit(0, 0, 900, events))
        want = answers(once)
    with DuckDBStore(tmp_path / "agg.duckdb") as store:
        for i, chunk in enumerate(chunks[:4]):
            store.commit(make_commit(0, i * 150, i * 150 + 150, chunk))
        first = store.compact(max_seq=2)  # rounds 1 and 2 only
        assert first.cut_seq == 2 and first.delta_rows > 0
        assert delta_rows(store) > 0
        for i, chunk in enumerate(chunks[4:], start=4):
            store.commit(make_commit(0, i * 150, i * 150 + 150, chunk))
        assert answers(store) == want
        result = store.compact()
        assert result.cut_seq == 6
        assert delta_rows(store) == 0
        assert store.compact().delta_rows == 0  # nothing left: a no-op
        assert answers(store) == want
    with DuckDBStore(tmp_path / "agg.duckdb") as store:  # reopened: seq continues
        assert answers(store) == want
        assert delta_rows(store) == 0
        store.commit(make_commit(1, 0, 1, [Ev("ad1", T0)]))
        assert store.compact().cut_seq == 7
    for ad in ("ad1", "ad2", "ad3"):  # and against brute force, for good measure
        with DuckDBStore(tmp_path / "agg.duckdb") as store:
            got = store.aggregates(
                ad_id=ad, start_ms=T0, end_ms=T0 + 2 * DAY_MS, granularity="hour", group_by="device"
            )
        extra = [Ev("ad1", T0)] if ad == "ad1" else []
        assert got == expected_rows(events + extra, ad, T0, T0 + 2 * DAY_MS, HOUR_MS, "device")


def test_delta_tables_are_append_only_and_compaction_fills_the_bases(tmp_path: Path) -> None:
    path = tmp_path / "agg.duckdb"
    with DuckDBStore(path) as store:
        events = [Ev("ad1", T0 + 5, advertiser="advA", campaign="c1", country="DE")]
        store.commit(make_commit(0, 0, 1, events))
        store.commit(make_commit(0, 1, 2, events))
    with duckdb.connect(str(path)) as con:
        counts = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
            for t in ("delta_minute", "delta_country", "agg_minute", "agg_hour_country")
        }
        assert counts == {
            "delta_minute": 2,
            "delta_country": 2,
            "agg_minute": 0,
            "agg_hour_country": 0,
        }
        assert con.execute("SELECT list(seq ORDER BY seq) FROM delta_minute").fetchone() == (
            [1, 2],
        )
        indexes = con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name LIKE 'delta_%' "
            "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')"
        ).fetchone()
        assert indexes == (0,)
    with DuckDBStore(path) as store:
        store.compact()
    with duckdb.connect(str(path)) as con:
        assert con.execute("SELECT count(*) FROM delta_minute").fetchone() == (0,)
        assert con.execute(
            "SELECT ad_id, advertiser_id, campaign_id, clicks FROM agg_minute"
        ).fetchall() == [("ad1", "advA", "c1", 2)]
        # The minute is not final (the watermark is a minute before it): not in the hours yet.
        assert con.execute("SELECT count(*) FROM agg_hour").fetchone() == (0,)
    with DuckDBStore(path) as store:
        # An event 2 minutes later moves the watermark past the minute: it is rolled up.
        store.commit(make_commit(0, 2, 3, [Ev("ad2", T0 + 2 * MINUTE_MS)]))
        store.compact()
    with duckdb.connect(str(path)) as con:
        assert con.execute("SELECT count(*) FROM delta_minute").fetchone() == (0,)
        assert con.execute(
            "SELECT ad_id, advertiser_id, campaign_id, clicks FROM agg_hour"
        ).fetchall() == [("ad1", "advA", "c1", 2)]
        assert con.execute(
            "SELECT country, clicks FROM agg_minute_country WHERE ad_id = 'ad1'"
        ).fetchall() == [("DE", 2)]


def brute_top(events: list[Ev], start: int, end: int, advertiser: str | None) -> list[str]:
    clicks: dict[str, int] = defaultdict(int)
    for e in events:
        owner = e.advertiser or "unknown"
        if start <= e.ts_ms - e.ts_ms % MINUTE_MS < end and advertiser in (None, owner):
            clicks[e.ad_id] += e.click and not e.invalid
    return sorted(clicks, key=lambda ad: (-clicks[ad], ad))


def test_top_ads_and_rollups_match_brute_force(tmp_path: Path) -> None:
    rng = random.Random(5)
    events = random_events(rng, 500, DAY_MS)
    events += [Ev("ad4", T0 + rng.randrange(DAY_MS), user=f"u{i}") for i in range(30)]  # no owner
    with DuckDBStore(tmp_path / "agg.duckdb") as store:
        for i in range(0, len(events), 106):
            store.commit(make_commit(0, i, i + 106, events[i : i + 106]))
            if i == 318:
                store.compact()
        for start, end in ((T0, T0 + DAY_MS), (T0 + 61 * MINUTE_MS, T0 + 5 * HOUR_MS + 7)):
            top = store.top_ads(start_ms=start, end_ms=end, limit=3)
            assert [t.ad_id for t in top] == brute_top(events, start, end, None)[:3]
            for t in top:
                totals = store.totals(ad_id=t.ad_id, start_ms=start, end_ms=end)
                assert (t.clicks, t.spend_micros, t.unique_users) == (
                    totals.clicks,
                    totals.spend_micros,
                    totals.unique_users,
                )
                owners = OWNERS.get(t.ad_id, ("unknown", "unknown"))
                assert (t.advertiser_id, t.campaign_id) == owners
            of_a = store.top_ads(start_ms=start, end_ms=end, advertiser_id="advA", by="clicks")
            assert [t.ad_id for t in of_a] == brute_top(events, start, end, "advA")
        assert store.top_ads(start_ms=T0, end_ms=T0 + DAY_MS, limit=0) == []
        unknown = store.top_ads(start_ms=T0, end_ms=T0 + DAY_MS, advertiser_id="unknown")
        assert isinstance(unknown[0], AdTotals) and "ad4" in [t.ad_id for t in unknown]
        for level, owner, pick in (
            ("advertiser", "advA", lambda e: e.advertiser == "advA"),
            ("campaign", "c3", lambda e: e.campaign == "c3"),
        ):
            for granularity, size in (("minute", MINUTE_MS), ("hour", HOUR_MS), ("day", DAY_MS)):
                got = store.rollup(
                    level=level,  # type: ignore[arg-type]
                    id=owner,
                    start_ms=T0,
                    end_ms=T0 + DAY_MS,
                    granularity=granularity,  # type: ignore[arg-type]
                )
                # rows of the owner's events, whichever ad: relabel them as one ad
                mine = [
                    Ev("x", e.ts_ms, e.click, e.invalid, e.spend, e.user) for e in events if pick(e)
                ]
                assert got == expected_rows(mine, "x", T0, T0 + DAY_MS, size, None)
        with pytest.raises(ValueError):
            store.top_ads(start_ms=0, end_ms=1, by="ctr")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.rollup(level="ad", id="x", start_ms=0, end_ms=1, granularity="hour")  # type: ignore[arg-type]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**16),
    ops=st.lists(st.one_of(st.none(), st.integers(0, 8)), min_size=1, max_size=8),
)
def test_any_interleaving_of_commits_and_compactions_answers_the_same(
    seed: int, ops: list[int | None]
) -> None:
    """None commits the next chunk (partitions alternate); k compacts up to seq k (k = 8:
    everything). Answers are compared after every step with applying it all at once."""
    rng = random.Random(seed)
    applied: list[Ev] = []
    offsets = [0, 0]
    want: tuple[object, ...] | None = None  # the answers of ``applied`` at once
    with DuckDBStore(":memory:") as store:
        for step, op in enumerate(ops):
            if op is None:
                chunk = random_events(rng, rng.randrange(0, 40), 3 * HOUR_MS)
                part = step % 2
                store.commit(make_commit(part, offsets[part], offsets[part] + 1, chunk))
                offsets[part] += 1
                applied += chunk
                want = None
            else:
                store.compact(max_seq=None if op == 8 else op)
            if want is None:  # a compaction applies nothing new: the same answers
                with DuckDBStore(":memory:") as once:
                    if applied:
                        once.commit(make_commit(0, 0, 1, applied))
                    want = answers(once)
            assert answers(store) == want


def test_compaction_and_commits_from_two_threads(tmp_path: Path) -> None:
    """The worker's background compaction races its commits: nothing is lost or doubled."""
    events = random_events(random.Random(9), 2000, 6 * HOUR_MS)
    stop = threading.Event()
    errors: list[BaseException] = []
    with DuckDBStore(tmp_path / "agg.duckdb") as store:

        def compact() -> None:
            try:
                while not stop.is_set():
                    store.compact()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=compact)
        thread.start()
        try:
            for i in range(0, 2000, 50):
                store.commit(make_commit(0, i, i + 50, events[i : i + 50]))
        finally:
            stop.set()
            thread.join(timeout=60)
        assert not errors, errors
        got = store.aggregates(
            ad_id="ad2", start_ms=T0, end_ms=T0 + DAY_MS, granularity="hour", group_by="country"
        )
        assert got == expected_rows(events, "ad2", T0, T0 + DAY_MS, HOUR_MS, "country")


def test_deltas_of_minutes_already_rolled_up_reach_the_hours(tmp_path: Path) -> None:
    """Minutes before the watermark are rolled up into the hour tables; a delta that still
    arrives for such a minute goes into the minute and the hour tables at once."""
    rng = random.Random(4)
    early = random_events(rng, 200, HOUR_MS)
    later = [Ev("ad1", T0 + 3 * HOUR_MS, user="late-comer")]
    again = random_events(rng, 200, HOUR_MS)  # minutes rolled up already
    events = early + later + again
    with DuckDBStore(tmp_path / "agg.duckdb") as store:
        store.commit(make_commit(0, 0, 1, early))
        store.commit(make_commit(0, 1, 2, later))
        store.compact()
        [(rolled,)] = store._fetch("SELECT rolled_ms FROM delta_state")
        assert rolled == T0 + 3 * HOUR_MS - MINUTE_MS
        store.commit(make_commit(0, 2, 3, again))
        for compact in (False, True):
            if compact:
                store.compact()
            for ad in ("ad1", "ad2"):
                for gran, size in (("minute", MINUTE_MS), ("hour", HOUR_MS), ("day", DAY_MS)):
                    got = store.aggregates(
                        ad_id=ad,
                        start_ms=T0,
                        end_ms=T0 + DAY_MS,
                        granularity=gran,  # type: ignore[arg-type]
                        group_by="country",
                    )
                    assert got == expected_rows(events, ad, T0, T0 + DAY_MS, size, "country")
                want = expected_rows(events, ad, T0, T0 + DAY_MS, DAY_MS, None)[0]
                got_totals = store.totals(ad_id=ad, start_ms=T0, end_ms=T0 + DAY_MS)
                assert (got_totals.clicks, got_totals.unique_users) == (
                    want.clicks,
                    want.unique_users,
                )


def test_compaction_does_not_wait_for_the_commit_lock(tmp_path: Path) -> None:
    """Compaction never takes the commit lock: it completes while a commit holds it."""
    events = random_events(random.Random(3), 300, 2 * HOUR_MS)
    with DuckDBStore(tmp_path / "agg.duckdb") as store:
        store.commit(make_commit(0, 0, 1, events))
        done = threading.Event()
        with store._commit_lock:
            thread = threading.Thread(target=lambda: (store.compact(), done.set()))
            thread.start()
            assert done.wait(timeout=60), "compaction waited for the commit lock"
        thread.join()
        assert store.pending_delta_rows() == 0
        got = store.aggregates(ad_id="ad1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="hour")
        assert got == expected_rows(events, "ad1", T0, T0 + DAY_MS, HOUR_MS, None)


def test_commits_run_while_compactions_run(tmp_path: Path) -> None:
    """Commits of four partitions in one thread, compactions back to back in another, for a
    while: commits overlap open compaction transactions (no lock between them), no commit
    fails, and every answer is exact at the end."""
    rng = random.Random(11)
    n_rounds = 120
    rounds = [random_events(rng, rng.randrange(20, 80), 3 * HOUR_MS) for _ in range(n_rounds)]
    stop = threading.Event()
    errors: list[BaseException] = []
    compactions: list[tuple[float, float]] = []
    commits: list[tuple[float, float]] = []
    # Each round's commits are built first: built beside the compaction loop, their
    # frames waited for the GIL and took most of the test's time, overlapping nothing.
    offsets = [0, 0, 0, 0]
    batches = []
    for i, chunk in enumerate(rounds):
        parts = [(i + k) % 4 for k in range(2)]
        halves = (chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :])
        batch = []
        for p, h in zip(parts, halves, strict=True):
            batch.append(make_commit(p, offsets[p], offsets[p] + len(h), h))
            offsets[p] += len(h)
        batches.append(batch)
    with DuckDBStore(tmp_path / "agg.duckdb") as store:

        def compact() -> None:
            try:
                while not stop.is_set():
                    started = time.perf_counter()
                    if store.compact().delta_rows:
                        compactions.append((started, time.perf_counter()))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=compact)
        thread.start()
        try:
            for batch in batches:
                started = time.perf_counter()
                store.commit_many(batch)
                commits.append((started, time.perf_counter()))
        finally:
            stop.set()
            thread.join(timeout=120)
        assert not errors, errors
        overlapped = sum(any(c0 < k1 and k0 < c1 for c0, c1 in compactions) for k0, k1 in commits)
        assert compactions and overlapped > 0
        store.compact()
        assert store.pending_delta_rows() == 0
        events = [e for chunk in rounds for e in chunk]
        assert store.committed_offsets() == dict(enumerate(offsets))
        for ad in ("ad1", "ad2", "ad3"):
            for group_by, size, gran in (
                (None, MINUTE_MS, "minute"),
                ("country", HOUR_MS, "hour"),
                ("device", DAY_MS, "day"),
            ):
                got = store.aggregates(
                    ad_id=ad,
                    start_ms=T0,
                    end_ms=T0 + DAY_MS,
                    granularity=gran,  # type: ignore[arg-type]
                    group_by=group_by,  # type: ignore[arg-type]
                )
                assert got == expected_rows(events, ad, T0, T0 + DAY_MS, size, group_by)


def test_no_checkpoint_starts_inside_a_compaction_and_base_keys_stay_unique(
    tmp_path: Path,
) -> None:
    """DuckDB's automatic checkpoint (a commit taking the WAL past its limit) could start
    while a compaction's transaction was open, and the compaction's delete by rowid then
    left base rows beside their merged replacements: keys held twice, counted twice (seen
    at scale, reproduced with commits and compactions on two threads). The store turns
    the automatic checkpoint off and checkpoints after each compaction with commits held
    off: the WAL is folded into the file, and every base key has one row."""
    path = tmp_path / "agg.duckdb"
    with DuckDBStore(path) as store:
        [(limit,)] = store._fetch("SELECT current_setting('wal_autocheckpoint')")
        assert str(limit).endswith(("GiB", "TiB")), limit  # never by WAL size (1 TB)
        stop = threading.Event()

        def compact() -> None:
            while not stop.is_set():
                store.compact()

        thread = threading.Thread(target=compact)
        thread.start()
        try:
            for index in range(12):
                store.commit(round_commit(index))
        finally:
            stop.set()
            thread.join(timeout=120)
        store.compact()
        for table, key in (
            ("agg_minute", "ad_id, minute_ms, advertiser_id, campaign_id"),
            ("agg_hour", "ad_id, hour_ms, advertiser_id, campaign_id"),
            ("agg_minute_country", "ad_id, minute_ms, country"),
            ("agg_hour_device", "ad_id, hour_ms, device"),
        ):
            [(twice,)] = store._fetch(
                f"SELECT count(*) FROM (SELECT count(*) AS n FROM {table} GROUP BY {key} "
                "HAVING n > 1)"
            )
            assert twice == 0, table
        got = crash_answers(store)
    wal = Path(f"{path}.wal")
    assert not wal.exists() or wal.stat().st_size < 1_000_000  # checkpointed as it went
    with DuckDBStore(tmp_path / "reference.duckdb") as reference:
        for index in range(12):
            reference.commit(round_commit(index))
        assert crash_answers(reference) == got


CRASH_COMPACTOR = textwrap.dedent(
    """
    import sys, time
    from clickagg.store.duckdb_store import DuckDBStore
    from tests.store.test_compaction import round_commit

    store = DuckDBStore(sys.argv[1])
    offset = store.committed_offsets().get(0, 0)
    while True:
        for _ in range(8):  # a big delta set: 8 rounds of a few thousand rows each
            store.commit(round_commit(offset))
            offset += 1
        print("compacting", store.pending_delta_rows(), flush=True)
        started = time.perf_counter()
        store.compact()
        print("compacted", time.perf_counter() - started, flush=True)
    """
)


def round_events(index: int) -> list[Ev]:
    """The events of round ``index``: deterministic, so a reference can be rebuilt."""
    rng = random.Random(index)
    return [
        Ev(
            f"ad{rng.randrange(300)}",
            T0 + rng.randrange(4 * HOUR_MS),
            click=rng.random() < 0.5,
            user=f"u{rng.randrange(5000)}",
            country=rng.choice(["US", "DE", "FR", "JP"]),
            device=rng.choice(["mobile", "desktop"]),
            advertiser=f"adv{index % 3}",
        )
        for _ in range(1500)
    ]


def round_commit(index: int) -> PartitionCommit:
    return make_commit(0, index, index + 1, round_events(index))


def crash_answers(store: DuckDBStore) -> tuple[object, ...]:
    ads = [f"ad{i}" for i in range(0, 300, 37)]
    return (
        [store.totals(ad_id=ad, start_ms=T0, end_ms=T0 + DAY_MS) for ad in ads],
        [
            store.aggregates(ad_id=ad, start_ms=T0, end_ms=T0 + DAY_MS, granularity=g, group_by=d)
            for ad in ads[:3]
            for g, d in (("minute", None), ("hour", "country"), ("day", "device"))
        ],
        store.top_ads(start_ms=T0, end_ms=T0 + DAY_MS, limit=5),
        store.rollup(
            level="advertiser", id="adv1", start_ms=T0, end_ms=T0 + DAY_MS, granularity="hour"
        ),
        store.minute_rows_since(0).num_rows > 0,
    )


def test_kill_9_mid_compaction_loses_or_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "crash.duckdb"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    kills_while_compacting = 0
    compaction_s = 0.2
    # The reference: the same rounds committed in order, without compactions or kills; each
    # crash round adds the rounds the crashed file has committed since the one before.
    with DuckDBStore(tmp_path / "reference.duckdb") as reference:
        referenced = 0
        for round_ in range(3):  # later rounds also recover a crashed file
            with subprocess.Popen(
                [sys.executable, "-c", CRASH_COMPACTOR, str(path)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            ) as proc:
                assert proc.stdout is not None
                compactions = 0
                for line in proc.stdout:
                    word, value = line.split()
                    if word == "compacted":
                        compaction_s = float(value)
                        compactions += 1
                    elif compactions >= 1:  # it is compacting now: kill it part-way through
                        time.sleep(random.uniform(0, compaction_s))
                        os.kill(proc.pid, signal.SIGKILL)
                        kills_while_compacting += 1
                        break
                proc.wait()
            assert proc.returncode == -signal.SIGKILL, f"the compactor died on its own ({round_})"
            with DuckDBStore(path) as store:
                committed = store.committed_offsets()[0]
                got = crash_answers(store)
            assert committed >= referenced  # nothing committed is lost to a later crash
            for index in range(referenced, committed):
                reference.commit(round_commit(index))
            referenced = committed
            assert crash_answers(reference) == got, f"round {round_}: {committed} rounds"
    assert kills_while_compacting == 3
