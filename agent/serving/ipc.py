"""Framing and shared-memory transport between the daemon and its model workers.

A frame on the Unix socketpair is ``struct "!II"`` (header length, payload length), a
compact JSON header, then the raw payload. Tensors smaller than :data:`SHM_MIN` travel
inline in the payload; larger ones go through a memfd mapping that both processes hold,
split into one fixed slot per concurrent request, allocated once per worker and reused
(no SharedMemory created or unlinked per request, so no resource_tracker involvement).

Both processes speak it: the daemon's end is :mod:`agent.serving.transport`, the child's
:mod:`agent.serving.worker_main`. Nothing in a frame is pickled; the daemon reads a
child's frames as untrusted input (a garbled one ends that child, see docs/DAEMON.md,
"Trust boundaries").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import mmap
import os
import socket
import struct
import threading
import time
from typing import Any

import numpy as np
import orjson

from agent.errors import InvalidInputError, ModelNotReadyError
from agent.serving.tensors import bytes_elements, decode_bytes, pack_bytes

HEAD = struct.Struct("!II")
SHM_MIN = 64 * 1024
ALIGN = 64
MAX_HEADER = 16 * 1024 * 1024
MAX_FRAME = 1 << 30  # header + payload: a frame announcing more is garbled (a dead peer)
READ_AHEAD = 64 * 1024  # a Channel's read buffer: frames up to this size take one read
_HEADER_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY  # as lenient as json


class ChannelClosed(Exception):
    """The peer closed the socket (or died)."""


class Channel:
    """One side of the framed socket; ``send`` is thread-safe, ``recv`` is single-reader."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._rbuf = bytearray(READ_AHEAD)  # recv's read-ahead: [_rpos, _rend) unread
        self._rpos = self._rend = 0

    def send(self, header: dict[str, Any], payload: list[bytes | memoryview] | None = None) -> None:
        """Send one frame (blocking until all of it is out)."""
        bufs = _frame(header, payload)
        with self._lock:
            self._send_all(bufs)

    def send_nowait(
        self, header: dict[str, Any], payload: list[bytes | memoryview] | None = None
    ) -> tuple[str, list[memoryview]]:
        """Send a frame without ever blocking (for an event loop that also reads replies:
        blocking there while the peer blocks sending to us would deadlock both).

        Returns ``("sent", [])``; ``("later", bufs)`` when nothing went out (lock busy or
        socket full): pass ``bufs`` to :meth:`send_bufs` from a thread that may block; or
        ``("rest", bufs)`` when part of the frame went out: the lock is still held and
        :meth:`finish` must send ``bufs`` (from a thread that may block).
        """
        bufs = [memoryview(b).cast("B") for b in _frame(header, payload)]
        if not self._lock.acquire(blocking=False):
            return "later", bufs
        try:
            sent = self.sock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._lock.release()
            return "later", bufs
        except BaseException:
            self._lock.release()
            raise
        rest = _skip(bufs, sent)
        if not rest:
            self._lock.release()
            return "sent", []
        return "rest", rest

    def send_bufs(self, bufs: list[memoryview]) -> None:
        with self._lock:
            self._send_all(bufs)

    def finish(self, rest: list[memoryview]) -> None:
        """Send the rest of a frame :meth:`send_nowait` started; releases its lock."""
        try:
            self._send_all(rest)
        finally:
            self._lock.release()

    def _send_all(self, bufs: list[Any]) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            sent = self.sock.sendmsg(views[:512])
            views = _skip(views, sent)

    def _fill(self, n: int) -> None:
        """At least ``n`` unread bytes in the read buffer (``n`` fits it)."""
        buf = self._rbuf
        if self._rpos + n > len(buf):  # move what is unread to the front
            have = self._rend - self._rpos
            buf[:have] = buf[self._rpos : self._rend]
            self._rpos, self._rend = 0, have
        self._rend = _read_at_least(self.sock, memoryview(buf), self._rend, self._rpos + n)

    def recv(self, max_frame: int = MAX_FRAME) -> tuple[dict[str, Any], memoryview]:
        """One frame: the header and a view of the payload (its own copy). A frame
        that announces more than ``max_frame`` bytes closes the channel before anything
        is allocated for it.

        Reads ahead into a buffer of READ_AHEAD bytes, so a small frame usually costs
        one system call (its prefix, header and payload arrive together); a bigger
        frame is read straight into a buffer of its own."""
        try:
            self._fill(HEAD.size)
            hl, pl = frame_sizes(self._rbuf, self._rpos, max_frame)
            self._rpos += HEAD.size
            n = hl + pl
            if n <= len(self._rbuf):
                self._fill(n)
                body = self._rbuf[self._rpos : self._rpos + n]
                self._rpos += n
            else:
                body = bytearray(n)
                have = self._rend - self._rpos
                body[:have] = self._rbuf[self._rpos : self._rend]
                self._rpos = self._rend = 0
                _read_at_least(self.sock, memoryview(body), have, n)
            return split_frame(body, hl)
        except (OSError, ValueError) as exc:  # garbled = a dead peer
            raise ChannelClosed(str(exc)) from exc

    def unread(self) -> bytes:
        """The bytes read ahead and not yet returned as a frame (for a reader that takes
        the socket over); the buffer is then empty."""
        out = bytes(self._rbuf[self._rpos : self._rend])
        self._rpos = self._rend = 0
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def frame_sizes(buf: bytes | bytearray, pos: int, max_frame: int = MAX_FRAME) -> tuple[int, int]:
    """(header length, payload length) of the frame whose prefix is at ``buf[pos:]``;
    ValueError for a prefix no well-formed frame has (no header, a header over
    MAX_HEADER, more than ``max_frame`` bytes in all), before anything is allocated."""
    hl, pl = HEAD.unpack_from(buf, pos)
    if hl == 0 or hl > MAX_HEADER or hl + pl > max_frame:
        raise ValueError(f"frame of {hl} + {pl} bytes")
    return hl, pl


def split_frame(body: bytearray, hl: int) -> tuple[dict[str, Any], memoryview]:
    """A frame's body (header, then payload) → (header, view of the payload); ValueError
    when the header is not a JSON object."""
    view = memoryview(body)
    header = orjson.loads(view[:hl])
    if not isinstance(header, dict):
        raise ValueError("frame header is not an object")
    return header, view[hl:]


def _read_at_least(sock: socket.socket, view: memoryview, got: int, need: int) -> int:
    """Fill ``view`` from ``got`` until at least ``need`` bytes are in; the new count."""
    while got < need:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ChannelClosed("peer closed the connection")
        got += k
    return got


def _frame(header: dict[str, Any], payload: list[bytes | memoryview] | None) -> list[Any]:
    hb = orjson.dumps(header, option=_HEADER_OPTS)
    parts: list[bytes | memoryview] = list(payload or [])
    plen = sum(memoryview(p).nbytes for p in parts)
    return [HEAD.pack(len(hb), plen), hb, *parts]


def _skip(views: list[memoryview], sent: int) -> list[memoryview]:
    """The buffers left after ``sent`` bytes of ``views`` went out."""
    i = 0
    while i < len(views) and sent >= views[i].nbytes:
        sent -= views[i].nbytes
        i += 1
    rest = views[i:]
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest


class ShmArena:
    """A memfd mapping split into ``slots`` equal slots of ``slot_bytes``."""

    def __init__(self, slots: int, slot_bytes: int, fd: int | None = None):
        self.slots = slots
        self.slot_bytes = slot_bytes
        size = slots * slot_bytes
        if fd is None:
            fd = os.memfd_create("edgeward-worker", 0)
            os.ftruncate(fd, size)
        self.fd = fd
        self.mm = mmap.mmap(fd, size)
        self._free = list(range(slots))  # a stack: the slot used last (warm) goes next
        self._lock = threading.Lock()  # _free, _waiting and _async
        self._cv = threading.Condition()  # threads waiting for a free slot
        self._waiting = 0
        # Coroutines waiting for a free slot (acquire_async): a freed slot goes to the
        # first of them, on its own event loop, before any thread sees it.
        self._async: collections.deque[tuple[asyncio.Future[int], asyncio.AbstractEventLoop]]
        self._async = collections.deque()
        self.closed = False

    def acquire(self, timeout: float | None) -> int | None:
        """A free slot, waiting up to ``timeout`` seconds (None: forever); None if none
        came. A free slot costs one plain lock; the Condition is for waiters only."""
        free = self._free
        with self._lock:
            if free:
                return free.pop()
            if timeout is not None and timeout <= 0:
                return None
            self._waiting += 1  # before any check below: release() then notifies
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._cv:
                while True:
                    with self._lock:
                        if free:
                            return free.pop()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cv.wait(left)
        finally:
            with self._lock:
                self._waiting -= 1

    async def acquire_async(self, timeout: float | None) -> int:
        """A free slot, waited for on the running event loop (no thread blocks);
        TimeoutError past ``timeout`` seconds, ModelNotReadyError if the arena closes."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free:
                return self._free.pop()
            if self.closed:
                raise ModelNotReadyError("the worker stopped; no transfer slot")
            fut: asyncio.Future[int] = loop.create_future()
            self._async.append((fut, loop))
        try:
            return await (fut if timeout is None else asyncio.wait_for(fut, timeout))
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed to us as we gave up: pass it on
            else:
                with self._lock, contextlib.suppress(ValueError):
                    self._async.remove((fut, loop))
            raise

    def release(self, slot: int) -> None:
        with self._lock:
            if self._async:  # a coroutine waits: the slot is its own from here
                fut, loop = self._async.popleft()
            else:
                fut = None
                self._free.append(slot)
            waiting = self._waiting
        if fut is not None:
            if running_loop() is loop:
                self._hand(fut, slot)
            else:
                try:
                    loop.call_soon_threadsafe(self._hand, fut, slot)
                except RuntimeError:  # that loop is closed: nobody waits there
                    self.release(slot)
            return
        if waiting:  # Condition.notify is Python code: only when needed
            with self._cv:
                self._cv.notify()

    def _hand(self, fut: asyncio.Future[int], slot: int) -> None:
        """On the waiter's loop: give it ``slot``, or pass the slot on if it gave up."""
        if fut.done():
            self.release(slot)
        else:
            fut.set_result(slot)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            waiters, self._async = list(self._async), collections.deque()
        for fut, loop in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
                loop.call_soon_threadsafe(_fail_waiter, fut)
        # BufferError: a view is still alive; the mapping goes with the process.
        with contextlib.suppress(BufferError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running on this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _fail_waiter(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.set_exception(ModelNotReadyError("the worker stopped; no transfer slot"))


def encode(
    arrays: dict[str, Any], arena: ShmArena | None, slot: int | None
) -> tuple[list[dict[str, Any]], list[bytes | memoryview], int]:
    """Describe ``arrays`` for a frame; big ones are copied into the slot.

    Returns (tensor descriptors, inline payload parts, number of tensors copied to shm).
    """
    descs: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    inline_off = 0
    shm_off = 0
    n_shm = 0
    for name, value in arrays.items():
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if arr.dtype.kind in "OUS":
            # Text and bytes: length-prefixed elements (as the v2 binary extension
            # frames BYTES), never pickle: the child is less trusted than the parent.
            data = pack_bytes(bytes_elements(arr, name))
            descs.append({"n": name, "e": "bytes", "s": arr.shape, "o": inline_off, "l": len(data)})
            parts.append(data)
            inline_off += len(data)
            continue
        nbytes = arr.nbytes
        d: dict[str, Any] = {"n": name, "t": arr.dtype.str, "s": arr.shape, "l": nbytes}
        if (
            arena is not None
            and slot is not None
            and nbytes >= SHM_MIN
            and shm_off + nbytes <= arena.slot_bytes
        ):
            base = slot * arena.slot_bytes + shm_off
            dst = np.frombuffer(arena.mm, dtype=arr.dtype, count=arr.size, offset=base)
            np.copyto(dst.reshape(arr.shape), arr, casting="no")
            d.update(e="shm", o=base)
            shm_off += (nbytes + ALIGN - 1) // ALIGN * ALIGN
            n_shm += 1
        else:
            c = np.ascontiguousarray(arr)
            d.update(e="raw", o=inline_off)
            parts.append(memoryview(c.reshape(-1).view(np.uint8)) if nbytes else b"")  # type: ignore[arg-type]
            inline_off += nbytes
        descs.append(d)
    return descs, parts, n_shm


_ENCODINGS = ("raw", "shm", "bytes")
_DTYPES: dict[Any, np.dtype[Any]] = {}  # dtype strings seen in frames (a few per model)


def _dtype(spec: Any) -> np.dtype[Any]:
    dt = _DTYPES.get(spec)
    if dt is None:
        dt = np.dtype(spec)  # TypeError for what is not a dtype: a malformed frame
        if len(_DTYPES) < 64 and type(spec) is str:
            _DTYPES[spec] = dt
    return dt


def decode(
    descs: list[dict[str, Any]],
    payload: bytearray | memoryview,
    arena: ShmArena | None,
    *,
    copy: bool,
) -> dict[str, np.ndarray]:
    """Rebuild arrays from a frame's descriptors (ValueError if one is malformed); shm
    tensors are views unless ``copy`` (the slot will be reused)."""
    if not isinstance(descs, list):
        raise ValueError("tensor descriptors are not a list")
    out: dict[str, np.ndarray] = {}
    for d in descs:
        name, e = str(d["n"]), d["e"]
        if e not in _ENCODINGS:
            raise ValueError(f"unknown tensor encoding {e!r}")
        off, ln = int(d["o"]), int(d["l"])
        shape = tuple(int(x) for x in d["s"])
        if e == "bytes":
            if off < 0 or off + ln > memoryview(payload).nbytes:
                raise InvalidInputError(
                    f"tensor {name!r}: BYTES data outside the frame", code="invalid-input"
                )
            out[name] = decode_bytes(memoryview(payload)[off : off + ln], shape, name)
            continue
        dtype = _dtype(d["t"])
        count = ln // dtype.itemsize if dtype.itemsize else 0
        if e == "shm":
            if arena is None:
                raise ChannelClosed("shared-memory tensor without an arena")
            a = np.frombuffer(arena.mm, dtype=dtype, count=count, offset=off).reshape(shape)
            out[name] = a.copy() if copy else a
        else:
            out[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=off).reshape(shape)
    return out


def error_to_dict(exc: BaseException) -> dict[str, Any]:
    """Class name + code + status + message, so the parent re-raises the same error. A
    full disk keeps its meaning across the boundary (``disk-full``: the device's fault,
    retried later, never the package's)."""
    from agent.errors import disk_full

    return {
        "cls": type(exc).__name__,
        "code": "disk-full" if disk_full(exc) else getattr(exc, "code", "worker"),
        "status": getattr(exc, "status", 500),
        "msg": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}",
    }


def error_from_dict(d: dict[str, Any]) -> Exception:
    """Rebuild an ``agent.errors`` exception (unknown classes become RuntimeBackendError)."""
    from agent import errors

    cls = getattr(errors, str(d.get("cls", "")), None)
    msg = str(d.get("msg", "worker error"))
    code = str(d.get("code", "worker"))
    status = int(d.get("status", 500))
    if not (isinstance(cls, type) and issubclass(cls, errors.EdgewardError)):
        return errors.RuntimeBackendError(msg, code=code, status=status)
    try:
        exc = cls(msg, code=code, status=status)
    except TypeError:
        exc = cls(msg, code=code)
        exc.status = status
    return exc
