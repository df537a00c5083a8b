"""The ad registry as of a time: each field from the last change effective by then,
checked against a plain replay of the changes one by one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickagg.core.ads import STATUSES, AdChange, AdChangeError, AdEntry, as_of, change_of


def test_a_change_sets_only_its_fields_from_its_time_on() -> None:
    base = {"a": AdEntry("a", cpc_micros=100, advertiser_id="adv-1")}
    changes = [
        AdChange("a", 1_000, status="paused"),
        AdChange("a", 2_000, cpc_micros=300, campaign_id="spring"),
        AdChange("b", 1_500, advertiser_id="adv-2"),
    ]
    assert as_of(base, changes, 999) == base
    assert as_of(base, changes, 1_000)["a"] == AdEntry(
        "a", cpc_micros=100, advertiser_id="adv-1", status="paused", since_ms=1_000
    )
    now = as_of(base, changes, 5_000)
    assert now["a"] == AdEntry("a", 300, "adv-1", "spring", "paused", since_ms=2_000)
    assert now["b"] == AdEntry("b", advertiser_id="adv-2", since_ms=1_500)  # active by default


def test_of_changes_at_the_same_time_the_one_recorded_last_wins() -> None:
    changes = [AdChange("a", 10, status="paused"), AdChange("a", 10, status="archived")]
    assert as_of({}, changes, 10)["a"].status == "archived"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cpc_micros": -1}, "cpc_micros"),
        ({"cpc_micros": "5"}, "cpc_micros"),
        ({"cpc_micros": True}, "cpc_micros"),
        ({"status": "deleted"}, "status"),
        ({"advertiser_id": ""}, "advertiser_id"),
        ({"campaign_id": "x" * 257}, "campaign_id"),
        ({"colour": "red"}, "colour"),
        ({}, "nothing to change"),
    ],
)
def test_a_bad_change_is_refused_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(AdChangeError, match=field):
        change_of("a", 0, fields)


change_fields = st.fixed_dictionaries(
    {},
    optional={
        "cpc_micros": st.integers(0, 10**9),
        "advertiser_id": st.sampled_from(["adv-1", "adv-2"]),
        "campaign_id": st.sampled_from(["c1", "c2"]),
        "status": st.sampled_from(STATUSES),
    },
).filter(bool)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 20), change_fields),
        max_size=30,
    ),
    st.integers(0, 25),
)
def test_as_of_agrees_with_replaying_every_change_due(
    raw: list[tuple[str, int, dict[str, object]]], at: int
) -> None:
    changes = [change_of(ad, when, fields) for ad, when, fields in raw]
    # Reference: for each ad and field, the value of the latest (time, record order) change.
    expected: dict[str, dict[str, object]] = {}
    for ad in {c.ad_id for c in changes if c.effective_from_ms <= at}:
        mine = [(c.effective_from_ms, i, c) for i, c in enumerate(changes) if c.ad_id == ad]
        due = [item for item in mine if item[0] <= at]
        row: dict[str, object] = {"status": "active", "since_ms": max(t for t, _, _ in due)}
        for name in ("cpc_micros", "advertiser_id", "campaign_id", "status"):
            setting = [(t, i, getattr(c, name)) for t, i, c in due if getattr(c, name) is not None]
            if setting:
                row[name] = max(setting, key=lambda item: (item[0], item[1]))[2]
        expected[ad] = row
    got = {
        ad: {k: v for k, v in entry.as_json().items() if v is not None and k != "ad_id"}
        for ad, entry in as_of({}, changes, at).items()
    }
    assert got == expected
