"""The composition root: the HTTP app over the embedded backends.

``clickagg.api`` runs on the roles' Protocols only; this module gives it the adapters the
settings name (``clickagg.runtime.roles``) and the worker supervisor.
"""

from __future__ import annotations

from starlette.types import ASGIApp

from clickagg.api.app import Backends, build_app
from clickagg.api.state import AppState
from clickagg.batch.published import FinalRowsReader
from clickagg.clock import Clock
from clickagg.config import Settings
from clickagg.query.base import QueryStore
from clickagg.query.replicated import ReplicatedQueryStore
from clickagg.query.serving import ServingQueryStore
from clickagg.registry import AdRegistry, AdvertiserRegistry
from clickagg.runtime import roles
from clickagg.runtime.maintenance import retention_loop
from clickagg.runtime.services import Services


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
        advertisers = AdvertiserRegistry.for_data_dir(settings.data_dir, settings.advertisers_file)
        ads = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file)
        final = FinalRowsReader(
            settings.batch_dir, advertisers=advertisers.current, ads=ads.entries
        )
        stream = query_store or roles.query_store(settings)
        # the replica of the recent rows, if the store has one, for /metrics
        replica = stream.replica_status if isinstance(stream, ReplicatedQueryStore) else None
        return Backends(
            writer=roles.log_writer(settings),
            reader=roles.log_reader(settings),
            queries=ServingQueryStore(stream, final),
            replica_status=replica,
            final=final,
            archive=roles.archive_reader(settings),
            corrections=roles.correction_reader(settings),
            supervisor=Services(settings) if manage_worker else None,
            maintenance=maintain,
        )

    async def maintain(state: AppState) -> None:
        """Log retention, in this process: it owns the log writer."""
        await retention_loop(
            state.settings,
            queries=state.queries,
            archive=state.archive,
            writer=state.committer.writer,
            writer_lock=state.committer.writer_lock,
            clock=state.clock,
        )

    return build_app(settings, open_embedded, clock=clock)
