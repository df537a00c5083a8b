"""A round's deltas: every table's unique-user sketches are the library's, byte for byte."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clickagg.core import aggregate, hll, ids
from clickagg.core.aggregate import DIMENSIONS, OWNERS, REASON_DIMENSION, UNKNOWN
from clickagg.core.windows import MINUTE_MS

T0 = 1_764_000_000_000


def events(n: int, seed: int) -> pl.DataFrame:
    """Clicks and impressions of a few ads over a few minutes; users that repeat across
    ads, minutes and countries, null and empty user ids, ids of any script."""
    rng = np.random.default_rng(seed)
    shapes = ["u{}", "ü{}", "日本{}", "{}"]
    users: list[str | None] = [
        shapes[int(rng.integers(0, len(shapes)))].format(int(rng.integers(0, n // 3 + 1)))
        for _ in range(n)
    ]
    for i in rng.integers(0, n, n // 20):
        users[i] = None if rng.random() < 0.5 else ""
    invalid = rng.random(n) < 0.1
    frame = pl.DataFrame(
        {
            "ad_id": [f"ad-{a}" for a in rng.integers(0, 4, n)],
            "advertiser_id": "adv",
            "campaign_id": "camp",
            "ts_ms": T0 + rng.integers(0, 3 * MINUTE_MS, n),
            "event_type": np.where(rng.random(n) < 0.3, ids.CLICK, ids.IMPRESSION).astype(np.int8),
            "invalid": invalid,
            "cost_micros": np.full(n, -1, dtype=np.int64),
            "user_id": pl.Series(users, dtype=pl.String),
            "country": rng.choice(["DE", "FR", "US"], n),
            "device": rng.choice(["mobile", "desktop"], n),
            "browser": rng.choice(["chrome", "safari"], n),
            "reason": pl.Series(
                [
                    f"rule_{int(r)}:why" if bad else None
                    for r, bad in zip(rng.integers(0, 3, n), invalid, strict=True)
                ],
                dtype=pl.String,
            ),
        }
    )
    return aggregate.with_minute_and_spend(frame, {})


def library_sketches(frame: pl.DataFrame, key: list[str], rows: pl.DataFrame) -> list[bytes | None]:
    """The library's sketch of each of ``rows``' keys, from the events of ``frame``."""
    index = rows.select(key).with_row_index("g")
    grouped = frame.join(index, on=key, how="inner")
    return hll.sketches_by_group_via_library(
        grouped["g"].cast(pl.Int64).to_numpy(), grouped["user_id"], rows.height
    ).to_pylist()


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (40, 1), (3_000, 2), (20_000, 3)])
def test_every_tables_sketches_are_the_library_sketches_of_its_rows_users(
    n: int, seed: int
) -> None:
    frame = events(n, seed)
    minute, dims = aggregate.round_deltas(frame)
    keyed = frame.with_columns(
        *(pl.col(c).fill_null(UNKNOWN) for c in OWNERS),
        pl.col("reason")
        .str.split_exact(":", 1)
        .struct.field("field_0")
        .fill_null(UNKNOWN)
        .alias(REASON_DIMENSION),
    )
    rows = pl.from_arrow(minute)
    assert isinstance(rows, pl.DataFrame)
    key = ["ad_id", "minute_ms", *OWNERS]
    assert minute["users"].to_pylist() == library_sketches(keyed, key, rows)
    assert set(dims) == {*DIMENSIONS}
    for name, table in dims.items():
        source = keyed.filter(pl.col("invalid")) if name == REASON_DIMENSION else keyed
        rows = pl.from_arrow(table)
        assert isinstance(rows, pl.DataFrame)
        assert table["users"].to_pylist() == library_sketches(
            source, ["ad_id", "minute_ms", name], rows
        ), name
    if n:
        assert sum(table.num_rows for table in dims.values()) > 0
        assert any(s is not None for s in minute["users"].to_pylist())
