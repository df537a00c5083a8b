"""The real-time counters' feed: the worker process publishes every round its counters
apply, so that the API process keeps a replica and answers sliding windows itself.

Why: a window query is a sum over at most ~60 cells, microseconds of work, but asked of the
worker process it waited for the stream's GIL (tens of ms at p99 under ingest, BENCHMARKS.md
"QueryStore split"). A replica in the API process answers it without crossing to the worker.

Exactly once, by the counters' own fence: a subscriber first receives a snapshot of every
cell with the offsets it holds everything up to (taken under the same lock that applies a
round, so no round is half in it), then every round applied after it, in order, with its
offset ranges. The replica applies the snapshot as ``{partition: (0, offset)}`` and each
round as it came; :meth:`InMemoryCounters.apply` ignores a redo and refuses a gap, and a
refused round makes the replica start over from a new snapshot. A subscriber that falls
more than ``max_queued`` rounds behind is cut off and starts over too: the worker never
waits for a reader.

Wire format on a Unix socket: frames of a little-endian uint32 length and a msgpack array
``[kind, [[partition, from, to], ...], arrow_ipc_stream]``, ``kind`` being ``"snapshot"``
or ``"round"``, the Arrow table's columns ``SUM_COLUMNS``. A frame is readable with msgpack
and pyarrow alone.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import socketserver
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pyarrow as pa

from clickagg.realtime.memory import SUM_COLUMNS, InMemoryCounters
from clickagg.store.base import Totals

log = logging.getLogger(__name__)

LENGTH = struct.Struct("<I")
SNAPSHOT, ROUND = "snapshot", "round"
Ranges = dict[int, tuple[int, int]]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[str, list[tuple[int, int, int]], bytes])


def encode_frame(kind: str, ranges: Mapping[int, tuple[int, int]], table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    sums = table.select(list(SUM_COLUMNS))
    with pa.ipc.new_stream(sink, sums.schema) as writer:
        writer.write_table(sums)
    listed = [[p, lo, hi] for p, (lo, hi) in sorted(ranges.items())]
    body = _encoder.encode((kind, listed, sink.getvalue().to_pybytes()))
    return LENGTH.pack(len(body)) + body


def decode_frame(body: bytes) -> tuple[str, Ranges, pa.Table]:
    """A frame's body (without its length prefix)."""
    kind, ranges, ipc = _decoder.decode(body)
    with pa.ipc.open_stream(ipc) as reader:
        table = reader.read_all()
    return kind, {p: (lo, hi) for p, lo, hi in ranges}, table


@dataclass(eq=False)
class Subscriber:
    """One reader's queue of frames; ``cut_off`` once it fell too far behind."""

    frames: queue.Queue[bytes] = field(default_factory=queue.Queue)
    cut_off: threading.Event = field(default_factory=threading.Event)


class PublishingCounters:
    """The worker's :class:`RealtimeCounters`: in-process counters that also hand every
    round they apply to their subscribers (a frame encoded once per round, only while
    someone subscribes)."""

    def __init__(self, inner: InMemoryCounters, *, max_queued: int = 4096) -> None:
        self.inner = inner
        self.retain_ms = inner.retain_ms
        self.max_queued = max_queued
        self._lock = threading.Lock()  # a round and a snapshot never interleave
        self._subscribers: set[Subscriber] = set()

    def apply(self, minute_deltas: pa.Table, offsets: Mapping[int, tuple[int, int]]) -> bool:
        with self._lock:
            applied = self.inner.apply(minute_deltas, offsets)
            if applied and self._subscribers:
                frame = encode_frame(ROUND, offsets, minute_deltas)
                for subscriber in list(self._subscribers):
                    if subscriber.frames.qsize() >= self.max_queued:
                        self._subscribers.discard(subscriber)
                        subscriber.cut_off.set()
                    else:
                        subscriber.frames.put(frame)
        return applied

    def applied_offsets(self) -> dict[int, int]:
        return self.inner.applied_offsets()

    def window(self, *, ad_id: str, start_ms: int, end_ms: int) -> Totals:
        return self.inner.window(ad_id=ad_id, start_ms=start_ms, end_ms=end_ms)

    def subscribe(self) -> tuple[bytes, Subscriber]:
        """The snapshot frame and a subscriber that receives every round applied after it."""
        with self._lock:
            table, offsets = self.inner.snapshot()
            subscriber = Subscriber()
            self._subscribers.add(subscriber)
        return encode_frame(SNAPSHOT, {p: (0, o) for p, o in offsets.items()}, table), subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        snapshot, subscriber = self.server.counters.subscribe()
        connection: socket.socket = self.request
        try:
            connection.sendall(snapshot)
            while not self.server.closing.is_set() and not subscriber.cut_off.is_set():
                try:
                    frame = subscriber.frames.get(timeout=0.2)
                except queue.Empty:
                    continue
                connection.sendall(frame)
        except OSError:
            pass  # the reader went away; it starts over with a new snapshot
        finally:
            self.server.counters.unsubscribe(subscriber)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, path: str, counters: PublishingCounters) -> None:
        self.counters = counters
        self.closing = threading.Event()
        super().__init__(path, _Handler)


class FeedServer:
    """Serves :class:`PublishingCounters`' feed on a Unix socket, a thread per subscriber
    (one per API process)."""

    def __init__(self, path: Path, counters: PublishingCounters) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self._server = _Server(str(path), counters)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="counters-feed", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and end every subscription: readers notice the closed socket and
        reconnect (to the next worker)."""
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError):
            self.path.unlink()
