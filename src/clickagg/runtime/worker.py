"""The worker process (``clickagg worker``, or supervised by ``clickagg serve``): its main
loop over every partition's worker (``clickagg.worker.stream``), plus the query server of
the embedded store and its background compaction.

It runs in a process of its own so stream work uses the second core while the API process
handles HTTP. It is started (and restarted after a crash) by the API process.

A full disk is not a crash. Ingest stops short of it (``clickagg.disk``), but should a
round, an archive flush, a snapshot or a compaction still fail for want of space, the
worker does not exit, which the supervisor would count towards its crash-loop limit:
snapshots are skipped (they only shorten a replay), compaction retries later (the deltas
wait, queries stay exact), and a failed round or flush ends the *session*: its writers
stop as a crash would stop them, its query server answers on, and after a backoff
(:class:`DiskBackoff`) a new session reopens every role and recovers exactly as a
restarted process does. Nothing is lost or counted twice: the store committed the round
whole or not at all (DuckDB rolls a failed COMMIT back; a COMMIT whose checkpoint then
failed is durable and invalidates the database, which the new session reopens), the
archive publishes only whole flushes, and recovery re-derives everything past the
offsets they hold from the log.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from clickagg.archive.base import ArchiveWriter
from clickagg.clock import Clock, SystemClock
from clickagg.config import Settings
from clickagg.core.adkeyed import AdRules, ad_records
from clickagg.core.keyed import keyed_records
from clickagg.core.rules.loading import RulesWatcher
from clickagg.core.visitor import visitor_records
from clickagg.core.windows import HOUR_MS, window_start
from clickagg.disk import Space, is_out_of_space, reserve_for, space
from clickagg.keyed.stage1 import (
    KeyedAppender,
    KeyedAppenders,
    newest_counted_ms,
    retire_marker,
)
from clickagg.keyed.stage2 import (
    AD,
    FAMILIES,
    IP,
    VISITOR,
    Family,
    KeyedStage,
    counter_key,
    keyed_status,
    step_stages,
)
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.query.base import KeyedStatus
from clickagg.realtime.base import RealtimeCounters
from clickagg.realtime.feed import FeedServer, PublishingCounters, Snapshot
from clickagg.realtime.memory import InMemoryCounters
from clickagg.realtime.recent import RECENT_HOURS_MS, RECENT_SPAN_MS
from clickagg.registry import AdRegistry
from clickagg.runtime import roles
from clickagg.store.base import AggregateStore
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.store.rpc import QueryServer
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker, rules_watcher, step_all

log = logging.getLogger(__name__)
IDLE_SLEEP_S = 0.002
SMALL_ROUND_EVENTS = 1_000
SMALL_ROUND_PAUSE_S = 0.1
QUERY_SWITCH_INTERVAL_S = 0.0005
OUT_OF_SPACE_FIRST_WAIT_S = 0.5
OUT_OF_SPACE_MAX_WAIT_S = 10.0
COMPACT_RETRY_FIRST_S = 1.0
COMPACT_RETRY_MAX_S = 30.0


def run(settings: Settings, max_idle_loops: int | None = None) -> None:
    """Recover every partition, serve queries, then process micro-batches until SIGTERM
    (or until the API process is gone, or ``max_idle_loops`` idle loops in a row).

    A full disk does not end it: a session that fails for want of space is dropped as a
    crash would drop it, and after a wait (:class:`DiskBackoff`) a new one reopens every
    role and recovers, in this process, so the supervisor does not count it as a crash."""
    # The stream thread holds the GIL in long stretches of Python (sketch updates, polars
    # glue); a query needs it a dozen times, each a wait of up to the switch interval
    # (5 ms by default). A shorter interval lets queries through at a small cost to the
    # stream (see BENCHMARKS.md, queries under ingest).
    sys.setswitchinterval(QUERY_SWITCH_INTERVAL_S)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s worker %(levelname)s %(message)s"
    )
    stopping = False
    parent = _parent_pid()

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def should_stop() -> bool:
        nonlocal stopping
        if not stopping and os.getppid() != parent:
            log.warning("the API process is gone: stopping")
            stopping = True
        return stopping

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backoff = DiskBackoff(settings)
    while not should_stop():
        try:
            session = _Session(settings)
        except Exception as exc:
            if not is_out_of_space(exc):
                raise
            backoff.wait(exc, should_stop)
            continue
        try:
            session.loop(should_stop, backoff, max_idle_loops)
        except Exception as exc:
            session.stop_writing()
            if not is_out_of_space(exc):
                _close_quietly(session.close, "worker session")
                raise
            backoff.wait(exc, should_stop)  # the session's query server still answers
            _close_quietly(session.close, "worker session")
        else:
            session.close_gracefully()
            return


class _Session:
    """Everything one start of the worker opens: the log reader, the store, the archive
    writer, every partition's worker (recovered from the store, the archive, a snapshot and
    the log), the real-time counters (refilled from the store), the query server and the
    compactor. A new session after a failed one is what a restarted process would be."""

    def __init__(self, settings: Settings) -> None:
        with contextlib.ExitStack() as undo:  # whatever was opened, should a step fail
            clock = SystemClock()
            self.reader = roles.log_reader(settings)
            undo.callback(self.reader.close)
            self.store = roles.commit_store(settings)
            undo.callback(self.store.close)
            snapshots = SnapshotStore(settings.snapshot_dir)
            self.archive = roles.archive_writer(settings)
            undo.callback(_close_quietly, self.archive.close, "archive writer")
            self.price_registry = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file)
            self._prices_version = self.price_registry.version()
            cpc_micros = self.price_registry.book()
            keyed: KeyedAppenders | None = None
            self._keyed_closers: list[Callable[[], None]] = []
            self.keyed_stages: list[KeyedStage] = []
            # Per family: its directory under keyed/ (the IP family's is keyed/ itself, as
            # before the visitor family), its keyed log writer and reader.
            family_dirs = {
                IP: settings.keyed_dir,
                VISITOR: settings.keyed_dir / "visitor",
                AD: settings.keyed_dir / "ad",
            }
            keyed_logs: dict[Family, tuple[SegmentLogWriter, SegmentLogReader]] = {}
            watcher = rules_watcher(settings) if settings.keyed_stage else None
            if watcher is not None:
                appenders = []
                committed = self.store.committed_offsets()
                # Where a keyed log that starts now is complete from (stage1's marks).
                newest = newest_counted_ms(self.store)
                for family, directory in family_dirs.items():
                    # No age or size to wait for: stage 2 trims whole segments below what
                    # a recovery could need (its snapshots and the corrections' end).
                    keyed_writer = SegmentLogWriter(
                        directory / "log",
                        settings.keyed_partitions,
                        segment_bytes=settings.segment_bytes,
                        retention_ms=0,
                        retention_bytes=0,
                    )
                    undo.callback(keyed_writer.close)
                    appenders.append(
                        KeyedAppender(
                            keyed_writer,
                            directory / "stage1.json",
                            committed,
                            records={IP: keyed_records, VISITOR: visitor_records}.get(
                                family, ad_records
                            ),
                            clicks_only=family is not AD,
                            active=_ad_rules_in_force(watcher) if family is AD else None,
                            newest_event_ms=newest,
                        )
                    )
                    keyed_reader = SegmentLogReader(directory / "log")
                    undo.callback(keyed_reader.close)
                    self._keyed_closers += [keyed_reader.close, keyed_writer.close]
                    keyed_logs[family] = (keyed_writer, keyed_reader)
                keyed = KeyedAppenders(appenders)
            else:
                for directory in family_dirs.values():
                    retire_marker(directory / "stage1.json")
            self.workers = [
                PartitionWorker(
                    p,
                    reader=self.reader,
                    store=self.store,
                    archive=self.archive,
                    snapshots=snapshots,
                    settings=settings,
                    clock=clock,
                    cpc_micros=cpc_micros,
                    keyed=keyed,
                )
                for p in range(self.reader.partitions)
            ]
            self.counters: RealtimeCounters = refill_counters(
                roles.counters(settings), self.store, now_ms=clock.now_ms()
            )
            self.feed: FeedServer | None = None
            # Counters kept in this process also feed every round to the API process,
            # which answers recent queries itself; a shared backend is read directly.
            if isinstance(self.counters, InMemoryCounters):
                self.counters = PublishingCounters(
                    self.counters,
                    snapshot=functools.partial(
                        feed_snapshot, self.store, clock, hours_ms=settings.replica_hours_ms
                    ),
                )
                self.feed = FeedServer(settings.feed_socket, self.counters)
            self.corrections: ArchiveWriter | None = None
            status: Callable[[], KeyedStatus] | None = None
            if keyed is not None and watcher is not None:
                # One corrections archive for every family (the visitor family's keyed
                # partitions are numbered from 1024 in it, the ad family's from 2048), one
                # rules watcher.
                self.corrections = roles.correction_writer(settings)
                undo.callback(_close_quietly, self.corrections.close, "corrections writer")
                for family, (keyed_writer, keyed_reader) in keyed_logs.items():
                    self.keyed_stages.append(
                        KeyedStage(
                            keyed_reader,
                            self.store,
                            rules=watcher,
                            clock=clock,
                            allowed_lateness_ms=settings.allowed_lateness_ms,
                            batch_records=settings.micro_batch_events,
                            counters=self.counters,
                            corrections=self.corrections,
                            snapshots=SnapshotStore(family_dirs[family] / "snapshots"),
                            trim=functools.partial(_trim_keyed_log, keyed_writer, clock),
                            family=family,
                        )
                    )
                status = functools.partial(
                    keyed_status,
                    keyed_logs[IP][1],
                    self.store,
                    keyed_logs[VISITOR][1],
                    keyed_logs[AD][1],
                )
            self.server = QueryServer(
                settings.rpc_socket, self.store, self.counters, keyed_status=status
            )
            self.server.start()
            undo.callback(self.server.stop)
            if self.feed is not None:
                self.feed.start()
                undo.callback(self.feed.stop)
            self.compactor = Compactor(
                self.store,
                interval_ms=settings.compact_interval_ms,
                max_delta_rows=settings.compact_delta_rows,
            )
            self.compactor.start()
            undo.pop_all()
        log.info("ready: %d partitions", len(self.workers))

    def loop(
        self, should_stop: Callable[[], bool], backoff: DiskBackoff, max_idle_loops: int | None
    ) -> None:
        idle_loops = 0
        while not should_stop():
            if self.compactor.out_of_space.is_set():
                # A compaction whose COMMIT was durable but whose checkpoint then failed
                # invalidated the store: a quiet stream would never notice (queries would
                # fail until the next round), so look now; this raises if so.
                self.compactor.out_of_space.clear()
                self.store.committed_offsets()
            self._reload_prices()
            processed = step_all(self.workers, self.store, self.counters)
            # every keyed family's commits in one store transaction
            processed += step_stages(self.keyed_stages)
            if processed:
                backoff.succeeded()
            if processed >= SMALL_ROUND_EVENTS:
                idle_loops = 0
                continue
            if processed:
                # A transaction costs about the same for 10 events as for 10,000: let a
                # trickle gather for a moment rather than commit it event by event.
                idle_loops = 0
                time.sleep(SMALL_ROUND_PAUSE_S)
                continue
            self.archive.maybe_flush()  # a quiet stream still publishes what it decided
            for stage in self.keyed_stages:
                stage.maybe_flush()
            idle_loops += 1
            if max_idle_loops is not None and idle_loops >= max_idle_loops:
                return
            time.sleep(IDLE_SLEEP_S)

    def _reload_prices(self) -> None:
        """A price set with ``clickagg ads set`` applies without a restart: from the next
        round on (it is effective from now or later, so no counted click is repriced)."""
        version = self.price_registry.version()
        if version != self._prices_version:
            self._prices_version = version
            book = self.price_registry.book()
            for worker in self.workers:
                worker.set_prices(book)
            log.info("prices reloaded: %d entries", book.table.height)

    def stop_writing(self) -> None:
        """After a failure: stop the compactor and the archive writer (it publishes what it
        holds if it can: decisions of committed rounds; a new writer resumes from what is
        published, and recovery re-derives the rest). Queries are still answered."""
        self.compactor.stop()
        _close_quietly(self.archive.close, "archive writer")
        if self.corrections is not None:
            _close_quietly(self.corrections.close, "corrections writer")

    def close(self) -> None:
        """After :meth:`stop_writing`: close what is left."""
        try:
            if self.feed is not None:
                self.feed.stop()
            self.server.stop()
        finally:
            try:
                self.store.close()
            finally:
                try:
                    self.reader.close()
                finally:
                    for close in self._keyed_closers:
                        _close_quietly(close, "keyed log")

    def close_gracefully(self) -> None:
        """Snapshot every partition, publish what the archive holds, close everything."""
        try:
            for worker in self.workers:
                worker.snapshot_now()
        finally:
            self.compactor.stop()
            try:
                self.archive.close()
                if self.corrections is not None:
                    self.corrections.close()
            except Exception as exc:
                if not is_out_of_space(exc):
                    raise
                log.warning(
                    "stopping with decisions unpublished (the next start re-derives "
                    "them from the log): %s",
                    exc,
                )
            finally:
                self.close()
        log.info("stopped")


def _trim_keyed_log(writer: SegmentLogWriter, clock: Clock, partition: int, keep_from: int) -> int:
    return writer.apply_retention(partition, keep_from=keep_from, now_ms=clock.now_ms())


def _close_quietly(close: Callable[[], None], what: str) -> None:
    """Close something on the way out of a failure, whose own error must not hide it."""
    try:
        close()
    except Exception as exc:
        log.warning("closing the %s after a failure: %s", what, exc)


class DiskBackoff:
    """How the worker waits out a full disk instead of crash-looping.

    A session failed for want of space: wait ``first_s``, doubling up to ``max_s`` while
    failures go on, and end a wait early once free space on the data dir's filesystem has
    grown by the reserve (``clickagg.disk.reserve_for``, at least 1 MiB) since it began:
    space was freed, counting resumes at once. Logged once per episode (a warning at the
    first failure, one when a round commits again), not at every retry."""

    def __init__(
        self,
        settings: Settings,
        *,
        first_s: float = OUT_OF_SPACE_FIRST_WAIT_S,
        max_s: float = OUT_OF_SPACE_MAX_WAIT_S,
        poll_s: float = 0.25,
        look: Callable[[Path], Space] = space,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.first_s = first_s
        self.max_s = max_s
        self.poll_s = poll_s
        self._look = look
        self._now = now
        self._sleep = sleep
        self.failures = 0  # in the current episode
        self._since = 0.0

    def delay(self) -> float:
        """How long the next wait lasts at most."""
        return min(self.first_s * 2.0 ** min(self.failures, 32), self.max_s)

    def wait(self, exc: BaseException, should_stop: Callable[[], bool]) -> None:
        delay = self.delay()
        if self.failures == 0:
            self._since = self._now()
            log.warning(
                "out of disk space: counting paused, retrying in %.1f s (backing off to "
                "%.0f s, sooner once space is freed): %s: %s",
                delay,
                self.max_s,
                type(exc).__name__,
                exc,
            )
        else:
            log.debug("still out of disk space (retry %d in %.1f s): %s", self.failures, delay, exc)
        log.debug("what ran out of space", exc_info=exc)
        self.failures += 1
        before = self._free()
        deadline = self._now() + delay
        while not should_stop():
            left = deadline - self._now()
            if left <= 0:
                return
            self._sleep(min(self.poll_s, left))
            if before is not None and self._freed(before):
                log.info("disk space was freed: retrying now")
                return

    def succeeded(self) -> None:
        """A round committed: the episode, if any, is over."""
        if self.failures:
            log.warning(
                "disk space is back: counting resumed after %.0f s (%d retries)",
                self._now() - self._since,
                self.failures,
            )
            self.failures = 0

    def _free(self) -> Space | None:
        try:
            return self._look(self.settings.data_dir)
        except OSError:
            return None

    def _freed(self, before: Space) -> bool:
        now = self._free()
        if now is None:
            return False
        wanted = reserve_for(
            now.total_bytes,
            reserve_bytes=self.settings.disk_reserve_bytes,
            reserve_percent=self.settings.disk_reserve_percent,
        )
        return now.free_bytes >= before.free_bytes + max(wanted, 2**20)


def _parent_pid() -> int:
    """The pid of the process that started this one (the API process). Taken from
    multiprocessing, which recorded it when spawning: ``os.getppid()`` here would already
    be init's (or a subreaper's) if the API process died while this one was importing,
    and the worker would then never notice that it is orphaned."""
    started_by = multiprocessing.parent_process()
    if started_by is not None and started_by.pid is not None:
        return started_by.pid
    return os.getppid()


def _ad_rules_in_force(watcher: RulesWatcher) -> Callable[[], bool]:
    """Whether the ad family has a rule in force now (its records are every event with an
    ad: stage 1 appends them only then), decided once per rule set."""
    seen: list[tuple[object, bool]] = []

    def active() -> bool:
        ruleset = watcher.current()
        if not seen or seen[0][0] is not ruleset:
            seen[:] = [(ruleset, bool(AdRules.from_ruleset(ruleset).rules))]
        return seen[0][1]

    return active


def refill_counters(
    counters: RealtimeCounters, store: AggregateStore, *, now_ms: int
) -> RealtimeCounters:
    """Fill empty in-process counters with everything the store holds within their span,
    at the store's committed offsets: rounds committed before are then ignored as redos,
    and the next round continues exactly where the store is."""
    committed = store.committed_offsets()
    # The keyed stage's corrections are in the minute rows too: at its consumed offsets.
    keyed = {
        counter_key(k, family): progress.consumed_offset
        for family in FAMILIES
        for k, progress in store.keyed_progress(family.name).items()
    }
    counters.apply(
        store.minute_rows_since(now_ms - counters.retain_ms),
        {p: (0, offset) for p, offset in {**committed, **keyed}.items()},
    )
    return counters


def feed_snapshot(store: DuckDBStore, clock: Clock, *, hours_ms: int = RECENT_HOURS_MS) -> Snapshot:
    """Where an API process's replica starts: the store's minute rows of the recent span
    (from a whole hour on) and the hour rows of the ``hours_ms`` (the current hour
    included; 0: none) before them, with the offsets they hold (the keyed stage's
    corrections at its consumed offsets, under the counters' keys), read in one
    transaction."""
    now = clock.now_ms()
    since_ms = window_start(now - RECENT_SPAN_MS, HOUR_MS)
    hours_since_ms = None
    if hours_ms > 0:
        hours_since_ms = min(window_start(now, HOUR_MS) - hours_ms + HOUR_MS, since_ms)
    recent = store.recent_rows(since_ms, hours_since_ms)
    offsets = dict(recent.committed)
    for family in FAMILIES:
        for k, offset in recent.keyed.get(family.name, {}).items():
            offsets[counter_key(k, family)] = offset
    return Snapshot(
        minutes=recent.minutes,
        offsets=offsets,
        since_ms=since_ms,
        hours=recent.hours,
        hours_since_ms=hours_since_ms,
    )


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
        self.out_of_space = threading.Event()  # set when a compaction failed for want of space
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compactor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.monotonic()
        failures = 0
        retry_at = 0.0
        while not self._stopping.wait(self.poll_s):
            rows = self.store.pending_delta_rows()
            now = time.monotonic()
            if rows == 0 or now < retry_at:
                continue
            if rows < self.max_delta_rows and now - last < self.interval_s:
                continue
            try:
                result = self.store.compact()
            except Exception as exc:  # the deltas stay and are merged later; queries are exact
                failures += 1
                # Not at every poll however many deltas wait: a full disk, say, would fail
                # every attempt, and each would write (and roll back) the whole merge.
                retry_at = time.monotonic() + min(
                    COMPACT_RETRY_FIRST_S * 2.0 ** min(failures - 1, 32), COMPACT_RETRY_MAX_S
                )
                if not is_out_of_space(exc):
                    log.exception("compaction failed")
                else:
                    self.out_of_space.set()
                    if failures == 1:
                        log.warning("compaction paused, out of disk space (deltas wait): %s", exc)
            else:
                if failures:
                    log.info("compaction resumed after %d failed attempts", failures)
                failures = 0
                self.compactions += 1
                log.debug(
                    "compacted %d delta rows up to round %d in %.0f ms",
                    result.delta_rows,
                    result.cut_seq,
                    result.seconds * 1000,
                )
            last = time.monotonic()
