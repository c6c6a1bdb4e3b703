"""Worker benchmark (issue 4): what the process boundary costs.

Same model, same run, same ``RuntimeConfig`` (intra-op threads 1, so 4 callers on the
2-core box contend the same way in both cases):

- ``worker_added_p50_us_224``: p50 latency of one caller through :class:`ModelWorker`
  minus p50 of in-process ``Servable.predict``, for a 1x3x224x224 float32 input
  (~600 KB, crosses through the shared-memory slots) into a small generated CNN.
- ``worker_throughput_ratio_4c``: requests/s with 4 concurrent callers through the
  worker divided by 4 threads calling the in-process servable (goal >= 0.9).

The worker is driven as the daemon drives it: ``ModelWorker(loop=...)`` with the event
loop that reads its replies (agent/serving/transport.py), and ``apredict`` from tasks on
that loop (4 concurrent tasks for the throughput figure); the in-process anchor is called
from 4 threads.

In-process and worker calls are measured in alternating blocks (latency) and
interleaved rounds (throughput: median of the per-round ratios), so load from other
processes hits both alike. ``EDGEWARD_BENCH_QUICK=1`` cuts the request counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _make_cnn(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    chans = [3, 16, 32, 64]
    stride = [1, 2, 2]  # ~140 M MACs: a few ms on one thread
    nodes, inits = [], []
    prev = "x"
    for i in range(3):
        w = (rng.standard_normal((chans[i + 1], chans[i], 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(
            helper.make_node(
                "Conv", [prev, f"w{i}"], [f"c{i}"], strides=[stride[i]] * 2, pads=[1, 1, 1, 1]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _package(root: Path) -> Path:
    if root.exists():
        shutil.rmtree(root)
    (root / "Model").mkdir(parents=True)
    (root / "Meta-info").mkdir()
    _make_cnn(root / "Model" / "cnn.onnx")
    (root / "manifest.json").write_text(
        json.dumps({"name": "cnn", "version": "1", "models": [{"id": 0, "name": "cnn.onnx"}]})
    )
    tech = {"runtime_config": {"backend": "onnxruntime"}}
    (root / "Meta-info" / "technicalinfo.json").write_text(json.dumps(tech))
    (root / "Meta-info" / "managementinfo.json").write_text(json.dumps({"name": "cnn"}))
    return root


def _times(fn: Any, x: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn({"x": x})
        times.append(time.perf_counter() - t0)
    return times


def _paired_p50_us(a: Any, b: Any, x: np.ndarray, n: int, blocks: int = 8) -> tuple[float, float]:
    """p50 of ``a`` and of ``b``, measured in alternating blocks after a warm-up."""
    _times(a, x, max(5, n // 10))
    _times(b, x, max(5, n // 10))
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(blocks):
        ta += _times(a, x, max(1, n // blocks))
        tb += _times(b, x, max(1, n // blocks))
    return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def _throughput(fn: Any, x: np.ndarray, per_thread: int, threads: int = 4) -> float:
    barrier = threading.Barrier(threads + 1)

    def loop() -> None:
        barrier.wait()
        for _ in range(per_thread):
            fn({"x": x})

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return threads * per_thread / (time.perf_counter() - t0)


def _athroughput(
    loop: asyncio.AbstractEventLoop, worker: Any, x: np.ndarray, per_task: int, tasks: int = 4
) -> float:
    """Requests/s of ``tasks`` concurrent tasks on ``loop`` awaiting ``worker.apredict``."""

    async def caller() -> None:
        for _ in range(per_task):
            await worker.apredict({"x": x})

    async def all_of_them() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(tasks)))
        return time.perf_counter() - t0

    return tasks * per_task / loop.run_until_complete(all_of_them())


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of this process or of ``pid``."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(work: Path) -> dict[str, float]:
    from agent.serving.worker import ModelWorker
    from runtime import RuntimeConfig, open_model

    quick = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"
    n_lat = 60 if quick else 400
    per_thread = 25 if quick else 100
    rounds = 1 if quick else 7
    work.mkdir(parents=True, exist_ok=True)
    pkg = _package(work / "pkg")
    cache = work / "cache"
    cfg = RuntimeConfig.from_dict({"onnx": {"intra_op_threads": 1, "inter_op_threads": 1}})
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)

    servable = open_model(pkg, cfg, cache_dir=cache)
    loop = asyncio.new_event_loop()
    worker = ModelWorker("cnn", "1", pkg, cfg, cache_dir=cache, max_concurrency=4, loop=loop)
    worker.start()  # from this thread; the loop starts reading the replies when it runs

    def relayed(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = loop.run_until_complete(worker.apredict(inputs))
        return out

    def throughput(fn: Any, per_thread: int) -> float:
        if fn is relayed:
            return _athroughput(loop, worker, x, per_thread)
        return _throughput(fn, x, per_thread)

    try:
        want = servable.predict({"x": x})["y"]
        np.testing.assert_allclose(relayed({"x": x})["y"], want, rtol=1e-5)
        p50_in, p50_w = _paired_p50_us(servable.predict, relayed, x, n_lat)
        # Interleave the throughput runs so drift on the shared box hits both alike.
        tin, tw = [], []
        cpu_in, cpu_parent, cpu_child = 0.0, 0.0, 0.0  # diagnostics: CPU per request
        for i in range(rounds):
            anchor_first = i % 2 == 0  # the two take turns at going first
            first, second = (
                (servable.predict, relayed) if anchor_first else (relayed, servable.predict)
            )
            c0, k0 = _cpu_s(), _cpu_s(worker.pid)
            t_first = throughput(first, per_thread)
            c1, k1 = _cpu_s(), _cpu_s(worker.pid)
            t_second = throughput(second, per_thread)
            c2, k2 = _cpu_s(), _cpu_s(worker.pid)
            if anchor_first:
                tin.append(t_first)
                tw.append(t_second)
                d_in, d_parent, d_child = c1 - c0, c2 - c1, k2 - k1
            else:
                tw.append(t_first)
                tin.append(t_second)
                d_in, d_parent, d_child = c2 - c1, c1 - c0, k1 - k0
            cpu_in, cpu_parent, cpu_child = (
                cpu_in + d_in,
                cpu_parent + d_parent,
                cpu_child + d_child,
            )
        thr_in, thr_w = statistics.median(tin), statistics.median(tw)
        ratio = statistics.median(w / i for w, i in zip(tw, tin, strict=True))
        assert worker.stats()["shm_tensors_in"] > 0
    finally:
        loop.run_until_complete(loop.run_in_executor(None, worker.stop))
        loop.close()
        servable.close()
    added = p50_w - p50_in
    print(f"in-process p50 {p50_in:.0f} us, worker p50 {p50_w:.0f} us: added {added:.0f} us")
    print(
        f"4 callers: in-process {thr_in:.1f} req/s, worker {thr_w:.1f} req/s: "
        f"median ratio of {rounds} interleaved rounds {ratio:.3f} "
        f"(per round: {' '.join(f'{w / i:.3f}' for w, i in zip(tw, tin, strict=True))})"
    )
    n = rounds * 4 * per_thread / 1e6
    print(
        f"CPU per request (4 callers): in-process {cpu_in / n:.0f} us; worker: parent "
        f"{cpu_parent / n:.0f} us + child {cpu_child / n:.0f} us "
        f"(overhead {(cpu_parent + cpu_child - cpu_in) / n:.0f} us)"
    )
    return {
        "worker_added_p50_us_224": added,
        "worker_throughput_ratio_4c": ratio,
    }


if __name__ == "__main__":
    print(run(Path(__file__).resolve().parent / "work" / "worker"))
