"""``clickagg demo``: the whole pipeline on a temporary data dir, in about half a minute.

Besides ordinary traffic (retransmissions, late and malformed events) it sends invalid
traffic: clicks from declared crawlers and scripts, which the stream's user-agent rules
flag at once, and a click burst from one address, which the keyed stage (on here) takes
out of the counts within moments. The report shows both as invalid clicks with their
reasons, and how many ordinary clicks the rules flagged (none expected)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from clickagg.launcher import ServeProcess, free_port
from clickagg.traffic import TrafficGenerator, TrafficMix

# Invalid traffic the demo sends: 0.5 % of events are crawler or script clicks, and one
# address clicks 6 times a batch (30 a second at 5 batches a second; the built-in limit is
# 60 a minute). 50,000 users:
# an ordinary user clicking one ad twice within 30 s stays rare (the repeat-click rule).
DEMO_MIX = TrafficMix(users=50_000, bot_rate=0.005, burst_clicks=6)


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_demo(*, seconds: int, rate: int, port: int) -> None:
    console = Console()
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="clickagg-demo-") as data_dir:
        server = ServeProcess(
            Path(data_dir) / "data",
            partitions=8,
            port=port,
            extra_env={"CLICKAGG_KEYED_STAGE": "true"},
        )
        console.print(f"[bold]Starting[/] clickagg serve on {url} (data in {data_dir})")
        try:
            server.start()
            generator = TrafficGenerator(mix=DEMO_MIX)
            sent, accepted, rejected = _send_traffic(console, url, generator, seconds, rate)
            _wait_caught_up(url)
            _report(console, url, sent, accepted, rejected)
            _report_invalid(console, url, generator)
        finally:
            server.stop()


def _wait_caught_up(url: str, timeout_s: float = 15.0) -> None:
    """Until every accepted event is committed and the keyed stage has judged them all:
    no lag, and the counts and corrections still for a second (stage 1 hands a round's
    clicks to the keyed log after its commit, so a zero lag alone can come too early).
    Bounded: the report says what it sees then."""
    deadline = time.monotonic() + timeout_s
    previous: tuple[float, ...] = ()
    while time.monotonic() < deadline:
        metrics = httpx.get(url + "/metrics", timeout=10).text
        lag = _metric_sum(metrics, "clickagg_partition_lag_events") + _metric_sum(
            metrics, "clickagg_keyed_partition_lag_records"
        )
        now = (
            lag,
            _metric_sum(metrics, "clickagg_partition_committed_offset"),
            _metric_sum(metrics, "clickagg_keyed_corrections_total"),
        )
        if lag == 0 and now == previous:
            return
        previous = now
        time.sleep(1.0 if lag == 0 else 0.1)


def _send_traffic(
    console: Console, url: str, generator: TrafficGenerator, seconds: int, rate: int
) -> tuple[int, int, int]:
    tick_s = 0.2
    per_tick = max(1, int(rate * tick_s))
    sent = accepted = rejected = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
    )
    with httpx.Client(timeout=30) as client, Progress(*columns, console=console) as progress:
        task = progress.add_task("sending traffic", total=seconds, stats="")
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            body = generator.ndjson(per_tick, int(time.time() * 1000))
            response = client.post(
                url + "/events/batch",
                content=body,
                headers={"content-type": "application/x-ndjson"},
            )
            result = response.json()
            sent += body.count(b"\n")  # one line per event, the burst's too
            accepted += result.get("accepted", 0)
            rejected += len(result.get("rejected", []))
            progress.update(
                task,
                completed=elapsed,
                stats=f"{sent:,} sent · {accepted:,} accepted · {rejected:,} rejected",
            )
            time.sleep(max(0.0, tick_s - (time.monotonic() - started - elapsed)))
        progress.update(task, completed=seconds)
    return sent, accepted, rejected


def _report(console: Console, url: str, sent: int, accepted: int, rejected: int) -> None:
    rows: list[tuple[str, dict[str, Any]]] = []
    with httpx.Client(timeout=10) as client:  # one client for the 51 queries, not one each
        metrics = client.get(url + "/metrics").text
        for n in range(50):
            ad_id = f"ad-{n:04d}"
            params = {"ad_id": ad_id, "last": "1h", "granularity": "day"}
            data = client.get(url + "/aggregates", params=params).json()
            if data:
                total = {
                    key: sum(row[key] for row in data)
                    for key in ("clicks", "impressions", "spend_micros", "unique_users")
                }
                rows.append((ad_id, total))
    rows.sort(key=lambda item: -item[1]["clicks"])
    table = Table(title="Top ads, last hour (exactly-once, minute windows rolled up)")
    for name in ("ad", "clicks", "impressions", "CTR", "spend", "unique users"):
        table.add_column(name, justify="left" if name == "ad" else "right")
    for ad_id, total in rows[:10]:
        ctr = total["clicks"] / total["impressions"] if total["impressions"] else 0
        table.add_row(
            ad_id,
            f"{total['clicks']:,}",
            f"{total['impressions']:,}",
            f"{ctr:.2%}",
            f"${total['spend_micros'] / 1e6:,.2f}",
            f"{total['unique_users']:,}",
        )
    console.print(table)
    pipeline = Table(title="What happened to the traffic")
    pipeline.add_column("fate")
    pipeline.add_column("events", justify="right")
    pipeline.add_row("sent", f"{sent:,}")
    pipeline.add_row("rejected at ingest (malformed)", f"{rejected:,}")
    pipeline.add_row("accepted (durable, 202)", f"{accepted:,}")
    for label, name in (
        ("counted (clicks + impressions)", "clickagg_partition_events_counted"),
        ("duplicates dropped", "clickagg_partition_events_duplicate"),
        ("late (to the late log)", "clickagg_partition_events_late"),
        ("invalid at once (stage-1 rules)", "clickagg_partition_events_invalid"),
    ):
        pipeline.add_row(label, f"{int(_metric_sum(metrics, name)):,}")
    console.print(pipeline)
    top = rows[0][0] if rows else "ad-0000"
    console.print(
        "\n[bold]Where to look next[/] (run [cyan]clickagg serve[/] and try):\n"
        f"  curl '{'http://127.0.0.1:8000'}/aggregates?ad_id={top}&last=1h&granularity=minute'\n"
        f"  curl 'http://127.0.0.1:8000/api/v1/ads/{top}/metrics/realtime'\n"
        "  curl 'http://127.0.0.1:8000/events/c-1'   # or: clickagg trace c-1\n"
        "  curl 'http://127.0.0.1:8000/metrics'\n"
        "  README.md lists every endpoint and setting.",
        soft_wrap=True,
    )


def _report_invalid(console: Console, url: str, generator: TrafficGenerator) -> None:
    """Invalid clicks per reason (``group_by=invalid_reason``), summed over the ads, beside
    what the demo sent as bots and burst: what the rules flagged beyond those is ordinary
    traffic flagged (a false positive)."""
    by_reason: dict[str, int] = {}
    billable = 0
    for ad_id in generator.ad_ids:
        params = {"ad_id": ad_id, "last": "1h", "granularity": "day"}
        for row in httpx.get(url + "/aggregates", params=params, timeout=10).json():
            billable += row["clicks"]
        grouped = httpx.get(
            url + "/aggregates", params=params | {"group_by": "invalid_reason"}, timeout=10
        ).json()
        for row in grouped:
            if row["invalid_clicks"]:
                reason = row["invalid_reason"]
                by_reason[reason] = by_reason.get(reason, 0) + row["invalid_clicks"]
    table = Table(title="Invalid clicks (flagged with a reason, not billed)")
    table.add_column("reason")
    table.add_column("clicks", justify="right")
    for reason, clicks in sorted(by_reason.items(), key=lambda item: -item[1]):
        table.add_row(reason, f"{clicks:,}")
    flagged = sum(by_reason.values())
    invalid_sent = generator.bot_clicks + generator.burst_clicks
    table.add_row("all invalid clicks", f"{flagged:,}")
    table.add_row("sent as crawler or script clicks", f"{generator.bot_clicks:,}")
    table.add_row("sent as a one-address burst", f"{generator.burst_clicks:,}")
    table.add_row("billable clicks", f"{billable:,}")
    console.print(table)
    console.print(
        f"Ordinary clicks flagged: {max(0, flagged - invalid_sent):,} "
        "(the rules flag the demo's bots and burst, not its ordinary traffic; events older "
        "than the hour shown or still in flight are not in these sums).",
        soft_wrap=True,
    )


if __name__ == "__main__":
    run_demo(seconds=int(sys.argv[1]) if len(sys.argv) > 1 else 30, rate=2000, port=0)
