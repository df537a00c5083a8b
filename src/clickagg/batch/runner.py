"""One reconciliation run over a data dir: the code path of ``clickagg reconcile`` (and of
the server's scheduler, once it closes hours by itself)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from clickagg.archive.parquet import ParquetArchiveReader, hour_dir
from clickagg.batch.published import FinalHours, Version
from clickagg.batch.reconcile import (
    HourResult,
    context_start,
    engine_factory,
    month_of,
    reconcile_hour,
)
from clickagg.config import Settings
from clickagg.core.rules.loading import load_rules
from clickagg.core.windows import HOUR_MS
from clickagg.registry import AdRegistry


@dataclass(frozen=True)
class HourRun:
    hour_ms: int
    published: Version | None  # None: the rows equal the current version's
    clicks: int
    impressions: int
    spend_micros: int
    events: int
    late_counted: int
    invalid: int
    review: int = 0  # billable clicks a review-only rule flagged


@dataclass(frozen=True)
class Progress:
    """How far a run is, after each hour: for a progress bar or a log line."""

    hours_done: int
    hours: int
    files: int  # archive files read so far (each billing month's)
    events: int  # winning events reconciled so far
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        if not self.hours_done:
            return 0.0
        return self.elapsed_s / self.hours_done * (self.hours - self.hours_done)


def batch_dir(settings: Settings) -> Path:
    return settings.batch_dir


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run: wait for it, then redo on its result
        yield
    finally:
        os.close(fd)


def reconcile_hours(
    settings: Settings,
    hours: list[int],
    *,
    reason: str,
    engine: str = "duckdb",
    spark_master: str | None = None,
    spark_conf: Mapping[str, str] | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> list[HourRun]:
    """Reconcile each hour (a UTC hour start, ms) and publish a version where it changed.

    ``engine`` (``reconcile.ENGINES``) only selects the winning copies; the rows are the
    same whichever does (``spark_master``: run Spark on that cluster, not in local mode;
    ``spark_conf``: more Spark settings).
    ``progress`` hears after each hour how far the run is."""
    open_period = engine_factory(engine, spark_master=spark_master, spark_conf=spark_conf)
    cpc = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file).book()
    # The stream's rules, applied to every winner.
    rules = load_rules(settings.rules_file, blocklist=settings.blocklist_path)
    archive = ParquetArchiveReader(settings.archive_dir)
    final = FinalHours(batch_dir(settings))
    runs = []
    by_month: dict[tuple[int, int], list[int]] = {}
    for hour_ms in hours:
        if hour_ms % HOUR_MS:
            raise ValueError(f"{hour_ms} is not the start of a UTC hour")
        by_month.setdefault(month_of(hour_ms), []).append(hour_ms)
    started = time.monotonic()
    files_read = events = 0
    try:
        with _locked(batch_dir(settings)):
            for (month_start, month_end), month_hours in by_month.items():
                # The rules' context reaches back before the first hour, maybe into the month
                # before: all of that month is read, so its events are its own winners.
                span = (
                    context_start(min(month_hours), rules.lookback_ms),
                    max(month_hours) + HOUR_MS,
                )
                recent: dict[int, pa.Table] = {}  # winners of the hours just reconciled
                files = archive.files(min(month_start, month_of(span[0])[0]), month_end)
                files_read += len(files)
                with closing(open_period(files, *span)) as view:
                    for hour_ms in month_hours:
                        result = reconcile_hour(
                            view,
                            hour_ms,
                            cpc_micros=cpc,
                            invalid=rules.batch_reasons,
                            review=rules.batch_reviews if rules.has_reviews else None,
                            lookback_ms=rules.lookback_ms,
                            recent=recent,
                        )
                        runs.append(_publish(final, result, reason))
                        final.record_inputs(
                            hour_ms, archive.flushes_of(_files_of_hour(files, hour_ms))
                        )
                        events += result.events
                        if progress is not None:
                            progress(
                                Progress(
                                    len(runs),
                                    len(hours),
                                    files_read,
                                    events,
                                    time.monotonic() - started,
                                )
                            )
    finally:
        archive.close()
    return runs


def _publish(final: FinalHours, result: HourResult, reason: str) -> HourRun:
    """Publish a new version of the hour where its rows changed, and the run's report."""
    tables = {"minute": result.minute, **result.dimensions}
    totals = {
        name: _sum(result.minute, name)
        for name in ("clicks", "impressions", "spend_micros", "invalid_clicks")
    }
    summary = {**totals, "events": result.events, "late_counted": result.late_counted}
    published = final.publish(result.hour_ms, tables, reason=reason, summary=summary)
    final.write_report(result.hour_ms, result.report)
    return HourRun(
        result.hour_ms,
        published,
        totals["clicks"],
        totals["impressions"],
        totals["spend_micros"],
        result.events,
        result.late_counted,
        result.invalid,
        result.review,
    )


def _files_of_hour(files: list[Path], hour_ms: int) -> list[Path]:
    """The hour's own archive files among the period's."""
    directory = hour_dir(hour_ms)
    return [f for f in files if f.parent.name == directory]


def _sum(table: pa.Table, column: str) -> int:
    return int(pc.sum(table.column(column)).as_py() or 0)
