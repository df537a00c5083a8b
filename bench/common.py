"""Shared helpers for the benchmarks: servers as subprocesses, load, CPU, statistics.

Everything binds to 127.0.0.1. Every process started here runs in its own process group
(``start_new_session``) and is stopped by that group, in ``finally`` blocks and on SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import http.client
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clickagg.launcher import free_port, serve_command, stop_group

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def install_sigterm_handler() -> None:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop our servers."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# -- machine and statistics ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_at_start": [float(x) for x in load],
    }


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"machine: {info['nproc']} cpus, {info['cpu']}, python {info['python']}, "
        f"{info['date']}, loadavg at start {' '.join(map(str, info['loadavg_at_start']))}"
    )
    code = info.get("code")
    if code:
        print(
            f"code: HEAD {code.get('git_head')} + {len(code.get('src_dirty', []))} modified "
            f"src files, frozen copy sha256 {code.get('src_sha256', '(live tree)')}"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of repetitions."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(value: float, unit: str = "") -> str:
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return text + unit


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


# -- the code under test ---------------------------------------------------------------------


def _git_info() -> dict[str, Any]:
    code: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        code["git_head"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--short", "--", "src"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        code["src_dirty"] = [line[3:] for line in dirty if line.strip()]
    return code


def freeze(dest: Path, rev: str | None = None) -> dict[str, Any]:
    """Copy src/ to ``dest`` with code.json (git head, modified files at copy time): the
    working tree, or with ``rev`` the committed tree of that revision (``git archive``)."""
    if rev is None:
        code = _git_info()
        shutil.copytree(REPO / "src", dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", rev],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        code = {"git_head": commit, "src_dirty": []}
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            shutil.copytree(Path(tmp) / "src", dest)
    (dest / "code.json").write_text(json.dumps(code))
    return code


@contextlib.contextmanager
def source_snapshot(enabled: bool = True) -> Iterator[dict[str, Any]]:
    """Freeze src/ for the run: servers import a copy (PYTHONPATH before the editable
    install), so edits made to the working tree meanwhile do not change what is measured.
    With CLICKAGG_BENCH_SRC=<dir made by ``python bench/common.py freeze <dir>``> every
    script measures that same copy. Yields {"env": ..., "code": {git head, modified files,
    sha256 of the copied tree}}."""
    env = dict(os.environ)
    if not enabled:
        yield {"env": env, "code": _git_info() | {"snapshot": False}}
        return
    given = os.environ.get("CLICKAGG_BENCH_SRC")
    with tempfile.TemporaryDirectory(prefix="clickagg-src-") as tmp:
        copy = Path(tmp) / "src"
        if given:
            shutil.copytree(given, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code = (
                json.loads((copy / "code.json").read_text())
                if (copy / "code.json").exists()
                else {}
            )
            code["frozen_dir"] = given
        else:
            code = freeze(copy)
        digest = hashlib.sha256()
        for path in sorted(copy.rglob("*.py")):
            digest.update(str(path.relative_to(copy)).encode() + b"\0" + path.read_bytes())
        code["snapshot"] = True
        code["src_sha256"] = digest.hexdigest()[:16]
        env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
        yield {"env": env, "code": code}


# -- processes -----------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ManagedProcess:
    """A subprocess in its own process group, ready when ``ready_path`` answers 200."""

    def __init__(
        self,
        command: list[str],
        *,
        port: int,
        log_path: Path,
        ready_path: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.env = env
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.ready_path = ready_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=log, start_new_session=True, env=self.env
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[:4]} exited: {self.log_tail()}")
            try:
                status, _ = http_get(self.port, self.ready_path, timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"not ready in {timeout_s}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers; wait until it is gone."""
        if self.process is not None:
            stop_group(self.process)


class ClickaggServer(ManagedProcess):
    """``clickagg serve`` on a fresh temporary data dir."""

    def __init__(
        self,
        *,
        partitions: int = 8,
        env: dict[str, str] | None = None,
        tmp_root: str | None = None,
        python: str | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="clickagg-bench-", dir=tmp_root)
        self.data_dir = Path(self._tmp.name) / "data"
        port = free_port()
        command = serve_command(self.data_dir, port=port, partitions=partitions)
        if python is not None:  # another build of clickagg (see build_commit)
            command[0] = python
        super().__init__(
            command,
            port=port,
            log_path=Path(self._tmp.name) / "serve.log",
            ready_path="/healthz",
            env=env,
        )

    def worker_pid(self) -> int | None:
        """The stream worker: the multiprocessing child that is not the resource tracker."""
        for child in children_of(self.pid):
            line = cmdline(child)
            if "multiprocessing" in line and "resource_tracker" not in line:
                return child
        return None

    def stop_process(self) -> None:
        """Stop the server but keep its data dir (to read the store afterwards)."""
        super().stop()

    def stored_minutes(self) -> Any:
        """(ad_id, minute_ms, clicks, impressions) of the stopped server's store: the minute
        rows, plus the appended deltas not compacted yet where the store has them (a store
        of 3a2a018 upserted into agg_minute only)."""
        import duckdb

        con = duckdb.connect(str(self.data_dir / "aggregates.duckdb"), read_only=True)
        try:
            tables = {
                name for (name,) in con.sql("SELECT table_name FROM duckdb_tables()").fetchall()
            }
            parts = ["agg_minute", *(["delta_minute"] if "delta_minute" in tables else [])]
            union = " UNION ALL ".join(
                f"SELECT ad_id, minute_ms, clicks, impressions FROM {table}" for table in parts
            )
            return con.sql(
                "SELECT ad_id, minute_ms, sum(clicks)::BIGINT AS clicks, "
                f"sum(impressions)::BIGINT AS impressions FROM ({union}) GROUP BY ALL "
                "HAVING sum(clicks) > 0 OR sum(impressions) > 0"
            ).pl()
        finally:
            con.close()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._tmp.cleanup()


@contextlib.contextmanager
def running(server: ManagedProcess) -> Iterator[ManagedProcess]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


def machine_ticks() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


class CpuMeter:
    """CPU seconds used by some processes between ``start`` and ``stop``, plus the whole
    machine's busy, iowait and steal time (to see whether the box was saturated)."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.before: dict[str, float] = {}
        self.t0 = 0.0
        self.self_before = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.self_before = time.process_time()
        self.before = {n: proc_cpu_seconds(p) or 0.0 for n, p in self.pids.items()}
        self.ticks_before = machine_ticks()

    def stop(self) -> dict[str, float]:
        """Average cores used per process over the interval (1.0 = one core busy)."""
        wall = time.perf_counter() - self.t0
        used = {
            name: ((proc_cpu_seconds(pid) or 0.0) - self.before[name]) / wall
            for name, pid in self.pids.items()
        }
        used["client"] = (time.process_time() - self.self_before) / wall
        delta = [b - a for a, b in zip(self.ticks_before, machine_ticks(), strict=True)]
        idle, iowait, steal = delta[3], delta[4], delta[7]
        used["machine_busy"] = (sum(delta) - idle - iowait) / CLK_TCK / wall
        used["machine_iowait"] = iowait / CLK_TCK / wall
        used["machine_steal"] = steal / CLK_TCK / wall
        ours = sum(used[name] for name in self.pids) + used["client"]
        used["other_processes"] = max(0.0, used["machine_busy"] - ours)
        return used


# -- a frozen commit, built once ------------------------------------------------------------

DEFAULT_BASELINE_COMMIT = "3a2a018"
BUILD_CACHE = Path(
    os.environ.get("CLICKAGG_BENCH_CACHE", Path.home() / ".cache" / "clickagg-bench")
)


@dataclass(frozen=True)
class CommitBuild:
    commit: str  # full hash
    short: str
    python: str  # the interpreter of its venv: ``python -m clickagg serve`` runs that commit
    tree: Path

    def env(self) -> dict[str, str]:
        """The environment for its processes: none of the working tree's import paths."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.pop("CLICKAGG_BENCH_SRC", None)
        return env


def build_commit(rev: str = DEFAULT_BASELINE_COMMIT, *, timeout_s: float = 1200) -> CommitBuild:
    """The committed tree of ``rev`` (``git archive``) with its own venv (``pip install -c
    constraints.txt -e .``), cached under BUILD_CACHE/<full hash> so later runs reuse it.
    A lock file serializes concurrent builds; a build counts only once ``ready`` exists."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *argv], check=True, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    short = git("rev-parse", "--short", commit)
    root = BUILD_CACHE / commit
    tree, venv = root / "tree", root / "venv"
    build = CommitBuild(commit, short, str(venv / "bin" / "python"), tree)
    if (root / "ready").exists():
        return build
    BUILD_CACHE.mkdir(parents=True, exist_ok=True)
    with open(BUILD_CACHE / f"{commit}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "ready").exists():
            return build
        shutil.rmtree(root, ignore_errors=True)
        tree.mkdir(parents=True)
        print(f"building {short} in {root} (once; cached for later runs)", flush=True)
        t = time.perf_counter()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        constraints = tree / "constraints.txt"
        if not constraints.exists():
            constraints = REPO / "constraints.txt"
        base_python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=timeout_s)
        pip = subprocess.run(
            [
                *(build.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"),
                *("-c", str(constraints), "-e", str(tree)),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if pip.returncode != 0:
            raise RuntimeError(f"pip install of {short} failed: {pip.stderr[-3000:]}")
        subprocess.run(
            [build.python, "-c", "import clickagg.cli.main"],
            check=True,
            timeout=60,
            env=build.env(),
        )
        (root / "ready").write_text(json.dumps({"commit": commit, "built": time.time()}))
        print(f"built {short} in {time.perf_counter() - t:.0f} s", flush=True)
    return build


# -- HTTP ----------------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Client:
    """One keep-alive HTTP/1.1 connection (http.client: little CPU per request)."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> tuple[int, bytes, dict[str, str]]:
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            raise
        return response.status, data, dict(response.getheaders())

    def close(self) -> None:
        self.conn.close()


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def committed_total(client: Client) -> int:
    status, body, _ = client.request("GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {body[:200]!r}")
    return int(metric_sum(body.decode(), "clickagg_partition_committed_offset"))


# -- batch load ----------------------------------------------------------------------------


def make_bodies(
    events: int, batch: int, *, seed: int, mix: Any = None, now_ms: int | None = None
) -> list[bytes]:
    """NDJSON bodies from TrafficGenerator (built before any clock starts)."""
    from clickagg.traffic import TrafficGenerator

    gen = TrafficGenerator(seed=seed, mix=mix)
    now_ms = now_ms or int(time.time() * 1000)
    bodies = []
    left = events
    while left > 0:
        size = min(batch, left)
        bodies.append(gen.ndjson(size, now_ms))
        left -= size
    return bodies


@dataclass
class SendResult:
    accepted: int = 0
    rejected: int = 0
    retries_503: int = 0
    errors: list[str] = field(default_factory=list)
    first_send: float = 0.0
    last_ack: float = 0.0
    latencies: list[float] = field(default_factory=list)


def send_batches(
    port: int,
    bodies: Sequence[bytes],
    *,
    concurrency: int,
    max_seconds: float,
    max_retries: int = 50,
    on_start: Callable[[], None] | None = None,
) -> SendResult:
    """POST every body to /events/batch from ``concurrency`` threads, each its own
    keep-alive connection; 503 is retried after a pause (bounded in count and time)."""
    work: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(bodies)):
        work.put(index)
    result = SendResult()
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def run() -> None:
        client = Client(port)
        try:
            while time.perf_counter() < deadline:
                try:
                    index = work.get_nowait()
                except queue.Empty:
                    return
                body = bodies[index]
                for _attempt in range(max_retries):
                    if time.perf_counter() > deadline:
                        break
                    t = time.perf_counter()
                    try:
                        status, data, _ = client.request(
                            "POST", "/events/batch", body, "application/x-ndjson"
                        )
                    except (OSError, http.client.HTTPException) as exc:
                        with lock:
                            result.errors.append(repr(exc))
                        time.sleep(0.2)
                        continue
                    done = time.perf_counter()
                    if status == 503:
                        with lock:
                            result.retries_503 += 1
                        time.sleep(0.05)
                        continue
                    reply = json.loads(data)
                    with lock:
                        if status == 202:
                            result.accepted += reply["accepted"]
                            result.rejected += len(reply["rejected"])
                        else:
                            result.errors.append(f"{status}: {data[:200]!r}")
                        result.last_ack = max(result.last_ack, done)
                        result.latencies.append(done - t)
                    break
        finally:
            client.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(concurrency)]
    if on_start is not None:
        on_start()
    result.first_send = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.perf_counter()) + 70)
    return result


# -- profiling -----------------------------------------------------------------------------


def start_py_spy(pid: int, out: Path, *, idle: bool = False) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "-o",
            str(out),
            *(["--idle"] if idle else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def emit_json(result: dict[str, Any]) -> None:
    print(json.dumps(result, sort_keys=True, default=str))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="benchmark helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    freeze_cmd = sub.add_parser("freeze", help="copy src/ for CLICKAGG_BENCH_SRC")
    freeze_cmd.add_argument("dest", type=Path)
    freeze_cmd.add_argument("--rev", help="a git revision instead of the working tree")
    ns = parser.parse_args()
    print(json.dumps(freeze(ns.dest, ns.rev)))
