"""ModelWorker with real child processes: real models, real kill -9, real segfaults."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import (
    InvalidInputError,
    ModelNotReadyError,
    RuntimeBackendError,
    WorkerError,
)
from agent.serving.worker import ModelWorker
from runtime import RuntimeConfig, open_model
from tests.helpers import L, make_package, toy_worker

CLS_X = np.random.default_rng(7).random((1, 3, 48, 192), dtype=np.float32)


def test_onnx_same_outputs_large_via_shm(tmp_path: Path, ppocr_det: Path) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_det, name="det", version="2")
    cache = tmp_path / "cache"
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    s = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    want = s.predict({"x": x})
    s.close()
    w = ModelWorker("det", "2", pkg, RuntimeConfig(), cache_dir=cache)
    w.start()
    try:
        assert w.state == "ready" and w.pid is not None and w.pid != os.getpid()
        assert w.metadata()["name"] == "det"
        got = w.predict({"x": x})
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)
        st = w.stats()
        assert st["shm_tensors_in"] == 1 and st["shm_tensors_out"] >= 1
        assert st["requests"] == 1 and st["rss"] > 0
        got2 = asyncio.run(w.apredict({"x": x}))
        np.testing.assert_allclose(got2[k], want[k], rtol=1e-4, atol=1e-5)
        with pytest.raises(InvalidInputError) as ei:
            w.predict({"nope": x})
        assert ei.value.status == 400
        assert w.predict({"x": x}).keys() == want.keys()  # still serving
    finally:
        w.stop()
    assert w.state == "stopped" and w.pid is None


def test_tflite_same_outputs(tmp_path: Path, hand_tflite: Path) -> None:
    pkg = make_package(tmp_path / "pkg", hand_tflite, backend="litert")
    cache = tmp_path / "cache"
    s = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    spec = s.metadata()["inputs"][0]
    shape = [d if d > 0 else 1 for d in spec["shape"]]
    x = np.random.default_rng(2).random(shape, dtype=np.float32)
    want = s.predict({spec["name"]: x})
    s.close()
    w = ModelWorker("m", "1", pkg, RuntimeConfig(), cache_dir=cache)
    w.start()
    try:
        got = w.predict({spec["name"]: x})
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert w.stats()["shm_tensors_in"] == 1  # 224x224x3 float32 > 64 KiB
    finally:
        w.stop()


def test_kill_9_in_flight_fail_then_restart(tmp_path: Path) -> None:
    w = toy_worker(tmp_path)
    w.start()
    try:
        pid0 = w.pid
        assert pid0 is not None
        errors: list[BaseException] = []

        def slow() -> None:
            try:
                w.predict({"x": np.ones(3), "sleep": np.array([5.0])})
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=slow) for _ in range(3)]
        for t in ts:
            t.start()
        end = time.monotonic() + 10
        while w.stats()["in_flight"] < 3 and time.monotonic() < end:
            time.sleep(0.01)
        os.kill(pid0, signal.SIGKILL)
        for t in ts:
            t.join(10)
        assert len(errors) == 3
        for e in errors:
            assert isinstance(e, WorkerError) and e.code == "worker-crashed" and e.status == 503
            assert "SIGKILL" in e.message
        # A request issued now waits for the restart and succeeds.
        out = w.predict({"x": np.arange(4.0)}, timeout=20)
        np.testing.assert_array_equal(out["y"], np.arange(4.0) * 2)
        assert int(out["pid"][0]) != pid0 and w.pid != pid0
        assert w.state == "ready" and w.stats()["restarts"] == 1
        assert "SIGKILL" in str(w.stats()["last_error"])
    finally:
        w.stop()


def test_stream_survives_kill(tmp_path: Path) -> None:
    w = toy_worker(tmp_path)
    w.start()
    try:
        ok, failed = 0, 0
        for i in range(60):
            if i == 20:
                os.kill(w.pid or 0, signal.SIGKILL)
            try:
                big = np.full((300, 300), float(i), dtype=np.float32)  # via shm
                out = w.predict({"x": big}, timeout=20)
                assert out["y"][0, 0] == 2 * i
                ok += 1
            except (WorkerError, ModelNotReadyError):
                failed += 1
        assert ok >= 55 and w.stats()["restarts"] == 1
    finally:
        w.stop()


def test_child_errors_keep_class_and_code(tmp_path: Path) -> None:
    w = toy_worker(tmp_path)
    w.start()
    try:
        with pytest.raises(InvalidInputError) as ei:
            w.predict({"z": np.ones(2)})
        assert ei.value.code == "missing-input" and "'x'" in ei.value.message
        w.self_test()
        (w.model_dir / "bad").touch()
        with pytest.raises(RuntimeBackendError) as e2:
            w.self_test()
        assert e2.value.code == "self-test"
        assert w.stats()["errors"] == 1
    finally:
        w.stop()


def test_segfault_loader_is_clear_error(tmp_path: Path) -> None:
    w = toy_worker(tmp_path, loader=f"{L}:segfault")
    with pytest.raises(WorkerError) as ei:
        w.start(timeout=60)
    assert ei.value.code == "worker-crashed" and "SIGSEGV" in ei.value.message
    assert w.state == "failed"
    with pytest.raises(ModelNotReadyError):
        w.predict({"x": np.ones(1)}, timeout=0.1)


def test_failing_start_carries_child_error(tmp_path: Path) -> None:
    w = toy_worker(tmp_path, loader=f"{L}:failing")
    with pytest.raises(WorkerError) as ei:
        w.start(timeout=60)
    assert ei.value.code == "converter-stage" and "onnxsim failed" in ei.value.message


def test_memory_cap_restarts(tmp_path: Path) -> None:
    w = toy_worker(tmp_path, memory_limit_bytes=200 << 20)
    w.start()
    try:
        pid0 = w.pid
        assert w.rss_bytes() < 200 << 20
        with pytest.raises(WorkerError) as ei:
            w.predict({"hog": np.array([400])}, timeout=25)
        assert ei.value.code == "worker-memory" and "memory limit" in ei.value.message
        out = w.predict({"x": np.ones(2)}, timeout=20)
        assert out["y"].tolist() == [2.0, 2.0] and w.pid != pid0
    finally:
        w.stop()


def test_stop_drains(tmp_path: Path) -> None:
    w = toy_worker(tmp_path)
    w.start()
    res: list[object] = []
    t = threading.Thread(
        target=lambda: res.append(w.predict({"x": np.ones(1), "sleep": np.array([0.5])}))
    )
    t.start()
    end = time.monotonic() + 10
    while w.stats()["in_flight"] < 1 and time.monotonic() < end:
        time.sleep(0.01)
    pid = w.pid
    w.stop(drain_timeout=10)
    t.join(5)
    assert len(res) == 1 and isinstance(res[0], dict)
    assert w.state == "stopped" and pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ModelNotReadyError):
        w.predict({"x": np.ones(1)}, timeout=0.1)


def test_apredict_concurrent_more_than_slots(tmp_path: Path) -> None:
    w = toy_worker(tmp_path, max_concurrency=2)
    w.start()

    async def many() -> list[dict[str, np.ndarray]]:
        xs = [np.full((200, 200), float(i), dtype=np.float32) for i in range(8)]
        return await asyncio.gather(*(w.apredict({"x": x}, timeout=20) for x in xs))

    try:
        outs = asyncio.run(many())
        assert [float(o["y"][5, 5]) for o in outs] == [2.0 * i for i in range(8)]
        assert w.stats()["shm_tensors_in"] == 8 and w.stats()["in_flight"] == 0
    finally:
        w.stop()


def test_restart_after_stop_gets_fresh_arena(tmp_path: Path) -> None:
    w = toy_worker(tmp_path)
    w.start()
    w.stop()
    w.start()
    try:
        big = np.ones((300, 300), dtype=np.float32)
        assert float(w.predict({"x": big})["y"][0, 0]) == 2.0
        assert w.stats()["shm_tensors_in"] == 1
    finally:
        w.stop()


def test_parent_does_not_import_engines() -> None:
    import subprocess
    import sys

    code = (
        "import sys, agent.serving.worker; "
        "print(any(m in sys.modules for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime')))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_loop_mode_replies_read_by_the_event_loop(tmp_path: Path) -> None:
    """loop=...: the event loop reads the replies (no reader thread); kill -9 in flight,
    restart, sync callers from other threads and stop/start all keep working."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        w = toy_worker(tmp_path, loop=loop, max_concurrency=2)
        await loop.run_in_executor(None, w.start)
        try:
            # the daemon's loop reads the replies: no thread of the worker's own does
            assert not any(t.name.startswith("worker-toy-r") for t in threading.enumerate()), [
                t.name for t in threading.enumerate()
            ]
            xs = [np.full((200, 200), float(i), dtype=np.float32) for i in range(6)]  # shm
            small = [np.arange(3.0) + i for i in range(6)]  # inline
            outs = await asyncio.gather(*(w.apredict({"x": x}, timeout=20) for x in xs + small))
            assert [float(o["y"].reshape(-1)[5]) for o in outs[:6]] == [2.0 * i for i in range(6)]
            for i, o in enumerate(outs[6:]):
                np.testing.assert_array_equal(o["y"], (np.arange(3.0) + i) * 2)
            # a synchronous caller on another thread is answered by the loop
            sync = await loop.run_in_executor(None, w.predict, {"x": np.ones(2)})
            np.testing.assert_array_equal(sync["y"], [2.0, 2.0])
            with pytest.raises(RuntimeError, match="apredict"):
                w.predict({"x": np.ones(2)})
            pid0 = w.pid
            slow = [
                asyncio.ensure_future(w.apredict({"x": np.ones(1), "sleep": np.array([5.0])}))
                for _ in range(2)
            ]
            while w.stats()["in_flight"] < 2:
                await asyncio.sleep(0.01)
            os.kill(pid0 or 0, signal.SIGKILL)
            for f in slow:
                with pytest.raises(WorkerError) as info:
                    await f
                assert info.value.code == "worker-crashed" and "SIGKILL" in info.value.message
            out = await w.apredict({"x": np.arange(4.0)}, timeout=20)
            np.testing.assert_array_equal(out["y"], np.arange(4.0) * 2)
            assert w.pid != pid0 and w.stats()["restarts"] == 1
        finally:
            await loop.run_in_executor(None, w.stop)
        # stopped and started again: the new socket (maybe the same fd number) is watched
        await loop.run_in_executor(None, w.start)
        try:
            out = await w.apredict({"x": np.ones(5)}, timeout=20)
            np.testing.assert_array_equal(out["y"], np.full(5, 2.0))
        finally:
            await loop.run_in_executor(None, w.stop)
        assert w.stats()["in_flight"] == 0

    asyncio.run(scenario())


def test_no_loop_given_a_private_loop_reads_mixed_sync_async_and_timeouts(tmp_path: Path) -> None:
    """No event loop given: the worker reads its replies on a loop thread of its own, for
    sync callers on several threads and apredict callers on another loop alike; a
    timed-out request's late reply is still read, and stop ends that thread."""
    w = toy_worker(tmp_path, max_concurrency=4)
    w.start()
    try:
        assert any(t.name == "worker-toy-replies" for t in threading.enumerate())
        with pytest.raises(WorkerError) as info:  # its lane stays busy past the timeout
            w.predict({"x": np.ones(1), "sleep": np.array([1.0])}, timeout=0.2)
        assert info.value.code == "worker-timeout"
        results: dict[int, float] = {}

        def sync(i: int) -> None:
            for k in range(20):
                x = np.full(3 if k % 2 else 20000, float(i * 100 + k))  # inline and shm
                results[i * 100 + k] = float(w.predict({"x": x}, timeout=20)["y"][0])

        async def many() -> list[dict[str, np.ndarray]]:
            xs = [np.full(5, float(1000 + i)) for i in range(30)]
            return await asyncio.gather(*(w.apredict({"x": x}, timeout=20) for x in xs))

        ts = [threading.Thread(target=sync, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        outs = asyncio.run(many())
        for t in ts:
            t.join(30)
        assert sorted(results) == [i * 100 + k for i in range(3) for k in range(20)]
        assert all(v == 2 * k for k, v in results.items())
        assert [float(o["y"][0]) for o in outs] == [2.0 * (1000 + i) for i in range(30)]
        # the timed-out request's late reply is read although nobody else asks any more
        end = time.monotonic() + 10
        while w.stats()["in_flight"] and time.monotonic() < end:
            time.sleep(0.02)
        assert w.stats()["in_flight"] == 0
    finally:
        w.stop()
    assert not any(t.name == "worker-toy-replies" for t in threading.enumerate())


def test_loop_mode_big_inline_frames_do_not_deadlock(tmp_path: Path) -> None:
    """Tensors bigger than a slot travel inline (MBs each way) while every child thread
    is busy sending a reply: the loop must keep reading while its sends are pending."""
    made: list[ModelWorker] = []
    errors: list[BaseException] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        w = toy_worker(tmp_path, loop=loop, max_concurrency=3, shm_slot_bytes=1 << 20)
        made.append(w)
        await loop.run_in_executor(None, w.start)
        try:
            xs = [np.full(400_000, float(i)) for i in range(6)]  # 3.2 MB > slot: inline
            xs += [np.full(7_500, float(i)) for i in range(6)]  # 60 KB: inline
            outs = await asyncio.gather(*(w.apredict({"x": x}, timeout=30) for x in xs))
            for x, o in zip(xs, outs, strict=True):
                np.testing.assert_array_equal(o["y"], x * 2)
            assert w.stats()["shm_tensors_in"] == 0
        finally:
            await loop.run_in_executor(None, w.stop)

    def run() -> None:
        try:
            asyncio.run(scenario())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(40)
    if t.is_alive():  # deadlocked: kill the child so the stuck send returns, then fail
        os.kill(made[0].pid or 0, signal.SIGKILL)
        t.join(10)
        pytest.fail("event loop and worker child deadlocked on big inline frames")
    assert not errors, errors


def test_loop_mode_callers_beyond_the_slots_wait_without_threads(tmp_path: Path) -> None:
    """With every slot taken, apredict on the reply loop waits for a freed slot on the
    loop itself (handed over in order): no executor thread per waiting request, and a
    wait that runs out of time fails alone and leaks no slot."""
    import concurrent.futures

    class Counting(concurrent.futures.ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            Counting.submitted += 1
            return super().submit(fn, *args, **kwargs)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        w = toy_worker(tmp_path, loop=loop, max_concurrency=2)
        await loop.run_in_executor(None, w.start)
        try:
            loop.set_default_executor(Counting(max_workers=2))
            before = Counting.submitted
            xs = [np.arange(3.0) + i for i in range(20)]
            calls = [w.apredict({"x": x, "sleep": np.array([0.01])}, timeout=30) for x in xs]
            outs = await asyncio.gather(*calls)
            for x, o in zip(xs, outs, strict=True):
                np.testing.assert_array_equal(o["y"], x * 2)
            assert Counting.submitted == before  # nobody waited on a thread
            # two slow requests hold both slots; a third cannot get one in 0.2 s
            slow = [
                asyncio.ensure_future(w.apredict({"x": np.ones(1), "sleep": np.array([1.0])}))
                for _ in range(2)
            ]
            while w.stats()["in_flight"] < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(ModelNotReadyError, match="no free transfer slot"):
                await w.apredict({"x": np.ones(1)}, timeout=0.2)
            await asyncio.gather(*slow)
            outs = await asyncio.gather(*(w.apredict({"x": np.ones(2)}) for _ in range(4)))
            assert all(o["y"].tolist() == [2.0, 2.0] for o in outs)  # both slots came back
        finally:
            await loop.run_in_executor(None, w.stop)

    asyncio.run(scenario())
