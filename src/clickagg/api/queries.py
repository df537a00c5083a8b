"""Query endpoints in both seeds' shapes, all answered from the aggregate store."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, TypeVar, cast, get_args

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clickagg.api.errors import ApiError, bad_request
from clickagg.api.state import AppState, state_of
from clickagg.api.timefmt import iso, parse_span, parse_time
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS, window_start
from clickagg.query.base import (
    AggregateRow,
    Dimension,
    Granularity,
    QueryError,
    RankBy,
    RollupLevel,
    StoreUnavailable,
    Totals,
    all_final,
)

GRANULARITIES = get_args(Granularity)
DIMENSIONS = get_args(Dimension)
RANK_BY = get_args(RankBy)
REALTIME_WINDOWS = {"1m": MINUTE_MS, "5m": 5 * MINUTE_MS, "1h": HOUR_MS}
MAX_RANGE_MS = {"minute": 31 * DAY_MS, "hour": 366 * DAY_MS, "day": 10 * 366 * DAY_MS}
DEFAULT_RANGE_MS = DAY_MS


_T = TypeVar("_T")


async def answer(query: Awaitable[_T]) -> _T:
    """A query store call's result, or a 503 with Retry-After while the store cannot
    answer (the worker process restarting, recovering, busy): a worker restart is never a
    500. ``await answer(state.queries.totals(...))``."""
    try:
        return await query
    except StoreUnavailable as exc:
        raise ApiError(
            503,
            "store unavailable",
            f"the aggregate store did not answer ({exc}); retry",
            headers={"Retry-After": "1"},
        ) from None
    except QueryError as exc:
        raise ApiError(503, "store error", str(exc), headers={"Retry-After": "1"}) from None


def _choice(request: Request, name: str, allowed: tuple[str, ...], default: str | None) -> Any:
    value = request.query_params.get(name, default)
    if value is not None and value not in allowed:
        raise bad_request(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def _range(request: Request, state: AppState, granularity: str) -> tuple[int, int]:
    """[start, end) from start/end, or the last N (``last=7d``) before end, default 1 day."""
    params = request.query_params
    now = state.clock.now_ms()
    end = parse_time("end", params["end"]) if "end" in params else now + 1
    if "start" in params:
        start = parse_time("start", params["start"])
    elif "last" in params:
        start = end - parse_span("last", params["last"])
    else:
        start = end - DEFAULT_RANGE_MS
    if start >= end:
        raise bad_request(f"start ({iso(start)}) must be before end ({iso(end)})")
    if end - start > MAX_RANGE_MS[granularity]:
        raise bad_request(
            f"range too long for granularity={granularity}: at most "
            f"{MAX_RANGE_MS[granularity] // DAY_MS} days"
        )
    return start, end


def _ad_id(request: Request) -> str:
    ad_id = request.path_params.get("ad_id") or request.query_params.get("ad_id")
    if not ad_id:
        raise bad_request("ad_id is required")
    if len(ad_id) > 256:
        raise bad_request("ad_id is longer than 256 characters")
    return str(ad_id)


def _measures(clicks: int, impressions: int, spend_micros: int) -> dict[str, Any]:
    return {
        "clicks": clicks,
        "impressions": impressions,
        "ctr": round(clicks / impressions, 6) if impressions else None,
        "spend": spend_micros / 1_000_000,
        "spend_micros": spend_micros,
    }


def _row(row: AggregateRow, time_key: str, group_by: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {time_key: iso(row.window_ms)}
    if group_by is not None:
        body[group_by] = row.group
    body.update(_measures(row.clicks, row.impressions, row.spend_micros))
    body["unique_users"] = row.unique_users
    body["invalid_clicks"] = row.invalid_clicks
    body["final"] = row.final  # reconciled by the batch layer: billing-grade
    return body


async def _rows(request: Request) -> tuple[str, str, str | None, list[AggregateRow]]:
    state = state_of(request)
    ad_id = _ad_id(request)
    granularity = cast(Granularity, _choice(request, "granularity", GRANULARITIES, "hour"))
    group_by = cast(Dimension | None, _choice(request, "group_by", DIMENSIONS, None))
    start, end = _range(request, state, granularity)
    size = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}[granularity]
    rows = await answer(
        state.queries.aggregates(
            ad_id=ad_id,
            start_ms=window_start(start, size),
            end_ms=end,
            granularity=granularity,
            group_by=group_by,
        )
    )
    return ad_id, granularity, group_by, rows


async def aggregates(request: Request) -> Response:
    """Seed 000: ``GET /aggregates?ad_id&start&end&granularity[&group_by]``."""
    _, _, group_by, rows = await _rows(request)
    return JSONResponse([_row(row, "window", group_by) for row in rows])


async def ad_metrics(request: Request) -> Response:
    """Seed 001: ``GET /api/v1/ads/{ad_id}/metrics``."""
    ad_id, granularity, group_by, rows = await _rows(request)
    return JSONResponse(
        {
            "ad_id": ad_id,
            "granularity": granularity,
            "metrics": [_row(row, "window_start", group_by) for row in rows],
        }
    )


async def _sliding(state: AppState, ad_id: str, window_ms: int) -> Totals:
    """Minute rows covering the last ``window_ms``, the current partial minute included."""
    now = state.clock.now_ms()
    start = window_start(now, MINUTE_MS) - window_ms + MINUTE_MS
    return await answer(state.queries.window(ad_id=ad_id, start_ms=start, end_ms=now + MINUTE_MS))


async def realtime(request: Request) -> Response:
    """Seed 000: ``GET /aggregates/realtime?ad_id&window=1m|5m|1h``."""
    state = state_of(request)
    ad_id = _ad_id(request)
    window = cast(str, _choice(request, "window", tuple(REALTIME_WINDOWS), "5m"))
    totals = await _sliding(state, ad_id, REALTIME_WINDOWS[window])
    return JSONResponse(
        {
            "ad_id": ad_id,
            "window": window,
            **_measures(totals.clicks, totals.impressions, totals.spend_micros),
            "as_of": iso(state.clock.now_ms()),
        }
    )


async def ad_realtime(request: Request) -> Response:
    """Seed 001: ``GET /api/v1/ads/{ad_id}/metrics/realtime``."""
    state = state_of(request)
    ad_id = _ad_id(request)
    body: dict[str, Any] = {"ad_id": ad_id}
    for suffix, window_ms in (
        ("minute", MINUTE_MS),
        ("5_minutes", 5 * MINUTE_MS),
        ("hour", HOUR_MS),
    ):
        totals = await _sliding(state, ad_id, window_ms)
        body[f"clicks_last_{suffix}"] = totals.clicks
        body[f"impressions_last_{suffix}"] = totals.impressions
        body[f"spend_last_{suffix}"] = totals.spend_micros / 1_000_000
    body["as_of"] = iso(state.clock.now_ms())
    return JSONResponse(body)


def _owner_id(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    if len(value) > 256:
        raise bad_request(f"{name} is longer than 256 characters")
    return value


async def _rollup(request: Request, level: RollupLevel, name: str) -> Response:
    state = state_of(request)
    owner = _owner_id(request, name)
    granularity = cast(Granularity, _choice(request, "granularity", GRANULARITIES, "hour"))
    start, end = _range(request, state, granularity)
    size = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}[granularity]
    rows = await answer(
        state.queries.rollup(
            level=level,
            id=owner,
            start_ms=window_start(start, size),
            end_ms=end,
            granularity=granularity,
        )
    )
    return JSONResponse(
        {
            name: owner,
            "granularity": granularity,
            "metrics": [_row(row, "window_start", None) for row in rows],
        }
    )


async def advertiser_metrics(request: Request) -> Response:
    """``GET /advertisers/{advertiser_id}/metrics``: every ad of the advertiser, per window."""
    return await _rollup(request, "advertiser", "advertiser_id")


async def campaign_metrics(request: Request) -> Response:
    """``GET /campaigns/{campaign_id}/metrics``: every ad of the campaign, per window."""
    return await _rollup(request, "campaign", "campaign_id")


TOP_LIMIT = 1000
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit takes '²', which int() refuses


async def top_ads(request: Request) -> Response:
    """``GET /ads/top?start&end|last&by&limit[&advertiser_id]``: the ads with the most
    clicks (or impressions, spend, invalid clicks) over the range; ``final`` when the whole
    range is reconciled, and then ranked from the billing rows."""
    state = state_of(request)
    by = cast(RankBy, _choice(request, "by", RANK_BY, "clicks"))
    limit_text = request.query_params.get("limit", "10")
    if not _DIGITS.fullmatch(limit_text) or not 1 <= int(limit_text) <= TOP_LIMIT:
        raise bad_request(f"limit={limit_text!r}: expected an integer from 1 to {TOP_LIMIT}")
    advertiser = request.query_params.get("advertiser_id")
    if advertiser is not None and not 1 <= len(advertiser) <= 256:
        raise bad_request("advertiser_id must be 1 to 256 characters")
    start, end = _range(request, state, "hour")
    start = window_start(start, MINUTE_MS)
    final = state.final is not None and await asyncio.to_thread(all_final, state.final, start, end)
    ads = await answer(
        state.queries.top_ads(
            start_ms=start, end_ms=end, by=by, limit=int(limit_text), advertiser_id=advertiser
        )
    )
    return JSONResponse(
        {
            "start": iso(start),
            "end": iso(end),
            "by": by,
            "final": final,
            "ads": [
                {
                    "ad_id": ad.ad_id,
                    "advertiser_id": ad.advertiser_id,
                    "campaign_id": ad.campaign_id,
                    **_measures(ad.clicks, ad.impressions, ad.spend_micros),
                    "unique_users": ad.unique_users,
                    "invalid_clicks": ad.invalid_clicks,
                }
                for ad in ads
            ],
        }
    )
