"""The embedded segment log, on real files: durability, recovery, retention, disk full."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from clickagg.api.committer import merge_columns
from clickagg.core import columns, ids
from clickagg.core.events import decode_many, normalize
from clickagg.log.base import Frame, LogFullError
from clickagg.log.segments import HEADER, SegmentLogReader, SegmentLogWriter

BIG = 10**15


def payload(p: int, base: int, count: int) -> bytes:
    """Payloads name their own position, so any misplaced or corrupted frame shows."""
    return f"{p}:{base}:{count};".encode() * (1 + base % 4)


def open_writer(d: Path, partitions: int = 3, **kw: int) -> SegmentLogWriter:
    kw.setdefault("retention_ms", BIG)
    kw.setdefault("retention_bytes", BIG)
    return SegmentLogWriter(d, partitions, **kw)


def fill(w: SegmentLogWriter, p: int, frames: int, start: int = 0) -> list[tuple[int, int]]:
    """Append ``frames`` frames of 1..4 events; return their (base, count)."""
    out, nxt = [], start
    for i in range(frames):
        count = 1 + i % 4
        assert w.append(p, payload(p, nxt, count), count) == nxt
        out.append((nxt, count))
        nxt += count
    return out


def read_all(r: SegmentLogReader, p: int, start: int = 0, max_events: int = 7) -> list[Frame]:
    frames: list[Frame] = []
    nxt = start
    while batch := r.read(p, nxt, max_events):
        frames += batch
        nxt = batch[-1].end_offset
    return frames


def check_frames(frames: list[Frame], p: int, start: int, end: int) -> None:
    assert frames, "no frames"
    assert frames[0].base_offset <= start < frames[0].end_offset or frames[0].base_offset == start
    for a, b in itertools.pairwise(frames):
        assert a.end_offset == b.base_offset
    for f in frames:
        assert f.partition == p and f.payload == payload(p, f.base_offset, f.count)
    assert frames[-1].end_offset == end


def test_round_trip_contiguous_and_random_access(tmp_path: Path) -> None:
    with open_writer(tmp_path) as w:
        written = {p: fill(w, p, 10 + p) for p in range(3)}
        w.sync()
    ends = {p: sum(c for _, c in fr) for p, fr in written.items()}
    with SegmentLogReader(tmp_path) as r:
        assert r.partitions == 3
        for p in range(3):
            assert r.durable_end(p) == ends[p] and r.start_offset(p) == 0
            frames = read_all(r, p)
            assert [(f.base_offset, f.count) for f in frames] == written[p]
            check_frames(frames, p, 0, ends[p])
            for off in range(ends[p]):  # every offset, also mid-frame, on one cursor
                first = r.read(p, off, 1)[0]
                assert first.base_offset <= off < first.end_offset
            assert r.read(p, ends[p], 100) == []
        batch = r.read(0, 0, 5)  # stops once at least max_events are returned
        assert sum(f.count for f in batch) >= 5 and sum(f.count for f in batch[:-1]) < 5
        assert len(r.read(0, 0, 0)) == 1


def test_nothing_beyond_durable_end(tmp_path: Path) -> None:
    w = open_writer(tmp_path)
    r = SegmentLogReader(tmp_path)
    try:
        fill(w, 1, 3)
        assert r.durable_end(1) == 0 and r.read(1, 0, 100) == []
        w.sync()
        end = r.durable_end(1)
        assert end == 1 + 2 + 3
        fill(w, 1, 2, start=end)  # appended, not synced
        check_frames(r.read(1, 0, 100), 1, 0, end)
        assert r.read(1, end, 100) == []
        w.sync()
        check_frames(r.read(1, end, 100), 1, end, end + 3)
    finally:
        r.close()
        w.close()


READER_CHILD = """
import sys
from pathlib import Path
from clickagg.log.segments import SegmentLogReader
r = SegmentLogReader(Path(sys.argv[1]))
print("ready", flush=True)
for _ in sys.stdin:
    frames = r.read(0, 0, 1000)
    listing = ",".join(f"{f.base_offset}/{f.count}/{f.payload.hex()}" for f in frames)
    print(r.durable_end(0), listing, flush=True)
"""


def test_reader_in_another_process_sees_frames_after_sync(tmp_path: Path) -> None:
    w = open_writer(tmp_path, partitions=1)
    with (
        subprocess.Popen(
            [sys.executable, "-c", READER_CHILD, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child,
        w,
    ):
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        written = fill(w, 0, 4)

        def ask() -> str:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("read\n")
            child.stdin.flush()
            return child.stdout.readline().strip()

        assert ask() == "0"  # appended but not synced: invisible
        w.sync()
        end, listing = ask().split(" ")
        assert int(end) == 10
        want = [f"{b}/{c}/{payload(0, b, c).hex()}" for b, c in written]
        assert listing.split(",") == want
        child.stdin.close()
        assert child.wait(timeout=10) == 0


def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    with open_writer(tmp_path, partitions=2, segment_bytes=200) as w:
        written = fill(w, 1, 60)
        w.sync()
    end = sum(c for _, c in written)
    names = sorted(os.listdir(tmp_path / "p0001"))
    assert len(names) > 10
    bases = [int(n.removesuffix(".seg")) for n in names]
    assert set(bases) <= {b for b, _ in written}  # named by the offset of their first frame
    for n in names:
        assert (tmp_path / "p0001" / n).stat().st_size <= 200
    with SegmentLogReader(tmp_path) as r:
        for max_events in (1, 5, 1000):
            check_frames(read_all(r, 1, 0, max_events), 1, 0, end)
        for off in (0, bases[3], bases[3] - 1, bases[-1], end - 1):
            assert r.read(1, off, 1)[0].base_offset <= off < r.read(1, off, 1)[0].end_offset
        assert read_all(r, 0) == []


def frame_bytes(base: int, count: int, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(base.to_bytes(8, "little") + count.to_bytes(4, "little")))
    return HEADER.pack(len(body), crc, base, count) + body


@pytest.mark.parametrize("tail", ["garbage", "half_frame", "flipped_byte", "header_only", "gap"])
def test_recovery_truncates_torn_tail(tmp_path: Path, tail: str) -> None:
    with open_writer(tmp_path, partitions=2, segment_bytes=300) as w:
        written = fill(w, 0, 25)
        w.sync()
        fill(w, 1, 3)
        w.sync()
    end = sum(c for _, c in written)
    seg = sorted((tmp_path / "p0000").iterdir())[-1]
    good_size = seg.stat().st_size
    good = frame_bytes(end, 2, payload(0, end, 2))
    torn = {
        "garbage": os.urandom(37),
        "half_frame": good[: len(good) // 2],
        "flipped_byte": good[:-1] + bytes([good[-1] ^ 1]),
        "header_only": good[: HEADER.size],
        "gap": frame_bytes(end + 1, 2, payload(0, end + 1, 2)),  # valid crc, wrong offset
    }[tail]
    with seg.open("ab") as f:
        f.write(torn)
    with open_writer(tmp_path, partitions=2, segment_bytes=300) as w:
        assert seg.stat().st_size == good_size
        assert w.append(0, payload(0, end, 3), 3) == end
        assert w.append(1, payload(1, 6, 1), 1) == 6
        w.sync()
    with SegmentLogReader(tmp_path) as r:
        check_frames(read_all(r, 0), 0, 0, end + 3)
        check_frames(read_all(r, 1), 1, 0, 7)


def test_recovery_keeps_an_empty_last_segment(tmp_path: Path) -> None:
    """A crash right after a roll leaves the new segment empty: its name is the next offset."""
    with open_writer(tmp_path, partitions=1) as w:
        written = fill(w, 0, 5)
        w.sync()
    end = sum(c for _, c in written)
    (tmp_path / "p0000" / f"{end:020d}.seg").touch()
    with open_writer(tmp_path, partitions=1) as w:
        assert w.append(0, payload(0, end, 2), 2) == end
        w.sync()
    assert (tmp_path / "p0000" / f"{end:020d}.seg").stat().st_size > 0
    with SegmentLogReader(tmp_path) as r:
        check_frames(read_all(r, 0), 0, 0, end + 2)


def test_sync_in_another_thread_while_appending(tmp_path: Path) -> None:
    """Group commit: fsync runs outside the lock, so appends during it must not be lost or
    published early."""
    stop = threading.Event()
    errors: list[BaseException] = []
    with open_writer(tmp_path, segment_bytes=2000) as w, SegmentLogReader(tmp_path) as r:

        def syncer() -> None:
            try:
                while not stop.is_set():
                    w.sync()
                    for p in range(3):  # whatever is published is readable and correct
                        end = r.durable_end(p)
                        if end:
                            check_frames(r.read(p, end - 1, 1), p, end - 1, end)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=syncer)
        thread.start()
        nxt = [0, 0, 0]
        for i in range(3000):
            p, count = i % 3, 1 + i % 4
            assert w.append(p, payload(p, nxt[p], count), count) == nxt[p]
            nxt[p] += count
        stop.set()
        thread.join()
        assert not errors, errors
        w.sync()
        for p in range(3):
            check_frames(read_all(r, p, 0, 500), p, 0, nxt[p])


WRITER_CHILD = """
import sys
from pathlib import Path
from clickagg.log.segments import SegmentLogWriter
P = 3
w = SegmentLogWriter(Path(sys.argv[1]), P, segment_bytes=4096, retention_ms=1, retention_bytes=1)
nxt = [0] * P
i = 0
while True:
    p, count = i % P, 1 + i % 5
    body = f"{p}:{nxt[p]}:{count};".encode() * (1 + nxt[p] % 4)
    assert w.append(p, body, count) == nxt[p]
    nxt[p] += count
    i += 1
    if i % 4 == 0:
        w.sync()
        print(*nxt, flush=True)
"""


def test_kill_9_keeps_every_acknowledged_frame(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        try:
            for _ in range(3):
                assert child.stdout.readline().endswith("\n")
            time.sleep(0.5)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            rest = child.stdout.read()
            child.wait(timeout=10)
    lines = [ln for ln in rest.split("\n")[:-1] if ln]  # the last piece may be cut
    acked = [int(x) for x in lines[-1].split()] if lines else [1, 1, 1]
    assert child.returncode == -signal.SIGKILL
    with open_writer(tmp_path, segment_bytes=4096) as w, SegmentLogReader(tmp_path) as r:
        for p in range(3):
            end = r.durable_end(p)
            assert end >= acked[p]
            check_frames(read_all(r, p, 0, 50), p, 0, end)
            assert w.append(p, payload(p, end, 1), 1) == end


def test_single_writer_and_partition_count_fixed(tmp_path: Path) -> None:
    with open_writer(tmp_path, partitions=4), pytest.raises(RuntimeError, match="another"):
        open_writer(tmp_path, partitions=4)
    with pytest.raises(ValueError, match=r"4 partitions.*\b5\b"):
        open_writer(tmp_path, partitions=5)
    open_writer(tmp_path, partitions=4).close()  # the lock went with the failed opens


def segment_bases(d: Path, p: int = 0) -> list[int]:
    return sorted(int(n.removesuffix(".seg")) for n in os.listdir(d / f"p{p:04d}"))


def test_retention_by_age(tmp_path: Path) -> None:
    with open_writer(tmp_path, partitions=1, segment_bytes=200, retention_ms=60_000) as w:
        written = fill(w, 0, 40)
        w.sync()
        end = sum(c for _, c in written)
        bases = segment_bases(tmp_path)
        now_ms = time.time_ns() // 1_000_000
        assert w.apply_retention(0, keep_from=end, now_ms=now_ms) == 0  # all young
        old = (now_ms - 120_000) / 1000
        for b in bases[:-1]:
            os.utime(tmp_path / "p0000" / f"{b:020d}.seg", (old, old))
        keep_from = bases[5] + 1  # inside segment 5: segments 0..4 end at or before it
        assert w.apply_retention(0, keep_from=keep_from, now_ms=now_ms) == 5
        assert segment_bases(tmp_path) == bases[5:]
        with SegmentLogReader(tmp_path) as r:
            assert r.start_offset(0) == bases[5]
            assert r.read(0, 0, 1)[0].base_offset == bases[5]  # below start: from the oldest
            check_frames(read_all(r, 0, bases[5]), 0, bases[5], end)
        # Even when everything is old and no longer needed, the active segment stays.
        for b in segment_bases(tmp_path):
            os.utime(tmp_path / "p0000" / f"{b:020d}.seg", (old, old))
        assert w.apply_retention(0, keep_from=BIG, now_ms=now_ms) == len(bases) - 6
        assert segment_bases(tmp_path) == bases[-1:]


def test_retention_by_size(tmp_path: Path) -> None:
    with open_writer(tmp_path, partitions=1, segment_bytes=200, retention_bytes=1000) as w:
        fill(w, 0, 40)
        w.sync()
        bases = segment_bases(tmp_path)
        now_ms = time.time_ns() // 1_000_000
        assert w.apply_retention(0, keep_from=bases[2], now_ms=now_ms) == 2  # keep_from wins
        deleted = w.apply_retention(0, keep_from=BIG, now_ms=now_ms)
        left = segment_bases(tmp_path)
        assert left == bases[2 + deleted :]
        sizes = [(tmp_path / "p0000" / f"{b:020d}.seg").stat().st_size for b in left]
        assert sum(sizes) <= 1000 < sum(sizes) + 200  # oldest first, just enough


def test_reader_cursor_survives_retention(tmp_path: Path) -> None:
    with open_writer(tmp_path, partitions=1, segment_bytes=200, retention_ms=0) as w:
        written = fill(w, 0, 30)
        w.sync()
        end = sum(c for _, c in written)
        bases = segment_bases(tmp_path)
        with SegmentLogReader(tmp_path) as r, SegmentLogReader(tmp_path) as behind:
            first = r.read(0, 0, bases[2] + 1)  # the cursor stops inside segment 2
            assert bases[2] < first[-1].end_offset <= bases[3]
            stale = behind.read(0, 0, 1)  # this cursor stays in segment 0
            w.apply_retention(0, keep_from=bases[3], now_ms=time.time_ns() // 1_000_000 + 10)
            assert segment_bases(tmp_path) == bases[3:]
            rest = read_all(r, 0, first[-1].end_offset, 3)  # the open file still reads
            check_frames(first + rest, 0, 0, end)
            fill(w, 0, 10, start=end)  # new segments appear behind the cursor
            w.sync()
            check_frames(read_all(r, 0, end, 3), 0, end, r.durable_end(0))
            # Segments 1 and 2 vanished unread: the cursor goes on at the oldest one left.
            skipped = read_all(behind, 0, stale[-1].end_offset, 3)
            gap_at = next(f for f in skipped if f.base_offset >= bases[1])
            assert gap_at.base_offset == bases[3]
            check_frames(stale + skipped[: skipped.index(gap_at)], 0, 0, bases[1])
            check_frames(skipped[skipped.index(gap_at) :], 0, bases[3], r.durable_end(0))


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs to fill: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_raises_log_full_and_rolls_back(tiny_fs: Path) -> None:
    w = open_writer(tiny_fs, partitions=2)
    r = SegmentLogReader(tiny_fs)
    try:
        nxt, body = 0, b"x" * 3000
        with pytest.raises(LogFullError) as caught:
            for _ in range(100):
                assert w.append(0, body + nxt.to_bytes(8, "little"), 2) == nxt
                w.sync()
                nxt += 2
        assert isinstance(caught.value, OSError)
        assert r.durable_end(0) == nxt
        seg = tiny_fs / "p0000" / f"{0:020d}.seg"
        assert seg.stat().st_size == (nxt // 2) * (HEADER.size + 3008)  # no half frame
        assert w.append(0, b"small", 1) == nxt  # offsets stay contiguous
        w.sync()
        frames = read_all(r, 0)
        assert [f.base_offset for f in frames] == [*range(0, nxt, 2), nxt]
        assert all(f.payload[-8:] == f.base_offset.to_bytes(8, "little") for f in frames[:-1])
        # A failed append drops the partition's unsynced frames, so the next sync must fail
        # rather than acknowledge them.
        assert w.append(0, b"pending", 1) == nxt + 1
        with pytest.raises(LogFullError):
            w.append(0, b"y" * (2 << 20), 1)
        with pytest.raises(LogFullError):
            w.sync()
        assert r.durable_end(0) == nxt + 1
        assert w.append(0, b"again", 1) == nxt + 1
        w.sync()
        assert [f.payload for f in r.read(0, nxt, 10)] == [b"small", b"again"]
    finally:
        r.close()
        w.close()


def test_frames_of_ingested_events_read_back_with_plain_pyarrow(tmp_path: Path) -> None:
    """What ingest writes is an Arrow IPC stream of the documented schema: a consumer of the
    log (an archiver, Spark) needs pyarrow, not clickagg, to read it."""
    now_ms = 1_700_000_100_000
    requests = [
        [
            {
                "event_type": "click",
                "event_id": "c-1",
                "ad_id": "ad-1",
                "advertiser_id": 7,
                "campaign_id": "spring",
                "user_id": "ü-1",
                "timestamp": 1_700_000_000,
                "ip": "203.0.113.9",
                "user_agent": "Mozilla/5.0 (Linux)",
                "country": "de",
                "device": "Mobile",
                "browser": "Firefox",
                "cost_micros": 500_000,
            },
            {"event_type": "impression", "impression_id": 42, "ad_id": 9, "timestamp": 1e12},
        ],
        [{"event_type": "click", "click_id": "日本-2", "ad_id": "ad-2", "timestamp": 1.7e12}],
        [{"event_type": "impression", "event_id": "i-3", "ad_id": "ad-3", "timestamp": 1.7e9}],
    ]
    batches = [
        normalize(
            decode_many(json.dumps(events).encode(), ndjson=False)[0],
            default_type=None,
            partitions=1,
            now_ms=now_ms,
            max_future_ms=0,
        ).by_partition[0]
        for events in requests
    ]
    with open_writer(tmp_path, partitions=1) as w:
        for group in (batches[:2], batches[2:]):  # the group committer: a frame per group
            merged = merge_columns(group)
            w.append(0, columns.encode(merged), merged.count)
        w.sync()
    with SegmentLogReader(tmp_path) as r:
        frames = read_all(r, 0)
    assert [(f.base_offset, f.count) for f in frames] == [(0, 3), (3, 1)]

    def event(kind: int, event_id: str, ad_id: str, ts_ms: int, **text: Any) -> dict[str, Any]:
        fp_high, fp_low = ids.fingerprint(kind, event_id)
        user_id = text.pop("user_id", None)
        return {
            "fp_high": fp_high,
            "fp_low": fp_low,
            "event_type": kind,
            "ts_ms": ts_ms,
            "received_ms": now_ms,
            "cost_micros": text.pop("cost_micros", -1),
            "user_hash": ids.user_hash(user_id),
            "event_id": event_id,
            "ad_id": ad_id,
            **dict.fromkeys(("advertiser_id", "campaign_id"), None),
            "user_id": user_id,
            **dict.fromkeys(("ip", "user_agent", "country", "device", "browser"), None),
            **text,
        }

    expected = [
        event(
            ids.CLICK,
            "c-1",
            "ad-1",
            1_700_000_000_000,
            advertiser_id="7",
            campaign_id="spring",
            user_id="ü-1",
            ip="203.0.113.9",
            user_agent="Mozilla/5.0 (Linux)",
            country="DE",
            device="mobile",
            browser="Firefox",
            cost_micros=500_000,
        ),
        event(ids.IMPRESSION, "42", "9", 1_000_000_000_000),
        event(ids.CLICK, "日本-2", "ad-2", 1_700_000_000_000),
        event(ids.IMPRESSION, "i-3", "ad-3", 1_700_000_000_000),
    ]
    tables = [pa.ipc.open_stream(f.payload).read_all() for f in frames]
    assert all(t.schema.equals(columns.SCHEMA) for t in tables)
    assert [t.num_rows for t in tables] == [f.count for f in frames]  # offsets count events
    assert [row for t in tables for row in t.to_pylist()] == expected
