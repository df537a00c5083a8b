"""Stage 1's half of the keyed stage: append a committed round's fresh clicks to the keyed
log, at least once, and know from where recovery must append them again.

After a round's store commit, :meth:`KeyedAppender.append` writes the round's records to
their keyed partitions, syncs the keyed log, then moves its marker (per source partition,
the offset up to which every record is durable in the keyed log) and writes the marker
file. A crash anywhere in between leaves the marker behind the store's committed offset:
the restarted worker re-derives the decisions of ``[marker, committed)`` from the log (the
processor is deterministic, exactly as for the archive) and appends them again. Records
that were already durable are then in the keyed log twice; stage 2 takes each once (see
``clickagg.core.keyed``). The marker file needs no fsync for the same reason: an old marker
only means more copies.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa

from clickagg.core import ids
from clickagg.core.keyed import keyed_records
from clickagg.log.base import LogWriter
from clickagg.store.base import AggregateStore


class KeyedGapError(RuntimeError):
    """Records that do not continue the marker: appending them would lose the gap."""


CONTEXT_KEY = b"clickagg.context_from_ms"
"""A frame's schema metadata under this key: the keyed log holds every record of its
family counted from this event time on, from this frame on (:func:`context_of`)."""


def encode_records(records: pa.Table, context_from_ms: int | None = None) -> bytes:
    """A frame of records; ``context_from_ms``: the frame is the first after a gap (the
    stage started while the stream ran, or the family's rules were off), and the log is
    complete from that event time on."""
    if context_from_ms is not None:
        records = records.replace_schema_metadata({CONTEXT_KEY: str(context_from_ms).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, records.schema) as stream:
        stream.write_table(records)
    return bytes(sink.getvalue().to_pybytes())


def decode_records(payload: bytes) -> pa.Table:
    """A frame's records (its context mark, if any: :func:`context_of`)."""
    return pa.ipc.open_stream(payload).read_all()


def context_of(records: pa.Table) -> int | None:
    """The context mark a frame's records carry (:func:`encode_records`), if any."""
    value = (records.schema.metadata or {}).get(CONTEXT_KEY)
    return None if value is None else int(value)


def _clicks(kept: pl.DataFrame) -> pl.DataFrame:
    """The round's clicks: the IP and visitor families' records are of clicks only, and a
    round's kept events are mostly impressions, so what follows works on a small fraction
    of them (the ad family's take impressions too: ``clicks_only`` false)."""
    if kept.is_empty():
        return kept
    return kept.filter(pl.col("event_type") == ids.CLICK)


def newest_counted_ms(store: AggregateStore) -> int:
    """The newest event time the store has counted (0: none): a keyed log that starts now,
    or restarts without what came before, is complete after it (its context mark)."""
    return max((status.max_event_ms for status in store.partition_status()), default=0)


def retire_marker(marker_path: Path) -> None:
    """The keyed stage is off: forget where stage 1 was. Left in place, a marker from before
    would make the stage, turned on again, re-derive and append everything counted while it
    was off (or refuse to start once the log's retention removed those events); without
    one it starts at the store's committed offsets, as the first time."""
    marker_path.unlink(missing_ok=True)


Records = Callable[[pl.DataFrame, int], dict[int, pa.Table]]
"""A family's records of a round's kept events, by keyed partition (``keyed_records``,
``clickagg.core.visitor.visitor_records``)."""


class KeyedAppender:
    def __init__(
        self,
        writer: LogWriter,
        marker_path: Path,
        committed: Mapping[int, int],
        records: Records = keyed_records,
        *,
        clicks_only: bool = True,
        active: Callable[[], bool] | None = None,
        newest_event_ms: int = 0,
    ) -> None:
        """``committed``: the store's committed offsets, where a marker starts the first
        time (the keyed stage turned on for a data dir that already counted, or a family
        new to it: what was counted before is not re-derived). ``clicks_only``: the
        family's records are of clicks alone. ``active``: whether the family has a rule in
        force now; while it has none, rounds append nothing and only move the marker (the
        ad family, whose records are every event, costs nothing while its rules are off).
        ``newest_event_ms``: the newest event time the store has counted.

        Context marks: records counted and not appended (before the marker started, or
        while the family was inactive) leave a gap, and stage 2 must not judge an hour
        whose context reaches into it as if the log held everything (a repeat, or a click
        whose impression fell in the gap, would be missing). So the first frame appended
        to each keyed partition after a gap carries a mark (:func:`encode_records`): the
        log is complete for event times after every event counted so far. A mark owed to a
        partition that has no record yet waits, in the marker file, for its first one."""
        self.writer = writer
        self.records = records
        self.clicks_only = clicks_only
        self.active = active
        self.wrote = False  # whether the last write appended anything (to be synced)
        self.marker_path = marker_path
        self._newest_ms = newest_event_ms
        self._marked: list[int] = []  # keyed partitions the last write gave a mark
        if marker_path.exists():
            stored = json.loads(marker_path.read_text())
            self._owed = {int(k): int(v) for k, v in stored.pop(_OWED, {}).items()}
            # A marker of a build before the marks cannot say whether its log had a gap
            # (the ad family's rules off, say, which is how they ship): assume one. The
            # cost is one mark, that leaves the next hour or two to the batch.
            earlier_build = stored.pop(_FORMAT, None) is None
            self._gap = bool(stored.pop(_GAP, False)) or earlier_build
            self._next = {int(p): int(o) for p, o in stored.items()}
        else:
            self._next = dict(committed)
            self._owed = {}
            self._gap = any(offset > 0 for offset in committed.values())
            self._write_marker()  # before any append: no marker now means never started

    def next_offset(self, partition: int) -> int:
        """Records of the source partition before this offset are durable in the keyed log."""
        return self._next.get(partition, 0)

    def append(self, kept: pl.DataFrame, ranges: Mapping[int, tuple[int, int]]) -> None:
        """Append the records of ``kept`` (fresh events of the source ranges ``ranges``,
        already committed to the store) from each source partition's marker on, sync, then
        move the markers to the ranges' ends. Ranges already appended are skipped."""
        fresh = self.write(kept, ranges)
        if fresh:
            self.writer.sync()
            self.synced(fresh, ranges)

    def write(
        self, kept: pl.DataFrame, ranges: Mapping[int, tuple[int, int]]
    ) -> dict[int, int] | None:
        """:meth:`append` up to the sync: the records written, not yet durable. Returns
        where each source partition's fresh records started (None: nothing fresh)."""
        fresh: dict[int, int] = {}
        for partition, (lo, hi) in ranges.items():
            at = self.next_offset(partition)
            if lo > at:
                raise KeyedGapError(
                    f"partition {partition}: records from offset {lo}, but the keyed log "
                    f"holds them only up to {at}"
                )
            if hi > at:
                fresh[partition] = at
        self.wrote = False
        self._marked = []
        if not fresh:
            return None
        if self.clicks_only:
            kept = _clicks(kept)
        if not kept.is_empty():
            newest = kept["ts_ms"].max()
            assert isinstance(newest, int)
            self._newest_ms = max(self._newest_ms, newest)
        if self.active is not None and not self.active():
            self._gap = True  # counted, not appended
            return fresh  # nothing to write: the markers still move
        if self._gap:
            # Every event counted before this round is at or before the newest seen (this
            # round's included: a mark a little late leaves a little more to the batch).
            self._owed = dict.fromkeys(range(self.writer.partitions), self._newest_ms + 1)
            self._gap = False
        whole = fresh.keys() == ranges.keys() and all(
            at == ranges[p][0] for p, at in fresh.items()
        )  # the usual round: every range is new from its start, nothing to cut
        if not kept.is_empty() and not whole:
            starts = pl.DataFrame(
                {"partition": list(fresh), "_from": list(fresh.values())},
                schema={"partition": kept.schema["partition"], "_from": pl.Int64},
            )
            kept = kept.join(starts, on="partition").filter(pl.col("offset") >= pl.col("_from"))
        for k, records in sorted(self.records(kept, self.writer.partitions).items()):
            mark = self._owed.get(k)
            self.writer.append(k, encode_records(records, mark), records.num_rows)
            self.wrote = True
            if mark is not None:
                self._marked.append(k)
        return fresh

    def synced(self, fresh: Mapping[int, int], ranges: Mapping[int, tuple[int, int]]) -> None:
        """After :meth:`write` and a sync of the writer: move the markers (and forget the
        context marks now durable)."""
        for partition in fresh:
            self._next[partition] = ranges[partition][1]
        for k in self._marked:
            self._owed.pop(k, None)
        self._marked = []
        self._write_marker()

    def _write_marker(self) -> None:
        """The marker file: per source partition, the offset up to which records are
        durable, and what a gap still owes (``_GAP``, ``_OWED``). ``_FORMAT`` tells it from
        a marker of a build before the marks (which has none of the three: read as a
        gap)."""
        self.marker_path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.marker_path.with_suffix(".tmp")
        body: dict[str, object] = {str(p): o for p, o in sorted(self._next.items())}
        body[_FORMAT] = MARKER_FORMAT
        if self._gap:
            body[_GAP] = True
        if self._owed:
            body[_OWED] = {str(k): v for k, v in sorted(self._owed.items())}
        temp.write_text(json.dumps(body))
        os.replace(temp, self.marker_path)


_FORMAT = "format"  # the marker's format: absent before the context marks
MARKER_FORMAT = 2
_GAP = "gap"  # records were counted and not appended since the last marks were owed
_OWED = "owed"  # keyed partition -> the context mark its next frame carries


class KeyedAppenders:
    """The keyed families' appenders as one: a round is appended to each family's log
    (each skips what its own marker says is durable), and recovery re-derives from the
    oldest marker."""

    def __init__(self, appenders: Sequence[KeyedAppender]) -> None:
        self.appenders = tuple(appenders)

    def next_offset(self, partition: int) -> int:
        return min(a.next_offset(partition) for a in self.appenders)

    def append(self, kept: pl.DataFrame, ranges: Mapping[int, tuple[int, int]]) -> None:
        """Each family's :meth:`KeyedAppender.append`, their syncs side by side (a sync
        waits on the disk, not the CPU: one family's need not wait for the other's). A
        marker moves only once every family's records are durable: should a sync fail,
        recovery appends both families' records again (copies, which stage 2 skips)."""
        clicks = _clicks(kept)  # once for every family of clicks
        written = [(a, a.write(clicks if a.clicks_only else kept, ranges)) for a in self.appenders]
        pending = [(a, fresh) for a, fresh in written if fresh]
        _sync_all([a.writer for a, _ in pending if a.wrote])  # nothing new: nothing to sync
        for appender, fresh in pending:
            appender.synced(fresh, ranges)


def _sync_all(writers: Sequence[LogWriter]) -> None:
    """Sync the writers concurrently (the last in this thread); raise the first failure."""
    failures: list[BaseException] = []

    def sync(writer: LogWriter) -> None:
        try:
            writer.sync()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=sync, args=(w,), name="keyed-sync") for w in writers[:-1]]
    for thread in threads:
        thread.start()
    try:
        if writers:
            writers[-1].sync()
    finally:
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
