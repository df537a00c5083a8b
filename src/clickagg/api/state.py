"""What the HTTP handlers share: settings, clock, the log committer, the query store."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request

from clickagg.api.committer import GroupCommitter
from clickagg.archive.base import ArchiveReader, CorrectionReader
from clickagg.clock import Clock
from clickagg.config import Settings
from clickagg.log.base import LogReader
from clickagg.query.base import FinalRows, QueryStore, ReplicaStatus


class WorkerHandle(Protocol):
    """The stream workers as the API process sees them (started and watched elsewhere)."""

    @property
    def restarts(self) -> int: ...

    @property
    def failure(self) -> str | None:
        """Why they are no longer restarted, if they are not."""
        ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            "clickagg_events_accepted",
            "Events durably appended to the log",
            ["event_type"],
            registry=registry,
        )
        self.rejected = Counter(
            "clickagg_events_rejected",
            "Events refused at ingest (bad input)",
            registry=registry,
        )
        self.unavailable = Counter(
            "clickagg_ingest_unavailable",
            "Requests answered 503 (backpressure, log full)",
            registry=registry,
        )
        self.append_seconds = Histogram(
            "clickagg_ingest_durable_seconds",
            "Time from request to durable append",
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        # the children every accepted request increments, looked up once, not per request
        self.accepted_clicks = self.accepted.labels("click")
        self.accepted_impressions = self.accepted.labels("impression")


@dataclass
class AppState:
    settings: Settings
    clock: Clock
    committer: GroupCommitter
    reader: LogReader
    queries: QueryStore
    archive: ArchiveReader
    supervisor: WorkerHandle | None
    registry: CollectorRegistry
    metrics: IngestMetrics
    final: FinalRows | None = None
    corrections: CorrectionReader | None = None
    replica_status: Callable[[], ReplicaStatus] | None = None  # None: no replica kept
    recent_rejections: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def remember_rejection(self, event_id: str, reason: str, limit: int = 10_000) -> None:
        self.recent_rejections[event_id] = reason
        while len(self.recent_rejections) > limit:
            self.recent_rejections.popitem(last=False)


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.clickagg
    return state
