"""``GET /events/{id}``: what happened to an event (partition, offset, status, reason).

A click the keyed stage corrected after the stream counted it has that correction as its
final fate (``invalid``, with the rule and its evidence); ``history`` keeps the stream's
first decision before it.

Answered from the archive, which this process reads directly (no round trip to the worker
process). Decisions are published there within ``archive_flush_interval`` of being
counted, so right after ingest an id may still be unknown: the 404 says so.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clickagg.api.errors import ApiError
from clickagg.api.state import state_of
from clickagg.api.timefmt import iso
from clickagg.archive.base import Correction, Fate
from clickagg.core import fates, ids


def _corrected_reason(c: Correction) -> str:
    """As a stage-1 rule writes its reasons: ``"<rule id>: <reason>: <evidence>"``."""
    return f"{c.rule_id}: {c.reason}: {c.evidence}"


def _history(first: Fate, corrections: list[Correction]) -> list[dict[str, Any]]:
    """The decisions about one copy, oldest first: the stream's, then the keyed stage's
    (its correction, then any move of the reason to another rule)."""
    history: list[dict[str, Any]] = [
        {
            "stage": "stream",
            "status": first.status,
            "reason": first.reason,
            "partition": first.partition,
            "offset": first.offset,
        }
    ]
    for correction in corrections:
        history.append(
            {
                "stage": "keyed",
                "status": fates.INVALID,
                "reason": _corrected_reason(correction),
                "rule_id": correction.rule_id,
                "evidence": correction.evidence,
                "keyed_partition": correction.keyed_partition,
                "keyed_offset": correction.keyed_offset,
                "corrected_at": iso(correction.corrected_at_ms),
                "previous_rule_id": correction.previous_rule_id,
            }
        )
    return history


async def event_fate(request: Request) -> Response:
    state = state_of(request)
    event_id = str(request.path_params["event_id"])
    if len(event_id) > 256:
        raise ApiError(400, "invalid request", "event id is longer than 256 characters")
    found: list[Fate] = await asyncio.to_thread(state.archive.fates, event_id)
    if found:
        corrections: dict[tuple[int, int], list[Correction]] = {}
        if state.corrections is not None:
            for c in await asyncio.to_thread(state.corrections.corrections, event_id):
                corrections.setdefault((c.source_partition, c.source_offset), []).append(c)

        def corrections_of(f: Fate) -> list[Correction]:
            if f.event_type != ids.EVENT_TYPES[ids.CLICK]:
                return []
            return corrections.get((f.partition, f.offset), [])

        def final(f: Fate) -> tuple[str, str | None]:
            latest = corrections_of(f)[-1:]  # in the order made: the last stands
            if not latest:
                return f.status, f.reason
            return fates.INVALID, _corrected_reason(latest[0])

        first = found[0]
        status, reason = final(first)
        return JSONResponse(
            {
                "event_id": event_id,
                "status": status,
                "partition": first.partition,
                "offset": first.offset,
                "reason": reason,
                "event_type": first.event_type,
                "ad_id": first.ad_id,
                "timestamp": iso(first.ts_ms),
                "copies": [
                    {
                        "event_type": f.event_type,
                        "partition": f.partition,
                        "offset": f.offset,
                        "status": final(f)[0],
                        "reason": final(f)[1],
                    }
                    for f in found
                ],
                "history": _history(first, corrections_of(first)),
            }
        )
    if event_id in state.recent_rejections:
        return JSONResponse(
            {
                "event_id": event_id,
                "status": fates.REJECTED,
                "partition": None,
                "offset": None,
                "reason": state.recent_rejections[event_id],
            }
        )
    partitions = state.settings.partitions
    candidates = {
        name: ids.partition_for_id(code, event_id, partitions)
        for code, name in enumerate(ids.EVENT_TYPES)
    }
    raise ApiError(
        404,
        "unknown event",
        "no decision recorded for this id: not received, or received and not archived yet "
        "(decisions are published about a second after they are counted) "
        "(it would be in partition "
        + " or ".join(f"{p} as a {name}" for name, p in candidates.items())
        + ")",
    )
