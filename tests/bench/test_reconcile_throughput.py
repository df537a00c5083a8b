"""bench/reconcile_throughput.py at a tiny size: it builds its archive through the real
writer, reconciles it with the real runner, checks every engine's winners against the
generator, and prints the figures BENCHMARKS.md quotes. No timing is asserted: only that
the figures are there and are numbers."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "reconcile_throughput.py"
NUMBER = r"[\d,]+(?:\.\d+)?"


def spark_missing() -> bool:
    if importlib.util.find_spec("pyspark") is None:
        return True
    from clickagg.batch.spark_engine import java_available

    return not java_available()


def run_bench(cache: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dir", str(cache), "--runs", "1", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def engine_row(out: str, engine: str) -> re.Match[str]:
    """The engine's line of the table: time, decisions/s, events/s, ratio to the baseline."""
    row = re.search(
        rf"^{engine}\s+({NUMBER}) s \({NUMBER}-{NUMBER}\)\s+({NUMBER})\s+({NUMBER})\s+"
        rf"({NUMBER})x\s+({NUMBER})$",
        out,
        re.MULTILINE,
    )
    assert row is not None, f"no {engine} row in:\n{out}"
    return row


def test_prints_the_figures_and_reuses_its_archive(tmp_path: Path) -> None:
    args = ("--events", "20000", "--hours", "4", "--flush", "5000", "--engines", "duckdb,baseline")
    out = run_bench(tmp_path, *args)
    assert "archive: building" in out
    assert re.search(
        rf"archive: 20,000 decisions \(({NUMBER}) distinct events\), 4 hours, {NUMBER} Parquet",
        out,
    )
    assert re.search(rf"archive bytes per event: {NUMBER} Parquet", out)
    assert "spark: skipped: not in --engines" in out
    # Every run's winners were checked against the generator's distinct events.
    assert re.search(r"run 1/1 duckdb: .* winners \(= distinct events\)", out)
    engine_row(out, "duckdb")
    assert engine_row(out, "baseline").group(4) == "1.0"
    assert "closing ONE hour at 100,000 events/s" in out
    assert "LINEAR EXTRAPOLATION" in out
    assert re.search(rf"duckdb: first hour published after {NUMBER} s", out)
    assert re.search(rf"~{NUMBER} min as the first hour of a month", out)

    again = run_bench(tmp_path, *args)
    assert "archive: reusing" in again
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.slow
@pytest.mark.skipif(spark_missing(), reason="the spark engine needs pyspark and Java 17+")
def test_spark_engine_figures(tmp_path: Path) -> None:
    # The child's JVM as tests/batch/test_spark.py starts its JVMs (FAST_JVM there): C1
    # only and the serial collector, half the start on these machines; no figure is checked.
    fast_jvm = '--driver-java-options "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC" pyspark-shell'
    out = run_bench(
        tmp_path,
        *("--events", "10000", "--hours", "2", "--flush", "5000", "--engines", "spark"),
        env={**os.environ, "PYSPARK_SUBMIT_ARGS": fast_jvm},
    )
    assert re.search(rf"^spark\s+{NUMBER} s \({NUMBER}-{NUMBER}\)\s+{NUMBER}", out, re.M), out
    assert re.search(rf"spark: each run in a fresh process.* JVM and session start {NUMBER} s", out)
    assert re.search(rf"local\[2\], {NUMBER} MiB heap", out)
    assert re.search(rf"spark: first hour published after {NUMBER} s", out)


def test_last_hour_only_checks_the_hour_s_winners_and_times_the_selection(tmp_path: Path) -> None:
    args = ("--events", "20000", "--hours", "4", "--flush", "5000", "--engines", "duckdb")
    out = run_bench(tmp_path, *args, "--last-hour-only")
    # The run's winners were checked against the hour's first copies counted apart.
    found = re.search(rf"last hour only: ({NUMBER}) winners in the last hour", out)
    assert found is not None, out
    assert re.search(rf"run 1/1 duckdb: .* {found.group(1)} winners \(= the hour's first", out)
    assert "closing the LAST hour only" in out
    assert re.search(rf"~{NUMBER} min if it grows with the hour", out)
    for view in ("PeriodView", "MonthRankedView"):
        assert re.search(rf"{view}: hour 4 of 4: {NUMBER} ms", out)
