"""What-if: candidate invalid-traffic rules over the archive, before they are turned on.

For each hour of a period, the same winners (ranked once by the engine) are reconciled
twice by :func:`~clickagg.batch.reconcile.reconcile_hour`, with the same prices:

* **now**: exactly what ``clickagg reconcile`` bills: the stream's verdicts kept, the
  current rules (``rules_file``) applied to every winner;
* **candidate**: the candidate rules alone judge every winner, as if they had been in
  force when its events arrived: a built-in rule the candidate turns off no longer flags
  what the stream flagged with it.

Compared click by click, that gives per ad and per advertiser the billable clicks and
spend under each and the difference, and the clicks whose verdict flips. Nothing is
written: no version published, no report, no lock file, no rules change record. With the
current rules as the candidate nothing flips (the stream's rules and the batch's are the
same matchers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from clickagg.archive.parquet import ParquetArchiveReader
from clickagg.batch.reconcile import (
    PeriodSource,
    context_start,
    engine_factory,
    month_of,
    reconcile_hour,
)
from clickagg.batch.runner import Progress
from clickagg.config import Settings
from clickagg.core import ids
from clickagg.core.rules.base import RuleSet
from clickagg.core.rules.loading import load_rules
from clickagg.core.windows import HOUR_MS
from clickagg.registry import AdRegistry

DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class Change:
    """Billable clicks and spend of one ad or advertiser, now and under the candidate."""

    now_clicks: int
    candidate_clicks: int
    now_spend_micros: int
    candidate_spend_micros: int

    @property
    def delta_clicks(self) -> int:
        return self.candidate_clicks - self.now_clicks

    @property
    def delta_spend_micros(self) -> int:
        return self.candidate_spend_micros - self.now_spend_micros

    @property
    def changed(self) -> bool:
        return bool(self.delta_clicks or self.delta_spend_micros)

    def as_dict(self) -> dict[str, int]:
        return {
            "now_clicks": self.now_clicks,
            "candidate_clicks": self.candidate_clicks,
            "delta_clicks": self.delta_clicks,
            "now_spend_micros": self.now_spend_micros,
            "candidate_spend_micros": self.candidate_spend_micros,
            "delta_spend_micros": self.delta_spend_micros,
        }


@dataclass(frozen=True)
class AdChange(Change):
    ad_id: str = ""
    advertiser_id: str | None = None
    campaign_id: str | None = None


@dataclass(frozen=True)
class AdvertiserChange(Change):
    advertiser_id: str | None = None


@dataclass(frozen=True)
class FlippedClick:
    """A click billable under one set of rules and not the other."""

    event_id: str
    ad_id: str
    advertiser_id: str | None
    ts_ms: int
    ip: str | None
    user_agent: str | None
    spend_micros: int
    now_reason: str | None  # null: billable now
    candidate_reason: str | None  # null: billable under the candidate


@dataclass(frozen=True)
class RulesInfo:
    source: str
    digest: str
    ids: list[str]


@dataclass(frozen=True)
class ReplayReport:
    start_ms: int
    end_ms: int
    hours: int
    events: int  # winning events judged (each hour's, both sides the same)
    current: RulesInfo
    candidate: RulesInfo
    total: Change
    ads: list[AdChange]  # every ad with a winning click in the period, by ad_id
    advertisers: list[AdvertiserChange]  # by advertiser_id (null: events without one)
    flipped_total: int  # every flipped click, however many are listed
    flipped: list[FlippedClick] = field(default_factory=list)  # the first ``limit``


# Per click, in each hour's log order: what the comparison needs.
_CLICK_COLUMNS = (
    "event_id",
    "ad_id",
    "advertiser_id",
    "campaign_id",
    "ts_ms",
    "ip",
    "user_agent",
    "spend_micros",
)


class _SameWinners:
    """A :class:`PeriodSource` that asks its engine once per hour: both reconciliations
    of an hour judge the very same winners, row for row."""

    def __init__(self, view: PeriodSource) -> None:
        self.view = view
        self._hour: int | None = None
        self._tables: tuple[pa.Table, pa.Table] | None = None

    def hour(self, hour_ms: int) -> tuple[pa.Table, pa.Table] | None:
        if self._hour != hour_ms:
            self._hour, self._tables = hour_ms, self.view.hour(hour_ms)
        return self._tables

    def winners(self, start_ms: int, end_ms: int) -> pa.Table:
        return self.view.winners(start_ms, end_ms)

    def close(self) -> None:
        self.view.close()


def _clicks(judged: pl.DataFrame | None) -> pl.DataFrame | None:
    if judged is None:
        return None
    return judged.filter(pl.col("event_type") == ids.CLICK).select(
        *_CLICK_COLUMNS, "invalid", "reason"
    )


@dataclass(frozen=True)
class Judge:
    """One way of judging the winners: a rule set, and whether the stream's verdicts are
    kept (what ``reconcile`` bills) or set aside (what the rules alone would say)."""

    rules: RuleSet
    stream_verdicts: bool = False


@dataclass(frozen=True)
class Judged:
    """The period's winning clicks (``_CLICK_COLUMNS`` plus ``invalid`` and ``reason``),
    one frame per judge, row for row the same clicks in the same order."""

    clicks: list[pl.DataFrame]
    hours: int
    events: int  # winning events judged (each hour's, every judge the same)


def judge_clicks(
    settings: Settings,
    judges: Sequence[Judge],
    start_ms: int,
    end_ms: int,
    *,
    engine: str = "duckdb",
    progress: Callable[[Progress], None] | None = None,
) -> Judged:
    """Judge every winning click of the whole hours of [start_ms, end_ms) (start floored
    to its hour; the hour holding end_ms counts when end_ms is not on one, as in
    reconcile) by each judge, over the same winners (ranked once per hour by the engine)
    with the same prices. Reads the archive only."""
    first = start_ms - start_ms % HOUR_MS
    hours = list(range(first, end_ms, HOUR_MS))
    cpc = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file).book()
    open_period = engine_factory(engine)
    by_month: dict[tuple[int, int], list[int]] = {}
    for hour_ms in hours:
        by_month.setdefault(month_of(hour_ms), []).append(hour_ms)
    archive = ParquetArchiveReader(settings.archive_dir)
    frames: list[list[pl.DataFrame]] = [[] for _ in judges]
    lookback = max((judge.rules.lookback_ms for judge in judges), default=0)
    started = time.monotonic()
    done = files_read = events = 0
    try:
        for (month_start, month_end), month_hours in by_month.items():
            # Every judge's context before the first hour, as reconcile reads it.
            span = (context_start(min(month_hours), lookback), max(month_hours) + HOUR_MS)
            files = archive.files(min(month_start, month_of(span[0])[0]), month_end)
            files_read += len(files)
            recent: list[dict[int, pa.Table]] = [{} for _ in judges]
            with closing(_SameWinners(open_period(files, *span))) as view:
                for hour_ms in month_hours:
                    results = [
                        reconcile_hour(
                            view,
                            hour_ms,
                            cpc_micros=cpc,
                            invalid=judge.rules.batch_reasons,
                            lookback_ms=judge.rules.lookback_ms,
                            recent=recent[n],
                            stream_verdicts=judge.stream_verdicts,
                        )
                        for n, judge in enumerate(judges)
                    ]
                    clicks = [c for r in results if (c := _clicks(r.judged)) is not None]
                    if len(clicks) == len(judges) and clicks[0].height:
                        assert len({c.height for c in clicks}) == 1  # the same winners
                        for n, c in enumerate(clicks):
                            frames[n].append(c)
                    done += 1
                    events += results[0].events if results else 0
                    if progress is not None:
                        elapsed = time.monotonic() - started
                        progress(Progress(done, len(hours), files_read, events, elapsed))
    finally:
        archive.close()
    return Judged(
        clicks=[pl.concat(f, how="vertical_relaxed") if f else _no_clicks() for f in frames],
        hours=len(hours),
        events=events,
    )


def _no_clicks() -> pl.DataFrame:
    schema = {k: v for k, v in _EMPTY.items() if not k.startswith(("now_", "candidate_"))}
    return pl.DataFrame(schema=schema | {"invalid": pl.Boolean, "reason": pl.String})


def replay_rules(
    settings: Settings,
    candidate: RuleSet,
    start_ms: int,
    end_ms: int,
    *,
    limit: int = DEFAULT_LIMIT,
    engine: str = "duckdb",
    progress: Callable[[Progress], None] | None = None,
) -> ReplayReport:
    """Replay ``candidate`` over the whole hours of [start_ms, end_ms) against the current
    rules (see :func:`judge_clicks`). Reads the archive only."""
    current = load_rules(settings.rules_file, blocklist=settings.blocklist_path)
    judged = judge_clicks(
        settings,
        [Judge(current, stream_verdicts=True), Judge(candidate)],
        start_ms,
        end_ms,
        engine=engine,
        progress=progress,
    )
    now, later = judged.clicks
    both = now.rename({"invalid": "now_invalid", "reason": "now_reason"}).with_columns(
        later["invalid"].alias("candidate_invalid"),
        later["reason"].alias("candidate_reason"),
    )
    first = start_ms - start_ms % HOUR_MS
    return _report(
        both,
        start_ms=first,
        end_ms=first + judged.hours * HOUR_MS,
        hours=judged.hours,
        events=judged.events,
        current=current,
        candidate=candidate,
        limit=limit,
    )


_EMPTY = {
    "event_id": pl.String,
    "ad_id": pl.String,
    "advertiser_id": pl.String,
    "campaign_id": pl.String,
    "ts_ms": pl.Int64,
    "ip": pl.String,
    "user_agent": pl.String,
    "spend_micros": pl.Int64,
    "now_invalid": pl.Boolean,
    "now_reason": pl.String,
    "candidate_invalid": pl.Boolean,
    "candidate_reason": pl.String,
}


def _sums() -> list[pl.Expr]:
    now_valid, later_valid = ~pl.col("now_invalid"), ~pl.col("candidate_invalid")
    spend = pl.col("spend_micros")
    return [
        now_valid.sum().cast(pl.Int64).alias("now_clicks"),
        later_valid.sum().cast(pl.Int64).alias("candidate_clicks"),
        spend.filter(now_valid).sum().cast(pl.Int64).alias("now_spend_micros"),
        spend.filter(later_valid).sum().cast(pl.Int64).alias("candidate_spend_micros"),
    ]


def _change(row: dict[str, Any]) -> dict[str, int]:
    keys = ("now_clicks", "candidate_clicks", "now_spend_micros", "candidate_spend_micros")
    return {key: int(row[key] or 0) for key in keys}


def _info(rules: RuleSet) -> RulesInfo:
    return RulesInfo(rules.source, rules.digest, rules.ids)


def _report(
    clicks: pl.DataFrame,
    *,
    start_ms: int,
    end_ms: int,
    hours: int,
    events: int,
    current: RuleSet,
    candidate: RuleSet,
    limit: int,
) -> ReplayReport:
    by_ad = (
        clicks.group_by("ad_id")
        .agg(
            # An ad's owner as its first click says (events name it; the registry may not).
            pl.col("advertiser_id").drop_nulls().first(),
            pl.col("campaign_id").drop_nulls().first(),
            *_sums(),
        )
        .sort("ad_id")
    )
    by_advertiser = (
        clicks.group_by("advertiser_id").agg(*_sums()).sort("advertiser_id", nulls_last=True)
    )
    total = clicks.select(*_sums()).row(0, named=True)
    flips = clicks.filter(pl.col("now_invalid") != pl.col("candidate_invalid"))
    listed = flips.head(max(limit, 0))
    return ReplayReport(
        start_ms=start_ms,
        end_ms=end_ms,
        hours=hours,
        events=events,
        current=_info(current),
        candidate=_info(candidate),
        total=Change(**_change(total)),
        ads=[
            AdChange(
                **_change(row),
                ad_id=row["ad_id"],
                advertiser_id=row["advertiser_id"],
                campaign_id=row["campaign_id"],
            )
            for row in by_ad.iter_rows(named=True)
        ],
        advertisers=[
            AdvertiserChange(**_change(row), advertiser_id=row["advertiser_id"])
            for row in by_advertiser.iter_rows(named=True)
        ],
        flipped_total=flips.height,
        flipped=[
            FlippedClick(
                event_id=row["event_id"],
                ad_id=row["ad_id"],
                advertiser_id=row["advertiser_id"],
                ts_ms=row["ts_ms"],
                ip=row["ip"],
                user_agent=row["user_agent"],
                spend_micros=row["spend_micros"],
                now_reason=row["now_reason"],
                candidate_reason=row["candidate_reason"],
            )
            for row in listed.iter_rows(named=True)
        ],
    )


def report_json(report: ReplayReport, iso: Callable[[int], str]) -> dict[str, Any]:
    """The report as the API and ``--format json`` give it (``iso`` formats a time)."""
    return {
        "since": iso(report.start_ms),
        "until": iso(report.end_ms),
        "hours": report.hours,
        "events": report.events,
        "current_rules": vars(report.current),
        "candidate_rules": vars(report.candidate),
        "total": report.total.as_dict(),
        "ads": [
            {
                "ad_id": ad.ad_id,
                "advertiser_id": ad.advertiser_id,
                "campaign_id": ad.campaign_id,
                **ad.as_dict(),
            }
            for ad in report.ads
        ],
        "advertisers": [
            {"advertiser_id": adv.advertiser_id, **adv.as_dict()} for adv in report.advertisers
        ],
        "flipped_total": report.flipped_total,
        "flipped": [
            {
                "event_id": flip.event_id,
                "ad_id": flip.ad_id,
                "advertiser_id": flip.advertiser_id,
                "ts": iso(flip.ts_ms),
                "ip": flip.ip,
                "user_agent": flip.user_agent,
                "spend_micros": flip.spend_micros,
                "now_reason": flip.now_reason,
                "candidate_reason": flip.candidate_reason,
            }
            for flip in report.flipped
        ],
    }
