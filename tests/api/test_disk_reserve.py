"""Below the disk reserve every ingest route answers 503 with the reason and nothing is
acknowledged; /healthz says why and /metrics shows free space; once space is back,
ingest accepts again. The app and its worker are real; only what statvfs says is not."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from clickagg.api.committer import DiskReserveError, GroupCommitter
from clickagg.api.state import AppState
from clickagg.compose import create_app
from clickagg.config import Settings
from clickagg.core import columns
from clickagg.disk import DiskReserve, Space
from clickagg.log.segments import SegmentLogReader, SegmentLogWriter
from tests.api.test_app import wait_until
from tests.conftest import Ev, build_columns

MIB = 2**20
GIB = 2**30
AD = "ad-reserve"


class FakeDisk:
    def __init__(self) -> None:
        self.free = 10 * GIB

    def look(self, path: Path) -> Space:
        return Space(self.free, 100 * GIB)

    def reserve(self, data_dir: Path) -> DiskReserve:
        return DiskReserve(
            data_dir, reserve_bytes=GIB, reserve_percent=10, interval_s=0, look=self.look
        )


def test_no_ingest_route_acknowledges_below_the_reserve(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", partitions=2)
    disk = FakeDisk()
    now_s = int(time.time())
    with TestClient(create_app(settings)) as client:
        state: AppState = client.app.app.state.clickagg  # type: ignore[attr-defined]
        state.committer.reserve = disk.reserve(settings.data_dir)
        wait_until(lambda: client.get("/healthz").status_code == 200, timeout_s=60)
        click = {"click_id": "r-1", "ad_id": AD, "timestamp": now_s}
        assert client.post("/events/click", json=click).status_code == 202

        disk.free = 100 * MIB
        refused = [
            client.post("/events/click", json={**click, "click_id": "r-2"}),
            client.post("/api/v1/events/click", json={**click, "click_id": "r-3"}),
            client.post("/events/impression", json={**click, "click_id": None}),
            client.post(
                "/events/batch",
                json=[{**click, "event_type": "click", "event_id": "r-4", "click_id": None}],
            ),
        ]
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"]
            body = response.json()
            assert body["error"] == "disk full"
            assert "100.0 MiB free" in body["detail"] and "reserve of 1024.0 MiB" in body["detail"]
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        [problem] = health.json()["problems"]
        assert problem.startswith("ingest refused: disk space low")
        gauges = {
            family.name: family.samples[0].value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            if family.name.startswith("clickagg_disk")
        }
        assert gauges == {
            "clickagg_disk_free_bytes": 100 * MIB,
            "clickagg_disk_reserve_bytes": GIB,
        }

        disk.free = 2 * GIB
        assert client.post("/events/click", json={**click, "click_id": "r-5"}).status_code == 202
        assert client.get("/healthz").status_code == 200

        def clicks() -> int:
            rows = client.get("/aggregates", params={"ad_id": AD, "last": "1h"}).json()
            return sum(row["clicks"] for row in rows)

        wait_until(lambda: clicks() == 2)
        assert client.get("/events/r-2").status_code == 404  # never acknowledged, never seen


def test_the_committer_queues_nothing_below_the_reserve(tmp_path: Path) -> None:
    """The check comes before the group: a refused append never reaches the log."""
    disk = FakeDisk()
    writer = SegmentLogWriter(tmp_path, 1, retention_ms=86_400_000, retention_bytes=2**40)
    reader = SegmentLogReader(tmp_path)

    async def run() -> None:
        committer = GroupCommitter(writer, max_pending_events=10, reserve=disk.reserve(tmp_path))
        committer.start()
        try:
            disk.free = 0
            with pytest.raises(DiskReserveError, match="disk space low"):
                await committer.append({0: build_columns([Ev("refused", "ad", 1)])})
            disk.free = 10 * GIB
            await committer.append({0: build_columns([Ev("accepted", "ad", 2)])})
        finally:
            await committer.stop()

    try:
        asyncio.run(run())
        assert reader.durable_end(0) == 1
        [frame] = reader.read(0, 0, 10)
        assert columns.decode(frame.payload)["event_id"].to_pylist() == ["accepted"]
    finally:
        reader.close()
        writer.close()
