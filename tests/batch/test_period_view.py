"""The DuckDB engine selects an hour's first copies from that hour (and, through the id
index, the few copies of its fingerprints elsewhere in the month), not by ranking the whole
month: what it answers must equal the month's ranking (``MonthRankedView``, kept as the
reference) row for row, in particular for copies re-sent beyond the stream's horizon with a
new timestamp in another hour, and for fingerprints whose high halves collide."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.archive.parquet import INDEX_DIR, ParquetArchiveReader, ParquetArchiveWriter
from clickagg.batch.reconcile import MonthRankedView, PeriodView, month_of
from clickagg.core.decisions import DECISION_SCHEMA
from clickagg.core.windows import HOUR_MS, MINUTE_MS

# Four hours before a month's end and eight after: both billing periods in one archive.
MONTH_END = int(dt.datetime(2026, 2, 1, tzinfo=dt.UTC).timestamp() * 1000)
FIRST_HOUR = MONTH_END - 4 * HOUR_MS
HOURS = [FIRST_HOUR + i * HOUR_MS for i in range(12)]
PARTITIONS = 3


@dataclass(frozen=True)
class Copy:
    """One archived copy, in log order where it is listed."""

    name: str  # event_id: the copy's own name, for the assertions
    fp: tuple[int, int]  # (fp_high, fp_low): the (event type, id) fingerprint
    hour: int  # index into HOURS of its event time
    event_type: str = "click"
    status: str = "counted"
    minute: int = 0


def archive_of(copies: list[Copy], root: Path, flushes: int) -> list[Path]:
    """The copies written in log order through the real archive writer in ``flushes``
    flushes (every copy of a fingerprint on one partition, as the log routes them); the
    published files, as the runner lists them."""
    rows = []
    next_offset = Counter[int]()
    for copy in copies:
        partition = copy.fp[1] % PARTITIONS
        rows.append(
            {
                "partition": partition,
                "offset": next_offset[partition],
                "event_id": copy.name,
                "event_type": copy.event_type,
                "status": copy.status,
                "reason": None,
                "ad_id": f"ad-{copy.fp[1] % 2}",
                "user_id": f"u{copy.fp[1]}",
                "ts_ms": HOURS[copy.hour] + copy.minute * MINUTE_MS,
                "received_ms": HOURS[0],
                "spend_micros": 100 if copy.status == "counted" else 0,
                "fp_high": copy.fp[0],
                "fp_low": copy.fp[1],
            }
        )
        next_offset[partition] += 1
    table = pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)
    writer = ParquetArchiveWriter(
        root / "archive", flush_events=10**9, flush_interval_ms=10**9, merge_fan_in=2
    )
    try:
        done = Counter[int]()
        cut = -(-len(rows) // flushes)
        for start in range(0, len(rows), cut):
            part = table.slice(start, cut)
            ranges = {}
            for p, n in Counter(part["partition"].to_pylist()).items():
                ranges[p] = (done[p], done[p] + n)
                done[p] += n
            writer.append(part, ranges)
            writer.flush()
    finally:
        writer.close()
    reader = ParquetArchiveReader(root / "archive")
    try:
        return reader.files(month_of(HOURS[0])[0], month_of(HOURS[-1])[1])
    finally:
        reader.close()


def first_copies(copies: list[Copy], hour: int) -> list[str]:
    """Independently: the copies of ``hour`` that are the first in log order of their
    (event type, fingerprint) in their calendar month, in log order per partition."""
    seen: set[tuple[str, tuple[int, int], int]] = set()
    firsts = []
    for copy in copies:  # log order within each partition is list order
        key = (copy.event_type, copy.fp, month_of(HOURS[copy.hour])[0])
        if key not in seen:
            seen.add(key)
            firsts.append(copy)
    mine = [c for c in firsts if c.hour == hour]
    return [c.name for c in sorted(mine, key=lambda c: c.fp[1] % PARTITIONS)]


def answers(view: PeriodView | MonthRankedView) -> list[object]:
    """Everything the view says: each hour's two tables, and winners over wider ranges."""
    out: list[object] = []
    for hour in HOURS:
        out.append(view.hour(hour))
    for start in range(0, len(HOURS), 3):
        out.append(view.winners(HOURS[start], min(HOURS[start] + 5 * HOUR_MS, HOURS[-1])))
    return out


def assert_same_as_the_month_ranking(files: list[Path]) -> list[object]:
    """The answers of the indexed view, once each is asserted equal to the reference's."""
    span = (HOURS[0], HOURS[-1] + HOUR_MS)
    with PeriodView(files, *span) as view, MonthRankedView(files, *span) as reference:
        assert view.index is not None  # the archive's id index answers
        indexed = answers(view)
        expected = answers(reference)
        assert indexed == expected
    # The same rows as plain files (no index): the semi-join answers the same.
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "all.parquet"
        pq.write_table(pa.concat_tables([pq.read_table(f) for f in files]), plain)
        with PeriodView([plain], *span) as view:
            assert view.index is None
            assert answers(view) == expected  # the reference over the same files, as above
    return indexed


def winner_names(view: PeriodView, hour: int) -> list[str]:
    selected = view.hour(HOURS[hour])
    assert selected is not None
    return selected[0]["event_id"].to_pylist()


def test_copies_resent_into_other_hours_are_decided_as_the_month_ranking_decides(
    tmp_path: Path,
) -> None:
    a, b, c, d = (101, 1), (102, 2), (103, 3), (104, 4)
    collide_1, collide_2 = (777, 10), (777, 11)  # the same 64 high bits, another id
    copies = [
        Copy("a", a, hour=5),
        Copy("c-first-in-log", c, hour=8),  # its copy in an EARLIER hour comes later
        Copy("d-jan", d, hour=1),  # January
        Copy("collide-1", collide_1, hour=6),
        Copy("a-resent-later-hour", a, hour=7),  # beyond the horizon, new timestamp
        Copy("b", b, hour=9),
        Copy("a-resent-earlier-hour", a, hour=4),  # later in the log, earlier hour
        Copy("c-earlier-hour-later-log", c, hour=6),
        Copy("b-resent-earlier-hour", b, hour=5, status="duplicate"),
        Copy("collide-2", collide_2, hour=7),
        Copy("d-feb", d, hour=6),  # February: another billing period, counts again
        Copy("a-impression", a, hour=7, event_type="impression"),  # another event type
        Copy("a-resent-same-hour", a, hour=5, minute=30),
    ]
    files = archive_of(copies, tmp_path, flushes=4)
    assert_same_as_the_month_ranking(files)
    span = (HOURS[0], HOURS[-1] + HOUR_MS)
    with PeriodView(files, *span) as view:
        for hour in range(len(HOURS)):
            assert sorted(winner_names(view, hour)) == sorted(first_copies(copies, hour))
        assert winner_names(view, 5) == ["a"]
        assert "a-resent-later-hour" not in winner_names(view, 7)
        assert winner_names(view, 8) == ["c-first-in-log"]
        assert sorted(winner_names(view, 7)) == ["a-impression", "collide-2"]
        assert winner_names(view, 1) == ["d-jan"] and winner_names(view, 6) == [
            "collide-1",
            "d-feb",
        ]
        # The stream counted the re-sent click of hour 7: beyond its horizon, not the batch's.
        selected = view.hour(HOURS[7])
        assert selected is not None
        beyond = {r["ad_id"]: r["beyond_horizon_clicks"] for r in selected[1].to_pylist()}
        assert beyond == {"ad-1": 1}


copy = st.tuples(
    st.integers(0, 9),  # fingerprint number: a small space, so copies are common
    st.booleans(),  # the low half collides with the next number's high half
    st.integers(0, len(HOURS) - 1),
    st.sampled_from(["click", "click", "impression"]),
    st.sampled_from(["counted", "counted", "duplicate", "late", "invalid"]),
    st.integers(0, 59),
)


@settings(max_examples=20, deadline=None)
@given(st.lists(copy, min_size=1, max_size=40), st.integers(1, 5))
def test_any_archive_is_decided_as_the_month_ranking_decides(
    drawn: list[tuple[int, bool, int, str, str, int]], flushes: int
) -> None:
    copies = [
        Copy(f"c{i}", (number // 2 if shared else 1000 + number, number), *rest)
        for i, (number, shared, *rest) in enumerate(drawn)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        files = archive_of(copies, Path(tmp), flushes)
        indexed = assert_same_as_the_month_ranking(files)
        for hour in range(len(HOURS)):  # answers() starts with each hour's selection
            selected = indexed[hour]
            assert isinstance(selected, tuple)
            names = selected[0]["event_id"].to_pylist()
            assert sorted(names) == sorted(first_copies(copies, hour))


def test_files_the_index_does_not_cover_are_answered_without_it(tmp_path: Path) -> None:
    a = (101, 1)
    copies = [Copy("a", a, hour=5), Copy("a-resent-earlier-hour", a, hour=4), Copy("b", (9, 2), 4)]
    files = archive_of(copies, tmp_path, flushes=3)
    span = (HOURS[0], HOURS[-1] + HOUR_MS)
    with PeriodView(files, *span) as view:
        assert view.index is not None
        indexed = answers(view)
    runs = sorted((tmp_path / "archive" / INDEX_DIR).glob("*.npy"))
    runs[-1].unlink()  # the last flush's run lost: the index no longer covers every file
    with PeriodView(files, *span) as view, MonthRankedView(files, *span) as reference:
        assert view.index is None
        assert answers(view) == answers(reference) == indexed
        assert winner_names(view, 4) == ["b"]
