"""The batch layer's reports over HTTP: stream vs batch per (ad, hour), and restatements."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clickagg.api.errors import ApiError, bad_request
from clickagg.api.state import state_of
from clickagg.api.timefmt import iso, parse_time
from clickagg.core.windows import DAY_MS
from clickagg.query.base import FinalRows

MAX_SPAN_MS = 366 * DAY_MS


def _span(request: Request) -> tuple[int, int]:
    """[start, end) from the parameters; by default the last 30 days."""
    params = request.query_params
    now = state_of(request).clock.now_ms()
    end = parse_time("end", params["end"]) if "end" in params else now + 1
    start = parse_time("start", params["start"]) if "start" in params else end - 30 * DAY_MS
    if start >= end:
        raise bad_request(f"start ({iso(start)}) must be before end ({iso(end)})")
    if end - start > MAX_SPAN_MS:
        raise bad_request("range too long: at most 366 days")
    return start, end


def _id(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and not 1 <= len(value) <= 256:
        raise bad_request(f"{name} must be 1 to 256 characters")
    return value


def _final(request: Request) -> FinalRows:
    final = state_of(request).final
    if final is None:
        raise ApiError(503, "no batch layer", "this server has no batch layer configured")
    return final


async def reconciliation(request: Request) -> Response:
    """``GET /reconciliation?start&end[&ad_id]``: per (ad, hour) reconciled, what the stream
    counted, what the batch counts, the difference and its causes."""
    start, end = _span(request)
    ad_id = _id(request, "ad_id")
    final = _final(request)
    rows = await asyncio.to_thread(final.reconciliation, start_ms=start, end_ms=end, ad_id=ad_id)
    body: list[dict[str, Any]] = []
    for r in rows:
        sides = {
            side: {
                "clicks": getattr(r, f"{side}_clicks"),
                "impressions": getattr(r, f"{side}_impressions"),
                "spend_micros": getattr(r, f"{side}_spend_micros"),
            }
            for side in ("stream", "batch")
        }
        body.append(
            {
                "ad_id": r.ad_id,
                "hour": iso(r.hour_ms),
                **sides,
                "difference": {k: sides["batch"][k] - sides["stream"][k] for k in sides["batch"]},
                "causes": {
                    "late_clicks": r.late_clicks,
                    "late_spend_micros": r.late_spend_micros,
                    "beyond_horizon_clicks": -r.beyond_horizon_clicks,
                    "beyond_horizon_spend_micros": -r.beyond_horizon_spend_micros,
                    "newly_invalid_clicks": -r.newly_invalid_clicks,
                },
            }
        )
    return JSONResponse(body)


async def adjustments(request: Request) -> Response:
    """``GET /billing/adjustments?start&end[&advertiser_id]``: every change a restatement
    made to a closed hour, per ad, with when and why."""
    start, end = _span(request)
    advertiser_id = _id(request, "advertiser_id")
    final = _final(request)
    rows = await asyncio.to_thread(
        final.adjustments, start_ms=start, end_ms=end, advertiser_id=advertiser_id
    )
    return JSONResponse(
        [
            {
                "ad_id": a.ad_id,
                "advertiser_id": a.advertiser_id,
                "campaign_id": a.campaign_id,
                "hour": iso(a.hour_ms),
                "version": a.version,
                "previous_version": a.previous_version,
                "restated_at": iso(a.created_ms),
                "reason": a.reason,
                "clicks": a.clicks,
                "impressions": a.impressions,
                "spend_micros": a.spend_micros,
                "invalid_clicks": a.invalid_clicks,
            }
            for a in rows
        ]
    )


MONTH_PATTERN = r"^(19[7-9][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9])-(0[1-9]|1[0-2])$"


async def statement(request: Request) -> Response:
    """``GET /billing/advertisers/{advertiser_id}/statement?month=YYYY-MM``: per ad and day
    in the advertiser's time zone, from final rows only, with later adjustments."""
    advertiser_id = request.path_params["advertiser_id"]
    if not 1 <= len(advertiser_id) <= 256:
        raise bad_request("advertiser_id must be 1 to 256 characters")
    month = request.query_params.get("month")
    if month is None:
        raise bad_request("month is required (YYYY-MM)")
    if re.match(MONTH_PATTERN, month) is None:
        raise bad_request(f"month={month!r}: expected YYYY-MM (1970-01 to 9989-12)")
    final = _final(request)
    body = await asyncio.to_thread(final.statement, advertiser_id=advertiser_id, month=month)
    return JSONResponse(body)
