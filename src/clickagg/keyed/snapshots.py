"""Stage 2's state on disk, so a restart replays seconds of the keyed log, not all of it,
and the keyed log can be trimmed behind it.

A snapshot of one keyed partition is its :class:`~clickagg.core.keyed.KeyedWindows` at a
consumed offset: the records it keeps (an Arrow IPC stream, readable without clickagg)
with the high-water marks and the newest event time in the schema's metadata. It is a
function of the keyed log up to that offset and the specs the store recorded, so loading
it and replaying from there gives exactly the state replaying from the log's start would.
Files are written atomically and named by offset (``clickagg.worker.snapshots``); one
taken ahead of what the store committed (the commit then lost) is never chosen.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import pyarrow as pa

from clickagg.core.adkeyed import AdWindows
from clickagg.core.keyed import KeyedWindows
from clickagg.core.visitor import VisitorWindows

_META_KEY = b"clickagg.keyed_windows"
_IPC_MARKER = b"\xff\xff\xff\xff"  # how an Arrow IPC stream's first message starts


def encode_windows(windows: KeyedWindows | VisitorWindows | AdWindows) -> bytes:
    """Any family's windows (the visitor and ad families' also say up to where they
    decided; the ad family's counts follow its records as a second stream)."""
    kept = windows.kept().to_arrow()
    meta: dict[str, object] = {
        "high_water": {str(p): o for p, o in sorted(windows.high_water.items())},
        "max_event_ms": windows.max_event_ms,
        "context_from_ms": windows.context_from_ms,
    }
    if isinstance(windows, VisitorWindows | AdWindows):
        meta["decided_until_ms"] = windows.decided_until_ms
    second: pa.Table | None = None
    if isinstance(windows, VisitorWindows):
        starts, second = windows.chains()
        meta["chains"] = {str(w): start for w, start in sorted(starts.items())}
    elif isinstance(windows, AdWindows):
        counts = _ipc(windows.counts().to_arrow())
        seen = windows.seen()
        meta["seen"] = seen is not None
        meta["seen_from_ms"] = windows.seen_from_ms
        meta["counts_from_ms"] = windows.counts_from_ms
        kept = kept.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
        data = _ipc(kept)
        tail = _ipc(seen.to_arrow()) if seen is not None else b""
        return _sized(data) + _sized(counts) + tail
    kept = kept.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    data = _ipc(kept)
    if second is not None:
        return _sized(data) + _ipc(second)
    return data


def _sized(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _read(data: bytes) -> tuple[dict[str, Any], pl.DataFrame]:
    table = pa.ipc.open_stream(data).read_all()
    meta = json.loads((table.schema.metadata or {})[_META_KEY])
    kept = pl.from_arrow(table.replace_schema_metadata(None))
    assert isinstance(kept, pl.DataFrame)
    return meta, kept


def decode_visitor_windows(data: bytes, horizon_ms: int) -> VisitorWindows:
    """The visitor family's windows of a snapshot (a longer horizon from now on decides no
    click twice: ``decided_until_ms`` is saved, not derived): its undecided records, then
    its chains. A snapshot of a build that kept decided clicks whole is one stream alone
    (it starts with the IPC stream's marker, never a length): it restores without chains."""
    anchors: pl.DataFrame | None = None
    if data[:4] == _IPC_MARKER:
        meta, kept = _read(data)
    else:
        size = int.from_bytes(data[:8], "little")
        meta, kept = _read(data[8 : 8 + size])
        frame = pl.from_arrow(pa.ipc.open_stream(data[8 + size :]).read_all())
        assert isinstance(frame, pl.DataFrame)
        anchors = frame
    decided = meta["decided_until_ms"]
    chains = meta.get("chains")
    return VisitorWindows.restore(
        horizon_ms,
        high_water={int(p): int(o) for p, o in meta["high_water"].items()},
        max_event_ms=int(meta["max_event_ms"]),
        decided_until_ms=None if decided is None else int(decided),
        kept=kept,
        starts=None if chains is None else {int(w): start for w, start in chains.items()},
        anchors=anchors,
        context_from_ms=_optional_int(meta.get("context_from_ms")),
    )


def decode_ad_windows(data: bytes, horizon_ms: int) -> AdWindows:
    """The ad family's windows of a snapshot: its undecided clicks, its per-(ad, hour)
    counts, then the impressions it keeps, if any. A snapshot of a build that kept every raw
    event (its metadata says nothing of ``seen``) has the counts last, and its impressions
    among the records."""
    size = int.from_bytes(data[:8], "little")
    meta, kept = _read(data[8 : 8 + size])
    rest = data[8 + size :]
    seen: pl.DataFrame | None = None
    if "seen" in meta:
        counts_size = int.from_bytes(rest[:8], "little")
        counts_data, tail = rest[8 : 8 + counts_size], rest[8 + counts_size :]
        if meta["seen"]:
            frame = pl.from_arrow(pa.ipc.open_stream(tail).read_all())
            assert isinstance(frame, pl.DataFrame)
            seen = frame
    else:
        counts_data = rest
    counts = pl.from_arrow(pa.ipc.open_stream(counts_data).read_all())
    assert isinstance(counts, pl.DataFrame)
    decided = meta["decided_until_ms"]
    seen_from = meta.get("seen_from_ms")
    # A snapshot of a build that did not record it kept whole hours of counts from its
    # earliest one on (older ones were forgotten whole).
    counts_from = meta.get("counts_from_ms", counts["_hour"].min() if counts.height else None)
    return AdWindows.restore(
        horizon_ms,
        high_water={int(p): int(o) for p, o in meta["high_water"].items()},
        max_event_ms=int(meta["max_event_ms"]),
        decided_until_ms=None if decided is None else int(decided),
        kept=kept,
        counts=counts,
        seen=seen,
        seen_from_ms=None if seen_from is None else int(seen_from),
        counts_from_ms=None if counts_from is None else int(counts_from),
        context_from_ms=_optional_int(meta.get("context_from_ms")),
    )


def _optional_int(value: int | None) -> int | None:
    """A snapshot's optional time (absent in a build's before it: None)."""
    return None if value is None else int(value)


def decode_windows(data: bytes, horizon_ms: int) -> KeyedWindows:
    """The windows of a snapshot, keeping ``horizon_ms`` from now on (the setting's, which
    may have changed since: records it no longer reaches are forgotten at the next step)."""
    table = pa.ipc.open_stream(data).read_all()
    meta = json.loads((table.schema.metadata or {})[_META_KEY])
    kept = pl.from_arrow(table.replace_schema_metadata(None))
    assert isinstance(kept, pl.DataFrame)
    return KeyedWindows.restore(
        horizon_ms,
        high_water={int(p): int(o) for p, o in meta["high_water"].items()},
        max_event_ms=int(meta["max_event_ms"]),
        kept=kept,
        context_from_ms=_optional_int(meta.get("context_from_ms")),
    )
