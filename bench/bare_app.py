"""Baselines for bench/single_event.py, served by uvicorn with clickagg's options.

``app``: a bare ASGI app that reads the whole body and answers 202 with a small JSON body.
``starlette_app``: the same through a Starlette route (what clickagg's handlers sit on).

    .venv/bin/python -m uvicorn bare_app:app --app-dir bench --loop uvloop --http httptools
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_BODY = b'{"accepted":1}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    status = 202 if scope["method"] == "POST" else 200
    await send({"type": "http.response.start", "status": status, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


async def _accept(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"accepted": 1, "bytes": len(body)}, status_code=202)


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


starlette_app = Starlette(
    routes=[
        Route("/events/click", _accept, methods=["POST"]),
        Route("/healthz", _health, methods=["GET"]),
    ]
)
