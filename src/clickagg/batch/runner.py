"""One reconciliation run over a data dir: the code path of ``clickagg reconcile`` (and of
the server's scheduler, once it closes hours by itself)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from clickagg.archive.parquet import ParquetArchiveReader
from clickagg.batch.published import FinalHours, Version
from clickagg.batch.reconcile import month_of, reconcile_hour
from clickagg.config import Settings
from clickagg.core.windows import HOUR_MS
from clickagg.registry import load_cpc_micros


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


def reconcile_hours(settings: Settings, hours: list[int], *, reason: str) -> list[HourRun]:
    """Reconcile each hour (a UTC hour start, ms) and publish a version where it changed."""
    cpc = load_cpc_micros(settings.ads_file) if settings.ads_file else {}
    archive = ParquetArchiveReader(settings.archive_dir)
    final = FinalHours(batch_dir(settings))
    runs = []
    try:
        with _locked(batch_dir(settings)):
            for hour_ms in hours:
                if hour_ms % HOUR_MS:
                    raise ValueError(f"{hour_ms} is not the start of a UTC hour")
                files = archive.files(*month_of(hour_ms))
                result = reconcile_hour(files, hour_ms, cpc_micros=cpc)
                tables = {"minute": result.minute, **result.dimensions}
                minute = result.minute
                totals = {
                    name: _sum(minute, name)
                    for name in ("clicks", "impressions", "spend_micros", "invalid_clicks")
                }
                summary = {
                    **totals,
                    "events": result.events,
                    "late_counted": result.late_counted,
                }
                published = final.publish(hour_ms, tables, reason=reason, summary=summary)
                final.write_report(hour_ms, result.report)
                runs.append(
                    HourRun(
                        hour_ms,
                        published,
                        totals["clicks"],
                        totals["impressions"],
                        totals["spend_micros"],
                        result.events,
                        result.late_counted,
                        result.invalid,
                    )
                )
    finally:
        archive.close()
    return runs


def _sum(table: pa.Table, column: str) -> int:
    return int(pc.sum(table.column(column)).as_py() or 0)
