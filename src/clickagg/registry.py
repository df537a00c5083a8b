"""The ad registry: what a click on each ad costs when the event does not say; and the
advertisers: the name, currency and time zone their statements are made in.

Loaded from a CSV (``ad_id,cpc_micros[,advertiser_id,campaign_id,...]``). Prices are
integer micros, never floats. The worker reads it at start; a changed file applies to
micro-batches committed after the next restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl


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
