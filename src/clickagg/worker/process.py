"""The worker process: every partition's worker, plus the query server of the embedded store
and its background compaction.

It runs in a process of its own so stream work uses the second core while the API process
handles HTTP. It is started (and restarted after a crash) by the API process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from types import FrameType

from clickagg.clock import SystemClock
from clickagg.config import Settings
from clickagg.realtime.base import RealtimeCounters
from clickagg.registry import load_cpc_micros
from clickagg.runtime import roles
from clickagg.store.base import AggregateStore
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.store.rpc import QueryServer
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker, step_all

log = logging.getLogger(__name__)
IDLE_SLEEP_S = 0.002
SMALL_ROUND_EVENTS = 1_000
SMALL_ROUND_PAUSE_S = 0.1
QUERY_SWITCH_INTERVAL_S = 0.0005


def run(settings: Settings, max_idle_loops: int | None = None) -> None:
    """Recover every partition, serve queries, then process micro-batches until SIGTERM."""
    # The stream thread holds the GIL in long stretches of Python (sketch updates, polars
    # glue); a query needs it a dozen times, each a wait of up to the switch interval
    # (5 ms by default). A shorter interval lets queries through at a small cost to the
    # stream (see BENCHMARKS.md, queries under ingest).
    sys.setswitchinterval(QUERY_SWITCH_INTERVAL_S)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s worker %(levelname)s %(message)s"
    )
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent = _parent_pid()
    clock = SystemClock()
    reader = roles.log_reader(settings)
    store = roles.commit_store(settings)
    snapshots = SnapshotStore(settings.snapshot_dir)
    archive = roles.archive_writer(settings)
    cpc_micros = load_cpc_micros(settings.ads_file) if settings.ads_file else {}
    workers = [
        PartitionWorker(
            p,
            reader=reader,
            store=store,
            archive=archive,
            snapshots=snapshots,
            settings=settings,
            clock=clock,
            cpc_micros=cpc_micros,
        )
        for p in range(reader.partitions)
    ]
    counters = refill_counters(roles.counters(settings), store, now_ms=clock.now_ms())
    server = QueryServer(settings.rpc_socket, store, counters)
    server.start()
    compactor = Compactor(
        store,
        interval_ms=settings.compact_interval_ms,
        max_delta_rows=settings.compact_delta_rows,
    )
    compactor.start()
    log.info("ready: %d partitions", len(workers))
    idle_loops = 0
    try:
        while not stopping:
            if os.getppid() != parent:
                log.warning("the API process is gone: stopping")
                break
            processed = step_all(workers, store, counters)
            if processed >= SMALL_ROUND_EVENTS:
                idle_loops = 0
                continue
            if processed:
                # A transaction costs about the same for 10 events as for 10,000: let a
                # trickle gather for a moment rather than commit it event by event.
                idle_loops = 0
                time.sleep(SMALL_ROUND_PAUSE_S)
                continue
            archive.maybe_flush()  # a quiet stream still publishes what it decided
            idle_loops += 1
            if max_idle_loops is not None and idle_loops >= max_idle_loops:
                break
            time.sleep(IDLE_SLEEP_S)
        for worker in workers:
            worker.snapshot_now()
    finally:
        compactor.stop()
        archive.close()
        server.stop()
        store.close()
        reader.close()
        log.info("stopped")


def _parent_pid() -> int:
    """The pid of the process that started this one (the API process). Taken from
    multiprocessing, which recorded it when spawning: ``os.getppid()`` here would already
    be init's (or a subreaper's) if the API process died while this one was importing,
    and the worker would then never notice that it is orphaned."""
    started_by = multiprocessing.parent_process()
    if started_by is not None and started_by.pid is not None:
        return started_by.pid
    return os.getppid()


def refill_counters(
    counters: RealtimeCounters, store: AggregateStore, *, now_ms: int
) -> RealtimeCounters:
    """Fill empty in-process counters with everything the store holds within their span,
    at the store's committed offsets: rounds committed before are then ignored as redos,
    and the next round continues exactly where the store is."""
    committed = store.committed_offsets()
    counters.apply(
        store.minute_rows_since(now_ms - counters.retain_ms),
        {p: (0, offset) for p, offset in committed.items()},
    )
    return counters


class Compactor:
    """Merges the store's appended deltas into its base tables off the hot path: once
    ``interval_ms`` has passed since the last compaction and deltas wait, or as soon as
    ``max_delta_rows`` wait. It runs beside the commits, not between them (their
    transactions write disjoint rows); a crash mid-compaction leaves the deltas where they
    were, so queries stay exact either way."""

    def __init__(
        self,
        store: DuckDBStore,
        *,
        interval_ms: int,
        max_delta_rows: int,
        poll_s: float = 0.05,
    ) -> None:
        self.store = store
        self.interval_s = interval_ms / 1000
        self.max_delta_rows = max_delta_rows
        self.poll_s = poll_s
        self.compactions = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compactor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stopping.wait(self.poll_s):
            rows = self.store.pending_delta_rows()
            now = time.monotonic()
            if rows == 0 or (rows < self.max_delta_rows and now - last < self.interval_s):
                continue
            try:
                result = self.store.compact()
            except Exception:  # the deltas stay and are merged next time; queries are exact
                log.exception("compaction failed")
            else:
                self.compactions += 1
                log.debug(
                    "compacted %d delta rows up to round %d in %.0f ms",
                    result.delta_rows,
                    result.cut_seq,
                    result.seconds * 1000,
                )
            last = time.monotonic()
