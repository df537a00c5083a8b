"""The ad registry: what a click on each ad costs when the event does not say, who owns
the ad and its status; and the advertisers: the name, currency and time zone their
statements are made in.

Each starts from a CSV (settings ``ads_file``: ``ad_id,cpc_micros[,advertiser_id,
campaign_id,status]``; ``advertisers_file``: ``advertiser_id,name,currency,time_zone``)
overlaid with the changes recorded since (``clickagg ads|advertisers set``, the admin
endpoints) in append-only JSON-lines files under ``DATA_DIR/registry``, each with who
made it and when. Prices are integer micros, never floats. The worker re-reads the ad
registry between rounds when its record grows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

import polars as pl

from clickagg.core.ads import AdChange, AdChangeError, AdEntry, as_of, change_of
from clickagg.core.prices import Price, PriceBook
from clickagg.jsonl import append_jsonl, read_jsonl


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
        if advertiser_id in out:
            raise RegistryError(f"advertisers file {path}: {advertiser_id} appears twice")
        try:
            out[advertiser_id] = advertiser_of(
                advertiser_id,
                name=row.get("name") or None,
                currency=row.get("currency") or None,
                time_zone=row.get("time_zone") or None,
            )
        except RegistryError as exc:
            raise RegistryError(f"advertisers file {path}: {exc}") from None
    return out


_CURRENCY = re.compile(r"^[A-Z]{3}$")


@functools.cache
def time_zones() -> frozenset[str]:
    """The IANA time zone names this system knows (the OpenAPI document lists them);
    not the host's own ``localtime`` link, which names no zone."""
    return frozenset(available_timezones() - {"localtime", "Factory"})


def advertiser_of(
    advertiser_id: str,
    *,
    name: str | None = None,
    currency: str | None = None,
    time_zone: str | None = None,
    base: Advertiser | None = None,
) -> Advertiser:
    """An advertiser from untrusted fields, each checked (the message names the field);
    a field not given keeps ``base``'s value, or its default (the id, USD, UTC)."""
    if not isinstance(advertiser_id, str) or not 1 <= len(advertiser_id) <= 256:
        raise RegistryError("advertiser_id must be a string of 1 to 256 characters")
    current = base or Advertiser(advertiser_id, advertiser_id, "USD", "UTC")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 256):
        raise RegistryError("name must be a string of 1 to 256 characters")
    if currency is not None and (not isinstance(currency, str) or not _CURRENCY.match(currency)):
        raise RegistryError(f"currency must be an ISO 4217 code of 3 capital letters: {currency!r}")
    if time_zone is not None:
        if not isinstance(time_zone, str):
            raise RegistryError("time_zone must be an IANA time zone name, e.g. Europe/Paris")
        if time_zone not in time_zones():
            raise RegistryError(
                f"time_zone {time_zone!r} is not an IANA time zone (e.g. America/New_York)"
            )
    return Advertiser(
        advertiser_id,
        name if name is not None else current.name,
        currency if currency is not None else current.currency,
        time_zone if time_zone is not None else current.time_zone,
    )


def load_ad_entries(path: Path) -> dict[str, AdEntry]:
    """The ``ads_file`` CSV as registry entries in force from the beginning: its prices
    (:func:`load_cpc_micros`) and, where the columns exist, owner and status."""
    prices = load_cpc_micros(path)
    table = pl.read_csv(path, infer_schema=False)
    entries = {ad: AdEntry(ad, cpc_micros=cpc) for ad, cpc in prices.items()}
    extra: list[str] = [c for c in ("advertiser_id", "campaign_id", "status") if c in table.columns]
    if not extra:
        return entries
    for row in table.select("ad_id", *extra).iter_rows(named=True):
        fields = {k: row[k] for k in extra if row[k]}
        try:
            change = change_of(row["ad_id"], 0, {"cpc_micros": prices[row["ad_id"]], **fields})
        except AdChangeError as exc:
            raise RegistryError(f"ad registry {path}: {exc}") from None
        entries[row["ad_id"]] = replace(entries[row["ad_id"]], **change.fields())
    return entries


def load_ad_changes(path: Path, effective_from_ms: int) -> list[AdChange]:
    """``clickagg ads import``: a CSV of ``ad_id`` and any of ``cpc_micros``,
    ``advertiser_id``, ``campaign_id``, ``status``; an empty cell changes nothing."""
    try:
        table = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from None
    known = ("cpc_micros", "advertiser_id", "campaign_id", "status")
    if "ad_id" not in table.columns:
        raise RegistryError(f"{path} lacks column ad_id")
    unknown = set(table.columns) - {"ad_id", *known}
    if unknown:
        raise RegistryError(f"{path}: unknown column(s) {sorted(unknown)} (known: ad_id, {known})")
    changes = []
    for line, row in enumerate(table.iter_rows(named=True), start=2):
        fields: dict[str, object] = {k: row[k] for k in known if row.get(k)}
        try:
            if "cpc_micros" in fields:
                text = str(fields["cpc_micros"]).strip()
                if not re.fullmatch(r"\d+", text):
                    raise AdChangeError("cpc_micros must be a non-negative integer")
                fields["cpc_micros"] = int(text)
            changes.append(change_of(row["ad_id"] or "", effective_from_ms, fields))
        except AdChangeError as exc:
            raise RegistryError(f"{path} line {line}: {exc}") from None
    return changes


class AdRegistry:
    """Ad changes set over time (``clickagg ads set|import``, ``PUT /admin/ads/{id}``),
    kept as an append-only JSON-lines file in the data dir: every change with when it was
    recorded, when it applies from and by whom. The registry is the ``ads_file`` CSV (in
    force from the beginning of time) overlaid with these changes; its price history is
    the book clicks are priced by."""

    def __init__(self, path: Path, *, ads_file: Path | None = None) -> None:
        self.path = path
        self.ads_file = ads_file

    @classmethod
    def for_data_dir(cls, data_dir: Path, ads_file: Path | None = None) -> AdRegistry:
        return cls(data_dir / "registry" / "prices.jsonl", ads_file=ads_file)

    def changes(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def _ad_changes(self) -> list[AdChange]:
        fields = ("cpc_micros", "advertiser_id", "campaign_id", "status")
        return [
            AdChange(c["ad_id"], int(c["effective_from_ms"]), **{k: c.get(k) for k in fields})
            for c in self.changes()
        ]

    def book(self) -> PriceBook:
        base = load_cpc_micros(self.ads_file) if self.ads_file else {}
        changes = [
            Price(c["ad_id"], int(c["cpc_micros"]), int(c["effective_from_ms"]))
            for c in self.changes()
            if c.get("cpc_micros") is not None  # an owner or status change leaves the price
        ]
        return PriceBook.of(base).with_prices(changes)

    def entries(self, at_ms: int) -> dict[str, AdEntry]:
        """The registry as of ``at_ms``: every ad's price, owner and status then."""
        base = load_ad_entries(self.ads_file) if self.ads_file else {}
        return as_of(base, self._ad_changes(), at_ms)

    def version(self) -> tuple[float, int]:
        """Changes when the file does (mtime, size): what a worker polls to reload."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return (0.0, 0)
        return (stat.st_mtime, stat.st_size)

    def record(self, prices: list[Price], *, by: str, now_ms: int) -> None:
        """Append price changes (see :meth:`record_changes`)."""
        self.record_changes(
            [AdChange(p.ad_id, p.effective_from_ms, cpc_micros=p.cpc_micros) for p in prices],
            by=by,
            now_ms=now_ms,
        )

    def record_changes(self, changes: list[AdChange], *, by: str, now_ms: int) -> None:
        """Append changes; each applies from its effective time on, which must not be in
        the past: the spend of a click already counted never changes (a retroactive
        correction is a restatement: re-run ``clickagg reconcile``), and the registry as
        of a past time reads the same whenever it is asked."""
        for change in changes:
            if change.effective_from_ms < now_ms - 1000:
                raise RegistryError(
                    f"{change.ad_id}: a change applies from now on, not from the past "
                    f"(effective_from {change.effective_from_ms} < {now_ms})"
                )
            if change.cpc_micros is not None and change.cpc_micros < 0:
                raise RegistryError(f"{change.ad_id}: cpc_micros must not be negative")
        append_jsonl(
            self.path,
            (
                {
                    "ad_id": c.ad_id,
                    **c.fields(),
                    "effective_from_ms": c.effective_from_ms,
                    "recorded_ms": now_ms,
                    "by": by,
                }
                for c in changes
            ),
        )


class AdvertiserRegistry:
    """Advertisers set over time (``clickagg advertisers set``, ``PUT
    /admin/advertisers/{id}``) over the ``advertisers_file`` CSV: an append-only
    JSON-lines record of each change, who made it and when. A change applies when it is
    recorded (a statement is built with the advertiser as the registry says then)."""

    def __init__(self, path: Path, *, advertisers_file: Path | None = None) -> None:
        self.path = path
        self.advertisers_file = advertisers_file

    @classmethod
    def for_data_dir(
        cls, data_dir: Path, advertisers_file: Path | None = None
    ) -> AdvertiserRegistry:
        return cls(data_dir / "registry" / "advertisers.jsonl", advertisers_file=advertisers_file)

    def changes(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def current(self) -> dict[str, Advertiser]:
        out = load_advertisers(self.advertisers_file) if self.advertisers_file else {}
        for change in self.changes():
            advertiser_id = change["advertiser_id"]
            out[advertiser_id] = advertiser_of(
                advertiser_id,
                name=change.get("name"),
                currency=change.get("currency"),
                time_zone=change.get("time_zone"),
                base=out.get(advertiser_id),
            )
        return dict(sorted(out.items()))

    def get(self, advertiser_id: str) -> Advertiser:
        """The advertiser, or the defaults for one never described (USD, UTC)."""
        return self.current().get(advertiser_id) or advertiser_of(advertiser_id)

    def record(
        self,
        advertiser_id: str,
        fields: Mapping[str, Any],
        *,
        by: str,
        now_ms: int,
    ) -> Advertiser:
        """Check and append one change; the advertiser as it now reads."""
        unknown = set(fields) - {"name", "currency", "time_zone"}
        if unknown:
            raise RegistryError(
                f"unknown field(s) {sorted(unknown)} (known: name, currency, time_zone)"
            )
        given = {k: v for k, v in fields.items() if v is not None}
        if not given:
            raise RegistryError("nothing to change (give any of name, currency, time_zone)")
        current = self.current().get(advertiser_id)
        advertiser = advertiser_of(advertiser_id, **given, base=current)
        record = {"advertiser_id": advertiser_id, **given, "recorded_ms": now_ms, "by": by}
        append_jsonl(self.path, [record])
        return advertiser
