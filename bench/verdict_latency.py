"""Verdict latency: time from the 202 of the click that takes an IP over the velocity limit
until the corrected counts are visible, with the keyed stage on, under background load.

Per trial, against one fresh ``clickagg serve`` (``keyed_stage = true``):
  - 60 clicks (the built-in ``ip-click-velocity`` limit) from a new IP to a new ad, in one
    batch, stamped in the current UTC minute;
  - the 61st by ``POST /events/click``; its 202 starts the clock;
  - ``GET /aggregates?ad_id=<ad>&granularity=minute`` every --poll ms until the minute
    shows 0 clicks and 61 invalid clicks: verdict latency = arrival of that answer - 202.
Baseline (same run, same server): stage-1 freshness, the time from the 202 of one normal
click to a new ad until ``/aggregates`` counts it. Background: NDJSON batches of normal
clicks from many IPs at --rate events/s (one connection).

    .venv/bin/python bench/verdict_latency.py [--trials 30] [--rate 5000] [--poll 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from typing import Any

import common

LIMIT = 60
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"


def click(event_id: str, ad: str, ip: str, ts_s: float) -> dict[str, Any]:
    return {
        "click_id": event_id,
        "ad_id": ad,
        "user_id": f"u-{event_id}",
        "timestamp": round(ts_s, 3),
        "ip": ip,
        "user_agent": BROWSER,
        "cost_micros": 1000,
    }


def background(port: int, rate: float, stop: threading.Event, sent: list[int]) -> None:
    client = common.Client(port)
    rng = random.Random(1)
    per_body = max(1, int(rate / 20))
    start = time.perf_counter()
    n = 0
    while not stop.is_set():
        wait = start + n * per_body / rate - time.perf_counter()
        if wait > 0 and stop.wait(wait):
            break
        now = time.time()
        body = b"\n".join(
            json.dumps(
                {"event_type": "click"}
                | click(
                    f"bg-{n}-{i}", f"bg-ad-{rng.randrange(500)}", f"10.{n % 200}.{i % 250}.1", now
                )
            ).encode()
            for i in range(per_body)
        )
        status, _, _ = client.request("POST", "/events/batch", body, "application/x-ndjson")
        assert status == 202, status
        sent[0] += per_body
        n += 1
    client.close()


def visible(
    client: common.Client, ad: str, minute_s: int, want: tuple[int, int], poll_s: float
) -> float:
    """Poll the ad's minute until (clicks, invalid_clicks) == want; the time it arrived."""
    path = f"/aggregates?ad_id={ad}&start={minute_s}&end={minute_s + 60}&granularity=minute"
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        status, data, _ = client.request("GET", path)
        assert status == 200, data
        rows = json.loads(data)
        got = (sum(r["clicks"] for r in rows), sum(r["invalid_clicks"] for r in rows))
        if got == want:
            return time.perf_counter()
        time.sleep(poll_s)
    raise RuntimeError(f"{ad}: never saw {want}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rate", type=float, default=5000.0, help="background events/s")
    parser.add_argument("--poll", type=float, default=5.0, help="ms between polls")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    common.install_sigterm_handler()
    info = common.machine()
    common.print_machine(info)
    env = {**os.environ, "CLICKAGG_KEYED_STAGE": "true", "CLICKAGG_CLOSE_INTERVAL": "0"}
    server = common.ClickaggServer(partitions=args.partitions, env=env)
    verdict_ms: list[float] = []
    fresh_ms: list[float] = []
    sent = [0]
    with common.running(server):
        stop = threading.Event()
        load = threading.Thread(target=background, args=(server.port, args.rate, stop, sent))
        load.start()
        client, poller = common.Client(server.port), common.Client(server.port)
        try:
            for trial in range(args.trials):
                now = time.time()
                if now % 60 > 50:  # the whole trial within one UTC minute
                    time.sleep(61 - now % 60)
                    now = time.time()
                minute_s = int(now - now % 60)
                ad, ip = f"burst-ad-{trial}", f"198.51.{trial // 250}.{trial % 250 + 1}"
                body = b"\n".join(
                    json.dumps(
                        {"event_type": "click"} | click(f"b{trial}-{i}", ad, ip, now)
                    ).encode()
                    for i in range(LIMIT)
                )
                status, _, _ = client.request("POST", "/events/batch", body, "application/x-ndjson")
                assert status == 202
                visible(poller, ad, minute_s, (LIMIT, 0), args.poll / 1000)
                crossing = json.dumps(click(f"b{trial}-{LIMIT}", ad, ip, now)).encode()
                status, _, _ = client.request("POST", "/events/click", crossing, "application/json")
                acked = time.perf_counter()
                assert status == 202
                verdict_ms.append(
                    (visible(poller, ad, minute_s, (0, LIMIT + 1), args.poll / 1000) - acked) * 1000
                )
                normal = json.dumps(
                    click(f"n{trial}", f"fresh-ad-{trial}", f"192.0.2.{trial % 250}", now)
                )
                status, _, _ = client.request(
                    "POST", "/events/click", normal.encode(), "application/json"
                )
                acked = time.perf_counter()
                assert status == 202
                fresh_ms.append(
                    (
                        visible(poller, f"fresh-ad-{trial}", minute_s, (1, 0), args.poll / 1000)
                        - acked
                    )
                    * 1000
                )
        finally:
            stop.set()
            load.join()
            client.close()
            poller.close()
    rows = [
        [
            "verdict (crossing click 202 -> corrected counts)",
            *(common.fmt(common.percentile(verdict_ms, q), " ms") for q in (50, 99)),
            common.fmt(max(verdict_ms), " ms"),
        ],
        [
            "baseline: freshness (click 202 -> counted)",
            *(common.fmt(common.percentile(fresh_ms, q), " ms") for q in (50, 99)),
            common.fmt(max(fresh_ms), " ms"),
        ],
    ]
    common.print_table(["measure", "p50", "p99", "max"], rows)
    common.emit_json(
        {
            "bench": "verdict_latency",
            "trials": args.trials,
            "background_events": sent[0],
            "verdict_ms": {q: common.percentile(verdict_ms, q) for q in (50, 99)},
            "freshness_ms": {q: common.percentile(fresh_ms, q) for q in (50, 99)},
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
