"""The three keyed families stepped together (``step_stages``, as the worker steps them)
over real logs and a real store: each loop makes ONE store commit for every family's
records, with the same outcome as the families committing one after the other (IP,
visitor, ad); a commit that does not apply (a crash around it, or a real fenced conflict)
leaves every family recovering to the same counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pytest

from clickagg.core.adkeyed import ad_records
from clickagg.keyed.stage1 import KeyedAppender, KeyedAppenders
from clickagg.keyed.stage2 import AD, FAMILY_KEYS, VISITOR, KeyedStage, step_stages
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from clickagg.store.base import FencedError, KeyedCommit, KeyedProgress
from clickagg.worker.snapshots import SnapshotStore
from clickagg.worker.stream import step_all
from tests.conftest import Ev
from tests.keyed.test_ad_stage import ADS as AD_ADS
from tests.keyed.test_ad_stage import NO_IMPRESSION, RULES, ad_traffic
from tests.keyed.test_stages import (
    ADS,
    KEYED_SEGMENT_BYTES,
    KEYED_SNAPSHOT_RECORDS,
    RULE,
    T0,
    Key,
)
from tests.keyed.test_visitor_stage import REPEAT, BothFamiliesRig, repeat_traffic, ticks
from tests.worker.test_stream import Crash, CrashError

EVERY_AD = tuple(sorted({*ADS, *AD_ADS}))


class ThreeFamiliesRig(BothFamiliesRig):
    """The IP, visitor and ad families, as the worker runs them: one appender each behind
    one, one stage each over one store, counters and corrections archive. ``folded``: each
    loop steps the stages together (``step_stages``), else one after the other (``step``),
    in the worker's order. ``calls``: per ``commit_keyed`` call (counted by a wrapper around
    the real store's), the families of its commits; ``loops``: per loop, those calls."""

    folded = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.loops: list[list[tuple[str, ...]]] = []
        super().__init__(*args, **kwargs)

    def _open(self) -> None:
        super()._open()
        s = self.settings
        directory = s.keyed_dir / AD.name
        self.ad_writer = SegmentLogWriter(
            directory / "log",
            s.keyed_partitions,
            segment_bytes=KEYED_SEGMENT_BYTES,
            retention_ms=0,
            retention_bytes=0,
        )
        self.ad_reader = SegmentLogReader(directory / "log")
        self.ad_snapshots = SnapshotStore(directory / "snapshots")
        third = KeyedAppender(
            self.ad_writer,
            directory / "stage1.json",
            self.store.committed_offsets(),
            records=ad_records,
            clicks_only=False,
        )
        assert isinstance(self.appender, KeyedAppenders)
        self.appender = KeyedAppenders([*self.appender.appenders, third])  # type: ignore[assignment]

    def start(self) -> None:
        super().start()
        self.ad_stage = KeyedStage(
            self.ad_reader,
            self.store,
            rules=self.stage.rules,
            clock=self.clock,
            allowed_lateness_ms=self.settings.allowed_lateness_ms,
            batch_records=29,
            counters=self.counters,
            corrections=self.corrections,
            snapshots=self.ad_snapshots,
            trim=self._ad_trim,
            snapshot_records=KEYED_SNAPSHOT_RECORDS,
            family=AD,
        )
        wrap = self.crash.wrap
        wrap(self.ad_writer, "sync", before="keyed-before-sync", after="keyed-after-sync")
        wrap(self.ad_reader, "read", after="keyed-after-read")
        wrap(self.ad_snapshots, "save", before="keyed-before-snapshot", after="keyed-snapshot")
        commit_keyed = self.store.commit_keyed  # the real one, within the rig's wrappers

        def counted(commits: Sequence[KeyedCommit]) -> list[pa.Table]:
            self.calls.append(tuple(c.family for c in commits))
            return commit_keyed(commits)

        self.store.commit_keyed = counted  # type: ignore[method-assign]

    def stages(self) -> list[KeyedStage]:
        return [self.stage, self.family_stage, self.ad_stage]  # the worker's order

    def _ad_trim(self, partition: int, keep_from: int) -> int:
        deleted = self.ad_writer.apply_retention(partition, keep_from=keep_from, now_ms=0)
        self.trimmed += deleted
        return deleted

    def restart(self) -> None:
        self.ad_reader.close()
        self.ad_writer.close()
        super().restart()

    def run(self) -> None:
        for _ in range(3000):
            before = len(self.calls)
            try:
                processed = step_all(self.workers, self.store, self.counters)
                if self.folded:
                    processed += step_stages(self.stages())
                else:
                    processed += sum(stage.step() for stage in self.stages())
                if processed == 0:
                    self.corrections.flush()
            except CrashError:
                self.restart()
                continue
            finally:
                self.loops.append(self.calls[before:])
            if self.crash.died_in_background:
                self.restart()
                continue
            if processed == 0:
                return
        raise AssertionError("the stages did not drain")

    def close(self) -> None:
        super().close()
        self.ad_reader.close()
        self.ad_writer.close()


def chunks() -> list[list[Ev]]:
    """The visitor test's traffic (bursts over the velocity limit, repeat clicks, on ads
    ``ad-1`` to ``ad-4``) in the ad test's first chunks, its later clicks with the chunk of
    their time, over the ad test's three hours (blind clicks): every family flags clicks, some
    of them the same ones (``ad-1`` sends impressions)."""
    out = ad_traffic()
    events = repeat_traffic()
    half = len(events) // 2
    out[0] = out[0] + events[:half]
    out[1] = out[1] + events[half:]
    at = next(i for i, c in enumerate(out) if min(e.ts_ms for e in c) >= T0 + 20 * 60_000)
    out[at - 1] = out[at - 1] + ticks()
    return out


class Outcome(NamedTuple):
    """What the families made of the traffic."""

    counts: dict[str, Counter[Key]]  # the store's
    realtime: Counter[str]  # the real-time counters'
    corrected: list[tuple[object, ...]]  # the corrections archive's rows, in keyed order
    by_rule: dict[str, int]
    reviews: dict[str, int]
    progress: dict[str, dict[int, KeyedProgress]]  # every family's

    def settled(self) -> tuple[object, ...]:
        """What does not depend on when a verdict was applied or where in a keyed log its
        record is (a restart moves the clock, and may append a record again): the counts,
        and each corrected click's verdicts (once each)."""
        verdicts = sorted((row[2:5] for row in self.corrected), key=repr)
        return self.counts, self.realtime, verdicts, self.by_rule, self.reviews


def outcome(rig: ThreeFamiliesRig) -> Outcome:
    rig.corrections.flush()
    rows = rig.corrected().to_pylist()
    names = ("keyed_partition", "keyed_offset", "event_id", "rule_id", "previous_rule_id")
    names += ("reason", "evidence", "corrected_at_ms")
    return Outcome(
        rig.counts(EVERY_AD),
        rig.realtime(EVERY_AD),
        sorted((tuple(r[n] for n in names) for r in rows), key=repr),
        rig.store.keyed_corrections_by_rule(),
        rig.store.keyed_reviews_by_rule(),
        {f: rig.store.keyed_progress(f) for f in ("ip", "visitor", "ad")},
    )


def _rig(root: Path, *, crash: Crash | None = None, folded: bool = True) -> ThreeFamiliesRig:
    rules_file = root / "rules.toml"
    rules_file.write_text(RULES)
    rig = ThreeFamiliesRig(
        root / "data", partitions=4, keyed_partitions=3, crash=crash, rules_file=rules_file
    )
    rig.folded = folded
    return rig


def _run(
    root: Path, *, crash: Crash | None = None, folded: bool = True
) -> tuple[ThreeFamiliesRig, Outcome]:
    rig = _rig(root, crash=crash, folded=folded)
    try:
        for chunk in chunks():
            rig.send(chunk)
            rig.run()
        result = outcome(rig)
    finally:
        rig.close()
    return rig, result


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[ThreeFamiliesRig, Outcome]:
    """The families committing one after the other, each in its own transaction."""
    return _run(tmp_path_factory.mktemp("one-by-one"), folded=False)


def test_one_loop_makes_one_store_commit_for_every_family_with_the_same_outcome(
    tmp_path: Path, one_by_one: tuple[ThreeFamiliesRig, Outcome]
) -> None:
    rig, result = _run(tmp_path)
    assert all(len(calls) <= 1 for calls in rig.loops), [c for c in rig.loops if len(c) > 1]
    together = [set(calls[0]) for calls in rig.loops if calls]
    assert {"ip", "visitor", "ad"} in together  # the premise: every family in one commit
    # ... where one by one, a loop commits once per family with records
    reference_rig, reference = one_by_one
    assert max(len(calls) for calls in reference_rig.loops) == 3
    assert result == reference
    # The premise: every family corrected clicks.
    assert {RULE, REPEAT, NO_IMPRESSION} <= set(result.by_rule), result.by_rule
    assert {int(str(row[0])) // FAMILY_KEYS for row in result.corrected} == {0, 1, 2}


def test_a_click_the_ip_and_ad_families_both_flag_is_corrected_once(
    one_by_one: tuple[ThreeFamiliesRig, Outcome],
) -> None:
    """The ad family decides an hour only once the whole hour is past its horizon; until
    then it has decided nothing, and the store must not forget the clicks the IP family
    corrected meanwhile (it did: they were corrected again, their minute going negative)."""
    fresh = Counter(row[2] for row in one_by_one[1].corrected if row[4] is None)
    assert [event_id for event_id, n in fresh.items() if n > 1] == []


@pytest.mark.parametrize(
    "point",
    [
        "keyed-before-commit",
        "keyed-inside-commit",
        "keyed-after-commit",
        "after-counters",
        "corrections-after-append",
        "keyed-snapshot",
    ],
)
def test_a_crash_around_the_one_commit_leaves_every_family_consistent(
    tmp_path: Path, point: str, one_by_one: tuple[ThreeFamiliesRig, Outcome]
) -> None:
    crash = Crash(point, at=3, times=4)
    _, result = _run(tmp_path, crash=crash)
    assert crash.fired >= 1
    assert result.settled() == one_by_one[1].settled()


def test_a_fenced_commit_has_every_family_recover(
    tmp_path: Path, one_by_one: tuple[ThreeFamiliesRig, Outcome]
) -> None:
    """A stale twin of the visitor stage (over the same store, counters, archive and
    snapshots) commits the visitor family's next records first: the families' one commit
    is fenced, none of it applies, and all three recover and go on."""
    rig = _rig(tmp_path)
    try:
        traffic = chunks()
        rig.send(traffic[0])
        rig.run()
        twin = KeyedStage(
            rig.family_reader,
            rig.store,
            rules=rig.stage.rules,
            clock=rig.clock,
            allowed_lateness_ms=rig.settings.allowed_lateness_ms,
            batch_records=29,
            counters=rig.counters,
            corrections=rig.corrections,
            snapshots=rig.family_snapshots,
            family=VISITOR,
        )
        rig.send(traffic[1])
        while step_all(rig.workers, rig.store, rig.counters):
            pass  # stage 1 only: every family's keyed log has new records
        assert twin.step() > 0
        fenced: list[tuple[str, ...]] = []
        commit_keyed = rig.store.commit_keyed

        def noting(commits: Sequence[KeyedCommit]) -> list[pa.Table]:
            try:
                return commit_keyed(commits)
            except FencedError:
                fenced.append(tuple(c.family for c in commits))
                raise

        rig.store.commit_keyed = noting  # type: ignore[method-assign]
        rig.run()
        assert fenced and set(fenced[0]) == {"ip", "visitor", "ad"}
        for chunk in traffic[2:]:
            rig.send(chunk)
            rig.run()
        result = outcome(rig)
    finally:
        rig.close()
    assert result.settled() == one_by_one[1].settled()


@pytest.mark.parametrize("error", ["fenced", "crash"])
def test_a_refused_commit_has_every_family_that_took_part_rederive_its_verdicts(
    tmp_path: Path, error: str, one_by_one: tuple[ThreeFamiliesRig, Outcome]
) -> None:
    """The first commit of several families in which one after the first has verdicts is
    refused before the store sees it (fenced: the worker goes on; a crash: it restarts):
    every family must re-derive its own, none lost, none doubled."""
    refused: list[tuple[str, ...]] = []

    class Refuse(Crash):
        def wrap(self, obj: object, name: str, **points: str | None) -> None:
            super().wrap(obj, name, **points)
            if name != "commit_keyed":
                return
            real = getattr(obj, name)

            def refusing(commits: Sequence[KeyedCommit]) -> list[pa.Table]:
                families = tuple(dict.fromkeys(c.family for c in commits))
                judged = {c.family for c in commits if c.verdicts and c.verdicts.num_rows}
                if len(families) >= 2 and judged - {families[0]} and not refused:
                    refused.append(families)
                    if error == "fenced":
                        raise FencedError("refused", [])
                    raise CrashError("refused")
                return real(commits)

            setattr(obj, name, refusing)

    _, result = _run(tmp_path, crash=Refuse())
    assert refused
    assert result.settled() == one_by_one[1].settled()
