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
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from agent.serving.h1 import BoundedCache

__all__ = ["StaleConnectionError", "UnixHTTPConnection"]

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


class UnixHTTPConnection:
    """One kept-alive HTTP/1.1 connection to ``socket_path`` (opened on first use).

    ``timeout``: seconds for connect and for each read (None: wait forever)."""

    def __init__(self, socket_path: str, timeout: float | None = None) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.reused = False  # True once a response came back on this socket
        self._buf = bytearray()

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
        self._buf.clear()

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
        # On a send error either the server answered early and closed (413 for a body
        # over its limit: the answer is readable) or it had closed this idle connection
        # (nothing to read: StaleConnectionError, the caller may reconnect).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            _send_all(sock, [request_head, *parts])
        return self.read_response()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Raw bytes on the connection (a request written by hand, pipelined ones)."""
        self.connect().sendall(data)

    def read_response(self) -> Reply:
        """The next response on the connection → (status, headers, body)."""
        sock = self.connect()
        buf = self._buf
        got_any = bool(buf)
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if not got_any:
                    raise StaleConnectionError("closed before a response")
                raise ConnectionResetError("the server closed the connection mid-response")
            got_any = True
            buf += chunk
            if len(buf) > 1 << 20:
                raise ConnectionError("response headers too large")
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
        have = len(buf) - start
        if have >= length:
            body = buf[start : start + length]
            del buf[: start + length]
        else:
            body = bytearray(length)
            body[:have] = buf[start:]
            buf.clear()
            view = memoryview(body)
            pos = have
            while pos < length:
                n = sock.recv_into(view[pos:])
                if n == 0:
                    raise ConnectionResetError("the server closed the connection mid-response")
                pos += n
        if status == 100:
            return self.read_response()
        if rh.get("connection", "").lower() == "close":
            self.close()
        else:
            self.reused = True
        return status, rh, body


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
