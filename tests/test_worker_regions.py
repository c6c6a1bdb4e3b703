"""Shared regions: inputs the caller writes into worker-mapped memory cross uncopied
(real child processes, a real ONNX model; see agent/serving/ipc.py SharedRegion)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from agent.errors import InvalidInputError, RuntimeBackendError
from agent.serving import ipc
from agent.serving.worker import ModelWorker
from runtime import RuntimeConfig, open_model
from tests.test_runtime_loader import make_package
from tests.test_runtime_worker import _toy, _wait_state


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_onnx_input_from_a_region_is_not_copied_and_gives_the_same_outputs(
    tmp_path: Path, ppocr_det: Path
) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_det, name="det", version="2")
    x = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    want = s.predict({"x": x})
    s.close()
    w = ModelWorker("det", "2", pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    w.start()
    try:
        region = w.shared_region(x.nbytes + 4096)
        xr = region.ndarray(x.shape, np.float32, offset=4096)
        xr[...] = x
        got = w.predict({"x": xr})
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        st = w.stats()
        assert (st["region_tensors_in"], st["shm_tensors_in"]) == (1, 0)
        w.predict({"x": x})  # a private array still goes through a slot
        st = w.stats()
        assert (st["region_tensors_in"], st["shm_tensors_in"]) == (1, 1)
        region.close()
    finally:
        w.stop()


def test_litert_input_from_a_region_gives_the_same_outputs(
    tmp_path: Path, hand_tflite: Path
) -> None:
    """LiteRT copies inputs into its own tensors: a read-only region view is fine."""
    pkg = make_package(tmp_path / "pkg", hand_tflite, backend="litert")
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    spec = s.metadata()["inputs"][0]
    x = np.random.default_rng(4).random([max(1, int(d)) for d in spec["shape"]], np.float32)
    want = s.predict({spec["name"]: x})
    s.close()
    w = ModelWorker("hand", "1", pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    w.start()
    try:
        region = w.shared_region(x.nbytes)
        xr = region.ndarray(x.shape, np.float32)
        xr[...] = x
        got = w.predict({spec["name"]: xr})
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert w.stats()["region_tensors_in"] == 1
        region.close()
    finally:
        w.stop()


def test_region_outlives_a_kill_9_and_a_region_made_before_start(tmp_path: Path) -> None:
    w = _toy(tmp_path)
    early = w.shared_region(800)  # not started yet: handed over in the init frame
    a = early.ndarray((100,), np.float64)
    a[...] = np.arange(100.0)
    w.start()
    try:
        np.testing.assert_array_equal(w.predict({"x": a})["y"], np.arange(100.0) * 2)
        late = w.shared_region(64)
        b = late.ndarray((2, 4), np.float64)
        b[...] = 3.0
        pid0 = w.pid
        assert pid0 is not None
        os.kill(pid0, signal.SIGKILL)
        _wait_state(w, "restarting")
        _wait_state(w, "ready")
        assert w.pid != pid0
        a[0] = 50.0  # rewritten between requests: the worker sees the new data
        np.testing.assert_array_equal(w.predict({"x": a})["y"][:2], [100.0, 2.0])
        np.testing.assert_array_equal(w.predict({"x": b})["y"], np.full((2, 4), 6.0))
        assert w.stats()["region_tensors_in"] == 3
        early.close()
        late.close()
    finally:
        w.stop()


def test_worker_maps_regions_read_only(tmp_path: Path) -> None:
    """A model or run script that writes into its input fails that request with a clear
    error; the caller's data is untouched and the worker keeps serving."""
    w = _toy(tmp_path)
    w.start()
    try:
        region = w.shared_region(80)
        a = region.ndarray((10,), np.float64)
        a[...] = 7.0
        with pytest.raises(RuntimeBackendError, match="read-only"):
            w.predict({"x": a, "scribble": np.ones(1)})
        np.testing.assert_array_equal(a, np.full(10, 7.0))
        # the same request with a private array is the worker's own copy: allowed
        out = w.predict({"x": np.full(10, 7.0), "scribble": np.ones(1)})
        np.testing.assert_array_equal(out["y"], np.full(10, -2.0))
        np.testing.assert_array_equal(w.predict({"x": a})["y"], np.full(10, 14.0))
        region.close()
    finally:
        w.stop()


def test_closed_region_and_strided_views_are_copied(tmp_path: Path) -> None:
    w = _toy(tmp_path)
    w.start()
    try:
        region = w.shared_region(8 * 200_000)
        a = region.ndarray((400, 500), np.float64)
        a[...] = np.arange(200_000.0).reshape(400, 500)
        strided = a[:, ::2]  # inside the region but not contiguous: copied
        np.testing.assert_array_equal(w.predict({"x": strided})["y"], strided * 2)
        assert w.stats()["region_tensors_in"] == 0
        np.testing.assert_array_equal(w.predict({"x": a[10:20]})["y"], a[10:20] * 2)
        assert w.stats()["region_tensors_in"] == 1  # a contiguous slice is found in place
        region.close()
        np.testing.assert_array_equal(w.predict({"x": a})["y"], a * 2)  # still valid here
        st = w.stats()
        assert (st["region_tensors_in"], st["shm_tensors_in"]) == (1, 2)
        with pytest.raises(ValueError, match="exceed the region"):
            w.shared_region(16).ndarray((3,), np.float64)
    finally:
        w.stop()


def test_map_and_unmap_leak_no_descriptors(tmp_path: Path) -> None:
    w = _toy(tmp_path)
    w.start()
    try:
        assert w.pid is not None
        gc.collect()  # sockets of earlier tests still waiting for the collector
        child0, parent0 = _fds(w.pid), _fds(os.getpid())
        for i in range(20):
            region = w.shared_region(4096)
            region.ndarray((8,), np.float64)[...] = float(i)
            assert w.predict({"x": region.ndarray((8,), np.float64)})["y"][0] == 2.0 * i
            region.close()
        # The child's mapping (and the fd the mmap holds) goes when the thread that
        # answered the last request has let go of its inputs, a moment after its reply.
        end = time.monotonic() + 5.0
        while _fds(w.pid) != child0 and time.monotonic() < end:
            time.sleep(0.01)
        assert (_fds(w.pid), _fds(os.getpid())) == (child0, parent0)
    finally:
        w.stop()


def test_apredict_on_the_loop_reads_regions_in_place(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        w = _toy(tmp_path, loop=loop, max_concurrency=2)
        await loop.run_in_executor(None, w.start)
        try:
            region = await loop.run_in_executor(None, w.shared_region, 8 * 4 * 1000)
            views = [region.ndarray((1000,), np.float64, offset=8000 * i) for i in range(4)]
            for i, v in enumerate(views):
                v[...] = float(i)
            outs = await asyncio.gather(*(w.apredict({"x": v}, timeout=20) for v in views))
            assert [float(o["y"][999]) for o in outs] == [0.0, 2.0, 4.0, 6.0]
            assert w.stats()["region_tensors_in"] == 4
            await loop.run_in_executor(None, region.close)
        finally:
            await loop.run_in_executor(None, w.stop)

    asyncio.run(scenario())


def test_decode_refuses_unknown_regions_and_out_of_bounds_places() -> None:
    """What the child checks before it reads a region (a frame could be forged)."""
    arena = ipc.ShmArena(1, 4096)
    fd = os.memfd_create("t", 0)
    os.ftruncate(fd, 64)
    arena.regions[1] = ipc.MappedRegion(fd, 64)
    ok = {"n": "x", "t": "<f8", "s": [8], "l": 64, "e": "reg", "r": 1, "o": 0}
    assert ipc.decode([ok], b"", arena, copy=False)["x"].shape == (8,)
    bad = [
        {**ok, "r": 2},  # unknown region
        {**ok, "o": 8},  # runs past the end
        {**ok, "o": -8},
        {**ok, "l": 72, "s": [9]},
    ]
    for d in bad:
        with pytest.raises(InvalidInputError):
            ipc.decode([d], b"", arena, copy=False)
    with pytest.raises(ValueError, match="fewer than"):
        fd2 = os.memfd_create("t2", 0)
        ipc.MappedRegion(fd2, 64)  # a region smaller than claimed is refused
    arena.close()


def test_the_worker_gets_a_descriptor_it_cannot_map_writable(tmp_path: Path) -> None:
    """The fd handed to the child is a read-only open of the memfd: even code in the
    worker that maps it itself cannot write the caller's data."""
    import mmap

    region = ipc.SharedRegion(1, 4096)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(region.ro_fd, 4096)  # shared and writable
        ro = mmap.mmap(region.ro_fd, 4096, prot=mmap.PROT_READ)
        region.ndarray((4,), np.uint8)[...] = 9
        assert ro[:4] == b"\x09" * 4  # the same pages
        ro.close()
    finally:
        region.close()
