"""The ASGI application: routes, error handlers, and the lifespan that owns the log writer
and starts what the composition root hands it (the worker supervisor, maintenance).

It runs on the roles' Protocols only (log writer and reader, query store, archive reader):
the composition root, ``clickagg.compose``, opens the backends that implement them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from clickagg.api import admin, audit, billing, health, ingest, openapi, queries, rules
from clickagg.api.committer import GroupCommitter
from clickagg.api.errors import ApiError, api_error_handler, http_error_handler
from clickagg.api.state import AppState, IngestMetrics, WorkerHandle, state_of
from clickagg.archive.base import ArchiveReader, CorrectionReader
from clickagg.clock import Clock, SystemClock
from clickagg.config import Settings
from clickagg.disk import DiskReserve
from clickagg.log.base import LogReader, LogWriter
from clickagg.query.base import FinalRows, QueryStore, ReplicaStatus


async def openapi_document(request: Request) -> Response:
    """Rendered per request: the timestamp bounds it states are relative to the clock."""
    state = state_of(request)
    return JSONResponse(openapi.build(state.settings, state.clock.now_ms()))


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors as JSON; its 405 keeps the ``Allow`` header and names it."""
    assert isinstance(exc, HTTPException)
    allow = (exc.headers or {}).get("Allow")
    if exc.status_code == 405 and allow:
        return await api_error_handler(request, ingest.method_not_allowed(request.method, allow))
    return await http_error_handler(request, exc)


ROUTES = [
    Route("/events/{event_id:path}", audit.event_fate, methods=["GET"]),
    Route("/aggregates", queries.aggregates, methods=["GET"]),
    Route("/aggregates/realtime", queries.realtime, methods=["GET"]),
    Route("/api/v1/ads/{ad_id}/metrics", queries.ad_metrics, methods=["GET"]),
    Route("/api/v1/ads/{ad_id}/metrics/realtime", queries.ad_realtime, methods=["GET"]),
    Route("/ads/top", queries.top_ads, methods=["GET"]),
    Route("/advertisers/{advertiser_id}/metrics", queries.advertiser_metrics, methods=["GET"]),
    Route("/campaigns/{campaign_id}/metrics", queries.campaign_metrics, methods=["GET"]),
    Route("/reconciliation", billing.reconciliation, methods=["GET"]),
    Route("/billing/adjustments", billing.adjustments, methods=["GET"]),
    Route("/billing/advertisers/{advertiser_id}/statement", billing.statement, methods=["GET"]),
    Route("/rules/replay", rules.replay, methods=["POST"]),
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/metrics", health.metrics, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
    *admin.ROUTES,
]


@dataclass(frozen=True)
class Backends:
    """What the app runs on; it closes them when it stops."""

    writer: LogWriter
    reader: LogReader
    queries: QueryStore
    archive: ArchiveReader
    supervisor: WorkerHandle | None = None  # started with the app, stopped with it
    final: FinalRows | None = None  # the batch layer's reconciled hours and reports
    corrections: CorrectionReader | None = None  # the keyed stage's, for the audit trail
    # the query store's replica of the recent rows in this process, if it keeps one
    replica_status: Callable[[], ReplicaStatus] | None = None
    # background work of the process that owns the log (retention), run from start to
    # stop: the composition root's, given the app's state once it is up
    maintenance: Callable[[AppState], Coroutine[None, None, None]] | None = None


def build_app(
    settings: Settings,
    open_backends: Callable[[Settings], Backends],
    *,
    clock: Clock | None = None,
) -> ASGIApp:
    """Build the app; its lifespan calls ``open_backends`` once the data dir exists."""
    clock = clock or SystemClock()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        backends = open_backends(settings)
        writer, reader = backends.writer, backends.reader
        committer = GroupCommitter(
            writer,
            max_pending_events=settings.max_pending_events,
            reserve=DiskReserve.for_settings(settings),
        )
        committer.start()
        supervisor = backends.supervisor
        if supervisor is not None:
            supervisor.start()
        registry = CollectorRegistry()
        state = AppState(
            settings=settings,
            clock=clock,
            committer=committer,
            reader=reader,
            queries=backends.queries,
            archive=backends.archive,
            corrections=backends.corrections,
            supervisor=supervisor,
            final=backends.final,
            replica_status=backends.replica_status,
            registry=registry,
            metrics=IngestMetrics(registry),
        )
        app.state.clickagg = state
        await backends.queries.start()
        maintenance: asyncio.Task[None] | None = None
        if backends.maintenance is not None:
            maintenance = asyncio.create_task(backends.maintenance(state), name="maintenance")
        try:
            yield
        finally:
            if maintenance is not None:
                maintenance.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintenance
            await committer.stop()
            if supervisor is not None:
                await supervisor.stop()
            await state.queries.close()
            state.archive.close()
            if state.corrections is not None:
                state.corrections.close()
            reader.close()
            writer.close()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={ApiError: api_error_handler, HTTPException: http_error},
    )
    return ingest.IngestRouter(app, lambda: app.state.clickagg)
