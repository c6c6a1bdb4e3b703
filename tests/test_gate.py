"""agent.serving.kserve.Gate: the one admission gate, through both of its faces."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.errors import OverloadedError
from agent.serving.kserve import Gate


def test_blocking_face_queues_then_refuses_then_hands_over() -> None:
    gate = Gate(1, 1)
    gate.acquire_blocking("m")
    got = threading.Event()

    def waiter() -> None:
        gate.acquire_blocking("m")
        got.set()

    t = threading.Thread(target=waiter)
    t.start()
    while not gate.waiters:  # the waiter is queued (no timing: it shows in the queue)
        threading.Event().wait(0.001)
    with pytest.raises(OverloadedError) as ei:
        gate.acquire_blocking("m")
    assert ei.value.retry_after == 1.0
    assert "'m' is overloaded (1 running, 1 queued)" in str(ei.value)
    assert not got.is_set()
    gate.release()  # the slot passes to the waiter: still one running
    t.join()
    assert got.is_set() and gate.active == 1 and not gate.waiters
    gate.release()
    assert gate.active == 0


def test_async_face_queues_then_refuses_then_hands_over() -> None:
    async def main() -> None:
        gate = Gate(1, 1)
        await gate.acquire("m")
        second = asyncio.ensure_future(gate.acquire("m"))
        await asyncio.sleep(0)
        assert len(gate.waiters) == 1 and not second.done()
        with pytest.raises(OverloadedError):
            await gate.acquire("m")
        gate.release()
        await second
        assert gate.active == 1
        # a waiter cancelled after it was handed the slot passes it on
        third = asyncio.ensure_future(gate.acquire("m"))
        await asyncio.sleep(0)
        gate.release()
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        assert gate.active == 0 and not gate.waiters

    asyncio.run(main())
