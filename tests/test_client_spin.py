"""The client connection's read path (agent/serving/connection.py): polling for a quick
answer instead of sleeping ("Waiting for an answer"), and the one read buffer that
heads, small bodies and pipelined answers go through. Real Unix sockets, a real
server thread."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import DEFAULT_SPIN_US, Client
from agent.serving import connection as C
from agent.serving.connection import IN_FLIGHT, InFlight, StaleConnectionError, UnixHTTPConnection
from agent.serving.pace import CAP_S


class _Server:
    """Answers each request on a connection after ``delay`` seconds with ``body``
    (``extra_headers`` pads the head); ``close_after`` requests, then hangs up."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.delay = 0.0
        self.body = b"ok"
        self.extra_headers = b""
        self.close_after = -1
        self.ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ls.bind(self.path)
        self.ls.listen(8)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.ls.accept()
            except OSError:
                return
            self.conns.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        buf = b""
        served = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ")[1]
                body = self.body
                if path.startswith(b"/n/"):  # /n/SIZE/SEED: SIZE bytes of a pattern
                    size, seed = (int(v) for v in path[3:].split(b"/"))
                    body = bytes((seed + i * 7) % 251 for i in range(size))
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                while len(buf) < length:
                    buf += s.recv(65536)
                buf = buf[length:]
                if served == self.close_after:
                    s.close()
                    return
                if self.delay:
                    time.sleep(self.delay)
                s.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    + self.extra_headers
                    + b"content-length: %d\r\n\r\n" % len(body)
                    + body
                )
                served += 1
        except OSError:
            return

    def close(self) -> None:
        self.ls.close()
        for s in self.conns:
            s.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server(tmp_path / "s.sock")
    yield srv
    srv.close()


@pytest.fixture
def spins(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """Every poll: (its budget in seconds, bytes it found)."""
    seen: list[tuple[float, int]] = []
    real = UnixHTTPConnection._spin

    def spy(self: UnixHTTPConnection, sock: socket.socket, deadline: float) -> None:
        budget = deadline - time.perf_counter()
        real(self, sock, deadline)
        seen.append((budget, self._fill))

    monkeypatch.setattr(UnixHTTPConnection, "_spin", spy)
    monkeypatch.setattr(C, "SPIN_CPUS", True)  # as on the 2-core box, whatever runs this
    return seen


def _quick(conn: UnixHTTPConnection) -> None:
    """As if this connection's answers had come back within 4 ms: the next request may
    poll for 5 ms (the tests decide with this, not with this box's load)."""
    conn.pace.avg = 0.004


def test_quick_answers_are_polled_for_and_arrive_whole(
    server: _Server, spins: list[tuple[float, int]]
) -> None:
    conn = UnixHTTPConnection(server.path, 5.0, spin_us=5000)
    first = conn.request("GET", "/a")
    assert first == (200, {"content-type": "text/plain", "content-length": "2"}, bytearray(b"ok"))
    assert len(spins) == 1  # nothing known of this server yet: a poll of spin_us at most
    assert spins[0][0] == pytest.approx(0.005, abs=0.001)
    assert 0 < conn.pace.avg <= CAP_S  # the wait is measured and capped
    for _ in range(20):
        _quick(conn)
        assert conn.request("GET", "/a")[2] == b"ok"
    assert len(spins) == 21
    assert all(b == pytest.approx(0.005, abs=0.001) for b, _ in spins)
    assert any(got for _, got in spins)  # caught while polling, not asleep
    assert conn.sock is not None and conn.sock.gettimeout() == 5.0  # restored
    # the budget follows the average (agent/serving/pace.py): 1.5x + 30 us, at most spin_s
    for wait, budget in ((0.0001, 0.00018), (0.002, 0.00303), (0.0049, 0.005), (0.0051, 0.0)):
        conn.pace.avg = wait
        assert conn.pace.budget(conn.spin_s) == pytest.approx(budget)


def test_slow_answers_are_slept_for(server: _Server, spins: list[tuple[float, int]]) -> None:
    server.delay = 0.03  # a model that runs for 30 ms
    conn = UnixHTTPConnection(server.path, 5.0, spin_us=5000)
    for _ in range(4):
        assert conn.request("GET", "/a")[2] == b"ok"
    assert conn.pace.avg > C.MAX_SPIN_S  # measured: over the poll's bound
    assert len(spins) == 1  # the first request's only: then it sleeps
    server.delay = 0.0  # it speeds up: the next quick answers bring the average down
    slow = conn.pace.avg
    for _ in range(5):
        conn.request("GET", "/a")
    assert conn.pace.avg < slow


def test_no_poll_when_another_request_is_in_flight_or_when_off(
    server: _Server, spins: list[tuple[float, int]]
) -> None:
    shared = InFlight()
    conn = UnixHTTPConnection(server.path, 5.0, spin_us=5000, in_flight=shared)
    for _ in range(5):
        _quick(conn)
        conn.request("GET", "/a")
    assert len(spins) == 5
    shared.enter()  # another thread of the same client is waiting for its answer
    try:
        for _ in range(5):
            _quick(conn)
            assert conn.request("GET", "/a")[2] == b"ok"
    finally:
        shared.leave()
    assert len(spins) == 5
    assert shared.n == 0
    off = UnixHTTPConnection(server.path, 5.0)  # spin_us=0: the connection's default
    for _ in range(5):
        _quick(off)
        off.request("GET", "/a")
    assert len(spins) == 5
    off.close()
    conn.close()


def test_one_cpu_never_polls(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    assert UnixHTTPConnection(server.path, spin_us=60_000_000).spin_s in (0, C.MAX_SPIN_S)
    monkeypatch.setattr(C, "SPIN_CPUS", False)
    conn = UnixHTTPConnection(server.path, 5.0, spin_us=5000)
    assert conn.spin_s == 0
    conn.request("GET", "/a")
    assert conn.spin_s == 0 and conn._fill == 0


def test_a_client_polls_by_default_and_shares_one_count(
    server: _Server, spins: list[tuple[float, int]]
) -> None:
    c = Client(server.path)
    assert c.spin_us == DEFAULT_SPIN_US > 0
    results: list[Any] = []

    def call() -> None:
        results.append(c.request("GET", "/a")[0])

    ts = [threading.Thread(target=call) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [200] * 4
    assert c._in_flight.n == 0  # every thread's connection counted in and out
    assert c._conn().in_flight is c._in_flight


def test_clients_of_one_process_share_the_count(
    server: _Server, spins: list[tuple[float, int]]
) -> None:
    """A program with one Client per thread: while one client's request is in flight,
    another client's request sleeps instead of polling beside it."""
    a, b = Client(server.path), Client(server.path)
    assert a._in_flight is b._in_flight is IN_FLIGHT
    conn = b._conn()
    conn.pace.avg = 0.0001  # quick answers, within the client's 500 us
    b.request("GET", "/a")
    assert len(spins) == 1  # alone: polled
    IN_FLIGHT.enter()  # a's request, in flight in another thread
    try:
        conn.pace.avg = 0.0001
        assert b.request("GET", "/a")[0] == 200
    finally:
        IN_FLIGHT.leave()
    assert len(spins) == 1  # not beside a's


def test_a_forked_child_starts_with_nothing_in_flight() -> None:
    IN_FLIGHT.enter()  # a request of another thread, in flight when the process forks
    try:
        pid = os.fork()
        if pid == 0:  # the child: its parent's thread is not there to count it out
            os._exit(0 if IN_FLIGHT.n == 0 else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        IN_FLIGHT.leave()
    assert os.waitstatus_to_exitcode(status) == 0
    assert IN_FLIGHT.n == 0


def test_the_server_hanging_up_while_polled_is_reported(
    server: _Server, spins: list[tuple[float, int]]
) -> None:
    conn = UnixHTTPConnection(server.path, 5.0, spin_us=5000)
    for _ in range(3):
        conn.request("GET", "/a")
    server.close_after = 0  # every new connection: hung up before an answer
    conn.close()
    with pytest.raises(StaleConnectionError):
        conn.request("GET", "/a")  # a fresh connection hung up on
    conn.close()
    server.close_after = 3
    for _ in range(3):
        conn.request("GET", "/a")
    _quick(conn)  # the 4th request polls, and the server hangs up instead of answering
    with pytest.raises(StaleConnectionError):
        conn.request("GET", "/a")
    assert spins and spins[-1][1] == 0


def test_a_timeout_still_applies_after_a_poll_found_nothing(
    server: _Server, spins: list[tuple[float, int]]
) -> None:
    conn = UnixHTTPConnection(server.path, 0.3, spin_us=5000)
    conn.request("GET", "/a")
    server.delay = 1.0
    _quick(conn)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.request("GET", "/a")
    assert time.monotonic() - t0 < 0.9
    assert spins and spins[-1][1] == 0


@pytest.mark.parametrize("size", [0, 1, 65536 - 200, 65536, 300_000])
def test_bodies_of_every_size_and_pipelined_answers(server: _Server, size: int) -> None:
    server.body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    conn = UnixHTTPConnection(server.path, 5.0, spin_us=5000)
    for _ in range(3):
        status, _, body = conn.request("GET", "/a")
        assert status == 200 and body == server.body
    # three requests written at once: the answers come back to back and are split
    req = b"GET /p HTTP/1.1\r\nhost: x\r\n\r\n"
    conn.send(req * 3)
    for _ in range(3):
        assert conn.read_response()[2] == server.body
    assert conn._fill == 0


def test_a_head_bigger_than_the_buffer_is_read_and_the_buffer_shrinks_back(
    server: _Server,
) -> None:
    server.extra_headers = b"x-pad: " + b"p" * 100_000 + b"\r\n"
    conn = UnixHTTPConnection(server.path, 5.0)
    status, headers, body = conn.request("GET", "/a")
    assert status == 200 and body == b"ok" and len(headers["x-pad"]) == 100_000
    assert len(conn._buf) == C.READ_CHUNK
    server.extra_headers = b"x-pad: " + b"p" * (C.MAX_RESPONSE_HEAD + 10) + b"\r\n"
    with pytest.raises(ConnectionError, match="too large"):
        conn.request("GET", "/a")


@pytest.mark.parametrize("sizes", [(1, 5000, 3), (0, 40_000, 10), (3, 3, 70_000), (100, 1, 1)])
def test_pipelined_answers_of_different_sizes_come_apart_intact(
    server: _Server, sizes: tuple[int, ...]
) -> None:
    """A short answer followed by a longer one in the same read: the rest moves to the
    front of the buffer over itself; every body must come out byte for byte."""
    conn = UnixHTTPConnection(server.path, 5.0)
    conn.send(
        b"".join(b"GET /n/%d/%d HTTP/1.1\r\nhost: x\r\n\r\n" % (n, i) for i, n in enumerate(sizes))
    )
    for i, n in enumerate(sizes):
        status, _, body = conn.read_response()
        assert status == 200 and body == bytes((i + k * 7) % 251 for k in range(n))
    assert conn._fill == 0
    assert conn.request("GET", "/n/5/9")[2] == bytes((9 + k * 7) % 251 for k in range(5))
