"""Lent connections, the worker's half: a model's worker answers its inference requests
on the client's own connection (docs/RUNTIME.md, "Lent connections").

The daemon's half and the channel both speak are in agent/serving/lending.py (why
connections are lent, the messages, the state bytes). Here, in the child process: a
thread per lent connection answers that request and the following ones itself through
the data plane's blocking face; a request it does not serve (another model or path,
``Expect``) goes back to the daemon with the bytes read, which answers it and may lend
the connection again afterwards. The descriptor's O_NONBLOCK flag is shared with the
daemon's copy, so the worker never makes it blocking: it waits with ``poll``.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import threading
import time
from typing import Any

from agent.errors import EdgewardError
from agent.serving import ipc
from agent.serving.h1 import (
    CHUNKED,
    HeadCache,
    Phase,
    error_response,
    expired,
    find_head,
    render_response,
    timeout,
)
from agent.serving.http import BodyBudget, BodyBuffer, HTTPLimits, ProtocolError
from agent.serving.httpbody import Charge, ChunkedDecoder, decode_content
from agent.serving.kserve import DataPlane, header_length, infer_response
from agent.serving.lending import (
    BUSY,
    IDLE,
    MAX_DATA,
    MAX_LENT,
    MAX_MSG,
    PREDICTING,
    SEQ,
    WRITING,
    pack,
    unpack,
)
from agent.serving.pace import Pace
from agent.serving.registry import LATENCY_BUCKETS
from agent.serving.tensors import decode_request

logger = logging.getLogger(__name__)

STATS_EVERY = 0.2  # seconds between stats messages while requests come
SPIN_MAX_REQUEST_S = 0.001  # requests longer than this: a wake-up is noise, never spin


# --- worker side ---------------------------------------------------------------------


class _OwnModel:
    """The worker's one model as the data plane's blocking face runs it; every
    prediction is timed for the daemon's /metrics (sent batched, see ``_stats_loop``)."""

    ready = True  # a worker that lends is serving

    def __init__(self, srv: DirectServer, servable: Any, meta: dict[str, Any]) -> None:
        self.srv = srv
        self.servable = servable
        self.meta = meta
        self.name = ""
        self.version = ""

    def metadata(self) -> dict[str, Any]:
        return self.meta

    def predict(self, inputs: dict[str, Any]) -> Any:
        t0 = time.perf_counter()
        ok = False
        try:
            out = self.servable.predict(inputs)
            ok = True
            return out
        finally:
            self.srv._observe(time.perf_counter() - t0, ok)


class _OwnRegistry:
    """The data plane's registry in a worker: its one model (the shell already routed
    the request by its path, ``DirectServer.paths``)."""

    def __init__(self, model: _OwnModel) -> None:
        self.model = model

    def models(self) -> list[_OwnModel]:
        return [self.model]

    def get(self, name: str, version: str | None = None) -> _OwnModel:
        return self.model


class DirectServer:
    """The worker's half: a thread per lent connection, answering its requests."""

    def __init__(self, sock: socket.socket, servable: Any, meta: dict[str, Any]) -> None:
        self.sock = sock
        self.model = _OwnModel(self, servable, meta)
        self.plane = self._plane(4, 64)
        self.name = ""
        self.version = ""
        self.paths: tuple[str, str] = ("", "")
        self.limits = HTTPLimits()
        self.budget = BodyBudget(self.limits.max_inflight_body_bytes)
        self.state: mmap.mmap | None = None
        self.recalled = False
        self.busy = 0  # connections inside a request (a spin gives way to them)
        self.busy_lock = threading.Lock()
        self.spin_s = 0.0
        self.wake_r, self.wake_w = os.pipe()
        self._send_lock = threading.Lock()
        # Parsed request heads by their bytes (read-only once stored).
        self.heads = HeadCache(256)
        self.timeouts = [timeout(p, self.limits) or 0.0 for p in Phase]  # h1.PHASES
        self._buckets = LATENCY_BUCKETS
        self._stats_lock = threading.Lock()
        self._stats_ev = threading.Event()
        self._n = self._e = 0
        self._s = 0.0
        self._b = [0] * len(LATENCY_BUCKETS)

    def start(self) -> None:
        threading.Thread(target=self._serve, name="lent-connections", daemon=True).start()
        threading.Thread(target=self._stats_loop, name="lent-stats", daemon=True).start()

    def send(self, head: dict[str, Any], data: bytes | bytearray | memoryview = b"") -> None:
        with self._send_lock:
            self.sock.send(pack(head, data))

    def _serve(self) -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MSG, 2)
            except OSError:
                return
            if not msg:  # the daemon is gone
                for fd in fds:
                    os.close(fd)
                return
            head, data = unpack(msg)
            op = head.get("op")
            if op == "hello" and fds:
                self._hello(head, fds.pop(0))
            elif op == "lend" and fds:
                fd = fds.pop(0)
                cid, slot = int(head["cid"]), int(head["slot"])
                if self.recalled or self.state is None:
                    os.close(fd)
                    self.send({"op": "return", "cid": cid, "here": False}, data)
                else:
                    conn = _Lent(self, cid, slot, fd, bytes(data))
                    threading.Thread(target=conn.run, name=f"lent-{cid}", daemon=True).start()
            elif op == "recall":
                self.recalled = True
                os.write(self.wake_w, b"r")  # stays readable: wakes every idle connection
            for fd in fds:
                os.close(fd)

    def _hello(self, head: dict[str, Any], state_fd: int) -> None:
        self.name = str(head["name"])
        self.version = str(head["version"])
        self.paths = (
            f"/v2/models/{self.name}/infer",
            f"/v2/models/{self.name}/versions/{self.version}/infer",
        )
        self.limits = HTTPLimits(**head.get("limits", {}))
        self.timeouts = [timeout(p, self.limits) or 0.0 for p in Phase]  # h1.PHASES
        self.budget = BodyBudget(self.limits.max_inflight_body_bytes)
        limit, queue = head.get("gate", [4, 64])
        self.model.name, self.model.version = self.name, self.version
        self.plane = self._plane(int(limit), int(queue))
        self.spin_s = max(0.0, float(head.get("spin_us", 0))) / 1e6
        self.state = mmap.mmap(state_fd, 2 * MAX_LENT)
        os.close(state_fd)

    # --- one request ------------------------------------------------------------------

    def _plane(self, limit: int, queue: int) -> DataPlane:
        return DataPlane(
            _OwnRegistry(self.model),
            version="worker",  # only server metadata shows it, and the daemon answers that
            max_concurrent_per_model=limit,
            max_queue_per_model=queue,
        )

    def handle(self, headers: dict[str, str], body: bytes | bytearray | memoryview) -> Any:
        """One inference → the HTTP response, errors as v2 error JSON (as the daemon):
        the data plane's blocking face (agent/serving/kserve.py)."""
        try:
            req = decode_request(body, header_length(headers))
            return infer_response(self.plane.infer_blocking(self.name, self.version, req))
        except EdgewardError as exc:
            return error_response(exc)
        except Exception as exc:  # as the relayed path reports an engine's own exception
            logger.warning("%s %s: %s", self.name, self.version, exc)
            err = ipc.error_from_dict(ipc.error_to_dict(exc))
            assert isinstance(err, EdgewardError)
            return error_response(err)

    def _observe(self, seconds: float, ok: bool) -> None:
        with self._stats_lock:
            self._n += 1
            self._e += not ok
            self._s += seconds
            for i, bound in enumerate(self._buckets):
                if seconds <= bound:
                    self._b[i] += 1
                    break
        if not self._stats_ev.is_set():
            self._stats_ev.set()

    def _stats_loop(self) -> None:
        """Batched counters for the daemon's /metrics; no wake-ups while idle."""
        while True:
            self._stats_ev.wait()
            time.sleep(STATS_EVERY)
            with self._stats_lock:
                self._stats_ev.clear()
                head = {"op": "stats", "n": self._n, "e": self._e, "s": self._s, "b": self._b}
                self._n = self._e = 0
                self._s = 0.0
                self._b = [0] * len(self._buckets)
            try:
                self.send(head)
            except OSError:
                return


class _Lent:
    """One lent connection, served on its own thread until it closes or goes back."""

    def __init__(self, srv: DirectServer, cid: int, slot: int, fd: int, data: bytes) -> None:
        self.srv = srv
        self.cid = cid
        self.slot = slot
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)  # already: O_NONBLOCK is shared with the daemon's copy
        lim = srv.limits
        size = max(64 * 1024, min(lim.max_header_bytes + 4, MAX_DATA), len(data))
        self.buf = bytearray(size)  # ≤ MAX_DATA: what is read here can always go back
        self.view = memoryview(self.buf)
        self.buf[: len(data)] = data
        self.filled = len(data)
        self.idle_poll = select.poll()
        self.idle_poll.register(self.sock, select.POLLIN)
        self.idle_poll.register(srv.wake_r, select.POLLIN)
        self.busy_poll = select.poll()
        self.busy_poll.register(self.sock, select.POLLIN)
        self.out_poll = select.poll()
        self.out_poll.register(self.sock, select.POLLOUT)
        self.cost = 1.0  # seconds the last request took (handle + write); none yet
        self.spins = 0
        self.spin_score = 0
        self.pace = Pace()  # seconds from an answer out to the next request in
        self.answered = 0.0  # perf_counter() when the last answer went out

    def run(self) -> None:
        try:
            self._serve()
        except Exception:
            logger.exception("lent connection %d failed", self.cid)
            self._closed()

    def _set(self, state: int) -> None:
        st = self.srv.state
        if st is not None:
            st[self.slot] = state

    # --- reading ------------------------------------------------------------------

    def _recv(self, into: memoryview, deadline: float | None, idle: bool) -> int:
        """Bytes read into ``into``; 0 on EOF, -1 on timeout, -2 on recall (idle only).
        Idle (an answer just went out), the next request is rarely there yet: wait first
        instead of a read that fails with EAGAIN."""
        wait = idle
        while True:
            if not wait:
                try:
                    return self.sock.recv_into(into)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    return 0
            wait = False
            if deadline is None:
                ms = -1
            else:
                ms = int((deadline - time.monotonic()) * 1000) + 1
                if ms <= 0:
                    return -1
            events = (self.idle_poll if idle else self.busy_poll).poll(ms)
            if not events:
                return -1
            if idle and all(fd == self.srv.wake_r for fd, _ in events):
                return -2

    # --- waiting for the next request ------------------------------------------------
    #
    # A worker thread that sleeps after its answer is woken by the client's next
    # request; on a virtual machine an idle vCPU halts, and waking it costs 40-50 us
    # (measured here: a third of a tiny model's whole round trip). So after answering a
    # short request, when no other connection of this worker is busy, the thread polls
    # its socket before sleeping, as onnxruntime's own thread pool spins between ops.
    # How long follows the connection's own pace (agent/serving/pace.py): 1.5 times the
    # moving average of its gaps (answer out -> next request in) plus 30 us, at most ``spin_us``
    # (a client that decodes and encodes JSON tensors takes ~4x longer to come back
    # than one that sends binary tensors; one fixed time either wastes CPU on the
    # quick one or misses the slow one). A connection whose usual gap is longer than
    # ``spin_us`` does not poll. A poll the next request did not arrive in lowers
    # ``spin_score``; below zero the thread only probes every 32nd time, so irregular
    # traffic costs at most ``spin_us``/32 per request.

    def _spin_now(self) -> bool:
        srv = self.srv
        if srv.spin_s <= 0 or srv.busy or self.cost > SPIN_MAX_REQUEST_S:
            return False
        if self.pace.budget(srv.spin_s) <= 0:
            return False
        self.spins += 1
        return self.spin_score >= 0 or self.spins % 32 == 0

    def _spin(self) -> int:
        """Bytes of the next request read while polling; 0 on EOF, -1 if none came."""
        deadline = time.perf_counter() + self.pace.budget(self.srv.spin_s)
        recv_into, view = self.sock.recv_into, self.view
        while True:
            try:
                n = recv_into(view)
            except (BlockingIOError, InterruptedError):
                n = -1
            except OSError:
                return 0
            if n >= 0:
                self.spin_score = min(self.spin_score + 1, 8)
                return n
            if time.perf_counter() >= deadline or self.srv.busy:
                self.spin_score = max(self.spin_score - 4, -4)
                return -1

    def _came(self) -> None:
        """A request began to arrive: fold the gap since our last answer into ``pace``."""
        if self.answered:
            self.pace.note(time.perf_counter() - self.answered)

    def _serve(self) -> None:
        srv = self.srv
        lim = srv.limits
        timeouts = srv.timeouts
        buf = self.buf
        while True:
            if not self.filled:  # between requests
                if srv.recalled:
                    return self._give_back(False)
                self._set(IDLE)
                n = self._spin() if self._spin_now() else -1
                if n < 0:
                    n = self._recv(self.view, time.monotonic() + timeouts[Phase.IDLE], True)
                if n == -2:
                    continue
                if n <= 0:  # EOF, or idle past the keep-alive timeout: close, as the server
                    return self._closed()
                self._came()
                self._set(BUSY)
                self.filled = n
            deadline = time.monotonic() + timeouts[Phase.HEAD]
            try:
                end = find_head(buf, 0, self.filled, lim)
                while end < 0:
                    if self.filled >= len(buf):  # a head bigger than our buffer: the daemon's
                        return self._give_back(True)
                    n = self._recv(self.view[self.filled :], deadline, False)
                    if n == 0:
                        return self._closed()
                    if n < 0:
                        return self._expired(Phase.HEAD)
                    self.filled += n
                    end = find_head(buf, self.filled - n - 3, self.filled, lim)
                if end == 0:  # a request needs a request line: let the daemon sort it out
                    return self._give_back(True)
                head = srv.heads.parse(bytes(buf[:end]), lim)  # a program repeats its head
            except ProtocolError as exc:
                return self._fail_with(exc)
            headers = head.headers
            if head.method != "POST" or head.path not in srv.paths or "expect" in headers:
                return self._give_back(True)  # not ours: the daemon answers it
            keep = head.keep_alive
            got = self._read_body(end + 4, head.length)
            if got is None:
                return None
            raw_body, bb = got
            charge = Charge(srv.budget)  # a decoded body is charged like one received
            try:
                body = decode_content(headers, raw_body, lim.max_body_bytes, charge)
            except ProtocolError as exc:
                charge.release()
                if bb is not None:
                    bb.release()
                return self._fail_with(exc)
            del raw_body
            with srv.busy_lock:
                srv.busy += 1
            st = srv.state
            if st is not None:  # the daemon times predictions by these two bytes
                st[SEQ + self.slot] = (st[SEQ + self.slot] + 1) & 0xFF
                st[self.slot] = PREDICTING
            t0 = time.perf_counter()
            try:
                resp = srv.handle(headers, body)
                del body
                ok = self._write(resp, keep)
            finally:
                with srv.busy_lock:
                    srv.busy -= 1
                if bb is not None:  # answered: the body's bytes go back to the budget
                    bb.release()
                charge.release()
            self.answered = time.perf_counter()
            self.cost = self.answered - t0
            if not ok:
                return self._closed()
            self._set(BUSY if self.filled else IDLE)
            if not keep:
                return self._closed()

    def _read_body(
        self, start: int, length: int
    ) -> tuple[bytearray | memoryview, BodyBuffer | ChunkedDecoder | None] | None:
        """The body (a copy: the scratch buffer is reused) and, for one that did not fit
        the scratch buffer or came chunked, what holds its budget charge (release it
        once answered); None if the connection ended or was refused."""
        deadline = time.monotonic() + self.srv.timeouts[Phase.BODY]
        if length == CHUNKED:
            return self._read_chunked(start, deadline)
        total = start + length
        if total <= len(self.buf):
            while self.filled < total:
                n = self._recv(self.view[self.filled :], deadline, False)
                if n <= 0:
                    self._body_failed(n)
                    return None
                self.filled += n
            body = self.buf[start:total]
            rest = self.filled - total
            if rest:
                self.buf[:rest] = self.buf[total : self.filled]
            self.filled = rest
            return body, None
        # Memory follows the bytes received, charged to this worker's body budget.
        bb: BodyBuffer | None = None
        try:
            bb = BodyBuffer(length, self.srv.budget, self.view[start : self.filled])
            self.filled = 0
            while not bb.done:
                n = self._recv(bb.window(), deadline, False)
                if n <= 0:
                    bb.release()
                    self._body_failed(n)
                    return None
                bb.advance(n)
        except ProtocolError as exc:  # over the budget
            if bb is not None:
                bb.release()
            self._fail_with(exc)
            return None
        return bb.take(), bb

    def _read_chunked(self, start: int, deadline: float) -> tuple[bytearray, ChunkedDecoder] | None:
        """A chunked body, decoded by agent/serving/httpbody.py from the scratch buffer
        and charged to this worker's body budget (the decoder holds the charge)."""
        lim = self.srv.limits
        dec = ChunkedDecoder(lim.max_body_bytes, lim.max_header_bytes, self.srv.budget)
        pos = start
        while True:
            try:
                pos += dec.feed(self.view[pos : self.filled])
            except ProtocolError as exc:
                dec.release()
                self._fail_with(exc)
                return None
            if dec.done:
                rest = self.filled - pos
                if rest:
                    self.buf[:rest] = self.buf[pos : self.filled]
                self.filled = rest
                return dec.body, dec
            # keep the unconsumed part (an incomplete chunk line) at the front
            rest = self.filled - pos
            if pos:
                self.buf[:rest] = self.buf[pos : self.filled]
                self.filled, pos = rest, 0
            if self.filled >= len(self.buf):
                dec.release()
                self._fail(400, "bad-chunk", "chunk line too long")
                return None
            n = self._recv(self.view[self.filled :], deadline, False)
            if n <= 0:
                dec.release()
                self._body_failed(n)
                return None
            self.filled += n

    def _body_failed(self, n: int) -> None:
        if n == 0:
            self._closed()
        else:
            self._expired(Phase.BODY)

    # --- writing and endings ----------------------------------------------------------

    def _write(self, resp: Any, keep: bool) -> bool:
        self._set(WRITING)
        views = [memoryview(b).cast("B") for b in render_response(resp, keep, gather=True)]
        deadline = time.monotonic() + self.srv.limits.body_timeout_s
        while views:
            try:
                sent = self.sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                ms = int((deadline - time.monotonic()) * 1000) + 1
                if ms <= 0 or not self.out_poll.poll(ms):
                    return False
                continue
            except OSError:
                return False
            while sent:
                if sent >= views[0].nbytes:
                    sent -= views.pop(0).nbytes
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        return True

    def _fail(self, status: int, code: str, message: str) -> None:
        """A protocol error: answer it and close, as the daemon's server does."""
        self._fail_with(ProtocolError(status, code, message))

    def _fail_with(self, exc: ProtocolError) -> None:
        self._write(error_response(exc), False)
        self._closed()

    def _expired(self, phase: Phase) -> None:
        """``phase``'s timer ran out: its answer (h1.PHASES), then close."""
        err = expired(phase)
        if err is None:
            self._closed()
        else:
            self._fail_with(err)

    def _give_back(self, here: bool) -> None:
        data = bytes(self.buf[: self.filled])
        self.sock.close()  # our descriptor only; the daemon's copy keeps the connection
        self.srv.send({"op": "return", "cid": self.cid, "here": here}, data)

    def _closed(self) -> None:
        self.sock.close()
        self.srv.send({"op": "closed", "cid": self.cid})
