"""bench/fraud_report.py on the first rows of the real TalkingData sample: the clicks go
through a real server, the archive and the batch layer's judging, and the figures FRAUD.md
quotes must agree with a plain count over the same rows. Skipped when the file is absent
(it is not part of the project: ../shared/data/README.md)."""

from __future__ import annotations

import calendar
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "talkingdata_train_sample.csv"
ROWS = 6_000
HOURS = 24
DAY_MS = 86_400_000

pytestmark = pytest.mark.skipif(
    not DATA.exists(), reason=f"{DATA} is absent (real data is not part of the project)"
)


def bench_module() -> ModuleType:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(
            "fraud_report", REPO / "bench" / "fraud_report.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


VOLUME = """\
[[rules]]
id = "ip-click-volume-2"
kind = "ip_click_volume"
reason = "sustained clicks from one address"
[rules.params]
max_clicks = 2
window_hours = 24
"""


def ts(row: dict[str, Any]) -> int:
    return calendar.timegm(time.strptime(row["click_time"], "%Y-%m-%d %H:%M:%S")) * 1000


def plain_rows() -> tuple[int, list[dict[str, Any]]]:
    """The same rows, read without polars' help: the first ROWS lines, of those the ones of
    the first HOURS hours, exact copies merged (one dict per distinct line)."""
    lines = DATA.read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1 : ROWS + 1]]
    first = min(map(ts, rows))
    end = first - first % 3_600_000 + HOURS * 3_600_000
    kept = [
        (line, row) for line, row in zip(lines[1 : ROWS + 1], rows, strict=True) if ts(row) < end
    ]
    return len(kept), list(dict(kept).values())


def test_the_report_counts_what_a_plain_count_of_the_rows_gives(tmp_path: Path) -> None:
    module = bench_module()
    result = module.run(DATA, ROWS, tmp_path, candidates=VOLUME, hours=HOURS)
    sent, rows = plain_rows()
    assert result["rows"] == sent
    assert result["distinct_ids"] == len(rows)
    downloads = sum(int(r["is_attributed"]) for r in rows)
    assert result["downloads"] == downloads
    # No user agents and no bursts at this size: the stream counts every distinct click.
    assert result["fates"] == {"counted": len(rows)} | (
        {"duplicate": sent - len(rows)} if len(rows) < sent else {}
    )

    # Per-address volume: a click is flagged when its address clicked more than 2 times
    # in the 24 h up to it (that click included), counted here by brute force.
    # Each click is compared with every click of its own address (the others cannot count).
    stamped = [(r, ts(r)) for r in rows]
    times_of: dict[str, list[int]] = {}
    for r, t in stamped:
        times_of.setdefault(r["ip"], []).append(t)
    flagged = [
        r for r, t in stamped if sum(1 for u in times_of[r["ip"]] if t - DAY_MS <= u <= t) > 2
    ]
    [volume] = [f for f in result["batch"] if f["rule"] == "batch: ip-click-volume-2 alone"]
    assert volume["flagged"] == len(flagged) > 0
    flagged_downloads = sum(int(r["is_attributed"]) for r in flagged)
    assert volume["flagged_download_rate"] == pytest.approx(flagged_downloads / len(flagged))
    rest = len(rows) - len(flagged)
    assert volume["unflagged_download_rate"] == pytest.approx(
        (downloads - flagged_downloads) / rest
    )
    # The stream flagged nothing, so reconcile bills what the rules in force alone flag.
    by_rule = {f["rule"]: f for f in result["batch"]}
    reconciled = by_rule["batch: reconcile (rules in force, stream verdicts kept)"]
    assert reconciled["flagged"] == by_rule["batch: rules in force, alone"]["flagged"]
    assert isinstance(module.markdown(result), str)
