"""The keyed stage over a real segment log, a real keyed log and a real DuckDB store: per-IP
click velocity and one address's spread over many ads are exact whatever the number of
partitions, and a crash between any two steps of either stage changes nothing in the final
counts."""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from clickagg.archive.corrections import ParquetCorrectionReader, corrections_writer
from clickagg.archive.parquet import CORRECTIONS, ParquetArchiveReader, ParquetArchiveWriter
from clickagg.clock import FixedClock
from clickagg.config import Settings
from clickagg.core import columns, ids
from clickagg.core.keyed import KeyedRules, KeyedWindows, VelocityRule
from clickagg.core.windows import MINUTE_MS
from clickagg.keyed.stage1 import (
    KeyedAppender,
    KeyedGapError,
    context_of,
    decode_records,
    retire_marker,
)
from clickagg.keyed.stage2 import KeyedStage, keyed_status
from clickagg.log.base import Frame
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.realtime.memory import InMemoryCounters
from clickagg.runtime.worker import refill_counters
from clickagg.store.base import KeyedCommit, KeyedProgress
from clickagg.store.duckdb_store import DuckDBStore
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import PartitionWorker, rules_watcher, step_all
from tests.conftest import Ev, build_columns
from tests.worker.test_stream import Crash, CrashError

T0 = 1_700_000_000_000 - 1_700_000_000_000 % (60 * MINUTE_MS)
DAY = 24 * 60 * MINUTE_MS
ADS = ("ad-1", "ad-2", "ad-3", "ad-4")
LIMIT = 60  # the built-in rule's max_clicks_per_minute
RULE = "ip-click-velocity"
MAX_ADS, SPREAD_MS = 20, 10 * MINUTE_MS  # the built-in ip-ad-spread rule's
SPREAD = "ip-ad-spread"
SPREAD_ADS = tuple(f"ad-s{n}" for n in range(30))  # spread_traffic's
BOT = "curl/8.0"  # the built-in non-browser-client rule flags it in stage 1


def burst_traffic(seed: int = 7) -> list[Ev]:
    """A 300-click burst from one IP over 4 ads in one minute, an IP at exactly the limit,
    one just over it in the next minute, normal traffic from many IPs, impressions, a few
    bot clicks (stage-1 verdicts, some from the burst IP) and copies; shuffled."""
    rng = random.Random(seed)
    events: list[Ev] = []

    def click(n: int, ip: str, minute: int, *, ua: str | None = None) -> None:
        for i in range(n):
            events.append(
                Ev(
                    f"{ip}-{minute}-{i}{'-bot' if ua else ''}",
                    ADS[i % 4],
                    T0 + minute * MINUTE_MS + rng.randrange(MINUTE_MS),
                    ip=ip,
                    user_id=f"u{rng.randrange(50)}",
                    country=rng.choice(["US", "DE", None]),
                    cost_micros=rng.choice([1_000, 2_500, -1]),
                    user_agent=ua,
                )
            )

    click(300, "198.51.100.7", 1)
    click(5, "198.51.100.7", 1, ua=BOT)
    click(LIMIT, "198.51.100.8", 1)
    click(LIMIT + 1, "198.51.100.9", 2)
    click(LIMIT, "198.51.100.9", 3)
    for n in range(150):
        click(3, f"203.0.113.{n}", n % 4)
    events += [
        Ev(f"imp-{i}", ADS[i % 4], T0 + rng.randrange(4 * MINUTE_MS), event_type=ids.IMPRESSION)
        for i in range(100)
    ]
    events += rng.sample(events, 80)  # retransmitted copies
    rng.shuffle(events)
    return events


Key = tuple[str, int]


def spread_traffic(seed: int = 11) -> list[Ev]:
    """Addresses clicking many ads within 5 minutes (the lateness: stage 1 keeps them all):
    one over the limit from its 21st distinct ad (a bot click on one more ad, flagged in
    stage 1, counts toward it), one at the limit, one whose burst is also a spread (named
    by velocity, the first rule), normal traffic, copies; shuffled."""
    rng = random.Random(seed)
    events: list[Ev] = []

    def click(ip: str, ad: str, ts_ms: int, *, ua: str | None = None) -> None:
        n = len(events)
        events.append(Ev(f"s{n}", ad, ts_ms, ip=ip, user_id=f"v{n}", user_agent=ua))

    click("192.0.2.10", "ad-s29", T0 + 25_000, ua=BOT)
    for n in range(25):
        click("192.0.2.10", f"ad-s{n}", T0 + 30_000 + n * 10_000)
    for n in range(21):
        click("192.0.2.11", f"ad-s{n % 20}", T0 + 30_000 + n * 10_000)
    for n in range(70):
        click("192.0.2.12", f"ad-s{n % 30}", T0 + 2 * MINUTE_MS + n * 500)
    for n in range(200):
        click(f"203.0.113.{n % 90}", f"ad-s{rng.randrange(30)}", T0 + rng.randrange(4 * MINUTE_MS))
    events += rng.sample(events, 40)
    rng.shuffle(events)
    return events


def reference(events: list[Ev]) -> dict[str, Counter[Key]]:
    """Computed from the traffic alone: distinct clicks; an IP-minute with more than LIMIT
    clicks has every click invalid; else a click whose IP clicked more than MAX_ADS
    distinct ads in the SPREAD_MS up to it is; bot clicks invalid for their own reason."""
    distinct = {(e.event_type, e.event_id): e for e in events}.values()
    per_ip_minute = Counter((e.ip, e.ts_ms // MINUTE_MS) for e in distinct if e.event_type == 0)

    def spread(e: Ev) -> bool:
        ads = {
            o.ad_id
            for o in distinct
            if o.event_type == ids.CLICK and o.ip == e.ip and 0 <= e.ts_ms - o.ts_ms <= SPREAD_MS
        }
        return len(ads) > MAX_ADS

    out: dict[str, Counter[Key]] = defaultdict(Counter)
    for e in distinct:
        key = (e.ad_id, e.ts_ms - e.ts_ms % MINUTE_MS)
        if e.event_type == ids.IMPRESSION:
            out["impressions"][key] += 1
            continue
        if e.user_agent == BOT:
            out["invalid_clicks"][key] += 1
            out["reason non-browser-client"][key] += 1
        elif per_ip_minute[(e.ip, e.ts_ms // MINUTE_MS)] > LIMIT:
            out["invalid_clicks"][key] += 1
            out[f"reason {RULE}"][key] += 1
        elif spread(e):
            out["invalid_clicks"][key] += 1
            out[f"reason {SPREAD}"][key] += 1
        else:
            out["clicks"][key] += 1
            out["spend_micros"][key] += max(e.cost_micros, 0)
    return {name: +counter for name, counter in out.items()}


KEYED_SEGMENT_BYTES = 4096  # a few frames of records each
KEYED_SNAPSHOT_RECORDS = 60


class KeyedRig:
    """A worker process with the keyed stage on, in a temp dir; :meth:`restart` is a kill -9
    and a fresh start on the same files."""

    def __init__(
        self,
        root: Path,
        *,
        partitions: int,
        keyed_partitions: int,
        crash: Crash | None = None,
        rules_file: Path | None = None,
        batch_records: int = 29,
    ) -> None:
        self.root = root
        self.settings = Settings(
            data_dir=root,
            partitions=partitions,
            micro_batch_events=37,
            snapshot_interval_ms=0,
            keyed_stage=True,
            keyed_partitions=keyed_partitions,
            rules_file=rules_file,
        )
        self.writer = SegmentLogWriter(
            root / "log", partitions, retention_ms=DAY, retention_bytes=2**40
        )
        self.clock = FixedClock(T0 + 10 * MINUTE_MS)
        self.crash = crash or Crash()
        self.batch_records = batch_records  # stage 2's records per read
        self.trimmed = 0  # keyed log segments deleted behind stage 2's snapshots
        # (event id, rule id) -> the time of the keyed commit that applied that verdict
        self.applied_at: dict[tuple[str, str], int] = {}
        self._open()
        self.start()

    def _open(self) -> None:
        s = self.settings
        self.reader = SegmentLogReader(s.log_dir)
        self.store = DuckDBStore(s.store_path)
        self.snapshots = SnapshotStore(s.snapshot_dir)
        self.archive = ParquetArchiveWriter(s.archive_dir, flush_events=50, flush_interval_ms=0)
        self.corrections = corrections_writer(
            s.corrections_dir, flush_events=50, flush_interval_ms=0
        )
        self.counters = InMemoryCounters(retain_ms=DAY)
        # Small segments, trimmed as soon as stage 2's snapshots allow (as the worker
        # does): recovery must start from a snapshot.
        self.keyed_writer = SegmentLogWriter(
            s.keyed_dir / "log",
            s.keyed_partitions,
            segment_bytes=KEYED_SEGMENT_BYTES,
            retention_ms=0,
            retention_bytes=0,
        )
        self.keyed_snapshots = SnapshotStore(s.keyed_dir / "snapshots")
        self.keyed_reader = SegmentLogReader(s.keyed_dir / "log")
        self.appender = KeyedAppender(
            self.keyed_writer, s.keyed_dir / "stage1.json", self.store.committed_offsets()
        )

    def send(self, events: list[Ev], *, frame_events: int = 11) -> None:
        routed: dict[int, list[Ev]] = defaultdict(list)
        for ev in events:
            routed[ids.partition_for_id(ev.event_type, ev.event_id, self.writer.partitions)].append(
                ev
            )
        for p, part in sorted(routed.items()):
            for i in range(0, len(part), frame_events):
                cols = build_columns(part[i : i + frame_events])
                self.writer.append(p, columns.encode(cols), cols.count)
        self.writer.sync()

    def start(self) -> None:
        self.workers = [
            PartitionWorker(
                p,
                reader=self.reader,
                store=self.store,
                archive=self.archive,
                snapshots=self.snapshots,
                settings=self.settings,
                clock=self.clock,
                keyed=self.appender,
            )
            for p in range(self.settings.partitions)
        ]
        refill_counters(self.counters, self.store, now_ms=self.clock.now_ms())
        self.stage = KeyedStage(
            self.keyed_reader,
            self.store,
            rules=rules_watcher(self.settings),
            clock=self.clock,
            allowed_lateness_ms=self.settings.allowed_lateness_ms,
            batch_records=self.batch_records,
            counters=self.counters,
            corrections=self.corrections,
            snapshots=self.keyed_snapshots,
            trim=self._trim,
            snapshot_records=KEYED_SNAPSHOT_RECORDS,
        )
        commit_keyed = self.store.commit_keyed

        def recording(commits: list[KeyedCommit]) -> list[pa.Table]:
            applied = commit_keyed(commits)
            for c, table in zip(commits, applied, strict=True):
                for verdict in table.select(["event_id", "rule_id"]).to_pylist():
                    self.applied_at[(verdict["event_id"], verdict["rule_id"])] = c.committed_at_ms
            return applied

        self.store.commit_keyed = recording  # type: ignore[method-assign]
        wrap = self.crash.wrap
        wrap(self.store, "commit_many", after="after-commit")
        wrap(self.appender, "append", after="after-keyed-append")
        wrap(self.keyed_writer, "sync", before="keyed-before-sync", after="keyed-after-sync")
        wrap(self.keyed_reader, "read", after="keyed-after-read")
        wrap(self.store, "commit_keyed", before="keyed-before-commit", after="keyed-after-commit")
        wrap(self.store, "_apply_keyed", after="keyed-inside-commit")
        wrap(self.counters, "apply", after="after-counters")
        wrap(self.keyed_snapshots, "save", before="keyed-before-snapshot", after="keyed-snapshot")
        wrap(self.corrections, "append", after="corrections-after-append")
        wrap(
            self.corrections,
            "_publish_manifest",
            before="corrections-before-publish",
            after="corrections-after-publish",
        )
        self.crash.rearm()

    def _trim(self, partition: int, keep_from: int) -> int:
        deleted = self.keyed_writer.apply_retention(partition, keep_from=keep_from, now_ms=0)
        self.trimmed += deleted
        return deleted

    def restart(self) -> None:
        self.clock.advance(1_000)  # a later process: a correction re-derived now keeps its time
        self.crash.armed = False
        self.archive.abandon()
        self.corrections.abandon()
        self.crash.died_in_background = False
        self.store.close()
        self.reader.close()
        self.keyed_reader.close()
        self.keyed_writer.close()
        self._open()
        self.start()

    def run_stream(self) -> None:
        """Stage 1 alone (the workers), until the log is drained: stage 2 reads nothing."""
        for _ in range(3000):
            if step_all(self.workers, self.store, self.counters) == 0:
                return
        raise AssertionError("the workers did not drain")

    def run(self) -> None:
        for _ in range(3000):
            try:
                processed = step_all(self.workers, self.store, self.counters)
                processed += self.stage.step()
                if processed == 0:
                    self.corrections.flush()
            except CrashError:
                self.restart()
                continue
            if self.crash.died_in_background:  # the process dies with its flush thread
                self.restart()
                continue
            if processed == 0:
                return
        raise AssertionError("the stages did not drain")

    def counts(self, ads: tuple[str, ...] = ADS) -> dict[str, Counter[Key]]:
        out: dict[str, Counter[Key]] = defaultdict(Counter)
        for ad in ads:
            span = {"ad_id": ad, "start_ms": T0, "end_ms": T0 + DAY, "granularity": "minute"}
            for row in self.store.aggregates(**span):
                for name in ("clicks", "impressions", "spend_micros", "invalid_clicks"):
                    out[name][(ad, row.window_ms)] += getattr(row, name)
            for row in self.store.aggregates(**span, group_by="invalid_reason"):
                out[f"reason {row.group}"][(ad, row.window_ms)] += row.invalid_clicks
            for row in self.store.aggregates(**span, group_by="country"):
                out[f"country {row.group} clicks"][(ad, row.window_ms)] += row.clicks
        return {name: +counter for name, counter in out.items()}

    def realtime(self, ads: tuple[str, ...] = ADS) -> Counter[str]:
        totals: Counter[str] = Counter()
        for ad in ads:
            t = self.counters.window(ad_id=ad, start_ms=T0, end_ms=T0 + DAY)
            totals.update(clicks=t.clicks, spend_micros=t.spend_micros, invalid=t.invalid_clicks)
        return totals

    def corrected(self) -> pa.Table:
        """Every published correction (all of them once the writer is flushed)."""
        return ParquetArchiveReader(self.settings.corrections_dir, layout=CORRECTIONS).decisions(
            start_ms=0, end_ms=T0 + DAY
        )

    def close(self) -> None:
        self.archive.close()
        self.corrections.close()
        self.store.close()
        self.reader.close()
        self.writer.close()
        self.keyed_reader.close()
        self.keyed_writer.close()


@pytest.fixture
def traffic() -> list[Ev]:
    return burst_traffic()


def _run(
    root: Path, events: list[Ev], partitions: int, keyed: int, crash: Crash | None = None
) -> tuple[dict[str, Counter[Key]], Counter[str], dict[int, KeyedProgress], pa.Table]:
    rig = KeyedRig(root, partitions=partitions, keyed_partitions=keyed, crash=crash)
    try:
        half = len(events) // 2
        rig.send(events[:half])
        rig.run()
        rig.send(events[half:])
        rig.run()
        result = rig.counts(), rig.realtime(), rig.store.keyed_progress()
    finally:
        rig.close()
    corrected = rig.corrected()
    # Stamped with the time their verdict was applied, also when archived by a recovery.
    for row in corrected.select(["event_id", "rule_id", "corrected_at_ms"]).to_pylist():
        assert row["corrected_at_ms"] == rig.applied_at[(row["event_id"], row["rule_id"])], row
    return (*result, corrected)


def corrected_ids(events: list[Ev]) -> set[str]:
    """From the traffic alone: the distinct clicks of IP-minutes over the limit that no
    stage-1 rule had flagged (those the keyed stage corrects)."""
    distinct = {(e.event_type, e.event_id): e for e in events}.values()
    clicks = [e for e in distinct if e.event_type == ids.CLICK]
    per_ip_minute = Counter((e.ip, e.ts_ms // MINUTE_MS) for e in clicks)
    return {
        e.event_id
        for e in clicks
        if per_ip_minute[(e.ip, e.ts_ms // MINUTE_MS)] > LIMIT and e.user_agent != BOT
    }


def check_corrections(
    corrected: pa.Table, events: list[Ev], progress: dict[int, KeyedProgress], root: Path
) -> None:
    """Each corrected click archived exactly once, with its rule and evidence, and the
    archive's ends are the store's consumed offsets."""
    rows = corrected.to_pylist()
    assert sorted(r["event_id"] for r in rows) == sorted(corrected_ids(events))
    assert len({(r["source_partition"], r["source_offset"]) for r in rows}) == len(rows)
    assert len({(r["keyed_partition"], r["keyed_offset"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["rule_id"] == RULE and r["reason"] == "click burst from one address"
        stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(r["ts_ms"] // 1000))
        ip = r["event_id"].split("-")[0]
        assert r["evidence"] == f"ip {ip}: more than {LIMIT} clicks in minute {stamp}"
    reader = ParquetCorrectionReader(root / "keyed" / "corrections")
    assert reader.archived_offsets() == {k: x.consumed_offset for k, x in progress.items()}
    sample = rows[len(rows) // 2]
    [found] = reader.corrections(sample["event_id"])
    assert (found.source_partition, found.source_offset) == (
        sample["source_partition"],
        sample["source_offset"],
    )
    assert reader.corrections("198.51.100.8-1-0") == []  # at the limit: never corrected


def _sums(counts: dict[str, Counter[Key]]) -> Counter[str]:
    return Counter(
        {
            "clicks": counts["clicks"].total(),
            "spend_micros": counts["spend_micros"].total(),
            "invalid": counts["invalid_clicks"].total(),
        }
    )


def test_counts_match_the_reference_and_do_not_depend_on_partitions(
    tmp_path: Path, traffic: list[Ev]
) -> None:
    expected = reference(traffic)
    assert expected[f"reason {RULE}"].total() == 300 + LIMIT + 1  # the test's premise
    runs = {
        (p, k): _run(tmp_path / f"p{p}-k{k}", traffic, p, k) for p, k in [(1, 1), (4, 4), (16, 3)]
    }
    for (p, k), (counts, realtime, progress, corrected) in runs.items():
        check_corrections(corrected, traffic, progress, tmp_path / f"p{p}-k{k}")
        for name in ("clicks", "impressions", "spend_micros", "invalid_clicks"):
            assert counts.get(name, Counter()) == expected[name], (p, k, name)
        for reason in ("non-browser-client", RULE):
            assert counts[f"reason {reason}"] == expected[f"reason {reason}"], (p, k, reason)
        assert realtime == _sums(counts)  # the counters were corrected too
        assert sum(x.corrections for x in progress.values()) == 300 + LIMIT + 1
    first = runs[(1, 1)][0]
    for counts, *_ in runs.values():
        assert counts == first  # every count, breakdowns included, identical


def test_an_address_spreading_over_many_ads_is_corrected_as_the_batch_rule_flags_it(
    tmp_path: Path,
) -> None:
    traffic = spread_traffic()
    ads = tuple(f"ad-s{n}" for n in range(30))
    expected = reference(traffic)
    assert expected[f"reason {SPREAD}"].total() == 6  # the test's premise: 192.0.2.10's last 6
    assert expected[f"reason {RULE}"].total() == 70  # 192.0.2.12's burst, named by velocity
    for p, k in [(1, 1), (4, 4), (3, 16)]:
        rig = KeyedRig(tmp_path / f"p{p}-k{k}", partitions=p, keyed_partitions=k)
        try:
            half = len(traffic) // 2
            rig.send(traffic[:half])
            rig.run()
            rig.send(traffic[half:])
            rig.run()
            counts = rig.counts(ads)
            for name in ("clicks", "spend_micros", "invalid_clicks"):
                assert counts.get(name, Counter()) == expected[name], (p, k, name)
            for reason in ("non-browser-client", RULE, SPREAD):
                assert counts[f"reason {reason}"] == expected[f"reason {reason}"], (p, k, reason)
            assert rig.realtime(ads) == _sums(counts)
            progress = rig.store.keyed_progress().values()
            assert sum(x.corrections for x in progress) == 6 + 70
        finally:
            rig.close()


def test_a_click_whose_reason_moves_to_an_earlier_rule_keeps_both_verdicts_in_order(
    tmp_path: Path,
) -> None:
    """Round 1: an address clicks 21 ads in one minute: the 21st is over the spread limit
    and corrected under it. Round 2: 45 more clicks that minute take it over the velocity
    limit, which comes first in the rules: the 21st click's reason moves to velocity
    (counted once, corrected once) and the corrections archive keeps both, in order."""
    ip, minute = "192.0.2.50", 3
    first = [
        Ev(
            f"r1-{n}",
            f"ad-r{n}",
            T0 + minute * MINUTE_MS + n * 100,
            ip=ip,
            user_id=f"r1-{n}",
            cost_micros=1_000,
        )
        for n in range(21)
    ]
    second = [
        Ev(
            f"r2-{n}",
            "ad-r0",
            T0 + minute * MINUTE_MS + 30_000 + n,
            ip=ip,
            user_id=f"r2-{n}",
            cost_micros=1_000,
        )
        for n in range(45)
    ]
    ads = tuple(f"ad-r{n}" for n in range(21))
    rig = KeyedRig(tmp_path, partitions=2, keyed_partitions=2)
    try:
        rig.send(first)
        rig.run()
        assert rig.counts(ads)[f"reason {SPREAD}"].total() == 1
        rig.send(second)
        rig.run()
        rig.corrections.flush()
        counts = rig.counts(ads)
        assert counts["invalid_clicks"].total() == 66 and counts.get("clicks", Counter()) == {}
        assert counts[f"reason {RULE}"].total() == 66
        assert counts.get(f"reason {SPREAD}", Counter()).total() == 0
        assert sum(x.corrections for x in rig.store.keyed_progress().values()) == 66
    finally:
        rig.close()
    reader = ParquetCorrectionReader(tmp_path / "keyed" / "corrections")
    moved = reader.corrections("r1-20")
    assert [(c.rule_id, c.previous_rule_id) for c in moved] == [(SPREAD, None), (RULE, SPREAD)]
    assert moved[0].spend_micros == moved[1].spend_micros > 0
    assert [(c.rule_id, c.previous_rule_id) for c in reader.corrections("r1-3")] == [(RULE, None)]


CRASH_POINTS = [
    "after-commit",  # stage 1 committed, keyed records not appended
    "keyed-before-sync",
    "keyed-after-sync",  # records durable, marker not moved
    "after-keyed-append",
    "keyed-after-read",
    "keyed-before-commit",
    "keyed-inside-commit",
    "keyed-after-commit",  # corrections committed, counters not corrected
    "after-counters",
    "corrections-after-append",  # corrections buffered, not published
    "corrections-before-publish",  # files written, manifest not
    "corrections-after-publish",
    "keyed-before-snapshot",
    "keyed-snapshot",  # saved: the next restart starts from it
]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_between_any_two_steps_changes_nothing(
    tmp_path: Path, traffic: list[Ev], point: str
) -> None:
    crash = Crash(point, at=2, times=4)
    counts, realtime, progress, corrected = _run(tmp_path, traffic, 4, 3, crash)
    assert crash.fired >= 1
    check_corrections(corrected, traffic, progress, tmp_path)
    expected = reference(traffic)
    for name in ("clicks", "spend_micros", "invalid_clicks", f"reason {RULE}"):
        assert counts.get(name, Counter()) == expected[name], name
    assert realtime == _sums(counts)
    assert sum(x.corrections for x in progress.values()) == 300 + LIMIT + 1


def test_a_restart_starts_from_stage_twos_snapshot_behind_which_the_keyed_log_is_trimmed(
    tmp_path: Path, traffic: list[Ev]
) -> None:
    rig = KeyedRig(tmp_path, partitions=4, keyed_partitions=3)
    try:
        half = len(traffic) // 2
        rig.send(traffic[:half])
        rig.run()
        assert rig.trimmed > 0  # segments stage 2 no longer needs are gone
        starts = {k: rig.keyed_reader.start_offset(k) for k in range(3)}
        assert any(starts.values())
        rig.restart()
        # Recovery began at a snapshot (the records before it are gone: it had to).
        began = {k: at for k, (at, _) in rig.stage._snapshotted.items()}
        assert all(began[k] >= starts[k] for k in starts) and any(began.values())
        rig.send(traffic[half:])
        rig.run()
        rig.corrections.flush()
        counts, realtime, progress = rig.counts(), rig.realtime(), rig.store.keyed_progress()
    finally:
        rig.close()
    check_corrections(rig.corrected(), traffic, progress, tmp_path)
    expected = reference(traffic)
    for name in ("clicks", "spend_micros", "invalid_clicks", f"reason {RULE}"):
        assert counts.get(name, Counter()) == expected[name], name
    assert realtime == _sums(counts)


def test_a_trimmed_keyed_log_without_its_snapshots_restarts_with_a_context_mark(
    tmp_path: Path, traffic: list[Ev]
) -> None:
    """Stage 2's snapshots lost (deleted) after the keyed log was trimmed behind them: the
    records before the log's start are gone, so each trimmed partition's windows start
    with a context mark after the newest event counted, as after a gap (the batch closes
    the hours that reach before it), instead of judging as if the log held everything."""
    rig = KeyedRig(tmp_path, partitions=4, keyed_partitions=3)
    try:
        rig.send(traffic[: len(traffic) // 2])
        rig.run()
        starts = {k: rig.keyed_reader.start_offset(k) for k in range(3)}
        assert any(starts.values())
        shutil.rmtree(rig.settings.keyed_dir / "snapshots")
        rig.restart()
        newest = max(s.max_event_ms for s in rig.store.partition_status())
        for k, start in starts.items():
            windows = rig.stage.windows[k]
            assert isinstance(windows, KeyedWindows)
            assert windows.context_from_ms == (newest + 1 if start else None), k
    finally:
        rig.close()


def _marked_mid_read(root: Path, traffic: list[Ev], *, batch_records: int, crash: bool) -> tuple:
    """A third of the traffic through both stages; two more thirds through stage 1 alone,
    with a gap before the last (every keyed partition's next frame carries a mark); then
    stage 2 over all of it, optionally crashing once its commit is in the store (the
    recovery replays from the snapshot taken in the first third)."""
    rig = KeyedRig(
        root,
        partitions=4,
        keyed_partitions=3,
        batch_records=batch_records,
        crash=Crash("keyed-after-commit", times=1),
    )
    try:
        rig.crash.armed = False
        third = len(traffic) // 3
        rig.send(traffic[:third])
        rig.run()
        snapshots = {k: rig.stage._snapshotted[k][0] for k in range(3)}
        rig.send(traffic[third : 2 * third])
        rig.run_stream()
        rig.appender._gap = True  # what a family inactive for a round leaves
        rig.send(traffic[2 * third :])
        rig.run_stream()
        reads: list[list[bool]] = []  # per read: which of its frames carry a mark
        real = rig.keyed_reader.read

        def read(k: int, at: int, most: int) -> list[Frame]:
            frames = real(k, at, most)
            reads.append([context_of(decode_records(f.payload)) is not None for f in frames])
            return frames

        rig.keyed_reader.read = read  # type: ignore[method-assign]
        rig.crash.rearm()
        rig.crash.armed = crash
        try:
            for _ in range(1000):  # one step in one read; a frame a step otherwise
                if not rig.stage.step():
                    break
        except CrashError:
            rig.restart()  # the recovery replays the read that crossed the mark
            assert all(rig.stage._snapshotted[k][0] == snapshots[k] for k in range(3))
        assert rig.crash.fired == int(crash)
        assert rig.stage.consumed == {k: rig.keyed_reader.durable_end(k) for k in range(3)}
        windows = {
            k: (
                w.kept().sort(w.kept().columns).rows(),
                w.high_water,
                w.max_event_ms,
                w.context_from_ms,
            )
            for k, w in rig.stage.windows.items()
            if isinstance(w, KeyedWindows)
        }
        marks = {k: state[3] for k, state in windows.items()}
        rig.run()
        rig.corrections.flush()
        # Each click's standing rule (reads of other sizes may pass through a later rule
        # first, then correct to the earlier one: the verdicts differ, not where they end).
        corrected: dict[str, str] = {}
        named_spread: set[str] = set()  # every click a spread verdict was applied to
        for r in rig.corrected().select(["event_id", "rule_id"]).to_pylist():
            if corrected.get(r["event_id"]) != RULE:
                corrected[r["event_id"]] = r["rule_id"]
            if r["rule_id"] == SPREAD:
                named_spread.add(r["event_id"])
        return rig.counts(SPREAD_ADS), corrected, windows, marks, reads, named_spread
    finally:
        rig.close()


def test_a_context_mark_inside_one_read_applies_from_its_frame_also_in_a_replay(
    tmp_path: Path,
) -> None:
    """Stage 2 reads many keyed frames at once. A context mark on a frame in the middle of
    a read applies from that frame on: the records before it in the same read are judged
    with their whole context, as when read frame by frame, and a recovery that replays
    the read from a snapshot taken before it rebuilds the same windows. (Spread traffic:
    after a mark a spread click is not named, as velocity, the earlier rule, might flag
    it with the gap's clicks.)"""
    traffic = spread_traffic()
    by_frame = _marked_mid_read(tmp_path / "a", traffic, batch_records=1, crash=False)
    one_read = _marked_mid_read(tmp_path / "b", traffic, batch_records=10_000, crash=False)
    replayed = _marked_mid_read(tmp_path / "c", traffic, batch_records=10_000, crash=True)
    assert all(not any(marked[1:]) for marked in by_frame[4])  # a frame per read
    assert any(any(marked[1:]) for marked in one_read[4])  # a mark inside a read
    for run in (one_read, replayed):
        assert run[:4] == by_frame[:4]
    marks = by_frame[3]
    assert all(mark is not None for mark in marks.values())
    # The clicks of the third before the marks were judged with their whole context:
    # spread named some of them (velocity then took them over: the standing rule). A
    # spread click after the marks is not named (velocity might flag it with the gap's
    # clicks); the batch decides it.
    third = len(traffic) // 3
    first_sent: dict[str, int] = {}  # the traffic holds copies: a click counts where first sent
    for n, e in enumerate(traffic):
        first_sent.setdefault(e.event_id, n // third)
    second = {event_id for event_id, part in first_sent.items() if part == 1}
    last = {event_id for event_id, part in first_sent.items() if part >= 2}
    for run in (by_frame, one_read, replayed):
        named_spread = run[5]
        assert named_spread & second and not named_spread & last


def test_records_appended_twice_are_consumed_once(tmp_path: Path, traffic: list[Ev]) -> None:
    rig = KeyedRig(tmp_path, partitions=2, keyed_partitions=2)
    try:
        rig.send(traffic)
        rig.run()
        once = rig.counts()
        # What a recovery after a lost marker does: the whole log's records again.
        rig.restart()
        rig.appender._next.clear()
        for worker in rig.workers:
            worker.recover()
        rig.run()
        assert rig.keyed_writer.partitions == 2
        assert sum(rig.keyed_reader.durable_end(k) for k in range(2)) > 2 * 300  # copies
        assert rig.counts() == once
    finally:
        rig.close()


def test_records_that_skip_the_marker_are_refused(tmp_path: Path) -> None:
    rig = KeyedRig(tmp_path, partitions=1, keyed_partitions=1)
    try:
        with pytest.raises(KeyedGapError, match="holds them only up to 0"):
            rig.appender.append(
                columns.to_frame(columns.SCHEMA.empty_table(), partition=0, base_offset=0),
                {0: (5, 9)},
            )
    finally:
        rig.close()


def test_a_stage_turned_off_and_on_again_starts_at_the_committed_offsets(tmp_path: Path) -> None:
    """Rounds committed while the stage was off are not the keyed log's: once its marker is
    retired, the stage turned on again starts where the store is, not where it stopped."""
    rig = KeyedRig(tmp_path, partitions=1, keyed_partitions=1)
    try:
        rig.send(burst_traffic()[:50])
        rig.run()
        marker = rig.settings.keyed_dir / "stage1.json"
        stopped_at = rig.appender.next_offset(0)
        assert stopped_at == 50
        # While off, the store commits on (here: as if 40 more events had been counted).
        off_period = {0: stopped_at + 40}
        stale = KeyedAppender(rig.keyed_writer, marker, off_period)
        with pytest.raises(KeyedGapError):  # what the stale marker would do on the next round
            stale.append(
                columns.to_frame(columns.SCHEMA.empty_table(), partition=0, base_offset=0),
                {0: (90, 95)},
            )
        retire_marker(marker)
        fresh = KeyedAppender(rig.keyed_writer, marker, off_period)
        assert fresh.next_offset(0) == 90
        fresh.append(
            columns.to_frame(columns.SCHEMA.empty_table(), partition=0, base_offset=0),
            {0: (90, 95)},
        )
        assert fresh.next_offset(0) == 95
    finally:
        rig.close()


def write_velocity_rules(path: Path, limit: int) -> None:
    path.write_text(
        "[[rules]]\n"
        f'id = "{RULE}"\n'
        'kind = "ip_click_velocity"\n'
        'reason = "click burst from one address"\n'
        "[rules.params]\n"
        f"max_clicks_per_minute = {limit}\n"
    )


def clicks_from(ip: str, n: int, minute: int, tag: str) -> list[Ev]:
    rng = random.Random(f"{ip}-{tag}")
    return [
        Ev(
            f"{ip}-{tag}-{i}",
            ADS[i % 4],
            T0 + minute * MINUTE_MS + rng.randrange(MINUTE_MS),
            ip=ip,
            user_id=f"u{i}",
            cost_micros=1_000,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(("before", "after"), [(60, 100), (100, 60)])
def test_a_limit_changed_between_commits_survives_a_restart(
    tmp_path: Path, before: int, after: int
) -> None:
    """Minutes still open when the limit changes: a restart replays each consumed range
    under the spec it was committed with, so it corrects exactly what an uninterrupted run
    corrects (a replay under the new limit would re-flag a flagged minute's clicks, or
    forget a minute's pending ones)."""
    # Under the first limit: 80 clicks over 60 (flagged) and under 100 (pending); 50 under
    # both. Under the second: 30 more each, the first address now at 110 clicks.
    first = clicks_from("198.51.100.1", 80, 1, "a") + clicks_from("198.51.100.2", 50, 1, "a")
    second = clicks_from("198.51.100.1", 30, 1, "b") + clicks_from("198.51.100.2", 30, 1, "b")
    results = []
    for restart in (False, True):
        root = tmp_path / f"restart-{restart}"
        root.mkdir()
        rules = root / "rules.toml"
        write_velocity_rules(rules, before)
        rig = KeyedRig(root, partitions=2, keyed_partitions=2, rules_file=rules)
        try:
            rig.send(first)
            rig.run()
            write_velocity_rules(rules, after)
            rig.stage.rules.reload()
            if restart:
                rig.restart()
            rig.send(second)
            rig.run()
            progress = rig.store.keyed_progress()
            results.append((rig.counts(), sum(x.corrections for x in progress.values())))
            # Every partition judged under both limits has both specs recorded, in order.
            for x in progress.values():
                limits = [
                    rule.max_clicks_per_minute
                    for _, spec in x.specs
                    for rule in KeyedRules.from_json(spec).rules
                    if isinstance(rule, VelocityRule)
                ]
                assert limits in ([before, after], [before], [after]), limits
        finally:
            rig.close()
    (uninterrupted, corrections), (restarted, restarted_corrections) = results
    # By hand: 60 -> 100: 80 flagged, then each of its 30 later clicks (110 in all); 100 ->
    # 60: the first address's 80 pending flagged with the next click (110), the second's
    # 50 and 30 once the minute passes 60 (80).
    assert corrections == (110 if before < after else 190)
    assert restarted_corrections == corrections
    assert restarted == uninterrupted


def test_keyed_status_gives_the_lag_and_the_corrections_by_rule(
    tmp_path: Path, traffic: list[Ev]
) -> None:
    rig = KeyedRig(tmp_path, partitions=2, keyed_partitions=3)
    try:
        rig.send(traffic)
        while step_all(rig.workers, rig.store, rig.counters):  # stage 1 only
            pass
        before = keyed_status(rig.keyed_reader, rig.store)
        ends = [rig.keyed_reader.durable_end(k) for k in range(3)]
        assert sum(ends) >= len(corrected_ids(traffic))  # every click went to the keyed log
        assert [(p.keyed_partition, p.durable_end_offset) for p in before.partitions] == list(
            enumerate(ends)
        )
        assert [p.consumed_offset for p in before.partitions] == [0, 0, 0]
        assert before.corrections_by_rule == {}
        rig.stage.step()  # one step: a few frames of each keyed partition, not all
        middle = keyed_status(rig.keyed_reader, rig.store)
        assert all(0 < p.consumed_offset < p.durable_end_offset for p in middle.partitions)
        rig.run()
        after = keyed_status(rig.keyed_reader, rig.store)
        assert [p.consumed_offset for p in after.partitions] == ends  # no lag left
        assert after.corrections_by_rule == {RULE: 300 + LIMIT + 1}
    finally:
        rig.close()
