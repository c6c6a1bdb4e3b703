"""Framing and shared-memory transport between the daemon and its model workers.

A frame on the Unix socketpair is ``struct "!II"`` (header length, payload length), a
compact JSON header, then the raw payload. Tensors smaller than :data:`SHM_MIN` travel
inline in the payload; larger ones go through a memfd mapping that both processes hold,
split into one fixed slot per concurrent request, allocated once per worker and reused
(no SharedMemory created or unlinked per request, so no resource_tracker involvement).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import socket
import struct
import threading
from typing import Any

import numpy as np

from agent.errors import InvalidInputError

HEAD = struct.Struct("!II")
SHM_MIN = 64 * 1024
ALIGN = 64
MAX_HEADER = 16 * 1024 * 1024


class ChannelClosed(Exception):
    """The peer closed the socket (or died)."""


class Channel:
    """One side of the framed socket; ``send`` is thread-safe, ``recv`` is single-reader.

    With ``wsock`` frames are sent on that socket and read from ``sock`` (a lane: two
    one-way socketpairs). On a two-way socket, the peer consuming what we sent wakes
    our blocked reader for nothing (the kernel's write-space wake-up shares the reader's
    wait queue): a second sleep and wake per request on each side.
    """

    def __init__(self, sock: socket.socket, wsock: socket.socket | None = None):
        self.sock = sock
        self.wsock = wsock if wsock is not None else sock
        self._lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: list[bytes | memoryview] | None = None) -> None:
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
            sent = self.wsock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
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
            sent = self.wsock.sendmsg(views[:512])
            views = _skip(views, sent)

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ChannelClosed("peer closed the connection")
            got += k
        return buf

    def recv(self) -> tuple[dict[str, Any], memoryview]:
        """One frame: the header and a view of the payload (header and payload come in
        one read)."""
        try:
            hl, pl = HEAD.unpack(self._recv_exact(HEAD.size))
            if hl > MAX_HEADER:
                raise ChannelClosed(f"frame header of {hl} bytes")
            body = self._recv_exact(hl + pl)
            header = json.loads(body[:hl])
            payload = memoryview(body)[hl:]
        except (OSError, ValueError) as exc:  # a garbled stream is as good as a dead peer
            raise ChannelClosed(str(exc)) from exc
        if not isinstance(header, dict):
            raise ChannelClosed("frame header is not an object")
        return header, payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.wsock is not self.sock:
            with contextlib.suppress(OSError):
                self.wsock.close()


def _frame(header: dict[str, Any], payload: list[bytes | memoryview] | None) -> list[Any]:
    hb = json.dumps(header, separators=(",", ":")).encode()
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
        self._free = list(range(slots))
        self._cv = threading.Condition()
        self.closed = False

    def acquire(self, timeout: float | None) -> int | None:
        with self._cv:
            if self._free:
                return self._free.pop()
            if not self._cv.wait_for(lambda: bool(self._free), timeout):
                return None
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cv:
            self._free.append(slot)
            self._cv.notify()

    def close(self) -> None:
        self.closed = True
        # BufferError: a view is still alive; the mapping goes with the process.
        with contextlib.suppress(BufferError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def encode(
    arrays: dict[str, Any], arena: ShmArena | None, slot: int | None
) -> tuple[list[dict[str, Any]], list[bytes | memoryview], int]:
    """Describe ``arrays`` for a frame; big ones are copied into the slot.

    Returns (tensor descriptors, inline payload parts, number of tensors sent via shm).
    """
    descs: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    inline_off = 0
    shm_off = 0
    n_shm = 0
    for name, value in arrays.items():
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if arr.dtype.hasobject:
            data = pickle.dumps(arr, protocol=5)
            descs.append({"n": name, "e": "pickle", "o": inline_off, "l": len(data)})
            parts.append(data)
            inline_off += len(data)
            continue
        nbytes = arr.nbytes
        d: dict[str, Any] = {"n": name, "t": arr.dtype.str, "s": list(arr.shape), "l": nbytes}
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


def decode(
    descs: list[dict[str, Any]],
    payload: bytearray | memoryview,
    arena: ShmArena | None,
    *,
    copy: bool,
) -> dict[str, np.ndarray]:
    """Rebuild arrays; shm tensors are views unless ``copy`` (the slot will be reused)."""
    out: dict[str, np.ndarray] = {}
    for d in descs:
        name = str(d["n"])
        off, ln = int(d["o"]), int(d["l"])
        if d["e"] == "pickle":
            arr = pickle.loads(payload[off : off + ln])
            if not isinstance(arr, np.ndarray):
                raise InvalidInputError(f"input {name!r} is not an array", code="invalid-input")
            out[name] = arr
            continue
        dtype = np.dtype(d["t"])
        shape = tuple(int(x) for x in d["s"])
        count = ln // dtype.itemsize if dtype.itemsize else 0
        if d["e"] == "shm":
            if arena is None:
                raise ChannelClosed("shared-memory tensor without an arena")
            a = np.frombuffer(arena.mm, dtype=dtype, count=count, offset=off).reshape(shape)
            out[name] = a.copy() if copy else a
        else:
            a = np.frombuffer(payload, dtype=dtype, count=count, offset=off).reshape(shape)
            out[name] = a
    return out


def error_to_dict(exc: BaseException) -> dict[str, Any]:
    """Class name + code + status + message, so the parent re-raises the same error."""
    return {
        "cls": type(exc).__name__,
        "code": getattr(exc, "code", "worker"),
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
