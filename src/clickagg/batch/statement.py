"""An advertiser's monthly statement, from final (reconciled) rows only.

Per ad and per *local* day in the advertiser's time zone: billable clicks, impressions,
spend and the invalid clicks removed. Final rows are per UTC minute, so a local day —
23 or 25 hours across a DST change, offset by half or quarter hours in some zones — is an
exact set of minutes: no day is ever apportioned. Hours of the month not reconciled yet
are listed (the statement is not final until they are). Adjustments are the changes
restatements published after the month closed (see ``FinalRowsReader.adjustments``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import polars as pl

from clickagg.core.ads import AdEntry
from clickagg.core.windows import HOUR_MS
from clickagg.registry import Advertiser

if TYPE_CHECKING:
    from clickagg.batch.published import FinalRowsReader

_SUMS = ("clicks", "impressions", "spend_micros", "invalid_clicks")


@dataclass(frozen=True)
class StatementLine:
    ad_id: str
    day: dt.date  # in the advertiser's time zone
    clicks: int
    impressions: int
    spend_micros: int
    invalid_clicks: int


@dataclass(frozen=True)
class Statement:
    advertiser: Advertiser
    month: str  # YYYY-MM
    start_ms: int  # the month's first local midnight, UTC epoch ms
    end_ms: int
    lines: list[StatementLine]
    adjustments_after_close: dict[str, dict[str, int]]  # ad_id -> sums changed later
    hours_not_final: list[int]
    # Each ad's registry status at the month's end (reported only: it never changes what
    # is counted or billed; see clickagg.core.ads).
    ad_status: dict[str, str] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, int]:
        return {m: sum(getattr(line, m) for line in self.lines) for m in _SUMS}


def month_bounds(month: str, zone: str) -> tuple[int, int]:
    """[first local midnight of ``month``, first of the next) in UTC epoch ms."""
    try:
        year, number = (int(part) for part in month.split("-"))
        first = dt.datetime(year, number, 1, tzinfo=ZoneInfo(zone))
    except ValueError:
        raise ValueError(f"month {month!r}: expected YYYY-MM") from None
    following = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=ZoneInfo(zone))
    return int(first.timestamp() * 1000), int(following.timestamp() * 1000)


AdsAsOf = Callable[[int], Mapping[str, AdEntry]]
"""The ad registry as of a time (``AdRegistry.entries``)."""


def build_statement(
    reader: FinalRowsReader, advertiser: Advertiser, month: str, *, ads: AdsAsOf | None = None
) -> Statement:
    """``ads``: where each line's ad status comes from (the registry as of the month's
    last moment); without it, no status is reported."""
    start, end = month_bounds(month, advertiser.time_zone)
    first_hour = start - start % HOUR_MS
    hours = list(range(first_hour, end, HOUR_MS))
    final = set(reader.final_hours(first_hour, end))
    frames = [
        frame.filter(pl.col("advertiser_id") == advertiser.advertiser_id)
        for hour in sorted(final)
        if (frame := reader.minute_frame(hour)) is not None
    ]
    lines: list[StatementLine] = []
    if frames:
        rows = pl.concat(frames).filter(pl.col("minute_ms").is_between(start, end, closed="left"))
        local_day = (
            pl.from_epoch("minute_ms", time_unit="ms")
            .dt.replace_time_zone("UTC")
            .dt.convert_time_zone(advertiser.time_zone)
            .dt.date()
            .alias("day")
        )
        daily = (
            rows.group_by("ad_id", local_day)
            .agg(pl.col(m).sum() for m in _SUMS)
            .sort("ad_id", "day")
        )
        lines = [StatementLine(**row) for row in daily.iter_rows(named=True)]
    later: dict[str, dict[str, int]] = {}
    for change in reader.adjustments(
        start_ms=start, end_ms=end, advertiser_id=advertiser.advertiser_id
    ):
        if change.created_ms >= end:  # published after the month closed
            sums = later.setdefault(change.ad_id, dict.fromkeys(_SUMS, 0))
            for m in _SUMS:
                sums[m] += getattr(change, m)
    registry = ads(end - 1) if ads is not None else {}
    status = {line.ad_id: registry[line.ad_id].status for line in lines if line.ad_id in registry}
    return Statement(
        advertiser,
        month,
        start,
        end,
        lines,
        later,
        [h for h in hours if h not in final],
        status,
    )


def _iso_hour(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:00:00Z")


def statement_json(statement: Statement) -> dict[str, Any]:
    """The statement as the API answers it (and ``--format json`` prints it)."""
    advertiser = statement.advertiser
    return {
        "advertiser_id": advertiser.advertiser_id,
        "name": advertiser.name,
        "currency": advertiser.currency,
        "time_zone": advertiser.time_zone,
        "month": statement.month,
        "final": not statement.hours_not_final,
        "hours_not_final": [_iso_hour(h) for h in statement.hours_not_final],
        "lines": [
            {
                "ad_id": line.ad_id,
                "day": line.day.isoformat(),
                "clicks": line.clicks,
                "impressions": line.impressions,
                "spend_micros": line.spend_micros,
                "invalid_clicks_removed": line.invalid_clicks,
                "ad_status": statement.ad_status.get(line.ad_id),
            }
            for line in statement.lines
        ],
        "adjustments_after_close": [
            {"ad_id": ad_id, **sums}
            for ad_id, sums in sorted(statement.adjustments_after_close.items())
        ],
        "totals": statement.totals,
    }


def statement_frame(statement: Statement) -> pl.DataFrame:
    """The lines as a table (``--format csv|parquet``)."""
    return pl.DataFrame(
        [
            {
                "advertiser_id": statement.advertiser.advertiser_id,
                "ad_id": line.ad_id,
                "day": line.day,
                "clicks": line.clicks,
                "impressions": line.impressions,
                "spend_micros": line.spend_micros,
                "invalid_clicks_removed": line.invalid_clicks,
                "ad_status": statement.ad_status.get(line.ad_id),
            }
            for line in statement.lines
        ],
        schema={
            "advertiser_id": pl.String,
            "ad_id": pl.String,
            "day": pl.Date,
            "clicks": pl.Int64,
            "impressions": pl.Int64,
            "spend_micros": pl.Int64,
            "invalid_clicks_removed": pl.Int64,
            "ad_status": pl.String,
        },
    )
