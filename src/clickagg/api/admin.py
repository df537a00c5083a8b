"""Admin endpoints: the ad registry, the advertisers and the managed IP blocklist.

Every ``/admin/*`` request needs ``Authorization: Bearer <token>`` with a token of the
``admin_token`` setting; without that setting the endpoints are off (403, saying how to
turn them on), so a server is never administrable by accident. Each token has a name
(``name:token`` in the setting, "admin" for a bare token), recorded as who made each
change, with when. The changes land in the same append-only records the command line
writes (``clickagg ads|advertisers|blocklist``); the worker takes them up between rounds.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clickagg.api.errors import ApiError, bad_request
from clickagg.api.state import state_of
from clickagg.api.timefmt import LATEST_MS, parse_time
from clickagg.blocklist import Blocklist, BlocklistError
from clickagg.config import Settings
from clickagg.core.ads import FIELDS, AdChangeError, change_of, check_id
from clickagg.core.events import timestamp_ms
from clickagg.registry import AdRegistry, AdvertiserRegistry, RegistryError

MAX_ADMIN_BODY_BYTES = 1024 * 1024
MAX_CIDRS = 10_000
DEFAULT_NAME = "admin"


def tokens(setting: str) -> dict[str, str]:
    """token -> name, from ``admin_token``: comma-separated ``name:token`` or bare tokens."""
    out = {}
    for item in setting.split(","):
        item = item.strip()
        if not item:
            continue
        name, colon, token = item.partition(":")
        if not colon:
            name, token = DEFAULT_NAME, item
        if token:
            out[token] = name.strip() or DEFAULT_NAME
    return out


def authorize(request: Request) -> str:
    """The name of the token the request carries; 403 when admin is off, 401 without a
    valid token."""
    known = tokens(state_of(request).settings.admin_token)
    if not known:
        raise ApiError(
            403,
            "admin endpoints off",
            "set the admin_token setting (CLICKAGG_ADMIN_TOKEN, e.g. 'ops:<secret>') to "
            "enable /admin/*, then send 'Authorization: Bearer <secret>'",
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() == "bearer" and given:
        for token, name in known.items():
            if hmac.compare_digest(token.encode(), given.encode()):
                return name
    raise ApiError(
        401,
        "unauthorized",
        "send 'Authorization: Bearer <token>' with a token of the admin_token setting",
        headers={"WWW-Authenticate": 'Bearer realm="clickagg admin"'},
    )


async def _body(request: Request) -> dict[str, Any]:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ADMIN_BODY_BYTES:
            raise ApiError(413, "payload too large", f"body exceeds {MAX_ADMIN_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("empty body: send a JSON object", "empty body")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise bad_request(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object")
    for key, value in body.items():
        if value is None:
            raise bad_request(f"{key}: null is not a value (leave the field out to keep it)")
    return body


def _now(request: Request) -> int:
    return state_of(request).clock.now_ms()


def _settings(request: Request) -> Settings:
    return state_of(request).settings


def _ads(settings: Settings) -> AdRegistry:
    return AdRegistry.for_data_dir(settings.data_dir, settings.ads_file)


def _advertisers(settings: Settings) -> AdvertiserRegistry:
    return AdvertiserRegistry.for_data_dir(settings.data_dir, settings.advertisers_file)


def effective_ms(value: object) -> int:
    """``effective_from`` of a body: epoch seconds (below 1e11) or ms, or a date-time."""
    if isinstance(value, str):
        return parse_time("effective_from", value)
    if isinstance(value, int) and not isinstance(value, bool):
        ms = timestamp_ms(value)
        if 0 <= ms <= LATEST_MS:
            return ms
    raise bad_request(
        f"effective_from={value!r} is not a time: use epoch seconds/ms (an integer) or "
        "ISO-8601 (2030-01-15T10:00:00Z)"
    )


async def list_ads(request: Request) -> Response:
    """``GET /admin/ads[?at=]``: every ad as the registry describes it at a time (now)."""
    authorize(request)
    at = request.query_params.get("at")
    moment = _now(request) if at is None else parse_time("at", at)
    entries = await asyncio.to_thread(_ads(_settings(request)).entries, moment)
    return JSONResponse({"at_ms": moment, "ads": [e.as_json() for e in entries.values()]})


async def put_ad(request: Request) -> Response:
    """``PUT /admin/ads/{ad_id}``: change any of price, advertiser, campaign and status
    from ``effective_from`` (default now; never the past) on."""
    by = authorize(request)
    ad_id = request.path_params["ad_id"]
    body = await _body(request)
    now = _now(request)
    since = effective_ms(body.pop("effective_from")) if "effective_from" in body else now
    try:
        check_id("ad_id", ad_id)
        unknown = set(body) - set(FIELDS)
        if unknown:
            raise AdChangeError(
                f"unknown field(s) {sorted(unknown)} (known: {', '.join(FIELDS)}, effective_from)"
            )
        change = change_of(ad_id, since, body)
        registry = _ads(_settings(request))
        await asyncio.to_thread(registry.record_changes, [change], by=by, now_ms=now)
    except (AdChangeError, RegistryError) as exc:
        raise bad_request(str(exc)) from None
    entry = (await asyncio.to_thread(registry.entries, since))[ad_id]
    return JSONResponse({"ad": entry.as_json(), "effective_from_ms": since, "by": by})


async def list_advertisers(request: Request) -> Response:
    """``GET /admin/advertisers``: every advertiser as statements are made for them."""
    authorize(request)
    current = await asyncio.to_thread(_advertisers(_settings(request)).current)
    return JSONResponse({"advertisers": [_advertiser_json(a) for a in current.values()]})


def _advertiser_json(advertiser: Any) -> dict[str, str]:
    return {
        "advertiser_id": advertiser.advertiser_id,
        "name": advertiser.name,
        "currency": advertiser.currency,
        "time_zone": advertiser.time_zone,
    }


async def put_advertiser(request: Request) -> Response:
    """``PUT /admin/advertisers/{advertiser_id}``: name, currency (ISO 4217), time zone
    (IANA); a field left out keeps its value."""
    by = authorize(request)
    advertiser_id = request.path_params["advertiser_id"]
    body = await _body(request)
    registry = _advertisers(_settings(request))
    try:
        advertiser = await asyncio.to_thread(
            registry.record, advertiser_id, body, by=by, now_ms=_now(request)
        )
    except RegistryError as exc:
        raise bad_request(str(exc)) from None
    return JSONResponse({"advertiser": _advertiser_json(advertiser), "by": by})


def _blocklist(request: Request) -> Blocklist:
    return Blocklist(_settings(request).blocklist_path)


async def list_blocklist(request: Request) -> Response:
    """``GET /admin/blocklist``: the entries listed now, since when, by whom, why."""
    authorize(request)
    listed = await asyncio.to_thread(_blocklist(request).listed)
    return JSONResponse({"entries": [entry.as_json() for entry in listed]})


async def add_to_blocklist(request: Request) -> Response:
    """``POST /admin/blocklist`` ``{"cidrs": [...], "reason": "..."}``: list addresses or
    CIDRs; clicks from them of event times from now on are invalid (rule ip-blocklist)."""
    by = authorize(request)
    body = await _body(request)
    unknown = set(body) - {"cidrs", "reason"}
    if unknown:
        raise bad_request(f"unknown field(s) {sorted(unknown)} (known: cidrs, reason)")
    cidrs = body.get("cidrs")
    if not isinstance(cidrs, list) or not 1 <= len(cidrs) <= MAX_CIDRS:
        raise bad_request(f"cidrs must be an array of 1 to {MAX_CIDRS} addresses or CIDRs")
    reason = body.get("reason", "")
    blocklist = _blocklist(request)
    try:
        added = await asyncio.to_thread(
            blocklist.add, cidrs, reason=reason, by=by, now_ms=_now(request)
        )
    except BlocklistError as exc:
        raise bad_request(str(exc)) from None
    return JSONResponse({"added": added, "by": by})


async def remove_from_blocklist(request: Request) -> Response:
    """``DELETE /admin/blocklist/{cidr}`` (URL-encoded, e.g. ``203.0.113.0%2F24``): take
    an entry off the list; clicks it flagged while listed stay invalid."""
    by = authorize(request)
    cidr = request.path_params["cidr"]
    blocklist = _blocklist(request)
    try:
        removed = await asyncio.to_thread(blocklist.remove, cidr, by=by, now_ms=_now(request))
    except BlocklistError as exc:
        raise bad_request(str(exc)) from None
    except LookupError as exc:
        raise ApiError(404, "not listed", str(exc)) from None
    return JSONResponse({"removed": removed, "by": by})


async def blocklist(request: Request) -> Response:
    """One route for both methods, so that a 405 names them both in ``Allow``."""
    if request.method == "POST":
        return await add_to_blocklist(request)
    return await list_blocklist(request)


ROUTES = [
    Route("/admin/ads", list_ads, methods=["GET"]),
    Route("/admin/ads/{ad_id}", put_ad, methods=["PUT"]),
    Route("/admin/advertisers", list_advertisers, methods=["GET"]),
    Route("/admin/advertisers/{advertiser_id}", put_advertiser, methods=["PUT"]),
    Route("/admin/blocklist", blocklist, methods=["GET", "POST"]),
    # :path: a CIDR's "/" arrives URL-encoded (%2F), and is decoded before routing.
    Route("/admin/blocklist/{cidr:path}", remove_from_blocklist, methods=["DELETE"]),
]
