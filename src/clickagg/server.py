"""``clickagg serve``: uvicorn around the app, which owns the log and the worker process."""

from __future__ import annotations

import uvicorn

from clickagg.compose import create_app
from clickagg.config import Settings


def run_server(settings: Settings, *, manage_worker: bool = True) -> None:
    """Serve on ``settings.host:settings.port``. The worker process the app starts receives
    this same ``Settings`` object (pickled), so it never resolves settings on its own;
    ``manage_worker=False`` leaves the workers to ``clickagg worker``."""
    app = create_app(settings, manage_worker=manage_worker)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
