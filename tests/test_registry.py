"""The ad registry CSV: prices in integer micros, clear errors for a bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from clickagg.registry import RegistryError, load_cpc_micros


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
