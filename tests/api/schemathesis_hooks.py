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
- ``cidr_rejections_only``: the blocklist's CIDRs match the document's pattern, whose
  ``$`` also matches before a final line break (the server refuses such a string), and
  a CIDR may be well formed but not listed. A request valid by the schema may be refused
  with 400 for a CIDR, or 404 for removing one not listed, and for nothing else.
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


CIDR_OPERATIONS = {"POST /admin/blocklist", "DELETE /admin/blocklist/{cidr}"}


@schemathesis.check
def cidr_rejections_only(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if case.operation.label not in CIDR_OPERATIONS or not _is_positive(case):
        return None
    if response.status_code == 400 and "not an IP address or CIDR" in response.json()["detail"]:
        return None
    if response.status_code == 404 and "not on the blocklist" in response.json()["detail"]:
        return None
    if 400 <= response.status_code < 500:
        raise AssertionError(f"a request valid but for its CIDRs was refused: {response.text}")
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
