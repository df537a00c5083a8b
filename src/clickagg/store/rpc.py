"""Queries of the embedded store across processes.

DuckDB lets one process write a database file, and the worker process is that writer (its
commits carry the exactly-once offsets). The API process therefore asks the worker process
for query results over a Unix socket: a length-prefixed msgpack request ``[method, kwargs]``
answered by ``[ok, result]``. Scale-out stores (PostgreSQL) need none of this: API
processes query them directly through the same AggregateStore methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any

import msgspec

from clickagg.realtime.base import RealtimeCounters
from clickagg.store.base import (
    AdTotals,
    AggregateRow,
    AggregateStore,
    PartitionStatus,
    Totals,
)

_LENGTH = struct.Struct("<I")
_RESULT_TYPES: dict[str, Any] = {
    "ping": bool,
    "aggregates": list[AggregateRow],
    "totals": Totals,
    "top_ads": list[AdTotals],
    "rollup": list[AggregateRow],
    "window": Totals,  # real-time counters
    "partition_status": list[PartitionStatus],
}
_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(tuple[str, dict[str, Any]])


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class QueryError(RuntimeError):
    """The store could not answer (the message says why)."""


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while True:
            header = self.rfile.read(_LENGTH.size)
            if len(header) < _LENGTH.size:
                return
            body = self.rfile.read(_LENGTH.unpack(header)[0])
            reply = self.server.dispatch(body)
            self.wfile.write(_LENGTH.pack(len(reply)) + reply)
            self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    # The default backlog (5) makes connects fail with EAGAIN under a burst of queries.
    request_queue_size = 256

    def __init__(self, path: str, store: AggregateStore, counters: RealtimeCounters) -> None:
        self.store = store
        self.counters = counters
        super().__init__(path, _Handler)

    def dispatch(self, body: bytes) -> bytes:
        try:
            method, kwargs = _request_decoder.decode(body)
            if method not in _RESULT_TYPES:
                raise QueryError(f"unknown method {method!r}")
            if method == "ping":
                result: object = True
            elif method == "window":
                result = self.counters.window(**kwargs)
            else:
                result = getattr(self.store, method)(**kwargs)
            return _encoder.encode((True, result))
        except Exception as exc:
            return _encoder.encode((False, f"{type(exc).__name__}: {exc}"))


class QueryServer:
    """Serves a store's read methods and the real-time counters on a Unix socket from a
    background thread."""

    def __init__(self, path: Path, store: AggregateStore, counters: RealtimeCounters) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self._server = _Server(str(path), store, counters)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="query-server", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


class QueryClient:
    """Async client of :class:`QueryServer`, with a small pool of connections."""

    def __init__(self, path: Path, *, pool_size: int = 8, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(pool_size)
        self._decoders = {
            name: msgspec.msgpack.Decoder(tuple[bool, result_type | str])  # type: ignore[valid-type]
            for name, result_type in _RESULT_TYPES.items()
        }

    async def call(self, method: str, **kwargs: Any) -> Any:
        """Ask the server; raise QueryError (it could not answer), OSError (no server, or
        the connection broke) or TimeoutError.

        A pooled connection may be stale: the worker process restarted since it was
        opened. Every method is a read, so a query that failed on one is dropped with the
        rest of the pool and asked once more on a fresh connection."""
        decoder = self._decoders.get(method)
        if decoder is None:
            raise QueryError(f"unknown method {method!r}")
        payload = _encoder.encode((method, kwargs))
        request = _LENGTH.pack(len(payload)) + payload
        async with self._slots:
            body: bytes | None = None
            if self._idle:
                try:
                    body = await self._exchange(self._idle.pop(), request)
                except ConnectionError:
                    self._drop_idle()
            if body is None:
                body = await self._exchange(
                    await asyncio.open_unix_connection(str(self.path)), request
                )
        ok, result = decoder.decode(body)
        if not ok:
            raise QueryError(str(result))
        return result

    async def _exchange(self, connection: _Connection, request: bytes) -> bytes:
        """One request and its answer; the connection goes back to the pool only after a
        whole answer. A connection the server closed raises ConnectionError (an OSError)."""
        reader, writer = connection
        try:
            writer.write(request)
            async with asyncio.timeout(self.timeout_s):
                header = await reader.readexactly(_LENGTH.size)
                body = await reader.readexactly(_LENGTH.unpack(header)[0])
        except BaseException as exc:
            writer.close()
            if isinstance(exc, asyncio.IncompleteReadError):
                raise ConnectionResetError(
                    f"the query server closed the connection ({len(exc.partial)} bytes "
                    "of an answer read)"
                ) from exc
            raise
        self._idle.append(connection)
        return body

    def _drop_idle(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def ping(self) -> bool:
        try:
            return bool(await self.call("ping"))
        except (OSError, TimeoutError, QueryError):
            return False

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self._idle.clear()
