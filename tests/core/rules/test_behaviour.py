"""The behavioural rules against references computed here with plain loops over the same
hand-built events: repeat clicks, one address on many ads, clicks without an impression, an
ad's CTR spike and one agent and device on one ad from many addresses."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from typing import Any

import polars as pl
import pytest

from clickagg.core import ids
from clickagg.core.rules import RuleError, RuleSet, RuleSpec, compile_rule
from clickagg.core.windows import HOUR_MS, MINUTE_MS

T = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
SCHEMA = {
    "event_type": pl.String,
    "user_id": pl.String,
    "ip": pl.String,
    "user_agent": pl.String,
    "device": pl.String,
    "ad_id": pl.String,
    "ts_ms": pl.Int64,
}
Row = dict[str, Any]


def frame(rows: list[Row]) -> pl.DataFrame:
    return pl.DataFrame([{k: r.get(k) for k in SCHEMA} for r in rows], schema=SCHEMA)


def random_rows(seed: int, n: int, span_ms: int, *, users: int = 4, ads: int = 3) -> list[Row]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        user = rnd.choice([*(f"u{i}" for i in range(users)), None])
        rows.append(
            {
                "event_type": rnd.choice(["click", "click", "impression"]),
                "user_id": user,
                "ip": rnd.choice(["10.0.0.1", "10.0.0.2", None]),
                "user_agent": rnd.choice(["Mozilla/5.0 A", "Mozilla/5.0 B", None]),
                "ad_id": f"ad{rnd.randrange(ads)}",
                "ts_ms": T + rnd.randrange(span_ms),
            }
        )
    return rows


def visitor(row: Row) -> str | None:
    if row["user_id"] is not None:
        return f"u:{row['user_id']}"
    if row["ip"] is None or row["user_agent"] is None:
        return None
    return f"a:{row['ip']} {row['user_agent']}"


def flagged(spec: RuleSpec, rows: list[Row]) -> dict[int, str]:
    reasons = RuleSet((compile_rule(spec),)).batch_reasons(frame(rows)).to_list()
    return {i: r for i, r in enumerate(reasons) if r is not None}


def iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


# -- repeat_click --------------------------------------------------------------------------------


def repeat_reference(rows: list[Row], window_ms: int) -> dict[int, int]:
    """Row -> the time of the counted click it repeats."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["ts_ms"])  # stable: row order
    counted: dict[tuple[str, str], int] = {}
    out = {}
    for i in order:
        row, key = rows[i], visitor(rows[i])
        if row["event_type"] != "click" or key is None:
            continue
        anchor = counted.get((key, row["ad_id"]))
        if anchor is not None and row["ts_ms"] - anchor < window_ms:
            out[i] = anchor
        else:
            counted[(key, row["ad_id"])] = row["ts_ms"]
    return out


@pytest.mark.parametrize("seed", range(8))
def test_repeat_click_flags_clicks_within_the_window_of_the_counted_one(seed: int) -> None:
    rows = random_rows(seed, 300, 10 * MINUTE_MS)
    spec = RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 30})
    got = flagged(spec, rows)
    expected = repeat_reference(rows, 30_000)
    assert set(got) == set(expected) and expected
    for i, anchor in expected.items():
        assert got[i].startswith("rep: repeat: ")
        assert f"counted click at {iso(anchor)}Z" in got[i], got[i]


def test_repeat_click_counts_again_after_the_window_from_the_counted_click() -> None:
    # Every 10 s for a minute, window 30 s: counted at 0, 30, 60 (not chained from repeats).
    rows = [
        {"event_type": "click", "user_id": "u", "ad_id": "a", "ts_ms": T + s * 1000}
        for s in range(0, 70, 10)
    ]
    rows.append(
        {"event_type": "click", "ip": "10.0.0.9", "user_agent": "UA", "ad_id": "a", "ts_ms": T + 5}
    )
    rows.append(
        {"event_type": "click", "ip": "10.0.0.9", "user_agent": "UA", "ad_id": "a", "ts_ms": T + 6}
    )
    rows.append({"event_type": "click", "ip": "10.0.0.9", "ad_id": "a", "ts_ms": T + 7})  # no key
    got = flagged(RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 30}), rows)
    assert sorted(got) == [1, 2, 4, 5, 8]
    assert "ip 10.0.0.9 (no user) clicked ad a again 0.001 s" in got[8]


# -- ip_ad_spread ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_ip_ad_spread_counts_distinct_ads_in_the_window_ending_at_each_click(seed: int) -> None:
    rows = random_rows(seed, 200, 30 * MINUTE_MS, ads=8)
    spec = RuleSpec("spread", "ip_ad_spread", "spread", {"max_ads": 4, "window_minutes": 5})
    expected = {}
    for i, row in enumerate(rows):
        if row["event_type"] != "click" or row["ip"] is None:
            continue
        ads = {
            r["ad_id"]
            for r in rows
            if r["event_type"] == "click"
            and r["ip"] == row["ip"]
            and row["ts_ms"] - 5 * MINUTE_MS <= r["ts_ms"] <= row["ts_ms"]
        }
        if len(ads) > 4:
            expected[i] = len(ads)
    got = flagged(spec, rows)
    assert set(got) == set(expected) and expected
    for i, n in expected.items():
        assert f"ip {rows[i]['ip']}: {n} distinct ads clicked in the 5 min" in got[i]


def test_the_sliding_rules_keep_each_address_to_its_own_clicks() -> None:
    """``rolling`` returns its groups in an order of its own: counts set back by position
    landed on another address's clicks (here the single click of 198.51.100.3)."""
    rows = [
        {"event_type": "click", "ip": "203.0.113.1", "ad_id": f"ad{n}", "ts_ms": T}
        for n in range(3)
    ]
    rows.append({"event_type": "click", "ip": "198.51.100.3", "ad_id": "ad0", "ts_ms": T})
    spread = RuleSpec("spread", "ip_ad_spread", "spread", {"max_ads": 2, "window_minutes": 2})
    volume = RuleSpec("vol", "ip_click_volume", "volume", {"max_clicks": 2, "window_hours": 1})
    assert sorted(flagged(spread, rows)) == [0, 1, 2]
    assert sorted(flagged(volume, rows)) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_ip_click_volume_counts_an_addresses_clicks_over_hours(seed: int) -> None:
    rows = random_rows(seed, 300, 6 * HOUR_MS)
    spec = RuleSpec("vol", "ip_click_volume", "volume", {"max_clicks": 20, "window_hours": 2})
    expected = {}
    for i, row in enumerate(rows):
        if row["event_type"] != "click" or row["ip"] is None:
            continue
        n = sum(
            1
            for r in rows
            if r["event_type"] == "click"
            and r["ip"] == row["ip"]
            and row["ts_ms"] - 2 * HOUR_MS <= r["ts_ms"] <= row["ts_ms"]
        )
        if n > 20:
            expected[i] = n
    got = flagged(spec, rows)
    assert set(got) == set(expected) and expected and len(expected) < len(rows) // 2
    for i, n in expected.items():
        assert f"ip {rows[i]['ip']}: {n} clicks in the 2 h to" in got[i]


# -- no_impression_click -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_no_impression_click_needs_the_visitors_impression_of_the_ad_before(seed: int) -> None:
    rows = random_rows(seed, 300, 40 * MINUTE_MS, ads=4)
    rows = [r for r in rows if not (r["ad_id"] == "ad3" and r["event_type"] == "impression")]
    spec = RuleSpec("noimp", "no_impression_click", "no impression", {"window_minutes": 10})
    impressions = defaultdict(int)
    for r in rows:
        if r["event_type"] == "impression":
            impressions[r["ad_id"]] += 1
    expected = set()
    for i, row in enumerate(rows):
        key = visitor(row)
        if row["event_type"] != "click" or key is None or not impressions[row["ad_id"]]:
            continue
        if not any(
            r["event_type"] == "impression"
            and visitor(r) == key
            and r["ad_id"] == row["ad_id"]
            and 0 <= row["ts_ms"] - r["ts_ms"] <= 10 * MINUTE_MS
            for r in rows
        ):
            expected.add(i)
    got = flagged(spec, rows)
    assert set(got) == expected and expected
    assert all(rows[i]["ad_id"] != "ad3" for i in got)  # an ad without impressions: not judged
    assert any(row["ad_id"] == "ad3" and row["event_type"] == "click" for row in rows)


def test_no_impression_click_applies_from_min_ad_impressions() -> None:
    rows = [
        {"event_type": "impression", "user_id": "u1", "ad_id": "a", "ts_ms": T},
        {"event_type": "click", "user_id": "u2", "ad_id": "a", "ts_ms": T + 1},
    ]
    params: dict[str, Any] = {"window_minutes": 10, "min_ad_impressions": 2}
    assert flagged(RuleSpec("n", "no_impression_click", "r", params), rows) == {}
    params["min_ad_impressions"] = 1
    [(row, reason)] = flagged(RuleSpec("n", "no_impression_click", "r", params), rows).items()
    assert row == 1 and reason == "n: r: user u2: no impression of ad a in the 10 min before"


# -- ctr_spike -----------------------------------------------------------------------------------


def ctr_rows(seed: int) -> list[Row]:
    """Hours of ads with a steady CTR, and some hours far above it."""
    rnd = random.Random(seed)
    rows: list[Row] = []
    for hour in range(8):
        for ad in ("a", "b", "c"):
            spike = rnd.random() < 0.3
            impressions, clicks = rnd.randrange(20, 60), rnd.randrange(1, 5)
            if spike:
                clicks *= 10
            for kind, n in (("impression", impressions), ("click", clicks)):
                for _ in range(n):
                    ts = T + hour * HOUR_MS + rnd.randrange(HOUR_MS)
                    rows.append({"event_type": kind, "user_id": "u", "ad_id": ad, "ts_ms": ts})
    return rows


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_ctr_spike_against_the_ads_own_trailing_baseline(seed: int, exclude: bool) -> None:
    rows = ctr_rows(seed)
    params = {"factor": 3.0, "baseline_hours": 3, "min_clicks": 10, "exclude": exclude}
    rule = compile_rule(RuleSpec("ctr", "ctr_spike", "ctr spike", params))
    counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        counts[(r["ad_id"], r["ts_ms"] // HOUR_MS)][r["event_type"] == "impression"] += 1
    spikes = set()
    for (ad, hour), (clicks, impressions) in counts.items():
        base = [counts.get((ad, h), [0, 0]) for h in range(hour - 3, hour)]
        base_clicks, base_impressions = sum(b[0] for b in base), sum(b[1] for b in base)
        if (
            clicks >= 10
            and base_impressions
            and clicks / max(impressions, 1e-9) > 3.0 * (base_clicks + 1) / base_impressions
        ):
            spikes.add((ad, hour))
    expected = {
        i
        for i, r in enumerate(rows)
        if r["event_type"] == "click" and (r["ad_id"], r["ts_ms"] // HOUR_MS) in spikes
    }
    assert spikes, "the case has spikes"
    ruleset = RuleSet((rule,))
    reviews = ruleset.batch_reviews(frame(rows)).to_list()
    invalid = ruleset.batch_reasons(frame(rows)).to_list()
    judged, other = (invalid, reviews) if exclude else (reviews, invalid)
    assert {i for i, r in enumerate(judged) if r is not None} == expected
    assert all(r is None for r in other)
    assert rule.review_only is not exclude and ruleset.has_reviews is not exclude


# -- shared_agent_ad_spread ------------------------------------------------------------------------

AGENT = "Mozilla/5.0 (Linux; Android 10; SM-A105F) AppleWebKit/537.36 Chrome/120.0 Mobile"
FARM = {"min_ips": 20, "min_clicks": 50, "window_hours": 24}


def farm_reference(
    rows: list[Row], window_ms: int, min_ips: int, min_clicks: int
) -> dict[int, str]:
    """Per flagged click: its group's distinct addresses and clicks in the window ending
    at it, as the evidence says them."""
    keys = ("user_agent", "device", "ad_id", "ip")
    judged = [
        (i, r)
        for i, r in enumerate(rows)
        if r["event_type"] == "click" and all(r.get(k) is not None for k in keys)
    ]
    out = {}
    for i, row in judged:
        window = [
            r
            for _, r in judged
            if (r["user_agent"], r["device"], r["ad_id"])
            == (row["user_agent"], row["device"], row["ad_id"])
            and row["ts_ms"] - window_ms <= r["ts_ms"] <= row["ts_ms"]
        ]
        ips = {r["ip"] for r in window}
        if len(ips) >= min_ips and len(window) >= min_clicks:
            out[i] = f"{len(ips)} IPs, {len(window)} clicks on ad {row['ad_id']}"
    return out


@pytest.mark.parametrize("seed", range(6))
def test_shared_agent_ad_spread_counts_addresses_and_clicks_in_the_window_ending_at_each_click(
    seed: int,
) -> None:
    rnd = random.Random(seed)
    rows = [
        {
            "event_type": rnd.choice(["click", "click", "click", "impression"]),
            "ip": rnd.choice([*(f"10.0.0.{i}" for i in range(12)), None]),
            "user_agent": rnd.choice(["Agent A", "Agent B", None]),
            "device": rnd.choice(["mobile", "mobile", "tablet", None]),
            "ad_id": rnd.choice(["ad0", "ad1", None]),
            # Whole seconds, so that some clicks share a time (and a window).
            "ts_ms": T + rnd.randrange(4 * 3600) * 1000,
        }
        for _ in range(1200)
    ]
    params = {"min_ips": 9, "min_clicks": 14, "window_hours": 2}
    spec = RuleSpec("farm", "shared_agent_ad_spread", "farm", params)
    expected = farm_reference(rows, 2 * HOUR_MS, 9, 14)
    got = flagged(spec, rows)
    assert set(got) == set(expected) and expected and len(expected) < len(rows) // 2
    for i, counts in expected.items():
        row = rows[i]
        assert got[i] == (
            f"farm: farm: agent {row['user_agent']} device {row['device']}: {counts} in the "
            f"2 h to {iso(row['ts_ms'])}Z"
        )


def farm_rows(ips: int, clicks_each: int, start: int, step_ms: int, **fields: Any) -> list[Row]:
    """``clicks_each`` rounds of one click from each of ``ips`` addresses, ``step_ms``
    apart; a field given as a function of the address number varies by address."""
    rows = []
    for n in range(clicks_each * ips):
        ip = n % ips
        row: Row = {"event_type": "click", "ts_ms": start + n * step_ms}
        defaults = {"ip": lambda n: f"198.51.100.{n}", "user_agent": AGENT, "device": "mobile"}
        for name, value in {**defaults, "ad_id": "X"}.items():
            given = fields.get(name, value)
            row[name] = given(ip) if callable(given) else given
        rows.append(row)
    return rows


def test_a_device_farm_on_one_ad_is_flagged_and_the_same_volume_spread_otherwise_is_not() -> None:
    spec = RuleSpec("farm", "shared_agent_ad_spread", "device farm", FARM)
    # 60 addresses, 3 clicks each over 18 h: 180 clicks, none per address a per-IP rule sees.
    farm = farm_rows(60, 3, T, 6 * MINUTE_MS)
    got = flagged(spec, farm)
    # The 50th click is the first whose window holds 50 clicks (and 50 addresses): it and
    # every later one are flagged, the 49 before stay billable.
    assert set(got) == set(range(49, 180))
    assert got[49] == (
        f"farm: device farm: agent {AGENT[:40]}... device mobile: 50 IPs, 50 clicks on ad X "
        f"in the 24 h to {iso(farm[49]['ts_ms'])}Z"
    )
    assert "60 IPs, 180 clicks on ad X" in got[179]

    distinct_agents = farm_rows(60, 3, T, 6 * MINUTE_MS, user_agent=lambda ip: f"{AGENT} {ip}")
    distinct_devices = farm_rows(60, 3, T, 6 * MINUTE_MS, device=lambda ip: f"model-{ip}")
    many_ads = farm_rows(60, 3, T, 6 * MINUTE_MS, ad_id=lambda ip: f"ad-{ip}")
    few_addresses = farm_rows(19, 10, T, 6 * MINUTE_MS)  # 190 clicks, 19 addresses
    no_device = farm_rows(60, 3, T, 6 * MINUTE_MS, device=None)
    no_agent = farm_rows(60, 3, T, 6 * MINUTE_MS, user_agent=None)
    for rows in (distinct_agents, distinct_devices, many_ads, few_addresses, no_device, no_agent):
        assert flagged(spec, rows) == {}
    # Slower: one click every 30 min, so each 24 h (both ends in) holds 49 clicks.
    assert flagged(spec, farm_rows(60, 3, T, 30 * MINUTE_MS)) == {}
    # Impressions of the farm neither count nor are flagged.
    shown = [{**row, "event_type": "impression"} for row in farm]
    assert set(flagged(spec, farm + shown)) == set(range(49, 180))


def test_the_farm_window_crosses_hours_and_the_day_with_its_lookback_exactly() -> None:
    rule = compile_rule(RuleSpec("farm", "shared_agent_ad_spread", "device farm", FARM))
    ruleset = RuleSet((rule,))
    assert ruleset.lookback_ms == 24 * HOUR_MS and ruleset.stream_rules == ()
    midnight = T - T % (24 * HOUR_MS) + 24 * HOUR_MS
    # 49 clicks from 49 addresses through yesterday, the first exactly 24 h before the
    # first click after midnight; a click 24 h + 1 ms before it (outside its window).
    first_after = midnight + 10 * MINUTE_MS
    outside = farm_rows(1, 1, first_after - 24 * HOUR_MS - 1, 0, ip="203.0.113.1")
    yesterday = farm_rows(49, 1, first_after - 24 * HOUR_MS, 29 * MINUTE_MS)

    def today_ip(n: int) -> str:
        return f"192.0.2.{n}"

    today = farm_rows(3, 1, first_after, MINUTE_MS, ip=today_ip)
    rows = outside + yesterday + today
    reasons = ruleset.batch_reasons(frame(rows), midnight).to_list()
    assert reasons[:50] == [None] * 50  # context: never flagged
    assert reasons[50] == (
        f"farm: device farm: agent {AGENT[:40]}... device mobile: 50 IPs, 50 clicks on ad X "
        f"in the 24 h to {iso(first_after)}Z"
    )
    assert all(r is not None for r in reasons[50:])
    # Judging every event at once agrees after midnight; before it, yesterday's last click
    # (50 addresses with the one 24 h + 1 ms before today's first) is flagged too, as the
    # reference says: the hour's verdicts are the reference's, restricted to the hour.
    whole = ruleset.batch_reasons(frame(rows)).to_list()
    assert whole[50:] == reasons[50:]
    expected = farm_reference(rows, 24 * HOUR_MS, 20, 50)
    assert set(expected) == {49, 50, 51, 52}
    assert {i for i, r in enumerate(whole) if r} == set(expected)
    # One millisecond later, the first of yesterday's clicks is out of the window too.
    later = outside + yesterday + farm_rows(3, 1, first_after + 1, MINUTE_MS, ip=today_ip)
    reasons = ruleset.batch_reasons(frame(later), midnight).to_list()
    assert reasons[50] is None and reasons[51] is not None  # the 51st's window: 50 again


# -- context and contract --------------------------------------------------------------------------


def test_only_judged_rows_are_flagged_and_each_rule_sees_its_own_lookback() -> None:
    rep = compile_rule(RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 30}))
    spread = compile_rule(
        RuleSpec("spread", "ip_ad_spread", "spread", {"max_ads": 1, "window_minutes": 1})
    )
    hour = T + HOUR_MS
    rows = [
        {
            "event_type": "click",
            "user_id": "u",
            "ip": "10.0.0.1",
            "ad_id": "a",
            "ts_ms": hour - 5_000,
        },
        {
            "event_type": "click",
            "user_id": "u",
            "ip": "10.0.0.1",
            "ad_id": "a",
            "ts_ms": hour - 1_000,
        },
        {
            "event_type": "click",
            "user_id": "u",
            "ip": "10.0.0.1",
            "ad_id": "a",
            "ts_ms": hour + 5_000,
        },
        # 2 min before the hour: beyond the spread rule's 1-minute lookback.
        {
            "event_type": "click",
            "user_id": "v",
            "ip": "10.0.0.2",
            "ad_id": "a",
            "ts_ms": hour - 120_000,
        },
        {
            "event_type": "click",
            "user_id": "v",
            "ip": "10.0.0.2",
            "ad_id": "b",
            "ts_ms": hour + 1_000,
        },
    ]
    ruleset = RuleSet((rep, spread))
    assert ruleset.lookback_ms == HOUR_MS and ruleset.stream_rules == ()
    reasons = ruleset.batch_reasons(frame(rows), hour).to_list()
    assert reasons[:2] == [None, None]  # context: never flagged
    assert reasons[2] is not None and reasons[2].startswith("rep: ")
    assert reasons[3:] == [None, None]
    # Without an hour every row is judged: the second click of u repeats the first.
    assert RuleSet((rep,)).batch_reasons(frame(rows)).to_list()[1] is not None


def test_the_stream_form_names_event_types_for_a_frame_matcher() -> None:
    rule = compile_rule(RuleSpec("rep", "repeat_click", "repeat", {"window_seconds": 30}))
    rows = frame(
        [{"event_type": "click", "user_id": "u", "ad_id": "a", "ts_ms": T + i} for i in range(3)]
    )
    coded = rows.with_columns(pl.lit(ids.CLICK, dtype=pl.UInt8).alias("event_type"))
    assert rule.evaluate(coded).to_list() == rule.batch(rows).to_list()
    assert rule.batch(rows).null_count() == 1


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("repeat_click", {"window_seconds": 0}),
        ("ip_ad_spread", {"max_ads": 3}),
        ("ip_click_volume", {"max_clicks": 3, "window_hours": 0}),
        ("no_impression_click", {"window_minutes": 5, "colour": "red"}),
        ("ctr_spike", {"factor": -1, "baseline_hours": 24, "min_clicks": 5}),
        ("shared_agent_ad_spread", {"min_ips": 5, "min_clicks": 0}),
        ("shared_agent_ad_spread", {"min_ips": 5}),
    ],
)
def test_bad_params_name_the_rule(kind: str, params: dict[str, Any]) -> None:
    with pytest.raises(RuleError, match="'mine'"):
        compile_rule(RuleSpec("mine", kind, "r", params))
