"""Both keyed families over real logs and a real store: ``repeat_click`` in the stream as
the batch judges it, whatever the number of partitions; a click that the IP family's
velocity rule and ``repeat_click`` both flag is corrected once, named by velocity (first in
the built-in order), whichever family commits first; a crash between any two steps
changes nothing."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from clickagg.core import ids
from clickagg.core.visitor import visitor_records
from clickagg.keyed.stage1 import KeyedAppender, KeyedAppenders, Records
from clickagg.keyed.stage2 import FAMILY_KEYS, VISITOR, Family, KeyedStage, keyed_status
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import step_all
from tests.conftest import Ev
from tests.keyed.test_stages import (
    BOT,
    KEYED_SEGMENT_BYTES,
    KEYED_SNAPSHOT_RECORDS,
    LIMIT,
    MINUTE_MS,
    RULE,
    T0,
    Key,
    KeyedRig,
)
from tests.worker.test_stream import Crash, CrashError

REPEAT = "repeat-click"
WINDOW_MS = 30_000  # the built-in repeat-click's window
AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"
ADS = ("ad-1", "ad-2", "ad-3", "ad-4")


def repeat_traffic(seed: int = 5) -> list[Ev]:
    """Users clicking one ad again within 30 s (from addresses of their own), visitors known
    by address and agent only, a bot click (flagged in stage 1) that a real click repeats,
    and a one-address burst over the velocity limit whose users also repeat; copies,
    shuffled. Within 5 minutes: stage 1 keeps them all."""
    rng = random.Random(seed)
    events: list[Ev] = []

    def click(event_id: str, ad: str, ts: int, ip: str, user: str | None, ua: str | None) -> None:
        cost = rng.choice([1_000, 2_500])
        events.append(Ev(event_id, ad, ts, ip=ip, user_id=user, user_agent=ua, cost_micros=cost))

    for i in range(LIMIT + 20):  # velocity: every click; repeat-click: many of them too
        ts = T0 + MINUTE_MS + rng.randrange(MINUTE_MS)
        click(f"b{i}", ADS[i % 2], ts, "198.51.100.7", f"u{i % 5}", None)
    for n in range(30):  # 0 s counts, 10 s and 25 s repeat it, 45 s counts again
        base = T0 + rng.randrange(4 * MINUTE_MS)
        for j, dt in enumerate((0, 10_000, 25_000, 45_000)):
            click(f"r{n}-{j}", ADS[n % 4], base + dt, f"203.0.113.{n}", f"r{n}", None)
    for n in range(20):  # no user: the address and agent are the visitor
        base = T0 + rng.randrange(4 * MINUTE_MS)
        for j, dt in enumerate((0, 5_000)):
            click(f"a{n}-{j}", "ad-3", base + dt, f"192.0.2.{n}", None, AGENT)
    for n in range(10):  # the bot click counts (the batch sees every winner): 10 s repeats it
        base = T0 + rng.randrange(4 * MINUTE_MS)
        click(f"k{n}-0", "ad-2", base, f"198.18.0.{n}", f"k{n}", BOT)
        click(f"k{n}-1", "ad-2", base + 10_000, f"198.18.0.{n}", f"k{n}", None)
    events += rng.sample(events, 30)  # retransmitted copies
    rng.shuffle(events)
    return events


def ticks() -> list[Ev]:
    """Later clicks on every visitor partition: they move the horizon past the traffic."""
    return [
        Ev(f"t{n}", "ad-4", T0 + 20 * MINUTE_MS + n, ip=f"10.9.0.{n}", user_id=f"t{n}")
        for n in range(64)
    ]


def reference(events: list[Ev]) -> dict[str, str]:
    """Per flagged click its reason, from the traffic alone: stage 1's bot rule, else
    velocity (more than LIMIT clicks from the address in the minute), else a repeat of the
    visitor's counted click on the ad (every distinct click in the chain, equal times in
    event id order; all in one hour, whose context starts before the traffic)."""
    distinct = [
        e for e in {(e.event_type, e.event_id): e for e in events}.values() if e.event_type == 0
    ]
    per_minute = Counter((e.ip, e.ts_ms // MINUTE_MS) for e in distinct)
    chains: dict[tuple[str, str], list[Ev]] = defaultdict(list)
    for e in distinct:
        visitor = f"u:{e.user_id}" if e.user_id else f"a:{e.ip} {e.user_agent}"
        chains[(visitor, e.ad_id)].append(e)
    repeats = set()
    for chain in chains.values():
        counted = None
        for e in sorted(chain, key=lambda e: (e.ts_ms, e.event_id)):
            if counted is not None and e.ts_ms - counted < WINDOW_MS:
                repeats.add(e.event_id)
            else:
                counted = e.ts_ms
    out = {}
    for e in distinct:
        if e.user_agent == BOT:
            out[e.event_id] = "non-browser-client"
        elif per_minute[(e.ip, e.ts_ms // MINUTE_MS)] > LIMIT:
            out[e.event_id] = RULE
        elif e.event_id in repeats:
            out[e.event_id] = REPEAT
    return out


class BothFamiliesRig(KeyedRig):
    """The keyed rig with a second family beside the IP family (the visitor family; the ad
    family in ``test_ad_stage``), as the worker runs them: one appender per family behind
    one, one stage each, one store, counters and corrections archive. ``ip_paused``: the IP
    family's stage waits (its verdicts then reach the store after the other family's)."""

    ip_paused = False
    family: Family = VISITOR
    records: Records = staticmethod(visitor_records)
    clicks_only = True

    def _open(self) -> None:
        super()._open()
        s = self.settings
        directory = s.keyed_dir / self.family.name
        self.family_writer = SegmentLogWriter(
            directory / "log",
            s.keyed_partitions,
            segment_bytes=KEYED_SEGMENT_BYTES,
            retention_ms=0,
            retention_bytes=0,
        )
        self.family_reader = SegmentLogReader(directory / "log")
        self.family_snapshots = SnapshotStore(directory / "snapshots")
        second = KeyedAppender(
            self.family_writer,
            directory / "stage1.json",
            self.store.committed_offsets(),
            records=self.records,
            clicks_only=self.clicks_only,
        )
        self.ip_appender = self.appender
        self.appender = KeyedAppenders([self.ip_appender, second])  # type: ignore[assignment]

    def start(self) -> None:
        super().start()
        self.family_stage = KeyedStage(
            self.family_reader,
            self.store,
            rules=self.stage.rules,
            clock=self.clock,
            allowed_lateness_ms=self.settings.allowed_lateness_ms,
            batch_records=29,
            counters=self.counters,
            corrections=self.corrections,
            snapshots=self.family_snapshots,
            trim=self._family_trim,
            snapshot_records=KEYED_SNAPSHOT_RECORDS,
            family=self.family,
        )
        wrap = self.crash.wrap
        wrap(self.family_writer, "sync", before="keyed-before-sync", after="keyed-after-sync")
        wrap(self.family_reader, "read", after="keyed-after-read")
        wrap(self.family_snapshots, "save", before="keyed-before-snapshot", after="keyed-snapshot")

    def _family_trim(self, partition: int, keep_from: int) -> int:
        deleted = self.family_writer.apply_retention(partition, keep_from=keep_from, now_ms=0)
        self.trimmed += deleted
        return deleted

    def restart(self) -> None:
        self.family_reader.close()
        self.family_writer.close()
        super().restart()

    def run(self) -> None:
        for _ in range(3000):
            try:
                processed = step_all(self.workers, self.store, self.counters)
                processed += self.family_stage.step()
                if not self.ip_paused:
                    processed += self.stage.step()
                if processed == 0:
                    self.corrections.flush()
            except CrashError:
                self.restart()
                continue
            if self.crash.died_in_background:
                self.restart()
                continue
            if processed == 0:
                return
        raise AssertionError("the stages did not drain")

    def close(self) -> None:
        super().close()
        self.family_reader.close()
        self.family_writer.close()


def _run(
    root: Path,
    events: list[Ev],
    partitions: int,
    keyed: int,
    *,
    crash: Crash | None = None,
    visitor_first: bool = False,
) -> tuple[dict[str, Counter[Key]], Counter[str], pa.Table, BothFamiliesRig]:
    rig = BothFamiliesRig(root, partitions=partitions, keyed_partitions=keyed, crash=crash)
    rig.ip_paused = visitor_first
    try:
        half = len(events) // 2
        rig.send(events[:half])
        rig.run()
        rig.send(events[half:])
        rig.run()
        rig.send(ticks())
        rig.run()
        rig.ip_paused = False
        rig.run()
        result = rig.counts(), rig.realtime()
    finally:
        rig.close()
    return (*result, rig.corrected(), rig)


def check(
    counts: dict[str, Counter[Key]],
    realtime: Counter[str],
    corrected: pa.Table,
    events: list[Ev],
) -> None:
    expected = reference(events)
    distinct = {e.event_id: e for e in [*events, *ticks()] if e.event_type == ids.CLICK}
    want: dict[str, Counter[Key]] = defaultdict(Counter)
    for event_id, e in distinct.items():
        key = (e.ad_id, e.ts_ms - e.ts_ms % MINUTE_MS)
        if event_id in expected:
            want["invalid_clicks"][key] += 1
            want[f"reason {expected[event_id]}"][key] += 1
        else:
            want["clicks"][key] += 1
            want["spend_micros"][key] += max(e.cost_micros, 0)
    for name, counter in want.items():
        assert counts.get(name, Counter()) == +counter, name
    assert counts.get(f"reason {REPEAT}", Counter()).total() > 0  # the test's premise
    assert realtime == Counter(
        clicks=counts["clicks"].total(),
        spend_micros=counts["spend_micros"].total(),
        invalid=counts["invalid_clicks"].total(),
    )
    # The archive: each keyed-corrected click once (one row without a previous rule), its
    # last row naming the reason the counts name.
    rows: dict[str, list[dict[str, object]]] = defaultdict(list)
    for row in sorted(corrected.to_pylist(), key=lambda r: (r["corrected_at_ms"], r["rule_id"])):
        rows[str(row["event_id"])].append(row)
    keyed = {e for e, reason in expected.items() if reason in (RULE, REPEAT)}
    assert set(rows) == keyed
    for event_id, history in rows.items():
        assert [r["previous_rule_id"] for r in history].count(None) == 1, history
        final = [r for r in history if r["rule_id"] == expected[event_id]]
        assert len(final) == 1, history


@pytest.mark.parametrize(("partitions", "keyed"), [(1, 1), (4, 4), (16, 3)])
def test_repeat_clicks_are_corrected_as_the_batch_flags_them_whatever_the_partitions(
    tmp_path: Path, partitions: int, keyed: int
) -> None:
    events = repeat_traffic()
    counts, realtime, corrected, _ = _run(tmp_path, events, partitions, keyed)
    check(counts, realtime, corrected, events)
    sample = corrected.filter(pa.compute.equal(corrected["event_id"], "r3-1"))
    assert sample["rule_id"].to_pylist() == [REPEAT]
    assert sample["keyed_partition"][0].as_py() >= FAMILY_KEYS  # the visitor family's keys
    assert sample["evidence"][0].as_py().startswith("user r3 clicked ad ad-4 again 10.0 s")


@pytest.mark.parametrize("visitor_first", [False, True])
def test_a_click_both_families_flag_is_corrected_once_in_either_commit_order(
    tmp_path: Path, visitor_first: bool
) -> None:
    events = repeat_traffic()
    counts, realtime, corrected, _ = _run(tmp_path, events, 4, 2, visitor_first=visitor_first)
    check(counts, realtime, corrected, events)
    burst = corrected.filter(pa.compute.starts_with(corrected["event_id"], "b")).to_pylist()
    moved = [r for r in burst if r["previous_rule_id"] == REPEAT]
    # Velocity names every burst click; when repeat-click came first, its corrections moved.
    assert {r["rule_id"] for r in burst} == ({RULE, REPEAT} if visitor_first else {RULE})
    assert bool(moved) == visitor_first


@pytest.mark.parametrize(
    "point",
    [
        "keyed-after-read",
        "keyed-inside-commit",
        "keyed-after-commit",
        "after-counters",
        "corrections-before-publish",
        "keyed-snapshot",
    ],
)
def test_a_crash_between_any_two_steps_of_either_family_changes_nothing(
    tmp_path: Path, point: str
) -> None:
    events = repeat_traffic()
    crash = Crash(point, at=3, times=4)
    counts, realtime, corrected, _ = _run(tmp_path, events, 4, 3, crash=crash)
    assert crash.fired >= 1
    check(counts, realtime, corrected, events)


def test_keyed_status_covers_both_families(tmp_path: Path) -> None:
    events = repeat_traffic()
    rig = BothFamiliesRig(tmp_path, partitions=2, keyed_partitions=2)
    try:
        rig.send(events)
        rig.run()
        status = keyed_status(rig.keyed_reader, rig.store, rig.family_reader)
        assert [p.keyed_partition for p in status.partitions] == [0, 1, 1024, 1025]
        assert all(p.consumed_offset == p.durable_end_offset > 0 for p in status.partitions)
        assert status.corrections_by_rule[RULE] == LIMIT + 20
    finally:
        rig.close()
