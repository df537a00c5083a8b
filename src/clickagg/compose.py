"""The composition root: the HTTP app over the embedded backends.

``clickagg.api`` runs on the roles' Protocols only; this module picks their adapters: the
segment log, the worker process's query server (over its Unix socket, :class:`RpcQueryStore`)
and the Parquet archive.
"""

from __future__ import annotations

from starlette.types import ASGIApp

from clickagg.api.app import Backends, build_app
from clickagg.archive.parquet import ParquetArchiveReader
from clickagg.clock import Clock
from clickagg.config import Settings
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.query.base import QueryStore
from clickagg.runtime.supervisor import WorkerSupervisor
from clickagg.store.rpc import RpcQueryStore


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    manage_worker: bool = True,
    query_store: QueryStore | None = None,
) -> ASGIApp:
    """The app of ``clickagg serve``. ``query_store`` replaces the worker process's query
    server (the app closes it when it stops); ``manage_worker=False`` leaves starting
    workers to the caller."""

    def open_embedded(settings: Settings) -> Backends:
        return Backends(
            writer=SegmentLogWriter.for_settings(settings),
            reader=SegmentLogReader(settings.log_dir),
            queries=query_store or RpcQueryStore(settings.rpc_socket),
            archive=ParquetArchiveReader(settings.archive_dir),
            supervisor=WorkerSupervisor(settings) if manage_worker else None,
        )

    return build_app(settings, open_embedded, clock=clock)
