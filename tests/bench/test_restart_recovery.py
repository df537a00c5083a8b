"""bench/restart_recovery.py at a tiny size: it starts a real server, loads it, kills its
worker -9 idle and under load, restarts the whole server, and prints the figures
BENCHMARKS.md quotes; the run ends with the stored minute rows checked against the
generator's ground truth. No timing is asserted: only that the figures are there, are
numbers, and that nothing was lost or counted twice."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "restart_recovery.py"
NUMBER = r"[\d,]+(?:\.\d+)?"


def test_prints_every_phase_and_the_stream_stays_exact() -> None:
    result = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), "--events", "20000", "--chunk", "10000"),
            *("--load-rate", "5000", "--load-seconds", "4", "--settle", "1"),
            *("--batch", "500", "--concurrency", "4", "--timeout", "60", "--live-src"),
            *("--baseline-starts", "1"),  # the figure is printed; its median is not checked
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "warning" not in out, out  # the sender's reordering stays within the truth's
    assert re.search(r"generated 40,000 production events \(20,000 bulk \+ 20,000 ", out)
    assert re.search(rf"baseline: fresh server, empty data dir, .*: median {NUMBER} s", out)
    assert re.search(rf"bulk: 20,000 events accepted in {NUMBER} s, committed and archived", out)
    for label in ("after the bulk load", "at the end"):
        assert re.search(
            rf"data dir {label}: log {NUMBER} MB, store {NUMBER} MB, archive {NUMBER} MB, "
            rf"snapshots {NUMBER} MB, other {NUMBER} MB, total {NUMBER} MB",
            out,
        ), out
    assert re.search(
        rf"\(a\) kill -9 worker, idle: worker up {NUMBER} s, /healthz 200 {NUMBER} s, "
        rf"lag 0 {NUMBER} s after the kill",
        out,
    ), out
    assert re.search(
        rf"\(b\) kill -9 worker under load .* worker up {NUMBER} s, /healthz 200 {NUMBER} s, "
        rf"lag back to pre-kill level {NUMBER} s .* lag 0 {NUMBER} s after the load ended",
        out,
    ), out
    assert re.search(
        rf"\(c\) whole server stop {NUMBER} s; start to /healthz 200 {NUMBER} s, "
        rf"to lag 0 {NUMBER} s",
        out,
    ), out
    # Both kills were seen by the supervisor, and the rows and fates match the truth.
    assert "worker restarts counted before (c) 2)" in out, out
    exact = re.search(rf"exact vs ground truth: yes \(({NUMBER}) minute rows expected", out)
    assert exact is not None, out
    assert int(exact.group(1).replace(",", "")) > 0
