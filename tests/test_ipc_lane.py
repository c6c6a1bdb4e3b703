"""ipc.Lane frames over real socketpairs: sizes, the header cache, garbled input."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from agent.serving import ipc


@pytest.fixture
def pair() -> Iterator[tuple[ipc.Lane, ipc.Lane, socket.socket]]:
    """(sender, receiver, the receiver's raw write end for hand-made frames)."""
    a_r, a_w = socket.socketpair()
    b_r, b_w = socket.socketpair()
    sender, receiver = ipc.Lane(b_r, a_w), ipc.Lane(a_r, b_w)
    yield sender, receiver, a_w
    sender.close()
    receiver.close()


def _send_in_thread(lane: ipc.Lane, *args: object) -> threading.Thread:
    t = threading.Thread(target=lane.send, args=args)
    t.start()
    return t


def test_frames_below_and_above_one_read_cross_intact(
    pair: tuple[ipc.Lane, ipc.Lane, socket.socket],
) -> None:
    sender, receiver, _ = pair
    for n in (0, 3, 1000, ipc.LANE_BUF // 8, 3 * ipc.LANE_BUF // 8, 400_000):
        x = np.arange(n, dtype=np.float64)
        descs, parts, _, _ = ipc.encode({"x": x}, None, None)
        t = _send_in_thread(sender, 7 + n, 42, {"op": "predict", "t": descs}, parts)
        rid, aux, h, tensors, payload = receiver.recv()
        t.join()
        assert (rid, aux, h["op"]) == (7 + n, 42, "predict")
        out = ipc.decode(tensors, payload, None, copy=False, compiled=True)
        np.testing.assert_array_equal(out["x"], x)


def test_a_header_seen_before_is_parsed_once_and_payloads_are_not_shared(
    pair: tuple[ipc.Lane, ipc.Lane, socket.socket],
) -> None:
    sender, receiver, _ = pair
    got = []
    for v in (1.0, 2.0):
        descs, parts, _, _ = ipc.encode({"y": np.full(4, v)}, None, None)
        sender.send(1, 0, {"op": "result", "t": descs, "shm": 0}, parts)
        got.append(receiver.recv())
    assert got[0][2] is got[1][2] and got[0][3] is got[1][3]  # cached parse
    first = ipc.decode(got[0][3], got[0][4], None, copy=False, compiled=True)["y"]
    assert first.tolist() == [1.0] * 4  # the second frame did not overwrite the first
    fails = []
    for rid in (2, 3):
        sender.send(rid, 0, {"op": "fail", "err": {"msg": "a"}})
        fails.append(receiver.recv()[2])
    assert fails[0] == fails[1] and fails[0] is not fails[1]  # errors are not cached


@pytest.mark.parametrize(
    "frame",
    [
        ipc.LANE_HEAD.pack(2, 0, 1, 0) + b"{}" + ipc.LANE_HEAD.pack(2, 0, 2, 0) + b"{}",
        ipc.LANE_HEAD.pack(ipc.MAX_HEADER + 1, 0, 1, 0),
        ipc.LANE_HEAD.pack(2, 0, 1, 0) + b"[]",
        ipc.LANE_HEAD.pack(7, 0, 1, 0) + b"{nope!}",
        ipc.LANE_HEAD.pack(26, 0, 1, 0) + b'{"op":"predict","t":[{}]}',
        ipc.LANE_HEAD.pack(44, 0, 1, 0) + b'{"op":"predict","t":[{"e":"elsewhere","o":0}]}',
        ipc.LANE_HEAD.pack(2, 10, 1, 0) + b"{}abc",  # then EOF
        ipc.LANE_HEAD.pack(2, 1 << 20, 1, 0) + b"{}abc",  # bigger than a read, then EOF
        ipc.LANE_HEAD.pack(2, 0, 1, 0)[:5],
    ],
    ids=[
        "two-frames",
        "huge-header",
        "not-object",
        "not-json",
        "no-fields",
        "bad-encoding",
        "eof",
        "eof-big",
        "eof-prefix",
    ],
)
def test_garbled_frames_close_the_lane(
    pair: tuple[ipc.Lane, ipc.Lane, socket.socket], frame: bytes
) -> None:
    _, receiver, raw = pair
    raw.sendall(frame)
    raw.shutdown(socket.SHUT_WR)
    with pytest.raises(ipc.ChannelClosed):
        receiver.recv()


def test_headers_kept_encoded_still_say_each_tensor_s_shape_and_place(
    pair: tuple[ipc.Lane, ipc.Lane, socket.socket],
) -> None:
    """The sender keeps a header's JSON keyed by its values: tensors with the same bytes
    but another shape, type or place must not reuse it."""
    sender, receiver, _ = pair
    arena = ipc.ShmArena(2, 1 << 20)
    try:
        base = np.arange(24_000, dtype=np.float32)  # 96 KB: through a slot
        cases = [base, base.reshape(4, 6000), base.view(np.int32), base.reshape(4, 6000)]
        for slot, x in [(0, c) for c in cases] + [(1, base)]:
            descs, parts, n_shm, _ = ipc.encode({"x": x}, arena, slot)
            sender.send(slot, 0, {"op": "result", "t": descs, "shm": n_shm}, parts)
            _, _, h, tensors, payload = receiver.recv()
            assert h["shm"] == 1
            out = ipc.decode(tensors, payload, arena, copy=True, compiled=True)["x"]
            assert out.dtype == x.dtype and out.shape == x.shape
            np.testing.assert_array_equal(out, x)
    finally:
        arena.close()
