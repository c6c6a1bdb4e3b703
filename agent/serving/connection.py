"""The one HTTP/1.1 client connection over a Unix socket: ``agent.client`` (inference),
the CLI (the control socket) and the tests (requests written by hand, pipelining,
malformed bytes) all use :class:`UnixHTTPConnection`.

Not ``http.client``: its response parsing (``email.parser``) costs more than the whole
server side of a tiny-model request. Requests go out with one ``sendmsg`` (the head and
tensor buffers without joining them); response bodies are read with ``recv_into``
straight into one ``bytearray`` (arrays decoded from it are writable and not copied
again). Only what Edgeward's servers answer needs handling: responses always carry
``Content-Length`` (agent/serving/h1.py). No numpy here: the CLI's control commands
import this without the tensor codec.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from agent.serving.h1 import BoundedCache
from agent.serving.pace import CAP_S, Pace

__all__ = ["InFlight", "StaleConnectionError", "UnixHTTPConnection"]

Reply = tuple[int, dict[str, str], bytearray]  # status, lower-case headers, body


class StaleConnectionError(ConnectionError):
    """The server closed a kept-alive connection before answering anything."""


# Bytes a request may have in flight (SO_SNDBUF; the kernel caps it at
# net.core.wmem_max): a 224x224x3 float32 tensor (600 KB) goes out in one write
# instead of three rounds of writing, sleeping and being woken by the reader.
SEND_BUFFER = 1 << 20

# A program calling one model sends and gets back the same heads over and over: they
# are built and parsed once.
_request_heads: BoundedCache[tuple[Any, ...], bytes] = BoundedCache(256)
_response_heads: BoundedCache[bytes, tuple[int, dict[str, str]]] = BoundedCache(256)

READ_CHUNK = 1 << 16  # the read buffer: a head and a small body in one recv
MAX_RESPONSE_HEAD = 1 << 20
MAX_SPIN_S = CAP_S / 2  # a longer poll could never be ruled out by the average (pace.py)
SPIN_CPUS = (os.cpu_count() or 1) > 1  # on one CPU a poll only delays the server


class UnixHTTPConnection:
    """One kept-alive HTTP/1.1 connection to ``socket_path`` (opened on first use).

    ``timeout``: seconds for connect and for each read (None: wait forever).
    ``spin_us``: how long a request may poll for its answer instead of sleeping (see
    "Waiting for an answer" below); 0 never polls."""

    def __init__(
        self,
        socket_path: str,
        timeout: float | None = None,
        *,
        spin_us: int = 0,
        in_flight: InFlight | None = None,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.reused = False  # True once a response came back on this socket
        self._buf = bytearray(READ_CHUNK)  # bytes read and not yet consumed: _buf[:_fill]
        self._view = memoryview(self._buf)
        self._fill = 0
        self.spin_s = min(spin_us / 1e6, MAX_SPIN_S) if SPIN_CPUS else 0.0
        self.in_flight = in_flight if in_flight is not None else InFlight()
        self.pace = Pace()  # seconds from a request out to its answer in

    def connect(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reused = False
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._fill = 0

    def __enter__(self) -> UnixHTTPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: Sequence[Any] | bytes | bytearray | memoryview | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One request → (status, headers, body). ``body``: one buffer or several (sent
        without joining). ``Host`` and ``Content-Length`` are added here."""
        parts: list[Any]
        if body is None:
            parts = []
        elif isinstance(body, (bytes, bytearray, memoryview)):
            parts = [body]
        else:
            parts = list(body)
        sock = self.connect()
        length = 0
        for p in parts:
            length += memoryview(p).nbytes
        hdrs = headers or {}
        key = (method, path, tuple(hdrs.items()), length)
        request_head = _request_heads.get(key)
        if request_head is None:
            head = [f"{method} {path} HTTP/1.1\r\nhost: localhost\r\n"]
            for k, v in hdrs.items():
                head.append(f"{k}: {v}\r\n")
            if length or method in ("POST", "PUT"):
                head.append(f"content-length: {length}\r\n")
            head.append("\r\n")
            request_head = _request_heads.remember(key, "".join(head).encode("latin-1"))
        flight = self.in_flight
        flight.enter()
        try:
            # On a send error either the server answered early and closed (413 for a
            # body over its limit: the answer is readable) or it had closed this idle
            # connection (nothing to read: StaleConnectionError, the caller may
            # reconnect).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                _send_all(sock, [request_head, *parts])
            sent = time.perf_counter()
            if self.spin_s and not self._fill and flight.alone():
                budget = self.pace.budget(self.spin_s)
                if budget > 0:
                    self._spin(sock, sent + budget)
            reply = self.read_response()
        finally:
            flight.leave()
        self.pace.note(time.perf_counter() - sent)
        return reply

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Raw bytes on the connection (a request written by hand, pipelined ones)."""
        self.connect().sendall(data)

    # --- Waiting for an answer ----------------------------------------------------
    #
    # A thread that sleeps in ``recv`` is woken by the server's answer; on a virtual
    # machine an idle vCPU halts, waking it costs ~40-70 us, and the code that runs
    # next starts with cold caches and branch predictors (a JSON tensor decode then
    # takes ~20 % longer, measured here). So, as the worker polls a lent connection for
    # the next request, a request polls the socket for its answer, as long as
    # agent/serving/pace.py allows from this connection's waits (1.5x the usual wait
    # + 30 us, at most ``spin_s``; the first request polls for ``spin_s``). A
    # connection whose usual wait is longer than ``spin_s`` (a model that runs for
    # milliseconds) sleeps as before, and so does a request while another of the same
    # process is in flight (``InFlight``: several threads polling would take the cores
    # the server needs), and every request on a one-CPU machine.

    def _spin(self, sock: socket.socket, deadline: float) -> None:
        """Poll until the answer's first bytes are in the buffer or ``deadline``."""
        now = time.perf_counter
        recv_into, view = sock.recv_into, self._view
        sock.settimeout(0)
        try:
            while True:
                try:
                    self._fill = recv_into(view)
                    return  # bytes, or 0 at EOF: read_response reports it
                except (BlockingIOError, InterruptedError):
                    if now() >= deadline:
                        return
                except OSError:  # a reset or the like: read_response reports it
                    return
        finally:
            sock.settimeout(self.timeout)

    def read_response(self) -> Reply:
        """The next response on the connection → (status, headers, body)."""
        sock = self.connect()
        got_any = self._fill > 0
        end = self._buf.find(b"\r\n\r\n", 0, self._fill)
        while end < 0:
            if self._fill == len(self._buf):
                if self._fill >= MAX_RESPONSE_HEAD:
                    raise ConnectionError("response headers too large")
                self._view.release()  # a bytearray with a view cannot grow
                self._buf.extend(bytes(len(self._buf)))  # room for a big head
                self._view = memoryview(self._buf)
            start = max(self._fill - 3, 0)
            try:
                n = sock.recv_into(self._view[self._fill :])
            except ConnectionResetError:
                n = 0
            if not n:
                if not got_any:
                    raise StaleConnectionError("closed before a response")
                raise ConnectionResetError("the server closed the connection mid-response")
            got_any = True
            self._fill += n
            end = self._buf.find(b"\r\n\r\n", start, self._fill)
        buf = self._buf
        raw_head = bytes(buf[:end])
        parsed = _response_heads.get(raw_head)
        if parsed is None:
            lines = raw_head.decode("latin-1").split("\r\n")
            parsed = (int(lines[0].split(" ", 2)[1]), {})
            for line in lines[1:]:
                k, _, v = line.partition(":")
                parsed[1][k.strip().lower()] = v.strip()
            _response_heads.remember(raw_head, parsed)
        status, rh = parsed[0], dict(parsed[1])
        length = int(rh.get("content-length", "0"))
        start = end + 4
        have = self._fill - start
        if have >= length:
            body = buf[start : start + length]
            rest = have - length
            if rest:  # a pipelined answer's first bytes: to the front (a copy first:
                # the two ranges may overlap, and a slice assignment is a memcpy)
                buf[:rest] = bytes(self._view[start + length : self._fill])
            self._fill = rest
        else:
            # One copy: what came with the head, then the rest straight from the socket.
            body = bytearray(length)
            body[:have] = self._view[start : self._fill]
            self._fill = 0
            view = memoryview(body)
            pos = have
            while pos < length:
                n = sock.recv_into(view[pos:])
                if n == 0:
                    raise ConnectionResetError("the server closed the connection mid-response")
                pos += n
        if len(buf) > READ_CHUNK and not self._fill:  # a big head passed: shrink back
            self._view.release()
            del buf[READ_CHUNK:]
            self._view = memoryview(buf)
        if status == 100:
            return self.read_response()
        if rh.get("connection", "").lower() == "close":
            self.close()
        else:
            self.reused = True
        return status, rh, body


class InFlight:
    """Requests in flight on a set of connections: a request polls for its answer only
    when it is the only one (see "Waiting for an answer" above). Every ``Client`` of a
    process shares ``IN_FLIGHT``: a program with one client per thread must not poll
    from several threads at once either."""

    __slots__ = ("_lock", "n")

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        """A forked child starts with no request in flight (its parent's threads are
        not there to count theirs out)."""
        self.n = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.n += 1

    def leave(self) -> None:
        with self._lock:
            self.n -= 1

    def alone(self) -> bool:
        return self.n == 1


def _send_all(sock: socket.socket, parts: list[Any]) -> None:
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        sent = sock.sendmsg(views[:64])
        while sent:
            first = views[0]
            if sent >= first.nbytes:
                sent -= first.nbytes
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0


IN_FLIGHT = InFlight()  # the process's: shared by every agent.client.Client
os.register_at_fork(after_in_child=IN_FLIGHT.reset)
