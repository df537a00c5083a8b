"""Final hours, versioned: what the batch layer publishes and the serving layer reads.

Layout under ``<data_dir>/batch/``::

    hour=2025-01-15T10/v000001/{minute,country,device,browser}.parquet + version.json
    hour=2025-01-15T10/CURRENT          # "v000001": the version queries serve

A version is written whole into its own directory and fsynced, then ``CURRENT`` is
replaced by an atomic rename: a reader sees the old rows or the new ones, never a mix,
and a crash mid-run leaves at most an unreferenced directory (removed by the next run).
Versions are never changed or deleted, so every restatement is kept with when and why it
was made. A run whose rows equal the current version's publishes nothing: reconciling
twice gives identical rows and one version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from clickagg.batch.statement import AdsAsOf, build_statement, statement_json
from clickagg.core import aggregate, hll
from clickagg.core.windows import DAY_MS, HOUR_MS, MINUTE_MS
from clickagg.query.base import (
    Adjustment,
    AdTotals,
    AggregateRow,
    Dimension,
    Granularity,
    RankBy,
    ReconciliationRow,
    RollupLevel,
)
from clickagg.registry import Advertiser

CURRENT = "CURRENT"
INPUTS = "INPUTS"  # the archive files of the hour its latest run read
EPOCH = "EPOCH"
_TABLES = ("minute", *aggregate.DIMENSIONS)


def hour_name(hour_ms: int) -> str:
    return "hour=" + dt.datetime.fromtimestamp(hour_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H")


def _hour_of(name: str) -> int:
    when = dt.datetime.strptime(name.removeprefix("hour=") + "+0000", "%Y-%m-%dT%H%z")
    return int(when.timestamp() * 1000)


@dataclass(frozen=True)
class Version:
    hour_ms: int
    version: int
    created_ms: int
    reason: str
    digest: str
    summary: Mapping[str, int]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(tables: Mapping[str, pa.Table]) -> str:
    """Content hash of the rows, independent of how Parquet encodes them."""
    h = hashlib.sha256()
    for name in _TABLES:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, tables[name].schema) as writer:
            writer.write_table(tables[name].combine_chunks())
        h.update(name.encode())
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


class FinalHours:
    """Publishes and reads versions of final hours (one writer at a time per data dir is
    the caller's business: ``clickagg reconcile`` and the server's scheduler use one lock)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def current(self, hour_ms: int) -> Version | None:
        hdir = self.directory / hour_name(hour_ms)
        try:
            name = (hdir / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return self._version(hdir / name)

    def versions(self, hour_ms: int) -> list[Version]:
        hdir = self.directory / hour_name(hour_ms)
        if not hdir.is_dir():
            return []
        found = []
        for vdir in sorted(hdir.glob("v*")):
            if (vdir / "version.json").exists():
                found.append(self._version(vdir))
        return found

    def final_hours(self, start_ms: int, end_ms: int) -> list[int]:
        """Hours in [start_ms, end_ms) that have a current version, ascending."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        hours = []
        for name in names:
            if name.startswith("hour="):
                hour = _hour_of(name)
                if hour + HOUR_MS > start_ms and hour < end_ms and self.current(hour):
                    hours.append(hour)
        return sorted(hours)

    def read(self, hour_ms: int, table: str = "minute") -> pa.Table | None:
        """The current version's rows of ``table`` (minute or a dimension), or None."""
        version = self.current(hour_ms)
        if version is None:
            return None
        path = self.directory / hour_name(hour_ms) / f"v{version.version:06d}" / f"{table}.parquet"
        return pq.read_table(path)

    def publish(
        self,
        hour_ms: int,
        tables: Mapping[str, pa.Table],
        *,
        reason: str,
        summary: Mapping[str, int],
    ) -> Version | None:
        """Publish a new version of the hour unless its rows equal the current ones;
        returns the new version, or None when nothing changed."""
        digest = _digest(tables)
        current = self.current(hour_ms)
        hdir = self.directory / hour_name(hour_ms)
        hdir.mkdir(parents=True, exist_ok=True)
        self._remove_unpublished(hdir, current)
        if current is not None and current.digest == digest:
            return None
        number = 1 + max((v.version for v in self.versions(hour_ms)), default=0)
        vdir = hdir / f"v{number:06d}"
        vdir.mkdir()
        for name in _TABLES:
            pq.write_table(tables[name], vdir / f"{name}.parquet", compression="zstd")
        version = Version(hour_ms, number, int(time.time() * 1000), reason, digest, dict(summary))
        body = {
            "hour_ms": hour_ms,
            "version": number,
            "created_ms": version.created_ms,
            "reason": reason,
            "digest": digest,
            "summary": dict(summary),
        }
        (vdir / "version.json").write_text(json.dumps(body, indent=1))
        for path in vdir.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(vdir)
        tmp = hdir / f".{CURRENT}.tmp"
        tmp.write_text(vdir.name)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, hdir / CURRENT)
        _fsync_dir(hdir)
        self._bump_epoch()
        return version

    def _bump_epoch(self) -> None:
        """Replace ``EPOCH`` (a new inode each time): readers stat it once per query and
        rescan the hours only when it changed."""
        tmp = self.directory / f".{EPOCH}.tmp"
        tmp.write_text(str(time.time_ns()))
        os.replace(tmp, self.directory / EPOCH)

    def epoch(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.directory / EPOCH)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns)

    def current_versions(self) -> dict[int, Version]:
        """Every hour with a current version (a scan of the directory)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}
        out = {}
        for name in names:
            if name.startswith("hour="):
                hour = _hour_of(name)
                version = self.current(hour)
                if version is not None:
                    out[hour] = version
        return out

    def write_report(self, hour_ms: int, report: pa.Table) -> None:
        """The latest run's stream-vs-batch report of the hour (replaced atomically every
        run: the stream's side can change while the final rows do not)."""
        hdir = self.directory / hour_name(hour_ms)
        hdir.mkdir(parents=True, exist_ok=True)
        tmp = hdir / ".report.parquet.tmp"
        pq.write_table(report, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, hdir / "report.parquet")
        _fsync_dir(hdir)

    def record_inputs(self, hour_ms: int, flushes: Sequence[int]) -> None:
        """The archive flushes whose decisions of the hour the latest run read
        (``ParquetArchiveReader.flushes_of``): the closer restates a closed hour when its
        archive holds flushes this list lacks (very late events). Flushes, not file names:
        a compaction merges an hour's files into a new one without adding a decision."""
        hdir = self.directory / hour_name(hour_ms)
        hdir.mkdir(parents=True, exist_ok=True)
        tmp = hdir / f".{INPUTS}.tmp"
        tmp.write_text(json.dumps(sorted(int(seq) for seq in flushes)))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, hdir / INPUTS)
        _fsync_dir(hdir)

    def inputs(self, hour_ms: int) -> list[int] | None:
        """What :meth:`record_inputs` recorded last; None before any run of this hour
        recorded them. An older clickagg recorded file names, ``<flush seq>.parquet``
        (each file was one flush's then): they are read as those flushes."""
        try:
            names = json.loads((self.directory / hour_name(hour_ms) / INPUTS).read_text())
        except FileNotFoundError:
            return None
        return sorted(n if isinstance(n, int) else int(str(n).split(".")[0]) for n in names)

    def read_report(self, hour_ms: int) -> pa.Table | None:
        try:
            return pq.read_table(self.directory / hour_name(hour_ms) / "report.parquet")
        except FileNotFoundError:
            return None

    def read_version(self, hour_ms: int, version: int, table: str = "minute") -> pa.Table:
        return pq.read_table(
            self.directory / hour_name(hour_ms) / f"v{version:06d}" / f"{table}.parquet"
        )

    def _remove_unpublished(self, hdir: Path, current: Version | None) -> None:
        """Directories a crashed run left: newer than CURRENT, or without version.json."""
        for vdir in hdir.glob("v*"):
            number = int(vdir.name[1:])
            complete = (vdir / "version.json").exists()
            if not complete or current is None or number > current.version:
                shutil.rmtree(vdir, ignore_errors=True)

    def _version(self, vdir: Path) -> Version:
        body = json.loads((vdir / "version.json").read_text())
        return Version(
            int(body["hour_ms"]),
            int(body["version"]),
            int(body["created_ms"]),
            str(body["reason"]),
            str(body["digest"]),
            {k: int(v) for k, v in body["summary"].items()},
        )


class FinalRowsReader:
    """:class:`clickagg.query.base.FinalRows` over the published versions: the API
    process reads the Parquet files itself (they never change once published)."""

    def __init__(
        self,
        directory: Path,
        *,
        advertisers: Mapping[str, Advertiser]
        | Callable[[], Mapping[str, Advertiser]]
        | None = None,
        ads: AdsAsOf | None = None,
        cache_entries: int = 512,
    ) -> None:
        """``advertisers``: who statements are for, or a function reading them afresh
        (the advertiser registry, which changes while the server runs); ``ads``: the ad
        registry as of a time, for the status statements report."""
        self.hours = FinalHours(directory)
        self._ads = ads
        self._advertisers = advertisers if callable(advertisers) else dict(advertisers or {})
        self._epoch: tuple[int, int] | None = None
        self._current: dict[int, Version] = {}
        self._cache: dict[tuple[int, int, str], pl.DataFrame] = {}
        self._cache_entries = cache_entries

    def _versions(self) -> dict[int, Version]:
        """The current version of every final hour, rescanned only when a publish changed
        ``EPOCH``: a query costs one stat, however many hours are final."""
        epoch = self.hours.epoch()
        if epoch != self._epoch:
            self._current = self.hours.current_versions()
            self._epoch = epoch
        return self._current

    def final_hours(self, start_ms: int, end_ms: int) -> list[int]:
        return sorted(h for h in self._versions() if h + HOUR_MS > start_ms and h < end_ms)

    def _frame(self, hour_ms: int, table: str) -> pl.DataFrame | None:
        version = self._versions().get(hour_ms)
        if version is None:
            return None
        key = (hour_ms, version.version, table)
        frame = self._cache.get(key)
        if frame is None:
            loaded = pl.from_arrow(self.hours.read_version(hour_ms, version.version, table))
            assert isinstance(loaded, pl.DataFrame)
            if len(self._cache) >= self._cache_entries:
                self._cache.pop(next(iter(self._cache)))
            frame = self._cache[key] = loaded
        return frame

    def statement(self, *, advertiser_id: str, month: str) -> dict[str, Any]:
        known = self._advertisers() if callable(self._advertisers) else self._advertisers
        advertiser = known.get(advertiser_id) or Advertiser(
            advertiser_id, advertiser_id, "USD", "UTC"
        )
        return statement_json(build_statement(self, advertiser, month, ads=self._ads))

    def minute_frame(self, hour_ms: int) -> pl.DataFrame | None:
        """The current final minute rows of one hour (cached by version)."""
        return self._frame(hour_ms, "minute")

    def aggregates(
        self,
        *,
        ad_id: str,
        hours: list[int],
        granularity: Granularity,
        group_by: Dimension | None = None,
    ) -> list[AggregateRow]:
        return self._windows("ad_id", ad_id, hours, granularity, group_by)

    def rollup(
        self, *, level: RollupLevel, id: str, hours: list[int], granularity: Granularity
    ) -> list[AggregateRow]:
        if level not in _OWNER_COLUMNS:
            raise ValueError(f"unknown roll-up level {level!r}")
        return self._windows(_OWNER_COLUMNS[level], id, hours, granularity, None)

    def _windows(
        self,
        key: str,
        value: str,
        hours: list[int],
        granularity: Granularity,
        group_by: Dimension | None,
    ) -> list[AggregateRow]:
        size = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}[granularity]
        table = group_by or "minute"
        if key != "ad_id" and group_by is not None:
            raise ValueError("a roll-up has no breakdown")
        parts = [f for h in hours if (f := self._frame(h, table)) is not None]
        if not parts:
            return []
        rows = pl.concat(parts).filter(pl.col(key) == value)
        keys = [pl.col("minute_ms") - pl.col("minute_ms") % size]
        if group_by is not None:
            keys.append(pl.col(group_by))
        grouped = (
            rows.group_by(keys)
            .agg(*(pl.col(m).sum() for m in _SUMS), pl.col("users"))
            .sort(["minute_ms", *([group_by] if group_by else [])])
        )
        users = hll.estimates(hll.union_many(grouped["users"].to_arrow()))
        return [
            AggregateRow(
                window_ms=int(r["minute_ms"]),
                group=r[group_by] if group_by else None,
                clicks=int(r["clicks"]),
                impressions=int(r["impressions"]),
                spend_micros=int(r["spend_micros"]),
                unique_users=int(u),
                invalid_clicks=int(r["invalid_clicks"]),
                final=True,
            )
            for r, u in zip(grouped.iter_rows(named=True), users.tolist(), strict=True)
        ]

    def top_ads(
        self,
        *,
        start_ms: int,
        end_ms: int,
        by: RankBy = "clicks",
        limit: int = 10,
        advertiser_id: str | None = None,
    ) -> list[AdTotals]:
        if by not in _SUMS:
            raise ValueError(f"cannot rank by {by!r}")
        parts = [
            f
            for h in self.final_hours(start_ms, end_ms)
            if (f := self._frame(h, "minute")) is not None
        ]
        if not parts or limit <= 0:
            return []
        rows = pl.concat(parts).filter(pl.col("minute_ms").is_between(start_ms, end_ms - 1))
        if advertiser_id is not None:
            rows = rows.filter(pl.col("advertiser_id") == advertiser_id)
        ranked = (
            rows.group_by("ad_id")
            .agg(
                # An ad's owners as its newest row says (an ad can move campaigns).
                *(pl.col(o).sort_by("minute_ms").last() for o in aggregate.OWNERS),
                *(pl.col(m).sum() for m in _SUMS),
                pl.col("users"),
            )
            .sort([by, "ad_id"], descending=[True, False])
            .head(limit)
        )
        users = hll.estimates(hll.union_many(ranked["users"].to_arrow()))
        return [
            AdTotals(
                ad_id=r["ad_id"],
                advertiser_id=r["advertiser_id"],
                campaign_id=r["campaign_id"],
                clicks=int(r["clicks"]),
                impressions=int(r["impressions"]),
                spend_micros=int(r["spend_micros"]),
                unique_users=int(u),
                invalid_clicks=int(r["invalid_clicks"]),
            )
            for r, u in zip(ranked.iter_rows(named=True), users.tolist(), strict=True)
        ]

    def reconciliation(
        self, *, start_ms: int, end_ms: int, ad_id: str | None = None
    ) -> list[ReconciliationRow]:
        out: list[ReconciliationRow] = []
        for hour in self.final_hours(start_ms, end_ms):
            report = self.hours.read_report(hour)
            if report is None:
                continue
            for row in report.to_pylist():
                if ad_id is None or row["ad_id"] == ad_id:
                    out.append(ReconciliationRow(hour_ms=hour, **row))
        return out

    def adjustments(
        self, *, start_ms: int, end_ms: int, advertiser_id: str | None = None
    ) -> list[Adjustment]:
        out: list[Adjustment] = []
        for hour in self.final_hours(start_ms, end_ms):
            versions = self.hours.versions(hour)
            for previous, version in itertools.pairwise(versions):
                old = _per_ad(self.hours.read_version(hour, previous.version), start_ms, end_ms)
                new = _per_ad(self.hours.read_version(hour, version.version), start_ms, end_ms)
                keys = ["ad_id", *aggregate.OWNERS]
                diff = new.join(old, on=keys, how="full", coalesce=True, suffix="_old")
                diff = diff.fill_null(strategy="zero").with_columns(
                    (pl.col(m) - pl.col(f"{m}_old")).alias(m) for m in _SUMS
                )
                changed = diff.filter(pl.any_horizontal(pl.col(m) != 0 for m in _SUMS))
                if advertiser_id is not None:
                    changed = changed.filter(pl.col("advertiser_id") == advertiser_id)
                for row in changed.sort("ad_id").iter_rows(named=True):
                    out.append(
                        Adjustment(
                            ad_id=row["ad_id"],
                            advertiser_id=row["advertiser_id"],
                            campaign_id=row["campaign_id"],
                            hour_ms=hour,
                            version=version.version,
                            previous_version=previous.version,
                            created_ms=version.created_ms,
                            reason=version.reason,
                            **{m: int(row[m]) for m in _SUMS},
                        )
                    )
        return out


_SUMS = ("clicks", "impressions", "spend_micros", "invalid_clicks")
_OWNER_COLUMNS = {"advertiser": "advertiser_id", "campaign": "campaign_id"}


def _per_ad(minute: pa.Table, start_ms: int, end_ms: int) -> pl.DataFrame:
    """Sums per ad of the minutes in [start_ms, end_ms): a period that starts or ends
    inside an hour (a month in a half-hour zone) takes only its own minutes' changes."""
    frame = pl.from_arrow(minute)
    assert isinstance(frame, pl.DataFrame)
    inside = frame.filter(pl.col("minute_ms").is_between(start_ms, end_ms, closed="left"))
    return inside.group_by("ad_id", *aggregate.OWNERS).agg(pl.col(m).sum() for m in _SUMS)
