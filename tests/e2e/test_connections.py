"""Connection hygiene of the real ``clickagg serve``: clients trickling their headers, or
sending nothing, are closed by the header timeout while ordinary requests go on; clients
trickling or withholding a body are answered 408 (or closed) by the body timeout; idle
kept-alive connections are closed; over the connection cap a request is answered 503."""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import ServeProcess

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
KEEP_ALIVE_S = 1.0
TRICKLERS = 200
SILENT = 50
# A request head that never ends: one byte of it is sent every TRICKLE_EVERY_S.
SLOW_HEAD = b"POST /events/click HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    data_dir = tmp_path_factory.mktemp("connections") / "data"
    serve = ServeProcess(
        data_dir,
        extra_env={
            "CLICKAGG_HEADER_TIMEOUT": f"{int(HEADER_TIMEOUT_S * 1000)}ms",
            "CLICKAGG_BODY_TIMEOUT": f"{int(BODY_TIMEOUT_S * 1000)}ms",
            "CLICKAGG_KEEP_ALIVE_TIMEOUT": f"{int(KEEP_ALIVE_S * 1000)}ms",
        },
    )
    serve.start()
    try:
        yield serve
    finally:
        serve.stop()


def connect(server: ServeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


class Tricklers(threading.Thread):
    """Sends one more byte of ``SLOW_HEAD`` on every open socket every ``every_s`` (none
    on the silent ones) and records when the server closed each one."""

    def __init__(self, trickling: list[socket.socket], silent: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.trickling = trickling
        self.started_at = time.monotonic()
        self.closed_after: dict[socket.socket, float] = {}
        self.every_s = 0.1
        self.deadline_s = HEADER_TIMEOUT_S + 20
        self.selector = selectors.DefaultSelector()
        self.total = len(trickling) + len(silent)
        for sock in [*trickling, *silent]:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)

    def run(self) -> None:
        sent = 0
        while len(self.closed_after) < self.total:
            elapsed = time.monotonic() - self.started_at
            if elapsed > self.deadline_s:
                return
            for key, _ in self.selector.select(timeout=self.every_s):
                self._check(key.fileobj)  # type: ignore[arg-type]
            if sent < len(SLOW_HEAD):
                for sock in self.trickling:
                    if sock not in self.closed_after:
                        with contextlib.suppress(OSError):  # closed: seen by _check
                            sock.send(SLOW_HEAD[sent : sent + 1])
                sent += 1

    def _check(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:  # reset
            data = b""
        assert data == b"", f"the server answered a head it never got: {data[:200]!r}"
        self.closed_after[sock] = time.monotonic() - self.started_at
        self.selector.unregister(sock)


def click_latencies(
    client: httpx.Client, prefix: str, *, until: threading.Thread | None = None, count: int = 200
) -> list[float]:
    """POST ``count`` clicks one after another (or as many as fit, up to 2,000, while
    ``until`` runs); every one must be accepted."""
    latencies = []
    now = int(time.time())
    for n in range(2_000 if until else count):
        if until is not None and not until.is_alive():
            break
        click = {"click_id": f"{prefix}-{n}", "ad_id": "ad-conn", "timestamp": now}
        started = time.perf_counter()
        response = client.post("/events/click", json=click)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 202, response.text
    return latencies


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


@pytest.mark.slow
def test_trickling_and_silent_connections_are_closed_while_requests_go_on(
    server: ServeProcess,
) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        click_latencies(client, "warm", count=50)
        baseline = click_latencies(client, "base")

        trickling = [connect(server) for _ in range(TRICKLERS)]
        silent = [connect(server) for _ in range(SILENT)]
        try:
            tricklers = Tricklers(trickling, silent)
            tricklers.start()
            during = click_latencies(client, "during", until=tricklers)
            tricklers.join(timeout=tricklers.deadline_s + 5)
            closed = sorted(tricklers.closed_after.values())
        finally:
            for sock in [*trickling, *silent]:
                sock.close()

    assert len(closed) == TRICKLERS + SILENT, "connections the header timeout left open"
    # Closed by the header timeout: not before it (they kept sending), and not long after.
    assert closed[0] >= HEADER_TIMEOUT_S - 0.2, closed[:5]
    assert closed[-1] <= HEADER_TIMEOUT_S + 8, closed[-5:]
    assert len(during) >= 20, "too few requests measured during the trickle"
    # Generous: a loaded 2-core box, but not the seconds a starved server would take.
    assert p99(during) <= max(5 * p99(baseline), 0.25), (p99(baseline), p99(during))


def healthz_on(sock: socket.socket) -> None:
    """One ``GET /healthz`` on a kept-alive raw connection, answered 200."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        chunk = sock.recv(4096)
        assert chunk, f"closed before the answer: {answer!r}"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer


@pytest.mark.slow
def test_a_kept_alive_connection_trickling_its_next_head_is_closed(server: ServeProcess) -> None:
    with connect(server) as sock:
        healthz_on(sock)
        sock.settimeout(0.1)
        started = time.monotonic()
        for byte in SLOW_HEAD[:200]:  # 20 s at most; bytes keep the keep-alive timer off
            try:
                if sock.recv(4096) == b"":
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:  # our byte met the closed socket first
                break
            with contextlib.suppress(OSError):
                sock.send(bytes([byte]))
        closed_after = time.monotonic() - started
        assert HEADER_TIMEOUT_S - 0.2 <= closed_after <= HEADER_TIMEOUT_S + 3, closed_after


@pytest.mark.slow
def test_an_idle_kept_alive_connection_is_closed(server: ServeProcess) -> None:
    with connect(server) as sock:
        healthz_on(sock)
        idle_from = time.monotonic()
        sock.settimeout(KEEP_ALIVE_S + 10)
        assert sock.recv(4096) == b"", "the server sent more than one answer"
        idle_for = time.monotonic() - idle_from
        assert KEEP_ALIVE_S - 0.2 <= idle_for <= KEEP_ALIVE_S + 3, idle_for


def batch_head(length: int) -> bytes:
    return (
        b"POST /events/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n" % length
    )


def trickle_until_closed(sock: socket.socket, every_s: float | None) -> tuple[bytes, float]:
    """Send one byte of body every ``every_s`` (None: nothing) until the server closes the
    connection; return what it answered and how long after the call it closed (at most
    ``BODY_TIMEOUT_S + 10`` s: a server that never closes fails the caller's bounds)."""
    started = time.monotonic()
    sock.settimeout(every_s or 0.5)
    answer = b""
    while time.monotonic() - started < BODY_TIMEOUT_S + 10:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            if every_s is not None:
                with contextlib.suppress(OSError):  # closed: the next recv says so
                    sock.send(b"x")
            continue
        except ConnectionResetError:
            break
        if chunk == b"":
            break
        answer += chunk
    return answer, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("every_s", [0.5, None], ids=["trickled", "withheld"])
def test_a_body_trickled_or_withheld_is_answered_408_after_the_body_timeout(
    server: ServeProcess, every_s: float | None
) -> None:
    with connect(server) as sock:
        sock.sendall(batch_head(1_000_000))  # then a byte every 0.5 s, or none
        answer, closed_after = trickle_until_closed(sock, every_s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower(), head
    assert json.loads(body) == {
        "error": "request timeout",
        "detail": "the request body did not arrive in time",
    }
    assert BODY_TIMEOUT_S - 0.2 <= closed_after <= BODY_TIMEOUT_S + 3, closed_after
    # The server still answers, on this connection's successor.
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_a_body_still_trickling_after_an_early_answer_is_closed(server: ServeProcess) -> None:
    """A declared body over ``max_body_bytes`` is answered 413 before it arrives; its bytes
    then keep cancelling the keep-alive timer, so only the body timeout closes it."""
    with connect(server) as sock:
        sock.sendall(batch_head(1 << 30))
        answer, closed_after = trickle_until_closed(sock, 0.25)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"HTTP/1.1 408" not in answer, answer  # the answer was already given
    assert BODY_TIMEOUT_S - 0.2 <= closed_after <= BODY_TIMEOUT_S + 3, closed_after


def answer_on(sock: socket.socket) -> bytes:
    """One whole answer (headers and a Content-Length body) on a kept-alive connection."""
    sock.settimeout(10)
    answer = b""
    while True:
        head, sep, body = answer.partition(b"\r\n\r\n")
        if sep:
            [length] = [
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ]
            if len(body) >= length:
                return answer
        chunk = sock.recv(4096)
        assert chunk, f"closed before the answer: {answer!r}"
        answer += chunk


@pytest.mark.slow
def test_each_body_has_its_own_timeout_on_a_kept_alive_connection(server: ServeProcess) -> None:
    """Two slow bodies one after another on one connection, each well within the body
    timeout, together longer than it: both are accepted."""
    now = int(time.time())
    started = time.monotonic()
    with connect(server) as sock:
        for n in range(2):
            clicks = [
                {"event_type": "click", "click_id": f"slow-{n}-{k}", "ad_id": "ad-slow"}
                for k in range(3)
            ]
            body = b"".join(json.dumps(c | {"timestamp": now}).encode() + b"\n" for c in clicks)
            sock.sendall(batch_head(len(body)))
            third = len(body) // 3
            for piece in (body[:third], body[third : 2 * third], body[2 * third :]):
                sock.sendall(piece)
                time.sleep(BODY_TIMEOUT_S / 4)
            answer = answer_on(sock)
            assert answer.startswith(b"HTTP/1.1 202 "), answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["accepted"] == 3
    assert time.monotonic() - started > BODY_TIMEOUT_S


@pytest.mark.slow
def test_over_the_connection_cap_a_request_is_answered_503(tmp_path: Path) -> None:
    cap = 10
    server = ServeProcess(tmp_path / "data", extra_env={"CLICKAGG_MAX_CONNECTIONS": str(cap)})
    server.start()
    idle: list[socket.socket] = []
    try:
        idle = [connect(server) for _ in range(cap)]
        deadline = time.monotonic() + 10  # until the server has accepted them all
        while True:
            response = httpx.get(server.url + "/healthz", timeout=5)
            if response.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert response.status_code == 503, response.text
        assert response.json() == {
            "error": "busy",
            "detail": "too many open connections; retry on a new connection",
        }
        assert response.headers["retry-after"] == "1"
        assert response.headers["connection"] == "close"

        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10  # until the server has seen them go
        while True:
            response = httpx.get(server.url + "/healthz", timeout=5)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert response.status_code == 200, response.text
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
        [refused] = [
            line
            for line in metrics.splitlines()
            if line.startswith("clickagg_connections_refused_total")
        ]
        assert float(refused.split()[-1]) >= 1
    finally:
        for sock in idle:
            sock.close()
        server.stop()
