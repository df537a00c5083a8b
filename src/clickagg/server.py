"""``clickagg serve``: uvicorn around the app, which owns the log and the worker process."""

from __future__ import annotations

import uvicorn

from clickagg.api.app import create_app
from clickagg.config import Settings


def run_server(settings: Settings, *, host: str, port: int, log_level: str = "warning") -> None:
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
