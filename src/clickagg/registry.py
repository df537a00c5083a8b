"""The ad registry: what a click on each ad costs when the event does not say; and the
advertisers: the name, currency and time zone their statements are made in.

Loaded from a CSV (``ad_id,cpc_micros[,advertiser_id,campaign_id,...]``). Prices are
integer micros, never floats. The worker reads it at start; a changed file applies to
micro-batches committed after the next restart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from clickagg.core.prices import Price, PriceBook


class RegistryError(ValueError):
    """The ad registry file is unusable; the message says why."""


def load_cpc_micros(path: Path) -> dict[str, int]:
    try:
        table = pl.read_csv(path, schema_overrides={"ad_id": pl.String, "cpc_micros": pl.Int64})
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise RegistryError(f"cannot read the ad registry {path}: {exc}") from None
    missing = {"ad_id", "cpc_micros"} - set(table.columns)
    if missing:
        raise RegistryError(f"ad registry {path} lacks column(s): {', '.join(sorted(missing))}")
    if table["cpc_micros"].null_count() or (table["cpc_micros"] < 0).any():
        raise RegistryError(f"ad registry {path}: cpc_micros must be a non-negative integer")
    if table["ad_id"].is_duplicated().any():
        raise RegistryError(f"ad registry {path}: an ad_id appears twice")
    return dict(zip(table["ad_id"].to_list(), table["cpc_micros"].to_list(), strict=True))


@dataclass(frozen=True)
class Advertiser:
    advertiser_id: str
    name: str
    currency: str
    time_zone: str  # IANA, e.g. America/Los_Angeles: statements are per local day


def load_advertisers(path: Path) -> dict[str, Advertiser]:
    """``advertiser_id,name,currency,time_zone`` (time zone and currency default to UTC
    and USD when the column is missing or empty)."""
    try:
        table = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise RegistryError(f"cannot read the advertisers file {path}: {exc}") from None
    if "advertiser_id" not in table.columns:
        raise RegistryError(f"advertisers file {path} lacks column advertiser_id")
    out: dict[str, Advertiser] = {}
    for row in table.iter_rows(named=True):
        advertiser_id = row["advertiser_id"]
        zone = row.get("time_zone") or "UTC"
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise RegistryError(f"advertisers file {path}: unknown time zone {zone!r}") from None
        if advertiser_id in out:
            raise RegistryError(f"advertisers file {path}: {advertiser_id} appears twice")
        out[advertiser_id] = Advertiser(
            advertiser_id, row.get("name") or advertiser_id, row.get("currency") or "USD", zone
        )
    return out


class PriceRegistry:
    """Prices set over time (``clickagg ads set|import``), kept as an append-only JSON-lines
    file in the data dir: every change with when it was recorded, when it applies from
    and by whom. The effective book is the ``ads_file`` CSV (prices from the beginning of
    time) overlaid with these changes."""

    def __init__(self, path: Path, *, ads_file: Path | None = None) -> None:
        self.path = path
        self.ads_file = ads_file

    @classmethod
    def for_data_dir(cls, data_dir: Path, ads_file: Path | None = None) -> PriceRegistry:
        return cls(data_dir / "registry" / "prices.jsonl", ads_file=ads_file)

    def changes(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def book(self) -> PriceBook:
        base = load_cpc_micros(self.ads_file) if self.ads_file else {}
        changes = [
            Price(c["ad_id"], int(c["cpc_micros"]), int(c["effective_from_ms"]))
            for c in self.changes()
        ]
        return PriceBook.of(base).with_prices(changes)

    def version(self) -> tuple[float, int]:
        """Changes when the file does (mtime, size): what a worker polls to reload."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return (0.0, 0)
        return (stat.st_mtime, stat.st_size)

    def record(self, prices: list[Price], *, by: str, now_ms: int) -> None:
        """Append price changes; each applies from its effective time on, which must not be
        in the past: the spend of a click already counted never changes (a retroactive
        correction is a restatement: re-run ``clickagg reconcile``)."""
        for price in prices:
            if price.effective_from_ms < now_ms - 1000:
                raise RegistryError(
                    f"{price.ad_id}: a price applies from now on, not from the past "
                    f"({price.effective_from_ms} < {now_ms})"
                )
            if price.cpc_micros < 0:
                raise RegistryError(f"{price.ad_id}: cpc_micros must not be negative")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(
            json.dumps(
                {
                    "ad_id": p.ad_id,
                    "cpc_micros": p.cpc_micros,
                    "effective_from_ms": p.effective_from_ms,
                    "recorded_ms": now_ms,
                    "by": by,
                }
            )
            + "\n"
            for p in prices
        )
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
