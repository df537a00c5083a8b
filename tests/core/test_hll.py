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


# Group sizes (distinct users) on either side of each change of layout: LIST holds up to 7
# coupons, a SET table of 2**lg slots grows past 3/4 full (at 25, 49, 97, 193 coupons) and
# turns into HLL registers at 385.
TRANSITION_SIZES = [1, 2, 7, 8, 9, 24, 25, 26, 48, 49, 96, 97, 192, 193, 384, 385, 386, 4000]
ID_SHAPES = ["user-{}", "ü{}", "日本{}語", "😀{}", "{}", "{}" + "x" * 40, "a\u0301{}\u0000z"]


@st.composite
def grouped_events(draw: st.DrawFn) -> tuple[np.ndarray, list[str | None], int]:
    """Events of a few groups: sizes across the layout changes, repeats, empty and null ids,
    ids of any text, in shuffled order, and a group with no event."""
    sizes = draw(
        st.lists(st.sampled_from(TRANSITION_SIZES) | st.integers(0, 700), min_size=1, max_size=5)
    )
    shape = draw(st.sampled_from(ID_SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    groups: list[int] = []
    users: list[str | None] = []
    next_id = 0
    for group, size in enumerate(sizes):
        ids = [shape.format(next_id + i) for i in range(size)]
        next_id += size
        # Some groups share ids with the previous one; some ids come back.
        if group and rng.random() < 0.5:
            ids[: size // 3] = [shape.format(i) for i in range(size // 3)]
        repeats = [ids[i] for i in rng.integers(0, size, size // 4)] if size else []
        extra = [None, ""] * int(rng.integers(0, 3))
        for user in ids + repeats + extra:
            groups.append(group)
            users.append(user)
    texts = draw(st.lists(st.text(max_size=6) | st.none(), max_size=30))
    groups += [len(sizes)] * len(texts)
    users += texts
    order = rng.permutation(len(users))
    return (
        np.array(groups, dtype=np.int64)[order],
        [users[i] for i in order],
        len(sizes) + 2,
    )


@settings(max_examples=60, deadline=None)
@given(grouped_events(), st.sampled_from(["arrow", "chunked", "polars"]))
def test_vectorized_sketches_equal_the_library_path_byte_for_byte(
    events: tuple[np.ndarray, list[str | None], int], container: str
) -> None:
    groups, user_list, group_count = events
    users: pa.Array | pa.ChunkedArray | pl.Series = pa.array(user_list, type=pa.string())
    if container == "chunked":
        half = len(user_list) // 2
        users = pa.chunked_array(
            [pa.array(user_list[:half], pa.string()), pa.array(user_list[half:], pa.string())]
        )
    elif container == "polars":
        users = pl.Series(user_list, dtype=pl.String)
    vectorized = hll.sketches_by_group(groups, users, group_count)
    library = hll.sketches_by_group_via_library(groups, users, group_count)
    assert vectorized.type == library.type == pa.binary()
    assert vectorized.to_pylist() == library.to_pylist()
    # So estimates and unions are the library's too; the library reads the bytes back.
    assert hll.estimates(vectorized).tolist() == hll.estimates(library).tolist()
    sketches = vectorized.to_pylist()
    assert hll.union(sketches) == hll.union(library.to_pylist())
    for data in sketches:
        if data is not None:
            assert datasketches.hll_sketch.deserialize(data).serialize_updatable() == data


def coupon_collision() -> tuple[str, str]:
    """Two ids whose hashes give one coupon (26 address bits and the value): found with the
    module's hashing, confirmed by the library, which counts the pair as one."""
    candidates = pl.Series([f"c{i}" for i in range(150_000)])
    low, high = hll._digest_halves(candidates.to_frame("u").select(hll._digests("u")).to_series())
    coupons = hll._coupons(low, high)
    order = np.argsort(coupons, kind="stable")
    same = np.flatnonzero(coupons[order][1:] == coupons[order][:-1])
    assert len(same), "no coupon collision among the candidates"
    first, second = candidates[int(order[same[0]])], candidates[int(order[same[0] + 1])]
    pair = spark_like([first, second])
    assert pair.get_estimate() == 1.0
    return first, second


def test_users_sharing_a_coupon_count_once_and_keep_the_library_layout() -> None:
    first, second = coupon_collision()
    # 7, 24, 48 and 384 distinct coupons from one more user each: the layout the library
    # keeps for that many coupons (LIST; SET before a growth; SET before HLL), not the next.
    sizes = [7, 24, 48, 384]
    groups: list[int] = []
    users: list[str] = []
    for group, coupons in enumerate(sizes):
        others = [f"other-{group}-{i}" for i in range(coupons - 1)]
        groups += [group] * (coupons + 1)
        users += [first, second, *others]
    vectorized = hll.sketches_by_group(np.array(groups), pa.array(users), len(sizes)).to_pylist()
    library = hll.sketches_by_group_via_library(np.array(groups), pa.array(users), len(sizes))
    assert vectorized == library.to_pylist()
    modes = [data[7] & 3 for data in vectorized]
    assert modes == [0, 1, 1, 1]
    assert [data[4] for data in vectorized[1:]] == [5, 6, 9]  # lg of the SET tables
    assert hll.estimates(pa.array(vectorized)).tolist() == sizes


@pytest.mark.parametrize("users", [1, 7, 200, 384, 385, 5_000])
def test_a_compact_sketch_counts_and_unions_as_the_sketch_it_compacts(users: int) -> None:
    """What the replica keeps of a closed cell: HLL_4 registers in the compact layout,
    about half the bytes of a busy HLL_8 sketch, with the same estimate and unions."""
    ids = pa.array([f"u{i}" for i in range(users)])
    other = pa.array([f"v{i}" for i in range(300)])
    [sketch] = hll.sketches_by_group_via_library(np.zeros(users, np.int64), ids, 1).to_pylist()
    [more] = hll.sketches_by_group_via_library(np.zeros(300, np.int64), other, 1).to_pylist()
    small = hll.compact(sketch)
    assert hll.estimate(small) == hll.estimate(sketch)
    assert hll.estimate(hll.union([small, more])) == hll.estimate(hll.union([sketch, more]))
    assert len(small) <= len(sketch) and (users <= 384 or len(small) < 2_200 < len(sketch))
