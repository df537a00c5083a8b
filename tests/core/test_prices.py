"""Prices versioned by event time: a click is priced by the price in force when it
happened, the same way in the stream and the batch layer."""

from __future__ import annotations

import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from clickagg.core import aggregate
from clickagg.core.prices import Price, PriceBook


def events(rows: list[tuple[str, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"ad_id": pl.String, "ts_ms": pl.Int64, "cost_micros": pl.Int64}, orient="row"
    )


def test_a_click_is_priced_by_the_price_in_force_at_its_event_time() -> None:
    book = PriceBook.from_prices(
        [Price("a", 100, 0), Price("a", 300, 1_000), Price("b", 50, 500), Price("a", 200, 2_000)]
    )
    assert book.flat is None
    frame = events(
        [
            ("a", 999, -1),
            ("a", 1_000, -1),
            ("b", 400, -1),
            ("a", 5_000, -1),
            ("b", 600, 7),
            ("c", 10, -1),
        ]
    )
    priced = aggregate.with_minute_and_spend(frame, book)
    assert priced["spend_micros"].to_list() == [100, 300, 0, 200, 7, 0]  # own cost wins


def test_later_records_win_and_a_flat_book_is_a_lookup() -> None:
    book = PriceBook.of({"a": 10}).with_prices([Price("a", 20, 0)])
    assert book.flat == {"a": 20}
    assert book.at("a", 123) == 20 and book.at("zzz", 1) == 0


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 10_000)), max_size=40),
    st.dictionaries(st.sampled_from("abcd"), st.integers(0, 10**9)),
)
def test_a_versioned_book_with_one_price_from_the_start_prices_like_the_flat_one(
    rows: list[tuple[str, int]], flat: dict[str, int]
) -> None:
    frame = events([(ad, ts, -1) for ad, ts in rows])
    versioned = PriceBook.from_prices([Price(ad, cpc, 0) for ad, cpc in flat.items()])
    # Force the as-of path: an extra ad whose price starts later.
    versioned = versioned.with_prices([Price("other", 1, 5)])
    assert versioned.flat is None
    by_join = aggregate.with_minute_and_spend(frame, versioned)["spend_micros"].to_list()
    by_lookup = aggregate.with_minute_and_spend(frame, flat)["spend_micros"].to_list()
    assert by_join == by_lookup
