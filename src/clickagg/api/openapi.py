"""The OpenAPI document, built from the same msgspec types that validate requests.

It states every constraint the server enforces, so that a request the document admits is
answered 2xx and one it refuses is answered 4xx (``tests/api/test_openapi.py`` runs
schemathesis against the live server to hold it to that). Two rules depend on the server's
clock, so the document is rendered when it is served: event timestamps may be at most
``max_future`` ahead of now, and what now is moves. Rules JSON Schema cannot state (start
before end, the span a granularity allows) are in the descriptions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from clickagg.api.billing import MONTH_PATTERN
from clickagg.api.rules import MAX_LIMIT, RULES_PROBLEM
from clickagg.api.timefmt import LATEST_MS
from clickagg.batch.replay import DEFAULT_LIMIT
from clickagg.config import Settings
from clickagg.core.events import EARLIEST_MS, IncomingEvent, timestamp_ms

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID_LENGTH = {"minLength": 1, "maxLength": 256}
# clickagg.config.parse_duration_ms's rule, digits in ASCII
DURATION_PATTERN = r"^\s*[0-9]+\s*(ms|s|m|h|d)?\s*$"
# 1971..9998: with any UTC offset a date-time of these years is in the queries' range
QUERY_YEARS = "(197[1-9]|19[89][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
_TWO_DIGITS = {
    "month": "(0[1-9]|1[0-2])",
    "day": "(0[1-9]|1[0-9]|2[0-8])",  # days every month has: the pattern cannot count
    "hour": "([01][0-9]|2[0-3])",
    "minute": "[0-5][0-9]",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad input, named",
        404: "not found",
        413: "body or batch too large",
        503: "unavailable: retry after Retry-After seconds",
    }
    return {str(code): _json(_ERROR, text[code]) for code in codes}


def _query(
    name: str, description: str, schema: dict[str, Any], *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def _enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def _years(first: int, last: int) -> str:
    """A regex alternation matching the four-digit years first..last (a few dozen)."""
    return "(" + "|".join(f"{year:04d}" for year in range(first, last + 1)) + ")"


def _date_time(years: str) -> dict[str, Any]:
    """RFC 3339 date-times in the years the regex ``years`` matches, with an offset."""
    d = _TWO_DIGITS
    pattern = (
        f"^{years}-{d['month']}-{d['day']}"
        f"T{d['hour']}:{d['minute']}:{d['minute']}(\\.[0-9]{{1,6}})?"
        f"(Z|[+-]{d['hour']}:{d['minute']})$"
    )
    return {"type": "string", "format": "date-time", "pattern": pattern}


def _first_float(accepted: Callable[[float], bool], low: float, high: float) -> float:
    """The least float in (low, high] that ``accepted`` admits, ``accepted`` being false at
    low, true at high and monotone between: the exact edge of a server rule over floats."""
    while math.nextafter(low, math.inf) < high:
        middle = low + (high - low) / 2
        if not low < middle < high:
            middle = math.nextafter(low, math.inf)
        if accepted(middle):
            high = middle
        else:
            low = middle
    return high


def timestamp_schema(now_ms: int, max_future_ms: int) -> dict[str, Any]:
    """What ``timestamp`` the server accepts at ``now_ms``: epoch seconds or milliseconds
    (numbers below 1e11 are seconds) from 2000-01-01 to ``max_future`` after now, the float
    edges being the exact ones of :func:`clickagg.core.events.timestamp_ms`; or a
    date-time. The date-times stated are whole years from 2001 to last year, a subset:
    JSON Schema cannot compare a date-time with now."""
    latest = now_ms + max_future_ms

    def in_range(value: float) -> bool:
        return EARLIEST_MS <= timestamp_ms(value) <= latest

    earliest_s = EARLIEST_MS / 1000
    first_second = _first_float(in_range, earliest_s - 1, earliest_s)
    after_last_second = _first_float(lambda v: not in_range(v), latest / 1000, latest / 1000 + 1)
    after_last_ms = _first_float(lambda v: not in_range(v), float(latest), float(latest + 1))
    this_year = datetime.fromtimestamp(now_ms / 1000, tz=UTC).year
    return {
        "description": (
            "when the ad server saw the event: epoch seconds (below 1e11) or milliseconds, "
            "or an RFC 3339 date-time; from 2000-01-01 to max_future after the server's "
            "clock (the bounds here are those of the moment this document was served)"
        ),
        "anyOf": [
            {
                "type": "number",
                "minimum": first_second,
                "maximum": math.nextafter(after_last_second, -math.inf),
            },
            {
                "type": "number",
                "minimum": EARLIEST_MS,
                "maximum": math.nextafter(after_last_ms, -math.inf),
            },
            _date_time(_years(2001, this_year - 1)),
        ],
    }


def _event_schemas(now_ms: int, max_future_ms: int) -> dict[str, dict[str, Any]]:
    """The msgspec schema of an event, with the rules the server adds after decoding: the
    timestamp's range and, per endpoint, which event_type it takes."""
    (_,), components = msgspec.json.schema_components([IncomingEvent])
    base = components["IncomingEvent"]
    base["properties"]["timestamp"] = timestamp_schema(now_ms, max_future_ms)
    schemas = {}
    for name, types, required in (
        ("ClickEvent", ["click", None], False),
        ("ImpressionEvent", ["impression", None], False),
        ("BatchItem", ["click", "impression"], True),
    ):
        schema = copy.deepcopy(base)
        schema["title"] = name
        schema["properties"]["event_type"] = {"enum": types}
        if required:
            schema["required"] = [*schema["required"], "event_type"]
            schema["properties"]["event_type"]["description"] = "each item names its type"
        else:
            schema["properties"]["event_type"]["default"] = None
            schema["properties"]["event_type"]["description"] = "the endpoint's, if given"
        schemas[name] = schema
    return schemas


def _replay_operation(settings: Settings) -> dict[str, Any]:
    """``POST /rules/replay``: the request as :class:`clickagg.api.rules.ReplayRequest`
    decodes it, the report as :func:`clickagg.batch.replay.report_json` writes it."""
    count = {"type": "integer"}
    text_or_null = {"type": ["string", "null"]}
    change = {
        name: count
        for name in (
            "now_clicks",
            "candidate_clicks",
            "delta_clicks",
            "now_spend_micros",
            "candidate_spend_micros",
            "delta_spend_micros",
        )
    }

    def strict(properties: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": properties,
            "required": list(properties),
            "additionalProperties": False,
        }

    rules_info = strict(
        {
            "source": {"type": "string"},
            "digest": {"type": "string"},
            "ids": {"type": "array", "items": {"type": "string"}},
        }
    )
    report = strict(
        {
            "since": {"type": "string", "format": "date-time"},
            "until": {"type": "string", "format": "date-time"},
            "hours": count,
            "events": count,
            "current_rules": rules_info,
            "candidate_rules": rules_info,
            "total": strict(change),
            "ads": {
                "type": "array",
                "items": strict(
                    {
                        "ad_id": {"type": "string"},
                        "advertiser_id": text_or_null,
                        "campaign_id": text_or_null,
                        **change,
                    }
                ),
            },
            "advertisers": {
                "type": "array",
                "items": strict({"advertiser_id": text_or_null, **change}),
            },
            "flipped_total": count,
            "flipped": {
                "type": "array",
                "items": strict(
                    {
                        "event_id": {"type": "string"},
                        "ad_id": {"type": "string"},
                        "advertiser_id": text_or_null,
                        "ts": {"type": "string", "format": "date-time"},
                        "ip": text_or_null,
                        "user_agent": text_or_null,
                        "spend_micros": count,
                        "now_reason": text_or_null,
                        "candidate_reason": text_or_null,
                    }
                ),
            },
        }
    )
    # JSON tells a number from a string: epoch s/ms as a number, or a string that
    # parses as a time (ISO-8601, or epoch s/ms); one that does not is a 400 naming it.
    moment = {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": LATEST_MS},
            {"type": "string", "description": "ISO-8601 (2025-01-15T10:00:00Z) or epoch s/ms"},
        ]
    }
    request = {
        "type": "object",
        "properties": {
            "rules": {
                "type": "string",
                "description": (
                    "the candidate rules file's text (TOML, as rules_file); files it names "
                    "must be next to the server's rules_file"
                ),
            },
            "since": {**moment, "description": "from this time's hour on"},
            "until": {
                "anyOf": [*moment["anyOf"], {"type": "null"}],
                "description": "exclusive end (default: now, floored to the hour)",
            },
            "limit": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT,
                "description": "flipped clicks listed (flipped_total counts them all)",
            },
        },
        "required": ["rules", "since"],
        "additionalProperties": False,
    }
    span_days = settings.replay_max_span_ms / 86_400_000
    return {
        "summary": "What candidate invalid-traffic rules would change, without changing it",
        "description": (
            "Over the archive's whole hours from since to until, per ad and advertiser the "
            "billable clicks and spend now (as reconciled) and under the candidate, and the "
            "clicks whose verdict flips. 400 for rules that do not load (detail begins "
            f"`{RULES_PROBLEM}`), since not before until, or a period longer than "
            f"{span_days:g} days (replay_max_span)."
        ),
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {"200": _json(report, "the report"), **_errors(400, 413)},
    }


def build(settings: Settings, now_ms: int) -> dict[str, Any]:
    """The document as of ``now_ms`` for a server with these settings."""
    components: dict[str, Any] = _event_schemas(now_ms, settings.max_future_ms)
    components["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
        "required": ["error", "detail"],
    }
    accepted = {
        "type": "object",
        "properties": {
            "accepted": {"type": "integer"},
            "event_id": {"type": "string"},
            "partition": {"type": "integer"},
        },
        "required": ["accepted", "event_id", "partition"],
    }
    batch_result = {
        "type": "object",
        "properties": {
            "accepted": {"type": "integer"},
            "rejected": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"index": {"type": "integer"}, "error": {"type": "string"}},
                    "required": ["index", "error"],
                },
            },
        },
        "required": ["accepted", "rejected"],
    }

    def ingest_one(kind: str) -> dict[str, Any]:
        schema = {"$ref": f"#/components/schemas/{kind.capitalize()}Event"}
        return {
            "summary": f"Ingest one {kind}",
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"202": _json(accepted, "durably stored"), **_errors(400, 413, 503)},
        }

    batch = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/BatchItem"},
        "minItems": 1,
        "maxItems": settings.max_batch_events,
    }
    time_schema = {  # epoch s (below 1e11) or ms, whole or decimal; or a date-time
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": LATEST_MS},
            {"type": "string", "pattern": "^[0-9]{1,14}\\.[0-9]{1,6}$"},
            _date_time(QUERY_YEARS),
        ]
    }
    time_rules = (
        "; start before end, and end - start at most 31 days for minute, 366 for hour, "
        "3,660 for day"
    )
    range_params = [
        _query("start", "start: epoch s/ms or date-time (default: end - 1 day)", time_schema),
        _query("end", "exclusive end: epoch s/ms or date-time (default: now)", time_schema),
        _query(
            "last",
            "instead of start: a span before end, e.g. 7d, 1h" + time_rules,
            {"type": "string", "pattern": DURATION_PATTERN},
        ),
        _query("granularity", "window size (default: hour)", _enum("minute", "hour", "day")),
        _query(
            "group_by",
            "breakdown; invalid_reason: invalid clicks by the rule that flagged them",
            _enum("country", "device", "browser", "invalid_reason"),
        ),
    ]
    ad_id = {"type": "string", **_ID_LENGTH}
    ad_path = {"name": "ad_id", "in": "path", "required": True, "schema": ad_id}

    def owner_path(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": ad_id}

    ad_query = _query("ad_id", "the ad", ad_id, required=True)
    rows = {"type": "array", "items": {"type": "object"}}
    paths: dict[str, Any] = {
        "/events/click": {"post": ingest_one("click")},
        "/events/impression": {"post": ingest_one("impression")},
        "/api/v1/events/click": {"post": ingest_one("click")},
        "/api/v1/events/impression": {"post": ingest_one("impression")},
        "/events/batch": {
            "post": {
                "summary": "Ingest a JSON array or NDJSON (one item per line)",
                "description": (
                    "Items the server refuses are listed by index in `rejected` and the "
                    "others stored (202); 400 only when none is left."
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": batch},
                        "application/x-ndjson": {"schema": batch},
                    },
                },
                "responses": {
                    "202": _json(batch_result, "accepted items durably stored"),
                    **_errors(400, 413, 503),
                },
            }
        },
        "/events/{event_id}": {
            "get": {
                "summary": "Audit: what happened to an event",
                "parameters": [
                    {
                        "name": "event_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", **_ID_LENGTH},
                    }
                ],
                "responses": {"200": _json({"type": "object"}, "its fate"), **_errors(400, 404)},
            }
        },
        "/aggregates": {
            "get": {
                "summary": "Aggregates per window",
                "description": "Range rules" + time_rules,
                "parameters": [ad_query, *range_params],
                "responses": {"200": _json(rows, "rows"), **_errors(400, 503)},
            }
        },
        "/aggregates/realtime": {
            "get": {
                "summary": "Sliding window ending now (minute-granular)",
                "parameters": [
                    ad_query,
                    _query("window", "sliding window (default: 5m)", _enum("1m", "5m", "1h")),
                ],
                "responses": {"200": _json({"type": "object"}, "totals"), **_errors(400, 503)},
            }
        },
        "/api/v1/ads/{ad_id}/metrics": {
            "get": {
                "summary": "Aggregates per window (seed 001 shape)",
                "description": "Range rules" + time_rules,
                "parameters": [ad_path, *range_params],
                "responses": {"200": _json({"type": "object"}, "metrics"), **_errors(400, 503)},
            }
        },
        "/api/v1/ads/{ad_id}/metrics/realtime": {
            "get": {
                "summary": "Last minute, 5 minutes and hour",
                "parameters": [ad_path],
                "responses": {"200": _json({"type": "object"}, "totals"), **_errors(400, 503)},
            }
        },
        "/ads/top": {
            "get": {
                "summary": "The ads with the most clicks (or impressions, spend) over a range",
                "description": (
                    "final: the whole range is reconciled and ranked from billing rows; "
                    "start before end, at most 366 days apart"
                ),
                "parameters": [
                    *range_params[:3],
                    _query(
                        "by",
                        "rank by (default: clicks)",
                        _enum("clicks", "impressions", "spend_micros", "invalid_clicks"),
                    ),
                    _query(
                        "limit",
                        "how many ads (default: 10)",
                        {"type": "string", "pattern": "^0{0,14}([1-9][0-9]{0,2}|1000)$"},
                    ),
                    _query("advertiser_id", "only this advertiser's ads", ad_id),
                ],
                "responses": {"200": _json({"type": "object"}, "ranking"), **_errors(400, 503)},
            }
        },
        "/advertisers/{advertiser_id}/metrics": {
            "get": {
                "summary": "Every ad of one advertiser, per window (final where reconciled)",
                "description": "Range rules" + time_rules,
                "parameters": [owner_path("advertiser_id"), *range_params[:4]],
                "responses": {"200": _json({"type": "object"}, "metrics"), **_errors(400, 503)},
            }
        },
        "/campaigns/{campaign_id}/metrics": {
            "get": {
                "summary": "Every ad of one campaign, per window (final where reconciled)",
                "description": "Range rules" + time_rules,
                "parameters": [owner_path("campaign_id"), *range_params[:4]],
                "responses": {"200": _json({"type": "object"}, "metrics"), **_errors(400, 503)},
            }
        },
        "/reconciliation": {
            "get": {
                "summary": "Stream vs batch per (ad, reconciled hour), and why they differ",
                "description": "start before end, at most 366 days apart",
                "parameters": [
                    _query(
                        "start",
                        "start: epoch s/ms or date-time (default: end - 30 days)",
                        time_schema,
                    ),
                    _query("end", "exclusive end (default: now)", time_schema),
                    _query("ad_id", "only this ad", ad_id),
                ],
                "responses": {"200": _json(rows, "rows"), **_errors(400, 503)},
            }
        },
        "/billing/adjustments": {
            "get": {
                "summary": "Changes restatements made to closed hours, per ad",
                "description": "start before end, at most 366 days apart",
                "parameters": [
                    _query(
                        "start",
                        "start: epoch s/ms or date-time (default: end - 30 days)",
                        time_schema,
                    ),
                    _query("end", "exclusive end (default: now)", time_schema),
                    _query("advertiser_id", "only this advertiser", ad_id),
                ],
                "responses": {"200": _json(rows, "adjustments"), **_errors(400, 503)},
            }
        },
        "/billing/advertisers/{advertiser_id}/statement": {
            "get": {
                "summary": "An advertiser's monthly statement, per ad and local day",
                "parameters": [
                    {
                        "name": "advertiser_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", **_ID_LENGTH},
                    },
                    _query(
                        "month",
                        "YYYY-MM, in the advertiser's time zone",
                        {"type": "string", "pattern": MONTH_PATTERN},
                        required=True,
                    ),
                ],
                "responses": {"200": _json({"type": "object"}, "statement"), **_errors(400, 503)},
            }
        },
        "/rules/replay": {"post": _replay_operation(settings)},
        "/healthz": {
            "get": {
                "summary": "200 when ready",
                "responses": {
                    "200": _json({"type": "object"}, "ready"),
                    "503": _json({"type": "object"}, "not ready"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clickagg",
            "version": "0.1.0",
            "description": "Exactly-once ad-click aggregation",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
