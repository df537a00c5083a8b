"""The keyed stage's pure half against the batch: whatever the split of the same clicks into
source partitions, rounds, keyed partitions and reads, with records appended twice, the
stream flags exactly the clicks the batch's IP-keyed rules flag, names each by the rule the
batch's ``invalid_reason`` names, and corrects each once."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core import aggregate, ids
from clickagg.core.keyed import (
    RECORD_SCHEMA,
    VERDICT_SCHEMA,
    KeyedRules,
    KeyedWindows,
    SpreadRule,
    VelocityRule,
    correction_deltas,
    corrections,
    key_partitions,
    keyed_partition,
    keyed_records,
)
from clickagg.core.rules import RuleSet, RuleSpec, compile_rules
from clickagg.core.rules.loading import load_rules
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.keyed.snapshots import decode_windows, encode_windows

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
IPS = ("203.0.113.1", "203.0.113.2", "198.51.100.3")
VELOCITY = RuleSpec(
    "velocity", "ip_click_velocity", "burst", {"max_clicks_per_minute": 3}, enabled=True
)
SPREAD = RuleSpec("spread", "ip_ad_spread", "spread", {"max_ads": 2, "window_minutes": 2})


@dataclass(frozen=True)
class Click:
    ip: str
    ad: int
    ts_ms: int
    counted: bool  # False: a stage-1 rule flagged it


clicks_strategy = st.lists(
    st.builds(
        Click,
        ip=st.sampled_from(IPS),
        ad=st.integers(0, 5),
        # 6 minutes on a 10 s grid: equal times, minute and window edges happen often
        ts_ms=st.integers(0, 36).map(lambda n: T0 + n * 10_000),
        counted=st.sampled_from([True, True, True, False]),
    ),
    max_size=70,
)


def kept_frame(
    clicks: list[tuple[int, Click]], partition: int, offsets: dict[int, int]
) -> pl.DataFrame:
    """What stage 1's ``BatchOutcome.kept`` holds for a round of one source partition."""
    rows = []
    for number, click in clicks:
        rows.append(
            {
                "event_type": ids.CLICK,
                "ip": click.ip,
                "user_id": None,
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
    return pl.DataFrame(
        rows,
        schema={
            "event_type": pl.UInt8,
            "ip": pl.String,
            "user_id": pl.String,
            "ad_id": pl.String,
            "advertiser_id": pl.String,
            "campaign_id": pl.String,
            "country": pl.String,
            "device": pl.String,
            "browser": pl.String,
            "ts_ms": pl.Int64,
            "event_id": pl.String,
            "partition": pl.Int64,
            "offset": pl.Int64,
            "spend_micros": pl.Int64,
            "invalid": pl.Boolean,
        },
    )


def batch_verdicts(clicks: list[Click], ruleset: RuleSet) -> dict[str, str]:
    """The batch layer's ``invalid_reason`` (a rule id) per flagged event id."""
    decisions = pl.DataFrame(
        {
            "event_type": ["click"] * len(clicks),
            "event_id": [f"e{n}" for n in range(len(clicks))],
            "ip": [c.ip for c in clicks],
            "user_id": [None] * len(clicks),
            "user_agent": [None] * len(clicks),
            "ad_id": [f"ad-{c.ad}" for c in clicks],
            "ts_ms": [c.ts_ms for c in clicks],
        },
        schema={
            "event_type": pl.String,
            "event_id": pl.String,
            "ip": pl.String,
            "user_id": pl.String,
            "user_agent": pl.String,
            "ad_id": pl.String,
            "ts_ms": pl.Int64,
        },
    )
    reasons = ruleset.batch_reasons(decisions)
    return {
        f"e{n}": reason.split(": ")[0]
        for n, reason in enumerate(reasons.to_list())
        if reason is not None
    }


def cuts(draw: st.DrawFn, n: int) -> list[int]:
    """Ascending positions in 0..n where a sequence of n is cut."""
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))


def pieces(n: int, at: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *at, n]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=150)
@given(clicks=clicks_strategy, keyed=st.sampled_from([1, 4, 16]), data=st.data())
def test_the_stream_flags_what_the_batch_flags_whatever_the_split(
    clicks: list[Click], keyed: int, data: st.DataObject
) -> None:
    order = data.draw(st.sampled_from([(VELOCITY, SPREAD), (SPREAD, VELOCITY)]))
    effective = data.draw(st.sampled_from([None, T0 + 2 * MINUTE_MS + 10_000]))
    specs = [RuleSpec(s.id, s.kind, s.reason, s.params, effective_from_ms=effective) for s in order]
    ruleset = RuleSet(compile_rules(specs))
    rules = KeyedRules.from_ruleset(ruleset)
    assert rules.ids == [s.id for s in order]

    # Stage 1: the clicks in arrival order over source partitions, cut into rounds; some
    # rounds are appended again later (a recovery after a lost marker).
    sources = data.draw(st.integers(1, 3))
    offsets: dict[int, int] = {}
    per_source: Counter[int] = Counter()
    for number in range(len(clicks)):
        offsets[number] = per_source[number % sources]
        per_source[number % sources] += 1
    logs: dict[int, list[pa.Table]] = {k: [] for k in range(keyed)}
    appended: list[dict[int, pa.Table]] = []
    for a, b in pieces(len(clicks), cuts(data.draw, len(clicks))):
        rounds = [
            keyed_records(kept_frame(chunk, p, offsets), keyed)
            for p in range(sources)
            if (chunk := [(n, clicks[n]) for n in range(a, b) if n % sources == p])
        ]
        appended += rounds
        for round_ in rounds + data.draw(st.lists(st.sampled_from(appended), max_size=2)):
            for k, table in round_.items():
                logs[k].append(table)

    # Stage 2: each keyed partition's log read in chunks cut anywhere.
    verdicts: list[pa.Table] = []
    for tables in logs.values():
        log = pa.concat_tables([RECORD_SCHEMA.empty_table(), *tables])
        windows = KeyedWindows(horizon_ms=HOUR_MS)
        for a, b in pieces(log.num_rows, cuts(data.draw, log.num_rows)):
            verdicts.append(windows.consume(log.slice(a, b - a), rules))
    stream: dict[str, str] = {}
    corrected: Counter[str] = Counter()
    for row in pa.concat_tables([VERDICT_SCHEMA.empty_table(), *verdicts]).to_pylist():
        assert row["counted"]
        assert row["previous_rule_id"] == stream.get(row["event_id"])
        assert (
            rules.ids.index(row["rule_id"])
            < rules.ids.index(row["previous_rule_id"] or row["rule_id"])
            or row["previous_rule_id"] is None
        )
        corrected[row["event_id"]] += row["previous_rule_id"] is None
        stream[row["event_id"]] = row["rule_id"]

    batch = batch_verdicts(clicks, ruleset)
    counted = {f"e{n}" for n, c in enumerate(clicks) if c.counted}
    assert stream == {e: rule for e, rule in batch.items() if e in counted}
    assert set(corrected.values()) <= {1}  # copies never correct a click twice


@settings(max_examples=100)
@given(clicks=clicks_strategy, data=st.data())
def test_verdicts_do_not_depend_on_the_reads_even_past_the_horizon(
    clicks: list[Click], data: st.DataObject
) -> None:
    """With a horizon shorter than the clicks' disorder some records are too late to judge:
    which ones depends on the records alone, not on where the reads cut the log."""
    rules = KeyedRules.from_ruleset(RuleSet(compile_rules([VELOCITY, SPREAD])))
    offsets = {n: n for n in range(len(clicks))}
    log = keyed_records(kept_frame(list(enumerate(clicks)), 0, offsets), 1).get(
        0, RECORD_SCHEMA.empty_table()
    )

    def run(at: list[int]) -> tuple[dict[str, str], int, int, dict[int, int]]:
        windows = KeyedWindows(horizon_ms=MINUTE_MS)
        out = [windows.consume(log.slice(a, b - a), rules) for a, b in pieces(log.num_rows, at)]
        table = pa.concat_tables([VERDICT_SCHEMA.empty_table(), *out])
        final = dict(zip(table["event_id"].to_pylist(), table["rule_id"].to_pylist(), strict=True))
        return final, corrections(table), windows.max_event_ms, windows.high_water

    assert run(cuts(data.draw, log.num_rows)) == run([])


def records(rows: list[tuple[str, str, int]], *, first_offset: int = 0) -> pa.Table:
    """(ip, ad, ts) rows of source partition 0, from ``first_offset`` on."""
    n = len(rows)
    return pa.table(
        {
            "ip": [r[0] for r in rows],
            "user_id": [None] * n,
            "ad_id": [r[1] for r in rows],
            "advertiser_id": ["adv"] * n,
            "campaign_id": ["camp"] * n,
            "country": ["US"] * n,
            "device": [None] * n,
            "browser": [None] * n,
            "ts_ms": [r[2] for r in rows],
            "event_id": [f"e{first_offset + i}" for i in range(n)],
            "source_partition": [0] * n,
            "source_offset": [first_offset + i for i in range(n)],
            "spend_micros": [2_000] * n,
            "counted": [True] * n,
        },
        schema=RECORD_SCHEMA,
    )


def test_a_spreading_address_is_flagged_from_the_click_over_the_limit_on() -> None:
    rules = KeyedRules((SpreadRule("ip-ad-spread", "spread", max_ads=3, window_minutes=10),))
    windows = KeyedWindows(horizon_ms=HOUR_MS)
    ip = "203.0.113.7"
    # ad-0 .. ad-4 a minute apart: the 4th distinct ad in 10 minutes is over the limit
    first = windows.consume(records([(ip, f"ad-{i}", T0 + i * MINUTE_MS) for i in range(5)]), rules)
    assert first["event_id"].to_pylist() == ["e3", "e4"]
    assert first["evidence"].to_pylist()[0] == (
        f"ip {ip}: more than 3 distinct ads clicked in the 10 min to 2023-11-14T22:03:00.000Z"
    )
    # 12 minutes on, ad-0..ad-2 have left the window: the same ad again is not a spread
    later = windows.consume(records([(ip, "ad-4", T0 + 15 * MINUTE_MS)], first_offset=5), rules)
    assert later.num_rows == 0


def test_a_later_verdict_of_an_earlier_rule_renames_a_click_without_correcting_it_again() -> None:
    rules = KeyedRules(
        (
            VelocityRule("ip-click-velocity", "burst", max_clicks_per_minute=4),
            SpreadRule("ip-ad-spread", "spread", max_ads=2, window_minutes=10),
        )
    )
    windows = KeyedWindows(horizon_ms=HOUR_MS)
    ip = "198.51.100.9"
    spread = windows.consume(records([(ip, f"ad-{i}", T0 + i) for i in range(4)]), rules)
    assert spread["rule_id"].to_pylist() == ["ip-ad-spread"] * 2  # e2, e3: 3rd and 4th ad
    burst = windows.consume(records([(ip, "ad-0", T0 + 10)], first_offset=4), rules)
    assert burst.to_pydict()["event_id"] == ["e0", "e1", "e2", "e3", "e4"]
    assert burst["rule_id"].to_pylist() == ["ip-click-velocity"] * 5
    assert burst["previous_rule_id"].to_pylist() == [
        None,
        None,
        "ip-ad-spread",
        "ip-ad-spread",
        None,
    ]
    assert corrections(spread) + corrections(burst) == 5

    minute, dimensions = correction_deltas(pa.concat_tables([spread, burst]))
    assert pl.from_arrow(minute)["clicks"].sum() == -5
    assert pl.from_arrow(minute)["spend_micros"].sum() == -5 * 2_000
    reasons = pl.from_arrow(dimensions[aggregate.REASON_DIMENSION])
    by_rule = dict(
        reasons.group_by(aggregate.REASON_DIMENSION).agg(pl.col("invalid_clicks").sum()).iter_rows()
    )
    assert by_rule == {"ip-click-velocity": 5}  # spread's two moved to velocity


@pytest.mark.parametrize("restore", [False, True])
def test_after_a_gap_a_click_is_named_only_by_a_rule_the_batch_names_too(restore: bool) -> None:
    """Clicks e0, e1 were counted before the keyed log started (a gap, marked from T0 + 2).
    With them the batch's first rule (velocity, > 4 a minute) flags the whole minute;
    without them the stream sees 4 clicks there, and only the second rule (spread) flags
    e4 and e5. Naming them "spread" would be a reason the batch never gives: the stream
    leaves them to the batch. A click whose every earlier rule has its context after the
    gap is still judged (e7 ten minutes on: spread, as in the batch). The mark survives a
    snapshot."""
    ip = "198.51.100.9"
    rows = [(ip, "ad-0", T0), (ip, "ad-0", T0 + 1)]  # e0, e1: in the gap
    rows += [(ip, f"ad-{a}", T0 + 2 + i) for i, a in enumerate((1, 2, 3, 1))]  # e2..e5
    later = T0 + 11 * MINUTE_MS
    rows += [(ip, "ad-7", later), (ip, "ad-8", later + 1), (ip, "ad-9", later + 2)]  # e6..e8
    specs = [
        RuleSpec("velocity", "ip_click_velocity", "burst", {"max_clicks_per_minute": 4}),
        RuleSpec("spread", "ip_ad_spread", "spread", {"max_ads": 2, "window_minutes": 10}),
    ]
    ruleset = RuleSet(tuple(compile_rules(specs)))
    batch = batch_verdicts([Click(r[0], int(r[1][3:]), r[2], True) for r in rows], ruleset)
    assert batch == {**{f"e{n}": "velocity" for n in range(6)}, "e8": "spread"}
    rules = KeyedRules.from_ruleset(ruleset)
    windows = KeyedWindows(horizon_ms=HOUR_MS)
    windows.start_context(T0 + 2)  # what stage 2 does at the marked frame
    got = [windows.consume(records(rows[2:6], first_offset=2), rules)]
    if restore:
        windows = decode_windows(encode_windows(windows), HOUR_MS)
        assert windows.context_from_ms == T0 + 2
    got.append(windows.consume(records(rows[6:], first_offset=6), rules))
    stream = pa.concat_tables(got)
    named = dict(zip(stream["event_id"].to_pylist(), stream["rule_id"].to_pylist(), strict=True))
    assert named == {"e8": "spread"}
    assert all(batch[event] == rule for event, rule in named.items())


def test_copies_and_records_before_a_rule_takes_effect() -> None:
    rules = KeyedRules(
        (VelocityRule("v", "burst", max_clicks_per_minute=2, effective_from_ms=T0 + 30_000),)
    )
    windows = KeyedWindows(horizon_ms=HOUR_MS)
    ip = "203.0.113.9"
    rows = [(ip, "ad-1", T0 + s * 1_000) for s in (10, 20, 31, 32)]  # 2 before, 2 after
    assert windows.consume(records(rows), rules).num_rows == 0  # 2 counted: at the limit
    again = pa.concat_tables([records(rows), records([(ip, "ad-1", T0 + 33_000)], first_offset=4)])
    flagged = windows.consume(again, rules)  # copies skipped; the 3rd counted one is over
    assert flagged["event_id"].to_pylist() == ["e2", "e3", "e4"]
    assert windows.high_water == {0: 4}


def test_the_rules_in_force_as_a_recordable_value() -> None:
    rules = KeyedRules.from_ruleset(load_rules())
    assert rules == KeyedRules(
        (
            VelocityRule("ip-click-velocity", "click burst from one address", 60),
            SpreadRule("ip-ad-spread", "one address clicking many ads", 20, 10),
        )
    )
    assert KeyedRules.from_json(rules.to_json()) == rules
    assert KeyedRules.from_json(KeyedRules().to_json()) == KeyedRules()
    with pytest.raises(ValueError, match="unknown kind 'repeat_click'"):
        KeyedRules.from_json('{"rules": [{"kind": "repeat_click", "rule_id": "r"}]}')
    off = RuleSet(
        compile_rules(
            [RuleSpec("v", "ip_click_velocity", "b", {"max_clicks_per_minute": 1}, enabled=False)]
        )
    )
    assert KeyedRules.from_ruleset(off) == KeyedRules()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=50), st.integers(1, 1024))
def test_records_are_partitioned_as_keyed_partition_says_every_key_at_once(
    keys: list[str], partitions: int
) -> None:
    """Stage 1 hashes a round's keys vectorized: the same partition as the one-key
    definition, for any text (the bytes hashed are its UTF-8)."""
    got = pl.DataFrame({"k": keys}).select(key_partitions("k", partitions)).to_series()
    assert got.to_list() == [keyed_partition(k, partitions) for k in keys]
