"""The ad registry (CSV base and recorded changes: prices, owners, status) and the
advertisers: values as of a time, clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from clickagg.core.ads import AdChange, AdEntry, change_of
from clickagg.core.prices import Price
from clickagg.registry import (
    AdRegistry,
    Advertiser,
    AdvertiserRegistry,
    RegistryError,
    load_ad_changes,
    load_advertisers,
    load_cpc_micros,
)


def test_loads_prices(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_text("ad_id,advertiser_id,cpc_micros\n007,adv,250000\nb,adv,0\n")
    assert load_cpc_micros(path) == {"007": 250_000, "b": 0}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("ad_id,price\na,1\n", "cpc_micros"),
        ("ad_id,cpc_micros\na,-5\n", "non-negative"),
        ("ad_id,cpc_micros\na,1\na,2\n", "twice"),
        ("ad_id,cpc_micros\na,1.5\n", "cannot read"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "ads.csv"
    path.write_text(text)
    with pytest.raises(RegistryError, match=needle):
        load_cpc_micros(path)


def test_owner_and_status_changes_are_recorded_and_leave_prices_alone(tmp_path: Path) -> None:
    ads_file = tmp_path / "ads.csv"
    ads_file.write_text("ad_id,cpc_micros,advertiser_id,status\na,100,adv-1,active\nb,7,,\n")
    registry = AdRegistry.for_data_dir(tmp_path / "data", ads_file)
    now = 1_700_000_000_000
    registry.record_changes(
        [change_of("a", now + 10, {"status": "paused", "campaign_id": "spring"})],
        by="ops",
        now_ms=now,
    )
    registry.record([Price("a", 250, now + 20)], by="ops", now_ms=now)
    book = registry.book()
    assert (book.at("a", now), book.at("a", now + 15), book.at("a", now + 20)) == (100, 100, 250)
    assert registry.entries(now)["a"] == AdEntry("a", 100, "adv-1", None, "active", 0)
    assert registry.entries(now + 15)["a"] == AdEntry(
        "a", 100, "adv-1", "spring", "paused", now + 10
    )
    assert registry.entries(now + 20)["a"].cpc_micros == 250
    assert registry.entries(now)["b"] == AdEntry("b", cpc_micros=7)
    records = registry.changes()
    assert [(r["by"], r["recorded_ms"]) for r in records] == [("ops", now)] * 2
    assert "cpc_micros" not in records[0]  # an owner or status change names no price


def test_a_change_cannot_apply_from_the_past(tmp_path: Path) -> None:
    registry = AdRegistry.for_data_dir(tmp_path)
    with pytest.raises(RegistryError, match="not from the past"):
        registry.record_changes([change_of("a", 0, {"status": "paused"})], by="x", now_ms=10_000)
    assert registry.changes() == []


def test_import_reads_optional_columns_and_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "changes.csv"
    path.write_text("ad_id,cpc_micros,status,campaign_id\na,5,,c1\nb,,paused,\n")
    assert load_ad_changes(path, 42) == [
        AdChange("a", 42, cpc_micros=5, campaign_id="c1"),
        AdChange("b", 42, status="paused"),
    ]
    path.write_text("ad_id,status\na,active\nb,gone\n")
    with pytest.raises(RegistryError, match="line 3: status must be one of"):
        load_ad_changes(path, 42)
    path.write_text("ad_id,price\na,1\n")
    with pytest.raises(RegistryError, match="unknown column"):
        load_ad_changes(path, 42)


def test_advertisers_over_the_csv_with_recorded_changes(tmp_path: Path) -> None:
    csv = tmp_path / "advertisers.csv"
    csv.write_text("advertiser_id,name,currency,time_zone\nadv-1,Acme,EUR,Europe/Paris\n")
    registry = AdvertiserRegistry.for_data_dir(tmp_path / "data", csv)
    assert registry.get("adv-1") == Advertiser("adv-1", "Acme", "EUR", "Europe/Paris")
    assert registry.get("adv-9") == Advertiser("adv-9", "adv-9", "USD", "UTC")
    registry.record("adv-1", {"time_zone": "Asia/Tokyo"}, by="ops", now_ms=5)
    registry.record("adv-2", {"name": "Beta", "currency": "JPY"}, by="ops", now_ms=6)
    assert registry.current() == {
        "adv-1": Advertiser("adv-1", "Acme", "EUR", "Asia/Tokyo"),
        "adv-2": Advertiser("adv-2", "Beta", "JPY", "UTC"),
    }
    assert [(c["by"], c["recorded_ms"]) for c in registry.changes()] == [("ops", 5), ("ops", 6)]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"time_zone": "Mars/Olympus"}, "time_zone 'Mars/Olympus' is not an IANA"),
        ({"currency": "euro"}, "currency must be an ISO 4217"),
        ({"currency": "EU"}, "currency must be an ISO 4217"),
        ({"name": ""}, "name must be"),
        ({"fax": "1"}, "unknown field"),
        ({}, "nothing to change"),
    ],
)
def test_a_bad_advertiser_change_is_refused(
    tmp_path: Path, fields: dict[str, object], needle: str
) -> None:
    registry = AdvertiserRegistry.for_data_dir(tmp_path)
    with pytest.raises(RegistryError, match=needle):
        registry.record("adv-1", fields, by="x", now_ms=1)
    assert registry.changes() == []


def test_the_advertisers_csv_refuses_a_bad_currency(tmp_path: Path) -> None:
    csv = tmp_path / "advertisers.csv"
    csv.write_text("advertiser_id,currency\nadv-1,dollars\n")
    with pytest.raises(RegistryError, match="currency"):
        load_advertisers(csv)
