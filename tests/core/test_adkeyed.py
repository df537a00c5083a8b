"""The ad-keyed family's pure half against the batch: whatever the split of the same events
into source partitions, rounds, keyed partitions and reads, with records appended twice,
the stream flags exactly the clicks the batch's ``no_impression_click`` and ``ctr_spike``
(excluding) flag hour by hour, with the same rule and evidence, and corrects each once."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core import ids
from clickagg.core.adkeyed import (
    AD_RECORD_SCHEMA,
    AD_VERDICT_SCHEMA,
    AdRules,
    AdWindows,
    CtrSpikeRule,
    NoImpressionRule,
    ad_records,
)
from clickagg.core.rules import RuleSet, RuleSpec, compile_rules
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.keyed.snapshots import decode_ad_windows, encode_windows

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
VISITORS = (("u1", "203.0.113.1", "UA"), ("u2", None, None), (None, "203.0.113.1", "UA"))
JITTER_MS = 20 * MINUTE_MS
HORIZON_MS = 30 * MINUTE_MS

NO_IMPRESSION = RuleSpec(
    "no-imp",
    "no_impression_click",
    "no impression",
    {"window_minutes": 20, "min_ad_impressions": 2},
)
SPIKE = RuleSpec(
    "spike",
    "ctr_spike",
    "ctr spike",
    {"factor": 1.5, "baseline_hours": 2, "min_clicks": 2, "exclude": True},
)
NO_IMPRESSION_20_1 = RuleSpec(
    "no-imp",
    "no_impression_click",
    "no impression",
    {"window_minutes": 20, "min_ad_impressions": 1},
)
REVIEW_ONLY = RuleSpec(
    "review", "ctr_spike", "review", {"factor": 1.5, "baseline_hours": 2, "min_clicks": 2}
)


@dataclass(frozen=True)
class Event:
    visitor: int
    ad: int
    ts_ms: int
    click: bool
    counted: bool  # False: a stage-1 rule flagged it
    jitter_ms: int


events_strategy = st.lists(
    st.builds(
        Event,
        visitor=st.integers(0, len(VISITORS) - 1),
        ad=st.integers(0, 1),
        # 4 h on a 5 min grid: equal times, hour edges and busy ad-hours happen often
        ts_ms=st.integers(0, 47).map(lambda n: T0 + n * 5 * MINUTE_MS),
        click=st.booleans(),
        counted=st.sampled_from([True, True, True, False]),
        jitter_ms=st.integers(0, JITTER_MS // MINUTE_MS).map(lambda n: n * MINUTE_MS),
    ),
    min_size=20,
    max_size=150,
)
SENTINEL = Event(0, 0, T0 + 10 * HOUR_MS, True, True, 0)  # moves the horizon past everything


def kept_frame(
    events: list[tuple[int, Event]], partition: int, offsets: dict[int, int]
) -> pl.DataFrame:
    """What stage 1's ``BatchOutcome.kept`` holds for a round of one source partition."""
    rows = []
    for number, event in events:
        user, ip, agent = VISITORS[event.visitor]
        rows.append(
            {
                "event_type": ids.CLICK if event.click else ids.IMPRESSION,
                "ip": ip,
                "user_id": user,
                "user_agent": agent,
                "ad_id": f"ad-{event.ad}",
                "advertiser_id": "adv",
                "campaign_id": None,
                "country": "US",
                "device": None,
                "browser": None,
                "ts_ms": event.ts_ms,
                "event_id": f"e{number}",
                "partition": partition,
                "offset": offsets[number],
                "spend_micros": 1_000 + number if event.click else 0,
                "invalid": event.click and not event.counted,
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


def batch_verdicts(
    events: list[Event], ruleset: RuleSet, seed: int, *, review: bool = False
) -> dict[str, tuple[str, str]]:
    """What reconciliation's ``invalid_reason`` says per flagged event id (rule, evidence):
    each hour judged with every earlier event as context, in an arbitrary order."""
    order = list(range(len(events)))
    random.Random(seed).shuffle(order)
    decisions = pl.DataFrame(
        {
            "event_type": ["click" if events[n].click else "impression" for n in order],
            "event_id": [f"e{n}" for n in order],
            "user_id": [VISITORS[events[n].visitor][0] for n in order],
            "ip": [VISITORS[events[n].visitor][1] for n in order],
            "user_agent": [VISITORS[events[n].visitor][2] for n in order],
            "ad_id": [f"ad-{events[n].ad}" for n in order],
            "ts_ms": [events[n].ts_ms for n in order],
        },
        schema={
            **dict.fromkeys(["event_type", "event_id", "user_id", "ip", "user_agent"], pl.String),
            "ad_id": pl.String,
            "ts_ms": pl.Int64,
        },
    )
    out: dict[str, tuple[str, str]] = {}
    for hour in sorted({e.ts_ms - e.ts_ms % HOUR_MS for e in events}):
        seen = decisions.filter(pl.col("ts_ms") < hour + HOUR_MS)
        reasons = (ruleset.batch_reviews if review else ruleset.batch_reasons)(seen, hour)
        for event_id, reason in zip(seen["event_id"], reasons, strict=True):
            if reason is not None:
                rule, _, evidence = reason.split(": ", 2)
                out[event_id] = (rule, evidence)
    return out


def cuts(draw: st.DrawFn, n: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))


def pieces(n: int, at: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *at, n]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=100, deadline=None)
@given(drawn=events_strategy, keyed=st.sampled_from([1, 4, 16]), data=st.data())
def test_the_stream_flags_what_the_batch_flags_hour_by_hour_whatever_the_split(
    drawn: list[Event], keyed: int, data: st.DataObject
) -> None:
    specs = data.draw(
        st.sampled_from(
            [[NO_IMPRESSION], [SPIKE], [NO_IMPRESSION, SPIKE], [SPIKE, NO_IMPRESSION, REVIEW_ONLY]]
        )
    )
    effective = data.draw(st.sampled_from([None, T0 + 90 * MINUTE_MS]))
    specs = [RuleSpec(s.id, s.kind, s.reason, s.params, effective_from_ms=effective) for s in specs]
    ruleset = RuleSet(compile_rules(specs))
    rules = AdRules.from_ruleset(ruleset)
    assert rules.ids == [s.id for s in specs if s is not REVIEW_ONLY and s.id != "review"]

    events = [*drawn, SENTINEL]
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
                kept_frame([(n, events[n]) for n in arrival[a:b] if n % sources == p], p, offsets)
                for p in range(sources)
            ]
        )
        rounds = [ad_records(kept, keyed)]
        appended += rounds
        for round_ in rounds + data.draw(st.lists(st.sampled_from(appended), max_size=2)):
            for k, table in round_.items():
                logs[k].append(table)
    for k in range(keyed):  # the stream goes on: a later event reaches every partition
        tick = kept_frame([(len(drawn), SENTINEL)], sources + k, {len(drawn): 0})
        logs[k].append(next(iter(ad_records(tick, 1).values())))

    # The log is JITTER_MS out of event time order at most, whatever the number of sources:
    # a round interleaves its sources by event time (``records_by_partition``), so the
    # horizon decides as the stream goes and no record is too late.
    horizon = HORIZON_MS
    verdicts: list[pa.Table] = []
    reviewed: Counter[str] = Counter()
    for tables in logs.values():
        log = pa.concat_tables([AD_RECORD_SCHEMA.empty_table(), *tables])
        windows = AdWindows(horizon_ms=horizon)
        for a, b in pieces(log.num_rows, cuts(data.draw, log.num_rows)):
            verdicts.append(windows.consume(log.slice(a, b - a), rules))
            reviewed.update(windows.take_reviews())
    stream: dict[str, tuple[str, str]] = {}
    for row in pa.concat_tables([AD_VERDICT_SCHEMA.empty_table(), *verdicts]).to_pylist():
        assert row["counted"] and row["previous_rule_id"] is None
        assert row["event_id"] not in stream  # each click decided once, copies or not
        stream[row["event_id"]] = (row["rule_id"], row["evidence"])

    judged = RuleSet(tuple(r for r in ruleset.rules if not r.review_only))
    batch = batch_verdicts(events, judged, data.draw(st.integers(0, 2**16)))
    counted = {f"e{n}" for n, e in enumerate(drawn) if e.click and e.counted}
    assert stream == {e: verdict for e, verdict in batch.items() if e in counted}
    # The review-only rule's clicks: counted once each, as the batch's review hook flags
    # them (its own rule set: a review verdict does not depend on the excluding rules).
    for rule in ruleset.rules:
        if rule.review_only:
            alone = RuleSet((rule,))
            flagged = batch_verdicts(events, alone, 0, review=True)
            assert reviewed[rule.name] == len(set(flagged) & counted)
        else:
            assert rule.name not in reviewed


def test_both_rules_flag_crafted_traffic_with_their_evidence() -> None:
    """An ad whose impressions are sent: a click after its visitor's impression counts, one
    without is flagged; an ad without impressions is not judged. Two hours of baseline
    CTR 1/4, then an hour of 6 clicks on 4 impressions (CTR 1.5 > 1.5 x (3+1)/8): every
    click of that hour is flagged by the spike rule, named first."""
    rules = AdRules.from_ruleset(RuleSet(compile_rules([SPIKE, NO_IMPRESSION, REVIEW_ONLY])))
    evs: list[tuple[int, Event]] = []

    def add(visitor: int, ad: int, minute: int, click: bool) -> None:
        evs.append((len(evs), Event(visitor, ad, T0 + minute * MINUTE_MS, click, True, 0)))

    for hour in (0, 1):
        for m in range(4):
            add(0, 0, hour * 60 + m * 10, False)
        add(0, 0, hour * 60 + 45, True)  # seen 15 min before: counts
    add(1, 0, 100, True)  # no impression by u2: flagged
    add(1, 1, 100, True)  # ad-1 sends no impressions: not judged
    for m in range(4):
        add(0, 0, 120 + m, False)
    for m in range(6):
        add(0, 0, 125 + m, True)
    evs.append((len(evs), SENTINEL))
    offsets = {n: n for n, _ in evs}
    windows = AdWindows(horizon_ms=HORIZON_MS)
    verdicts = windows.consume(ad_records(kept_frame(evs, 0, offsets), 1)[0], rules).to_pylist()
    found = {v["event_id"]: (v["rule_id"], v["evidence"]) for v in verdicts}
    assert set(found) == {"e10", *(f"e{n}" for n in range(16, 22))}
    assert found["e10"] == ("no-imp", "user u2: no impression of ad ad-0 in the 20 min before")
    rule, evidence = found["e16"]
    assert rule == "spike"
    assert evidence.startswith("ad ad-0 hour ")
    assert ": CTR 6 clicks / 4 impressions vs baseline 3 / 8 over 2 h (factor 1.5)" in evidence
    # The review-only rule flags the same hour: reported once, not corrected.
    assert windows.take_reviews() == {"review": 6}
    assert windows.take_reviews() == {}


def test_a_snapshot_restores_the_records_the_counts_and_what_was_decided() -> None:
    rules = AdRules((NoImpressionRule("n", "r", 20, 1), CtrSpikeRule("s", "r", 2.0, 2, 2)))
    assert AdRules.from_json(rules.to_json()) == rules
    evs = [(n, Event(n % 3, n % 2, T0 + n * 7 * MINUTE_MS, n % 3 == 0, True, 0)) for n in range(40)]
    records = ad_records(kept_frame(evs, 0, {n: n for n, _ in evs}), 1)[0]
    windows = AdWindows(horizon_ms=HORIZON_MS)
    windows.consume(records, rules)
    restored = decode_ad_windows(encode_windows(windows), HORIZON_MS)
    assert restored.decided_until_ms == windows.decided_until_ms
    assert restored.high_water == windows.high_water
    assert restored.max_event_ms == windows.max_event_ms
    assert restored.kept().equals(windows.kept())
    assert restored.counts().sort("ad_id", "_hour").equals(windows.counts().sort("ad_id", "_hour"))
    seen, again = windows.seen(), restored.seen()
    assert seen is not None and again is not None and again.equals(seen)
    assert restored.seen_from_ms == windows.seen_from_ms
    # What is kept is what the rules still need: the undecided hours' clicks, and their
    # impressions and those of the 20 min before, as visitor, ad and time.
    assert windows.decided_until_ms is not None
    kept = windows.kept()
    assert kept["ts_ms"].min() >= windows.decided_until_ms
    assert set(kept["event_type"].to_list()) == {ids.CLICK}
    assert seen.columns == ["visitor", "ad_id", "ts_ms"]
    assert seen.height and seen["ts_ms"].min() >= windows.decided_until_ms - 20 * MINUTE_MS


def test_with_ctr_spike_alone_no_impression_is_kept() -> None:
    """Impressions are most events: ``ctr_spike`` needs only their per-(ad, hour) counts."""
    rules = AdRules((CtrSpikeRule("s", "r", 2.0, 2, 2),))
    evs = [(n, Event(n % 3, n % 2, T0 + n * 7 * MINUTE_MS, n % 3 == 0, True, 0)) for n in range(40)]
    records = ad_records(kept_frame(evs, 0, {n: n for n, _ in evs}), 1)[0]
    windows = AdWindows(horizon_ms=HORIZON_MS)
    windows.consume(records, rules)
    assert windows.seen() is None
    assert set(windows.kept()["event_type"].to_list()) == {ids.CLICK}
    counts = windows.counts()
    since = counts["_hour"].min()
    assert isinstance(since, int)
    impressions = sum(1 for _, e in evs if not e.click and e.ts_ms >= since)
    assert impressions and counts["_i"].sum() == impressions  # counted all the same
    restored = decode_ad_windows(encode_windows(windows), HORIZON_MS)
    assert restored.seen() is None and restored.kept().equals(windows.kept())


def test_no_impression_coming_into_force_judges_the_hours_whose_window_it_has_seen() -> None:
    """Switched on while the stream runs, ``no_impression_click`` has no impressions from
    before: an hour whose window begins before the first impression it kept is left to the
    batch (judged, a click whose impression was not kept would be flagged wrongly); the
    next hours are judged as the batch judges them."""
    spike = CtrSpikeRule("s", "r", 100.0, 1, 1_000)  # in force throughout, flags nothing
    both = AdRules((NoImpressionRule("no-imp", "no impression", 20, 1), spike))
    plan = [  # (visitor, minute, click): u1 = 0, u2 = 1, an address = 2
        (0, 10, False),
        (0, 12, True),
        (0, 40, False),  # the last event before the rule: not kept
        (0, 60, True),  # seen at 0:40, 20 min before: counts (the batch sees 0:40)
        (2, 90, False),  # so that ad-0 has an impression in hour 1's frame
        (1, 100, True),  # u2, never seen: flagged
        (0, 130, False),
        (0, 132, True),
        (1, 160, True),  # flagged
        (0, 190, False),
        (0, 192, True),
        (1, 220, True),  # flagged
    ]
    evs = [(n, Event(v, 0, T0 + m * MINUTE_MS, c, True, 0)) for n, (v, m, c) in enumerate(plan)]
    evs.append((len(evs), SENTINEL))
    records = ad_records(kept_frame(evs, 0, {n: n for n, _ in evs}), 1)[0]
    windows = AdWindows(horizon_ms=10 * MINUTE_MS)
    first = windows.consume(records.slice(0, 3), AdRules((spike,)))
    assert first.num_rows == 0 and windows.seen() is None
    verdicts = windows.consume(records.slice(3), both)
    # kept from 0:40:00.001 on, then forgotten up to the decided bound's window
    assert windows.decided_until_ms is not None
    assert windows.seen_from_ms == windows.decided_until_ms - 20 * MINUTE_MS
    flagged = set(verdicts["event_id"].to_pylist())
    # hour 0 (window from -0:20) and hour 1 (from 0:40, the impression not kept) are left
    # to the batch: judged, 1:00 would be flagged for want of the 0:40 impression
    assert flagged == {"e8", "e11"}
    batch = batch_verdicts([e for _, e in evs], RuleSet(compile_rules([NO_IMPRESSION_20_1])), 0)
    assert {e for e in batch if e in {"e8", "e11"}} == flagged
    assert "e5" in batch and "e3" not in batch  # what the hours left to it hold


def test_an_hour_a_rule_leaves_to_the_batch_is_named_by_no_later_rule() -> None:
    """The batch names the first rule in order that flags a click. In an hour the stream
    cannot judge for ``no_impression_click`` (switched on while running), the spike rule
    after it would name a click the batch names ``no-imp``: it names none there."""
    specs = [
        NO_IMPRESSION_20_1,
        RuleSpec("s", "ctr_spike", "r", {"factor": 0.5, "baseline_hours": 1, "min_clicks": 1}),
    ]
    specs[1] = RuleSpec("s", "ctr_spike", "r", {**specs[1].params, "exclude": True})
    ruleset = RuleSet(compile_rules(specs))
    both = AdRules.from_ruleset(ruleset)
    spike = AdRules(tuple(r for r in both.rules if isinstance(r, CtrSpikeRule)))
    plan = [
        (0, 10, False),
        (0, 12, True),
        (0, 40, False),  # the last event before no_impression_click: not kept
        (0, 60, True),
        (2, 90, False),
        (1, 100, True),  # hour 1: the batch names it no-imp; the spike also flags it
        (0, 130, False),
        (0, 132, True),
        (1, 160, True),
        (0, 190, False),
        (0, 192, True),
        (1, 220, True),
    ]
    evs = [(n, Event(v, 0, T0 + m * MINUTE_MS, c, True, 0)) for n, (v, m, c) in enumerate(plan)]
    evs.append((len(evs), SENTINEL))
    records = ad_records(kept_frame(evs, 0, {n: n for n, _ in evs}), 1)[0]
    windows = AdWindows(horizon_ms=10 * MINUTE_MS)
    windows.consume(records.slice(0, 3), spike)
    verdicts = windows.consume(records.slice(3), both)
    stream = dict(
        zip(verdicts["event_id"].to_pylist(), verdicts["rule_id"].to_pylist(), strict=True)
    )
    batch = {e: rule for e, (rule, _) in batch_verdicts([e for _, e in evs], ruleset, 0).items()}
    assert batch["e5"] == "no-imp" and batch["e3"] == "s"  # the premise
    assert "e5" not in stream and "e3" not in stream  # hour 1: the batch's
    assert stream and all(batch[e] == rule for e, rule in stream.items())


def test_a_snapshot_of_a_build_that_kept_every_raw_event_restores() -> None:
    """Such a snapshot holds impressions and decided clicks among its records and ends with
    the counts: its impressions become the kept impressions, its decided clicks are
    dropped, and the next verdicts are those of an unbroken run."""
    rules = AdRules((NoImpressionRule("n", "r", 20, 1), CtrSpikeRule("s", "r", 2.0, 2, 2)))
    evs = [(n, Event(n % 3, n % 2, T0 + n * 7 * MINUTE_MS, n % 3 == 0, True, 0)) for n in range(40)]
    evs.append((40, SENTINEL))
    records = ad_records(kept_frame(evs, 0, {n: n for n, _ in evs}), 1)[0]
    unbroken = AdWindows(horizon_ms=HORIZON_MS)
    unbroken.consume(records.slice(0, 30), rules)
    expected = unbroken.consume(records.slice(30), rules)
    assert expected.num_rows  # the premise: the later hours have verdicts

    windows = AdWindows(horizon_ms=HORIZON_MS)
    windows.consume(records.slice(0, 30), rules)
    assert windows.decided_until_ms is not None
    frame = pl.from_arrow(records.slice(0, 30))
    assert isinstance(frame, pl.DataFrame)
    # what the previous build kept: every raw event from the decided bound - 20 min on
    legacy_kept = (
        frame.with_columns(pl.lit(None, pl.Int64).alias("keyed_offset"))
        .filter(pl.col("ts_ms") >= windows.decided_until_ms - 20 * MINUTE_MS)
        .to_arrow()
    )
    meta = {
        "high_water": {str(p): o for p, o in windows.high_water.items()},
        "max_event_ms": windows.max_event_ms,
        "decided_until_ms": windows.decided_until_ms,
    }
    legacy_kept = legacy_kept.replace_schema_metadata(
        {b"clickagg.keyed_windows": json.dumps(meta).encode()}
    )
    head = _ipc(legacy_kept)
    legacy = len(head).to_bytes(8, "little") + head + _ipc(windows.counts().to_arrow())
    restored = decode_ad_windows(legacy, HORIZON_MS)
    assert restored.kept().equals(windows.kept())
    seen = restored.seen()
    assert seen is not None and restored.seen_from_ms is None
    got = restored.consume(records.slice(30), rules)
    assert got.to_pylist() == expected.to_pylist()


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def test_records_carry_every_event_of_an_ad_and_only_those() -> None:
    evs = [(0, Event(0, 0, T0, True, True, 0)), (1, Event(1, 1, T0, False, True, 0))]
    frame = kept_frame(evs, 0, {0: 0, 1: 1})
    frame = pl.concat(
        [frame, frame.slice(0, 1).with_columns(pl.lit(None, pl.String).alias("ad_id"))]
    )
    records = pa.concat_tables(ad_records(frame, 4).values())
    assert sorted(records["event_type"].to_pylist()) == [ids.CLICK, ids.IMPRESSION]
    assert records.schema == AD_RECORD_SCHEMA


def test_an_unknown_kind_in_a_recorded_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        AdRules.from_json('{"rules":[{"kind":"nope","rule_id":"x"}]}')


def _alone(spec: RuleSpec) -> RuleSet:
    return RuleSet(compile_rules([spec]))


@settings(max_examples=60, deadline=None)
@given(drawn=events_strategy, data=st.data())
def test_rules_changing_between_consumes_never_flag_wrongly_and_restore_alike(
    drawn: list[Event], data: st.DataObject
) -> None:
    """``ctr_spike`` alone, then with ``no_impression_click``, alone again, both again, each
    switch between two consumes, and snapshots restored between any two: every verdict
    the stream gives is the batch's verdict of the rule it names on that click (a hour
    ``no_impression_click`` cannot judge is left to the batch, never judged wrongly), and a
    restored run gives exactly the verdicts and reviews of an unbroken one."""
    events = [*drawn, SENTINEL]
    arrival = sorted(range(len(drawn)), key=lambda n: drawn[n].ts_ms + drawn[n].jitter_ms)
    arrival.append(len(drawn))
    log = ad_records(
        kept_frame(
            [(n, events[n]) for n in arrival],
            0,
            {n: i for i, n in enumerate(arrival)},
        ),
        1,
    )[0]
    slices = pieces(
        log.num_rows, sorted(set(data.draw(st.lists(st.integers(0, log.num_rows), max_size=10))))
    )
    switches = sorted(data.draw(st.lists(st.integers(0, len(slices)), min_size=3, max_size=3)))
    ctr = AdRules.from_ruleset(_alone(SPIKE))
    both = AdRules.from_ruleset(RuleSet(compile_rules([NO_IMPRESSION, SPIKE, REVIEW_ONLY])))
    phases = [ctr, both, ctr, both]
    in_force = [phases[sum(s <= i for s in switches)] for i in range(len(slices))]
    restore_at = set(data.draw(st.lists(st.integers(1, len(slices)), max_size=4)))

    def run(snapshots: set[int]) -> list[tuple[list[dict[str, object]], dict[str, int]]]:
        windows = AdWindows(horizon_ms=HORIZON_MS)
        out = []
        for i, ((a, b), rules) in enumerate(zip(slices, in_force, strict=True)):
            if i in snapshots:
                restored = decode_ad_windows(encode_windows(windows), HORIZON_MS)
                assert (restored.seen() is None) == (windows.seen() is None)
                assert restored.seen_from_ms == windows.seen_from_ms
                windows = restored
            verdicts = windows.consume(log.slice(a, b - a), rules).to_pylist()
            out.append((verdicts, windows.take_reviews()))
        return out

    unbroken = run(set())
    assert run(restore_at) == unbroken

    alone = {
        "no-imp": batch_verdicts(events, _alone(NO_IMPRESSION), 0),
        "spike": batch_verdicts(events, _alone(SPIKE), 0),
    }
    decided: set[str] = set()
    for (verdicts, _), rules in zip(unbroken, in_force, strict=True):
        for row in verdicts:
            event_id, rule = str(row["event_id"]), str(row["rule_id"])
            assert event_id not in decided
            decided.add(event_id)
            assert rule in rules.ids
            assert alone[rule].get(event_id) == (rule, row["evidence"])


def test_a_window_widened_while_running_leaves_the_hours_it_has_not_kept_to_the_batch() -> None:
    """The impressions before ``decided_until_ms - window`` are forgotten: widened from 20
    to 60 min, ``no_impression_click`` must not judge an hour whose wider window reaches
    them (judged, u1's 1:10 click would be flagged though it saw the ad at 0:25)."""
    wide = RuleSpec("no-imp", "no_impression_click", "no impression", {"window_minutes": 60})
    plan = [(0, 25, False), (2, 65, False), (0, 70, True), (2, 75, False), (2, 135, False)]
    evs = [(n, Event(v, 0, T0 + m * MINUTE_MS, c, True, 0)) for n, (v, m, c) in enumerate(plan)]
    records = ad_records(kept_frame(evs, 0, {n: n for n, _ in evs}), 1)[0]
    windows = AdWindows(horizon_ms=10 * MINUTE_MS)
    narrow = AdRules((NoImpressionRule("no-imp", "no impression", 20, 1),))
    assert windows.consume(records.slice(0, 4), narrow).num_rows == 0
    assert windows.decided_until_ms == T0 + HOUR_MS  # 1:00: impressions from 0:40 kept
    verdicts = windows.consume(records.slice(4), AdRules.from_ruleset(_alone(wide)))
    assert "e2" not in batch_verdicts([e for _, e in evs], _alone(wide), 0)
    assert verdicts.num_rows == 0


def test_a_baseline_widened_while_running_does_not_spike_on_forgotten_counts() -> None:
    """Hours 0-2: 10 impressions each and 10 clicks in hour 0 only; hour 3: 3 clicks on 11
    impressions. Against a 3 h baseline (11 / 30) hour 3 is no spike; the counts of hours
    0 and 1 were forgotten under a 1 h baseline, and widened to 3 h the stream finds
    baseline 0 / 10 and flags hour 3."""
    wide = RuleSpec("s", "ctr_spike", "r", {"factor": 2.0, "baseline_hours": 3, "min_clicks": 1})
    wide = RuleSpec(wide.id, wide.kind, wide.reason, {**wide.params, "exclude": True})
    plan: list[tuple[int, int, bool]] = []
    for hour, clicks in ((0, 10), (1, 0), (2, 0)):
        plan += [(0, hour * 60 + m, False) for m in range(10)]
        plan += [(1, hour * 60 + 30 + m, True) for m in range(clicks)]
    plan += [(0, 180 + m, False) for m in range(10)] + [(0, 191, False)]
    split = len(plan)
    plan += [(1, 200 + m, True) for m in range(3)] + [(0, 255, False)]
    evs = [(n, Event(v, 0, T0 + m * MINUTE_MS, c, True, 0)) for n, (v, m, c) in enumerate(plan)]
    records = ad_records(kept_frame(evs, 0, {n: n for n, _ in evs}), 1)[0]
    windows = AdWindows(horizon_ms=10 * MINUTE_MS)
    windows.consume(records.slice(0, split), AdRules((CtrSpikeRule("s", "r", 2.0, 1, 1),)))
    verdicts = windows.consume(records.slice(split), AdRules.from_ruleset(_alone(wide)))
    batch = batch_verdicts([e for _, e in evs], _alone(wide), 0)
    assert not any(int(e[1:]) >= split for e in batch)
    assert verdicts.num_rows == 0


def test_a_context_mark_bounds_the_impressions_and_counts_and_survives_a_snapshot() -> None:
    """After a gap the impressions and counts are complete from the mark on only: so is a
    rule that comes into force later, and a snapshot keeps the mark."""
    mark = T0 + 40 * MINUTE_MS
    windows = AdWindows(HORIZON_MS)
    windows.start_context(mark)
    assert (windows.seen_from_ms, windows.counts_from_ms) == (None, mark)  # none kept yet
    windows._keep_impressions(True)  # no_impression_click comes into force
    assert windows.seen_from_ms == mark
    restored = decode_ad_windows(encode_windows(windows), HORIZON_MS)
    assert restored.context_from_ms == mark
    assert (restored.seen_from_ms, restored.counts_from_ms) == (mark, mark)
    restored.start_context(mark - HOUR_MS)  # an older mark moves nothing back
    assert (restored.context_from_ms, restored.seen_from_ms) == (mark, mark)
