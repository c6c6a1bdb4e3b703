"""The worker's transport (agent/serving/transport.py) from synchronous callers: requests
from several threads, their replies read by the worker's private event loop (real child
process)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import InvalidInputError, RuntimeBackendError, WorkerError
from agent.serving.worker import ModelWorker
from tests.helpers import toy_worker, wait_state


def _in_flight_zero(w: ModelWorker, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while w.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.02)
    assert w.stats()["in_flight"] == 0


def test_timed_out_request_keeps_its_slot_until_the_late_reply(tmp_path: Path) -> None:
    """One slot: the late reply frees it, and the next caller gets its own answer (not
    the stale one)."""
    w = toy_worker(tmp_path, max_concurrency=1)
    w.start()
    try:
        with pytest.raises(WorkerError) as info:
            w.predict({"x": np.ones(2), "sleep": np.array([0.5])}, timeout=0.1)
        assert info.value.code == "worker-timeout"
        assert w.stats()["in_flight"] == 1  # its reply is still awaited
        out = w.predict({"x": np.full(30_000, 7.0)}, timeout=20)  # through the one slot
        assert out["y"].tolist() == [14.0] * 30_000
        out = w.predict({"x": np.full(3, 7.0)}, timeout=20)
        assert out["y"].tolist() == [14.0, 14.0, 14.0]
        _in_flight_zero(w)
        assert w.stats()["errors"] == 1
    finally:
        w.stop()


def test_kill_9_fails_requests_with_shm_inputs_then_the_new_child_serves(
    tmp_path: Path,
) -> None:
    w = toy_worker(tmp_path, max_concurrency=3)
    w.start()
    try:
        pid0 = w.pid
        errors: list[BaseException] = []

        def slow(i: int) -> None:
            big = np.full(40_000, float(i))  # 320 KB: through the slot
            try:
                w.predict({"x": big, "sleep": np.array([5.0])})
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=slow, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        end = time.monotonic() + 10
        while w.stats()["in_flight"] < 3 and time.monotonic() < end:
            time.sleep(0.01)
        os.kill(pid0 or 0, signal.SIGKILL)
        for t in ts:
            t.join(10)
        assert len(errors) == 3
        for e in errors:
            assert isinstance(e, WorkerError) and e.code == "worker-crashed"
            assert "SIGKILL" in e.message
        wait_state(w, "ready")
        outs: dict[int, float] = {}

        def fast(i: int) -> None:
            for k in range(10):
                x = np.full(40_000 if k % 2 else 3, float(i * 10 + k))
                out = w.predict({"x": x}, timeout=20)
                assert int(out["pid"][0]) != pid0
                outs[i * 10 + k] = float(out["y"][-1])

        ts = [threading.Thread(target=fast, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        w.self_test()  # on the same channel meanwhile
        for t in ts:
            t.join(30)
        assert outs == {n: 2.0 * n for n in range(30)}
        assert w.stats()["shm_tensors_in"] > 0 and w.stats()["restarts"] == 1
        _in_flight_zero(w)
    finally:
        w.stop()


def test_stop_answers_requests_in_flight(tmp_path: Path) -> None:
    w = toy_worker(tmp_path, max_concurrency=2)
    w.start()
    res: list[object] = []

    def call(v: float) -> None:
        res.append(w.predict({"x": np.full(20_000, v), "sleep": np.array([0.4])}))

    ts = [threading.Thread(target=call, args=(float(i),)) for i in range(2)]
    for t in ts:
        t.start()
    end = time.monotonic() + 10
    while w.stats()["in_flight"] < 2 and time.monotonic() < end:
        time.sleep(0.01)
    pid = w.pid
    w.stop(drain_timeout=10)
    for t in ts:
        t.join(5)
    assert len(res) == 2
    assert sorted(float(r["y"][0]) for r in res) == [0.0, 2.0]  # type: ignore[index]
    with pytest.raises(ProcessLookupError):
        os.kill(pid or 0, 0)


def test_frames_of_every_size(tmp_path: Path) -> None:
    """Inline frames below and above one read, shm tensors, and tensors bigger than the
    slot (inline, MBs each way) all cross intact, from several threads."""
    w = toy_worker(tmp_path, max_concurrency=3, shm_slot_bytes=1 << 20)
    w.start()
    try:
        sizes = [1, 100, 600, 5_000, 40_000, 400_000]  # 8 B ... 3.2 MB (> slot: inline)
        bad: list[str] = []

        def call(i: int) -> None:
            for n in sizes:
                x = np.arange(n, dtype=np.float64) + i
                out = w.predict({"x": x}, timeout=30)
                if not np.array_equal(out["y"], x * 2):
                    bad.append(f"{i}/{n}")

        ts = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not bad and not any(t.is_alive() for t in ts)
        assert w.stats()["shm_tensors_in"] == 3  # only the 320 KB ones fit a 1 MiB slot
    finally:
        w.stop()


def test_model_errors_answer_that_request_only(tmp_path: Path) -> None:
    """An OSError raised by the model (like a run script missing a file) and a bad input
    are answered with their message; the worker then serves the next request."""
    w = toy_worker(tmp_path, max_concurrency=1)
    w.start()
    try:
        big = np.arange(20_000, dtype=np.float64)  # 160 KB: through the shm slot
        for _ in range(2):
            with pytest.raises(RuntimeBackendError, match=r"labels\.txt") as info:
                w.predict({"x": big, "oserror": np.ones(1)}, timeout=20)
            assert info.value.status == 500
            with pytest.raises(InvalidInputError, match="'x' is missing"):
                w.predict({"z": np.ones(2)}, timeout=20)
            np.testing.assert_array_equal(w.predict({"x": big}, timeout=20)["y"], big * 2)
            np.testing.assert_array_equal(w.predict({"x": big + 1}, timeout=20)["y"], big * 2 + 2)
        st = w.stats()
        assert (st["errors"], st["requests"], st["in_flight"]) == (4, 8, 0)
        assert st["child_busy_us"] > 0  # the child's busy time crosses in the reply
    finally:
        w.stop()


@pytest.mark.parametrize("how", ["garble", "hangup"])
def test_junk_for_a_reply_kills_the_child_and_fails_only_its_requests(
    tmp_path: Path, how: str
) -> None:
    """A child that writes junk where its reply belongs (garble), or shuts its sockets
    while it keeps running (hangup: EOF without an exit), is as good as dead: the
    caller gets ``worker-crashed`` at once (not at its timeout), the child is killed,
    and the new one serves."""
    w = toy_worker(tmp_path, max_concurrency=2)
    w.start()
    try:
        pid0 = w.pid
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as info:
            w.predict({"x": np.ones(3), how: np.ones(1)}, timeout=25)
        assert info.value.code == "worker-crashed" and time.monotonic() - t0 < 15
        wait_state(w, "ready")
        assert w.pid != pid0
        assert w.predict({"x": np.ones(3)}, timeout=20)["y"].tolist() == [2.0] * 3
        with pytest.raises(ProcessLookupError):
            os.kill(pid0 or 0, 0)
    finally:
        w.stop()


@pytest.mark.parametrize("big", [False, True], ids=["inline", "shm"])
def test_every_slot_is_served_at_once(tmp_path: Path, big: bool) -> None:
    """max_concurrency requests are inside the model together (each on a lane of its
    own): the toy's barrier lets none of them return until all of them are in."""
    w = toy_worker(tmp_path, max_concurrency=3)
    w.start()
    try:
        x = np.arange(30_000 if big else 3, dtype=np.float64)
        outs: list[Any] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                outs.append(w.predict({"x": x, "barrier": np.array([3])}, timeout=30))
            except BaseException as exc:
                errors.append(exc)

        for _round in range(2):  # the lanes serve again once answered
            outs.clear()
            threads = [threading.Thread(target=call) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(40)
            assert not errors
            assert len(outs) == 3
            for out in outs:
                np.testing.assert_array_equal(out["y"], x * 2)
        assert w.stats()["shm_tensors_in"] == (6 if big else 0)
    finally:
        w.stop()


def test_more_callers_than_lanes_wait_for_one(tmp_path: Path) -> None:
    """Twelve callers, two lanes: the rest wait for a lane (not an error) and every
    caller gets its own answer."""
    w = toy_worker(tmp_path, max_concurrency=2)
    w.start()
    try:
        got: dict[int, Any] = {}

        def call(i: int) -> None:
            got[i] = w.predict({"x": np.full(4, float(i)), "sleep": np.array([0.02])}, timeout=30)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got) == list(range(12))
        for i, out in got.items():
            assert out["y"].tolist() == [2.0 * i] * 4
        _in_flight_zero(w)
    finally:
        w.stop()
