"""Framing and shared-memory transport between the daemon and its model workers.

A frame on the Unix socketpair is ``struct "!II"`` (header length, payload length), a
compact JSON header, then the raw payload. Tensors smaller than :data:`SHM_MIN` travel
inline in the payload; larger ones go through a memfd mapping that both processes hold,
split into one fixed slot per concurrent request, allocated once per worker and reused
(no SharedMemory created or unlinked per request, so no resource_tracker involvement).

Shared regions (:class:`SharedRegion`) are memfds a caller writes its inputs into
directly: the child maps them read-only (the fd crosses once, by ``SCM_RIGHTS``), and an
input that lies inside one travels as (region, offset) with no copy at all.

A :class:`Lane` carries one sync request at a time. Its frames put the request id and a
number (the slot, or the child's busy time) in a binary prefix, so a header depends only
on the tensors' names, types and shapes: the receiver parses each distinct header once.
"""

from __future__ import annotations

import array
import contextlib
import json
import mmap
import os
import socket
import struct
import threading
from typing import Any, cast

import numpy as np

from agent.errors import InvalidInputError
from agent.serving.cache import BoundedCache
from agent.serving.tensors import bytes_elements, decode_bytes, pack_bytes

HEAD = struct.Struct("!II")
LANE_HEAD = struct.Struct("!IIQI")  # header length, payload length, request id, aux
LANE_BUF = 64 * 1024  # a lane reads a frame up to this size in one call
_CACHEABLE = frozenset(("op", "t", "shm"))
SHM_MIN = 64 * 1024
ALIGN = 64
MAX_HEADER = 16 * 1024 * 1024
MAX_FDS = 8  # file descriptors one frame may carry (SCM_RIGHTS)
_JSON = json.JSONEncoder(separators=(",", ":"))


class ChannelClosed(Exception):
    """The peer closed the socket (or died)."""


class Channel:
    """One side of the framed socket; ``send`` is thread-safe, ``recv`` is single-reader.

    With ``wsock`` frames are sent on that socket and read from ``sock`` (a lane: two
    one-way socketpairs). On a two-way socket, the peer consuming what we sent wakes
    our blocked reader for nothing (the kernel's write-space wake-up shares the reader's
    wait queue): a second sleep and wake per request on each side.
    """

    def __init__(
        self, sock: socket.socket, wsock: socket.socket | None = None, *, fds: bool = False
    ):
        self.sock = sock
        self.wsock = wsock if wsock is not None else sock
        self.accept_fds = fds  # frames may carry fds: they come in the header as "_fds"
        self._lock = threading.Lock()

    def send(
        self,
        header: dict[str, Any],
        payload: list[bytes | memoryview] | None = None,
        fds: list[int] | None = None,
    ) -> None:
        """Send one frame; ``fds`` go with its first byte (the peer needs ``fds=True``)."""
        bufs = _frame(header, payload)
        with self._lock:
            if fds:
                views = [memoryview(b).cast("B") for b in bufs]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                bufs = _skip(views, self.wsock.sendmsg(views, anc))
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
        _read_at_least(self.sock, memoryview(buf), 0, n)
        return buf

    def _recv_prefix_fds(self, fds: list[int]) -> bytearray:
        """The frame prefix, collecting any fds that came with it."""
        buf = bytearray(HEAD.size)
        view = memoryview(buf)
        got = 0
        space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while got < HEAD.size:
            k, anc, _flags, _addr = self.sock.recvmsg_into([view[got:]], space)
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(data[: len(data) - len(data) % a.itemsize])
                    fds.extend(a)
            if k == 0:
                raise ChannelClosed("peer closed the connection")
            got += k
        return buf

    def recv(self) -> tuple[dict[str, Any], memoryview]:
        """One frame: the header and a view of the payload (header and payload come in
        one read)."""
        fds: list[int] = []
        try:
            prefix = self._recv_prefix_fds(fds) if self.accept_fds else self._recv_exact(HEAD.size)
            hl, pl = HEAD.unpack(prefix)
            if hl > MAX_HEADER:
                raise ChannelClosed(f"frame header of {hl} bytes")
            body = self._recv_exact(hl + pl)
            header = json.loads(body[:hl])
            payload = memoryview(body)[hl:]
            if not isinstance(header, dict):
                raise ValueError("frame header is not an object")
        except (OSError, ValueError, ChannelClosed) as exc:  # garbled = a dead peer
            for fd in fds:
                os.close(fd)
            raise ChannelClosed(str(exc)) from exc
        if fds:
            header["_fds"] = fds
        return header, payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.wsock is not self.sock:
            with contextlib.suppress(OSError):
                self.wsock.close()


class Lane:
    """The sync request path of one shm slot: two one-way sockets, one frame in flight.

    Cheaper than a :class:`Channel` per frame (one ``send`` and usually one ``recv``
    call, no lock, no JSON parse of a header seen before): with 4 callers on 2 cores the
    per-request work between the model runs is what the process boundary costs in
    throughput. A frame is :data:`LANE_HEAD` (header length, payload length, request id,
    ``aux``), a compact JSON header, then the payload. Headers of ``predict`` and
    ``result`` frames are cached parsed (with their compiled descriptors), so callers
    must not change the header dict :meth:`recv` returns.

    Only one thread sends and one thread receives at a time (the slot's holder, or the
    thread draining a late reply after it gave up).
    """

    def __init__(self, sock: socket.socket, wsock: socket.socket):
        self.sock = sock
        self.wsock = wsock
        self._buf = bytearray(LANE_BUF)
        self._view = memoryview(self._buf)
        self._parsed: BoundedCache[bytes, tuple[dict[str, Any], list[Tensor]]] = BoundedCache(256)
        self._encoded: BoundedCache[tuple[Any, ...], bytes] = BoundedCache(256)

    def send(
        self, rid: int, aux: int, header: dict[str, Any], payload: list[Any] | None = None
    ) -> None:
        hb = self._encode(header)
        if not payload:
            self.wsock.sendall(LANE_HEAD.pack(len(hb), 0, rid, aux) + hb)
            return
        parts = [memoryview(b).cast("B") for b in payload]
        total = 0
        for v in parts:
            total += v.nbytes
        head = LANE_HEAD.pack(len(hb), total, rid, aux) + hb
        views = [memoryview(head), *parts]
        sent = self.wsock.sendmsg(views[:512])
        if sent == len(head) + total:
            return  # the common case: all of it in one call
        views = _skip(views, sent)
        while views:
            views = _skip(views, self.wsock.sendmsg(views[:512]))

    def recv(self) -> tuple[int, int, dict[str, Any], list[Tensor], bytearray]:
        """(request id, aux, header, its compiled tensor descriptors, payload).

        The payload is the caller's own buffer (no view of the lane's). A short read,
        a second frame behind the first or a malformed header raise ChannelClosed."""
        buf, view, n = self._buf, self._view, LANE_HEAD.size
        try:
            got = _read_at_least(self.sock, view, 0, n)
            hl, pl, rid, aux = LANE_HEAD.unpack_from(buf)
            if hl > MAX_HEADER:
                raise ChannelClosed(f"frame header of {hl} bytes")
            end = n + hl + pl
            if end <= len(buf):
                if _read_at_least(self.sock, view, got, end) > end:
                    raise ChannelClosed("a lane frame followed by more bytes")  # one at a time
                hb = bytes(view[n : n + hl])
                payload = bytearray(view[n + hl : end])
            else:
                whole = bytearray(end - n)
                whole[: got - n] = view[n:got]
                _read_at_least(self.sock, memoryview(whole), got - n, end - n)
                hb = bytes(whole[:hl])
                payload = whole[hl:]
            header, tensors = self._parse(hb)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # garbled = a dead peer
            raise ChannelClosed(str(exc)) from exc
        return rid, aux, header, tensors, payload

    def _encode(self, header: dict[str, Any]) -> bytes:
        """The JSON of a header; that of a ``predict`` or ``result`` (op, descriptors and
        their count in shm only) is kept, keyed by its values."""
        if header.keys() <= _CACHEABLE and "t" in header:
            try:
                key = (
                    header["op"],
                    header.get("shm"),
                    *(tuple(d.items()) for d in header["t"]),
                )
                hb = self._encoded.get(key)
            except TypeError:  # a value that is not hashable: no cache
                return _JSON.encode(header).encode()
            if hb is None:
                hb = _JSON.encode(header).encode()
                self._encoded.remember(key, hb)
            return hb
        return _JSON.encode(header).encode()

    def _parse(self, hb: bytes) -> tuple[dict[str, Any], list[Tensor]]:
        hit = self._parsed.get(hb)
        if hit is not None:
            return hit
        header = json.loads(hb)
        if not isinstance(header, dict):
            raise ValueError("frame header is not an object")
        if header.get("op") not in ("predict", "result"):
            return header, []  # errors: rare, and their messages differ
        tensors = compile_descs(header["t"])
        self._parsed.remember(hb, (header, tensors))
        return header, tensors

    def close(self) -> None:
        for s in (self.sock, self.wsock):
            with contextlib.suppress(OSError):
                s.close()


def _read_at_least(sock: socket.socket, view: memoryview, got: int, need: int) -> int:
    """Fill ``view`` from ``got`` until at least ``need`` bytes are in; the new count."""
    while got < need:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ChannelClosed("peer closed the connection")
        got += k
    return got


def _frame(header: dict[str, Any], payload: list[bytes | memoryview] | None) -> list[Any]:
    hb = _JSON.encode(header).encode()
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
        self._cv = threading.Condition()
        self._waiting = 0
        self.closed = False
        # Shared regions by id: SharedRegion in the parent, MappedRegion in the child.
        self.regions: dict[int, Any] = {}

    def acquire(self, timeout: float | None) -> int | None:
        with self._cv:
            if self._free:
                return self._free.pop()
            self._waiting += 1
            try:
                if not self._cv.wait_for(lambda: bool(self._free), timeout):
                    return None
            finally:
                self._waiting -= 1
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cv:
            self._free.append(slot)
            if self._waiting:  # Condition.notify is Python code: only when needed
                self._cv.notify()

    def close(self) -> None:
        self.closed = True
        # BufferError: a view is still alive; the mapping goes with the process.
        with contextlib.suppress(BufferError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SharedRegion:
    """A memfd the caller fills directly; inputs inside it reach the worker uncopied.

    Made by :meth:`agent.serving.worker.ModelWorker.shared_region`, which also maps it into
    the worker (read-only there). Arrays from :meth:`ndarray` stay valid after
    :meth:`close`, but are copied again from then on.
    """

    def __init__(self, rid: int, nbytes: int, on_close: Any = None):
        if nbytes <= 0:
            raise ValueError("a shared region needs at least one byte")
        self.id = rid
        self.size = nbytes
        self.fd = os.memfd_create(f"edgeward-region-{rid}", 0)
        self.ro_fd = -1
        try:
            os.ftruncate(self.fd, nbytes)
            # What the worker gets: a read-only open of the same memfd, so neither a bug
            # nor a hostile run script there can map it writable and change our data.
            self.ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            self.mm = mmap.mmap(self.fd, nbytes)
        except BaseException:
            for fd in (self.fd, self.ro_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        self.addr = np.frombuffer(self.mm, np.uint8).__array_interface__["data"][0]
        self.closed = False
        self._on_close = on_close

    def ndarray(
        self, shape: tuple[int, ...] | list[int], dtype: Any, offset: int = 0
    ) -> np.ndarray:
        """A writable C-contiguous array over ``[offset, offset + its size)`` of the region."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + count * dt.itemsize > self.size:
            raise ValueError(
                f"{count * dt.itemsize} bytes at offset {offset} exceed the region ({self.size})"
            )
        return np.frombuffer(self.mm, dt, count, offset).reshape(shape)

    def locate(self, arr: np.ndarray) -> int | None:
        """Offset of ``arr``'s data in this region, or None if it is not all inside."""
        if self.closed or not arr.flags.c_contiguous:
            return None
        off = int(arr.__array_interface__["data"][0]) - self.addr
        return off if off >= 0 and off + arr.nbytes <= self.size else None

    def close(self) -> None:
        """Unmap it from the worker and free it (the pages go with the last array)."""
        if self.closed:
            return
        self.closed = True
        if self._on_close is not None:
            self._on_close(self)
        for fd in (self.fd, self.ro_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(BufferError):  # arrays still use it: freed with them
            self.mm.close()


class MappedRegion:
    """The worker's read-only mapping of a :class:`SharedRegion` (from its fd)."""

    def __init__(self, fd: int, nbytes: int):
        try:
            if os.fstat(fd).st_size < nbytes:
                raise ValueError(f"shared region fd holds fewer than {nbytes} bytes")
            self.mm = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.size = nbytes

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a request still reads it: freed after
            self.mm.close()


def _in_region(regions: dict[int, SharedRegion], arr: np.ndarray) -> tuple[int, int] | None:
    """(region id, offset) of the region ``arr`` lies in, if any."""
    for region in list(regions.values()):  # another thread may add or close one
        off = region.locate(arr)
        if off is not None:
            return region.id, off
    return None


def encode(
    arrays: dict[str, Any],
    arena: ShmArena | None,
    slot: int | None,
    regions: dict[int, SharedRegion] | None = None,
) -> tuple[list[dict[str, Any]], list[bytes | memoryview], int, int]:
    """Describe ``arrays`` for a frame; big ones are copied into the slot, unless they
    lie in one of ``regions`` (then only their place is sent).

    Returns (tensor descriptors, inline payload parts, number of tensors copied to shm,
    number of tensors left in a region).
    """
    descs: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    inline_off = 0
    shm_off = 0
    n_shm = n_reg = 0
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
        place = _in_region(regions, arr) if regions and nbytes else None
        if place is not None:
            d.update(e="reg", r=place[0], o=place[1])
            descs.append(d)
            n_reg += 1
            continue
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
    return descs, parts, n_shm, n_reg


# A tensor descriptor checked and converted once: (name, encoding, dtype, shape, offset,
# length, element count, region id).
Tensor = tuple[str, str, "np.dtype[Any] | None", tuple[int, ...], int, int, int, Any]
_ENCODINGS = ("raw", "shm", "reg", "bytes")


def compile_descs(descs: list[dict[str, Any]]) -> list[Tensor]:
    """Check the descriptors of a frame and convert their fields (ValueError if bad)."""
    if not isinstance(descs, list):
        raise ValueError("tensor descriptors are not a list")
    out: list[Tensor] = []
    for d in descs:
        e = d["e"]
        if e not in _ENCODINGS:
            raise ValueError(f"unknown tensor encoding {e!r}")
        off, ln = int(d["o"]), int(d["l"])
        if e == "bytes":
            out.append((str(d["n"]), e, None, tuple(int(x) for x in d["s"]), off, ln, 0, None))
            continue
        dtype = np.dtype(d["t"])
        shape = tuple(int(x) for x in d["s"])
        count = ln // dtype.itemsize if dtype.itemsize else 0
        out.append((str(d["n"]), e, dtype, shape, off, ln, count, d.get("r")))
    return out


def decode(
    descs: list[dict[str, Any]] | list[Tensor],
    payload: bytearray | memoryview,
    arena: ShmArena | None,
    *,
    copy: bool,
    compiled: bool = False,
) -> dict[str, np.ndarray]:
    """Rebuild arrays; shm tensors are views unless ``copy`` (the slot will be reused).

    ``descs`` are a frame's descriptors, or with ``compiled`` what :func:`compile_descs`
    made of them."""
    tensors = cast("list[Tensor]", descs) if compiled else compile_descs(cast(Any, descs))
    out: dict[str, np.ndarray] = {}
    for name, e, dtype, shape, off, ln, count, rid in tensors:
        if e == "bytes":
            if off < 0 or off + ln > memoryview(payload).nbytes:
                raise InvalidInputError(
                    f"tensor {name!r}: BYTES data outside the frame", code="invalid-input"
                )
            out[name] = decode_bytes(memoryview(payload)[off : off + ln], shape, name)
        elif e == "shm":
            if arena is None:
                raise ChannelClosed("shared-memory tensor without an arena")
            a = np.frombuffer(arena.mm, dtype=dtype, count=count, offset=off).reshape(shape)
            out[name] = a.copy() if copy else a
        elif e == "reg":
            region = arena.regions.get(rid) if arena is not None and type(rid) is int else None
            if region is None:
                raise InvalidInputError(
                    f"input {name!r} is in shared region {rid}, unknown to the worker",
                    code="invalid-input",
                )
            assert dtype is not None
            if off < 0 or off + ln > region.size or count * dtype.itemsize != ln:
                raise InvalidInputError(
                    f"input {name!r}: {ln} bytes at {off} outside shared region {rid}",
                    code="invalid-input",
                )
            out[name] = np.frombuffer(region.mm, dtype=dtype, count=count, offset=off).reshape(
                shape
            )
        else:
            out[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=off).reshape(shape)
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
