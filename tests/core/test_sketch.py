"""KMV unique-user sketch: exact when small, bounded error when large, merge = union."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from clickagg.core import sketch


def hashes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2**64 - 1, size=n, dtype=np.uint64)


def test_exact_below_k_and_zero_means_no_user() -> None:
    values = np.array([5, 3, 3, 0, 9], dtype=np.uint64)
    assert sketch.estimate(sketch.build(values)) == 3


def test_estimate_error_is_within_three_standard_errors() -> None:
    for seed, n in enumerate((1_000, 20_000, 200_000)):
        estimate = sketch.estimate(sketch.build(hashes(n, seed)))
        assert abs(estimate - n) / n < 3 * sketch.RELATIVE_STANDARD_ERROR


@given(st.lists(st.integers(1, 2**64 - 1), max_size=600), st.integers(0, 600))
def test_merging_parts_equals_building_from_all(values: list[int], cut: int) -> None:
    array = np.array(values, dtype=np.uint64)
    whole = sketch.build(array)
    merged = sketch.merge([sketch.build(array[:cut]), sketch.build(array[cut:])])
    assert merged.tolist() == whole.tolist()


def test_sql_estimate_matches_python() -> None:
    import duckdb

    sk = sketch.build(hashes(5_000, 42))
    rows = duckdb.execute(
        f"SELECT {sketch.sql_estimate('s')} FROM (SELECT ?::UBIGINT[] AS s)", [sk.tolist()]
    ).fetchall()
    got = rows[0] if rows else None
    assert got is not None and got[0] == sketch.estimate(sk)
