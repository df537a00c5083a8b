"""The command line against a real ``clickagg serve`` subprocess, and the demo end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from clickagg.cli.main import main
from clickagg.settings_loader import FLAGS
from tests.e2e.server import ServeProcess, http


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path_factory.mktemp("cli") / "data", partitions=2)
    process.start()
    yield process
    process.stop()


def test_serve_rejects_bad_settings() -> None:
    result = CliRunner().invoke(main, ["serve", "--allowed-lateness", "soon"])
    assert result.exit_code == 2 and "duration" in result.output
    result = CliRunner().invoke(main, ["serve", "--allowed-lateness", "40m"])
    assert result.exit_code == 2 and "dedup horizon" in result.output


def test_serve_refuses_a_bad_ad_registry(tmp_path: Path) -> None:
    ads = tmp_path / "ads.csv"
    ads.write_text("ad_id,price\na,1\n")
    result = CliRunner().invoke(main, ["serve", "--ads", str(ads)])
    assert result.exit_code == 2 and "cpc_micros" in result.output


def test_serve_has_the_flags_the_readme_names() -> None:
    serve = main.commands["serve"]
    options = {opt for param in serve.params for opt in getattr(param, "opts", [])}
    assert set(FLAGS.values()) <= options


def test_serve_print_config_says_where_each_value_came_from(tmp_path: Path) -> None:
    config = tmp_path / "clickagg.toml"
    config.write_text('partitions = 2\nallowed_lateness = "2m"\nmicro_batch_events = 500\n')
    env = {"CLICKAGG_CONFIG": str(config), "CLICKAGG_PARTITIONS": "3"}
    result = CliRunner().invoke(main, ["serve", "--print-config", "--port", "9001"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(re.fullmatch(r"port = 9001 +# flag --port", x) for x in lines)
    assert any(re.fullmatch(r"partitions = 3 +# env CLICKAGG_PARTITIONS", x) for x in lines)
    assert any(re.fullmatch(rf'allowed_lateness = "2m" +# file {config}', x) for x in lines)
    assert any(re.fullmatch(r"max_future = \"5m\" +# default", x) for x in lines)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"CLICKAGG_PARTITONS": "2"}, "Error: environment variable CLICKAGG_PARTITONS: "),
        ([], {"CLICKAGG_SEGMENT_BYTES": "big"}, "Error: environment variable CLICKAGG_SEGMENT"),
        (["--config", "{config}"], {}, "Error: {config}: unknown key 'partitons'"),
        ([], {"CLICKAGG_CONFIG": "{config}"}, "Error: {config}: unknown key 'partitons'"),
        ([], {"CLICKAGG_CONFIG": "/nonexistent.toml"}, "Error: CLICKAGG_CONFIG: no such file"),
        ([], {"CLICKAGG_ADS_FILE": "/nonexistent.csv"}, "Error: cannot read the ad registry"),
    ],
)
def test_serve_says_in_one_line_which_setting_is_wrong(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("partitons = 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "clickagg", "serve", *(a.format(config=config) for a in args)],
        env={**os.environ, **{k: v.format(config=config) for k, v in env.items()}},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(message.format(config=config)), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "clickagg-data").exists()


def test_query_and_trace(server: ServeProcess) -> None:
    now = int(time.time())
    for copy in range(2):
        response = http.post(
            server.url + "/events/click",
            json={"click_id": "cli-1", "ad_id": "ad-cli", "timestamp": now, "country": "US"},
        )
        assert response.status_code == 202, copy
    runner = CliRunner()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        traced = runner.invoke(main, ["trace", "cli-1", "--url", server.url])
        if "duplicate" in traced.output:
            break
        time.sleep(0.1)
    assert traced.exit_code == 0, traced.output
    assert "cli-1: counted (partition" in traced.output
    assert "duplicate" in traced.output
    result = runner.invoke(
        main,
        [
            "query",
            "ad-cli",
            "--url",
            server.url,
            "--last",
            "1h",
            "--granularity",
            "minute",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"clicks": 1' in result.output
    table = runner.invoke(main, ["query", "ad-cli", "--url", server.url, "--group-by", "country"])
    assert table.exit_code == 0 and "US" in table.output
    realtime = runner.invoke(main, ["query", "ad-cli", "--url", server.url, "--realtime"])
    assert realtime.exit_code == 0 and "last hour" in realtime.output
    unknown = runner.invoke(main, ["trace", "nope", "--url", server.url])
    assert unknown.exit_code == 1 and "no decision recorded" in unknown.output
    bad = runner.invoke(main, ["query", "ad-cli", "--url", server.url, "--start", "noon"])
    assert bad.exit_code == 1 and "400" in bad.output


def test_query_says_when_the_server_is_unreachable() -> None:
    result = CliRunner().invoke(main, ["query", "ad", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clickagg", "demo", "--seconds", "4", "--rate", "1000"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "120"},  # rich's width: no table wraps
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    lines = [line.strip() for line in out.splitlines()]
    assert "Top ads, last hour (exactly-once, minute windows rolled up)" in lines
    assert "What happened to the traffic" in lines
    assert any(
        line.startswith("Where to look next (run clickagg serve and try):") for line in lines
    )
    # the top-ads table: its header, then rows of real ads with their counts
    cells = [
        [c.strip() for c in line.strip("│┃").split("│" if "│" in line else "┃")] for line in lines
    ]
    assert ["ad", "clicks", "impressions", "CTR", "spend", "unique users"] in cells
    top = [c for c in cells if len(c) == 6 and re.fullmatch(r"ad-\d{4}", c[0])]
    assert 1 <= len(top) <= 10 and all(int(c[1].replace(",", "")) > 0 for c in top)
    # the traffic table: every fate with its count, and the counts add up
    fates = {c[0]: int(c[1].replace(",", "")) for c in cells if len(c) == 2 and c[1][:1].isdigit()}
    assert set(fates) >= {
        "sent",
        "rejected at ingest (malformed)",
        "accepted (durable, 202)",
        "counted (clicks + impressions)",
        "duplicates dropped",
        "late (to the late log)",
        "invalid at once (stage-1 rules)",
    }
    assert (
        fates["sent"] == fates["accepted (durable, 202)"] + fates["rejected at ingest (malformed)"]
    )
    counted = fates["counted (clicks + impressions)"]
    duplicates, late = fates["duplicates dropped"], fates["late (to the late log)"]
    # the generator sends about 10% duplicates and 2% late events: the demo reads them
    assert counted > 0 and duplicates > 0 and late > 0
    invalid = fates["invalid at once (stage-1 rules)"]
    assert counted + duplicates + late + invalid <= fates["accepted (durable, 202)"]
    # the invalid-traffic table: the bots by the user-agent rules, the one-address burst by
    # the keyed stage's velocity rule, every click of each, and no ordinary click
    assert "Invalid clicks (flagged with a reason, not billed)" in " ".join(lines)
    sums = {c[0]: int(c[1].replace(",", "")) for c in cells if len(c) == 2 and c[1][:1].isdigit()}
    bots, burst = sums["sent as crawler or script clicks"], sums["sent as a one-address burst"]
    assert bots > 0 and burst > 60
    assert sums.get("declared-crawler", 0) + sums.get("non-browser-client", 0) == bots
    assert sums["ip-click-velocity"] == burst
    assert sums["all invalid clicks"] == bots + burst
    assert "Ordinary clicks flagged: 0 " in out
