"""The roles' registry: every adapter by name, and the one place that opens them from settings.

Each role is a Protocol in its package's ``base`` module; the settings name the adapter of
each (``log_backend``, ``store_backend``, ``archive_backend``, ``counters_backend``). A new
adapter (NATS JetStream for the log, PostgreSQL for the store, Redis for the counters)
registers here, and the contract suites in ``tests/contracts`` run over every entry of
these tables, so it meets the same contract as the embedded default on its first test run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final, TypedDict, TypeVar

from clickagg.archive.base import ArchiveReader, ArchiveWriter, CorrectionReader
from clickagg.archive.corrections import ParquetCorrectionReader, corrections_writer
from clickagg.archive.parquet import ParquetArchiveReader, ParquetArchiveWriter
from clickagg.config import Settings
from clickagg.log.base import LogReader, LogWriter
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.query.base import QueryStore
from clickagg.query.replicated import ReplicatedQueryStore
from clickagg.realtime.base import RealtimeCounters
from clickagg.realtime.memory import InMemoryCounters
from clickagg.realtime.replica import RecentReplica
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.store.rpc import RpcQueryStore

T = TypeVar("T")


def _open_duckdb(settings: Settings, timeout_s: float = 30.0) -> DuckDBStore:
    """Open the store, waiting while a previous worker (being stopped) still holds it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return DuckDBStore(settings.store_path)
        except Exception as exc:  # duckdb.IOException: "Could not set lock on file"
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class ArchiveWriterOptions(TypedDict):
    """What the settings say about flushing and compacting an archive, for both of its
    writers (decisions and corrections). A TypedDict, so that mypy checks these names
    against each writer's keyword arguments where they are unpacked."""

    flush_events: int
    flush_interval_ms: int
    compact_files: int
    compact_after_ms: int
    compact_grace_ms: int


def archive_writer_options(settings: Settings) -> ArchiveWriterOptions:
    return ArchiveWriterOptions(
        flush_events=settings.archive_flush_events,
        flush_interval_ms=settings.archive_flush_interval_ms,
        compact_files=settings.archive_compact_files,
        compact_after_ms=settings.archive_compact_after_ms,
        compact_grace_ms=settings.archive_compact_grace_ms,
    )


def _parquet_writer(settings: Settings) -> ParquetArchiveWriter:
    return ParquetArchiveWriter(settings.archive_dir, **archive_writer_options(settings))


LOG_WRITERS: Final[Mapping[str, Callable[[Settings], LogWriter]]] = {
    "segments": SegmentLogWriter.for_settings,
}
LOG_READERS: Final[Mapping[str, Callable[[Settings], LogReader]]] = {
    "segments": lambda settings: SegmentLogReader(settings.log_dir),
}
# The commit sink of the round (aggregate deltas + offsets, one transaction), which the
# embedded worker also queries; scale-out stores will split the two.
COMMIT_STORES: Final[Mapping[str, Callable[[Settings], DuckDBStore]]] = {
    "duckdb": _open_duckdb,
}
QUERY_STORES: Final[Mapping[str, Callable[[Settings], QueryStore]]] = {
    # the embedded store is read through the worker process that owns its file; recent
    # minutes from this process's replica of them, fed by the worker
    "duckdb": lambda settings: ReplicatedQueryStore(
        RpcQueryStore(settings.rpc_socket),
        RecentReplica(settings.feed_socket, hours_span_ms=settings.replica_hours_ms),
    ),
}
COUNTERS: Final[Mapping[str, Callable[[Settings], RealtimeCounters]]] = {
    # in the worker process, which also feeds them to the API process (runtime/worker.py)
    "memory": lambda settings: InMemoryCounters(),
}
ARCHIVE_WRITERS: Final[Mapping[str, Callable[[Settings], ArchiveWriter]]] = {
    "parquet": _parquet_writer,
}
ARCHIVE_READERS: Final[Mapping[str, Callable[[Settings], ArchiveReader]]] = {
    "parquet": lambda settings: ParquetArchiveReader(settings.archive_dir),
}
# The keyed stage's corrections, kept by the archive's backend.
CORRECTION_WRITERS: Final[Mapping[str, Callable[[Settings], ArchiveWriter]]] = {
    "parquet": lambda settings: corrections_writer(
        settings.corrections_dir, **archive_writer_options(settings)
    ),
}
CORRECTION_READERS: Final[Mapping[str, Callable[[Settings], CorrectionReader]]] = {
    "parquet": lambda settings: ParquetCorrectionReader(settings.corrections_dir),
}


def _pick(
    table: Mapping[str, Callable[[Settings], T]], role: str, name: str
) -> Callable[[Settings], T]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(
            f"unknown {role} backend {name!r}: choose one of {', '.join(sorted(table))}"
        ) from None


def log_writer(settings: Settings) -> LogWriter:
    return _pick(LOG_WRITERS, "log", settings.log_backend)(settings)


def log_reader(settings: Settings) -> LogReader:
    return _pick(LOG_READERS, "log", settings.log_backend)(settings)


def commit_store(settings: Settings) -> DuckDBStore:
    return _pick(COMMIT_STORES, "store", settings.store_backend)(settings)


def query_store(settings: Settings) -> QueryStore:
    return _pick(QUERY_STORES, "store", settings.store_backend)(settings)


def counters(settings: Settings) -> RealtimeCounters:
    return _pick(COUNTERS, "counters", settings.counters_backend)(settings)


def archive_writer(settings: Settings) -> ArchiveWriter:
    return _pick(ARCHIVE_WRITERS, "archive", settings.archive_backend)(settings)


def archive_reader(settings: Settings) -> ArchiveReader:
    return _pick(ARCHIVE_READERS, "archive", settings.archive_backend)(settings)


def correction_writer(settings: Settings) -> ArchiveWriter:
    return _pick(CORRECTION_WRITERS, "archive", settings.archive_backend)(settings)


def correction_reader(settings: Settings) -> CorrectionReader:
    return _pick(CORRECTION_READERS, "archive", settings.archive_backend)(settings)


def check(settings: Settings) -> None:
    """Raise ValueError naming the first backend the settings name that does not exist."""
    for table, role, name in (
        (LOG_WRITERS, "log", settings.log_backend),
        (COMMIT_STORES, "store", settings.store_backend),
        (COUNTERS, "counters", settings.counters_backend),
        (ARCHIVE_WRITERS, "archive", settings.archive_backend),
    ):
        _pick(table, role, name)
