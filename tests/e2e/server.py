"""The real server for end-to-end tests (see clickagg.launcher), plus what tests read."""

from __future__ import annotations

import httpx

from clickagg.launcher import ServeProcess, free_port

__all__ = ["ServeProcess", "free_port", "lag"]


def lag(server: ServeProcess) -> int:
    """Durable events not yet committed by the stream workers, plus committed events whose
    decisions are not archived yet, over all partitions."""
    response = httpx.get(server.url + "/metrics", timeout=10)
    response.raise_for_status()  # no worker up (503): unknown, not zero
    text = response.text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(
            ("clickagg_partition_lag_events{", "clickagg_partition_archive_lag_events{")
        )
    )
