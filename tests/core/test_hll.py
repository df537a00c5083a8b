"""DataSketches HLL unique users: error bound, exact when small, union of a split = whole."""

from __future__ import annotations

import random

import datasketches
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core import hll


def user_ids(n: int, seed: int) -> pl.Series:
    """``n`` distinct user id strings, different for each seed."""
    return (pl.Series(np.arange(n, dtype=np.int64)).cast(pl.String) + f"-u{seed}").alias("u")


def one_group(users: pl.Series | pa.Array) -> bytes:
    sketches = hll.sketches_by_group(np.zeros(len(users), dtype=np.int64), users, 1)
    return sketches[0].as_py()


def spark_like(users: list[str]) -> datasketches.hll_sketch:
    """A sketch made as Spark's hll_sketch_agg makes one: lg_k 12, HLL_8, in row order."""
    sketch = datasketches.hll_sketch(12, datasketches.HLL_8)
    for user in users:
        sketch.update(user)
    return sketch


def is_hll_mode(data: bytes) -> bool:
    return data[7] & 3 == 2


@pytest.mark.parametrize("n", [0, 1, 100, 10_000, 1_000_000])
def test_estimate_is_within_three_standard_errors_of_the_exact_count(n: int) -> None:
    rng = np.random.default_rng(n)
    distinct = user_ids(n, seed=n)
    # Some users come back, in shuffled order: repeats must not count.
    repeats = distinct[rng.integers(0, n, n // 5)] if n else distinct
    events = pl.concat([distinct, repeats])
    events = events[rng.permutation(len(events))]
    sketch = one_group(events) if n else hll.empty()
    assert abs(hll.estimate(sketch) - n) <= 3 * hll.RELATIVE_STANDARD_ERROR * n
    # The library's own 3-sigma bounds hold the true count too.
    parsed = datasketches.hll_sketch.deserialize(sketch)
    assert parsed.get_lower_bound(3) <= n <= parsed.get_upper_bound(3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_up_to_exact_limit_are_exact(seed: int) -> None:
    # Group g holds g distinct users, so one call checks every count 0..EXACT_UP_TO.
    sizes = np.arange(hll.EXACT_UP_TO + 1)
    groups = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    users = user_ids(len(groups), seed)
    sketches = hll.sketches_by_group(groups, users, len(sizes))
    assert sketches[0].as_py() is None
    assert hll.estimates(sketches).tolist() == sizes.tolist()
    assert not any(is_hll_mode(s.as_py()) for s in sketches[1:])


@pytest.mark.parametrize("n", [50, 384, 385, 3_000, 60_000])
@pytest.mark.parametrize("parts", [2, 5])
def test_union_of_the_sketches_of_a_split_is_the_sketch_of_the_whole(n: int, parts: int) -> None:
    rng = np.random.default_rng(n + parts)
    users = user_ids(n, seed=7)
    whole = one_group(users)
    shuffled = users[rng.permutation(n)]
    cuts = np.sort(rng.integers(0, n, parts - 1))
    pieces = [one_group(piece) for piece in np.split(shuffled.to_numpy(), cuts) if len(piece)]
    merged = hll.union(pieces)
    assert hll.estimate(merged) == hll.estimate(whole)
    if is_hll_mode(whole):
        assert merged == whole
    # Merging again changes nothing.
    assert hll.estimate(hll.union([merged, whole])) == hll.estimate(whole)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.text(max_size=4) | st.none()), max_size=300),
    st.randoms(use_true_random=False),
)
def test_event_order_and_duplicates_do_not_change_the_bytes(
    events: list[tuple[int, str | None]], rnd: random.Random
) -> None:
    shuffled = list(events)
    rnd.shuffle(shuffled)

    def build(evs: list[tuple[int, str | None]]) -> list[bytes | None]:
        groups = np.array([g for g, _ in evs], dtype=np.int64)
        users = pa.array([u for _, u in evs], type=pa.string())
        return hll.sketches_by_group(groups, users, 5).to_pylist()

    first = build(events)
    assert first == build(shuffled) == build(events + shuffled)
    for group, data in enumerate(first):
        expected = {u for g, u in events if g == group and u}
        if not expected:
            assert data is None
        else:
            assert hll.estimate(data) == len(expected)


def test_null_and_empty_users_are_ignored() -> None:
    with_gaps = pa.array(["a", None, "b", "", "a", None], type=pa.string())
    assert one_group(with_gaps) == one_group(pa.array(["a", "b"]))
    assert hll.estimate(one_group(with_gaps)) == 2


def test_groups_without_users_are_null() -> None:
    groups = np.array([0, 2, 2, 3], dtype=np.int64)
    users = pa.array([None, "x", "y", ""], type=pa.string())
    sketches = hll.sketches_by_group(groups, users, 5)
    assert sketches.type == pa.binary()
    assert [s is not None for s in sketches.to_pylist()] == [False, False, True, False, False]
    assert hll.estimates(sketches).tolist() == [0, 0, 2, 0, 0]
    empty_input = hll.sketches_by_group(np.zeros(0, dtype=np.int64), pa.array([], pa.string()), 3)
    assert empty_input.to_pylist() == [None, None, None]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="group indexes"):
        hll.sketches_by_group(np.array([0, 3], dtype=np.int64), pa.array(["a", "b"]), 3)
    with pytest.raises(ValueError, match="for 1 users"):
        hll.sketches_by_group(np.array([0, 1], dtype=np.int64), pa.array(["a"]), 3)


@pytest.mark.parametrize("n", [3, 200, 5_000])
def test_bytes_round_trip_through_the_library_with_spark_parameters(n: int) -> None:
    data = one_group(user_ids(n, seed=3))
    sketch = datasketches.hll_sketch.deserialize(data)
    assert sketch.lg_config_k == 12
    assert sketch.tgt_type == datasketches.HLL_8
    assert not sketch.is_compact()
    assert sketch.serialize_updatable() == data
    assert round(sketch.get_estimate()) == hll.estimate(data)


@pytest.mark.parametrize("n", [3, 200, 384, 5_000, 40_000])
def test_stream_and_spark_sketches_of_the_same_users_merge_and_agree(n: int) -> None:
    ids = user_ids(n, seed=11).to_list()
    ours = one_group(pl.Series(ids))
    spark = spark_like(ids)
    spark_merged = hll.union([spark.serialize_updatable()])
    assert hll.estimate(hll.union([ours, spark.serialize_updatable()])) == hll.estimate(ours)
    assert hll.estimate(spark_merged) == hll.estimate(ours)
    if not is_hll_mode(ours):
        # Below the HLL switch Spark's bytes for the same rows in the same order are ours.
        assert spark_like(sorted(ids)).serialize_updatable() == ours
    else:
        assert spark_merged == ours
    # A union with a Spark-made sketch of other users counts both.
    others = spark_like(user_ids(n, seed=12).to_list()).serialize_updatable()
    both = hll.estimate(hll.union([ours, others]))
    assert abs(both - 2 * n) <= 3 * hll.RELATIVE_STANDARD_ERROR * 2 * n


def test_union_many_merges_each_row() -> None:
    a, b, c = (one_group(user_ids(n, seed=n)) for n in (10, 500, 20_000))
    rows = pa.array([[a, b], None, [], [c, None, a], [b]], type=pa.list_(pa.binary()))
    merged = hll.union_many(rows)
    assert merged.type == pa.binary()
    assert merged[1].as_py() is None
    expected = [hll.union([a, b]), None, hll.union([]), hll.union([c, a]), hll.union([b])]
    assert merged.to_pylist() == expected
    assert hll.union_many(pa.chunked_array([rows])).to_pylist() == expected
    counts = hll.estimates(merged).tolist()
    assert counts[1:3] == [0, 0]
    assert abs(counts[0] - 510) <= 3 * hll.RELATIVE_STANDARD_ERROR * 510


def test_empty_sketch_and_none_estimate_zero() -> None:
    assert hll.estimate(None) == 0
    assert hll.estimate(hll.empty()) == 0
    assert hll.union([]) == hll.empty()
    assert hll.union([None, hll.empty()]) == hll.empty()
