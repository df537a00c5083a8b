"""Unique users as a KMV (k minimum values) sketch: mergeable, exact when small.

A sketch is the sorted list of the K smallest distinct 64-bit user hashes seen. Merging two
sketches is: union, sort, keep the K smallest, so minute sketches roll up to hours and days
(and across partitions) exactly as if built from all events at once. With fewer than K
distinct users the sketch holds them all and the count is exact; beyond, the estimate
(K - 1) / (kth smallest / 2^64) has a relative standard error of about 1 / sqrt(K - 2):
6.3 % for K = 256, and stays within ±19 % (3 sigma) almost always.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

K = 256
RELATIVE_STANDARD_ERROR = 1 / (K - 2) ** 0.5
_TWO_64 = float(2**64)


def build(user_hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Sketch of a set of user hashes (0 means no user and is ignored)."""
    distinct = np.unique(user_hashes[user_hashes != 0])
    return distinct[:K]


def merge(sketches: Iterable[npt.ArrayLike]) -> npt.NDArray[np.uint64]:
    parts = [np.asarray(s, dtype=np.uint64) for s in sketches]
    if not parts:
        return np.empty(0, dtype=np.uint64)
    return np.unique(np.concatenate(parts))[:K]


def estimate(sketch: npt.ArrayLike) -> int:
    values = np.asarray(sketch, dtype=np.uint64)
    if len(values) < K:
        return len(values)
    return round((K - 1) / (float(values[K - 1]) / _TWO_64))


def sql_estimate(column: str) -> str:
    """The same estimate as a SQL expression over a sorted UBIGINT[] column (DuckDB, 1-based)."""
    return (
        f"(CASE WHEN len({column}) < {K} THEN len({column}) "
        f"ELSE round(({K} - 1) / ({column}[{K}]::DOUBLE / {_TWO_64!r}))::BIGINT END)"
    )


def sql_merge(left: str, right: str) -> str:
    """SQL that merges two sketch columns (for upserts)."""
    return f"list_sort(list_distinct(list_concat({left}, {right})))[1:{K}]"


def sql_merge_agg(column: str) -> str:
    """SQL aggregate merging a sketch column over a group's rows; one row is kept as is."""
    merged = f"list_sort(list_distinct(flatten(list({column}))))[1:{K}]"
    return f"(CASE WHEN count(*) = 1 THEN any_value({column}) ELSE {merged} END)"
