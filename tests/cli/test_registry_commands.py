"""``clickagg ads``, ``advertisers`` and ``blocklist``: changes recorded under the data dir
and listed back; bad input is a one-line error."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner, Result

from clickagg.cli.main import main


def run(data: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--data-dir", str(data)], env={"USER": "tester"})


def test_ads_set_import_and_list_at_a_time(tmp_path: Path) -> None:
    data = tmp_path / "data"
    later = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600))
    done = run(data, "ads", "set", "a", "--cpc-micros", "100", "--advertiser", "adv-1")
    assert done.exit_code == 0, done.output
    done = run(data, "ads", "set", "a", "--status", "paused", "--effective-from", later)
    assert done.exit_code == 0, done.output
    csv = tmp_path / "more.csv"
    csv.write_text("ad_id,cpc_micros,campaign_id\nb,5,c1\n")
    assert run(data, "ads", "import", str(csv)).exit_code == 0
    now = {
        e["ad_id"]: e
        for e in map(json.loads, run(data, "ads", "list", "--json").stdout.split("\n")[:-1])
    }
    assert (now["a"]["cpc_micros"], now["a"]["advertiser_id"], now["a"]["status"]) == (
        100,
        "adv-1",
        "active",
    )
    assert (now["b"]["cpc_micros"], now["b"]["campaign_id"]) == (5, "c1")
    then = run(data, "ads", "list", "--json", "--at", later).stdout.splitlines()
    assert json.loads(then[0])["status"] == "paused"
    records = (data / "registry" / "prices.jsonl").read_text().splitlines()
    assert {json.loads(r)["by"] for r in records} == {"tester"}
    assert "paused" in run(data, "ads", "list", "--at", later).stdout


def test_ads_set_refuses_a_bad_status_and_an_empty_change(tmp_path: Path) -> None:
    done = run(tmp_path, "ads", "set", "a", "--status", "deleted")
    assert done.exit_code == 2 and "deleted" in done.output
    done = run(tmp_path, "ads", "set", "a")
    assert done.exit_code == 1 and "nothing to change" in done.output


def test_advertisers_set_and_list(tmp_path: Path) -> None:
    done = run(
        tmp_path, "advertisers", "set", "adv-1", "--name", "Acme", "--time-zone", "Asia/Tokyo"
    )
    assert done.exit_code == 0 and "adv-1: Acme, USD, Asia/Tokyo" in done.output
    done = run(tmp_path, "advertisers", "set", "adv-1", "--currency", "yen")
    assert done.exit_code == 1 and "ISO 4217" in done.output
    listed = run(tmp_path, "advertisers", "list").stdout
    assert "Acme" in listed and "Asia/Tokyo" in listed


def test_blocklist_add_list_remove(tmp_path: Path) -> None:
    done = run(tmp_path, "blocklist", "add", "203.0.113.0/24", "2001:db8::1", "--reason", "abuse")
    assert done.exit_code == 0 and "203.0.113.0/24, 2001:db8::1/128" in done.output
    listed = run(tmp_path, "blocklist", "list").stdout
    assert "203.0.113.0/24" in listed and "tester" in listed and "abuse" in listed
    assert run(tmp_path, "blocklist", "remove", "203.0.113.0/24").exit_code == 0
    assert "203.0.113.0/24" not in run(tmp_path, "blocklist", "list").stdout
    done = run(tmp_path, "blocklist", "remove", "203.0.113.0/24")
    assert done.exit_code == 1 and "not on the blocklist" in done.output
    done = run(tmp_path, "blocklist", "add", "300.1.1.1")
    assert done.exit_code == 1 and "not an IP address or CIDR: '300.1.1.1'" in done.output
