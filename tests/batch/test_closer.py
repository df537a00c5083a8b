"""Which hours the schedule closes, and one pass of it over a real stream's archive."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clickagg.archive.parquet import ParquetArchiveReader, ParquetArchiveWriter
from clickagg.batch.closer import REASON, RESTATED, closable_hours, close_due_hours
from clickagg.batch.published import INPUTS, FinalHours, hour_name
from clickagg.batch.runner import reconcile_hours
from clickagg.config import Settings
from clickagg.core.windows import HOUR_MS, MINUTE_MS
from tests.conftest import Ev
from tests.worker.test_stream import T0, Rig

HOUR = T0 - T0 % HOUR_MS


def test_an_hour_closes_only_after_its_lateness_and_delay(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, allowed_lateness_ms=5 * MINUTE_MS)
    settings = dataclasses.replace(settings, close_delay_ms=10 * MINUTE_MS)
    final = FinalHours(settings.batch_dir)
    hours = [HOUR - HOUR_MS, HOUR, HOUR + HOUR_MS]
    due = HOUR + HOUR_MS + 15 * MINUTE_MS  # H's end + lateness + delay
    assert closable_hours(due - 1, settings, archived_hours=hours, final=final) == [HOUR - HOUR_MS]
    assert closable_hours(due, settings, archived_hours=hours, final=final) == hours[:2]
    far = HOUR + settings.close_lookback_ms + 2 * HOUR_MS  # beyond the lookback
    assert closable_hours(far, settings, archived_hours=hours, final=final) == []


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_one_pass_closes_due_hours_once(rig: Rig) -> None:
    rig.append([Ev(f"e{i}", "ad-1", HOUR + i * MINUTE_MS) for i in range(90)])  # 2 hours
    rig.drain(rig.worker())
    rig.archive.flush()
    settings = rig.settings
    now = HOUR + HOUR_MS + settings.allowed_lateness_ms + settings.close_delay_ms
    [run] = close_due_hours(settings, now)  # only the first hour is due
    assert run.hour_ms == HOUR and run.clicks == 60 and run.published is not None
    assert run.published.reason == REASON
    assert close_due_hours(settings, now) == []  # closed: not again
    later = now + HOUR_MS
    [second] = close_due_hours(settings, later)
    assert second.hour_ms == HOUR + HOUR_MS and second.clicks == 30


def test_a_closed_hour_is_restated_when_very_late_events_arrive(rig: Rig) -> None:
    rig.append([Ev(f"e{i}", "ad-1", HOUR + i * MINUTE_MS) for i in range(90)])
    rig.drain(rig.worker())
    rig.archive.flush()
    settings = rig.settings
    now = HOUR + HOUR_MS + settings.allowed_lateness_ms + settings.close_delay_ms
    [closed] = close_due_hours(settings, now)
    assert closed.clicks == 60
    # Hours after the hour closed: events of it the stream leaves out as late, and a copy
    # of one it counted (re-sent beyond its horizon).
    worker = rig.worker()
    rig.append([Ev(f"late{i}", "ad-1", HOUR + 10 * MINUTE_MS + i) for i in range(7)])
    rig.drain(worker)
    rig.archive.flush()
    [restated] = close_due_hours(settings, now + 5 * MINUTE_MS)
    assert restated.hour_ms == HOUR and restated.clicks == 67
    assert restated.published is not None and restated.published.version == 2
    assert restated.published.reason == RESTATED
    assert close_due_hours(settings, now + 6 * MINUTE_MS) == []  # nothing new: no run
    rig.append([Ev("e3", "ad-1", HOUR + 3 * MINUTE_MS)])  # a copy: counts once already
    rig.drain(worker)
    rig.archive.flush()
    [again] = close_due_hours(settings, now + 7 * MINUTE_MS)
    assert again.hour_ms == HOUR and again.clicks == 67 and again.published is None
    assert close_due_hours(settings, now + 8 * MINUTE_MS) == []
    assert [v.version for v in FinalHours(settings.batch_dir).versions(HOUR)] == [1, 2]


def test_a_late_click_restates_the_next_closed_hour_whose_context_holds_it(rig: Rig) -> None:
    """User u clicks ad-7 at 11:00:05; after both hours closed, a click of u on ad-7 at
    10:59:55 arrives very late: its hour is restated (one more click), and so is the next
    (the built-in repeat-click rule now finds 11:00:05 a repeat: one click less)."""
    nxt = HOUR + HOUR_MS
    rig.append([Ev(f"e{i}", "ad-1", HOUR + i * MINUTE_MS) for i in range(90)])
    rig.append([Ev("u-first", "ad-7", nxt + 5_000, user_id="u")])
    rig.drain(rig.worker())
    rig.archive.flush()
    settings = rig.settings
    now = nxt + HOUR_MS + settings.allowed_lateness_ms + settings.close_delay_ms
    closed = close_due_hours(settings, now)
    assert [(run.hour_ms, run.clicks, run.invalid) for run in closed] == [
        (HOUR, 60, 0),
        (nxt, 31, 0),
    ]
    worker = rig.worker()
    rig.append([Ev("u-late", "ad-7", nxt - 5_000, user_id="u")])
    rig.drain(worker)
    rig.archive.flush()
    restated = close_due_hours(settings, now + 5 * MINUTE_MS)
    assert [(run.hour_ms, run.clicks, run.invalid) for run in restated] == [
        (HOUR, 61, 0),
        (nxt, 30, 1),
    ]
    assert all(run.published is not None for run in restated)
    assert close_due_hours(settings, now + 6 * MINUTE_MS) == []


def test_an_hour_closed_before_inputs_were_recorded_is_not_restated_for_it(rig: Rig) -> None:
    """An hour closed by an older clickagg has no INPUTS: the first pass records today's
    files instead of publishing a new version of an hour that may be invoiced."""
    rig.append([Ev(f"e{i}", "ad-1", HOUR + i * MINUTE_MS) for i in range(90)])
    rig.drain(rig.worker())
    rig.archive.flush()
    settings = rig.settings
    now = HOUR + HOUR_MS + settings.allowed_lateness_ms + settings.close_delay_ms
    [closed] = close_due_hours(settings, now)
    assert closed.published is not None
    final = FinalHours(settings.batch_dir)
    inputs = final.inputs(HOUR)
    (settings.batch_dir / hour_name(HOUR) / INPUTS).unlink()  # as an older version left it
    assert close_due_hours(settings, now + MINUTE_MS) == []
    assert final.inputs(HOUR) == inputs
    assert [v.version for v in final.versions(HOUR)] == [1]


def test_compacting_a_closed_hours_archive_changes_nothing_and_restates_nothing(
    rig: Rig,
) -> None:
    """The hour is closed from many small archive files; the archive then merges them.
    The next passes restate nothing, a rerun finds the same rows, and a very late event
    afterwards still restates the hour."""

    def small_files_only() -> ParquetArchiveWriter:
        return ParquetArchiveWriter(
            rig.archive_dir, flush_events=5, flush_interval_ms=0, compact_files=0
        )

    rig.new_archive = small_files_only  # type: ignore[method-assign]
    worker = rig.worker()
    for start in range(0, 90, 5):  # a flush per round: many files of the hour
        rig.append([Ev(f"e{i}", "ad-1", HOUR + i * MINUTE_MS) for i in range(start, start + 5)])
        rig.drain(worker)
        rig.archive.flush()
    rig.archive.flush()
    settings = rig.settings
    reader = ParquetArchiveReader(settings.archive_dir)
    small = reader.files(HOUR, HOUR + HOUR_MS)
    assert len(small) >= 8
    now = HOUR + HOUR_MS + settings.allowed_lateness_ms + settings.close_delay_ms
    [closed] = close_due_hours(settings, now)
    final = FinalHours(settings.batch_dir)
    rows, inputs = final.read(HOUR), final.inputs(HOUR)
    assert closed.clicks == 60 and rows is not None

    rig.archive.close()
    compactor = ParquetArchiveWriter(settings.archive_dir, compact_grace_ms=0)
    assert compactor.compact() >= len(small)
    compactor.close()
    rig.archive = rig.new_archive()
    assert len(reader.files(HOUR, HOUR + HOUR_MS)) < len(small)
    assert not any(path.exists() for path in small)  # no grace: deleted at once

    assert close_due_hours(settings, now + 5 * MINUTE_MS) == []  # not restated for it
    [rerun] = reconcile_hours(settings, [HOUR], reason="rerun over the compacted archive")
    assert rerun.published is None  # the same rows as the version closed before
    assert (rerun.clicks, rerun.events) == (closed.clicks, closed.events)
    current = final.read(HOUR)
    assert current is not None and current.equals(rows)
    assert final.inputs(HOUR) == inputs  # the same flushes, in fewer files
    worker = rig.worker()
    rig.append([Ev("very-late", "ad-1", HOUR + 10 * MINUTE_MS)])
    rig.drain(worker)
    rig.archive.flush()
    [restated] = close_due_hours(settings, now + 10 * MINUTE_MS)
    assert restated.clicks == 61 and restated.published is not None


def test_inputs_an_older_clickagg_recorded_as_file_names_are_read_as_flushes(rig: Rig) -> None:
    rig.append([Ev(f"e{i}", "ad-1", HOUR + i * MINUTE_MS) for i in range(30)])
    rig.drain(rig.worker())
    rig.archive.flush()
    settings = rig.settings
    now = HOUR + HOUR_MS + settings.allowed_lateness_ms + settings.close_delay_ms
    close_due_hours(settings, now)
    final = FinalHours(settings.batch_dir)
    flushes = final.inputs(HOUR)
    assert flushes
    names = [f"{seq:012d}.parquet" for seq in flushes]
    (settings.batch_dir / hour_name(HOUR) / INPUTS).write_text(json.dumps(names))
    assert final.inputs(HOUR) == flushes
    assert close_due_hours(settings, now + MINUTE_MS) == []
