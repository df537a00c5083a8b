"""The ad family over real logs and a real store: ``no_impression_click`` and an excluding
``ctr_spike`` in the stream, correcting exactly the clicks the batch's rules flag hour by
hour, whatever the number of partitions; a crash between any two steps changes nothing;
with none of its rules in force, the family's log stays empty."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from clickagg.core import ids
from clickagg.core.adkeyed import ad_records
from clickagg.core.rules.loading import load_rules
from clickagg.core.windows import HOUR_MS
from clickagg.keyed.stage2 import AD, FAMILY_KEYS, keyed_status
from tests.conftest import Ev
from tests.keyed.test_stages import MINUTE_MS, T0, Key
from tests.keyed.test_visitor_stage import BothFamiliesRig
from tests.worker.test_stream import Crash

NO_IMPRESSION = "no-impression-click"
SPIKE = "ctr-spike"
REVIEW = "ctr-review"  # review only: reported, billable
AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"
ADS = ("ad-1", "ad-2", "ad-3")
RULES = f"""
include_builtin = true

[[rules]]
id = "{NO_IMPRESSION}"
kind = "no_impression_click"
reason = "click without an impression"
[rules.params]
window_minutes = 30
min_ad_impressions = 5

[[rules]]
id = "{SPIKE}"
kind = "ctr_spike"
reason = "CTR far above the ad's baseline"
[rules.params]
factor = 3.0
baseline_hours = 2
min_clicks = 10
exclude = true

[[rules]]
id = "{REVIEW}"
kind = "ctr_spike"
reason = "CTR above the ad's baseline"
[rules.params]
factor = 2.0
baseline_hours = 2
min_clicks = 10
"""


def ad_traffic(seed: int = 3) -> list[list[Ev]]:
    """Three hours in chunks of event time order (stage 1 keeps them all), each shuffled,
    with a few copies. ``ad-1`` sends impressions: its clicks follow the clicker's
    impression, except 3 an hour from users who saw nothing. ``ad-2`` sends none: its
    clicks are not judged. ``ad-3``: two hours of CTR 1/10, then an hour of 30 clicks on 10
    impressions (each clicker saw it). One user, one address and agent per visitor."""
    rng = random.Random(seed)
    timed: list[Ev] = []
    n = 0

    def event(kind: int, ad: str, ts: int, user: str) -> None:
        nonlocal n
        n += 1
        timed.append(
            Ev(
                f"{'c' if kind == ids.CLICK else 'i'}{n}",
                ad,
                ts,
                event_type=kind,
                user_id=user,
                ip=f"10.{n // 250}.{n % 250}.1",
                user_agent=AGENT,
                cost_micros=2_000 if kind == ids.CLICK else -1,
            )
        )

    for hour in range(3):
        start = T0 + hour * HOUR_MS
        for u in range(20):  # ad-1: seen, then 40% click 1-10 minutes later
            at = start + rng.randrange(45 * MINUTE_MS)
            event(ids.IMPRESSION, "ad-1", at, f"v{hour}-{u}")
            if u % 5 < 2:
                event(
                    ids.CLICK, "ad-1", at + rng.randrange(MINUTE_MS, 10 * MINUTE_MS), f"v{hour}-{u}"
                )
        for u in range(3):  # ad-1: never seen by these users
            event(ids.CLICK, "ad-1", start + rng.randrange(55 * MINUTE_MS), f"blind{hour}-{u}")
        for u in range(6):  # ad-2: no impressions sent at all
            event(ids.CLICK, "ad-2", start + rng.randrange(55 * MINUTE_MS), f"w{hour}-{u}")
        spiking = hour == 2
        for u in range(10 if spiking else 30):  # ad-3
            at = start + rng.randrange(30 * MINUTE_MS)
            event(ids.IMPRESSION, "ad-3", at, f"s{hour}-{u}")
            clicks = 3 if spiking else (1 if u % 10 == 0 else 0)
            for j in range(clicks):  # minutes apart: no repeat clicks
                event(ids.CLICK, "ad-3", at + (j + 1) * 5 * MINUTE_MS, f"s{hour}-{u}")
    by_bucket: dict[int, list[Ev]] = defaultdict(list)  # 4 minutes: within the lateness
    for e in timed:
        by_bucket[e.ts_ms // (4 * MINUTE_MS)].append(e)
    chunks = [by_bucket[b] for b in sorted(by_bucket)]
    for chunk in chunks:
        chunk += rng.sample(chunk, min(2, len(chunk)))  # retransmitted copies
        rng.shuffle(chunk)
    # Later events of every ad move the horizon past the three hours.
    chunks.append(
        [
            Ev(f"t{k}-{ad}", ad, T0 + 5 * HOUR_MS + k, ip=f"10.250.{k}.1", user_id=f"t{k}")
            for k in range(40)
            for ad in ADS
        ]
    )
    return chunks


def batch_reference(chunks: list[list[Ev]], rules_file: Path) -> dict[str, str]:
    """Per flagged click its rule: the rules file's rules as the batch applies them, each
    hour with every earlier event as context."""
    distinct = {(e.event_type, e.event_id): e for chunk in chunks for e in chunk}
    events = list(distinct.values())
    frame = pl.DataFrame(
        {
            "event_type": [ids.EVENT_TYPES[e.event_type] for e in events],
            "event_id": [e.event_id for e in events],
            "user_id": [e.user_id for e in events],
            "ip": [e.ip for e in events],
            "user_agent": [e.user_agent for e in events],
            "ad_id": [e.ad_id for e in events],
            "ts_ms": [e.ts_ms for e in events],
        }
    )
    ruleset = load_rules(rules_file)
    out: dict[str, str] = {}
    for hour in sorted({e.ts_ms - e.ts_ms % HOUR_MS for e in events}):
        seen = frame.filter(pl.col("ts_ms") < hour + HOUR_MS)
        for event_id, reason in zip(
            seen["event_id"], ruleset.batch_reasons(seen, hour), strict=True
        ):
            if reason is not None:
                out[event_id] = reason.split(": ", 1)[0]
    return out


ROUND_MS = 12 * MINUTE_MS


def rounds(chunks: list[list[Ev]]) -> list[list[Ev]]:
    """The traffic as the stream gets it: the chunks of each 12 minutes of event time sent
    in order, then drained (5 rounds an hour, none across an hour's edge; each round costs
    the rig a commit of every stage, whatever it holds), the later events last."""
    grouped: dict[int, list[Ev]] = defaultdict(list)
    for chunk in chunks[:-1]:
        grouped[min(e.ts_ms for e in chunk) // ROUND_MS] += chunk
    return [grouped[r] for r in sorted(grouped)] + chunks[-1:]


class AdFamilyRig(BothFamiliesRig):
    family = AD
    records = staticmethod(ad_records)
    clicks_only = False
    reviews: dict[str, int] | None = None  # the store's, once the traffic is through


def _run(
    root: Path,
    partitions: int,
    keyed: int,
    *,
    crash: Crash | None = None,
    rules: str = RULES,
    at_once: bool = False,
) -> tuple[dict[str, Counter[Key]], Counter[str], pa.Table, AdFamilyRig]:
    rules_file = root / "rules.toml"
    rules_file.write_text(rules)
    rig = AdFamilyRig(
        root / "data",
        partitions=partitions,
        keyed_partitions=keyed,
        crash=crash,
        rules_file=rules_file,
    )
    try:
        chunks = ad_traffic()
        for chunk in (
            [[e for c in chunks[:-1] for e in c], chunks[-1]] if at_once else rounds(chunks)
        ):
            rig.send(chunk)
            rig.run()
        result = rig.counts(ADS), rig.realtime(ADS)
        rig.reviews = rig.store.keyed_reviews_by_rule()
    finally:
        rig.close()
    return (*result, rig.corrected(), rig)


def check(
    counts: dict[str, Counter[Key]],
    realtime: Counter[str],
    corrected: pa.Table,
    chunks: list[list[Ev]],
    expected: dict[str, str],
) -> None:
    distinct = {e.event_id: e for chunk in chunks for e in chunk if e.event_type == ids.CLICK}
    want: dict[str, Counter[Key]] = defaultdict(Counter)
    for event_id, e in distinct.items():
        key = (e.ad_id, e.ts_ms - e.ts_ms % MINUTE_MS)
        if event_id in expected:
            want["invalid_clicks"][key] += 1
            want[f"reason {expected[event_id]}"][key] += 1
        else:
            want["clicks"][key] += 1
            want["spend_micros"][key] += max(e.cost_micros, 0)
    for name, counter in want.items():
        assert counts.get(name, Counter()) == +counter, name
    assert realtime == Counter(
        clicks=counts["clicks"].total(),
        spend_micros=counts["spend_micros"].total(),
        invalid=counts["invalid_clicks"].total(),
    )
    rows = corrected.to_pylist()
    assert sorted(r["event_id"] for r in rows) == sorted(expected)  # each corrected once
    for row in rows:
        assert row["rule_id"] == expected[row["event_id"]]
        assert row["keyed_partition"] >= 2 * FAMILY_KEYS  # the ad family's keys
        assert row["previous_rule_id"] is None


@pytest.mark.parametrize(("partitions", "keyed"), [(1, 1), (4, 4), (16, 3)])
def test_clicks_without_impressions_and_a_ctr_spike_are_corrected_as_the_batch_flags_them(
    tmp_path: Path, partitions: int, keyed: int
) -> None:
    counts, realtime, corrected, rig = _run(tmp_path, partitions, keyed)
    # ad-3's spiking hour, once each: its 30 clicks stay corrected by the excluding rule
    assert rig.reviews == {REVIEW: 30}
    expected = batch_reference(ad_traffic(), tmp_path / "rules.toml")
    # The test's premise: 3 blind clicks an hour on ad-1, ad-3's spiking hour, nothing else.
    assert Counter(expected.values()) == Counter({NO_IMPRESSION: 9, SPIKE: 30})
    check(counts, realtime, corrected, ad_traffic(), expected)
    spike = corrected.filter(pa.compute.equal(corrected["rule_id"], SPIKE))
    evidence = spike["evidence"][0].as_py()
    assert evidence.startswith("ad ad-3 hour ")
    assert "CTR 30 clicks / 10 impressions vs baseline 6 / 60 over 2 h (factor 3)" in evidence
    blind = corrected.filter(pa.compute.equal(corrected["rule_id"], NO_IMPRESSION))
    assert blind["evidence"][0].as_py().endswith("no impression of ad ad-1 in the 30 min before")


@pytest.mark.parametrize(
    "point",
    # The steps this family adds to (its windows and snapshots, the reviews in the commit,
    # the corrections it archives); test_visitor_stage.py runs every step of the protocol.
    ["keyed-after-read", "keyed-inside-commit", "corrections-before-publish", "keyed-snapshot"],
)
def test_a_crash_at_any_step_the_family_adds_to_changes_nothing(tmp_path: Path, point: str) -> None:
    crash = Crash(point, at=3, times=4)
    counts, realtime, corrected, rig = _run(tmp_path, 4, 3, crash=crash)
    assert crash.fired >= 1
    assert rig.reviews == {REVIEW: 30}  # counted once, crashes or not
    expected = batch_reference(ad_traffic(), tmp_path / "rules.toml")
    check(counts, realtime, corrected, ad_traffic(), expected)


@pytest.mark.parametrize("point", [None, "after-commit", "keyed-after-sync"])
def test_a_backlog_spanning_hours_is_judged_whole_even_across_a_crash(
    tmp_path: Path, point: str | None
) -> None:
    """The three hours in the log at once (a backlog): a partition's micro-batch spans far
    more event time than the keyed horizon, and the partitions' batches do not end at the
    same time. Rounds cut each partition's batch a minute past the furthest-behind one's
    event clock (``stream.aligned``) and interleave a round's records by time, so no record
    reaches a keyed log too late to be judged, also when a crash after the store commit
    makes recovery re-derive a round's records."""
    crash = Crash(point, at=2, times=3) if point else None
    counts, realtime, corrected, _ = _run(tmp_path, 4, 2, crash=crash, at_once=True)
    assert crash is None or crash.fired >= 1
    expected = batch_reference(ad_traffic(), tmp_path / "rules.toml")
    check(counts, realtime, corrected, ad_traffic(), expected)


def test_without_its_rules_the_family_appends_nothing(tmp_path: Path) -> None:
    """The ad family's log carries every event: while none of its rules is in force, stage
    1 appends nothing to it (the worker's ``active`` predicate), and still moves its marker."""
    from clickagg.core.adkeyed import AdRules
    from clickagg.keyed.stage1 import KeyedAppender

    (tmp_path / "rules.toml").write_text("include_builtin = true\n")
    rules = load_rules(tmp_path / "rules.toml")
    assert not AdRules.from_ruleset(rules).rules
    rig = AdFamilyRig(tmp_path / "data", partitions=2, keyed_partitions=2)
    try:
        appender = rig.appender.appenders[1]  # type: ignore[attr-defined]
        assert isinstance(appender, KeyedAppender)
        appender.active = lambda: False
        for chunk in ad_traffic()[:5]:
            rig.send(chunk)
            rig.run()
        status = keyed_status(rig.keyed_reader, rig.store, None, rig.family_reader)
        ad_partitions = [p for p in status.partitions if p.keyed_partition >= 2 * FAMILY_KEYS]
        assert [p.durable_end_offset for p in ad_partitions] == [0, 0]
        assert sum(appender.next_offset(p) for p in range(2)) > 0  # the marker moved
    finally:
        rig.close()


SWITCH = 3  # rounds of 12 minutes: the rules come on 36 minutes into the first hour


def corrected_with_rules_switched_on(
    tmp_path: Path, at_switch: Callable[[AdFamilyRig], None]
) -> list[dict[str, Any]]:
    """Run the ad traffic with the ad family's rules off for the first ``SWITCH`` rounds,
    calling ``at_switch`` before they come on; the corrections the stream made."""
    (tmp_path / "rules.toml").write_text(RULES)
    rig = AdFamilyRig(
        tmp_path / "data", partitions=4, keyed_partitions=3, rules_file=tmp_path / "rules.toml"
    )
    try:
        for i, chunk in enumerate(rounds(ad_traffic())):
            if i == SWITCH:
                at_switch(rig)
            appender = rig.appender.appenders[1]  # type: ignore[attr-defined]
            appender.active = lambda on=i >= SWITCH: on
            rig.send(chunk)
            rig.run()
        return rig.corrected().to_pylist()
    finally:
        rig.close()


def assert_only_what_the_batch_flags_after_the_gap(
    corrected: list[dict[str, Any]], rules_file: Path
) -> None:
    expected = batch_reference(ad_traffic(), rules_file)
    wrong = sorted(r["event_id"] for r in corrected if expected.get(r["event_id"]) != r["rule_id"])
    assert not wrong, f"the stream corrected clicks the batch counts: {wrong}"
    # Hour 2's blind clicks look back to 1:30, after the gap: judged. Hours 0 and 1 reach
    # into it, and so does hour 2's spike (its baseline is hours 0 and 1): the batch's.
    blind = {e.event_id for c in ad_traffic() for e in c if e.user_id.startswith("blind2-")}
    assert {row["event_id"] for row in corrected} == blind


@pytest.mark.parametrize("restart_after_switch", [False, True])
def test_rules_switched_on_while_the_stream_runs_leave_the_hours_reaching_into_the_gap(
    tmp_path: Path, restart_after_switch: bool
) -> None:
    """While the ad family's rules were off, stage 1 appended nothing (counted events the
    keyed log misses). The first frame after that gap carries a context mark, and stage 2
    judges no hour whose window or baseline reaches into the gap: a click whose impression
    fell in it would be flagged, a baseline would lack its clicks. Later hours are judged
    as the batch judges them. A restart right after the switch (the mark owed, or in the
    log) changes nothing."""

    def at_switch(rig: AdFamilyRig) -> None:
        if restart_after_switch:
            rig.restart()

    corrected = corrected_with_rules_switched_on(tmp_path, at_switch)
    assert_only_what_the_batch_flags_after_the_gap(corrected, tmp_path / "rules.toml")


def test_rules_switched_on_after_an_upgrade_from_a_build_without_marks(tmp_path: Path) -> None:
    """The ad family's rules ship off: a build before the context marks moved its ad marker
    every round and recorded no gap (its marker holds offsets only). Upgraded, with the
    rules then switched on, the log misses everything counted before: its first frames
    must carry a mark, or the stream flags clicks the batch counts."""
    marker = tmp_path / "data" / "keyed" / "ad" / "stage1.json"

    def upgrade(rig: AdFamilyRig) -> None:
        stored = json.loads(marker.read_text())
        marker.write_text(json.dumps({k: v for k, v in stored.items() if k.isdigit()}))
        rig.restart()

    corrected = corrected_with_rules_switched_on(tmp_path, upgrade)
    assert_only_what_the_batch_flags_after_the_gap(corrected, tmp_path / "rules.toml")
