"""ipc.Channel frames over real socketpairs: sizes, shared-memory slots, garbled input."""

from __future__ import annotations

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
