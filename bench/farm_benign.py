"""How much benign traffic the shared-agent rule (``shared_agent_ad_spread``) flags: the
share of the clicks of the production traffic shape (``traffic_shapes.production``, event
times spread over ``--hours``) and of ``clickagg demo``'s traffic (``clickagg.traffic``, its
default 30 s at 2,000 events/s) that it flags with the given thresholds. Neither holds a
device farm, so every flag is a false positive. The first copy of each event counts; the
device is the class the server derives from the agent.

    .venv/bin/python bench/farm_benign.py [--events 2000000] [--hours 24]
        [--min-ips 50] [--min-clicks 300] [--window-hours 24]
"""

from __future__ import annotations

import argparse
import time

import polars as pl

import traffic_shapes
from clickagg.core.rules import RuleSet, RuleSpec, compile_rules
from clickagg.core.useragent import device_and_browser
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from clickagg.traffic import TrafficGenerator


def judged(events: pl.DataFrame) -> pl.DataFrame:
    """First copies, with the device class the server would derive from the agent."""
    agents = events["user_agent"].unique().drop_nulls().to_list()
    devices = {agent: device_and_browser(agent)[0] for agent in agents}
    return (
        events.unique(subset=["event_type", "event_id"], keep="first", maintain_order=True)
        .with_columns(pl.col("user_agent").replace_strict(devices, default=None).alias("device"))
        .select("event_type", "event_id", "ad_id", "ip", "user_agent", "device", "ts_ms")
        .sort("ts_ms")
    )


def flagged_share(rules: RuleSet, events: pl.DataFrame) -> tuple[int, int, float]:
    clicks = int((events["event_type"] == "click").sum())
    reasons = rules.batch_reasons(events)
    flagged = int(reasons.is_not_null().sum())
    return flagged, clicks, 100.0 * flagged / max(clicks, 1)


def demo_events(seconds: int, rate: int) -> pl.DataFrame:
    generator = TrafficGenerator()
    start = 1_700_000_000_000
    rows = []
    for tick in range(seconds * 5):
        now = start + tick * 200
        rows.extend(generator.event(now) for _ in range(rate // 5))
    frame = pl.DataFrame(rows, infer_schema_length=None)
    return frame.rename({"timestamp": "ts_ms"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--min-ips", type=int, default=50)
    parser.add_argument("--min-clicks", type=int, default=300)
    parser.add_argument("--window-hours", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    params = {
        "min_ips": args.min_ips,
        "min_clicks": args.min_clicks,
        "window_hours": args.window_hours,
    }
    rules = RuleSet(compile_rules([RuleSpec("farm", "shared_agent_ad_spread", "farm", params)]))
    print(f"shared_agent_ad_spread {params}")

    shape = traffic_shapes.Shape(span_ms=args.hours * HOUR_MS)
    now_ms = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
    built = traffic_shapes.production(
        args.events, 10_000, seed=args.seed, shape=shape, now_ms=now_ms
    )
    assert built.columns is not None
    events = judged(built.columns)
    started = time.perf_counter()
    flagged, clicks, share = flagged_share(rules, events)
    took = time.perf_counter() - started
    rate = args.events / (args.hours * 3600)
    print(
        f"production shape, {args.events:,} events over {args.hours} h ({rate:,.1f} events/s): "
        f"{flagged:,} of {clicks:,} clicks flagged ({share:.3f} %), judged in {took:.2f} s"
    )
    demo = judged(demo_events(30, 2_000))
    flagged, clicks, share = flagged_share(rules, demo)
    span = (demo["ts_ms"].max() - demo["ts_ms"].min()) / MINUTE_MS
    print(
        f"clickagg demo traffic, 30 s at 2,000 events/s (event times over {span:.1f} min): "
        f"{flagged:,} of {clicks:,} clicks flagged ({share:.3f} %)"
    )


if __name__ == "__main__":
    main()
