"""The ad registry as of a point in time: each ad's owner, status and price.

A registry change names an ad and any of its fields (price, advertiser, campaign,
status) and applies from its ``effective_from_ms`` on; a field a change leaves out keeps
its value. The registry as of time T is, per ad, every field's value from the last change
effective at or before T (of changes with the same effective time, the one recorded
last). Pricing reads the price history alone (:mod:`clickagg.core.prices`); this module
answers "what did the registry say about this ad at T" for listings and statements.

Status (``active``, ``paused``, ``archived``) is metadata: it is reported, and it never
changes how a click is counted or priced. A click on a paused ad still happened (ad
servers keep serving cached creatives for a while after a pause), and whether the
advertiser pays for it is their contract's call, made downstream from the counts; if the
count dropped such clicks, it would depend on when someone pressed "pause" and could no
longer be reconciled against the ad server's own logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

STATUSES = ("active", "paused", "archived")
FIELDS = ("cpc_micros", "advertiser_id", "campaign_id", "status")
MAX_ID_CHARS = 256
MAX_CPC_MICROS = 2**63 - 1  # prices are Int64 columns


class AdChangeError(ValueError):
    """A registry change that cannot be recorded; the message names the field."""


@dataclass(frozen=True)
class AdEntry:
    """An ad as the registry describes it at some time; ``since_ms`` is when the last
    change that touched it took effect (0: from the beginning)."""

    ad_id: str
    cpc_micros: int | None = None
    advertiser_id: str | None = None
    campaign_id: str | None = None
    status: str = "active"
    since_ms: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "ad_id": self.ad_id,
            "cpc_micros": self.cpc_micros,
            "advertiser_id": self.advertiser_id,
            "campaign_id": self.campaign_id,
            "status": self.status,
            "since_ms": self.since_ms,
        }


@dataclass(frozen=True)
class AdChange:
    """One recorded change: the fields it sets (None: left as they were)."""

    ad_id: str
    effective_from_ms: int
    cpc_micros: int | None = None
    advertiser_id: str | None = None
    campaign_id: str | None = None
    status: str | None = None

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}


def check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        raise AdChangeError(f"{name} must be a string of 1 to {MAX_ID_CHARS} characters")
    return value


def change_of(ad_id: str, effective_from_ms: int, fields: Mapping[str, Any]) -> AdChange:
    """A change from untrusted fields (a request body, a CSV row), each one checked."""
    check_id("ad_id", ad_id)
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise AdChangeError(f"unknown field(s) {sorted(unknown)} (known: {list(FIELDS)})")
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        raise AdChangeError(f"{ad_id}: nothing to change (give any of {', '.join(FIELDS)})")
    cpc = given.get("cpc_micros")
    if cpc is not None and (
        isinstance(cpc, bool) or not isinstance(cpc, int) or not 0 <= cpc <= MAX_CPC_MICROS
    ):
        raise AdChangeError(f"cpc_micros must be an integer from 0 to {MAX_CPC_MICROS}")
    for name in ("advertiser_id", "campaign_id"):
        if name in given:
            check_id(name, given[name])
    status = given.get("status")
    if status is not None and status not in STATUSES:
        raise AdChangeError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    return AdChange(ad_id, effective_from_ms, **given)


def as_of(
    base: Mapping[str, AdEntry], changes: Iterable[AdChange], at_ms: int
) -> dict[str, AdEntry]:
    """Every ad as the registry described it at ``at_ms``: ``base`` (in force from the
    beginning) overlaid with the changes effective by then, in effective-time order
    (ties: in the order given, which is the order recorded)."""
    entries = dict(base)
    due = [
        (c.effective_from_ms, i, c) for i, c in enumerate(changes) if c.effective_from_ms <= at_ms
    ]
    for since, _, change in sorted(due, key=lambda item: item[:2]):
        entry = entries.get(change.ad_id) or AdEntry(change.ad_id)
        entries[change.ad_id] = replace(entry, **change.fields(), since_ms=since)
    return dict(sorted(entries.items()))
