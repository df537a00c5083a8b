"""``clickagg serve``: uvicorn around the app, which owns the log and the worker process.

Connections are guarded by a small subclass of uvicorn's httptools protocol, because
uvicorn (0.54) bounds neither how long a request's head may take (no timer runs before a
connection's first request, and any byte cancels the keep-alive timer, so a client
trickling its headers keeps its socket for ever) nor, usefully, how many connections are
open (``limit_concurrency`` answers a plain-text 503). ``GuardedProtocol`` adds:

* a header timeout: the request line and headers must arrive in full within
  ``header_timeout`` of the connection opening, or of the first byte of a kept-alive
  connection's next request; else the connection is closed (after the response in flight,
  if a request is being answered);
* a body timeout: a request's body must arrive in full within ``body_timeout`` of its
  headers; else it is answered ``408`` (the API's JSON error shape) and the connection
  closed, or, if an answer was already sent or begun (a ``413`` sent before the body, say),
  the connection is just closed. Without it a client that declares a body and trickles
  it (every byte also cancels the keep-alive timer) or withholds it keeps its socket and
  its request task for ever;
* the keep-alive timeout from the settings (uvicorn's parameter takes whole seconds);
* a connection cap: a request arriving while more than ``max_connections`` connections
  are open is answered ``503`` with the API's JSON error shape and ``Retry-After``, and its
  connection is closed. Connections that never finish a head are closed by the header
  timeout, so beyond the cap only those opened within one header timeout stay open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any, ClassVar

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from clickagg.api.health import ConnectionRefusals
from clickagg.compose import create_app
from clickagg.config import Settings

log = logging.getLogger(__name__)

# Files the API process keeps open besides connections (log segments, archive reads, ...).
OTHER_FILES = 1024
RETRY_AFTER_S = 1
WARN_EVERY_S = 10.0
_BUSY_BODY = json.dumps(
    {"error": "busy", "detail": "too many open connections; retry on a new connection"}
).encode()
_TIMEOUT_BODY = json.dumps(
    {"error": "request timeout", "detail": "the request body did not arrive in time"}
).encode()
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)
_BUSY_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_BUSY_BODY)).encode()),
    (b"retry-after", str(RETRY_AFTER_S).encode()),
    (b"connection", b"close"),
]


async def too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    """The answer over the connection cap (an ASGI app that never reads the body)."""
    await send({"type": "http.response.start", "status": 503, "headers": _BUSY_HEADERS})
    await send({"type": "http.response.body", "body": _BUSY_BODY, "more_body": False})


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body timeouts, the settings' keep-alive
    timeout and a connection cap (see the module docstring). ``protocol_for`` makes a subclass
    with the settings' values."""

    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 30.0
    keep_alive_timeout_s: ClassVar[float] = 60.0
    max_connections: ClassVar[int] = 4096
    _warned_at: ClassVar[float] = float("-inf")
    _refused: ClassVar[int] = 0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn types it int (whole seconds) but only hands it to call_later
        self.timeout_keep_alive = self.keep_alive_timeout_s  # type: ignore[assignment]
        self._served_app = self.app
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        # True from the end of a request (or the connection's start) until the next
        # request's headers are complete: bytes arriving then belong to a head.
        self._awaiting_head = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that sends nothing is closed too

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._arm_head_timer()  # after the keep-alive wait: the next head's first bytes
        super().data_received(data)
        self._time_body()

    def on_message_begin(self) -> None:
        self._arm_head_timer()  # a pipelined head that began in the previous request's bytes
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        over = len(self.connections) > self.max_connections
        self.app = too_many_connections if over else self._served_app
        if over:
            self._warn_over_cap()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_head = True
        self._cancel_body_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _warn_over_cap(self) -> None:
        """Log refusals at most every ``WARN_EVERY_S``: a flood must not flood the log."""
        cls = GuardedProtocol
        cls._refused += 1
        ConnectionRefusals.total += 1
        now = self.loop.time()
        if now - cls._warned_at >= WARN_EVERY_S:
            log.warning(
                "%d connections open, over max_connections (%d): %d requests answered 503",
                len(self.connections),
                self.max_connections,
                cls._refused,
            )
            cls._warned_at, cls._refused = now, 0

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        else:  # a response is being sent: close once it is (as uvicorn's shutdown does)
            self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._time_body()  # a pipelined request's task may just have started

    def _time_body(self) -> None:
        """Time the body of the request being served if the bytes parsed so far end inside
        it: from the end of its headers, or, pipelined behind another request, from the
        start of its task (its bytes are not read before). A body that comes with its
        headers, as a single event's does, costs no timer."""
        if (
            self._body_timer is None
            and not self._awaiting_head
            and not self.pipeline
            and self.cycle is not None
            and not self.transport.is_closing()
        ):
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if not cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
            cycle.response_started = cycle.response_complete = True  # the app's answer is moot
        # The app, waiting for the body, is told the client is gone (as on a lost connection).
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedProtocol]:
    """``GuardedProtocol`` with the settings' timeouts and cap (uvicorn instantiates the
    class itself, so the values travel as class attributes)."""

    class Configured(GuardedProtocol):
        header_timeout_s = settings.header_timeout_ms / 1000
        body_timeout_s = settings.body_timeout_ms / 1000
        keep_alive_timeout_s = settings.keep_alive_timeout_ms / 1000
        max_connections = settings.max_connections

    return Configured


def fit_open_files(max_connections: int) -> None:
    """Raise this process's soft open-files limit (within the hard one) so the connection
    cap, not ``accept`` failing with EMFILE, is what refuses clients; warn if it cannot."""
    need = max_connections + OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open files limited to %d: fewer than max_connections (%d) + %d; "
            "connections beyond the limit fail instead of being answered 503",
            soft,
            max_connections,
            OTHER_FILES,
        )


def run_server(settings: Settings, *, manage_worker: bool = True) -> None:
    """Serve on ``settings.host:settings.port``. The worker process the app starts receives
    this same ``Settings`` object (pickled), so it never resolves settings on its own;
    ``manage_worker=False`` leaves the workers to ``clickagg worker``."""
    fit_open_files(settings.max_connections)
    app = create_app(settings, manage_worker=manage_worker)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="uvloop",
        http=protocol_for(settings),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
