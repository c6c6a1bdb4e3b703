"""agent.serving.http.BodyBuffer: a request body received in pieces comes out whole and
writable whatever its size (a bytearray up to 64 KiB, memory not zero-filled up to
1 MiB, an anonymous mapping above), and every byte charged goes back to the budget."""

from __future__ import annotations

import os

import numpy as np
import pytest

from agent.serving.h1 import ProtocolError
from agent.serving.http import BodyBudget, BodyBuffer


@pytest.mark.parametrize("size", [10, 64 * 1024, 100_000, 600_000, 1 << 20, 3_000_000])
@pytest.mark.parametrize("prefix", [0, 5, 64 * 1024], ids=["none", "small", "full"])
def test_a_body_received_in_pieces_comes_out_whole(size: int, prefix: int) -> None:
    budget = BodyBudget(1 << 30)
    data = os.urandom(size)
    head = data[: min(prefix, size)]
    bb = BodyBuffer(size, budget, head)
    pos = len(head)
    step = 40_009  # odd pieces, as a socket delivers them
    while not bb.done:
        w = bb.window()
        assert len(w) > 0
        k = min(len(w), step, size - pos)
        w[:k] = data[pos : pos + k]
        bb.advance(k)
        pos += k
    body = bb.take()
    assert len(body) == size and bytes(body) == data
    arr = np.frombuffer(body, dtype=np.uint8)
    assert arr.flags.writeable  # as numpy.frombuffer on a bytearray
    bb.release()
    bb.release()  # idempotent
    assert budget.used == 0


def test_a_body_over_the_budget_is_refused_as_it_grows() -> None:
    budget = BodyBudget(200_000)
    bb = BodyBuffer(600_000, budget, b"x" * 1000)  # declared: only what arrived is charged
    assert budget.used == 64 * 1024
    bb.advance(len(bb.window()))  # the first 64 KiB are in
    with pytest.raises(ProtocolError) as info:
        bb.window()  # growing to 600 KB would pass the budget
    assert info.value.code == "body-budget"
    bb.release()
    assert budget.used == 0
