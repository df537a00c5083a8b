"""``POST /rules/replay``: what candidate invalid-traffic rules would change, over HTTP.

The batch work (ranking a month of the archive, judging every winner twice) runs in a
thread, one replay at a time, so the event loop keeps taking events meanwhile; the period
is bounded by ``replay_max_span``.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clickagg.api.errors import ApiError, bad_request
from clickagg.api.state import state_of
from clickagg.api.timefmt import iso, parse_time
from clickagg.batch.replay import DEFAULT_LIMIT, report_json
from clickagg.config import Settings
from clickagg.core.rules.base import RuleError, RuleSet
from clickagg.core.windows import HOUR_MS

MAX_LIMIT = 10_000
"""Flipped clicks listed at most per answer (their total is always given)."""

LAST_MONTH_MS = 253_399_622_400_000  # 9999-12-01T00:00:00Z: a billing month must end
RULES_PROBLEM = "rules: "
"""How a 400 for rules that do not load begins (the loader's message follows)."""


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    rules: str
    since: int | str
    until: int | str | None = None
    limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] = DEFAULT_LIMIT


_decode = msgspec.json.Decoder(ReplayRequest).decode
_replays = threading.Lock()  # one at a time: the box's cores are the stream's too


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload too large", f"body is {declared} bytes; limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload too large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _time(name: str, value: int | str) -> int:
    return parse_time(name, str(value))


def _candidate(settings: Settings, text: str) -> RuleSet:
    """The candidate, compiled; files it names only next to the live rules file (none
    without one): a request must not make the server read, and echo, any file it can."""
    from clickagg.core.rules.loading import load_rules_text

    base: Path | None = settings.rules_file.parent if settings.rules_file else None
    return load_rules_text(text, source="request", base=base, confine=True)


def _replay(
    settings: Settings, candidate: RuleSet, start: int, end: int, limit: int
) -> dict[str, Any]:
    from clickagg.batch.replay import replay_rules

    with _replays:
        report = replay_rules(settings, candidate, start, end, limit=limit)
    return report_json(report, iso)


async def replay(request: Request) -> Response:
    """``POST /rules/replay`` ``{"rules", "since"[, "until"][, "limit"]}``: per ad and
    advertiser the billable clicks and spend now and under the candidate rules, and the
    clicks that flip. Changes nothing."""
    state = state_of(request)
    settings = state.settings
    body = await _body(request, settings.max_body_bytes)
    try:
        asked = _decode(body)
    except msgspec.DecodeError as exc:
        raise bad_request(f"body: {exc}") from None
    try:
        candidate = await asyncio.to_thread(_candidate, settings, asked.rules)
    except RuleError as exc:
        raise bad_request(f"{RULES_PROBLEM}{exc}", "invalid rules") from None
    start = _time("since", asked.since)
    if asked.until is None:
        now = state.clock.now_ms()
        end = now - now % HOUR_MS
    else:
        end = _time("until", asked.until)
    start -= start % HOUR_MS
    if end > LAST_MONTH_MS:
        raise bad_request(f"until ({iso(end)}) is out of range: at most {iso(LAST_MONTH_MS)}")
    if start >= end:
        raise bad_request(f"since ({iso(start)}, its hour) must be before until ({iso(end)})")
    if end - start > settings.replay_max_span_ms:
        days = settings.replay_max_span_ms / 86_400_000
        raise bad_request(f"period too long: at most {days:g} days (replay_max_span)")
    answer = await asyncio.to_thread(_replay, settings, candidate, start, end, asked.limit)
    return JSONResponse(answer)
