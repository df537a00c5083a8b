"""Queries of the embedded store across processes: the :class:`QueryStore` adapter of the
embedded system.

DuckDB lets one process write a database file, and the worker process is that writer (its
commits carry the exactly-once offsets). The API process therefore asks the worker process
for query results over a Unix socket: a length-prefixed msgpack request ``[method, kwargs]``
answered by ``[ok, result]``. The server answers only the whitelisted read methods below;
:class:`RpcQueryStore` is the API process's typed client. Scale-out stores (PostgreSQL)
need none of this: an adapter of theirs implements :class:`QueryStore` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from clickagg.query.base import (
    AdTotals,
    AggregateRow,
    Dimension,
    Granularity,
    KeyedStatus,
    PartitionStatus,
    QueryError,
    QueryStore,
    RankBy,
    RollupLevel,
    StoreUnavailable,
    Totals,
)
from clickagg.realtime.base import RealtimeCounters
from clickagg.store.base import AggregateStore

__all__ = ["QueryError", "QueryServer", "RpcQueryStore", "StoreUnavailable"]

_LENGTH = struct.Struct("<I")
# The methods the server answers; anything else is an error. "window" is the real-time
# counters', "ping" the server's own, the rest the store's.
_METHODS = frozenset(
    {
        "ping",
        "aggregates",
        "totals",
        "top_ads",
        "rollup",
        "window",
        "partition_status",
        "keyed_status",
    }
)
_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(tuple[str, dict[str, Any]])
_reply_decoder = msgspec.msgpack.Decoder(tuple[bool, msgspec.Raw])
_error_decoder = msgspec.msgpack.Decoder(str)
_bool: msgspec.msgpack.Decoder[bool] = msgspec.msgpack.Decoder(bool)
_rows: msgspec.msgpack.Decoder[list[AggregateRow]] = msgspec.msgpack.Decoder(list[AggregateRow])
_totals: msgspec.msgpack.Decoder[Totals] = msgspec.msgpack.Decoder(Totals)
_ad_totals: msgspec.msgpack.Decoder[list[AdTotals]] = msgspec.msgpack.Decoder(list[AdTotals])
_statuses: msgspec.msgpack.Decoder[list[PartitionStatus]] = msgspec.msgpack.Decoder(
    list[PartitionStatus]
)
_keyed: msgspec.msgpack.Decoder[KeyedStatus] = msgspec.msgpack.Decoder(KeyedStatus)
NO_KEYED_STAGE = KeyedStatus(partitions=[], corrections_by_rule={})

_T = TypeVar("_T")
_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.opened(self.request)

    def finish(self) -> None:
        self.server.closed(self.request)
        super().finish()

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

    def __init__(
        self,
        path: str,
        store: AggregateStore,
        counters: RealtimeCounters,
        keyed_status: Callable[[], KeyedStatus] | None,
    ) -> None:
        self.store = store
        self.counters = counters
        self.keyed_status = keyed_status
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        super().__init__(path, _Handler)

    def opened(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)
            closing = self._closing
        if closing:  # accepted while the server was being stopped
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def closed(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """End every client's connection: a client of a stopped server then reconnects
        (to the next one, e.g. after the worker reopened its store in-process) instead of
        being answered by this one's handler threads, which outlive it."""
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def dispatch(self, body: bytes) -> bytes:
        try:
            method, kwargs = _request_decoder.decode(body)
            if method not in _METHODS:
                raise QueryError(f"unknown method {method!r}")
            if method == "ping":
                result: object = True
            elif method == "window":
                result = self.counters.window(**kwargs)
            elif method == "keyed_status":
                result = NO_KEYED_STAGE if self.keyed_status is None else self.keyed_status()
            else:
                result = getattr(self.store, method)(**kwargs)
            return _encoder.encode((True, result))
        except Exception as exc:
            return _encoder.encode((False, f"{type(exc).__name__}: {exc}"))


class QueryServer:
    """Serves a store's read methods and the real-time counters on a Unix socket from a
    background thread."""

    def __init__(
        self,
        path: Path,
        store: AggregateStore,
        counters: RealtimeCounters,
        *,
        keyed_status: Callable[[], KeyedStatus] | None = None,
    ) -> None:
        """``keyed_status``: the keyed stage's progress, where it runs."""
        path.unlink(missing_ok=True)
        self.path = path
        self._server = _Server(str(path), store, counters, keyed_status)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="query-server", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self.path.unlink(missing_ok=True)


class RpcQueryStore(QueryStore):
    """:class:`QueryStore` over :class:`QueryServer`, with a small pool of connections.

    Raises :class:`StoreUnavailable` when no server answers (none listening, the connection
    broke, timeout) and :class:`QueryError` when the server answered with an error."""

    def __init__(self, path: Path, *, pool_size: int = 8, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(pool_size)

    async def aggregates(
        self,
        *,
        ad_id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        kwargs = {"ad_id": ad_id, "start_ms": start_ms, "end_ms": end_ms}
        return await self._call(
            "aggregates", kwargs | {"granularity": granularity, "group_by": group_by}, _rows
        )

    async def totals(
        self, *, ad_id: str, start_ms: int, end_ms: int, unique_users: bool = True
    ) -> Totals:
        kwargs = {"ad_id": ad_id, "start_ms": start_ms, "end_ms": end_ms}
        return await self._call("totals", kwargs | {"unique_users": unique_users}, _totals)

    async def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        kwargs = {"ad_id": ad_id, "start_ms": start_ms, "end_ms": end_ms}
        return await self._call("window", kwargs, _totals)

    async def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        kwargs = {"start_ms": start_ms, "end_ms": end_ms, "by": by, "limit": limit}
        return await self._call("top_ads", kwargs | {"advertiser_id": advertiser_id}, _ad_totals)

    async def rollup(
        self,
        *,
        level: RollupLevel,
        id: str,
        start_ms: int,
        end_ms: int,
        granularity: Granularity,
    ) -> list[AggregateRow]:
        kwargs = {"level": level, "id": id, "start_ms": start_ms, "end_ms": end_ms}
        return await self._call("rollup", kwargs | {"granularity": granularity}, _rows)

    async def partition_status(self) -> list[PartitionStatus]:
        return await self._call("partition_status", {}, _statuses)

    async def keyed_status(self) -> KeyedStatus:
        return await self._call("keyed_status", {}, _keyed)

    async def ping(self) -> bool:
        try:
            return await self._call("ping", {}, _bool)
        except (StoreUnavailable, QueryError):
            return False

    async def start(self) -> None:
        """Nothing to start: connections are opened on demand."""

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self._idle.clear()

    async def _call(
        self, method: str, kwargs: dict[str, Any], decoder: msgspec.msgpack.Decoder[_T]
    ) -> _T:
        """Ask the server; the answer decoded as ``decoder``'s type.

        A pooled connection may be stale: the worker process restarted since it was
        opened. Every method is a read, so a query that failed on one is dropped with the
        rest of the pool and asked once more on a fresh connection."""
        try:
            body = await self._request(method, kwargs)
        except (OSError, EOFError, TimeoutError) as exc:
            raise StoreUnavailable(
                f"the query server at {self.path} did not answer: {type(exc).__name__}: {exc}"
            ) from exc
        ok, result = _reply_decoder.decode(body)
        if not ok:
            raise QueryError(_error_decoder.decode(result))
        return decoder.decode(result)

    async def _request(self, method: str, kwargs: dict[str, Any]) -> bytes:
        """The server's raw answer to ``[method, kwargs]``; OSError (no server, or the
        connection broke) or TimeoutError when there is none."""
        payload = _encoder.encode((method, kwargs))
        request = _LENGTH.pack(len(payload)) + payload
        async with self._slots:
            if self._idle:
                try:
                    return await self._exchange(self._idle.pop(), request)
                except ConnectionError:
                    self._drop_idle()
            return await self._exchange(await asyncio.open_unix_connection(str(self.path)), request)

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
