"""Run ``clickagg serve`` as a subprocess in a process group of its own.

The demo, the end-to-end tests and the benchmarks all need the real server (two
processes) started, checked for readiness and stopped, or killed whole with ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A free loopback port (the OS picks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_command(data_dir: Path, *, port: int, partitions: int) -> list[str]:
    """The command line of ``clickagg serve`` on loopback, run by this interpreter."""
    return [
        *(sys.executable, "-m", "clickagg", "serve"),
        *("--data-dir", str(data_dir), "--port", str(port), "--partitions", str(partitions)),
    ]


class ServeProcess:
    def __init__(
        self,
        data_dir: Path,
        *,
        partitions: int = 4,
        port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """``extra_args`` are more ``serve`` flags (e.g. ``--config``); ``extra_env`` is
        added to this process's environment (e.g. ``CLICKAGG_*`` settings)."""
        self.data_dir = data_dir
        self.partitions = partitions
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}-serve.log"

    def start(self, timeout_s: float = 60.0, *, healthy: bool = True) -> None:
        """Start and wait until ``/healthz`` answers 200 (workers recovered), or with
        ``healthy=False`` answers at all (a server that starts up degraded)."""
        command = serve_command(self.data_dir, port=self.port, partitions=self.partitions)
        env = {**os.environ, **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.extra_args],
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=env,
            )
        deadline = time.monotonic() + timeout_s
        # One client for the polls: ``httpx.get`` builds a client (an SSL context) per call,
        # tens of ms of CPU taken from the server starting beside it, 20 times a second.
        with httpx.Client(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"serve exited {self.process.returncode}: {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/healthz").status_code == 200 or not healthy:
                        return
                time.sleep(0.05)
        self.kill9()
        raise RuntimeError(f"serve not healthy in {timeout_s}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill9(self) -> None:
        """SIGKILL every process of the server (API process, worker process, helpers)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        _wait_group_gone(self.process.pid)

    def stop(self) -> None:
        """SIGTERM the group (graceful: snapshots are written), SIGKILL if it lingers."""
        if self.process is not None:
            stop_group(self.process)


def stop_group(process: subprocess.Popen[bytes], *, timeout_s: float = 30.0) -> None:
    """SIGTERM a process group, SIGKILL it if it lingers, and wait until it is gone."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    _wait_group_gone(process.pid)


def _group_runs(pgid: int) -> bool:
    """Whether a process of the group is still running. Zombies do not count: the
    server's children, orphaned by its kill, wait as zombies until the system's init
    reaps them (in some containers a second or two later), holding no memory, files or
    ports any more."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return True  # no /proc to tell zombies apart: any member counts
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _parent, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_runs(pgid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
