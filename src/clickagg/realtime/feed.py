"""The worker's feed of committed minute rows: every round its counters apply, published
on a Unix socket, so that the API process keeps the recent minutes of every ad in memory
(``clickagg.realtime.recent``) and answers recent queries itself.

Why: a sliding window is a sum over at most ~60 cells, microseconds of work, and a minute
query of the last hour little more; asked of the worker process they waited for the
stream's GIL (tens of ms at p99 under ingest, BENCHMARKS.md "QueryStore split") and for a
DuckDB scan of every ad's recent rows.

Exactly once, by the counters' fence (:func:`clickagg.realtime.memory.advance`): a
subscriber first receives a snapshot, the store's minute rows from ``since_ms`` on with
the offsets they hold everything up to (read in one transaction), then every round applied
after it registered, in order, with its offset ranges. The replica applies the snapshot as
``{partition: (0, offset)}`` and each round as it came: a redo is ignored, a gap refused,
and a refused round makes it start over from a new snapshot. A subscriber that falls more
than ``max_queued`` rounds behind is cut off and starts over too: the worker never waits
for a reader.

A snapshot also carries the store's hour rows of the day before its minutes (from
``hours_since_ms`` to ``since_ms``, whole hours), so the replica keeps every ad's hours of
the last day too: it adds each round's minute rows to their hours as well.

Wire format: frames of a little-endian uint32 length and a msgpack array
``[kind, [[partition, from, to], ...], since_ms, minutes, hours_since_ms, hours]``,
``kind`` being ``"snapshot"`` or ``"round"``, ``minutes`` and ``hours`` Arrow IPC streams
of ``FEED_SCHEMA`` (an hour row's ``minute_ms`` holds its hour; a round has no hours:
empty bytes, and ``hours_since_ms`` -1). A frame is readable with msgpack and pyarrow
alone.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgspec
import pyarrow as pa

from clickagg.realtime.memory import InMemoryCounters
from clickagg.store.base import Totals

log = logging.getLogger(__name__)

LENGTH = struct.Struct("<I")
SNAPSHOT, ROUND = "snapshot", "round"
Ranges = dict[int, tuple[int, int]]
# A frame's columns: a minute row's key, sums and unique-user sketch (``MINUTE_SCHEMA``'s).
FEED_SCHEMA = pa.schema(
    [
        pa.field("ad_id", pa.string()),
        pa.field("minute_ms", pa.int64()),
        pa.field("clicks", pa.int64()),
        pa.field("impressions", pa.int64()),
        pa.field("spend_micros", pa.int64()),
        pa.field("invalid_clicks", pa.int64()),
        pa.field("users", pa.binary()),
    ]
)


@dataclass(frozen=True)
class Snapshot:
    """Where a subscriber starts: minute rows from ``since_ms`` on, the offsets they hold
    everything up to (the counters' keys) and, optionally, the hour rows of the hours in
    [``hours_since_ms``, ``since_ms``)."""

    minutes: pa.Table
    offsets: dict[int, int]
    since_ms: int
    hours: pa.Table | None = None
    hours_since_ms: int | None = None


class Frame(NamedTuple):
    kind: str
    ranges: Ranges
    since_ms: int
    rows: pa.Table
    hours_since_ms: int | None
    hours: pa.Table | None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[str, list[tuple[int, int, int]], int, bytes, int, bytes])


def _feed_columns(table: pa.Table) -> pa.Table:
    if "users" not in table.schema.names:  # sums only (e.g. a refill): no sketch
        table = table.append_column("users", pa.nulls(table.num_rows, pa.binary()))
    return table.select(FEED_SCHEMA.names).cast(FEED_SCHEMA)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    rows = _feed_columns(table)
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return bytes(sink.getvalue().to_pybytes())


def _table(ipc: bytes) -> pa.Table:
    with pa.ipc.open_stream(ipc) as reader:
        return reader.read_all()


def encode_frame(
    kind: str,
    ranges: Mapping[int, tuple[int, int]],
    table: pa.Table,
    since_ms: int = 0,
    *,
    hours: pa.Table | None = None,
    hours_since_ms: int | None = None,
) -> bytes:
    listed = [[p, lo, hi] for p, (lo, hi) in sorted(ranges.items())]
    with_hours = hours is not None and hours_since_ms is not None
    body = _encoder.encode(
        (
            kind,
            listed,
            since_ms,
            _ipc(table),
            hours_since_ms if with_hours else -1,
            _ipc(hours) if with_hours else b"",
        )
    )
    return LENGTH.pack(len(body)) + body


def decode_frame(body: bytes) -> Frame:
    """A frame's body (without its length prefix)."""
    kind, ranges, since_ms, ipc, hours_since_ms, hours_ipc = _decoder.decode(body)
    with_hours = hours_since_ms >= 0
    return Frame(
        kind=kind,
        ranges={p: (lo, hi) for p, lo, hi in ranges},
        since_ms=since_ms,
        rows=_table(ipc),
        hours_since_ms=hours_since_ms if with_hours else None,
        hours=_table(hours_ipc) if with_hours else None,
    )


@dataclass(eq=False)
class Subscriber:
    """One reader's queue of frames; ``cut_off`` once it fell too far behind."""

    frames: queue.Queue[bytes] = field(default_factory=queue.Queue)
    cut_off: threading.Event = field(default_factory=threading.Event)


class PublishingCounters:
    """The worker's :class:`RealtimeCounters`: in-process counters that also hand every
    round they apply to their subscribers (a frame encoded once per round, only while
    someone subscribes).

    ``snapshot`` reads the committed state a new subscriber starts from (the store's minute
    rows and offsets, in one transaction). It is read after the subscriber is registered:
    a round committed before the read is in the snapshot, and if it is applied after the
    registration its frame also reaches the subscriber, as a redo the fence ignores; a round
    committed after the read is applied after it, so its frame reaches the subscriber."""

    def __init__(
        self,
        inner: InMemoryCounters,
        *,
        snapshot: Callable[[], Snapshot],
        max_queued: int = 4096,
    ) -> None:
        self.inner = inner
        self.retain_ms = inner.retain_ms
        self.snapshot = snapshot
        self.max_queued = max_queued
        self._lock = threading.Lock()  # the subscribers set, and the order of the frames
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
        """The snapshot frame and a subscriber that receives every round applied after
        it was registered (see the class docstring for why that order is exact)."""
        subscriber = Subscriber()
        with self._lock:
            self._subscribers.add(subscriber)
        try:
            snap = self.snapshot()
        except BaseException:
            self.unsubscribe(subscriber)
            raise
        ranges = {p: (0, o) for p, o in snap.offsets.items()}
        frame = encode_frame(
            SNAPSHOT,
            ranges,
            snap.minutes,
            snap.since_ms,
            hours=snap.hours,
            hours_since_ms=snap.hours_since_ms,
        )
        return frame, subscriber

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
