"""The managed blocklist through the real server: an address listed over HTTP makes the
clicks of its later event times invalid under the built-in ip-blocklist rule, in the
stream and in the reconciled hour alike; clicks from elsewhere, and from it before it was
listed or after it was removed, are billed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from clickagg.core.windows import HOUR_MS
from tests.e2e.server import ServeProcess, http
from tests.e2e.test_kill9 import post, wait_caught_up

AD = "ad-admin"
COST = 250_000
LISTED = "198.51.100.66"
OTHER = "192.0.2.10"
TOKEN = "e2e-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"


def click(event_id: str, ts_ms: int, ip: str) -> dict[str, Any]:
    """One user's click (a user of its own: the batch's repeat-click rule must not see
    one user clicking the ad again and again)."""
    return {
        "event_type": "click",
        "event_id": event_id,
        "user_id": f"user-{event_id}",
        "ad_id": AD,
        "timestamp": ts_ms,
        "ip": ip,
        "user_agent": BROWSER,
        "cost_micros": COST,
    }


def rows(server: ServeProcess, span: tuple[int, int], **params: str) -> list[dict[str, Any]]:
    query = {"ad_id": AD, "start": span[0], "end": span[1], "granularity": "hour", **params}
    response = http.get(server.url + "/aggregates", params=query, timeout=10)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()
    return result


def totals(server: ServeProcess, span: tuple[int, int]) -> dict[str, int]:
    keys = ("clicks", "invalid_clicks", "spend_micros")
    found = rows(server, span)
    return {key: sum(row[key] for row in found) for key in keys}


def invalid_by_rule(server: ServeProcess, span: tuple[int, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows(server, span, group_by="invalid_reason"):
        if row["invalid_clicks"]:
            reason = row["invalid_reason"]
            out[reason] = out.get(reason, 0) + row["invalid_clicks"]
    return out


def wait_rule_changes(changes: Path, count: int) -> list[dict[str, Any]]:
    """The rules change records, once the worker has recorded ``count`` of them."""
    deadline = time.monotonic() + 30
    while True:
        text = changes.read_text() if changes.exists() else ""
        if len(text.splitlines()) >= count:
            return [json.loads(line) for line in text.splitlines()]
        assert time.monotonic() < deadline, text
        time.sleep(0.1)


def test_an_address_listed_over_http_invalidates_its_later_clicks(tmp_path: Path) -> None:
    server = ServeProcess(
        tmp_path / "data", partitions=2, extra_env={"CLICKAGG_ADMIN_TOKEN": f"e2e:{TOKEN}"}
    )
    server.start()
    changes = tmp_path / "data" / "rules" / "changes.jsonl"
    try:
        wait_rule_changes(changes, 1)  # the rules the worker started with
        response = http.post(
            server.url + "/admin/blocklist",
            json={"cidrs": [LISTED], "reason": "click farm"},
            headers=AUTH,
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"added": [f"{LISTED}/32"], "by": "e2e"}
        [entry] = http.get(server.url + "/admin/blocklist", headers=AUTH, timeout=10).json()[
            "entries"
        ]
        listed_ms = entry["since_ms"]
        records = wait_rule_changes(changes, 2)
        assert records[1]["changed"] == ["ip-blocklist"]

        ts = int(time.time() * 1000)
        assert ts >= listed_ms
        listed_later = [click(f"bad-{i}", ts + i, LISTED) for i in range(3)]
        elsewhere = [click(f"ok-{i}", ts + i, OTHER) for i in range(4)]
        before_listing = [click("bad-early", listed_ms - 60_000, LISTED)]
        assert post(server.url, listed_later + elsewhere + before_listing)
        wait_caught_up(server)

        hours = sorted({(listed_ms - 60_000) // HOUR_MS, ts // HOUR_MS})
        span = (hours[0] * HOUR_MS, (hours[-1] + 1) * HOUR_MS)
        billed = len(elsewhere) + len(before_listing)
        expected = {
            "clicks": billed,
            "invalid_clicks": len(listed_later),
            "spend_micros": billed * COST,
        }
        assert totals(server, span) == expected
        assert invalid_by_rule(server, span) == {"ip-blocklist": len(listed_later)}
        fate = http.get(f"{server.url}/events/bad-0", timeout=10).json()
        assert fate["reason"] == (
            f"ip-blocklist: blocklisted address: {LISTED} in blocklist {LISTED}/32"
        )

        # Removed: the address's clicks from then on are billed again; the flagged stay.
        response = http.delete(
            f"{server.url}/admin/blocklist/{LISTED}%2F32", headers=AUTH, timeout=10
        )
        assert response.json() == {"removed": f"{LISTED}/32", "by": "e2e"}
        wait_rule_changes(changes, 3)
        after = int(time.time() * 1000)
        assert post(server.url, [click("bad-after-removal", after, LISTED)])
        wait_caught_up(server)
        hours = sorted({*hours, after // HOUR_MS})
        span = (hours[0] * HOUR_MS, (hours[-1] + 1) * HOUR_MS)
        expected = {
            "clicks": billed + 1,
            "invalid_clicks": len(listed_later),
            "spend_micros": (billed + 1) * COST,
        }
        assert totals(server, span) == expected

        # The batch layer reads the same record and judges the hours alike.
        for hour in hours:
            iso = time.strftime("%Y-%m-%dT%H", time.gmtime(hour * HOUR_MS / 1000))
            command = [sys.executable, "-m", "clickagg", "reconcile", "--hour", iso]
            done = subprocess.run(
                [*command, "--data-dir", str(server.data_dir), "--partitions", "2"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
        assert totals(server, span) == expected
        assert invalid_by_rule(server, span) == {"ip-blocklist": len(listed_later)}
        reconciled = http.get(
            server.url + "/reconciliation",
            params={"ad_id": AD, "start": span[0], "end": span[1]},
            timeout=10,
        ).json()
        assert sum(row["batch"]["clicks"] for row in reconciled) == billed + 1
        assert all(not any(row["difference"].values()) for row in reconciled), reconciled
        recorded = [
            json.loads(line)
            for line in (tmp_path / "data" / "rules" / "blocklist.jsonl").read_text().splitlines()
        ]
        assert [(r["op"], r["by"], r["reason"]) for r in recorded] == [
            ("add", "e2e", "click farm"),
            ("remove", "e2e", ""),
        ]
    finally:
        server.stop()
