"""Reconciliation depends on the archive's events only: any split of them into files, in
any order, reconciled any number of times, gives the same rows — and those rows equal a
count computed here, independently, from the same events."""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.batch.reconcile import PeriodView, reconcile_hour
from clickagg.core import ids
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.windows import HOUR_MS, MINUTE_MS

HOUR = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
PRICES = {"a": 100, "b": 250}

event = st.tuples(
    st.integers(0, 30),  # id number: a small space, so copies are common
    st.sampled_from(["click", "impression"]),
    st.sampled_from(["a", "b"]),
    st.integers(-20, 80),  # minute relative to the hour: some fall outside it
    st.sampled_from(["counted", "counted", "duplicate", "late", "invalid"]),
)


def decisions(events: list[tuple[int, str, str, int, str]]) -> pa.Table:
    """Archived decisions of these events, in log order on 3 partitions (every copy of
    an id on the same partition, as the log routes them)."""
    rows = []
    offsets = Counter[int]()
    for number, kind, ad, minute, status in events:
        event_id = f"e{number}"
        code = ids.EVENT_TYPE_CODES[kind]
        partition = ids.partition_for_id(code, event_id, 3)
        fp_high, fp_low = ids.fingerprint(code, event_id)
        rows.append(
            {
                "partition": partition,
                "offset": offsets[partition],
                "event_id": event_id,
                "event_type": kind,
                "status": status,
                "reason": "rule: test" if status == "invalid" else None,
                "ad_id": ad,
                "advertiser_id": None,
                "campaign_id": None,
                "user_id": f"u{number % 7}",
                "ip": None,
                "user_agent": None,
                "country": "US" if number % 2 else None,
                "device": None,
                "browser": None,
                "ts_ms": HOUR + minute * MINUTE_MS + number,
                "received_ms": HOUR,
                "cost_micros": None,
                "spend_micros": 0,
                "fp_high": fp_high,
                "fp_low": fp_low,
            }
        )
        offsets[partition] += 1
    return pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)


def expected_clicks(table: pa.Table) -> Counter[tuple[str, int]]:
    """The first copy of each (type, id) in log order, counted in its own minute."""
    first: dict[tuple[str, str], dict[str, object]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["partition"], r["offset"])):
        first.setdefault((row["event_type"], row["event_id"]), row)
    out: Counter[tuple[str, int]] = Counter()
    for row in first.values():
        ts = int(row["ts_ms"])  # type: ignore[call-overload]
        if (
            row["event_type"] == "click"
            and row["status"] != "invalid"
            and HOUR <= ts < HOUR + HOUR_MS
        ):
            out[(str(row["ad_id"]), ts - ts % MINUTE_MS)] += 1
    return out


def reconcile(files: list[Path]) -> dict[str, pa.Table]:
    with PeriodView(files, HOUR, HOUR + HOUR_MS) as view:
        result = reconcile_hour(view, HOUR, cpc_micros=PRICES)
    return {"minute": result.minute, **result.dimensions, "report": result.report}


@settings(max_examples=25, deadline=None)
@given(st.lists(event, min_size=1, max_size=60), st.integers(0, 2**32), st.integers(1, 6))
def test_any_split_any_order_any_rerun_gives_the_same_exact_rows(
    events: list[tuple[int, str, str, int, str]], seed: int, parts: int
) -> None:
    table = decisions(events)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        whole = root / "whole.parquet"
        pq.write_table(table, whole)
        reference = reconcile([whole])

        rnd = random.Random(seed)
        shuffled = table.take(rnd.sample(range(table.num_rows), table.num_rows))
        cuts = (
            sorted(rnd.sample(range(1, table.num_rows), min(parts, table.num_rows) - 1))
            if table.num_rows > 1
            else []
        )
        files = []
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, table.num_rows], strict=True)):
            path = root / f"part-{i}.parquet"
            pq.write_table(shuffled.slice(lo, hi - lo), path)
            files.append(path)
        rnd.shuffle(files)
        for _ in range(2):  # a rerun changes nothing
            assert reconcile(files) == reference

    minute = reference["minute"].to_pylist()
    got = Counter({(r["ad_id"], r["minute_ms"]): r["clicks"] for r in minute if r["clicks"]})
    assert got == expected_clicks(table)
    spend = {(r["ad_id"], r["minute_ms"]): r["spend_micros"] for r in minute}
    for key, clicks in got.items():
        assert spend[key] == clicks * PRICES[key[0]]
