"""The processor against a plain reference: any order, duplication and batching."""

from __future__ import annotations

import itertools
from collections import Counter

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core import aggregate, hll, ids
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.prices import PriceBook
from clickagg.core.processor import PartitionProcessor, PartitionState, outcomes
from clickagg.core.rules.loading import load_rules
from clickagg.core.windows import MINUTE_MS
from tests.conftest import Ev, frame_of

LATENESS = 5 * MINUTE_MS
HORIZON = 30 * MINUTE_MS
T0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS


def processor() -> PartitionProcessor:
    return PartitionProcessor(
        PartitionState.empty(0), allowed_lateness_ms=LATENESS, dedup_horizon_ms=HORIZON
    )


def run(events: list[Ev], cuts: list[int]) -> tuple[Counter[tuple[str, int, int]], Counter[str]]:
    """Feed ``events`` in micro-batches split at ``cuts``; sum the emitted minute deltas."""
    proc = processor()
    counts: Counter[tuple[str, int, int]] = Counter()
    statuses: Counter[str] = Counter()
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(events))), len(events)]
    for start, end in itertools.pairwise(bounds):
        outcome = proc.process(frame_of(events[start:end], base_offset=start))
        assert outcome is not None
        for row in outcome.minute_deltas.to_pylist():
            counts[(row["ad_id"], row["minute_ms"], ids.CLICK)] += row["clicks"]
            counts[(row["ad_id"], row["minute_ms"], ids.IMPRESSION)] += row["impressions"]
        statuses.update(outcome.decisions.column("status").to_pylist())
    return +counts, statuses


def reference(events: list[Ev]) -> Counter[tuple[str, int, int]]:
    """Plain rules: the first copy of an id counts unless it is older than max - lateness."""
    seen: set[tuple[int, str]] = set()
    max_ts = None
    counts: Counter[tuple[str, int, int]] = Counter()
    for ev in events:
        max_ts = ev.ts_ms if max_ts is None else max(max_ts, ev.ts_ms)
        key = (ev.event_type, ev.event_id)
        if key in seen:
            continue
        seen.add(key)
        if ev.ts_ms < max_ts - LATENESS:
            continue
        minute = ev.ts_ms - ev.ts_ms % MINUTE_MS
        counts[(ev.ad_id, minute, ev.event_type)] += 1
    return counts


event_strategy = st.builds(
    Ev,
    event_id=st.integers(0, 40).map(lambda n: f"e{n}"),
    ad_id=st.sampled_from(["a", "b", "c"]),
    ts_ms=st.integers(0, 40 * MINUTE_MS).map(lambda d: T0 + d),
    event_type=st.sampled_from([ids.CLICK, ids.IMPRESSION]),
)


def with_exact_copies(draw: st.DrawFn) -> list[Ev]:
    """Distinct events (one timestamp per id), then copies interleaved anywhere."""
    originals = {(e.event_type, e.event_id): e for e in draw(st.lists(event_strategy, max_size=60))}
    pool = list(originals.values())
    copies = draw(st.lists(st.sampled_from(pool), max_size=60)) if pool else []
    return draw(st.permutations(pool + copies))


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Ev], list[int]]:
    events = with_exact_copies(draw)
    cuts = draw(st.lists(st.integers(0, max(len(events), 1)), max_size=6))
    return events, cuts


@given(streams())
@settings(max_examples=150, deadline=None)
def test_counts_match_reference_for_any_order_duplication_and_batching(
    stream: tuple[list[Ev], list[int]],
) -> None:
    events, cuts = stream
    counts, statuses = run(events, cuts)
    assert counts == reference(events)
    assert sum(statuses.values()) == len(events)


@st.composite
def on_time_streams(draw: st.DrawFn) -> tuple[list[Ev], list[Ev], list[int]]:
    ts = st.integers(0, LATENESS).map(lambda d: T0 + d)
    base = draw(
        st.lists(
            st.builds(Ev, event_id=st.uuids().map(str), ad_id=st.sampled_from("xy"), ts_ms=ts),
            max_size=40,
            unique_by=lambda e: e.event_id,
        )
    )
    copies = draw(st.lists(st.sampled_from(base), max_size=40)) if base else []
    shuffled = draw(st.permutations(base + copies))
    cuts = draw(st.lists(st.integers(0, max(len(shuffled), 1)), max_size=5))
    return base, shuffled, cuts


@given(on_time_streams())
@settings(max_examples=100, deadline=None)
def test_without_lateness_every_distinct_event_counts_once(
    stream: tuple[list[Ev], list[Ev], list[int]],
) -> None:
    base, shuffled, cuts = stream
    counts, statuses = run(shuffled, cuts)
    expected = Counter((e.ad_id, e.ts_ms - e.ts_ms % MINUTE_MS, e.event_type) for e in base)
    assert counts == expected
    assert statuses["duplicate"] == len(shuffled) - len(base)


@given(streams(), st.integers(0, 120))
@settings(max_examples=80, deadline=None)
def test_snapshot_then_replay_equals_uninterrupted(
    stream: tuple[list[Ev], list[int]], cut: int
) -> None:
    events, _ = stream
    cut = min(cut, len(events))
    whole = processor()
    whole.process(frame_of(events[:cut]))
    uninterrupted = whole.process(frame_of(events[cut:], base_offset=cut))
    snap = processor()
    snap.process(frame_of(events[:cut]), emit=False)
    restored = PartitionProcessor(
        PartitionState.restore(snap.state.snapshot()),
        allowed_lateness_ms=LATENESS,
        dedup_horizon_ms=HORIZON,
    )
    resumed = restored.process(frame_of(events[cut:], base_offset=cut))
    assert uninterrupted is not None and resumed is not None
    assert uninterrupted.minute_deltas.equals(resumed.minute_deltas)
    assert uninterrupted.decisions.equals(resumed.decisions)


def test_decisions_name_each_fate_with_a_reason_and_carry_the_event() -> None:
    events = [
        Ev("a", "ad", T0 + 10 * MINUTE_MS, user_id="u1", country="DE", cost_micros=700),
        Ev("a", "ad", T0 + 10 * MINUTE_MS),
        Ev("old", "ad", T0),
        Ev("i", "ad", T0 + 10 * MINUTE_MS, event_type=ids.IMPRESSION),
    ]
    outcome = processor().process(frame_of(events, partition=3, base_offset=0))
    assert outcome is not None
    assert outcome.decisions.schema.equals(DECISION_SCHEMA)
    fates = outcome.decisions.to_pylist()
    assert [f["status"] for f in fates] == ["counted", "duplicate", "late", "counted"]
    assert [f["offset"] for f in fates] == [0, 1, 2, 3]
    assert {f["partition"] for f in fates} == {3}
    assert fates[0]["reason"] is None
    assert fates[1]["reason"] and "already seen" in fates[1]["reason"]
    assert fates[2]["reason"] and "watermark" in fates[2]["reason"]
    assert [f["event_type"] for f in fates] == ["click", "click", "click", "impression"]
    # the whole event travels with its fate; only a counted click is billed
    assert (fates[0]["user_id"], fates[0]["country"], fates[0]["cost_micros"]) == ("u1", "DE", 700)
    assert [f["spend_micros"] for f in fates] == [700, 0, 0, 0]
    assert fates[2]["cost_micros"] is None
    assert (fates[0]["fp_high"], fates[0]["fp_low"]) == ids.fingerprint(ids.CLICK, "a")
    assert (outcome.counted, outcome.duplicates, outcome.late) == (2, 1, 1)


def test_spend_uses_event_cost_then_registry_cpc_and_ignores_impressions() -> None:
    proc = PartitionProcessor(
        PartitionState.empty(0),
        allowed_lateness_ms=LATENESS,
        dedup_horizon_ms=HORIZON,
        cpc_micros={"ad": 300_000},
    )
    events = [
        Ev("1", "ad", T0, cost_micros=1_000_000),
        Ev("2", "ad", T0),
        Ev("3", "other", T0),
        Ev("4", "ad", T0, event_type=ids.IMPRESSION, cost_micros=5),
    ]
    outcome = proc.process(frame_of(events))
    assert outcome is not None
    spend = {r["ad_id"]: r["spend_micros"] for r in outcome.minute_deltas.to_pylist()}
    assert spend == {"ad": 1_300_000, "other": 0}


def test_breakdowns_and_unique_users() -> None:
    events = [
        Ev("1", "ad", T0, user_id="u1", country="US", device="mobile", browser="Safari"),
        Ev("2", "ad", T0, user_id="u1", country="US", device="mobile", browser="Safari"),
        Ev("3", "ad", T0, user_id="u2", country=None, device="desktop", browser="Chrome"),
    ]
    outcome = processor().process(frame_of(events))
    assert outcome is not None
    minute = outcome.minute_deltas.to_pylist()
    assert len(minute) == 1 and hll.estimate(minute[0]["users"]) == 2
    assert (minute[0]["advertiser_id"], minute[0]["campaign_id"]) == ("unknown", "unknown")
    assert set(outcome.dimension_deltas) == {"country", "device", "browser", "invalid_reason"}
    # one narrow table per dimension: rows do not multiply across dimensions
    country = pl.from_arrow(outcome.dimension_deltas["country"])
    assert isinstance(country, pl.DataFrame)
    assert country.select("country", "clicks").sort("country").rows() == [
        ("US", 2),
        ("unknown", 1),
    ]
    assert outcome.dimension_deltas["country"].schema.names == [
        "ad_id",
        "minute_ms",
        "country",
        *(f.name for f in aggregate.MEASURES),
    ]
    device = outcome.dimension_deltas["device"].to_pylist()
    assert sorted((r["device"], r["clicks"], hll.estimate(r["users"])) for r in device) == [
        ("desktop", 1, 1),
        ("mobile", 2, 1),
    ]


def test_offsets_must_continue() -> None:
    proc = processor()
    proc.process(frame_of([Ev("1", "ad", T0)]))
    try:
        proc.process(frame_of([Ev("2", "ad", T0)], base_offset=5))
    except ValueError as exc:
        assert "expected offset 1" in str(exc)
    else:
        raise AssertionError("a gap in offsets must be refused")


AGENTS = [None, "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", "curl/8.5.0", "Googlebot/2.1"]
ROWS = st.lists(
    st.tuples(
        st.integers(0, 2),  # partition
        st.integers(0, 25),  # id: repeats are duplicates
        st.integers(0, 12 * MINUTE_MS),  # time: some late behind the newest
        st.sampled_from(AGENTS),
        st.booleans(),  # click
    ),
    max_size=60,
)


@settings(max_examples=20, deadline=None)
@given(ROWS, ROWS)
def test_partitions_labelled_together_equal_each_labelled_alone(
    first: list[tuple[int, int, int, str | None, bool]],
    second: list[tuple[int, int, int, str | None, bool]],
) -> None:
    """A worker round labels its partitions in one pass (``outcomes``): every partition's
    outcome (decisions, counts, kept events, deltas) is the one it gets on its own, with
    rules that flag, duplicates and late events, over two rounds of state."""
    ruleset = load_rules()
    prices = PriceBook.of({"ad-1": 700})

    def processors() -> list[PartitionProcessor]:
        return [
            PartitionProcessor(
                PartitionState.empty(p),
                allowed_lateness_ms=LATENESS,
                dedup_horizon_ms=HORIZON,
                cpc_micros=prices,
                rules=ruleset.stream_rules,
            )
            for p in range(3)
        ]

    alone, together = processors(), processors()
    offsets = [0, 0, 0]
    for rows in (first, second):
        frames = []
        for p in range(3):
            mine = [r for r in rows if r[0] == p]
            events = [
                Ev(
                    f"e{i}",
                    f"ad-{i % 2}",
                    T0 + t,
                    event_type=ids.CLICK if click else ids.IMPRESSION,
                    user_id=f"u{i % 5}",
                    country="DE",
                    user_agent=agent,
                )
                for _, i, t, agent, click in mine
            ]
            frames.append(frame_of(events, partition=p, base_offset=offsets[p]))
            offsets[p] += len(events)
        expected = [alone[p].process(frames[p]) for p in range(3)]
        decided = [together[p].decide(frames[p]) for p in range(3)]
        got = outcomes(decided, rules=ruleset.stream_rules, prices=prices)
        for want, have in zip(expected, got, strict=True):
            assert want is not None
            assert have.decisions.equals(want.decisions)
            assert have.kept.equals(want.kept)
            assert have.minute_deltas.equals(want.minute_deltas)
            assert have.dimension_deltas.keys() == want.dimension_deltas.keys()
            for name, table in want.dimension_deltas.items():
                assert have.dimension_deltas[name].equals(table)
            counts = ("counted", "duplicates", "late", "invalid", "max_event_ms", "watermark_ms")
            for name in (*counts, "from_offset", "to_offset"):
                assert getattr(have, name) == getattr(want, name), name
