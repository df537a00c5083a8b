"""Reconciliation depends on the archive's events only: any split of them into files, in
any order, reconciled any number of times, gives the same rows — and those rows equal a
count computed here, independently, from the same events. So do the behavioural rules,
which judge the hour with the events before it as context."""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.batch.reconcile import PeriodView, context_start, reconcile_hour
from clickagg.core import ids
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.rules import RuleSet, RuleSpec, compile_rules
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
                "user_id": f"u{number % 7}" if number % 5 else None,
                "ip": f"10.0.0.{number % 3}",
                "user_agent": "Mozilla/5.0",
                "country": "US" if number % 2 else None,
                "device": "mobile" if number % 4 else None,
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


def reconcile(files: list[Path], rules: RuleSet | None = None) -> dict[str, pa.Table]:
    lookback = rules.lookback_ms if rules else 0
    with PeriodView(files, context_start(HOUR, lookback), HOUR + HOUR_MS) as view:
        if rules is None:
            result = reconcile_hour(view, HOUR, cpc_micros=PRICES)
        else:
            result = reconcile_hour(
                view,
                HOUR,
                cpc_micros=PRICES,
                invalid=rules.batch_reasons,
                review=rules.batch_reviews,
                lookback_ms=lookback,
            )
    return {"minute": result.minute, **result.dimensions, "report": result.report}


def split(table: pa.Table, root: Path, seed: int, parts: int) -> list[Path]:
    """The table shuffled and cut into ``parts`` files, listed in a shuffled order."""
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
    return files


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

        files = split(table, root, seed, parts)
        for _ in range(2):  # a rerun changes nothing
            assert reconcile(files) == reference

    minute = reference["minute"].to_pylist()
    got = Counter({(r["ad_id"], r["minute_ms"]): r["clicks"] for r in minute if r["clicks"]})
    assert got == expected_clicks(table)
    spend = {(r["ad_id"], r["minute_ms"]): r["spend_micros"] for r in minute}
    for key, clicks in got.items():
        assert spend[key] == clicks * PRICES[key[0]]


WINDOW_S = 5 * 60
FARM = {"min_ips": 3, "min_clicks": 4, "window_hours": 1}


def behavioural_rules() -> RuleSet:
    specs = [
        RuleSpec("repeat", "repeat_click", "repeat", {"window_seconds": WINDOW_S}),
        RuleSpec("spread", "ip_ad_spread", "spread", {"max_ads": 1, "window_minutes": 3}),
        RuleSpec("ctr", "ctr_spike", "ctr", {"factor": 2.0, "baseline_hours": 1, "min_clicks": 2}),
        RuleSpec("farm", "shared_agent_ad_spread", "farm", FARM),
    ]
    return RuleSet(compile_rules(specs))


def winners(table: pa.Table, lookback_ms: int) -> list[dict[str, Any]]:
    """The first copy of each (type, id) in log order, from the lookback before the hour
    to its end, in time order (log order for equal times)."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["partition"], r["offset"])):
        first.setdefault((row["event_type"], row["event_id"]), row)
    return sorted(
        (r for r in first.values() if HOUR - lookback_ms <= r["ts_ms"] < HOUR + HOUR_MS),
        key=lambda r: (r["ts_ms"], r["partition"], r["offset"]),
    )


def expected_invalid_clicks(table: pa.Table, lookback_ms: int) -> Counter[tuple[str, int]]:
    """Invalid clicks of the hour per (ad, minute) under the stream's verdicts and the
    repeat-click rule alone: the winners from the lookback on, in time order (event id
    order for equal times, as the rule takes them), the visitor's counted click per ad
    carried along."""
    seen = sorted(winners(table, lookback_ms), key=lambda r: (r["ts_ms"], r["event_id"]))
    counted: dict[tuple[str, object], int] = {}
    out: Counter[tuple[str, int]] = Counter()
    for row in seen:
        if row["event_type"] != "click":
            continue
        ts = int(row["ts_ms"])  # type: ignore[call-overload]
        visitor = f"u:{row['user_id']}" if row["user_id"] else f"a:{row['ip']} {row['user_agent']}"
        anchor = counted.get((visitor, row["ad_id"]))
        repeat = anchor is not None and ts - anchor < WINDOW_S * 1000
        if not repeat:
            counted[(visitor, row["ad_id"])] = ts
        if ts >= HOUR and (repeat or row["status"] == "invalid"):
            out[(str(row["ad_id"]), ts - ts % MINUTE_MS)] += 1
    return out


# Many near the hour's start (repeats across it), others in the context (1 h) and beyond.
near_the_hour = st.tuples(
    st.integers(0, 30),
    st.sampled_from(["click", "click", "impression"]),
    st.sampled_from(["a", "b"]),
    st.one_of(st.integers(-3, 3), st.integers(-75, 70)),
    st.sampled_from(["counted", "counted", "duplicate", "late", "invalid"]),
)


@settings(max_examples=30, deadline=None)
@given(st.lists(near_the_hour, min_size=1, max_size=60), st.integers(0, 2**32), st.integers(1, 6))
def test_the_behavioural_rules_see_the_hours_context_whatever_the_split(
    events: list[tuple[int, str, str, int, str]], seed: int, parts: int
) -> None:
    table = decisions(events)
    rules = behavioural_rules()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        whole = root / "whole.parquet"
        pq.write_table(table, whole)
        reference = reconcile([whole], rules)
        assert reconcile(split(table, root, seed, parts), rules) == reference

    repeat_only = RuleSet(compile_rules([behavioural_rules().rules[0].spec]))
    with tempfile.TemporaryDirectory() as tmp:
        files = split(table, Path(tmp), seed, parts)
        minute = reconcile(files, repeat_only)["minute"].to_pylist()
    got = Counter(
        {(r["ad_id"], r["minute_ms"]): r["invalid_clicks"] for r in minute if r["invalid_clicks"]}
    )
    assert got == expected_invalid_clicks(table, repeat_only.lookback_ms)


def expected_farm_clicks(table: pa.Table, lookback_ms: int) -> Counter[tuple[str, int]]:
    """Invalid clicks of the hour per (ad, minute) under the stream's verdicts and the
    shared-agent rule alone: a click whose (agent, device, ad) has at least ``min_ips``
    addresses and ``min_clicks`` clicks among the winning clicks of the window to it."""
    keys = ("user_agent", "device", "ad_id", "ip")
    seen = winners(table, lookback_ms)
    clicks = [r for r in seen if r["event_type"] == "click"]
    judged = [r for r in clicks if all(r[k] is not None for k in keys)]
    window_ms = FARM["window_hours"] * HOUR_MS
    out: Counter[tuple[str, int]] = Counter()
    for row in clicks:
        ts = row["ts_ms"]
        if ts < HOUR:
            continue
        window = [
            r
            for r in judged
            if row in judged
            and all(r[k] == row[k] for k in keys[:3])
            and ts - window_ms <= r["ts_ms"] <= ts
        ]
        farm = len({r["ip"] for r in window}) >= FARM["min_ips"] and (
            len(window) >= FARM["min_clicks"]
        )
        if farm or row["status"] == "invalid":
            out[(str(row["ad_id"]), ts - ts % MINUTE_MS)] += 1
    return out


@settings(max_examples=30, deadline=None)
@given(st.lists(near_the_hour, min_size=1, max_size=60), st.integers(0, 2**32), st.integers(1, 6))
def test_the_shared_agent_rule_judges_the_hour_with_its_window_before_it_whatever_the_split(
    events: list[tuple[int, str, str, int, str]], seed: int, parts: int
) -> None:
    table = decisions(events)
    farm_only = RuleSet(compile_rules([RuleSpec("farm", "shared_agent_ad_spread", "f", FARM)]))
    assert farm_only.lookback_ms == HOUR_MS
    with tempfile.TemporaryDirectory() as tmp:
        files = split(table, Path(tmp), seed, parts)
        minute = reconcile(files, farm_only)["minute"].to_pylist()
    got = Counter(
        {(r["ad_id"], r["minute_ms"]): r["invalid_clicks"] for r in minute if r["invalid_clicks"]}
    )
    assert got == expected_farm_clicks(table, farm_only.lookback_ms)
