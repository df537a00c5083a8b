"""Schemathesis extensions for ``test_openapi.py`` (loaded through ``SCHEMATHESIS_HOOKS``),
each for a rule of the server that JSON Schema cannot state; ``schemathesis.toml`` says
which built-in check each one stands in for.

- Serializers. JSON Schema's ``integer`` is a value (``260.0`` is one); the server, decoding
  strictly, wants an integer written as one (``260``), as the document's description says.
  Both JSON serializers write integral floats as integers: the values the schema means, in
  the spelling the server takes. ``application/x-ndjson`` is given the schema of the array
  it carries, one item per line, and is written so.
- ``relational_rejections_only``: the query ranges' rules between parameters (start before
  end, the span a granularity allows) are in the descriptions. A query valid parameter by
  parameter may be refused with 400 for them, and for nothing else.
- ``replay_rejections_only``: a replay request valid field by field may be refused with
  400 for rules that do not load, a string that is not a time, or a period out of order
  or longer than ``replay_max_span``, and for nothing else.
- ``candidate_rules``: random text is seldom rules, so every request would be a 400 for
  its rules and the report never checked against the schema: a generated ``rules`` string
  is replaced by the text of real rules (a ``rules`` that is not a string stays, so a
  request that breaks the schema still does).
- ``batch_rejects_invalid_items``: a batch stores its valid items and names the others by
  index (202), by design. A request the schema refuses must therefore be refused whole (4xx,
  413 for too many items) or have its invalid items named in ``rejected``.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import negative_data_rejection

RANGE_OPERATIONS = {
    "GET /aggregates",
    "GET /api/v1/ads/{ad_id}/metrics",
    "GET /reconciliation",
    "GET /billing/adjustments",
    "GET /ads/top",
    "GET /advertisers/{advertiser_id}/metrics",
    "GET /campaigns/{campaign_id}/metrics",
}
RELATIONAL = ("must be before end", "range too long")


def _integers_as_integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integers_as_integers(item) for item in value]
    if isinstance(value, dict):
        return {key: _integers_as_integers(item) for key, item in value.items()}
    return value


def _json(value: Any) -> bytes:
    if isinstance(value, bytes):  # a raw body schemathesis made on purpose
        return value
    return json.dumps(_integers_as_integers(value), default=str).encode()


@schemathesis.serializer("application/json")
def json_body(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    return _json(value)


@schemathesis.serializer("application/x-ndjson")
def ndjson_body(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    if not isinstance(value, list):
        return _json(value)
    return b"".join(_json(item) + b"\n" for item in value)


def _is_positive(case: schemathesis.Case) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.check
def relational_rejections_only(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if case.operation.label not in RANGE_OPERATIONS or not _is_positive(case):
        return None
    if response.status_code == 400 and any(r in response.json()["detail"] for r in RELATIONAL):
        return None
    if 400 <= response.status_code < 500:
        raise AssertionError(f"a query valid parameter by parameter was refused: {response.text}")
    return None


@schemathesis.check
def batch_rejects_invalid_items(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """negative_data_rejection, where naming the invalid items also counts as rejecting."""
    if case.operation.label != "POST /events/batch":
        return None
    if response.status_code == 202 and response.json()["rejected"]:
        return None
    if response.status_code == 413:  # more items than maxItems: refused whole
        return None
    return negative_data_rejection(ctx, response, case)


REPLAY_PROBLEMS = (
    "rules: ",
    "is not a time",
    "is out of range",
    "must be before until",
    "period too long",
)


@schemathesis.check
def replay_rejections_only(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if case.operation.label != "POST /rules/replay" or not _is_positive(case):
        return None
    if response.status_code == 400 and any(p in response.json()["detail"] for p in REPLAY_PROBLEMS):
        return None
    if 400 <= response.status_code < 500:
        raise AssertionError(f"a replay valid field by field was refused: {response.text}")
    return None


CANDIDATES = (
    "",
    "include_builtin = true\n",
    'include_builtin = true\n[[rules]]\nid = "ip-click-velocity"\nkind = "ip_click_velocity"\n'
    'reason = "burst"\n[rules.params]\nmax_clicks_per_minute = 5\n',
)


LATEST_MS = 253_402_300_799_999


def _epoch(value: Any) -> bool:
    return type(value) is int and 0 <= value <= LATEST_MS


@schemathesis.hook("map_body").apply_to(method="POST", path="/rules/replay")
def candidate_rules(ctx: schemathesis.HookContext, body: Any) -> Any:
    """Each field that the schema admits is swapped for one of the same type that the
    server also takes: any string for a rules text or a time, an epoch number for an epoch
    number (an hour after since for until). What breaks the schema is left as it is."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("rules"), str):
        body["rules"] = CANDIDATES[len(body["rules"]) % len(CANDIDATES)]
    since, until = body.get("since"), body.get("until")
    if isinstance(since, str):
        since = body["since"] = SINCE
    if not (_epoch(since) or since == SINCE):
        return body
    if isinstance(until, str):
        body["until"] = UNTIL if since == SINCE else since_iso_plus_hour(since)
    elif until is None or _epoch(until):
        if since == SINCE:
            body["until"] = UNTIL_MS
        else:
            body["until"] = min(since + (3600 if since < 10**11 else 3_600_000), LATEST_MS)
    return body


SINCE, UNTIL, UNTIL_MS = "2025-01-15T10:00:00Z", "2025-01-15T11:00:00Z", 1_736_938_800_000


def since_iso_plus_hour(since: int) -> str:
    from datetime import UTC, datetime

    seconds = since if since < 10**11 else since / 1000
    return datetime.fromtimestamp(min(seconds + 3600, LATEST_MS / 1000), UTC).isoformat()
