"""``GET /events/{id}``: what happened to an event (partition, offset, status, reason).

Answered from the archive, which this process reads directly (no round trip to the worker
process). Decisions are published there within ``archive_flush_interval`` of being
counted, so right after ingest an id may still be unknown: the 404 says so.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clickagg.api.errors import ApiError
from clickagg.api.state import state_of
from clickagg.api.timefmt import iso
from clickagg.archive.base import Fate
from clickagg.core import fates, ids


async def event_fate(request: Request) -> Response:
    state = state_of(request)
    event_id = str(request.path_params["event_id"])
    if len(event_id) > 256:
        raise ApiError(400, "invalid request", "event id is longer than 256 characters")
    found: list[Fate] = await asyncio.to_thread(state.archive.fates, event_id)
    if found:
        first = found[0]
        return JSONResponse(
            {
                "event_id": event_id,
                "status": first.status,
                "partition": first.partition,
                "offset": first.offset,
                "reason": first.reason,
                "event_type": first.event_type,
                "ad_id": first.ad_id,
                "timestamp": iso(first.ts_ms),
                "copies": [
                    {
                        "event_type": f.event_type,
                        "partition": f.partition,
                        "offset": f.offset,
                        "status": f.status,
                        "reason": f.reason,
                    }
                    for f in found
                ],
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
