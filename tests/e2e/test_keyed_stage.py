"""The keyed stage through the real server: a click burst from one address, spread over
every partition, is taken out of the stream's counts within moments, the real-time
counters included, and the batch layer's final rows for the hour then agree with it."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from clickagg.batch.runner import reconcile_hours
from clickagg.cli.main import main
from clickagg.config import Settings
from tests.e2e.server import ServeProcess, http
from tests.e2e.test_kill9 import post, wait_caught_up, wait_healthy, worker_pid

ADS = ("ad-k1", "ad-k2", "ad-k3", "ad-k4")
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"
BURST_IP = "198.51.100.7"
LIMIT = 60  # the built-in ip-click-velocity rule


def minute_rows(url: str, ad: str, start_s: int, *, group_by: str | None = None) -> list[Any]:
    params: dict[str, Any] = {
        "ad_id": ad,
        "start": start_s - 600,
        "end": start_s + 600,
        "granularity": "minute",
    }
    if group_by:
        params["group_by"] = group_by
    response = http.get(url + "/aggregates", params=params, timeout=10)
    response.raise_for_status()
    rows: list[Any] = response.json()
    return rows


def fate(url: str, event_id: str) -> Any:
    response = http.get(f"{url}/events/{event_id}", timeout=10)
    if response.status_code == 404:  # not archived yet
        return {"status": None}
    response.raise_for_status()
    return response.json()


def per_minute(url: str, minute_s: int) -> dict[tuple[str, str], tuple[int, int, int, bool]]:
    return {
        (ad, row["window"]): (
            row["clicks"],
            row["spend_micros"],
            row["invalid_clicks"],
            row["final"],
        )
        for ad in ADS
        for row in minute_rows(url, ad, minute_s)
    }


def test_a_burst_is_corrected_in_the_stream_and_agrees_with_the_batch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServeProcess(
        data,
        partitions=4,
        extra_env={
            "CLICKAGG_KEYED_STAGE": "true",
            "CLICKAGG_KEYED_PARTITIONS": "3",
            "CLICKAGG_CLOSE_INTERVAL": "0",  # this test closes the hour itself
        },
    )
    server.start()
    try:
        rng = random.Random(3)
        now_s = int(time.time())
        minute_s = now_s - now_s % 60 - 60  # the whole burst in one past UTC minute

        def click(event_id: str, ip: str, ad: str) -> dict[str, Any]:
            return {
                "event_type": "click",
                "event_id": event_id,
                "ad_id": ad,
                # A user of its own: the batch's built-in repeat-click rule must not
                # flag the normal traffic (one user clicking one ad twice in 30 s).
                "user_id": f"u-{event_id}",
                "timestamp": (minute_s * 1000 + rng.randrange(60_000)) / 1000,
                "ip": ip,
                "user_agent": BROWSER,
                "cost_micros": 1_000 * rng.randrange(1, 5),
            }

        burst = [click(f"burst-{i}", BURST_IP, ADS[i % 4]) for i in range(300)]
        normal = [click(f"ok-{i}", f"192.0.2.{i % 50}", ADS[i % 4]) for i in range(200)]
        events = burst + normal
        rng.shuffle(events)
        for i in range(0, len(events), 50):  # several rounds: the limit is crossed mid-way
            assert post(server.url, events[i : i + 50])
        wait_caught_up(server)

        # Computed from what was sent: the burst's clicks invalid, the others billed.
        expected: Counter[tuple[str, str]] = Counter()
        spend: Counter[str] = Counter()
        for event in normal:
            expected[(event["ad_id"], "clicks")] += 1
            spend[event["ad_id"]] += event["cost_micros"]
        for event in burst:
            expected[(event["ad_id"], "invalid")] += 1

        def stream_totals() -> Counter[tuple[str, str]]:
            got: Counter[tuple[str, str]] = Counter()
            for ad in ADS:
                for row in minute_rows(server.url, ad, minute_s):
                    got[(ad, "clicks")] += row["clicks"]
                    got[(ad, "invalid")] += row["invalid_clicks"]
                    got[(ad, "spend")] += row["spend_micros"]
            return got

        deadline = time.monotonic() + 30
        while (got := stream_totals()) != expected + Counter(
            {(ad, "spend"): spend[ad] for ad in ADS}
        ):
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        by_reason: Counter[str] = Counter()
        for ad in ADS:
            for row in minute_rows(server.url, ad, minute_s, group_by="invalid_reason"):
                by_reason[row["invalid_reason"]] += row["invalid_clicks"]
        assert by_reason == Counter({"ip-click-velocity": 300})
        for ad in ADS:
            realtime = http.get(
                server.url + "/aggregates/realtime", params={"ad_id": ad, "window": "1h"}
            ).json()
            assert realtime["clicks"] == expected[(ad, "clicks")]
            assert realtime["spend_micros"] == spend[ad]

        # The audit trail: a corrected burst click's final fate is invalid, with the rule
        # and its evidence, and the stream's first decision kept as history.
        burst_click = burst[123]
        deadline = time.monotonic() + 30
        while (trail := fate(server.url, burst_click["event_id"]))["status"] != "invalid":
            assert time.monotonic() < deadline, trail
            time.sleep(0.1)
        stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(minute_s))
        evidence = f"ip {BURST_IP}: more than {LIMIT} clicks in minute {stamp}"
        assert trail["reason"] == f"ip-click-velocity: click burst from one address: {evidence}"
        counted, corrected = trail["history"]
        assert (counted["stage"], counted["status"]) == ("stream", "counted")
        assert (counted["partition"], counted["offset"]) == (trail["partition"], trail["offset"])
        assert (corrected["stage"], corrected["status"]) == ("keyed", "invalid")
        assert (corrected["rule_id"], corrected["evidence"]) == ("ip-click-velocity", evidence)
        assert [c["status"] for c in trail["copies"]] == ["invalid"]
        normal_trail = fate(server.url, normal[7]["event_id"])
        assert normal_trail["status"] == "counted" and len(normal_trail["history"]) == 1
        traced = CliRunner().invoke(main, ["trace", burst_click["event_id"], "--url", server.url])
        assert traced.exit_code == 0, traced.output
        assert f"{burst_click['event_id']}: invalid (partition" in traced.output
        assert "first: counted by the stream" in traced.output
        assert f"evidence: {evidence}" in traced.output

        # /metrics: stage 2 consumes every keyed record, and made the 300 corrections.
        def keyed_samples() -> dict[str, dict[str, float]]:
            samples: dict[str, dict[str, float]] = {}
            metrics = http.get(server.url + "/metrics", timeout=10).text
            for family in text_string_to_metric_families(metrics):
                for sample in family.samples:
                    if sample.name.startswith("clickagg_keyed_"):
                        labels = sample.labels
                        label = labels.get("keyed_partition") or labels.get("rule_id")
                        samples.setdefault(sample.name, {})[str(label)] = sample.value
            return samples

        deadline = time.monotonic() + 30
        # Every family's partitions: the IP family's 0-2, the visitor family's 1024-1026,
        # the ad family's 2048-2050 (empty: none of its rules is in force).
        caught_up = {str(k): 0 for k in (0, 1, 2, 1024, 1025, 1026, 2048, 2049, 2050)}
        while (samples := keyed_samples())["clickagg_keyed_partition_lag_records"] != caught_up:
            assert time.monotonic() < deadline, samples
            time.sleep(0.1)
        assert samples["clickagg_keyed_corrections_total"] == {"ip-click-velocity": 300}

        # The batch layer applies the same rule to the archive: its final rows agree.
        stream = per_minute(server.url, minute_s)
        assert not any(final for *_, final in stream.values())
        hour_ms = (minute_s - minute_s % 3600) * 1000
        reconcile_hours(Settings(data_dir=data, partitions=4), [hour_ms], reason="test")
        final = per_minute(server.url, minute_s)
        assert all(is_final for *_, is_final in final.values())
        assert {k: v[:3] for k, v in final.items()} == {k: v[:3] for k, v in stream.items()}
    finally:
        server.stop()


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

[[rules]]
id = "ctr-review"
kind = "ctr_spike"
reason = "CTR above the ad's baseline"
[rules.params]
factor = 2.0
baseline_hours = 1
min_clicks = 10
"""


def test_the_ad_rules_correct_a_closed_hour_in_the_stream_as_the_batch_does(
    tmp_path: Path,
) -> None:
    """Through the real worker: clicks with no impression of their ad, and an ad-hour whose
    CTR spikes, two hours ago; once later events close that hour, the stream corrects them
    (the ad family), and reconciling the hour with the same rules file changes nothing.
    The worker is killed (-9) halfway through the hour's events, and again right after the
    events that close it (its verdicts in flight): each click is still corrected once."""
    data = tmp_path / "data"
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(AD_RULES)
    server = ServeProcess(
        data,
        partitions=4,
        extra_env={
            "CLICKAGG_KEYED_STAGE": "true",
            "CLICKAGG_KEYED_PARTITIONS": "2",
            "CLICKAGG_RULES_FILE": str(rules_file),
            "CLICKAGG_CLOSE_INTERVAL": "0",
        },
    )
    server.start()
    try:
        rng = random.Random(5)
        now_s = int(time.time())
        hour_s = now_s - now_s % 3600 - 2 * 3600  # the judged hour; its baseline before it
        events: list[dict[str, Any]] = []

        def event(kind: str, ad: str, at_s: float, user: str) -> None:
            n = len(events)
            events.append(
                {
                    "event_type": kind,
                    "event_id": f"{kind[0]}{n}",
                    "ad_id": ad,
                    "user_id": user,
                    "timestamp": round(at_s, 3),
                    "ip": f"10.{n // 250}.{n % 250}.9",
                    "user_agent": BROWSER,
                    "cost_micros": 1_000,
                }
            )

        for u in range(20):  # the baseline hour: ad-s seen 20 times, clicked twice
            at = hour_s - 3600 + rng.uniform(0, 3000)
            event("impression", "ad-s", at, f"b{u}")
            if u % 10 == 0:
                event("click", "ad-s", at + 60, f"b{u}")
        for u in range(20):  # ad-n: seen, then clicked; and 4 clicks by users who saw nothing
            at = hour_s + rng.uniform(0, 3000)
            event("impression", "ad-n", at, f"n{u}")
            event("click", "ad-n", at + 120, f"n{u}")
        blind = [f"c{len(events) + i}" for i in range(4)]
        for u in range(4):
            event("click", "ad-n", hour_s + rng.uniform(0, 3500), f"blind{u}")
        spike = []
        for u in range(5):  # the spike: 15 clicks on 5 impressions, each clicker saw it
            at = hour_s + rng.uniform(0, 2000)
            event("impression", "ad-s", at, f"s{u}")
            for j in range(3):
                spike.append(f"c{len(events)}")
                event("click", "ad-s", at + 60 * (j + 1), f"s{u}")
        # In event time order, 5 minutes of it per batch, all at once: the worker's rounds
        # then span more event time than the keyed horizon, and each round's records still
        # reach the keyed logs interleaved by time (none left to the batch as too late).
        buckets: dict[int, list[dict[str, Any]]] = {}
        for e in sorted(events, key=lambda e: e["timestamp"]):
            buckets.setdefault(int(e["timestamp"]) // 300, []).append(e)
        killed: list[int] = []

        def kill_worker() -> None:
            pid = worker_pid(server, not_one_of=killed)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            worker_pid(server, not_one_of=killed)  # restarted by the supervisor
            wait_healthy(server)

        for n, bucket in enumerate(buckets.values()):
            assert post(server.url, bucket)
            if n == len(buckets) // 2:
                kill_worker()
        # Later clicks close the hour: their time is past its end by more than the horizon.
        later = [
            {**events[0], "event_id": f"later-{i}", "ad_id": ad, "timestamp": now_s - 30}
            for i, ad in enumerate(["ad-n", "ad-s"] * 20)
        ]
        assert post(server.url, later)
        time.sleep(0.2)  # a round or two under way
        kill_worker()
        wait_caught_up(server)

        def by_reason() -> Counter[str]:
            got: Counter[str] = Counter()
            for ad in ("ad-n", "ad-s"):
                params = {
                    "ad_id": ad,
                    "start": hour_s - 3600,
                    "end": hour_s + 3600,
                    "granularity": "hour",
                    "group_by": "invalid_reason",
                }
                for row in http.get(server.url + "/aggregates", params=params).json():
                    got[row["invalid_reason"]] += row["invalid_clicks"]
            return got

        want = Counter({"no-impression-click": len(blind), "ctr-spike": len(spike)})
        deadline = time.monotonic() + 60
        while (got := by_reason()) != want:
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        trail = fate(server.url, blind[0])
        deadline = time.monotonic() + 30
        while (trail := fate(server.url, blind[0]))["status"] != "invalid":
            assert time.monotonic() < deadline, trail
            time.sleep(0.1)
        assert trail["reason"].startswith("no-impression-click: click without an impression: ")
        assert trail["history"][-1]["stage"] == "keyed"

        def hour_rows() -> dict[str, tuple[int, int, int]]:
            rows = {}
            for ad in ("ad-n", "ad-s"):
                params = {
                    "ad_id": ad,
                    "start": hour_s,
                    "end": hour_s + 3600,
                    "granularity": "hour",
                }
                for row in http.get(server.url + "/aggregates", params=params).json():
                    rows[ad] = (row["clicks"], row["invalid_clicks"], row["spend_micros"])
            return rows

        stream = hour_rows()
        assert stream["ad-n"][:2] == (20, len(blind))
        # The review-only rule flagged the spike too: reported once each, still corrected
        # by the excluding rule (its billing untouched by the review).
        metrics = http.get(server.url + "/metrics", timeout=10).text
        reviews = {
            sample.labels["rule_id"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "clickagg_keyed_review_clicks_total"
        }
        assert reviews == {"ctr-review": len(spike)}
        settings = Settings(data_dir=data, partitions=4, rules_file=rules_file)
        reconcile_hours(settings, [hour_s * 1000], reason="test")
        assert hour_rows() == stream
    finally:
        server.stop()
