"""ipc.Channel frames over real socketpairs: sizes, shared-memory slots, garbled input."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from agent.serving import ipc


@pytest.fixture
def pair() -> Iterator[tuple[ipc.Channel, ipc.Channel, socket.socket]]:
    """(sender, receiver, the sender's raw socket for hand-made frames)."""
    a, b = socket.socketpair()
    sender, receiver = ipc.Channel(a), ipc.Channel(b)
    yield sender, receiver, a
    sender.close()
    receiver.close()


def _send_in_thread(chan: ipc.Channel, *args: Any) -> threading.Thread:
    t = threading.Thread(target=chan.send, args=args)
    t.start()
    return t


def test_frames_of_every_size_cross_intact(
    pair: tuple[ipc.Channel, ipc.Channel, socket.socket],
) -> None:
    sender, receiver, _ = pair
    for n in (0, 3, 1000, 8192, 400_000):  # up to 3.2 MB, more than a socket buffer
        x = np.arange(n, dtype=np.float64)
        descs, parts, n_shm = ipc.encode({"x": x}, None, None)
        assert n_shm == 0
        t = _send_in_thread(sender, {"op": "predict", "id": n, "t": descs}, parts)
        h, payload = receiver.recv()
        t.join()
        assert (h["op"], h["id"]) == ("predict", n)
        np.testing.assert_array_equal(ipc.decode(h["t"], payload, None, copy=False)["x"], x)


def test_big_tensors_go_through_the_slot_and_keep_shape_and_type(
    pair: tuple[ipc.Channel, ipc.Channel, socket.socket],
) -> None:
    sender, receiver, _ = pair
    arena = ipc.ShmArena(2, 1 << 20)
    try:
        base = np.arange(24_000, dtype=np.float32)  # 96 KB: through a slot
        for slot, x in [(0, base), (1, base.reshape(4, 6000)), (0, base.view(np.int32))]:
            descs, parts, n_shm = ipc.encode({"x": x, "small": np.ones(2)}, arena, slot)
            sender.send({"op": "result", "t": descs, "shm": n_shm}, parts)
            h, payload = receiver.recv()
            assert h["shm"] == 1
            out = ipc.decode(h["t"], payload, arena, copy=True)
            assert out["x"].dtype == x.dtype and out["x"].shape == x.shape
            np.testing.assert_array_equal(out["x"], x)
            assert out["small"].tolist() == [1.0, 1.0]
    finally:
        arena.close()


def _frame(header: bytes, payload_len: int = 0) -> bytes:
    return ipc.HEAD.pack(len(header), payload_len) + header


@pytest.mark.parametrize(
    "frame",
    [
        ipc.HEAD.pack(ipc.MAX_HEADER + 1, 0),
        _frame(b"[]"),
        _frame(b"{nope!}"),
        _frame(b"{}", 10) + b"abc",  # then EOF
        _frame(b"{}", 1 << 20) + b"abc",  # bigger than a read, then EOF
        ipc.HEAD.pack(2, 0)[:5],
    ],
    ids=["huge-header", "not-object", "not-json", "eof", "eof-big", "eof-prefix"],
)
def test_garbled_frames_close_the_channel(
    pair: tuple[ipc.Channel, ipc.Channel, socket.socket], frame: bytes
) -> None:
    _, receiver, raw = pair
    raw.sendall(frame)
    raw.shutdown(socket.SHUT_WR)
    with pytest.raises(ipc.ChannelClosed):
        receiver.recv()


@pytest.mark.parametrize(
    "descs",
    [
        [{}],
        [{"n": "x", "e": "elsewhere", "o": 0, "l": 0, "s": [0]}],
        [{"n": "x", "e": "raw", "t": "<f8", "o": 8, "l": 16, "s": [2]}],  # past the payload
        [{"n": "x", "e": "shm", "t": "<f8", "o": 0, "l": 8, "s": [1]}],  # no arena
        {"n": "x"},
    ],
    ids=["no-fields", "bad-encoding", "outside", "shm-without-arena", "not-a-list"],
)
def test_malformed_descriptors_are_refused(descs: Any) -> None:
    """What the daemon turns into a failed request (a reply is the child's word)."""
    with pytest.raises((ValueError, KeyError, ipc.ChannelClosed)):
        ipc.decode(descs, bytearray(16), None, copy=True)


def test_frames_written_together_are_read_one_by_one(
    pair: tuple[ipc.Channel, ipc.Channel, socket.socket],
) -> None:
    """The reader reads ahead: frames that arrive in one write (or a small frame then
    one bigger than the read-ahead buffer) still come out whole and in order."""
    _, receiver, raw = pair
    small = [ipc._frame({"op": "result", "id": i}, [bytes([i]) * i]) for i in range(1, 6)]
    big_payload = bytes(range(256)) * (ipc.READ_AHEAD // 128)  # 2 x the buffer
    frames = [*small, ipc._frame({"op": "result", "id": 99}, [big_payload]), small[0]]
    blob = b"".join(b"".join(bytes(p) for p in f) for f in frames)
    t = threading.Thread(target=raw.sendall, args=(blob,))
    t.start()
    for i in range(1, 6):
        h, p = receiver.recv()
        assert h == {"op": "result", "id": i} and bytes(p) == bytes([i]) * i
    h, p = receiver.recv()
    assert h["id"] == 99 and bytes(p) == big_payload
    h, p = receiver.recv()
    assert h["id"] == 1 and bytes(p) == b"\x01"
    t.join()


def _reader_frames(chunks: list[bytes], unread: bytes = b"") -> list[Any]:
    """What the daemon's non-blocking reader makes of ``chunks`` written one by one."""
    from agent.serving.transport import _EOF, _GARBLED, _FrameReader

    a, b = socket.socketpair()
    try:
        r = _FrameReader(b, unread)
        out: list[Any] = []
        for c in chunks:  # each chunk sent (from a thread: it may not fit the socket)
            t = threading.Thread(target=a.sendall, args=(c,))  # and read before the next
            t.start()
            while True:
                got = r.read()
                if got is None:
                    if not t.is_alive() and not select.select([b], [], [], 0)[0]:
                        break
                    select.select([b], [], [], 0.01)
                    continue
                if got is _EOF or got is _GARBLED:
                    out.append("eof" if got is _EOF else "garbled")
                    t.join()
                    return out
                h, p = got  # type: ignore[misc]
                out.append((h["id"], bytes(p)))
            t.join()
        a.close()
        got = r.read()
        while got is None:  # the socket says EOF on a read
            got = r.read()
        out.append("eof" if got is _EOF else "garbled" if got is _GARBLED else got)
        return out
    finally:
        a.close()
        b.close()


def test_the_daemons_reader_reassembles_frames_cut_anywhere() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: its buffer grows as the bytes arrive
    payloads = [b"", b"x" * 10, bytes(ipc.READ_AHEAD + 5), big, b"tail"]
    blob = b"".join(
        b"".join(bytes(p) for p in ipc._frame({"id": i}, [pl])) for i, pl in enumerate(payloads)
    )
    want = [(i, pl) for i, pl in enumerate(payloads)] + ["eof"]
    assert _reader_frames([blob]) == want  # all at once
    for cut in (1, 7, 8, 9, 20, 100, ipc.READ_AHEAD, len(blob) - 3):  # in two pieces
        assert _reader_frames([blob[:cut], blob[cut:]]) == want, cut
    step = 40_009  # in many odd pieces
    assert _reader_frames([blob[i : i + step] for i in range(0, len(blob), step)]) == want
    # bytes a Channel had read ahead before the reader took the socket over
    assert _reader_frames([blob[50:]], unread=blob[:50]) == want


@pytest.mark.parametrize(
    "junk",
    [
        ipc.HEAD.pack(ipc.MAX_HEADER + 1, 0),
        ipc.HEAD.pack(0, 0),
        _frame(b"[1]"),
        _frame(b"{no"),
        _frame(b'{"id": "\xff"}'),  # not UTF-8
        _frame(b"{}", ipc.MAX_FRAME),  # announces more than a frame may hold
    ],
    ids=["huge-header", "empty-header", "not-object", "not-json", "not-utf8", "huge-frame"],
)
def test_the_daemons_reader_calls_junk_garbled(junk: bytes) -> None:
    ok = b"".join(bytes(p) for p in ipc._frame({"id": 1}, [b"ok"]))
    assert _reader_frames([ok + junk]) == [(1, b"ok"), "garbled"]


def test_slots_wait_for_a_release_and_time_out() -> None:
    arena = ipc.ShmArena(2, 4096)
    try:
        a, b = arena.acquire(0.0), arena.acquire(0.0)
        assert {a, b} == {0, 1}
        assert arena.acquire(0.0) is None
        assert arena.acquire(0.05) is None  # waited, none came
        got: list[int | None] = []
        waiters = [threading.Thread(target=lambda: got.append(arena.acquire(30))) for _ in range(2)]
        for t in waiters:
            t.start()
        assert a is not None and b is not None
        arena.release(a)
        arena.release(b)
        for t in waiters:
            t.join(30)
        assert sorted(x for x in got if x is not None) == [0, 1]
        assert len(got) == 2
    finally:
        arena.close()


def test_coroutines_waiting_for_a_slot_get_freed_ones_in_order() -> None:
    import asyncio

    from agent.errors import ModelNotReadyError

    async def scenario() -> None:
        arena = ipc.ShmArena(1, 4096)
        try:
            held = await arena.acquire_async(None)  # free: no wait
            order: list[str] = []

            async def wait(name: str, timeout: float | None) -> int:
                slot = await arena.acquire_async(timeout)
                order.append(name)
                return slot

            a = asyncio.ensure_future(wait("a", None))
            b = asyncio.ensure_future(wait("b", None))
            late = asyncio.ensure_future(wait("late", 0.05))
            await asyncio.sleep(0.1)
            assert late.done() and isinstance(late.exception(), TimeoutError)
            c = asyncio.ensure_future(wait("c", None))
            await asyncio.sleep(0)
            c.cancel()  # gave up before its turn: it must not keep the slot
            arena.release(held)  # on the loop: handed to "a" directly
            assert await a == held
            t = threading.Thread(target=arena.release, args=(held,))  # from a thread
            t.start()
            assert await b == held
            t.join()
            assert order == ["a", "b"]
            arena.release(held)  # "c" was cancelled: the slot is free again
            assert arena.acquire(0.0) == held
            d = asyncio.ensure_future(arena.acquire_async(None))
            await asyncio.sleep(0)
            arena.close()  # a stopped worker: the waiter hears so at once
            with pytest.raises(ModelNotReadyError):
                await d
        finally:
            arena.close()

    asyncio.run(scenario())


def test_a_frame_over_the_callers_bound_closes_the_channel(
    pair: tuple[ipc.Channel, ipc.Channel, socket.socket],
) -> None:
    """The daemon reads a starting child's ``ready`` with a bound of a header alone:
    a frame that announces more is refused before anything is allocated for it."""
    _, receiver, raw = pair
    raw.sendall(_frame(b'{"op": "ready"}', ipc.MAX_HEADER))
    with pytest.raises(ipc.ChannelClosed, match="frame of"):
        receiver.recv(max_frame=ipc.MAX_HEADER)
