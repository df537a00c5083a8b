"""QueryStore is typed per method: mypy rejects a wrong method name, keyword or value."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from mypy import api

import clickagg

SOURCE_ROOT = Path(clickagg.__file__).parent.parent  # checked as source, not as installed

GOOD = """
from clickagg.query.base import AggregateRow, QueryStore, Totals

async def use(store: QueryStore) -> int:
    rows: list[AggregateRow] = await store.aggregates(
        ad_id="a", start_ms=0, end_ms=1, granularity="hour", group_by="country"
    )
    totals: Totals = await store.window(ad_id="a", start_ms=0, end_ms=1)
    return len(rows) + totals.clicks
"""

WRONG = {
    "keyword": (
        'await store.aggregates(ad_id="a", start=0, end_ms=1, granularity="hour")',
        'Unexpected keyword argument "start"',
    ),
    "value": (
        'await store.aggregates(ad_id="a", start_ms=0, end_ms=1, granularity="week")',
        'Argument "granularity" to "aggregates" of "QueryStore" has incompatible type',
    ),
    "method": ('await store.aggregate(ad_id="a")', 'has no attribute "aggregate"'),
    "result": (
        'x: int = (await store.totals(ad_id="a", start_ms=0, end_ms=1)).ctr',
        '"Totals" has no attribute "ctr"',
    ),
}


@pytest.fixture(autouse=True)
def _source_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYPYPATH", str(SOURCE_ROOT))


def check(source: str, tmp_path: Path) -> tuple[str, int]:
    # mypy raises the interpreter's recursion limit for good (sys.setrecursionlimit); left
    # so, later tests of what exceeds the limit (hostile JSON nesting) would see another one.
    limit = sys.getrecursionlimit()
    try:
        out, err, status = run_mypy(source, tmp_path)
    finally:
        sys.setrecursionlimit(limit)
    return out + err, status


def run_mypy(source: str, tmp_path: Path) -> tuple[str, str, int]:
    return api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--config-file",
            "",
            "-c",
            source,
        ]
    )


def test_correct_use_type_checks(tmp_path: Path) -> None:
    report, status = check(GOOD, tmp_path)
    assert status == 0, report


@pytest.mark.parametrize("case", sorted(WRONG))
def test_a_wrong_call_is_a_type_error(case: str, tmp_path: Path) -> None:
    line, message = WRONG[case]
    source = GOOD + textwrap.dedent(f"""
        async def wrong(store: QueryStore) -> None:
            {line}
        """)
    report, status = check(source, tmp_path)
    assert status == 1, report
    assert message in report, report
