"""The OpenAPI document, built from the same msgspec types that validate requests."""

from __future__ import annotations

from typing import Any

import msgspec

from clickagg.core.events import IncomingEvent

_ERROR = {"$ref": "#/components/schemas/Error"}


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
    name: str, description: str, *, required: bool = False, enum: list[str] | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if enum:
        schema["enum"] = enum
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def build() -> dict[str, Any]:
    (event_schema,), components = msgspec.json.schema_components(
        [IncomingEvent], ref_template="#/components/schemas/{name}"
    )
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
                },
            },
        },
    }
    ingest_one = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": event_schema}},
        },
        "responses": {"202": _json(accepted, "durably stored"), **_errors(400, 413, 503)},
    }
    range_params = [
        _query("start", "window start, ISO-8601 or epoch s/ms (default: end - 1 day)"),
        _query("end", "exclusive end (default: now)"),
        _query("last", "instead of start: a span before end, e.g. 7d, 1h"),
        _query("granularity", "window size", enum=["minute", "hour", "day"]),
        _query("group_by", "breakdown", enum=["country", "device", "browser"]),
    ]
    ad_path = {"name": "ad_id", "in": "path", "required": True, "schema": {"type": "string"}}
    rows = {"type": "array", "items": {"type": "object"}}
    paths: dict[str, Any] = {
        "/events/click": {"post": {"summary": "Ingest one click", **ingest_one}},
        "/events/impression": {"post": {"summary": "Ingest one impression", **ingest_one}},
        "/api/v1/events/click": {"post": {"summary": "Ingest one click", **ingest_one}},
        "/api/v1/events/impression": {"post": {"summary": "Ingest one impression", **ingest_one}},
        "/events/batch": {
            "post": {
                "summary": "Ingest NDJSON or a JSON array; each item names its event_type",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-ndjson": {"schema": {"type": "string"}},
                        "application/json": {"schema": {"type": "array", "items": event_schema}},
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
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"200": _json({"type": "object"}, "its fate"), **_errors(400, 404)},
            }
        },
        "/aggregates": {
            "get": {
                "summary": "Aggregates per window",
                "parameters": [_query("ad_id", "the ad", required=True), *range_params],
                "responses": {"200": _json(rows, "rows"), **_errors(400, 503)},
            }
        },
        "/aggregates/realtime": {
            "get": {
                "summary": "Sliding window ending now (minute-granular)",
                "parameters": [
                    _query("ad_id", "the ad", required=True),
                    _query("window", "sliding window", enum=["1m", "5m", "1h"]),
                ],
                "responses": {"200": _json({"type": "object"}, "totals"), **_errors(400, 503)},
            }
        },
        "/api/v1/ads/{ad_id}/metrics": {
            "get": {
                "summary": "Aggregates per window (seed 001 shape)",
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
