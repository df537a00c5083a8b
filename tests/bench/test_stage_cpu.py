"""bench/stage_cpu.py: which stage a sampled stack is charged to, and the scaling by the
CPU per event of an unprofiled run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stage_cpu() -> ModuleType:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("stage_cpu", REPO / "bench" / "stage_cpu.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


def frame(func: str, path: str) -> str:
    return f"{func} (/x/site-packages/{path}:1)"


def test_a_background_owner_takes_its_whole_stack(stage_cpu: ModuleType) -> None:
    """The compactor's sketch unions are compaction, not the stream's aggregation."""
    stack = [
        frame("Compactor._run", "clickagg/runtime/worker.py"),
        frame("DuckDBStore.compact", "clickagg/store/duckdb_store.py"),
        frame("union_many", "clickagg/core/hll.py"),
    ]
    assert stage_cpu.stage_of(stack) == "compaction (background)"


def test_the_innermost_stream_stage_wins(stage_cpu: ModuleType) -> None:
    """Aggregation called from the processor (as at 3a2a018) is aggregation."""
    stack = [
        frame("step_all", "clickagg/worker/stream.py"),
        frame("PartitionProcessor.process", "clickagg/core/processor.py"),
        frame("minute_deltas", "clickagg/core/aggregate.py"),
    ]
    assert stage_cpu.stage_of(stack) == "aggregate (deltas, sketches)"
    assert stage_cpu.stage_of(stack[:2]) == "dedup, lateness, rules"
    assert stage_cpu.stage_of([frame("run", "uvicorn/server.py")]) == "HTTP, event loop, other"


def test_shares_are_of_all_samples(stage_cpu: ModuleType, tmp_path: Path) -> None:
    lines = [
        "thread (1): MainThread;"
        + frame("ingest_batch", "clickagg/api/ingest.py")
        + ";"
        + frame("decode_many", "clickagg/core/events.py")
        + " 3",
        "thread (1): MainThread;" + frame("normalize", "clickagg/core/events.py") + " 1",
    ]
    (tmp_path / "api.txt").write_text("\n".join(lines) + "\n")
    assert stage_cpu.shares(tmp_path / "api.txt") == {"decode": 0.75, "validate (normalize)": 0.25}
