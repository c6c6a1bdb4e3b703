"""agent.serving.http over real Unix sockets: keep-alive, limits, malformed and hostile
clients, socket file permissions, stale/live sockets, drain on close."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.serving.http import HTTPLimits, Request, Response, SocketInUseError, UnixHTTPServer
from tests.test_kserve import ServerThread, body_of, raw, status_of

LIMITS = HTTPLimits(
    max_body_bytes=4 * 1024 * 1024,
    max_header_bytes=2048,
    max_headers=20,
    header_timeout_s=0.4,
    body_timeout_s=0.4,
    keepalive_timeout_s=30.0,
    max_connections=16,
)


class Echo:
    """Answers with what it saw; ``/slow`` waits for ``release`` (set from the test)."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    async def __call__(self, req: Request) -> Response:
        self.seen.append(req)
        if req.path == "/slow":
            self.entered.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        if req.path == "/boom":
            raise RuntimeError("bug")
        doc = {
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "len": len(req.body),
            "sum": sum(req.body[:1000]),
            "peer": None if req.peer_cred is None else req.peer_cred.pid,
        }
        return Response(200, {"content-type": "application/json"}, json.dumps(doc).encode())


@pytest.fixture
def echo_srv(tmp_path: Path) -> Iterator[tuple[ServerThread, Echo]]:
    echo = Echo()
    srv = ServerThread(tmp_path / "h.sock", echo, limits=LIMITS)
    yield srv, echo
    echo.release.set()
    srv.close()


def _conn(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def _read_response(s: socket.socket, buf: bytearray) -> bytes:
    """Read one full response from ``s`` (leftover bytes stay in ``buf``)."""
    while True:
        head, sep, rest = bytes(buf).partition(b"\r\n\r\n")
        if sep:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.lower() == b"content-length":
                    length = int(v)
            if len(rest) >= length:
                total = len(head) + 4 + length
                out = bytes(buf[:total])
                del buf[:total]
                return out
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed with {bytes(buf)!r}")
        buf += chunk


def _alive(srv: ServerThread) -> None:
    resp = raw(srv.path, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(resp) == 200


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return True


def test_keep_alive_and_pipelining(echo_srv: tuple[ServerThread, Echo]) -> None:
    srv, echo = echo_srv
    s = _conn(srv.path)
    buf = bytearray()
    for i in range(3):
        s.sendall(b"POST /a?q=%d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" % i)
        r = _read_response(s, buf)
        assert status_of(r) == 200 and b"connection: keep-alive" in r
        assert body_of(r)["query"] == f"q={i}" and body_of(r)["len"] == 3
    # two pipelined requests in one write, then a third split across writes
    s.sendall(b"GET /p1 HTTP/1.1\r\n\r\nGET /p%202 HTTP/1.1\r\n\r\nGET /p3 HT")
    assert body_of(_read_response(s, buf))["path"] == "/p1"
    assert body_of(_read_response(s, buf))["path"] == "/p 2"
    s.sendall(b"TP/1.1\r\nConnection: close\r\n\r\n")
    r = _read_response(s, buf)
    assert body_of(r)["path"] == "/p3" and b"connection: close" in r
    assert _closed(s)
    assert all(req.peer_cred is not None and req.peer_cred.pid == os.getpid() for req in echo.seen)
    s.close()


def test_large_body_and_expect_continue(echo_srv: tuple[ServerThread, Echo]) -> None:
    srv, _ = echo_srv
    body = bytes(range(256)) * 8192  # 2 MiB: read straight into its own buffer
    s = _conn(srv.path)
    s.sendall(
        b"POST /big HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf += s.recv(100)
    assert bytes(buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    del buf[: len(b"HTTP/1.1 100 Continue\r\n\r\n")]
    s.sendall(body)
    doc = body_of(_read_response(s, buf))
    assert doc["len"] == len(body) and doc["sum"] == sum(body[:1000])
    s.close()


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad-request-line"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "http-version"),
        (b"get / HTTP/1.1\r\n\r\n", 400, "bad-request-line"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, "bad-header"),
        (b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", 400, "bad-header"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "bad-content-length"),
        (b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400, "bad-content-length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
         "bad-content-length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400,
         "bad-content-length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
         "transfer-encoding"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n", 400, "bad-chunk"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n", 400,
         "bad-chunk"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n500000\r\n", 413,
         "payload-too-large"),
        (b"POST / HTTP/1.1\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx", 415,
         "unsupported-encoding"),
        (b"POST / HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", 400,
         "bad-encoding"),
        (b"POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413, "payload-too-large"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 30 + b"\r\n", 431, "too-many-headers"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431, "headers-too-large"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000, 431, "headers-too-large"),
    ],
)  # fmt: skip
def test_malformed_requests_get_json_4xx(
    echo_srv: tuple[ServerThread, Echo], data: bytes, status: int, code: str
) -> None:
    srv, echo = echo_srv
    s = _conn(srv.path)
    s.sendall(data)
    buf = bytearray()
    r = _read_response(s, buf)
    assert status_of(r) == status, r
    doc = body_of(r)
    assert doc["code"] == code and doc["error"]
    assert b"connection: close" in r and _closed(s)
    s.close()
    assert not echo.seen  # the handler never saw the bad request
    _alive(srv)


def test_handler_exception_is_500_and_connection_survives(
    echo_srv: tuple[ServerThread, Echo],
) -> None:
    srv, _ = echo_srv
    s = _conn(srv.path)
    buf = bytearray()
    s.sendall(b"GET /boom HTTP/1.1\r\n\r\n")
    r = _read_response(s, buf)
    assert status_of(r) == 500 and body_of(r)["code"] == "internal"
    s.sendall(b"GET /after HTTP/1.1\r\n\r\n")
    assert body_of(_read_response(s, buf))["path"] == "/after"
    s.close()


def test_slow_headers_get_408_then_close(echo_srv: tuple[ServerThread, Echo]) -> None:
    srv, echo = echo_srv
    s = _conn(srv.path)
    s.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")  # ... and never finishes (slowloris)
    r = _read_response(s, bytearray())
    assert status_of(r) == 408 and body_of(r)["code"] == "header-timeout"
    assert _closed(s)
    s.close()
    assert not echo.seen
    _alive(srv)


def test_lying_content_length(echo_srv: tuple[ServerThread, Echo]) -> None:
    srv, echo = echo_srv
    # shorter body than declared: the server waits, then 408 and close
    s = _conn(srv.path)
    s.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly-this")
    r = _read_response(s, bytearray())
    assert status_of(r) == 408 and body_of(r)["code"] == "body-timeout"
    assert _closed(s)
    s.close()
    assert not echo.seen
    # longer: the next request's bytes are swallowed as body; what is left is garbage
    s = _conn(srv.path)
    s.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabcGET /y HTTP/1.1\r\n\r\n")
    buf = bytearray()
    first = body_of(_read_response(s, buf))
    assert first["path"] == "/x" and first["len"] == 10
    r = _read_response(s, buf)
    assert status_of(r) == 400 and body_of(r)["code"] == "bad-request-line"
    assert _closed(s)
    s.close()
    _alive(srv)


def test_max_connections_and_no_leak(tmp_path: Path) -> None:
    """Slots held by requests in progress are never taken away: past the cap a new
    connection is refused with 503; idle ones make room (the oldest is closed)."""
    limits = HTTPLimits(max_connections=16, header_timeout_s=60.0)
    srv = ServerThread(tmp_path / "c.sock", Echo(), limits=limits)
    try:
        cap = limits.pid_cap  # all connections below come from this one process
        busy = [_conn(srv.path) for _ in range(cap)]
        for s in busy:  # a request line without its end: the slot is in use
            s.sendall(b"GET /x HTTP/1.1\r\n")
        for _ in range(500):  # until the server has read every one of them
            if sum(not c.idle for c in list(srv.server._conns)) == cap:
                break
            time.sleep(0.01)
        extra = _conn(srv.path)
        r = _read_response(extra, bytearray())
        assert status_of(r) == 503 and body_of(r)["code"] == "too-many-connections"
        extra.close()
        for s in busy:
            s.close()
        idle = [_conn(srv.path) for _ in range(cap)]
        for _ in range(500):
            if srv.server.connections == cap:
                break
            time.sleep(0.01)
        newest = _conn(srv.path)
        assert _closed(idle[0])  # the oldest idle connection made room
        newest.sendall(b"GET /ok HTTP/1.1\r\n\r\n")
        assert status_of(_read_response(newest, bytearray())) == 200
        for s in [*idle, newest]:
            s.close()
        for _ in range(500):
            if srv.server.connections == 0:
                break
            time.sleep(0.01)
        assert srv.server.connections == 0
        _alive(srv)
    finally:
        srv.close()


def test_socket_mode_group_and_atomic_bind(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgroups()[-1] if os.getgroups() else os.getgid()).gr_name
    candidates = [g.gr_name for g in grp.getgrall() if g.gr_name in ("daemon", "users", "nogroup")]
    if os.geteuid() == 0 and candidates:
        group = candidates[0]
    path = tmp_path / "m.sock"
    srv = ServerThread(path, Echo(), limits=LIMITS, mode=0o660, group=group)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam(group).gr_gid
        assert [p.name for p in tmp_path.iterdir()] == ["m.sock"]  # no temp name left
        _alive(srv)
    finally:
        srv.close()
    assert not path.exists()  # removed on close


def test_unknown_group_is_config_error(tmp_path: Path) -> None:
    srv = UnixHTTPServer(tmp_path / "g.sock", Echo(), group="no-such-group-xyz")
    with pytest.raises(ConfigError, match="no-such-group-xyz"):
        asyncio.run(srv.start())
    assert not (tmp_path / "g.sock").exists()


def test_stale_socket_replaced_live_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # file left behind by a "killed daemon"
    srv = ServerThread(path, Echo(), limits=LIMITS)
    try:
        _alive(srv)
        other = UnixHTTPServer(path, Echo())
        with pytest.raises(SocketInUseError, match="already serving"):
            asyncio.run(other.start())
        _alive(srv)  # the live server's socket is untouched
    finally:
        srv.close()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        asyncio.run(UnixHTTPServer(path, Echo()).start())
    assert path.read_text() == "not a socket"


def test_close_drains_in_flight_and_closes_idle(tmp_path: Path) -> None:
    echo = Echo()
    srv = ServerThread(tmp_path / "d.sock", echo, limits=LIMITS)
    idle = _conn(srv.path)
    busy = _conn(srv.path)
    busy.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
    assert echo.entered.wait(5)
    result: dict[str, Any] = {}

    def closer() -> None:
        srv.call(srv.server.close(10.0))
        result["closed"] = True

    t = threading.Thread(target=closer)
    t.start()
    assert _closed(idle)  # idle keep-alive connection closed at once
    time.sleep(0.1)
    assert "closed" not in result  # still draining
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        _conn(srv.path)  # no longer accepting
    echo.release.set()
    r = _read_response(busy, bytearray())
    assert status_of(r) == 200 and b"connection: close" in r
    t.join(10)
    assert result.get("closed")
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    srv.thread.join(5)
    srv.loop.close()
    idle.close()
    busy.close()


def test_limits_validated() -> None:
    with pytest.raises(ConfigError, match="max_body_bytes"):
        HTTPLimits(max_body_bytes=0)
    with pytest.raises(ConfigError, match="header_timeout_s"):
        HTTPLimits(header_timeout_s=-1)


def test_http10_and_flood_of_bad_requests_leaves_nothing(
    echo_srv: tuple[ServerThread, Echo],
) -> None:
    srv, echo = echo_srv
    r = raw(srv.path, b"GET /old HTTP/1.0\r\n\r\n")
    assert status_of(r) == 200 and b"connection: close" in r
    s = _conn(srv.path)
    buf = bytearray()
    for _ in range(2):
        s.sendall(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert b"connection: keep-alive" in _read_response(s, buf)
    s.close()
    bad = [
        b"\x00\x01\x02\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 3000,
    ]
    for i in range(200):
        # the server may close before the client finished sending
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            raw(srv.path, bad[i % len(bad)], timeout=5)
    for _ in range(500):
        if srv.server.connections == 0 and not srv.server._inflight:
            break
        time.sleep(0.01)
    assert srv.server.connections == 0 and not srv.server._inflight
    assert not any(req.path == "/x" for req in echo.seen)
    _alive(srv)
