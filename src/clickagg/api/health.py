"""``/healthz`` and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import ClassVar, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clickagg.api.state import state_of
from clickagg.core.windows import NO_EVENT_MS
from clickagg.query.base import KeyedStatus, QueryError, ReplicaStatus, StoreUnavailable


class ConnectionRefusals:
    """Requests answered 503 because more than ``max_connections`` connections were open:
    counted by the HTTP protocol (``clickagg.server``), exposed by ``/metrics``. Process-wide,
    as the connections are."""

    total: ClassVar[int] = 0


async def healthz(request: Request) -> Response:
    state = state_of(request)
    problems = []
    if not await state.queries.ping():
        problems.append("stream workers are not ready (recovering or restarting)")
    if state.supervisor is not None and state.supervisor.failure:
        problems.append(f"stream workers stopped: {state.supervisor.failure}")
    if state.committer.unavailable_reason:
        problems.append(f"log unavailable: {state.committer.unavailable_reason}")
    for partition, why in sorted(state.committer.writer.damaged().items()):
        problems.append(
            f"partition {partition} takes no events (run `clickagg log check`, then "
            f"`clickagg log repair` with the server stopped): {why}"
        )
    pressure = state.committer.disk_pressure()
    if pressure is not None:
        problems.append(f"ingest refused: {pressure}")
    if problems:
        # Disk pressure alone leaves queries answered and the workers counting, but ingest
        # refuses events, so the server is not ready: "degraded", and still a 503.
        degraded = pressure is not None and len(problems) == 1
        status = "degraded" if degraded else "unavailable"
        return JSONResponse({"status": status, "problems": problems}, status_code=503)
    return JSONResponse({"status": "ok"})


def _keyed_metrics(status: KeyedStatus, registry: CollectorRegistry) -> None:
    lag = Gauge(
        "clickagg_keyed_partition_lag_records",
        "Keyed log records not yet consumed by the keyed stage's second stage",
        ["keyed_partition"],
        registry=registry,
    )
    for p in status.partitions:
        lag.labels(str(p.keyed_partition)).set(max(0, p.durable_end_offset - p.consumed_offset))
    corrections = Counter(
        "clickagg_keyed_corrections",
        "Clicks the keyed stage corrected (taken out of the counts), by rule",
        ["rule_id"],
        registry=registry,
    )
    for rule, n in sorted(status.corrections_by_rule.items()):
        corrections.labels(rule).inc(n)
    reviews = Counter(
        "clickagg_keyed_review_clicks",
        "Clicks a review-only keyed rule flagged (e.g. an ad's CTR spike): still billed, "
        "reported for review, by rule",
        ["rule_id"],
        registry=registry,
    )
    for rule, n in sorted(status.reviews_by_rule.items()):
        reviews.labels(rule).inc(n)


def _replica_metrics(status: ReplicaStatus, registry: CollectorRegistry) -> None:
    """The API process's replica of the recent rows: whether recent queries are answered
    here (live) or by the worker, and what the replica costs in memory."""
    live = Gauge(
        "clickagg_replica_live",
        "1 while the replica of the recent rows follows the worker's feed (recent queries "
        "answered in the API process); 0 while it waits for a worker and a new snapshot",
        registry=registry,
    )
    live.set(1 if status.live else 0)
    snapshots = Counter(
        "clickagg_replica_snapshots",
        "Snapshots the replica started from: one per (re)connection to a worker's feed",
        registry=registry,
    )
    snapshots.inc(status.snapshots)
    rounds = Counter(
        "clickagg_replica_rounds",
        "Committed rounds the replica applied from the feed after its snapshots",
        registry=registry,
    )
    rounds.inc(status.rounds)
    cells = Gauge(
        "clickagg_replica_cells",
        "(ad, minute) and (ad, hour) cells the replica holds (0 while not live)",
        ["granularity"],
        registry=registry,
    )
    sketch_bytes = Gauge(
        "clickagg_replica_sketch_bytes",
        "Bytes of unique-user sketches the replica holds, the bulk of its memory",
        ["granularity"],
        registry=registry,
    )
    for granularity, held in status.held.items():
        cells.labels(granularity).set(held.cells)
        sketch_bytes.labels(granularity).set(held.sketch_bytes)


_T = TypeVar("_T")

# A scrape waits at most this long for the store's figures. The worker may be busy (waiting
# out a full disk, say, when the other figures matter most): without its answer the scrape
# still exports everything the API process knows, with clickagg_store_up 0.
STORE_WAIT_S = 2.0


async def _from_store(query: Awaitable[_T]) -> _T | None:
    try:
        return await asyncio.wait_for(query, STORE_WAIT_S)
    except (StoreUnavailable, QueryError, TimeoutError):
        return None


async def metrics(request: Request) -> Response:
    state = state_of(request)
    statuses = await _from_store(state.queries.partition_status())
    by_partition = {s.partition: s for s in statuses or ()}
    registry = CollectorRegistry()
    store_up = Gauge(
        "clickagg_store_up",
        "1 if the aggregate store (the worker) answered this scrape; 0: the per-partition "
        "stream figures (committed offsets, lag, counts, keyed stage) are missing from it",
        registry=registry,
    )
    store_up.set(0 if statuses is None else 1)
    gauges = {
        name: Gauge(f"clickagg_partition_{name}", help_text, ["partition"], registry=registry)
        for name, help_text in (
            ("durable_end_offset", "Offset one past the last durable event"),
            ("committed_offset", "Offset up to which the stream has committed"),
            ("lag_events", "Durable events not yet committed by the stream"),
            ("archived_offset", "Offset up to which decisions are published in the archive"),
            ("archive_lag_events", "Committed events whose decisions are not archived yet"),
            ("watermark_delay_seconds", "Now minus the partition watermark"),
            ("events_counted", "Events counted by the stream"),
            ("events_duplicate", "Duplicate events dropped by the stream"),
            ("events_late", "Late events sent to the late log"),
            ("events_invalid", "Events flagged invalid"),
        )
    }
    archived = await asyncio.to_thread(state.archive.archived_offsets)
    now = state.clock.now_ms()
    for partition in range(state.settings.partitions):
        label = str(partition)
        end = state.reader.durable_end(partition)
        gauges["durable_end_offset"].labels(label).set(end)
        gauges["archived_offset"].labels(label).set(archived.get(partition, 0))
        if statuses is None:
            continue  # not known: a committed offset of 0 would show all as lag
        status = by_partition.get(partition)
        committed = status.committed_offset if status else 0
        gauges["committed_offset"].labels(label).set(committed)
        gauges["lag_events"].labels(label).set(max(0, end - committed))
        gauges["archive_lag_events"].labels(label).set(
            max(0, committed - archived.get(partition, 0))
        )
        if status is None:
            continue
        if status.watermark_ms != NO_EVENT_MS:
            gauges["watermark_delay_seconds"].labels(label).set((now - status.watermark_ms) / 1000)
        gauges["events_counted"].labels(label).set(status.counted)
        gauges["events_duplicate"].labels(label).set(status.duplicates)
        gauges["events_late"].labels(label).set(status.late)
        gauges["events_invalid"].labels(label).set(status.invalid)
    if state.settings.keyed_stage and statuses is not None:
        keyed = await _from_store(state.queries.keyed_status())
        if keyed is not None:
            _keyed_metrics(keyed, registry)
    damaged = state.committer.writer.damaged()
    damaged_gauge = Gauge(
        "clickagg_log_partition_damaged",
        "1 while a partition takes no events because the log lost acknowledged data",
        ["partition"],
        registry=registry,
    )
    for partition in range(state.settings.partitions):
        damaged_gauge.labels(str(partition)).set(1 if partition in damaged else 0)
    recoveries = Counter(
        "clickagg_log_recoveries",
        "Actions the log writer's recovery took at startup (each is also logged)",
        ["partition", "action"],
        registry=registry,
    )
    for recovery in state.committer.writer.recoveries:
        recoveries.labels(str(recovery.partition), recovery.action).inc()
    refused = Counter(
        "clickagg_connections_refused",
        "Requests answered 503 because more than max_connections connections were open",
        registry=registry,
    )
    refused.inc(ConnectionRefusals.total)
    if state.replica_status is not None:  # none kept (another store): no replica figures
        _replica_metrics(state.replica_status(), registry)
    restarts = Gauge("clickagg_worker_restarts", "Worker process restarts", registry=registry)
    restarts.set(state.supervisor.restarts if state.supervisor else 0)
    reserve = state.committer.reserve
    if reserve is not None:
        reserve.shortage()  # a fresh look, if the last one is older than its interval
    if reserve is not None and reserve.last is not None:
        free = Gauge(
            "clickagg_disk_free_bytes",
            "Free bytes on the data dir's filesystem",
            registry=registry,
        )
        free.set(reserve.last.free_bytes)
        kept = Gauge(
            "clickagg_disk_reserve_bytes",
            "Free space below which ingest refuses events (kept for the workers)",
            registry=registry,
        )
        kept.set(reserve.reserve)
    body = generate_latest(state.registry) + generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
