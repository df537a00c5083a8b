"""Cost of the invalid-traffic rules in the stream: one 100,000-event micro-batch through
the partition processor with the rules and without, in the same run.

Production-shaped events: 10,000 ads (Zipf), 1,000,000 users, a user-agent mix of a few
hundred distinct agents (browser versions, Zipf; about 2 % of clicks from crawlers and
non-browser clients), addresses drawn by Zipf from 1,000,000 distinct ones (95 % IPv4,
5 % IPv6). Rules: the built-in ones (non-browser clients, the crawler-user-agents list)
plus an IP blocklist of 10,000 IPv4 and 2,000 IPv6 CIDRs, about the size of the AWS range
file. Two mixes: one click per 20 impressions (production; only clicks are judged) and
clicks only (the worst case). Prints the best and the median of ``--repeat`` interleaved
runs of the processor with and without the rules, and the best of 15 runs of the rules'
step alone (the difference of two noisy processor times is less stable than that).

    .venv/bin/python bench/rules_cost.py [--events 100000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import polars as pl
import pyarrow as pa

from clickagg.core import columns, ids
from clickagg.core.processor import PartitionProcessor, PartitionState, Rule
from clickagg.core.rules import RuleSet, RuleSpec, compile_rules, first_reasons
from clickagg.core.rules.loading import load_rules

MINUTE_MS = 60_000
BROWSERS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_{v} like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.{v} Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel {v}) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.{v}.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/12{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_{v}) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.{v} Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:1{v}.0) Gecko/20100101 Firefox/1{v}.0",
    "Mozilla/5.0 (Linux; Android 14; SM-S91{v}B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/25.0 Chrome/121.0.0.0 Mobile Safari/537.36",
)
NON_HUMAN = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "Go-http-client/2.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/124.0.0.0 Safari/537.36",
)


def zipf_ranks(rng: np.random.Generator, n: int, size: int, s: float = 1.1) -> np.ndarray:
    """``size`` draws of ranks 0..n-1 with P(rank k) ~ 1/(k+1)^s."""
    weights = 1.0 / np.arange(1, n + 1) ** s
    cdf = np.cumsum(weights / weights.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)


def address_pool(rng: np.random.Generator, n: int) -> list[str]:
    v4 = rng.integers(1 << 24, 224 << 24, n, dtype=np.int64)
    text = [f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}" for a in v4.tolist()]
    for i in rng.choice(n, n // 20, replace=False).tolist():
        groups = rng.integers(0, 1 << 16, 4).tolist()
        text[i] = "2a0{}:{:x}:{:x}::{:x}:{:x}".format(i % 10, *groups)
    return text


def events_frame(rng: np.random.Generator, count: int, click_share: float) -> pl.DataFrame:
    agents = [b.format(v=v) for b in BROWSERS for v in range(50)]  # 300 browser agents
    order = rng.permutation(len(agents))
    agent = np.array(agents, dtype=object)[order][zipf_ranks(rng, len(agents), count)]
    clicks = rng.random(count) < click_share
    robot = clicks & (rng.random(count) < 0.02)
    agent[robot] = np.array(NON_HUMAN, dtype=object)[rng.integers(0, len(NON_HUMAN), robot.sum())]
    pool = np.array(address_pool(rng, 1_000_000), dtype=object)
    ip = pool[rng.permutation(len(pool))[zipf_ranks(rng, len(pool), count, s=0.9)]]
    users = rng.integers(0, 1_000_000, count)
    event_ids = [f"ev-{i}" for i in range(count)]
    fingerprints = [
        ids.fingerprint(ids.CLICK if c else ids.IMPRESSION, e)
        for c, e in zip(clicks.tolist(), event_ids, strict=True)
    ]
    ts = 1_700_000_000_000 + np.sort(rng.integers(0, MINUTE_MS, count))
    table = pa.table(
        {
            "fp_high": pa.array([f[0] for f in fingerprints], pa.uint64()),
            "fp_low": pa.array([f[1] for f in fingerprints], pa.uint64()),
            "event_type": pa.array(np.where(clicks, ids.CLICK, ids.IMPRESSION), pa.uint8()),
            "ts_ms": pa.array(ts, pa.int64()),
            "received_ms": pa.array(ts, pa.int64()),
            "cost_micros": pa.array(np.full(count, -1), pa.int64()),
            "user_hash": pa.array(users.astype(np.uint64) + 1, pa.uint64()),
            "event_id": pa.array(event_ids, pa.string()),
            "ad_id": pa.array([f"ad-{a}" for a in zipf_ranks(rng, 10_000, count)], pa.string()),
            "advertiser_id": pa.nulls(count, pa.string()),
            "campaign_id": pa.nulls(count, pa.string()),
            "user_id": pa.array([f"u-{u}" for u in users.tolist()], pa.string()),
            "ip": pa.array(ip.tolist(), pa.string()),
            "user_agent": pa.array(agent.tolist(), pa.string()),
            "country": pa.array(["US"] * count, pa.string()),
            "device": pa.array(["mobile"] * count, pa.string()),
            "browser": pa.array(["Chrome"] * count, pa.string()),
        },
        schema=columns.SCHEMA,
    )
    return columns.to_frame(table, partition=0, base_offset=0)


def blocklist(rng: np.random.Generator) -> RuleSpec:
    starts = rng.integers(1 << 24, 224 << 24, 10_000, dtype=np.int64).tolist()
    prefixes = rng.integers(16, 25, 10_000).tolist()
    v4 = [
        f"{s >> 24}.{(s >> 16) & 255}.{(s >> 8) & 255}.{s & 255}/{p}"
        for s, p in zip(starts, prefixes, strict=True)
    ]
    v6 = [f"2a0{i % 10}:{i:x}::/{32 + i % 17}" for i in range(2_000)]
    lists = [{"name": "datacenter", "cidrs": v4}, {"name": "datacenter-v6", "cidrs": v6}]
    return RuleSpec("datacenter-ip", "ip_blocklist", "data-centre address", {"lists": lists})


def run(events: pl.DataFrame, rules: tuple[Rule, ...]) -> tuple[float, int]:
    processor = PartitionProcessor(
        PartitionState.empty(0),
        allowed_lateness_ms=5 * MINUTE_MS,
        dedup_horizon_ms=30 * MINUTE_MS,
        rules=rules,
    )
    start = time.perf_counter()
    outcome = processor.process(events)
    took = time.perf_counter() - start
    assert outcome is not None
    return took, outcome.invalid


def timed(call: Callable[[], object], repeat: int = 15) -> float:
    """The best of ``repeat`` runs: on a shared 2-core machine the median carries the
    other load too."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    builtin = load_rules()
    rules = RuleSet(rules=(*builtin.rules, *compile_rules([blocklist(rng)])))
    for label, share in (("1 click per 20 impressions", 1 / 21), ("clicks only", 1.0)):
        events = events_frame(rng, args.events, share)
        clicks = events.filter(pl.col("event_type") == ids.CLICK)
        print(
            f"{label}: {events.height:,} events, {clicks.height:,} clicks, "
            f"{clicks['user_agent'].n_unique():,} distinct agents and "
            f"{clicks['ip'].n_unique():,} distinct addresses among the clicks"
        )
        run(events, rules.rules)  # warm up: the combined regexes are compiled once
        bare, ruled, flagged = [], [], 0
        for _ in range(args.repeat):
            bare.append(run(events, ())[0])
            took, flagged = run(events, rules.rules)
            ruled.append(took)
        # The rules' step alone, as the processor runs it: over the batch's fresh events.
        forms = [(r.name, r.evaluate) for r in rules.rules]
        step = timed(lambda e=events, f=forms: first_reasons(e, f))
        each = {r.name: timed(lambda r=r, e=events: r.evaluate(e)) for r in rules.rules}
        print(
            f"  processor without rules: best {min(bare) * 1e3:.0f} ms "
            f"(median {statistics.median(bare) * 1e3:.0f}); with rules: best "
            f"{min(ruled) * 1e3:.0f} ms (median {statistics.median(ruled) * 1e3:.0f}): "
            f"x{min(ruled) / min(bare):.2f} best to best; {flagged:,} clicks flagged"
        )
        print(
            f"  the rules' step alone: {step * 1e3:.1f} ms per batch = "
            f"{step / min(bare) * 100:.1f} % of the processor without rules ("
            + ", ".join(f"{name} {cost * 1e3:.1f} ms" for name, cost in each.items())
            + ")"
        )


if __name__ == "__main__":
    main()
