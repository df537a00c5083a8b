"""The visitor-keyed family's pure half against the batch: whatever the split of the same
clicks into source partitions, rounds, keyed partitions and reads, with records appended
twice, the stream flags exactly the clicks the batch's ``repeat_click`` flags hour by hour
(with its lookback as context, as reconciliation judges them), with the same rule and the
same evidence, and corrects each once."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core import ids, visitor
from clickagg.core.rules import RuleSet, RuleSpec, compile_rules
from clickagg.core.visitor import (
    VISITOR_RECORD_SCHEMA,
    VISITOR_VERDICT_SCHEMA,
    RepeatRule,
    VisitorRules,
    VisitorWindows,
    visitor_partition,
    visitor_records,
)
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.keyed.snapshots import decode_visitor_windows, encode_windows

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
# (user, ip, agent): by user, by address + agent, and one with no key (never judged)
VISITORS = (
    ("u1", "203.0.113.1", "UA"),
    ("u2", None, None),
    (None, "203.0.113.1", "UA"),
    (None, "203.0.113.1", "Other"),
    (None, "198.51.100.2", None),
)
JITTER_MS = 20 * MINUTE_MS  # how far out of event time order clicks arrive
HORIZON_MS = 30 * MINUTE_MS  # more than the jitter: no click is too late


@dataclass(frozen=True)
class Click:
    visitor: int
    ad: int
    ts_ms: int
    counted: bool  # False: a stage-1 rule flagged it
    jitter_ms: int


clicks_strategy = st.lists(
    st.builds(
        Click,
        visitor=st.integers(0, len(VISITORS) - 1),
        ad=st.integers(0, 2),
        # 3 h 20 min on a 4 min grid: equal times, hour edges and long chains happen often
        ts_ms=st.integers(0, 50).map(lambda n: T0 + n * 4 * MINUTE_MS),
        counted=st.sampled_from([True, True, True, False]),
        jitter_ms=st.integers(0, JITTER_MS // MINUTE_MS).map(lambda n: n * MINUTE_MS),
    ),
    max_size=80,
)
SENTINEL = Click(0, 0, T0 + 10 * HOUR_MS, True, 0)  # moves the horizon past every click


def kept_frame(
    clicks: list[tuple[int, Click]], partition: int, offsets: dict[int, int]
) -> pl.DataFrame:
    """What stage 1's ``BatchOutcome.kept`` holds for a round of one source partition."""
    rows = []
    for number, click in clicks:
        user, ip, agent = VISITORS[click.visitor]
        rows.append(
            {
                "event_type": ids.CLICK,
                "ip": ip,
                "user_id": user,
                "user_agent": agent,
                "ad_id": f"ad-{click.ad}",
                "advertiser_id": "adv",
                "campaign_id": None,
                "country": "US",
                "device": None,
                "browser": None,
                "ts_ms": click.ts_ms,
                "event_id": f"e{number}",
                "partition": partition,
                "offset": offsets[number],
                "spend_micros": 1_000 + number,
                "invalid": not click.counted,
            }
        )
    schema = {
        "event_type": pl.UInt8,
        **dict.fromkeys(["ip", "user_id", "user_agent", "ad_id", "advertiser_id"], pl.String),
        **dict.fromkeys(["campaign_id", "country", "device", "browser"], pl.String),
        "ts_ms": pl.Int64,
        "event_id": pl.String,
        "partition": pl.Int64,
        "offset": pl.Int64,
        "spend_micros": pl.Int64,
        "invalid": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)


def batch_verdicts(clicks: list[Click], ruleset: RuleSet, seed: int) -> dict[str, tuple[str, str]]:
    """What reconciliation's ``invalid_reason`` says per flagged event id (rule, evidence):
    each hour judged with every earlier click as context (the rule takes its own lookback
    of it), the archive's rows in an arbitrary order."""
    order = list(range(len(clicks)))
    random.Random(seed).shuffle(order)
    decisions = pl.DataFrame(
        {
            "event_type": ["click"] * len(order),
            "event_id": [f"e{n}" for n in order],
            "user_id": [VISITORS[clicks[n].visitor][0] for n in order],
            "ip": [VISITORS[clicks[n].visitor][1] for n in order],
            "user_agent": [VISITORS[clicks[n].visitor][2] for n in order],
            "ad_id": [f"ad-{clicks[n].ad}" for n in order],
            "ts_ms": [clicks[n].ts_ms for n in order],
        },
        schema={
            **dict.fromkeys(["event_type", "event_id", "user_id", "ip", "user_agent"], pl.String),
            "ad_id": pl.String,
            "ts_ms": pl.Int64,
        },
    )
    out: dict[str, tuple[str, str]] = {}
    for hour in sorted({c.ts_ms - c.ts_ms % HOUR_MS for c in clicks}):
        seen = decisions.filter(pl.col("ts_ms") < hour + HOUR_MS)
        reasons = ruleset.batch_reasons(seen, hour)
        for event_id, reason in zip(seen["event_id"], reasons, strict=True):
            if reason is not None:
                rule, _, evidence = reason.split(": ", 2)
                out[event_id] = (rule, evidence)
    return out


@contextmanager
def pruning(eagerly: bool) -> Iterator[None]:
    """Chains pruned as soon as they may be (small frames never reach the usual bound)."""
    usual = visitor.PRUNE_AT_ROWS
    visitor.PRUNE_AT_ROWS = 0 if eagerly else usual
    try:
        yield
    finally:
        visitor.PRUNE_AT_ROWS = usual


def cuts(draw: st.DrawFn, n: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))


def pieces(n: int, at: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *at, n]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


REPEAT = RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 600})
LONG = RuleSpec("long", "repeat_click", "long repeat", {"window_seconds": 5400})
MID = RuleSpec("mid", "repeat_click", "mid repeat", {"window_seconds": 1500})


@settings(max_examples=100, deadline=None)
@given(drawn=clicks_strategy, keyed=st.sampled_from([1, 4, 16]), data=st.data())
def test_the_stream_flags_what_the_batch_flags_hour_by_hour_whatever_the_split(
    drawn: list[Click], keyed: int, data: st.DataObject
) -> None:
    specs = data.draw(st.sampled_from([[REPEAT], [LONG], [MID, REPEAT], [REPEAT, LONG, MID]]))
    effective = data.draw(st.sampled_from([None, T0 + 90 * MINUTE_MS]))
    specs = [RuleSpec(s.id, s.kind, s.reason, s.params, effective_from_ms=effective) for s in specs]
    ruleset = RuleSet(compile_rules(specs))
    rules = VisitorRules.from_ruleset(ruleset)
    assert rules.ids == [s.id for s in specs]

    # Arrival order: event time, each click up to JITTER_MS late.
    clicks = [*drawn, SENTINEL]
    arrival = sorted(range(len(drawn)), key=lambda n: drawn[n].ts_ms + drawn[n].jitter_ms)

    sources = data.draw(st.integers(1, 3))
    offsets: dict[int, int] = {}
    per_source: Counter[int] = Counter()
    for number in arrival:
        offsets[number] = per_source[number % sources]
        per_source[number % sources] += 1
    logs: dict[int, list[pa.Table]] = {k: [] for k in range(keyed)}
    appended: list[dict[int, pa.Table]] = []
    for a, b in pieces(len(arrival), cuts(data.draw, len(arrival))):
        # One round: every source's events of the slice, appended together (step_all).
        kept = pl.concat(
            [
                kept_frame([(n, clicks[n]) for n in arrival[a:b] if n % sources == p], p, offsets)
                for p in range(sources)
            ]
        )
        rounds = [visitor_records(kept, keyed)]
        appended += rounds
        for round_ in rounds + data.draw(st.lists(st.sampled_from(appended), max_size=2)):
            for k, table in round_.items():
                logs[k].append(table)
    # Last, a sentinel reaches every keyed partition (in production: the stream goes on).
    for k in range(keyed):
        tick = kept_frame([(len(drawn), SENTINEL)], sources + k, {len(drawn): 0})
        logs[k].append(next(iter(visitor_records(tick, 1).values())))

    # The log is JITTER_MS out of event time order at most, whatever the number of sources:
    # a round interleaves its sources by event time (``records_by_partition``), so the
    # horizon decides as the stream goes and no record is too late.
    horizon = HORIZON_MS
    verdicts: list[pa.Table] = []
    with pruning(data.draw(st.booleans())):
        for tables in logs.values():
            log = pa.concat_tables([VISITOR_RECORD_SCHEMA.empty_table(), *tables])
            windows = VisitorWindows(horizon_ms=horizon)
            for a, b in pieces(log.num_rows, cuts(data.draw, log.num_rows)):
                verdicts.append(windows.consume(log.slice(a, b - a), rules))
    stream: dict[str, tuple[str, str]] = {}
    for row in pa.concat_tables([VISITOR_VERDICT_SCHEMA.empty_table(), *verdicts]).to_pylist():
        assert row["counted"] and row["previous_rule_id"] is None
        assert row["event_id"] not in stream  # each click decided once, copies or not
        stream[row["event_id"]] = (row["rule_id"], row["evidence"])

    batch = batch_verdicts(clicks, ruleset, data.draw(st.integers(0, 2**16)))
    counted = {f"e{n}" for n, c in enumerate(drawn) if c.counted}
    assert stream == {e: verdict for e, verdict in batch.items() if e in counted}


@settings(max_examples=50, deadline=None)
@given(drawn=clicks_strategy, data=st.data())
def test_verdicts_do_not_depend_on_the_reads_even_past_the_horizon(
    drawn: list[Click], data: st.DataObject
) -> None:
    """With a horizon shorter than the disorder, some records are too late: which ones, and
    every verdict, depend on the records alone, not on where the reads cut the log."""
    rules = VisitorRules.from_ruleset(RuleSet(compile_rules([REPEAT, MID])))
    clicks = [*drawn, SENTINEL]
    offsets = {n: n for n in range(len(clicks))}
    log = visitor_records(kept_frame(list(enumerate(clicks)), 0, offsets), 1)[0]

    def run(at: list[int]) -> tuple[list[tuple[str, str, str]], int, int | None]:
        windows = VisitorWindows(horizon_ms=5 * MINUTE_MS)
        out = [windows.consume(log.slice(a, b - a), rules) for a, b in pieces(log.num_rows, at)]
        table = pa.concat_tables([VISITOR_VERDICT_SCHEMA.empty_table(), *out])
        rows = zip(
            *(table[c].to_pylist() for c in ("event_id", "rule_id", "evidence")), strict=True
        )
        return sorted(rows), windows.max_event_ms, windows.decided_until_ms

    with pruning(data.draw(st.booleans())):
        assert run(cuts(data.draw, log.num_rows)) == run([])


def test_a_late_earlier_click_becomes_the_counted_one_before_any_verdict() -> None:
    """20 s and 40 s arrive, then 0 s (window 30 s): judged on arrival, 20 s would count and
    40 s be its repeat; with 0 s, 0 s and 40 s count and 20 s is the repeat. Nothing is
    decided until the horizon has passed all three, so only 20 s is ever flagged."""
    rules = VisitorRules((RepeatRule("rep", "repeat", 30),))
    at = [20_000, 40_000, 0]
    clicks = [Click(1, 0, T0 + s, True, 0) for s in at]
    frame = kept_frame(list(enumerate(clicks)), 0, {0: 0, 1: 1, 2: 2})
    windows = VisitorWindows(horizon_ms=MINUTE_MS)
    first = windows.consume(visitor_records(frame[:2], 1)[0], rules)
    late = windows.consume(visitor_records(frame[2:], 1)[0], rules)
    assert first.num_rows == late.num_rows == 0  # undecided: within the horizon
    tick = kept_frame([(9, Click(0, 0, T0 + 2 * MINUTE_MS, True, 0))], 1, {9: 0})
    decided = windows.consume(visitor_records(tick, 1)[0], rules)
    assert decided["event_id"].to_pylist() == ["e0"]
    assert decided["evidence"].to_pylist() == [
        "user u2 clicked ad ad-0 again 20.0 s after its counted click at 2023-11-14T22:00:00.000Z"
    ]
    assert windows.decided_until_ms == T0 + MINUTE_MS


def test_equal_times_count_the_smaller_event_id_and_a_keyless_click_is_not_a_record() -> None:
    clicks = [Click(1, 0, T0, True, 0), Click(1, 0, T0, True, 0), Click(4, 0, T0, True, 0)]
    # e1 arrives first, e0 second: e0 is still the one that counts
    frame = kept_frame([(1, clicks[1]), (0, clicks[0]), (2, clicks[2])], 0, {1: 0, 0: 1, 2: 2})
    records = visitor_records(frame, 1)[0]
    assert records["event_id"].to_pylist() == ["e1", "e0"]  # the keyless click is not sent
    assert records["visitor"].to_pylist() == ["u:u2", "u:u2"]
    windows = VisitorWindows(horizon_ms=MINUTE_MS)
    rules = VisitorRules((RepeatRule("rep", "repeat", 30),))
    windows.consume(records, rules)
    tick = kept_frame([(9, Click(0, 0, T0 + 2 * MINUTE_MS, True, 0))], 1, {9: 0})
    assert windows.consume(visitor_records(tick, 1)[0], rules)["event_id"].to_pylist() == ["e1"]


def test_the_rules_in_force_as_a_recordable_value_and_a_stable_partition() -> None:
    ruleset = RuleSet(compile_rules([MID, REPEAT]))
    rules = VisitorRules.from_ruleset(ruleset)
    assert VisitorRules.from_json(rules.to_json()) == rules
    assert rules.lookback_ms == HOUR_MS
    assert VisitorRules.from_ruleset(RuleSet(compile_rules([LONG]))).lookback_ms == 5_400_000
    assert visitor_partition("u:u1", 16) == visitor_partition("u:u1", 16)
    assert {visitor_partition(f"u:{n}", 4) for n in range(50)} == {0, 1, 2, 3}


def test_each_hour_starts_its_chains_where_the_batch_starts_them() -> None:
    """A click every 20 min for three hours, window 30 min: over all time 2:00 would count
    (0:00, 0:40, 1:20, 2:00), but the batch judges 2:00's hour from 1:00 on (1:00, 1:40
    count, 2:00 repeats 1:40), and so does the stream."""
    spec = RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 1800})
    ruleset = RuleSet(compile_rules([spec]))
    rules = VisitorRules.from_ruleset(ruleset)
    drawn = [Click(1, 0, T0 + n * 20 * MINUTE_MS, True, 0) for n in range(10)]
    frame = kept_frame(list(enumerate(drawn)), 0, {n: n for n in range(10)})
    windows = VisitorWindows(horizon_ms=HORIZON_MS)
    verdicts = [windows.consume(visitor_records(frame[n : n + 1], 1)[0], rules) for n in range(10)]
    tick = kept_frame([(99, Click(0, 0, T0 + 10 * HOUR_MS, True, 0))], 1, {99: 0})
    verdicts.append(windows.consume(visitor_records(tick, 1)[0], rules))
    table = pa.concat_tables(verdicts)
    stream = dict(zip(table["event_id"].to_pylist(), table["rule_id"].to_pylist(), strict=True))
    assert stream == {e: rule for e, (rule, _) in batch_verdicts(drawn, ruleset, 0).items()}
    assert "e6" in stream  # 2:00
    named = frame.with_columns(pl.lit("click").alias("event_type"))
    assert ruleset.rules[0].batch(named)[6] is None  # all at once, from 0:00


def test_a_snapshot_keeps_what_was_decided_even_under_a_longer_horizon() -> None:
    rules = VisitorRules((RepeatRule("rep", "repeat", 30),))
    clicks = [Click(1, 0, T0 + s * 1000, True, 0) for s in (0, 10, 50, 55)]
    frame = kept_frame(list(enumerate(clicks)), 0, {n: n for n in range(4)})
    windows = VisitorWindows(horizon_ms=MINUTE_MS)
    windows.consume(visitor_records(frame, 1)[0], rules)
    tick = kept_frame([(9, Click(0, 0, T0 + MINUTE_MS + 52_000, True, 0))], 1, {9: 0})
    first = windows.consume(visitor_records(tick, 1)[0], rules)
    assert first["event_id"].to_pylist() == ["e1"]  # 55 s is not past the horizon yet
    restored = decode_visitor_windows(encode_windows(windows), 10 * MINUTE_MS)
    assert restored.decided_until_ms == windows.decided_until_ms
    assert restored.high_water == windows.high_water
    assert restored.kept().equals(windows.kept())
    later = kept_frame([(10, Click(0, 0, T0 + 20 * MINUTE_MS, True, 0))], 1, {10: 1})
    again = restored.consume(visitor_records(later, 1)[0], rules)
    assert again["event_id"].to_pylist() == ["e3"]  # e1 is not decided twice


def test_a_window_coming_into_force_judges_only_hours_whose_lookback_it_saw() -> None:
    """A rule switched on while the stream runs has no chains before that: it leaves the
    hours whose lookback began earlier to the batch (judged with clicks it never kept, a
    verdict could be wrong either way) and judges the next ones exactly as the batch does."""
    spec = RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 1800})
    ruleset = RuleSet(compile_rules([spec]))
    rules = VisitorRules.from_ruleset(ruleset)
    # a click every 20 min for four hours: each hour has repeats the batch flags
    drawn = [Click(1, 0, T0 + n * 20 * MINUTE_MS, True, 0) for n in range(12)]
    frame = kept_frame(list(enumerate(drawn)), 0, {n: n for n in range(12)})
    windows = VisitorWindows(horizon_ms=MINUTE_MS)
    none = VisitorRules(())
    early = [windows.consume(visitor_records(frame[n : n + 1], 1)[0], none) for n in range(2)]
    assert all(t.num_rows == 0 for t in early)
    switched_on_at = windows.decided_until_ms  # 20 min past 0:00, minus the horizon
    assert switched_on_at == T0 + 19 * MINUTE_MS
    later = [windows.consume(visitor_records(frame[n : n + 1], 1)[0], rules) for n in range(2, 12)]
    tick = kept_frame([(99, Click(0, 0, T0 + 10 * HOUR_MS, True, 0))], 1, {99: 0})
    later.append(windows.consume(visitor_records(tick, 1)[0], rules))
    table = pa.concat_tables(later)
    stream = set(table["event_id"].to_pylist())
    batch = batch_verdicts(drawn, ruleset, 0)
    # hour 0 (lookback from -1:00) and hour 1 (from 0:00) began before the switch: left
    # to the batch; from hour 2 (lookback from 1:00) on, exactly the batch's verdicts
    judged = {f"e{n}" for n in range(6, 12)}
    assert stream == {e for e in batch if e in judged}
    assert stream  # the later hours do have repeats
    assert {f"e{n}" for n in range(6)} & set(batch)  # and so did the ones left


def test_the_state_keeps_undecided_clicks_and_a_window_of_counted_ones() -> None:
    """At a steady rate over hours the state holds the undecided clicks whole and, per
    window and open hour, only the counted clicks a later click could still repeat."""
    rules = VisitorRules((RepeatRule("rep", "repeat", 30),))
    windows = VisitorWindows(horizon_ms=2 * MINUTE_MS)
    step_ms = 5_000
    n = 3 * HOUR_MS // step_ms  # three hours, one click every 5 s, 40 visitors, 2 ads
    clicks = [Click(n % len(VISITORS), n % 2, T0 + n * step_ms, True, 0) for n in range(n)]
    frame = kept_frame(list(enumerate(clicks)), 0, {i: i for i in range(n)})
    with pruning(True):
        for a in range(0, n, 60):
            windows.consume(visitor_records(frame[a : a + 60], 1)[0], rules)
            until = windows.decided_until_ms
            assert until is not None
            kept = windows.kept()
            assert kept["ts_ms"].min() >= until  # nothing decided is kept whole
            assert kept.height <= 2 * MINUTE_MS // step_ms + 60
            _, anchors = windows.chains()
            # pruned lazily: at most twice what a prune leaves, which is the last window
            assert anchors.num_rows <= 2 * 2 * (30_000 // step_ms + 1) * 2 + 1
    _, anchors = windows.chains()
    assert anchors.num_rows > 0


def test_a_snapshot_of_a_build_that_kept_decided_clicks_whole_restores() -> None:
    """Such a snapshot is one Arrow stream of the kept clicks (decided ones too): it
    restores with the undecided ones and no chains, so its windows judge afresh."""
    rules = VisitorRules((RepeatRule("rep", "repeat", 30),))
    clicks = [Click(1, 0, T0 + s * 1000, True, 0) for s in (0, 10, 50, 55, 200)]
    frame = kept_frame(list(enumerate(clicks)), 0, {n: n for n in range(5)})
    records = visitor_records(frame, 1)[0]
    table = pl.from_arrow(records)
    assert isinstance(table, pl.DataFrame)
    kept = table.with_columns(pl.Series("keyed_offset", range(5), pl.Int64)).to_arrow()
    meta = {"high_water": {"0": 4}, "max_event_ms": T0 + 200_000, "decided_until_ms": T0 + 52_000}
    kept = kept.replace_schema_metadata({b"clickagg.keyed_windows": json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, kept.schema) as stream:
        stream.write_table(kept)
    legacy = sink.getvalue().to_pybytes()
    restored = decode_visitor_windows(legacy, MINUTE_MS)
    assert restored.kept()["event_id"].to_list() == ["e3", "e4"]  # at or after 52 s
    assert restored.chains()[0] == {}
    assert restored.high_water == {0: 4}
    tick = kept_frame([(9, Click(0, 0, T0 + 20 * MINUTE_MS, True, 0))], 1, {9: 0})
    # 55 s would repeat 50 s, but the window starts at 52 s: its hour is left to the batch
    assert restored.consume(visitor_records(tick, 1)[0], rules).num_rows == 0
    again = decode_visitor_windows(encode_windows(restored), MINUTE_MS)
    assert again.chains()[0] == {30_000: T0 + 52_000}


def test_a_click_below_the_decided_bound_under_a_longer_horizon_is_not_decided() -> None:
    """Restored under a longer horizon, the stage accepts a click older than its decided
    bound. Deciding it would give a verdict below the bound the family settled (the store
    may have forgotten that click's correction by then), and put it in chains whose counted
    clicks it would precede: 35 s would read as a repeat of it, and 62 s, the batch's repeat
    of 35 s, as counted. Neither decided nor a chain's click, it is left to the batch."""
    rules = VisitorRules((RepeatRule("rep", "repeat", 30),))
    clicks = [Click(1, 0, T0 + s * 1000, True, 0) for s in (0, 35, 20, 62)]
    frame = kept_frame(list(enumerate(clicks)), 0, {n: n for n in range(4)})
    windows = VisitorWindows(horizon_ms=MINUTE_MS)
    windows.consume(visitor_records(frame[:2], 1)[0], rules)
    tick = kept_frame([(9, Click(0, 0, T0 + 2 * MINUTE_MS, True, 0))], 1, {9: 0})
    assert windows.consume(visitor_records(tick, 1)[0], rules).num_rows == 0  # both count
    bound = windows.decided_until_ms
    assert bound == T0 + MINUTE_MS
    restored = decode_visitor_windows(encode_windows(windows), 10 * MINUTE_MS)
    restored.consume(visitor_records(frame[2:], 1)[0], rules)  # 20 s: below the bound
    later = kept_frame([(10, Click(0, 0, T0 + 20 * MINUTE_MS, True, 0))], 1, {10: 1})
    decided = restored.consume(visitor_records(later, 1)[0], rules)
    assert all(ts >= bound for ts in decided["ts_ms"].to_pylist())
    assert decided["event_id"].to_pylist() == ["e3"]
    assert decided["evidence"].to_pylist() == [
        "user u2 clicked ad ad-0 again 27.0 s after its counted click at 2023-11-14T22:00:35.000Z"
    ]


def test_a_rule_whose_window_leaves_an_hour_to_the_batch_lets_no_later_rule_name_it() -> None:
    """``mid`` (25 min) is switched on ahead of ``rep`` (10 min) while the stream runs: its
    window leaves hour 1 (lookback from 0:00, before the switch) to the batch. The batch
    names ``mid`` for 1:05, the first rule in order that flags it; the stream must not name
    ``rep`` for it (nor anything: the hour is the batch's to close)."""
    ruleset = RuleSet(compile_rules([MID, REPEAT]))
    before = VisitorRules.from_ruleset(RuleSet(compile_rules([REPEAT])))
    after = VisitorRules.from_ruleset(ruleset)
    drawn = [Click(1, 0, T0 + m * MINUTE_MS, True, 0) for m in (10, 60, 65)]
    frame = kept_frame(list(enumerate(drawn)), 0, {n: n for n in range(3)})
    windows = VisitorWindows(horizon_ms=MINUTE_MS)
    tick = kept_frame([(9, Click(0, 0, T0 + 12 * MINUTE_MS, True, 0))], 1, {9: 0})
    verdicts = [
        windows.consume(visitor_records(frame[:1], 1)[0], before),
        windows.consume(visitor_records(tick, 1)[0], before),
    ]
    assert windows.decided_until_ms == T0 + 11 * MINUTE_MS  # mid comes into force here
    verdicts.append(windows.consume(visitor_records(frame[1:], 1)[0], after))
    end = kept_frame([(10, Click(0, 0, T0 + 10 * HOUR_MS, True, 0))], 1, {10: 1})
    verdicts.append(windows.consume(visitor_records(end, 1)[0], after))
    table = pa.concat_tables(verdicts)
    batch = batch_verdicts(drawn, ruleset, 0)
    assert batch["e2"][0] == "mid"
    stream = dict(
        zip(
            table["event_id"].to_pylist(),
            zip(table["rule_id"].to_pylist(), table["evidence"].to_pylist(), strict=True),
            strict=True,
        )
    )
    assert stream == {}


RULE_SETS = (
    VisitorRules((RepeatRule("rep", "repeat", 600),)),
    VisitorRules((RepeatRule("long", "long repeat", 5400),)),
    VisitorRules((RepeatRule("mid", "mid repeat", 1500), RepeatRule("rep", "repeat", 600))),
    VisitorRules(()),
    # two rules sharing a window, the first in force only from 1:30
    VisitorRules(
        (
            RepeatRule("late", "late repeat", 600, T0 + 90 * MINUTE_MS),
            RepeatRule("rep", "repeat", 600),
            RepeatRule("long", "long repeat", 5400),
        )
    ),
)


# Few chains, many clicks each: a chain's counted click is often within a window of the
# next click across a consume (what a snapshot must carry).
dense_clicks = st.lists(
    st.builds(
        Click,
        visitor=st.integers(0, 2),
        ad=st.integers(0, 1),
        ts_ms=st.integers(0, 100).map(lambda n: T0 + n * 2 * MINUTE_MS),
        counted=st.sampled_from([True, True, True, False]),
        jitter_ms=st.integers(0, JITTER_MS // MINUTE_MS).map(lambda n: n * MINUTE_MS),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=100, deadline=None)
@given(drawn=dense_clicks, data=st.data())
def test_a_snapshot_restored_between_any_consumes_gives_the_verdicts_of_an_unbroken_run(
    drawn: list[Click], data: st.DataObject
) -> None:
    """Whatever the rules at each consume (switched on, off, back on, windows shared) and
    wherever the stage is snapshotted and restored between consumes, every consume's
    verdicts and the state at the end are those of the run that was never restored."""
    clicks = [*drawn, SENTINEL]
    arrival = sorted(range(len(clicks)), key=lambda n: clicks[n].ts_ms + clicks[n].jitter_ms)
    offsets = {n: i for i, n in enumerate(arrival)}
    frame = kept_frame([(n, clicks[n]) for n in arrival], 0, offsets)
    log = visitor_records(frame, 1)[0]
    at = data.draw(st.lists(st.integers(0, log.num_rows), max_size=12))
    chunks = pieces(log.num_rows, sorted(set(at)))
    rules = [data.draw(st.sampled_from(RULE_SETS[:3] + RULE_SETS[4:]))] * len(chunks)
    if data.draw(st.booleans()):  # the rules change between consumes
        rules = [data.draw(st.sampled_from(RULE_SETS)) for _ in chunks]
    restores = data.draw(st.sets(st.integers(0, len(chunks)), min_size=1))

    def run(restore_at: set[int]) -> tuple[list[list[dict[str, object]]], VisitorWindows]:
        windows = VisitorWindows(horizon_ms=HORIZON_MS)
        out = []
        for n, ((a, b), in_force) in enumerate(zip(chunks, rules, strict=True)):
            if n in restore_at:
                windows = decode_visitor_windows(encode_windows(windows), HORIZON_MS)
            out.append(windows.consume(log.slice(a, b - a), in_force).to_pylist())
        if len(chunks) in restore_at:
            windows = decode_visitor_windows(encode_windows(windows), HORIZON_MS)
        return out, windows

    with pruning(data.draw(st.booleans())):
        unbroken, whole = run(set())
        restored, again = run(restores)
    assert restored == unbroken
    assert again.decided_until_ms == whole.decided_until_ms
    assert again.kept().equals(whole.kept())
    assert again.chains()[0] == whole.chains()[0]
    assert live_anchors(again) == live_anchors(whole)  # pruned at other times, maybe


def live_anchors(windows: VisitorWindows) -> set[tuple[int, int, str, str, int]]:
    """Each chain's counted click that a click still to decide could repeat."""
    until = windows.decided_until_ms
    _, anchors = windows.chains()
    if until is None:
        return set()
    latest = (
        pl.DataFrame(anchors)
        .group_by("window_ms", "phase_ms", "visitor", "ad_id")
        .agg(pl.col("ts_ms").max())
        .filter(
            (pl.col("phase_ms") + HOUR_MS > until) & (pl.col("ts_ms") > until - pl.col("window_ms"))
        )
    )
    return set(latest.select("window_ms", "phase_ms", "visitor", "ad_id", "ts_ms").rows())


def test_records_of_a_build_that_carried_the_user_agent_read_the_same() -> None:
    """Such a log's records have a ``user_agent`` column more: taken by name, it is not
    read, and the verdicts are the same."""
    rules = VisitorRules((RepeatRule("rep", "repeat", 30),))
    clicks = [Click(v, 0, T0 + s * 1000, True, 0) for v, s in ((2, 0), (2, 10), (3, 12))]
    clicks.append(Click(0, 0, T0 + 5 * MINUTE_MS, True, 0))
    frame = kept_frame(list(enumerate(clicks)), 0, {n: n for n in range(4)})
    records = visitor_records(frame, 1)[0]
    assert "user_agent" not in records.schema.names
    older = records.append_column("user_agent", pa.array(["UA"] * records.num_rows))
    got = [
        VisitorWindows(horizon_ms=MINUTE_MS).consume(table, rules)["event_id"].to_pylist()
        for table in (records, older)
    ]
    assert got[0] == got[1] == ["e1"]  # the same address and agent: one visitor


@pytest.mark.parametrize("snapshot_after_mark", [False, True])
def test_a_context_mark_leaves_the_hours_reaching_into_the_gap_to_the_batch(
    snapshot_after_mark: bool,
) -> None:
    """Records that follow a gap (the keyed stage started while the stream ran): a repeat
    window judges only the hours whose lookback starts after the mark, with the window in
    force from the start or coming into force later, across a snapshot too."""
    spec = RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 1800})
    ruleset = RuleSet(compile_rules([spec]))
    rules = VisitorRules.from_ruleset(ruleset)
    drawn = [Click(1, 0, T0 + n * 20 * MINUTE_MS, True, 0) for n in range(12)]
    frame = kept_frame(list(enumerate(drawn)), 0, {n: n for n in range(12)})
    batch = batch_verdicts(drawn, ruleset, 0)
    tick = kept_frame([(99, Click(0, 0, T0 + 10 * HOUR_MS, True, 0))], 1, {99: 0})
    for late_rule in (False, True):
        windows = VisitorWindows(horizon_ms=MINUTE_MS)
        # the log starts with e1 (e0, at 0:00, was counted before the stage started)
        windows.start_context(T0 + 20 * MINUTE_MS + 1)
        if snapshot_after_mark:
            windows = decode_visitor_windows(encode_windows(windows), MINUTE_MS)
            assert windows.context_from_ms == T0 + 20 * MINUTE_MS + 1
        got = [
            windows.consume(
                visitor_records(frame[n : n + 1], 1)[0],
                VisitorRules(()) if late_rule and n < 3 else rules,
            )
            for n in range(1, 12)
        ]
        got.append(windows.consume(visitor_records(tick, 1)[0], rules))
        stream = set(pa.concat_tables(got)["event_id"].to_pylist())
        # hours 0 and 1 look back to before 0:20: the batch's (e1, e2 and e3-e5 repeat
        # e0's chain there); hour 2 (lookback from 1:00) on, the batch's verdicts exactly
        assert stream == {e for e in batch if e in {f"e{n}" for n in range(6, 12)}}
        assert stream
