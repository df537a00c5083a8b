"""The real server for end-to-end tests (see clickagg.launcher), plus what tests read."""

from __future__ import annotations

import httpx

from clickagg.launcher import ServeProcess, free_port

__all__ = ["ServeProcess", "free_port", "http", "lag"]

# The tests' HTTP client. ``httpx.get``/``httpx.post`` build a client, and with it an SSL
# context, for every call: ~50 ms of CPU on these machines, several times the request to a
# loopback server, and thousands of calls in the kill -9 runs. No keep-alive: every request
# still opens a connection of its own, as before, so a server killed and restarted on the
# same port never meets a pooled connection of its previous life. Thread-safe (the kill -9
# runs post from several threads).
http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def lag(server: ServeProcess) -> int:
    """Durable events not yet committed by the stream workers, plus committed events whose
    decisions are not archived yet, over all partitions."""
    response = http.get(server.url + "/metrics", timeout=10)
    response.raise_for_status()  # no worker up (503): unknown, not zero
    text = response.text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(
            ("clickagg_partition_lag_events{", "clickagg_partition_archive_lag_events{")
        )
    )
