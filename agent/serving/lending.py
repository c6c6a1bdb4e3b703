"""Lending a client's connection to a model worker: the channel and the daemon's half.

Why (docs/RUNTIME.md, "Lent connections"): relaying every request client → daemon →
worker → daemon → client costs two more process wake-ups and the daemon's Python on each
request — several times the run time of a small model. So the daemon parses the first
request of a kept-alive connection and, when it is an inference on a model whose worker
lends, passes the socket (SCM_RIGHTS) and the bytes read so far to that worker, which
answers that request and the following ones itself (its half: agent/serving/direct.py).
A request it does not serve goes back to the daemon with the bytes read.

This module is what the daemon runs (:class:`Lending`, the registry's ``LendingWorker``
contract, on the daemon's event loop) and the channel both halves speak. A worker's
messages are untrusted input here: a garbled one is dropped, a connection id the daemon
did not lend is ignored, and a dead child's connections are settled from the daemon's
own records (docs/DAEMON.md, "Trust boundaries").

The daemon keeps its own descriptor of every lent connection (it stops reading it) and
a shared byte per connection saying what the worker is doing with it. When the worker
dies (kill -9, segfault, memory cap) the daemon answers a request that was read and not
answered with a 503 ``worker-crashed`` error, as it does for relayed requests, closes a
connection whose answer was cut short and takes idle ones back. Hot swap and shutdown
recall the connections: each comes back as soon as its request in flight is answered.

Channel (a ``SOCK_SEQPACKET`` pair per worker process; one message = struct ``"!I"``
JSON length, the JSON header, raw data):

* daemon → worker: ``hello`` (name, version, HTTP limits, admission; with the state
  memfd), ``lend {cid, slot}`` + bytes read (with the connection's descriptor),
  ``recall``;
* worker → daemon: ``return {cid, here}`` + bytes read and not answered, ``closed
  {cid}``, ``stats {n, e, s, b}`` (requests, errors, latency sum and histogram since
  the last one; batched every 0.2 s while requests come).

State byte per slot: 0 idle between requests, 1 a request read and not answered, 2 its
answer partly written, 3 its prediction running; a second byte per slot counts the
predictions started (mod 256). The daemon reads both every ``HUNG_CHECK_S``: a slot
seen predicting the same request for longer than ``request_timeout`` means a hung
run script, and the worker is killed and restarted (that request gets 504; see
agent/serving/supervisor.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

logger = logging.getLogger(__name__)

MSG = struct.Struct("!I")
# Bytes of a request that travel with a lend or a return. A stock kernel caps socket
# buffers (net.core.wmem_max, 208 KiB), and a SOCK_SEQPACKET message must fit in one.
MAX_DATA = 128 * 1024
MAX_MSG = MAX_DATA + 4096  # + the JSON header
MAX_LENT = 4096  # connections one worker may hold (one state byte each)
CHANNEL_BUF = 1 << 20  # SO_SNDBUF/SO_RCVBUF asked for (the kernel may grant less)
IDLE, BUSY, WRITING, PREDICTING = 0, 1, 2, 3
SEQ = MAX_LENT  # offset of the per-slot prediction counters in the state memfd
HUNG_CHECK_S = 0.25  # seconds between the daemon's looks for hung predictions


def pack(head: dict[str, Any], data: bytes | bytearray | memoryview = b"") -> bytes:
    j = json.dumps(head, separators=(",", ":")).encode()
    return b"".join((MSG.pack(len(j)), j, data))


def unpack(msg: bytes) -> tuple[dict[str, Any], memoryview]:
    (n,) = MSG.unpack_from(msg)
    head = json.loads(msg[MSG.size : MSG.size + n])
    if not isinstance(head, dict):
        raise ValueError("message header is not an object")
    return head, memoryview(msg)[MSG.size + n :]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(daemon end, worker end) with buffers big enough for any one message."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, opt, CHANNEL_BUF)
    return a, b


class Lending:
    """The daemon's half for one ``ModelWorker``, the lending job of a worker: lends
    connections to its current child process and settles them when they come back,
    close, or the child dies. Implements the registry's ``LendingWorker`` contract (and
    so ``agent.serving.http.Lender``). Every method except :meth:`wait_unlent` runs on
    the daemon's event loop."""

    def __init__(self, name: str, version: str, settings: dict[str, Any]):
        self.name = name
        self.version = version
        self.settings = settings  # {"limits": HTTPLimits fields, "gate": [limit, queue]}
        fd = os.memfd_create("edgeward-lent", 0)
        os.ftruncate(fd, 2 * MAX_LENT)
        self._state_fd = fd
        self.state = mmap.mmap(fd, 2 * MAX_LENT)
        self._free = list(range(MAX_LENT))
        self._cids = 0
        self.sock: socket.socket | None = None  # channel to the current child
        self._lent: dict[int, tuple[Any, int]] = {}  # cid → (LentConnection, slot)
        self.recalled = False
        self.unlent = threading.Event()
        self.unlent.set()
        self.stats_sink: Callable[[dict[str, Any]], None] | None = None
        # Whether the worker serves now (its state is "ready"); set by the worker.
        self.serving: Callable[[], bool] = lambda: True
        # Called with the timeout when a prediction on a lent connection outlived it.
        self.hung: Callable[[float], None] | None = None
        timeout = settings.get("request_timeout")
        self.request_timeout = float(timeout) if timeout else None  # seconds
        self._predicting: dict[int, tuple[int, float]] = {}  # cid → (counter, first seen)
        self._hung_timer: Any = None
        self._loop: Any = None
        self.closed = False

    @property
    def count(self) -> int:
        return len(self._lent)

    # --- the LendingWorker contract (agent/serving/registry.py) ---------------------

    @property
    def lends(self) -> bool:
        """True if inference connections may be handed to this worker now."""
        return self.sock is not None and not self.recalled and self.serving()

    @property
    def lent(self) -> int:
        """Connections the child holds now."""
        return len(self._lent)

    @property
    def lent_busy(self) -> int:
        """Requests in flight on lent connections (read by the child, not yet answered)."""
        return self.busy

    def set_stats_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """``sink(counters)`` gets the child's counts of requests it answered itself."""
        self.stats_sink = sink

    @property
    def busy(self) -> int:
        """Lent connections with a request read and not yet answered."""
        if self.closed:
            return 0
        st = self.state
        return sum(1 for _conn, slot in self._lent.values() if st[slot] != IDLE)

    def attach(self, sock: socket.socket, loop: Any) -> None:
        """A new child is up: greet it with the settings and the state memfd."""
        self.sock = sock
        self._loop = loop
        sock.setblocking(False)
        hello = {"op": "hello", "name": self.name, "version": self.version, **self.settings}
        socket.send_fds(sock, [pack(hello)], [self._state_fd])
        loop.add_reader(sock.fileno(), self._readable, sock)

    def _check_hung(self) -> None:
        """On the loop: a prediction seen running on one lent connection for longer than
        the request timeout (the same counter value all along) → ``hung``."""
        self._hung_timer = None
        if self.closed or self._loop is None:
            return
        timeout = self.request_timeout
        assert timeout is not None
        now = self._loop.time()
        st = self.state
        seen: dict[int, tuple[int, float]] = {}
        hung = False
        for cid, (_conn, slot) in self._lent.items():
            if st[slot] != PREDICTING:
                continue
            seq = st[SEQ + slot]
            prev = self._predicting.get(cid)
            since = prev[1] if prev is not None and prev[0] == seq else now
            seen[cid] = (seq, since)
            hung = hung or now - since > timeout
        self._predicting = seen
        if hung and self.hung is not None and self.sock is not None:
            self._predicting = {}
            self.hung(timeout)
        if self._lent:  # nothing lent, nothing to watch: no wake-ups while idle
            self._hung_timer = self._loop.call_later(HUNG_CHECK_S, self._check_hung)

    def lend(self, fd: int, data: bytes, conn: Any) -> bool:
        sock = self.sock
        if sock is None or self.recalled or not self._free or len(data) > MAX_DATA:
            return False
        if not self.serving():
            return False
        self._cids += 1
        cid = self._cids
        slot = self._free.pop()
        self.state[slot] = BUSY
        try:
            socket.send_fds(
                sock,
                [pack({"op": "lend", "cid": cid, "slot": slot}, data)],
                [fd],
                socket.MSG_DONTWAIT,
            )
        except OSError:  # channel full or child gone: the daemon answers this one itself
            self._free.append(slot)
            return False
        self._lent[cid] = (conn, slot)
        self.unlent.clear()
        if self.request_timeout is not None and self._hung_timer is None:
            self._hung_timer = self._loop.call_later(HUNG_CHECK_S, self._check_hung)
        return True

    def recall(self) -> None:
        """Every lent connection comes back after its request in flight; none are lent
        from now on."""
        self.recalled = True
        if self.sock is not None:
            # a dead child's connections are settled by child_gone
            with contextlib.suppress(OSError):
                self.sock.send(pack({"op": "recall"}), socket.MSG_DONTWAIT)

    def wait_unlent(self, timeout: float) -> bool:
        """From a thread other than the loop's: True once no connection is lent."""
        return self.unlent.wait(timeout)

    def _readable(self, sock: socket.socket) -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, 1, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            for fd in fds:  # the worker never sends descriptors
                os.close(fd)
            if not msg:  # the child is gone; child_gone settles what is still lent
                self._detach(sock)
                return
            try:
                head, data = unpack(msg)
            except ValueError:
                logger.error("%s %s: garbled lent-connection message", self.name, self.version)
                continue
            op = head.get("op")
            if op == "stats":
                if self.stats_sink is not None:
                    self.stats_sink(head)
                continue
            entry = self._lent.pop(head.get("cid"), None)  # type: ignore[arg-type]
            if entry is None:
                continue
            conn, slot = entry
            self._free.append(slot)
            try:
                if op == "return":
                    conn.lent_returned(bytes(data), bool(head.get("here")))
                else:
                    conn.lent_closed()
            except Exception:  # a bug must cost this connection, not the others
                logger.exception("%s %s: taking a connection back failed", self.name, self.version)
                with contextlib.suppress(Exception):
                    conn.abort()
            if not self._lent:
                self.unlent.set()

    def _detach(self, sock: socket.socket) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())

    def child_gone(self, code: str, message: str) -> None:
        """The child exited: read what it said last, then settle the rest by state."""
        sock = self.sock
        self.sock = None
        if sock is not None:
            self._readable(sock)
            self._detach(sock)
            sock.close()
        lent, self._lent = self._lent, {}
        self._predicting = {}
        status = 504 if code == "worker-timeout" else 503
        for conn, slot in lent.values():
            state = self.state[slot] if not self.closed else BUSY
            if state == PREDICTING:
                state = BUSY  # read and not answered
            self._free.append(slot)
            try:
                conn.lent_crashed(state, code, message, status)
            except Exception:
                logger.exception("settling a lent connection failed")
        self.unlent.set()

    def close(self) -> None:
        """Free the state memfd (the worker is stopped; nothing is lent any more)."""
        if self.closed:
            return
        self.closed = True
        self.recalled = True
        if self._hung_timer is not None:
            self._hung_timer.cancel()
            self._hung_timer = None
        with contextlib.suppress(BufferError):
            self.state.close()
        os.close(self._state_fd)


def limits_settings(
    limits: Any,
    gate: tuple[int, int],
    spin_us: float = 0,
    request_timeout: float | None = None,
) -> dict[str, Any]:
    """The ``hello`` settings from the daemon's HTTPLimits, admission numbers, how long
    a worker thread polls for the next request before sleeping, and the seconds a
    prediction may take (watched by the daemon, not sent to the worker)."""
    return {
        "limits": asdict(limits),
        "gate": list(gate),
        "spin_us": spin_us,
        "request_timeout": request_timeout,
    }
