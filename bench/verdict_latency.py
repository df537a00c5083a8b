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

``--family visitor`` and ``--family ad`` measure the two families that decide later by
design, on a server with a short allowed lateness (``--lateness``, 30 s by default for
them) so that a run takes minutes: their horizon is the lateness + 2 min
(``keyed_horizon_ms``), 2.5 min here instead of 7 min by default.

visitor (``repeat_click``): the background load, stamped "now", moves event time forward.
Per trial, started every --interval s and overlapping, a new user clicks a new ad twice
5 s apart (the second is a repeat within the built-in 30 s window); the clock runs from the
second click's 202 until that ad's minutes show 1 click and 1 invalid click. A click is
decided once the newest event time is past it by the horizon, so the latency is the
horizon plus the stage's own delay; both are reported.

ad (``no_impression_click`` and an excluding ``ctr_spike``, the rules file of the e2e test):
no background load (it would make past hours late). Per trial, one past hour: a new ad
seen and clicked by 10 users and clicked by 4 users who never saw it, plus filler ads,
posted in event time order a minute of event time per POST, each caught up before the
next (records more than the horizon behind the newest are left to the batch); then one
POST stamped the hour's end + the horizon + 30 s closes the hour, and the clock runs from
its 202 until the 4 blind clicks show as invalid in the ad's hour: the stage's own delay
once an hour closes, beyond the hour + horizon it waits by design.

    .venv/bin/python bench/verdict_latency.py --family visitor [--trials 30] [--interval 5]
    .venv/bin/python bench/verdict_latency.py --family ad [--trials 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
from clickagg.config import MINUTE_MS, Settings, parse_duration_ms
from clickagg.keyed.stage2 import keyed_horizon_ms

LIMIT = 60
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"


def click(event_id: str, ad: str, ip: str, ts_s: float, user: str | None = None) -> dict[str, Any]:
    return {
        "click_id": event_id,
        "ad_id": ad,
        "user_id": user or f"u-{event_id}",
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


def run_ip(args: argparse.Namespace, info: dict[str, Any], lateness_ms: int | None) -> None:
    """The IP family (velocity): verdicts as soon as a limit is passed."""
    env = {**os.environ, "CLICKAGG_KEYED_STAGE": "true", "CLICKAGG_CLOSE_INTERVAL": "0"}
    if lateness_ms is not None:
        env = late_family_env(lateness_ms)
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


# -- the families that decide later: visitor and ad ----------------------------------------

AD_RULES = """
include_builtin = true

[[rules]]
id = "no-impression-click"
kind = "no_impression_click"
reason = "click without an impression"
[rules.params]
window_minutes = 30
min_ad_impressions = 5

[[rules]]
id = "ctr-spike"
kind = "ctr_spike"
reason = "CTR far above the ad's baseline"
[rules.params]
factor = 3.0
baseline_hours = 1
min_clicks = 10
exclude = true
"""
"""The ad family's rules as tests/e2e/test_keyed_stage.py turns them on (shipped off)."""

REPEAT_GAP_S = 5.0  # the visitor trial's second click: a repeat within the 30 s window
SEEN_USERS, BLIND_USERS = 10, 4  # the ad trial's clicks: with and without an impression
FILLER_ADS = 20


def lag(client: common.Client) -> float:
    """Events not committed or archived yet, plus keyed records stage 2 has not consumed."""
    status, body, _ = client.request("GET", "/metrics")
    assert status == 200, body[:200]
    text = body.decode()
    return sum(
        common.metric_sum(text, name)
        for name in (
            "clickagg_partition_lag_events",
            "clickagg_partition_archive_lag_events",
            "clickagg_keyed_partition_lag_records",
        )
    )


def wait_quiet(client: common.Client, timeout_s: float = 60.0) -> None:
    """Until nothing is in flight: no lag, three times 0.1 s apart. Stage 1 hands a
    round's records to the keyed logs after its commit, so one zero can come too early."""
    deadline = time.monotonic() + timeout_s
    zeros = 0
    while zeros < 3:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not catch up")
        zeros = zeros + 1 if lag(client) == 0 else 0
        time.sleep(0.1)


def counts(
    client: common.Client, ad: str, start_s: int, end_s: int, granularity: str
) -> tuple[int, int]:
    """(clicks, invalid_clicks) of the ad's rows in [start_s, end_s)."""
    path = f"/aggregates?ad_id={ad}&start={start_s}&end={end_s}&granularity={granularity}"
    status, data, _ = client.request("GET", path)
    assert status == 200, data
    rows = json.loads(data)
    return sum(r["clicks"] for r in rows), sum(r["invalid_clicks"] for r in rows)


def reasons(
    client: common.Client, ad: str, start_s: int, end_s: int, granularity: str
) -> Counter[str]:
    """Invalid clicks by reason: checks that the right rule made the verdict."""
    path = (
        f"/aggregates?ad_id={ad}&start={start_s}&end={end_s}"
        f"&granularity={granularity}&group_by=invalid_reason"
    )
    status, data, _ = client.request("GET", path)
    assert status == 200, data
    got: Counter[str] = Counter()
    for row in json.loads(data):
        if row["invalid_clicks"]:
            got[row["invalid_reason"]] += row["invalid_clicks"]
    return got


def worker_rss_mib(server: common.ClickaggServer) -> float | None:
    pid = server.worker_pid()
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def late_family_env(lateness_ms: int, rules_file: Path | None = None) -> dict[str, str]:
    """The keyed stage on, a short allowed lateness (so a short horizon), no hour closer
    (it would finalize the ad trial's past hours under the bench)."""
    env = {
        **os.environ,
        "CLICKAGG_KEYED_STAGE": "true",
        "CLICKAGG_CLOSE_INTERVAL": "0",
        "CLICKAGG_ALLOWED_LATENESS": f"{lateness_ms}ms",
    }
    # The dedup horizon must cover the lateness + 1 min (Settings' validation).
    dedup_ms = max(Settings().dedup_horizon_ms, lateness_ms + MINUTE_MS)
    env["CLICKAGG_DEDUP_HORIZON"] = f"{dedup_ms}ms"
    if rules_file is not None:
        env["CLICKAGG_RULES_FILE"] = str(rules_file)
    return env


@dataclass
class RepeatTrial:
    """A user clicking an ad twice, REPEAT_GAP_S apart; the second click is the repeat."""

    n: int
    first_at: float = 0.0  # perf_counter of the first click's 202
    first_s: float = 0.0  # its event time
    acked: float = 0.0  # perf_counter of the second click's 202 (0: not sent yet)
    last_poll: float = 0.0
    verdict_at: float = 0.0

    @property
    def ad(self) -> str:
        return f"repeat-ad-{self.n}"

    def post(self, client: common.Client, second: bool) -> None:
        now = time.time()
        event = click(
            f"r{self.n}-{int(second)}",
            self.ad,
            f"198.18.{self.n // 250}.{self.n % 250 + 1}",
            now,
            user=f"repeat-user-{self.n}",
        )
        status, body, _ = client.request(
            "POST", "/events/click", json.dumps(event).encode(), "application/json"
        )
        assert status == 202, body
        if second:
            self.acked = time.perf_counter()
        else:
            self.first_at, self.first_s = time.perf_counter(), now

    def span(self) -> tuple[int, int]:
        """The minutes both clicks fall in."""
        start = int(self.first_s - self.first_s % 60)
        return start, start + 120


def run_visitor(
    args: argparse.Namespace, info: dict[str, Any], lateness_ms: int, horizon_ms: int
) -> None:
    """The visitor family (``repeat_click``): a click is decided once the newest event time
    is past it by the horizon."""
    horizon_s = horizon_ms / 1000
    server = common.ClickaggServer(partitions=args.partitions, env=late_family_env(lateness_ms))
    trials = [RepeatTrial(n) for n in range(args.trials)]
    sent = [0]
    rss = None
    with common.running(server):
        stop = threading.Event()
        load = threading.Thread(target=background, args=(server.port, args.rate, stop, sent))
        load.start()
        client, poller = common.Client(server.port), common.Client(server.port)
        try:
            start = time.perf_counter() + 1.0
            deadline = start + args.trials * args.interval + horizon_s + 120
            started = 0
            while any(t.verdict_at == 0 for t in trials):
                now = time.perf_counter()
                if now > deadline:
                    raise RuntimeError(
                        "verdicts missing: "
                        + ", ".join(t.ad for t in trials if t.verdict_at == 0 and t.acked)
                    )
                if started < len(trials) and now >= start + started * args.interval:
                    trials[started].post(client, second=False)
                    started += 1
                for trial in trials[:started]:
                    now = time.perf_counter()
                    if not trial.acked:
                        if now >= trial.first_at + REPEAT_GAP_S:
                            trial.post(client, second=True)
                        continue
                    if trial.verdict_at:
                        continue
                    # Poll often near the horizon, once a second before it (an early
                    # verdict would still be seen, within a second).
                    if now - trial.acked < horizon_s - 10 and now - trial.last_poll < 1:
                        continue
                    trial.last_poll = now
                    got = counts(poller, trial.ad, *trial.span(), "minute")
                    if got == (1, 1):
                        trial.verdict_at = time.perf_counter()
                time.sleep(args.poll / 1000)
            for trial in trials:
                got_reasons = reasons(poller, trial.ad, *trial.span(), "minute")
                assert got_reasons == Counter({"repeat-click": 1}), (trial.ad, got_reasons)
            rss = worker_rss_mib(server)
        finally:
            stop.set()
            load.join()
            client.close()
            poller.close()
    latency_s = [t.verdict_at - t.acked for t in trials]
    beyond_ms = [(v - horizon_s) * 1000 for v in latency_s]
    print(
        f"allowed lateness {lateness_ms / 1000:g} s -> keyed horizon {horizon_s:g} s; "
        f"{args.trials} trials {args.interval:g} s apart, background {args.rate:g} clicks/s"
    )
    common.print_table(
        ["measure", "p50", "p99", "max"],
        [
            [
                "verdict (repeat click 202 -> counted invalid)",
                *(common.fmt(common.percentile(latency_s, q), " s") for q in (50, 99)),
                common.fmt(max(latency_s), " s"),
            ],
            [
                "  beyond the horizon (the stage's own delay)",
                *(common.fmt(common.percentile(beyond_ms, q), " ms") for q in (50, 99)),
                common.fmt(max(beyond_ms), " ms"),
            ],
        ],
    )
    if rss is not None:
        print(f"worker RSS at the end: {rss:,.0f} MiB")
    common.emit_json(
        {
            "bench": "verdict_latency",
            "family": "visitor",
            "trials": args.trials,
            "allowed_lateness_ms": lateness_ms,
            "horizon_ms": horizon_ms,
            "background_events": sent[0],
            "verdict_s": {q: common.percentile(latency_s, q) for q in (50, 99)},
            "beyond_horizon_ms": {q: common.percentile(beyond_ms, q) for q in (50, 99)},
            "beyond_horizon_ms_by_trial": beyond_ms,
            "worker_rss_mib": rss,
            "machine": info,
        }
    )


def ad_hour_events(n: int, hour_s: int) -> list[dict[str, Any]]:
    """Hour ``hour_s``'s events of trial ``n``: ad ``noimp-ad-<n>`` seen then clicked by
    SEEN_USERS users and clicked by BLIND_USERS users who never saw it (the clicks
    ``no_impression_click`` flags), and filler ads seen then clicked (flagged by nothing),
    over minutes 5 to 15 of the hour; sorted by event time."""
    events: list[dict[str, Any]] = []

    def add(kind: str, ad: str, at_s: float, user: str) -> None:
        events.append(
            {
                "event_type": kind,
                "event_id": f"{kind[0]}{n}-{len(events)}",
                "ad_id": ad,
                "user_id": user,
                "timestamp": round(at_s, 3),
                "ip": f"10.{n % 200}.{len(events) // 250}.{len(events) % 250 + 1}",
                "user_agent": BROWSER,
                "cost_micros": 1_000,
            }
        )

    ad = f"noimp-ad-{n}"
    for u in range(SEEN_USERS):
        at = hour_s + 300 + 60 * u
        add("impression", ad, at, f"seen-{n}-{u}")
        add("click", ad, at + 20, f"seen-{n}-{u}")
    for u in range(BLIND_USERS):
        add("click", ad, hour_s + 300 + 120 * u + 40, f"blind-{n}-{u}")
    for m in range(10):
        for f in range(FILLER_ADS):
            at = hour_s + 300 + 60 * m + f
            add("impression", f"filler-ad-{f}", at, f"filler-{n}-{m}-{f}")
            add("click", f"filler-ad-{f}", at + 10, f"filler-{n}-{m}-{f}")
    return sorted(events, key=lambda e: e["timestamp"])


def closing_events(n: int, at_s: float) -> list[dict[str, Any]]:
    """Events stamped ``at_s`` that close the previous hour: an impression of the trial's
    ad (its keyed partition's newest event time must pass) and of every filler ad."""
    ads = [f"noimp-ad-{n}", *(f"filler-ad-{f}" for f in range(FILLER_ADS))]
    return [
        {
            "event_type": "impression",
            "event_id": f"close{n}-{i}",
            "ad_id": ad,
            "user_id": f"closer-{n}-{i}",
            "timestamp": at_s,
            "ip": f"10.250.{n % 250}.{i + 1}",
            "user_agent": BROWSER,
        }
        for i, ad in enumerate(ads)
    ]


def post_batch(client: common.Client, events: list[dict[str, Any]]) -> None:
    body = b"\n".join(json.dumps(e).encode() for e in events)
    status, data, _ = client.request("POST", "/events/batch", body, "application/x-ndjson")
    assert status == 202, data
    assert json.loads(data)["rejected"] == [], data


def run_ad(
    args: argparse.Namespace, info: dict[str, Any], lateness_ms: int, horizon_ms: int
) -> None:
    """The ad family (``no_impression_click``): an hour's clicks are decided once the newest
    event time is past the hour's end by the horizon."""
    now_s = int(time.time())
    # Consecutive past hours, the last one ending 2 h before the current one starts: each
    # closing POST is stamped in the next trial's hour, before that trial's events.
    first_hour_s = now_s - now_s % 3600 - (args.trials + 2) * 3600
    close_after_s = horizon_ms / 1000 + 30
    latency_ms: list[float] = []
    rss = None
    with tempfile.TemporaryDirectory(prefix="clickagg-bench-rules-") as tmp:
        rules_file = Path(tmp) / "rules.toml"
        rules_file.write_text(AD_RULES)
        server = common.ClickaggServer(
            partitions=args.partitions, env=late_family_env(lateness_ms, rules_file)
        )
        with common.running(server):
            client, poller = common.Client(server.port), common.Client(server.port)
            try:
                for n in range(args.trials):
                    hour_s = first_hour_s + n * 3600
                    ad = f"noimp-ad-{n}"
                    events = ad_hour_events(n, hour_s)
                    minute = 0
                    while minute * 60 < 3600:  # a minute of event time per POST
                        lo, hi = hour_s + minute * 60, hour_s + (minute + 1) * 60
                        bucket = [e for e in events if lo <= e["timestamp"] < hi]
                        minute += 1
                        if bucket:
                            post_batch(client, bucket)
                            wait_quiet(poller)
                    got = counts(poller, ad, hour_s, hour_s + 3600, "hour")
                    assert got == (SEEN_USERS + BLIND_USERS, 0), (ad, got)
                    post_batch(client, closing_events(n, hour_s + 3600 + close_after_s))
                    acked = time.perf_counter()
                    want = (SEEN_USERS, BLIND_USERS)
                    deadline = acked + 60
                    while (got := counts(poller, ad, hour_s, hour_s + 3600, "hour")) != want:
                        if time.perf_counter() > deadline:
                            raise RuntimeError(f"{ad}: never saw {want}, last {got}")
                        time.sleep(args.poll / 1000)
                    latency_ms.append((time.perf_counter() - acked) * 1000)
                    got_reasons = reasons(poller, ad, hour_s, hour_s + 3600, "hour")
                    assert got_reasons == Counter({"no-impression-click": BLIND_USERS}), (
                        ad,
                        got_reasons,
                    )
                    wait_quiet(poller)
                rss = worker_rss_mib(server)
            finally:
                client.close()
                poller.close()
    print(
        f"allowed lateness {lateness_ms / 1000:g} s -> keyed horizon {horizon_ms / 1000:g} s; "
        f"{args.trials} past hours, each closed by a POST stamped its end + {close_after_s:g} s"
    )
    common.print_table(
        ["measure", "p50", "max"],
        [
            [
                "verdict (closing POST 202 -> hour's blind clicks invalid)",
                common.fmt(common.percentile(latency_ms, 50), " ms"),
                common.fmt(max(latency_ms), " ms"),
            ]
        ],
    )
    if rss is not None:
        print(f"worker RSS at the end: {rss:,.0f} MiB")
    common.emit_json(
        {
            "bench": "verdict_latency",
            "family": "ad",
            "trials": args.trials,
            "allowed_lateness_ms": lateness_ms,
            "horizon_ms": horizon_ms,
            "after_close_ms": latency_ms,
            "worker_rss_mib": rss,
            "machine": info,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("ip", "visitor", "ad"), default="ip")
    parser.add_argument(
        "--trials", type=int, default=None, help="30 (ip, visitor); past hours for ad: 6"
    )
    parser.add_argument("--rate", type=float, default=5000.0, help="background events/s")
    parser.add_argument("--poll", type=float, default=5.0, help="ms between polls")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--lateness",
        default=None,
        help="allowed lateness (e.g. 30s); default: the server's for ip, 30s otherwise",
    )
    parser.add_argument(
        "--interval", type=float, default=5.0, help="visitor: seconds between trial starts"
    )
    args = parser.parse_args()
    if args.trials is None:
        args.trials = 6 if args.family == "ad" else 30
    common.install_sigterm_handler()
    info = common.machine()
    common.print_machine(info)
    if args.family == "ip" and args.lateness is None:
        run_ip(args, info, None)  # the server's default lateness, as ever
        return
    lateness_ms = parse_duration_ms(args.lateness or "30s")
    horizon_ms = keyed_horizon_ms(lateness_ms)
    close_delay_ms = Settings().close_delay_ms
    print(
        f"an hour is final (hour closer) at its end + {lateness_ms / 1000:g} s lateness + "
        f"{close_delay_ms // MINUTE_MS} min close delay; the closer is off in this run"
    )
    if args.family == "visitor":
        run_visitor(args, info, lateness_ms, horizon_ms)
    elif args.family == "ad":
        run_ad(args, info, lateness_ms, horizon_ms)
    else:
        run_ip(args, info, lateness_ms)


if __name__ == "__main__":
    main()
