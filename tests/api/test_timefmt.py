"""Times at the HTTP edge take exactly what the OpenAPI document says they take."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickagg.api.errors import ApiError
from clickagg.api.openapi import build
from clickagg.api.timefmt import parse_time
from clickagg.config import Settings


def decimal_pattern() -> str:
    document = build(Settings(), now_ms=1_700_000_000_000)
    [start] = [
        p for p in document["paths"]["/aggregates"]["get"]["parameters"] if p["name"] == "start"
    ]
    patterns = [s["pattern"] for s in start["schema"]["anyOf"] if "pattern" in s]
    return str(min(patterns, key=len))  # the decimal one (the others spell out date-times)


@given(whole=st.integers(0, 10**14 - 1), fraction=st.text("0123456789", min_size=1, max_size=9))
def test_a_decimal_time_is_taken_exactly_when_the_document_allows_it(
    whole: int, fraction: str
) -> None:
    text = f"{whole}.{fraction}"
    allowed = re.fullmatch(decimal_pattern().strip("^$"), text) is not None
    try:
        parse_time("start", text)
        taken = True
    except ApiError as error:
        taken = False
        assert error.status == 400 and "start=" in error.detail
    assert taken == allowed


def test_too_many_decimals_are_refused_by_name() -> None:
    with pytest.raises(ApiError, match="at most 14 digits before the point and 6 after"):
        parse_time("at", "0.46347537285923207")
    assert parse_time("at", "1700000000.5") == 1_700_000_000_500
