"""What a click on an ad costs at a point in event time: prices versioned by when they apply.

A price applies from its ``effective_from_ms`` (event time) until the ad's next price, so a
click is priced by the price in force when it happened: a later change never alters the
spend of a past click. The stream and the batch layer price through this one definition
(``aggregate.with_minute_and_spend``). A book with one price per ad from the beginning of
time (the plain ``ad_id,cpc_micros`` registry) prices by a dictionary lookup; a versioned
book by an as-of join on (ad, event time) — both vectorized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import polars as pl

SCHEMA = {"ad_id": pl.String, "effective_from_ms": pl.Int64, "cpc_micros": pl.Int64}


@dataclass(frozen=True)
class Price:
    ad_id: str
    cpc_micros: int
    effective_from_ms: int = 0


@dataclass(frozen=True)
class PriceBook:
    """Immutable; build a new one to change prices (``with_prices``)."""

    table: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=SCHEMA))

    @classmethod
    def of(cls, prices: PriceBook | Mapping[str, int] | None) -> PriceBook:
        if isinstance(prices, PriceBook):
            return prices
        return cls.from_prices(Price(ad, cpc) for ad, cpc in (prices or {}).items())

    @classmethod
    def from_prices(cls, prices: Iterable[Price]) -> PriceBook:
        """Later entries win for the same (ad, effective_from_ms)."""
        rows = [(p.ad_id, p.effective_from_ms, p.cpc_micros) for p in prices]
        table = pl.DataFrame(rows, schema=SCHEMA, orient="row")
        table = table.unique(["ad_id", "effective_from_ms"], keep="last", maintain_order=True)
        return cls(table.sort("ad_id", "effective_from_ms"))

    def with_prices(self, prices: Iterable[Price]) -> PriceBook:
        existing = (
            Price(ad, cpc, since) for ad, since, cpc in self.table.select(list(SCHEMA)).iter_rows()
        )
        return PriceBook.from_prices([*existing, *prices])

    @property
    def flat(self) -> dict[str, int] | None:
        """{ad: cpc} when every ad has one price from the beginning, else None."""
        table = self.table
        if table.height and (table["effective_from_ms"] != 0).any():
            return None
        if table["ad_id"].is_duplicated().any():
            return None
        return dict(zip(table["ad_id"].to_list(), table["cpc_micros"].to_list(), strict=True))

    def cpc_expr_or_series(self, events: pl.DataFrame) -> pl.Expr | pl.Series:
        """The price of each event's ad at its event time (0 without a price): an
        expression for a flat book, else a Series aligned with ``events``."""
        flat = self.flat
        if flat is not None:
            return pl.col("ad_id").replace_strict(flat, default=0, return_dtype=pl.Int64)
        probe = events.select(
            pl.col("ad_id"), pl.col("ts_ms"), pl.int_range(pl.len()).alias("_row")
        ).sort("ts_ms")
        priced = probe.join_asof(
            self.table.sort("effective_from_ms"),
            left_on="ts_ms",
            right_on="effective_from_ms",
            by="ad_id",
            strategy="backward",
            # Both sides are sorted just above; with ``by`` polars cannot check it and
            # warns on some inputs (once per call: a worker's log full of them).
            check_sortedness=False,
        )
        return priced.sort("_row")["cpc_micros"].fill_null(0).alias("cpc")

    def at(self, ad_id: str, ts_ms: int) -> int:
        """One lookup (the CLI's ``ads list --at``), not for the hot path."""
        rows = self.table.filter(
            (pl.col("ad_id") == ad_id) & (pl.col("effective_from_ms") <= ts_ms)
        )
        return int(rows["cpc_micros"][-1]) if rows.height else 0
