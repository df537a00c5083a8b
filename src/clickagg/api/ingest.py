"""Ingest endpoints: validate, append durably (group commit), answer 202.

These are the hot path, so they are plain ASGI callables rather than Starlette routes:
no Request object, no middleware stack, one dict lookup to dispatch and msgspec to answer.
Everything else of the API goes through Starlette (see ``app.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clickagg.api.committer import Backpressure, DiskReserveError
from clickagg.api.errors import ApiError, bad_request
from clickagg.api.state import AppState
from clickagg.core import ids
from clickagg.core.events import (
    IncomingEvent,
    InvalidEvent,
    NormalizedBatch,
    decode_many,
    decode_one,
    normalize,
)

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"
_CLICK_BYTE = ids.CLICK.to_bytes(1, "little")
_encode = msgspec.json.Encoder().encode
Handler = Callable[[AppState, bytes, str], Awaitable[tuple[int, dict[str, Any]]]]


def method_not_allowed(method: str, allow: str) -> ApiError:
    """405 with the ``Allow`` header RFC 9110 requires."""
    detail = f"{method} is not allowed on this path; allowed: {allow}"
    return ApiError(405, "method not allowed", detail, headers={"Allow": allow})


async def read_body(receive: Receive, declared_length: int | None, limit: int) -> bytes:
    if declared_length is not None and declared_length > limit:
        raise ApiError(
            413, "payload too large", f"body is {declared_length} bytes; limit is {limit}"
        )
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")  # the whole body in one message, as a
        if len(body) > limit:  # single event's always is: no list, no join
            raise ApiError(413, "payload too large", f"body exceeds {limit} bytes")
    else:
        body = await _read_chunks(message, receive, limit)
    if not body.strip():
        raise bad_request("empty body: send one JSON event", "empty body")
    return body


async def _read_chunks(message: Message, receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise bad_request("client disconnected before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload too large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


async def commit(state: AppState, batch: NormalizedBatch) -> None:
    started = state.clock.now_ms()
    try:
        await state.committer.append(batch.by_partition)
    except (Backpressure, OSError) as exc:  # LogFullError is an OSError
        state.metrics.unavailable.inc()
        if isinstance(exc, Backpressure):
            error, detail = "busy", f"the log is backpressured ({exc}); retry"
        elif isinstance(exc, DiskReserveError):
            error, detail = "disk full", f"{exc.strerror}; nothing was acknowledged, retry later"
        else:
            error = "log unavailable"
            detail = f"events could not be stored durably ({exc}); nothing was acknowledged, retry"
        raise ApiError(503, error, detail, headers={"Retry-After": RETRY_AFTER_S}) from None
    state.metrics.append_seconds.observe((state.clock.now_ms() - started) / 1000)
    clicks = sum(c.event_type.count(_CLICK_BYTE) for c in batch.by_partition.values())
    if clicks:
        state.metrics.accepted_clicks.inc(clicks)
    if batch.accepted > clicks:
        state.metrics.accepted_impressions.inc(batch.accepted - clicks)


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
    if batch.rejected:
        state.metrics.rejected.inc(len(batch.rejected))
    return batch


def single(event_type: int) -> Handler:
    async def ingest_one(state: AppState, body: bytes, content_type: str) -> tuple[int, Any]:
        try:
            event = decode_one(body)
        except InvalidEvent as exc:
            state.metrics.rejected.inc()
            raise ApiError(400, "invalid event", str(exc)) from None
        batch = _normalize(state, [event], event_type, None)
        if batch.rejected:
            raise ApiError(400, "invalid event", batch.rejected[0].error)
        await commit(state, batch)
        return 202, {
            "accepted": 1,
            "event_id": batch.event_ids[0],
            "partition": batch.partitions[0],
        }

    return ingest_one


async def ingest_batch(state: AppState, body: bytes, content_type: str) -> tuple[int, Any]:
    settings = state.settings
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
    return 202, {"accepted": batch.accepted, "rejected": rejected_body}


ROUTES: dict[str, Handler] = {
    "/events/click": single(ids.CLICK),
    "/events/impression": single(ids.IMPRESSION),
    "/api/v1/events/click": single(ids.CLICK),
    "/api/v1/events/impression": single(ids.IMPRESSION),
    "/events/batch": ingest_batch,
}


class IngestRouter:
    """ASGI: ``POST`` to an ingest path is handled here, anything else goes to ``app``."""

    def __init__(self, app: ASGIApp, state_of: Callable[[], AppState]) -> None:
        self.app = app
        self.state_of = state_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        try:
            if scope["method"] != "POST":
                # an ingest path takes POST only (not the audit route's GET /events/{id})
                raise method_not_allowed(scope["method"], "POST")
            state = self.state_of()
            declared_length, content_type = _length_and_type(scope["headers"])
            body = await read_body(receive, declared_length, state.settings.max_body_bytes)
            status, payload = await handler(state, body, content_type)
        except ApiError as exc:
            status = exc.status
            payload = {"error": exc.error, "detail": exc.detail, **exc.extra}
            headers = exc.headers or {}
        except Exception:
            log.exception("ingest failed")
            status, payload = 500, {"error": "internal error", "detail": "see the server log"}
        encoded = _encode(payload)
        # a Content-Length spares the server chunked framing of a body it holds whole
        raw_headers = [_JSON, (b"content-length", str(len(encoded)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": encoded})


_JSON = (b"content-type", b"application/json")


def _length_and_type(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, str]:
    """The declared Content-Length (when it is a number) and Content-Type, in one pass."""
    length: int | None = None
    content_type = ""
    for name, value in headers:
        if name == b"content-length":
            if value.isdigit():
                length = int(value)
        elif name == b"content-type":
            content_type = value.decode("latin-1")
    return length, content_type
