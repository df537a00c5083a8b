"""Ingest endpoints: validate, append durably (group commit), answer 202."""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from clickagg.api.committer import Backpressure
from clickagg.api.errors import ApiError, bad_request
from clickagg.api.state import AppState, state_of
from clickagg.core import ids
from clickagg.core.events import (
    IncomingEvent,
    InvalidEvent,
    NormalizedBatch,
    decode_many,
    decode_one,
    normalize,
)
from clickagg.log.base import LogFullError

RETRY_AFTER_S = "1"


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload too large", f"body is {declared} bytes; limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload too large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("client disconnected before the body was complete") from None
    body = b"".join(chunks)
    if not body.strip():
        raise bad_request("empty body: send one JSON event", "empty body")
    return body


async def commit(state: AppState, batch: NormalizedBatch) -> None:
    started = state.clock.now_ms()
    try:
        await state.committer.append(batch.by_partition)
    except Backpressure as exc:
        state.metrics.unavailable.inc()
        raise ApiError(
            503, "busy", f"the log is backpressured ({exc}); retry", headers={"Retry-After": "1"}
        ) from None
    except (LogFullError, OSError) as exc:
        state.metrics.unavailable.inc()
        raise ApiError(
            503,
            "log unavailable",
            f"events could not be stored durably ({exc}); nothing was acknowledged, retry",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
    state.metrics.append_seconds.observe((state.clock.now_ms() - started) / 1000)
    for columns in batch.by_partition.values():
        clicks = columns.event_type.count(ids.CLICK.to_bytes(1, "little"))
        state.metrics.accepted.labels("click").inc(clicks)
        state.metrics.accepted.labels("impression").inc(columns.count - clicks)


def _normalize(
    state: AppState, events: list[IncomingEvent | None], default_type: int | None, rejected: Any
) -> NormalizedBatch:
    settings = state.settings
    batch = normalize(
        events,
        default_type=default_type,
        partitions=settings.partitions,
        now_ms=state.clock.now_ms(),
        max_future_ms=settings.max_future_ms,
        rejected=rejected,
    )
    for rejection in batch.rejected:
        event = events[rejection.index] if rejection.index < len(events) else None
        given = None if event is None else event.event_id or event.click_id or event.impression_id
        if given is not None:
            state.remember_rejection(str(given), rejection.error)
    state.metrics.rejected.inc(len(batch.rejected))
    return batch


async def _ingest_one(request: Request, event_type: int) -> Response:
    state = state_of(request)
    body = await read_body(request, state.settings.max_body_bytes)
    try:
        event = decode_one(body)
    except InvalidEvent as exc:
        state.metrics.rejected.inc()
        raise ApiError(400, "invalid event", str(exc)) from None
    batch = _normalize(state, [event], event_type, None)
    if batch.rejected:
        raise ApiError(400, "invalid event", batch.rejected[0].error)
    await commit(state, batch)
    event_id, partition = batch.event_ids[0], batch.partitions[0]
    return JSONResponse(
        {"accepted": 1, "event_id": event_id, "partition": partition}, status_code=202
    )


async def ingest_click(request: Request) -> Response:
    return await _ingest_one(request, ids.CLICK)


async def ingest_impression(request: Request) -> Response:
    return await _ingest_one(request, ids.IMPRESSION)


async def ingest_batch(request: Request) -> Response:
    state = state_of(request)
    settings = state.settings
    body = await read_body(request, settings.max_body_bytes)
    content_type = request.headers.get("content-type", "")
    ndjson = (
        "ndjson" in content_type
        or "jsonlines" in content_type
        or ("json" not in content_type and not body.lstrip().startswith(b"["))
    )
    try:
        events, rejected = decode_many(body, ndjson=ndjson)
    except InvalidEvent as exc:
        state.metrics.rejected.inc()
        raise ApiError(400, "invalid batch", str(exc)) from None
    if len(events) > settings.max_batch_events:
        raise ApiError(
            413,
            "batch too large",
            f"{len(events)} events in one batch; the limit is {settings.max_batch_events}",
        )
    batch = _normalize(state, events, None, rejected)
    rejected_body = [{"index": r.index, "error": r.error} for r in batch.rejected]
    if batch.accepted == 0:
        raise ApiError(
            400,
            "no valid events",
            "every event of the batch was rejected" if events else "the batch is empty",
            extra={"accepted": 0, "rejected": rejected_body},
        )
    await commit(state, batch)
    return JSONResponse({"accepted": batch.accepted, "rejected": rejected_body}, status_code=202)
