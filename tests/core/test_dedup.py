"""IdSet: exact 128-bit membership in minute buckets, against a plain Python set."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core.dedup import IdSet

M = 60_000
U64_MAX = 2**64 - 1


def arrays(
    items: list[tuple[int, int, int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = np.array([i[0] for i in items], dtype=np.uint64)
    lo = np.array([i[1] for i in items], dtype=np.uint64)
    m = np.array([i[2] for i in items], dtype=np.int64)
    return h, lo, m


def reference(seen: set[tuple[int, int]], items: list[tuple[int, int, int]]) -> list[bool]:
    out = []
    for h, lo, _ in items:
        out.append((h, lo) in seen)
        seen.add((h, lo))
    return out


# Small value pools (including the extremes of uint64) so that equal highs with different
# lows, and exact repeats, are frequent.
HIGHS = st.sampled_from([0, 1, 2, 7, 2**63, U64_MAX - 1, U64_MAX])
LOWS = st.sampled_from([0, 1, 5, 2**63 - 1, 2**63, U64_MAX])
ITEM = st.tuples(HIGHS, LOWS, st.integers(0, 4).map(lambda k: k * M))


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(ITEM, max_size=120),
    cuts=st.lists(st.integers(0, 120), max_size=12),
)
def test_matches_python_set_for_any_split(
    items: list[tuple[int, int, int]], cuts: list[int]
) -> None:
    bounds = sorted({0, len(items), *(c for c in cuts if c <= len(items))})
    s, seen = IdSet(), set[tuple[int, int]]()
    for a, b in itertools.pairwise(bounds):
        chunk = items[a:b]
        got = s.check_and_add(*arrays(chunk))
        assert got.dtype == np.bool_
        assert got.tolist() == reference(seen, chunk)
        assert len(s) == len(seen)
        assert s.nbytes == 16 * len(seen)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    high_range=st.sampled_from([1, 3, 50, 2**64 - 1]),
    calls=st.integers(1, 40),
)
def test_many_calls_exercise_run_merges(seed: int, high_range: int, calls: int) -> None:
    """Enough calls per bucket to build and merge several runs, with crafted high ties."""
    rng = np.random.default_rng(seed)
    s, seen = IdSet(), set[tuple[int, int]]()
    for _ in range(calls):
        n = int(rng.integers(0, 300))
        h = rng.integers(0, high_range, n, dtype=np.uint64, endpoint=True)
        lo = rng.integers(0, 400, n, dtype=np.uint64)
        m = rng.integers(0, 3, n).astype(np.int64) * M
        items = list(zip(h.tolist(), lo.tolist(), m.tolist(), strict=True))
        assert s.check_and_add(h, lo, m).tolist() == reference(seen, items)
    assert len(s) == len(seen)


def test_equal_high_different_low_are_distinct() -> None:
    s = IdSet()
    h = np.array([42, 42, 42, 42, 43], dtype=np.uint64)
    lo = np.array([9, 3, 9, 7, 3], dtype=np.uint64)
    m = np.zeros(5, dtype=np.int64)
    assert s.check_and_add(h, lo, m).tolist() == [False, False, True, False, False]
    # Same highs again, across calls: only exact (high, low) pairs are duplicates, whether
    # the low sits left, right or between the held lows of that high.
    h2 = np.array([42, 42, 42, 42, 42, 43, 43], dtype=np.uint64)
    lo2 = np.array([1, 3, 5, 8, 10, 3, 9], dtype=np.uint64)
    got = s.check_and_add(h2, lo2, np.full(7, M, dtype=np.int64))
    assert got.tolist() == [False, True, False, False, False, True, False]
    # Equal low, different high: also distinct.
    got = s.check_and_add(
        np.array([44], dtype=np.uint64), np.array([9], dtype=np.uint64), np.zeros(1, np.int64)
    )
    assert got.tolist() == [False]
    assert len(s) == 10


def test_first_occurrence_wins_within_a_call() -> None:
    s = IdSet()
    h = np.array([5, 1, 5, 5, 1], dtype=np.uint64)
    lo = np.array([5, 1, 5, 6, 1], dtype=np.uint64)
    m = np.array([0, M, 2 * M, 3 * M, 4 * M], dtype=np.int64)
    assert s.check_and_add(h, lo, m).tolist() == [False, False, True, False, True]
    # The id goes to the minute of its first (kept) occurrence.
    assert s.minutes() == [0, M, 3 * M]


def test_duplicate_in_any_bucket() -> None:
    s = IdSet()
    one = np.array([1], dtype=np.uint64)
    s.check_and_add(one, one, np.array([0], dtype=np.int64))
    assert s.check_and_add(one, one, np.array([10 * M], dtype=np.int64)).tolist() == [True]
    assert s.minutes() == [0]


def test_empty_input() -> None:
    s = IdSet()
    e64 = np.zeros(0, dtype=np.uint64)
    got = s.check_and_add(e64, e64, np.zeros(0, dtype=np.int64))
    assert got.shape == (0,) and got.dtype == np.bool_
    assert len(s) == 0 and s.nbytes == 0 and s.minutes() == []
    assert s.expire_before(10 * M) == 0


def test_rejects_bad_input() -> None:
    s = IdSet()
    one = np.ones(1, dtype=np.uint64)
    with pytest.raises(ValueError):
        s.check_and_add(one, np.ones(2, dtype=np.uint64), np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError):
        s.check_and_add(one, one, np.array([123], dtype=np.int64))


def test_expire_before_forgets_exactly_the_old_minutes() -> None:
    rng = np.random.default_rng(7)
    s = IdSet()
    per = {}
    for k in range(6):
        h = rng.integers(0, 2**64, 1000, dtype=np.uint64, endpoint=False)
        h[:10] = 77  # shared highs across minutes, distinct lows
        lo = rng.integers(0, 2**64, 1000, dtype=np.uint64, endpoint=False)
        lo[:10] = np.arange(10 * k, 10 * k + 10, dtype=np.uint64)
        for part in np.array_split(np.arange(1000), 4):  # several runs per bucket
            m = np.full(len(part), k * M, dtype=np.int64)
            assert not s.check_and_add(h[part], lo[part], m).any()
        per[k] = (h, lo)
    assert s.minutes() == [k * M for k in range(6)]
    assert s.expire_before(3 * M) == 3000
    assert s.expire_before(3 * M) == 0
    assert len(s) == 3000 and s.nbytes == 3000 * 16
    assert s.minutes() == [3 * M, 4 * M, 5 * M]
    for k, (h, lo) in per.items():
        again = s.check_and_add(h, lo, np.full(1000, 9 * M, dtype=np.int64))
        assert again.all() if k >= 3 else not again.any()
    assert len(s) == 6000


def _random_set(n: int, seed: int) -> tuple[IdSet, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    h[: n // 10] = h[0]  # some equal highs
    lo = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    m = rng.integers(0, 5, n).astype(np.int64) * M
    s = IdSet()
    for part in np.array_split(np.arange(n), 7):
        s.check_and_add(h[part], lo[part], m[part])
    return s, h, lo, m


def test_snapshot_round_trip() -> None:
    empty = IdSet.restore(IdSet().snapshot())
    assert len(empty) == 0 and empty.minutes() == []

    s, h, lo, _ = _random_set(5000, 3)
    data = s.snapshot()
    r = IdSet.restore(data)
    assert r.snapshot() == data
    assert len(r) == len(s) and r.nbytes == s.nbytes and r.minutes() == s.minutes()
    # Answers identically: old ids, new ids, and mixtures with repeats.
    rng = np.random.default_rng(4)
    qh = np.concatenate([h[::3], rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False)])
    ql = np.concatenate([lo[::3], rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False)])
    qh = np.concatenate([qh, qh[:500]])
    ql = np.concatenate([ql, ql[:500]])
    qm = np.full(len(qh), 7 * M, dtype=np.int64)
    assert s.check_and_add(qh, ql, qm).tolist() == r.check_and_add(qh, ql, qm).tolist()
    assert r.snapshot() == s.snapshot()
    assert r.expire_before(2 * M) == s.expire_before(2 * M)


def test_restore_rejects_garbage() -> None:
    s = _random_set(100, 1)[0]
    data = s.snapshot()
    for bad in (b"", b"nonsense" * 3, data[:-1], data + b"\0"):
        with pytest.raises(ValueError):
            IdSet.restore(bad)
    twice = data[:8] + (2 * len(s.minutes())).to_bytes(8, "little") + data[16:] + data[16:]
    with pytest.raises(ValueError, match="twice"):
        IdSet.restore(twice)


def test_memory_at_most_16_bytes_per_id() -> None:
    rng = np.random.default_rng(11)
    s = IdSet()
    n, batch = 1_000_000, 100_000
    for _ in range(n // batch):
        h = rng.integers(0, 2**64, batch, dtype=np.uint64, endpoint=False)
        lo = rng.integers(0, 2**64, batch, dtype=np.uint64, endpoint=False)
        m = rng.integers(0, 30, batch).astype(np.int64) * M
        assert not s.check_and_add(h, lo, m).any()
    assert len(s) == n
    assert s.nbytes / len(s) <= 16
