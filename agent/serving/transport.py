"""The daemon's end of a worker's frame channel: requests out, replies read by an event loop.

One :class:`Transport` per child process (a restart makes a new one) sends ``predict``
and ``self_test`` frames (agent/serving/ipc.py: a JSON header, tensors inline or in the
worker's shared-memory slots) and settles each request when its reply frame comes.

Replies are read one way only: by an event loop (``add_reader``), never by the caller's
thread. In the daemon that is the daemon's own loop (:class:`ReplyLoop` given it), so an
``apredict`` reply wakes the loop directly. A worker used without one (tests, benchmarks,
scripts) runs a private loop on a thread of its own; a synchronous ``predict`` from any
thread then waits on a ``concurrent.futures.Future`` the loop settles.

A reply frame is untrusted input (the child runs a package's run scripts): it is parsed
as JSON, never unpickled; a frame that does not parse, or a prefix that announces an
absurd header, ends the child (``lost("garbled")``), and a malformed descriptor fails
that one request (docs/DAEMON.md, "Trust boundaries").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from agent.errors import ModelNotReadyError, WorkerError
from agent.serving import ipc
from agent.serving.ipc import running_loop

logger = logging.getLogger(__name__)


class Busy(Exception):
    """No free transfer slot right now (``apredict`` then waits on a thread)."""


class Counters:
    """A worker's request counters, kept across its children (``ModelWorker.stats``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.shm_tensors_in = 0
        self.shm_tensors_out = 0
        self.child_busy_us = 0  # time the child spent decoding, predicting, encoding
        self.restarts = 0
        self.last_error: str | None = None

    def error(self, exc: BaseException | str) -> None:
        with self.lock:
            self.errors += 1
            self.last_error = str(exc)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "errors": self.errors,
                "restarts": self.restarts,
                "shm_tensors_in": self.shm_tensors_in,
                "shm_tensors_out": self.shm_tensors_out,
                "child_busy_us": self.child_busy_us,
                "last_error": self.last_error,
            }


class ReplyLoop:
    """The event loop that reads a worker's replies: the daemon's (``loop``), or a
    private one on a thread of its own, started on first use and ended by :meth:`close`.
    A given loop that has been closed meanwhile is replaced by a private one."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.name = name
        self.given = loop
        self._private: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        given = self.given
        if given is not None and not given.is_closed():
            return given
        with self._lock:
            if self._private is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=loop.run_forever, name=f"worker-{self.name}-replies", daemon=True
                )
                self._thread.start()
                self._private = loop
            return self._private

    def on_loop(self) -> bool:
        """True when called on the loop that reads the replies (creates none)."""
        r = running_loop()
        return r is not None and (r is self.given or r is self._private)

    def call(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop (now, if this is it); False if it is closed."""
        loop = self.loop
        if running_loop() is loop:
            fn(*args)
            return True
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the look and the call
            return False
        return True

    def close(self) -> None:
        """End the private loop's thread (the daemon's loop is the daemon's)."""
        with self._lock:
            loop, thread = self._private, self._thread
            self._private = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()


class Transport:
    """One child's channel, daemon side: pending requests and the replies that settle
    them. Thread-safe; the reading runs on the :class:`ReplyLoop`'s loop.

    ``lost(why)`` is called (on the loop) once the channel ends: ``"eof"`` (the child
    closed it or died) or ``"garbled"`` (it wrote something that is not a frame)."""

    def __init__(
        self,
        label: str,
        chan: ipc.Channel,
        arena: ipc.ShmArena,
        lanes: list[tuple[ipc.Channel, socket.socket]] | None = None,
        *,
        replies: ReplyLoop,
        counters: Counters,
        lost: Callable[[str], None],
    ) -> None:
        self.label = label  # "name version", for messages
        self.chan = chan
        self.arena = arena
        # A lane per transfer slot: a predict request goes out on its slot's lane, where
        # one thread of the child waits for exactly that lane (agent/serving/
        # worker_main.py), and its reply comes back on the lane's own reply socket.
        # Control frames (self_test, shutdown) and their replies use ``chan``.
        self.lanes = [c for c, _ in lanes or []]
        if self.lanes and len(self.lanes) != arena.slots:
            raise ValueError(f"{len(self.lanes)} lanes for {arena.slots} transfer slots")
        self._reply_socks = [r for _, r in lanes or []]
        self.replies = replies
        self.counters = counters
        self._lost = lost
        self.pending: dict[int, tuple[Any, int | None]] = {}  # id → (future, slot)
        self.lock = threading.Lock()
        self.failed = False  # the child is gone: no new requests
        self.closed = False  # on the loop: the socket is closed
        self._closing = False
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers = [_FrameReader(chan.sock, chan.unread())]
        self._readers += [_FrameReader(r) for r in self._reply_socks]

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    # --- reading replies, on the loop ---------------------------------------------------

    def attach(self) -> None:
        """Start reading replies (on the loop)."""
        if self.closed or self._loop is not None:
            return
        self._loop = running_loop()
        assert self._loop is not None
        for r in self._readers:
            self._loop.add_reader(r.sock.fileno(), self._on_readable, r)
            if r.end:  # read ahead before we took the socket over
                self._loop.call_soon(self._on_readable, r)

    def _detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            for r in self._readers:
                with contextlib.suppress(Exception):
                    loop.remove_reader(r.sock.fileno())

    def _on_readable(self, reader: _FrameReader) -> None:
        """Deliver every complete frame the socket holds, without blocking."""
        while self._loop is not None:
            got = reader.read()
            if got is None:  # nothing more for now
                return
            if got is _EOF:  # the child is gone (every socket of it ends at once)
                self._detach()
                self._lost("eof")
                return
            if got is _GARBLED:
                self._garbled()
                return
            assert isinstance(got, tuple)
            self._deliver(*got)

    def _garbled(self) -> None:
        """A garbled stream is as good as a dead child."""
        self._detach()
        self._lost("garbled")

    def _deliver(self, h: dict[str, Any], p: memoryview) -> None:
        """Settle the request a reply frame answers and free its slot."""
        rid = h.get("id")
        with self.lock:
            entry = self.pending.pop(rid, None) if type(rid) is int else None
        if entry is None:
            return
        fut, slot = entry
        try:
            result, exc = self._outcome(h, p)
            settle(fut, result, exc)
        finally:
            if slot is not None:
                self.arena.release(slot)

    def _outcome(self, h: dict[str, Any], p: memoryview) -> tuple[Any, BaseException | None]:
        """(result, None) or (None, error) of a reply frame; call before its slot is freed
        (shm outputs are copied out)."""
        try:
            if h.get("op") == "result":
                out = ipc.decode(h["t"], p, self.arena, copy=True)
                with self.counters.lock:
                    self.counters.shm_tensors_out += int(h.get("shm", 0))
                    self.counters.child_busy_us += int(h.get("us", 0))
                return (out if "n" not in h else int(h["n"])), None
            return None, ipc.error_from_dict(h.get("err") or {})
        except Exception as exc:  # a malformed frame fails that request only
            return None, WorkerError(f"bad reply from worker: {exc}")

    # --- sending requests, from any thread ------------------------------------------------

    def submit(
        self,
        header: dict[str, Any],
        inputs: dict[str, np.ndarray] | None,
        timeout: float | None,
        *,
        nowait: bool = False,
        fut: Any = None,
        defer_send: bool = False,
        slot: int | None = None,
    ) -> Any:
        """Send one request; returns ``fut`` (an asyncio future of the reply loop) or a
        new ``concurrent.futures.Future``, settled when the reply comes. ``nowait``: raise
        :class:`Busy` rather than wait for a slot; ``defer_send``: return (future, header,
        payload) unsent, for :meth:`send_from_loop`; ``slot``: one already taken
        (``arena.acquire_async``), given back here if the request cannot go out."""
        if fut is None:
            fut = Future()
        needs_slot = (self.lanes and header.get("op") == "predict") or (
            inputs is not None
            and any(isinstance(v, np.ndarray) and v.nbytes >= ipc.SHM_MIN for v in inputs.values())
        )
        if slot is None and needs_slot:
            slot = self.arena.acquire(0.0 if nowait else timeout)
            if slot is None and nowait:
                raise Busy
            if slot is None:
                raise ModelNotReadyError(f"model {self.label}: no free transfer slot")
        try:
            descs, parts, n_shm = ipc.encode(inputs or {}, self.arena, slot)
        except BaseException:
            if slot is not None:
                self.arena.release(slot)
            raise
        rid = next(self._ids)
        header.update(id=rid, t=descs, slot=slot)
        with self.lock:
            if self.failed:
                if slot is not None:
                    self.arena.release(slot)
                raise WorkerError(f"{self.label}: worker died", code="worker-crashed")
            self.pending[rid] = (fut, slot)
        with self.counters.lock:
            self.counters.requests += 1
            self.counters.shm_tensors_in += n_shm
        if defer_send:
            return fut, header, parts
        with contextlib.suppress(OSError):  # the loop sees a death and fails this request
            self.channel_for(header).send(header, parts)
        return fut

    def channel_for(self, header: dict[str, Any]) -> ipc.Channel:
        """The lane of the request's slot, or the control channel."""
        slot = header.get("slot")
        if self.lanes and header.get("op") == "predict" and type(slot) is int:
            lane: ipc.Channel = self.lanes[slot]
            return lane
        return self.chan

    def send_nowait(self, header: dict[str, Any], parts: Any) -> Callable[[], None] | None:
        """Send without blocking; None once all of it went out (or the child is gone:
        the loop sees the death and fails the request), else what finishes the send
        from a thread that may block."""
        chan = self.channel_for(header)
        try:
            state, bufs = chan.send_nowait(header, parts)
        except OSError:
            return None
        if state == "sent":
            return None
        return functools.partial(chan.send_bufs if state == "later" else chan.finish, bufs)

    async def send_from_loop(
        self, loop: asyncio.AbstractEventLoop, header: dict[str, Any], parts: Any
    ) -> None:
        """Send without blocking the loop: the loop also reads the replies, and a child
        blocked sending a big reply reads no more requests, so a loop blocked in send
        would deadlock both. What does not go out at once is sent from a thread."""
        rest = self.send_nowait(header, parts)
        if rest is not None:
            with contextlib.suppress(OSError):
                await loop.run_in_executor(None, rest)

    def shutdown(self) -> None:
        """Ask the child to finish what it has read and exit."""
        with contextlib.suppress(OSError):
            self.chan.send({"op": "shutdown"})

    # --- the end ------------------------------------------------------------------------

    def fail_all(self, code: str, message: str) -> None:
        """The child is gone: fail every pending request (and any sent from now on)."""
        with self.lock:
            self.failed = True
            items = list(self.pending.values())
            self.pending.clear()
        for fut, slot in items:
            settle(fut, None, WorkerError(message, code=code, status=status_of(code)))
            if slot is not None:
                self.arena.release(slot)

    def close(self) -> None:
        """Close the socket, after the loop stopped watching its fd (a closed fd left in
        the selector would break the next socket with that number). Once only: stop()
        and the child's death may both ask."""
        with self.lock:
            if self._closing:
                return
            self._closing = True
        done = threading.Event()

        def close() -> None:  # on the loop, so after a pending attach()
            self.closed = True
            self._detach()
            self._close_channels()
            done.set()

        if not self.replies.call(close):  # loop closed: its selector is gone too
            self._close_channels()
            return
        if not done.wait(5.0):
            logger.warning("%s: event loop did not release the worker socket", self.label)

    def _close_channels(self) -> None:
        self.chan.close()
        for lane in self.lanes:
            lane.close()
        for r in self._reply_socks:
            r.close()


_EOF = object()
_GARBLED = object()


class _FrameReader:
    """Reads frames from one socket without blocking (on the loop). Reads ahead into
    a buffer, so a reply usually costs one ``recv``; a frame bigger than the buffer is
    read into one of its own."""

    __slots__ = ("big", "buf", "drained", "end", "got", "hlen", "need", "sock")

    def __init__(self, sock: socket.socket, unread: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(max(ipc.READ_AHEAD, len(unread)))
        self.buf[: len(unread)] = unread  # what a Channel had read ahead on this socket
        self.end = len(unread)  # bytes in buf (a frame's start is always at 0)
        # The body of a frame bigger than buf: it grows with the bytes that arrive (a
        # child announcing 1 GiB costs the daemon only what it really sends).
        self.big: bytearray | None = None
        self.got = 0  # bytes of ``big`` read
        self.need = 0  # the body's announced size
        self.hlen = 0
        self.drained = False  # skip the read that would only say EAGAIN

    def read(self) -> tuple[dict[str, Any], memoryview] | object | None:
        """The next complete frame as (header, payload), ``_EOF``, ``_GARBLED``, or None
        when the socket has no more bytes for now."""
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            if self.drained:  # the last read did not fill its buffer: the socket is empty
                self.drained = False  # (the loop calls again when more comes)
                return None
            big = self.big
            if big is not None and self.got == len(big):  # full, not done: double it
                big = self.big = big + bytearray(min(len(big), self.need - len(big)))
            view = memoryview(big)[self.got :] if big is not None else memoryview(self.buf)
            if big is None:
                view = view[self.end :]
            try:
                n = self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                n = 0
            if n == 0:
                return _EOF
            self.drained = n < len(view)
            if big is not None:
                self.got += n
            else:
                self.end += n

    def _take(self) -> tuple[dict[str, Any], memoryview] | object | None:
        """A complete frame out of what was read, or None (more is needed)."""
        if self.big is not None:
            if self.got < self.need:
                return None
            body, self.big = self.big, None
            return _parse(body, self.hlen)
        buf, end = self.buf, self.end
        if end < ipc.HEAD.size:
            return None
        try:
            hl, pl = ipc.frame_sizes(buf, 0)
        except ValueError:
            return _GARBLED
        total = ipc.HEAD.size + hl + pl
        if total > len(buf):  # read the rest into a buffer of its own
            self.got = end - ipc.HEAD.size
            self.need = hl + pl
            self.big = bytearray(min(self.need, 2 * len(buf)))
            self.big[: self.got] = buf[ipc.HEAD.size : end]
            self.hlen, self.end = hl, 0
            return None
        if end < total:
            return None
        body = buf[ipc.HEAD.size : total]  # a copy: the buffer is reused
        rest = end - total
        if rest:
            buf[:rest] = buf[total:end]
        self.end = rest
        return _parse(body, hl)


def _parse(body: bytearray, hl: int) -> tuple[dict[str, Any], memoryview] | object:
    try:
        return ipc.split_frame(body, hl)
    except ValueError:
        return _GARBLED


def settle(fut: Any, result: Any, exc: BaseException | None) -> None:
    """Complete a concurrent or an asyncio future from whichever thread we are on."""
    if isinstance(fut, asyncio.Future):
        loop = fut.get_loop()
        if running_loop() is loop:
            _set_future(fut, result, exc)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                loop.call_soon_threadsafe(_set_future, fut, result, exc)
        return
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _set_future(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # cancelled (timeout) meanwhile
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def status_of(code: str) -> int:
    """HTTP status of a request failed because its worker went away: 504 when it was
    killed for a request that ran past the timeout, else 503 (retry)."""
    return 504 if code == "worker-timeout" else 503
