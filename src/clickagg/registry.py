"""The ad registry: what a click on each ad costs when the event does not say.

Loaded from a CSV (``ad_id,cpc_micros[,advertiser_id,campaign_id,...]``). Prices are
integer micros, never floats. The worker reads it at start; a changed file applies to
micro-batches committed after the next restart.
"""

from __future__ import annotations

from pathlib import Path

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
