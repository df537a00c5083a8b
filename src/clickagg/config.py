"""Settings shared by the API process and the worker process.

The field defaults here are the only defaults: ``clickagg.settings_loader`` fills the
fields from CLI flags, ``CLICKAGG_*`` environment variables and a TOML file. Durations are
carried as integer milliseconds (settings say "5m", "30s", "1h").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MINUTE_MS = 60_000

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": MINUTE_MS, "h": 60 * MINUTE_MS, "d": 24 * 60 * MINUTE_MS}


def parse_duration_ms(text: str) -> int:
    """Parse "5m", "30s", "1h", "250ms" or a bare number of seconds into milliseconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)")
    return int(match.group(1)) * _UNIT_MS[match.group(2) or "s"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    data_dir: Path = Path("clickagg-data")
    host: str = "127.0.0.1"  # where the API listens
    port: int = 8000
    partitions: int = 8
    allowed_lateness_ms: int = 5 * MINUTE_MS
    # The stream remembers ids this long (by event time). It must cover the lateness, so
    # that a copy arriving after its id is forgotten is always late and never recounted.
    dedup_horizon_ms: int = 30 * MINUTE_MS
    max_future_ms: int = 5 * MINUTE_MS
    max_body_bytes: int = 16 * 1024 * 1024
    max_batch_events: int = 100_000
    # Backpressure: appends waiting for the next group commit beyond this are refused (503).
    max_pending_events: int = 500_000
    segment_bytes: int = 64 * 1024 * 1024
    retention_ms: int = 7 * 24 * 60 * MINUTE_MS
    retention_bytes: int = 50 * 1024**3
    micro_batch_events: int = 50_000  # per partition; a round commits all partitions at once
    snapshot_interval_ms: int = 10_000
    # The archive publishes decisions in flushes: at this many buffered events, or when the
    # oldest buffered one has waited this long. The audit trail lags the counts by as much.
    archive_flush_events: int = 200_000
    archive_flush_interval_ms: int = 1_000
    # The worker merges an event hour's small archive files into one once the hour is this
    # long past its end and has this many of them (0: never); the files a merge replaces
    # are deleted this long after it (readers that listed them can still read them).
    archive_compact_files: int = 8
    archive_compact_after_ms: int = 10 * MINUTE_MS
    archive_compact_grace_ms: int = 60 * MINUTE_MS
    # The worker process compacts the store's appended deltas in the background this often,
    # or sooner once this many delta rows wait. A compaction rewrites every base row its
    # deltas touch, busy rows in every compaction, so fewer, larger compactions cost less
    # per event (at 2 s / 200,000 rows, compaction was ~30 % of the worker; BENCHMARKS.md,
    # "Compacting less often"); queries stay exact either way (they read the deltas too).
    compact_interval_ms: int = 10_000
    compact_delta_rows: int = 1_000_000
    # The server closes each event hour by itself (``clickagg reconcile``'s code path) once
    # it is this long past the hour's end plus the allowed lateness, looking back at most
    # ``close_lookback`` for hours not closed yet, every ``close_interval`` (0: never).
    close_delay_ms: int = 10 * MINUTE_MS
    close_lookback_ms: int = 2 * 24 * 60 * MINUTE_MS
    close_interval_ms: int = MINUTE_MS
    # The API process restarts a worker (or closer) process that died after this, doubling
    # the wait after each further death up to ``worker_restart_max_backoff`` (back to the
    # first once a process has stayed up for 30 s): short, because every second without a
    # worker is a second of staleness; long enough that a crash loop does not burn the CPU
    # the API needs before the supervisor gives up on it (clickagg.runtime.supervisor).
    worker_restart_backoff_ms: int = 500
    worker_restart_max_backoff_ms: int = 5_000
    # Ingest refuses events (503) once free space on the data dir's filesystem is below
    # the smaller of these, so that the worker, which is not held to it, can always count
    # and archive what the log holds, compact and checkpoint. What it may write at once,
    # at the benchmark's scale (10,000 ads, 1M users): a compaction rewrites every base
    # row its up to 1,000,000 delta rows touch (sums and an HLL sketch of up to 4 KiB; at
    # most the keys of the minutes still within lateness, however many deltas), and
    # DuckDB's checkpoint writes the blocks it changed before freeing the old ones: up to
    # a couple of hundred MB; an archive flush of up to 4 x 200,000 decisions, ~45 MB of
    # Parquet (~55 bytes a decision) and ~20 MB of index run; a snapshot of a partition's
    # remembered ids (16 bytes each, tens of MB) before the old one is deleted; and the
    # round in flight. 512 MiB covers them together. Traffic, not disk size, sets that
    # need, and a small disk carries little: at most 10 % of the filesystem is reserved.
    # 0 turns the reserve off (a full disk is still a 503: the log fails to append).
    disk_reserve_bytes: int = 512 * 1024 * 1024
    disk_reserve_percent: int = 10
    log_level: str = "warning"
    # HTTP connections. A request's head (request line and headers) must arrive in full this
    # soon after the connection opens or after the first byte of a kept-alive connection's
    # next request, or the connection is closed: trickling clients cannot hold sockets.
    header_timeout_ms: int = 10_000
    # A request's body must arrive in full this soon after its headers, or it is answered
    # 408 and its connection closed (closed only, if an answer was already on its way):
    # a client trickling, or withholding, a body it declared cannot hold a socket and a
    # request task. 16 MiB (the largest body) takes ~13 s at 10 Mbit/s.
    body_timeout_ms: int = 30_000
    # The API process keeps every ad's hour rows of this many hours (the current one
    # included) in memory, fed by the worker, and answers hour and day rows of that span
    # itself; 0: none (those queries go to the worker). Memory: ~2 KiB per busy closed
    # (ad, hour), sealed as one compact sketch (the current and previous hours up to a
    # few 4 KiB ones), e.g. ~0.6 GiB for 10,000 ads that each see hundreds of users an hour.
    replica_hours_ms: int = 26 * 60 * MINUTE_MS
    # An idle kept-alive connection is closed after this; ad servers reuse theirs.
    keep_alive_timeout_ms: int = 60_000
    # Beyond this many open connections a request is answered 503 (JSON, Retry-After) and
    # its connection closed.
    max_connections: int = 4096
    # The ad registry: a CSV with at least ad_id and cpc_micros (the price of a click when
    # the event carries no cost_micros). Without it such clicks are counted with spend 0.
    ads_file: Path | None = None
    # Advertisers: a CSV ``advertiser_id,name,currency,time_zone``. Statements are made per
    # day in the advertiser's time zone (UTC for an advertiser not listed).
    advertisers_file: Path | None = None
    # Invalid-traffic rules (TOML, clickagg.core.rules.loading); None: the built-in rules.
    # The worker re-reads it when it or a file it names changes, and records each change.
    rules_file: Path | None = None
    # ``POST /rules/replay`` replays candidate rules over at most this much of the archive
    # per request (a thread of the API process reads it); the command line has no limit.
    replay_max_span_ms: int = 31 * 24 * 60 * MINUTE_MS
    # The admin endpoints (/admin/*: the ad registry, advertisers, the IP blocklist) answer
    # only requests that carry one of these as ``Authorization: Bearer <token>``: a comma-
    # separated list of ``name:token`` (or a bare token, named "admin"); the name is
    # recorded as who made each change. Empty: the admin endpoints are off (403).
    admin_token: str = ""
    # Which adapter plays each role (clickagg.runtime.roles lists them).
    log_backend: str = "segments"
    store_backend: str = "duckdb"
    archive_backend: str = "parquet"
    counters_backend: str = "memory"
    # The stream's keyed second stage (clickagg.keyed): stage 1 appends every fresh click to
    # an internal log of ``keyed_partitions`` partitions by IP, and stage 2 applies the keyed
    # rules (per-IP click velocity) to it and corrects the counts. Off: keyed rules are left
    # to the batch layer, as before.
    keyed_stage: bool = False
    keyed_partitions: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 1024:
            raise ValueError("partitions must be between 1 and 1024")
        if not 1 <= self.keyed_partitions <= 1024:
            raise ValueError("keyed partitions must be between 1 and 1024")
        if self.allowed_lateness_ms < 0:
            raise ValueError("allowed lateness must not be negative")
        if not 0 <= self.disk_reserve_percent <= 100:
            raise ValueError("disk reserve percent must be between 0 and 100")
        if self.dedup_horizon_ms < self.allowed_lateness_ms + MINUTE_MS:
            raise ValueError(
                "dedup horizon must be at least allowed lateness + 1 minute, "
                "or a late copy of a counted event could be counted again"
            )
        if min(self.header_timeout_ms, self.body_timeout_ms, self.keep_alive_timeout_ms) <= 0:
            raise ValueError("header, body and keep-alive timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("max connections must be at least 1")
        if self.replica_hours_ms < 0 or self.replica_hours_ms % (60 * MINUTE_MS):
            raise ValueError("replica hours must be whole hours (0: none)")
        if not 0 < self.worker_restart_backoff_ms <= self.worker_restart_max_backoff_ms:
            raise ValueError("worker restart backoff must be positive and at most its max backoff")

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def store_path(self) -> Path:
        return self.data_dir / "aggregates.duckdb"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def batch_dir(self) -> Path:
        return self.data_dir / "batch"

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def rules_changes_path(self) -> Path:
        """Every change of the invalid-traffic rules the worker applied (JSON lines)."""
        return self.data_dir / "rules" / "changes.jsonl"

    @property
    def blocklist_path(self) -> Path:
        """The managed IP blocklist: every add and remove, who and why (JSON lines)."""
        return self.data_dir / "rules" / "blocklist.jsonl"

    @property
    def keyed_dir(self) -> Path:
        """The keyed stage's internal log (segments, partitioned by IP) and its marker."""
        return self.data_dir / "keyed"

    @property
    def corrections_dir(self) -> Path:
        """The keyed stage's corrections archive (Parquet, like the decisions')."""
        return self.keyed_dir / "corrections"

    @property
    def rpc_socket(self) -> Path:
        return self.data_dir / "worker.sock"

    @property
    def feed_socket(self) -> Path:
        """Where the worker publishes its real-time counters' rounds (API replicas)."""
        return self.data_dir / "feed.sock"
