"""``clickagg demo``: the whole pipeline on a temporary data dir, in about half a minute."""

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
from clickagg.traffic import TrafficGenerator


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
        server = ServeProcess(Path(data_dir) / "data", partitions=8, port=port)
        console.print(f"[bold]Starting[/] clickagg serve on {url} (data in {data_dir})")
        try:
            server.start()
            sent, accepted, rejected = _send_traffic(console, url, seconds, rate)
            time.sleep(1.0)  # let the last micro-batches commit
            _report(console, url, sent, accepted, rejected)
        finally:
            server.stop()


def _send_traffic(console: Console, url: str, seconds: int, rate: int) -> tuple[int, int, int]:
    generator = TrafficGenerator()
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
            sent += per_tick
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


if __name__ == "__main__":
    run_demo(seconds=int(sys.argv[1]) if len(sys.argv) > 1 else 30, rate=2000, port=0)
