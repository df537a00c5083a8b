"""Closing hours on schedule: the server reconciles each event hour by itself, through the
same code path as ``clickagg reconcile``, once no on-time event can still arrive for it.

An hour ``H`` is closable once ``now >= H + 1h + allowed_lateness + close_delay``: by then
the stream has counted or left as late every event of ``H`` (the watermark lags by the
allowed lateness), and the delay leaves the archive time to publish them. Hours with
archived events, not closed yet and within ``close_lookback``, are closed oldest first.

Very late events that arrive after an hour closed are restated the same way: every run
records which of the archive's flushes of the hour it read (``FinalHours.record_inputs``;
flushes, not files: the archive's compaction merges files without adding events), and a
closed hour within the lookback whose archive has gained flushes since is reconciled again,
which publishes a new version only if the rows change (a copy of an event already counted
changes nothing; a very late event does). So are the closed hours whose rules' context
(``RuleSet.lookback_ms``) holds such an hour: a late click at 10:59:55 makes one at
11:00:05 a repeat. Older hours are restated by hand (``clickagg reconcile --hour H`` or
``--since``).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from clickagg.archive.parquet import ParquetArchiveReader
from clickagg.batch.published import FinalHours
from clickagg.batch.reconcile import context_start
from clickagg.batch.runner import HourRun, reconcile_hours
from clickagg.config import Settings
from clickagg.core.rules.loading import load_rules
from clickagg.core.windows import HOUR_MS

log = logging.getLogger(__name__)
REASON = "closed on schedule"
RESTATED = "restated on schedule: archived events arrived after the hour closed"


def due_hours(now_ms: int, settings: Settings, *, archived_hours: list[int]) -> list[int]:
    """Archived hours past ``allowed_lateness + close_delay`` and within the lookback."""
    cutoff = now_ms - settings.allowed_lateness_ms - settings.close_delay_ms
    oldest = now_ms - settings.close_lookback_ms
    return [hour for hour in archived_hours if oldest < hour + HOUR_MS <= cutoff]


def closable_hours(
    now_ms: int, settings: Settings, *, archived_hours: list[int], final: FinalHours
) -> list[int]:
    """The hours to close now (see the module docstring), oldest first."""
    due = due_hours(now_ms, settings, archived_hours=archived_hours)
    return [hour for hour in due if final.current(hour) is None]


def restatable_hours(
    now_ms: int,
    settings: Settings,
    *,
    archive: ParquetArchiveReader,
    final: FinalHours,
    rules_lookback_ms: int = 0,
) -> list[int]:
    """Closed hours within the lookback whose archived flushes are not the ones their
    latest run read, and the closed hours whose rules' context holds one of those, oldest
    first. A closed hour with no record of its inputs gets today's recorded, not restated."""
    due = due_hours(now_ms, settings, archived_hours=archive.event_hours())
    closed = [hour for hour in due if final.current(hour) is not None]
    changed = []
    for hour in closed:
        flushes = archive.flushes(hour)
        recorded = final.inputs(hour)
        if recorded is None:
            # Closed before runs recorded their inputs (an older clickagg): take today's
            # as read. Restating it would re-bill an invoiced hour for no new event.
            final.record_inputs(hour, flushes)
        elif recorded != flushes:
            changed.append(hour)
    return [
        hour
        for hour in closed
        if any(context_start(hour, rules_lookback_ms) <= c <= hour for c in changed)
    ]


def close_due_hours(settings: Settings, now_ms: int) -> list[HourRun]:
    """One pass of the schedule: close every hour that is due, then restate every closed
    hour that has new archived events."""
    final = FinalHours(settings.batch_dir)
    archive = ParquetArchiveReader(settings.archive_dir)
    try:
        archived = archive.event_hours()
        lookback = load_rules(settings.rules_file).lookback_ms
        restate = restatable_hours(
            now_ms, settings, archive=archive, final=final, rules_lookback_ms=lookback
        )
    finally:
        archive.close()
    runs = []
    close = closable_hours(now_ms, settings, archived_hours=archived, final=final)
    if close:
        runs += reconcile_hours(settings, close, reason=REASON)
    if restate:
        runs += reconcile_hours(settings, restate, reason=RESTATED)
    for run in runs:
        what = "closed" if run.hour_ms in close else "restated"
        changed = f"v{run.published.version}" if run.published else "unchanged"
        log.info("%s hour %d: %d clicks (%s)", what, run.hour_ms, run.clicks, changed)
    return runs


def run_closer(
    settings: Settings, stop: threading.Event | None = None, *, parent_pid: int | None = None
) -> None:
    """Close due hours every ``close_interval`` until ``stop`` is set, or until the process
    that started this one (``parent_pid``) is gone: an orphaned closer exits."""
    logging.basicConfig(level=settings.log_level.upper())
    stop = stop or threading.Event()

    def orphaned() -> bool:
        return parent_pid is not None and os.getppid() != parent_pid

    while not stop.is_set() and not orphaned():
        try:
            close_due_hours(settings, int(time.time() * 1000))
        except Exception:  # a failed pass is retried at the next interval
            log.exception("closing hours failed; retrying in %d ms", settings.close_interval_ms)
        deadline = time.monotonic() + settings.close_interval_ms / 1000
        while not orphaned() and not stop.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
