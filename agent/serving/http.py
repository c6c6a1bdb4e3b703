"""A small, fast HTTP/1.1 server on a Unix socket (inference and control sockets).

Why not an off-the-shelf server: the daemon must stay small (idle RSS ≤ 60 MB), add
tens of microseconds at most per request, and defend itself against local clients that
misbehave (slowloris, header floods, lying ``Content-Length``) without new
dependencies. The subset of HTTP/1.1 it speaks is what KServe v2 clients and curl use:

* keep-alive connections, one request at a time per connection (pipelined requests
  are read after the previous response is written — reading pauses while a request is
  handled, which is also the back-pressure);
* request bodies with ``Content-Length`` or chunked, plain or gzip/deflate
  ``Content-Encoding`` (decoded by ``agent/serving/httpbody.py``, within ``max_body_bytes``);
* ``HEAD`` wherever the handler answers ``GET`` (the headers, no body);
* ``Expect: 100-continue`` (curl sends it for large bodies).

The protocol is an ``asyncio.BufferedProtocol``: headers are read into a per-connection
scratch buffer, and a body that does not fit there is read by the kernel straight into
its own ``bytearray`` (:class:`BodyBuffer`) — ``numpy.frombuffer`` on it is writable.
That buffer grows with the bytes that arrived, never to the declared ``Content-Length``
up front, and every growth is charged to one :class:`BodyBudget` per server
(``max_inflight_body_bytes``): a client that declares 64 MiB and sends nothing costs
nothing, and over the budget a request gets 503 ``body-budget`` with ``Retry-After``.

Connection slots are shared fairly (:meth:`UnixHTTPServer._admit`): one process
(``SO_PEERCRED`` pid) may hold at most ``max_connections_per_pid``, one user (uid)
all but ``reserved_connections``; a peer at its cap, or a full server, closes an idle
connection (the peer's own first, else the busiest uid's) before it refuses.

Every protocol-level failure is answered with a v2-style JSON error
(``{"error": ..., "code": ...}``) and, where the stream can no longer be trusted, the
connection is closed: 400 bad request line/headers/chunks/encoding, 408 header or body
timeout, 413 body over the limit (decoded), 415 unknown content coding, 431 headers too
large or too many, 503 too many connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import mmap
import os
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.errors import ConfigError, SocketInUseError
from agent.limits import HTTPLimits
from agent.serving.h1 import (
    CONTINUE,
    Head,
    PeerCred,
    Phase,
    Request,
    Response,
    content_length,
    error_response,
    expired,
    find_head,
    internal_error,
    json_response,
    parse_head,
    parse_request,
    render_response,
    timeout,
)
from agent.serving.httpbody import (
    CHUNKED,
    Charge,
    ChunkedDecoder,
    ProtocolError,
    decode_content,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BodyBudget",
    "BodyBuffer",
    "HTTPLimits",
    "Lender",
    "LentConnection",
    "PeerCred",
    "ProtocolError",
    "Request",
    "Response",
    "SocketInUseError",
    "TCPHTTPServer",
    "UnixHTTPServer",
    "content_length",
    "json_response",
    "parse_head",
    "render_response",
]

Body = bytes | bytearray | memoryview


class BodyBudget:
    """Bytes of request bodies in memory at once, shared by every connection of a server
    (the daemon's event loop, or a worker's connection threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes
        self.used = 0  # bytes
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Charge ``n`` bytes; False (nothing charged) if that would pass the limit."""
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class BodyBuffer:
    """One request body of declared ``length``, received into memory that follows the
    bytes that arrived: it starts at what is already there (at least ``FIRST``); when
    full it grows to ``STEP`` and then doubles, up to ``length``. Every growth is
    charged to ``budget`` first, the old buffer included until its bytes are copied
    over (what is charged is what is allocated at every moment). A request that only
    declares a length costs ``FIRST`` bytes.
    The finished buffer is exactly ``length`` bytes and writable (``numpy.frombuffer``
    on it gives writable arrays as before): a ``bytearray`` up to ``FIRST``, above it a
    ``memoryview`` of memory that is not zero-filled first (every byte of it is
    received before the body is used). Buffers above ``STEP`` are anonymous
    ``mmap`` regions, not heap blocks: pages are committed as the bytes arrive and go
    back to the kernel when the body is dropped. On the heap, the intermediate sizes of
    every growing body would stay behind as free memory in malloc's arenas (one per
    thread in a worker): measured, 40 streaming connections left a worker at 950 MB
    with a 256 MiB budget.

    The one place a request body is buffered, for the daemon's server and for a worker
    serving a lent connection (agent/serving/direct.py); a body decoder (e.g. chunked
    transfer coding) feeds it through :meth:`window` / :meth:`advance` as well.

    Raises ProtocolError(503, "body-budget") when the budget cannot cover the next
    growth; call :meth:`release` once the body is no longer used (the request answered).
    """

    FIRST = 64 * 1024  # bytes of the first allocation (less when the body is smaller)
    # Bytes of the first growth: a body up to this size (a 224x224x3 float32 image is
    # 600 KB) costs one growth that copies at most FIRST bytes, not a doubling series.
    STEP = 1024 * 1024

    __slots__ = ("_budget", "_charged", "_view", "buf", "filled", "length")

    buf: bytearray | memoryview | mmap.mmap

    def __init__(self, length: int, budget: BodyBudget, prefix: Body = b"") -> None:
        self.length = length
        self._budget = budget
        self._charged = 0
        have = len(prefix)
        self.buf = self._alloc(min(length, max(self.FIRST, have)))
        self._charged = len(self.buf)
        memoryview(self.buf)[:have] = prefix
        self.filled = have
        self._view = memoryview(self.buf)

    def _alloc(self, size: int) -> bytearray | memoryview | mmap.mmap:
        if not self._budget.take(size):
            raise ProtocolError(
                503,
                "body-budget",
                f"request bodies in flight exceed {self._budget.limit} bytes; retry later",
                retry_after=1.0,
            )
        if size <= self.FIRST:
            return bytearray(size)
        if size <= self.STEP:
            # Not zero-filled: every byte is received before the body is read, and
            # bytearray(600 KB) spent ~50 us in memset per image (a worker's CPU
            # profile under 4 clients: 1.1 % of it, next to the model itself).
            return np.empty(size, np.uint8).data
        return mmap.mmap(-1, size)

    @property
    def done(self) -> bool:
        return self.filled >= self.length

    def window(self) -> memoryview:
        """Where the next bytes go (never empty before :attr:`done`); grows the buffer."""
        if self.filled >= len(self.buf) and self.filled < self.length:
            grown = self._alloc(min(self.length, max(2 * len(self.buf), self.STEP)))
            memoryview(grown)[: self.filled] = self._view[: self.filled]
            self._view.release()
            self._budget.give(len(self.buf))  # the old buffer is let go here
            self.buf = grown
            self._charged = len(grown)
            self._view = memoryview(grown)
        return self._view[self.filled : self.length]

    def advance(self, n: int) -> None:
        self.filled += n

    def take(self) -> bytearray | memoryview:
        """The complete body (the buffer itself, or a view of its mapping; no copy)."""
        self._view.release()
        buf = self.buf
        return buf if isinstance(buf, bytearray) else memoryview(buf)

    def release(self) -> None:
        """Give the body's bytes back to the budget (idempotent)."""
        if self._charged:
            self._budget.give(self._charged)
            self._charged = 0


Handler = Callable[[Request], Awaitable[Response]]


class LentConnection(Protocol):
    """What a borrower calls back, on the server's event loop, about a lent connection."""

    def lent_returned(self, data: bytes, here: bool) -> None:
        """The borrower stopped serving; ``data`` = bytes it read and did not answer (the
        start of the next request). ``here``: the borrower does not handle that request
        (another model, another endpoint): it is not lent back to the same borrower."""

    def lent_closed(self) -> None:
        """The borrower answered the last request and the connection is done."""

    def lent_crashed(self, state: int, code: str, message: str, status: int = 503) -> None:
        """The borrower died. ``state``: 0 idle between requests, 1 a request was read
        and not answered (answered here with ``status``), 2 its answer was partly
        written."""


class Lender(Protocol):
    """A process that can serve a connection itself (a model worker, see
    agent/serving/direct.py): the server keeps its own descriptor and stops reading it."""

    def lend(self, fd: int, data: bytes, conn: LentConnection) -> bool:
        """Start serving ``fd`` from ``data`` (the request just read); False: not now."""

    def recall(self) -> None:
        """Give every lent connection back once its request in flight is answered."""


LenderFor = Callable[[str, str, dict[str, str]], "Lender | None"]


_PEERCRED = struct.Struct("3i")
_DISCARD = memoryview(bytearray(4096))  # read into when a closing connection is read

# Connection phases and what their timers mean: agent/serving/h1.py (PHASES).
_IDLE, _HEAD, _BODY, _HANDLING, _CLOSED, _LENT = (
    Phase.IDLE,
    Phase.HEAD,
    Phase.BODY,
    Phase.HANDLING,
    Phase.CLOSED,
    Phase.LENT,
)


class _Conn(asyncio.BufferedProtocol):
    """One client connection: a small state machine over a receive buffer."""

    __slots__ = (
        "_bb",
        "_buf",
        "_chunked",
        "_closing",
        "_deadline",
        "_filled",
        "_keep_alive",
        "_lender",
        "_limits",
        "_loop",
        "_peer",
        "_pending",
        "_phase",
        "_pid",
        "_read_paused",
        "_returned_by",
        "_server",
        "_timeouts",
        "_timer",
        "_tracked",
        "_transport",
        "_uid",
        "_view",
        "_write_paused",
        "_write_ready",
    )

    def __init__(self, server: UnixHTTPServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # Scratch buffer for request heads (and small bodies riding along).
        self._buf = bytearray(max(32 * 1024, self._limits.max_header_bytes + 4))
        self._view = memoryview(self._buf)
        self._filled = 0
        self._phase: Phase = _IDLE
        # Seconds each phase may last (h1.PHASES over this server's limits; None: no timer).
        self._timeouts = server._timeouts
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._read_paused = False
        self._bb: BodyBuffer | None = None  # the body being received (phase _BODY)
        self._chunked: ChunkedDecoder | None = None  # a chunked body being decoded
        self._pending: Head | None = None  # the head whose body is being received
        self._peer: PeerCred | None = None
        self._keep_alive = True
        self._write_paused = False
        self._write_ready: asyncio.Future[None] | None = None
        self._closing = False
        self._lender: Lender | None = None  # who has this connection while _LENT
        # The borrower that gave this request back as not its own: not lent to it again.
        self._returned_by: Lender | None = None
        self._uid = self._pid = -1  # SO_PEERCRED, -1 if unknown
        self._tracked = False  # counted in the server's per-peer tables

    # --- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        srv = self._server
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                pid, uid, gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                )
                self._peer = PeerCred(pid, uid, gid)
                self._uid, self._pid = uid, pid
        if not srv._admit(self):
            self._fail(503, "too-many-connections", "too many connections; retry later")
            return
        if srv._closing:
            self._fail(503, "shutting-down", "the server is shutting down")
            return
        self._enter(_IDLE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _CLOSED
        self._cancel_timer()
        self._server._untrack(self)
        self._server._conn_gone()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        bb, self._bb = self._bb, None
        if bb is not None:  # a body cut short: its bytes go back to the budget
            bb.release()
        dec, self._chunked = self._chunked, None
        if dec is not None:
            dec.release()

    @property
    def idle(self) -> bool:
        """Between requests and held here (not lent): closing it loses nothing."""
        return self._phase == _IDLE and not self._filled

    def evict(self) -> None:
        """Closed to make room for another connection (it was idle)."""
        self._server._untrack(self)
        self._close_after_write()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        bb = self._bb
        if bb is not None and self._phase == _BODY:
            try:
                return bb.window()
            except ProtocolError as exc:  # over the body budget
                self._bb = None
                bb.release()
                self._fail_with(exc)
                return _DISCARD  # asyncio reads into what we return; we are closing
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._phase == _CLOSED:
            return
        if self._phase == _BODY and self._chunked is not None:
            self._filled += nbytes
            self._feed_chunks()
            return
        if self._phase == _BODY:
            bb = self._bb
            if bb is not None:
                bb.advance(nbytes)
                if bb.done:
                    self._body_complete()
            return
        self._filled += nbytes
        if self._phase == _HANDLING:
            # A pipelined request arrived while one is handled: keep it buffered and
            # stop reading only if the scratch buffer is full (back-pressure without
            # an epoll_ctl pair per request).
            if self._filled >= len(self._buf) and self._transport is not None:
                self._transport.pause_reading()
                self._read_paused = True
            return
        if self._phase == _IDLE:
            self._enter(_HEAD)
        try:
            self._try_head(max(0, self._filled - nbytes - 3))
        except Exception:  # a parser bug must cost one connection, not the server
            logger.exception("http: cannot parse a request")
            self._fail(400, "bad-request", "malformed request")

    def eof_received(self) -> bool | None:
        # A half-closed client gets its in-flight response, then the connection closes.
        self._keep_alive = False
        if self._phase in (_IDLE, _HEAD, _BODY) and self._transport is not None:
            self._transport.close()
        return True

    def _feed_chunks(self) -> None:
        """Decode what the scratch buffer holds of a chunked body (agent/serving/httpbody.py)."""
        dec = self._chunked
        assert dec is not None
        try:
            used = dec.feed(self._view[: self._filled])
        except ProtocolError as exc:
            self._chunked = None
            dec.release()
            self._fail_with(exc)
            return
        self._shift(used)
        if dec.done:
            self._chunked = None
            self._dispatch(dec.body, dec)
        elif self._filled >= len(self._buf):  # cannot happen: lines are capped below this
            self._chunked = None
            dec.release()
            self._fail(400, "bad-chunk", "chunk line too long")

    # --- parsing ---------------------------------------------------------------------

    def _try_head(self, search_from: int) -> None:
        if self._phase != _HEAD:
            return
        try:
            end = find_head(self._buf, search_from, self._filled, self._limits)
            if end < 0:
                if self._filled >= len(self._buf):  # cannot happen: the buffer is larger
                    limit = self._limits.max_header_bytes
                    raise ProtocolError(
                        431, "headers-too-large", f"request headers exceed {limit} bytes"
                    )
                return
            if end == 0 and self._buf[:2] == b"\r\n":
                # Tolerate stray CRLF between requests (RFC 9112 §2.2).
                self._shift(2)
                self._try_head(0)
                return
            head = parse_request(self._buf[:end], self._limits)
        except ProtocolError as exc:
            self._fail_with(exc)
            return
        self._keep_alive = self._keep_alive and head.keep_alive
        start = end + 4
        srv = self._server
        if srv.lender_for is not None and not (srv._closing or self._closing):
            lender = srv.lender_for(head.method, head.path, head.headers)
            if lender is not None and lender is not self._returned_by and self._lend(lender):
                self._returned_by = None
                return
        self._returned_by = None
        self._pending = head
        length = head.length
        if length == CHUNKED:
            self._shift(start)
            self._chunked = ChunkedDecoder(
                self._limits.max_body_bytes, self._limits.max_header_bytes, srv._budget
            )
            self._enter(_BODY)
            if head.expect_continue and self._transport is not None:
                self._transport.write(CONTINUE)
            self._feed_chunks()
            return
        have = self._filled - start
        if have >= length:
            # A copy (the scratch buffer is reused), as a bytearray so that arrays
            # decoded from it are writable like those from large bodies.
            body = self._buf[start : start + length]
            self._shift(start + length)
            self._dispatch(body)
            return
        # The body continues beyond the scratch buffer: read it straight into its own
        # buffer, which grows with the bytes received (charged to the body budget).
        try:
            self._bb = BodyBuffer(length, srv._budget, self._view[start : self._filled])
        except ProtocolError as exc:
            self._fail_with(exc)
            return
        self._filled = 0
        self._enter(_BODY)
        if head.expect_continue and self._transport is not None:
            self._transport.write(CONTINUE)

    def _shift(self, n: int) -> None:
        """Drop the first ``n`` bytes of the scratch buffer (keep pipelined bytes)."""
        rest = self._filled - n
        if rest > 0:
            self._buf[:rest] = self._buf[n : self._filled]
        self._filled = max(rest, 0)

    def _body_complete(self) -> None:
        bb = self._bb
        self._bb = None
        assert bb is not None
        self._dispatch(bb.take(), bb)

    # --- lending (agent/serving/direct.py) -------------------------------------------------

    def _lend(self, lender: Lender) -> bool:
        """Hand the connection, from the start of the request just parsed, to ``lender``."""
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None or transport.get_write_buffer_size():
            return False
        transport.pause_reading()
        if not lender.lend(sock.fileno(), bytes(self._buf[: self._filled]), self):
            transport.resume_reading()
            return False
        self._filled = 0
        self._phase = _LENT
        self._lender = lender
        self._cancel_timer()
        return True

    def lent_returned(self, data: bytes, here: bool) -> None:
        if self._phase != _LENT or self._transport is None:
            return
        lender, self._lender = self._lender, None
        if self._closing or self._server._closing:
            self._close_after_write()
            return
        if len(data) > len(self._buf):  # the borrower read further than we would have
            self._buf = bytearray(len(data))
            self._view = memoryview(self._buf)
        self._buf[: len(data)] = data
        self._filled = len(data)
        self._returned_by = lender if here else None
        self._enter(_IDLE)
        self._transport.resume_reading()
        if self._filled:
            self._enter(_HEAD)
            self._try_head(0)

    def lent_closed(self) -> None:
        if self._phase == _LENT:
            self._lender = None
            self._close_after_write()

    def lent_crashed(self, state: int, code: str, message: str, status: int = 503) -> None:
        if self._phase != _LENT or self._transport is None:
            return
        self._lender = None
        if state == 0:
            self.lent_returned(b"", False)
        elif state == 1:  # the request was read and not answered: say so, as for others
            self._phase = _HANDLING
            self._write(error_response(ProtocolError(status, code, message)), False)
            self._close_after_write()
        else:  # half an answer is on the wire: only closing tells the client
            self._phase = _CLOSED
            self._transport.abort()

    def _dispatch(self, body: Body, bb: BodyBuffer | ChunkedDecoder | None = None) -> None:
        assert self._pending is not None and self._transport is not None
        head, self._pending = self._pending, None
        headers = head.headers
        charge: Charge | None = None
        if "content-encoding" in headers:
            # The decoded body is charged to the budget, like the bytes received.
            charge = Charge(self._server._budget)
            try:
                body = decode_content(headers, body, self._limits.max_body_bytes, charge)
            except ProtocolError as exc:
                charge.release()
                if bb is not None:
                    bb.release()
                self._fail_with(exc)
                return
        self._phase = _HANDLING  # the timer, if it fires now, does nothing
        req = Request(head.method, head.path, head.query, headers, body, self._peer, head.version)
        task = self._loop.create_task(self._run(req, bb, charge))
        self._server._inflight.add(task)
        task.add_done_callback(self._server._inflight.discard)

    async def _run(
        self,
        req: Request,
        bb: BodyBuffer | ChunkedDecoder | None = None,
        charge: Charge | None = None,
    ) -> None:
        try:
            resp = await self._server.handler(req)
        except Exception:
            logger.exception("handler failed for %s %s", req.method, req.path)
            resp = internal_error()
        finally:
            if bb is not None:  # answered: the body's bytes go back to the budget
                bb.release()
            if charge is not None:
                charge.release()
        if self._phase == _CLOSED or self._transport is None:
            return
        keep = self._keep_alive and not self._server._closing and not self._closing
        self._write(resp, keep, req.method == "HEAD")
        if not keep:
            self._close_after_write()
            return
        if self._write_paused:
            self._write_ready = self._loop.create_future()
            await self._write_ready
            self._write_ready = None
            if self._phase == _CLOSED:
                return
        self._enter(_IDLE)
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        if self._filled:  # a pipelined request is already buffered
            self._enter(_HEAD)
            self._try_head(0)

    # --- writing, timers, failure ----------------------------------------------------

    def _write(self, resp: Response, keep_alive: bool, head: bool = False) -> None:
        assert self._transport is not None
        for part in render_response(resp, keep_alive, head):
            self._transport.write(part)

    def _close_after_write(self) -> None:
        self._phase = _CLOSED
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()  # flushes the write buffer first

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer a protocol error and close: the byte stream can no longer be trusted."""
        self._fail_with(ProtocolError(status, code, message))

    def _fail_with(self, exc: ProtocolError) -> None:
        logger.debug("http %d (%s): %s", exc.status, exc.code, exc.message)
        if self._transport is None or self._phase == _CLOSED:
            return
        if self._phase != _HANDLING:
            self._write(json_response(exc.status, exc.to_dict(), exc.headers()), False)
        self._close_after_write()

    def _enter(self, phase: Phase) -> None:
        """Move to ``phase`` and arm its timer (h1.PHASES)."""
        self._phase = phase
        seconds = self._timeouts[phase]
        if seconds is not None:
            self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        # One lazily re-scheduled timer per connection instead of a new TimerHandle per
        # phase change: re-arming is just moving the deadline.
        self._deadline = self._loop.time() + seconds
        if self._timer is None or self._deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self) -> None:
        self._timer = None
        if self._timeouts[self._phase] is None:
            return  # re-armed when the response is written or the connection is back
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._timeout)
            return
        err = expired(self._phase)
        if err is None:
            self._close_after_write()  # idle keep-alive: close silently
        else:
            self._fail_with(err)

    # --- shutdown --------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close now if idle; otherwise close after the in-flight response."""
        self._closing = True
        if self._phase == _LENT and self._lender is not None:
            self._lender.recall()  # it comes back after its answer and is closed then
        if self._phase in (_IDLE, _HEAD, _BODY):
            self._close_after_write()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class UnixHTTPServer:
    """HTTP/1.1 on a Unix socket with explicit ``start()`` / ``close(drain_timeout)``.

    The socket file is created under a temporary name, given its mode and group, and
    only then renamed into place — there is never a moment when ``path`` exists with
    the wrong permissions. A stale socket file (left by a killed daemon) is replaced;
    a live one (another daemon answering) is refused.
    """

    def __init__(
        self,
        path: str | Path,
        handler: Handler,
        *,
        lender_for: LenderFor | None = None,
        limits: HTTPLimits | None = None,
        mode: int = 0o660,
        group: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        # Who may serve an inference connection itself (the model's worker), or None.
        self.lender_for = lender_for
        self.limits = limits if limits is not None else HTTPLimits()
        self.mode = mode
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        # Per-peer tables for fair slots (insertion order: oldest connection first).
        self._by_uid: dict[int, dict[_Conn, None]] = {}
        self._by_pid: dict[int, dict[_Conn, None]] = {}
        self._budget = BodyBudget(self.limits.max_inflight_body_bytes)
        self._timeouts = [timeout(p, self.limits) for p in Phase]
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._ino: tuple[int, int] | None = None
        self._all_gone: asyncio.Event | None = None

    @property
    def connections(self) -> int:
        """Open connections (for tests and metrics)."""
        return len(self._conns)

    async def start(self) -> None:
        """Bind, set permissions, rename into place, listen.

        Raises:
            SocketInUseError: another process answers on ``path``.
            ConfigError: the group does not exist or cannot be given to the socket, or
                ``path`` exists and is not a socket.
        """
        path = self.path
        gid = _resolve_group(self.group) if self.group else None
        clear_stale_socket(path)
        tmp = bind_path(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            if gid is not None:
                try:
                    os.chown(tmp, -1, gid)
                except PermissionError as exc:
                    raise ConfigError(
                        f"cannot give socket {path} to group {self.group!r}: the daemon user "
                        "is not a member of it",
                        code="socket-group",
                    ) from exc
                except OSError as exc:  # EINVAL: the gid is not mapped (a user namespace)
                    from agent.config import unmapped_group

                    why = unmapped_group(gid, str(self.group), f"socket {path}")
                    raise ConfigError(
                        why or f"cannot give socket {path} to group {self.group!r}: {exc}",
                        code="socket-group",
                    ) from exc
            sock.listen(1024)
            os.rename(tmp, path)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        st = os.stat(path)
        self._ino = (st.st_dev, st.st_ino)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Conn(self), sock=sock)
        logger.info("listening on %s (mode %04o, group %s)", path, self.mode, self.group or "-")

    def _admit(self, conn: _Conn) -> bool:
        """Give ``conn`` a slot, closing an idle connection to make room if needed;
        False: no slot (the caller answers 503).

        Order: a process at ``pid_cap`` or a user at ``uid_cap`` gives up its own oldest
        idle connection; a full server closes the oldest idle connection of the uid
        holding the most (else any idle one). Only when none of those is idle is the
        new one refused — so one peer re-opening connections pushes out its own,
        never another's.
        """
        lim = self.limits
        pid_conns = self._by_pid.get(conn._pid)
        uid_conns = self._by_uid.get(conn._uid)
        pool: dict[_Conn, None] | None = None
        full = False
        if pid_conns is not None and len(pid_conns) >= lim.pid_cap:
            pool = pid_conns
        elif uid_conns is not None and len(uid_conns) >= lim.uid_cap:
            pool = uid_conns
        elif len(self._conns) >= lim.max_connections:
            pool = max(self._by_uid.values(), key=len, default=None)
            full = True
        if pool is not None:
            victim = next((c for c in pool if c.idle), None)
            if victim is None and full:  # the busiest user has none idle: anyone's
                victim = next((c for c in self._conns if c.idle), None)
            if victim is None:
                logger.warning(
                    "refusing a connection of uid %d pid %d: %d connections open, "
                    "none idle to close",
                    conn._uid,
                    conn._pid,
                    len(self._conns),
                )
                return False
            logger.debug("closing an idle connection of uid %d for a new one", victim._uid)
            victim.evict()
        self._conns.add(conn)
        self._by_pid.setdefault(conn._pid, {})[conn] = None
        self._by_uid.setdefault(conn._uid, {})[conn] = None
        conn._tracked = True
        return True

    def _untrack(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if not conn._tracked:
            return
        conn._tracked = False
        for table, key in ((self._by_pid, conn._pid), (self._by_uid, conn._uid)):
            peers = table.get(key)
            if peers is not None:
                peers.pop(conn, None)
                if not peers:
                    del table[key]

    @property
    def body_bytes(self) -> int:
        """Bytes of request bodies held now (charged to the budget)."""
        return self._budget.used

    def _conn_gone(self) -> None:
        if self._all_gone is not None and not self._conns:
            self._all_gone.set()

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close everything.

        Idle keep-alive connections are closed at once; a connection with a request in
        flight gets its response (with ``Connection: close``) and is then closed.
        Whatever is still running after ``drain_timeout`` seconds is aborted.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
        self._unlink_own()
        self._all_gone = asyncio.Event()
        for c in list(self._conns):
            c.shutdown()
        if self._conns:
            try:
                await asyncio.wait_for(self._all_gone.wait(), drain_timeout)
            except TimeoutError:
                logger.warning(
                    "%s: %d connections still busy after %.1fs; aborting them",
                    self.path,
                    len(self._conns),
                    drain_timeout,
                )
                for c in list(self._conns):
                    c.abort()
                for t in list(self._inflight):
                    t.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def _unlink_own(self) -> None:
        """Remove the socket file only if it is still the one we created."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if self._ino == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class TCPHTTPServer(UnixHTTPServer):
    """The same server on a TCP address (``[inference] tcp_listen``, for containers that
    cannot mount the socket). Loopback is enforced by the config (agent/config.py);
    TCP carries no peer credentials (``Request.peer_cred`` is None) and connections are
    never lent to workers (lending passes Unix socket descriptors)."""

    def __init__(
        self, host: str, port: int, handler: Handler, *, limits: HTTPLimits | None = None
    ) -> None:
        super().__init__(f"tcp:{host}:{port}", handler, limits=limits)
        self.host = host
        self.port = port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]  # port 0 = any free port (tests)
        logger.info("listening on tcp %s:%d", self.host, self.port)

    def _unlink_own(self) -> None:
        return  # no socket file


def _resolve_group(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ConfigError(
            f"socket group {group!r} does not exist; create it or set another group",
            code="socket-group",
        ) from None


def bind_path(path: Path) -> Path:
    """The temporary name a socket is bound at before its rename to ``path``.

    Raises:
        ConfigError: the name does not fit a Unix socket address (108 bytes, with room
            for the pid suffix); a relative ``path`` is measured as given.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if len(os.fsencode(str(tmp))) > 100:
        raise ConfigError(f"socket path {path} is too long for a Unix socket", code="socket-path")
    return tmp


def clear_stale_socket(path: Path) -> None:
    """Unlink a socket file nobody answers on; refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"{path} exists and is not a socket; refusing to replace it", code="socket-path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise SocketInUseError(f"cannot probe existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise SocketInUseError(f"another process is already serving on {path}; stop it first")
