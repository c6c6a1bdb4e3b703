"""How close the worker gets to the cheapest possible process boundary (issue 4, context).

``python -m bench.worker_floor [ROUNDS]`` (not part of ``make bench``). Same model, input
and 4 callers as ``bench_worker``; per round, in alternating order:

- ``inproc``: ``Servable.predict`` in this process (the anchor);
- ``worker``: :class:`agent.serving.worker.ModelWorker` (``predict``; its event loop
  reads the replies);
- ``bare``: a forked child serving 4 lanes with nothing but the work a boundary cannot
  avoid: the caller copies its input into its slot of a memfd, sends one byte, the child
  runs the same servable on the slot and answers one byte. No framing, no descriptors,
  no error path, no output back; so no real worker can beat it.

Prints each variant's median per-round ratio to ``inproc``: ``bare`` is the ceiling of
the throughput ratio on this machine, ``worker`` minus ``bare`` what our protocol costs.
"""

from __future__ import annotations

import mmap
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.bench_worker import _package, _throughput

N = 4
SLOT = 1 << 20


def main(rounds: int) -> None:
    from runtime import RuntimeConfig, open_model

    work = Path(__file__).resolve().parent / "work" / "worker_floor"
    pkg = _package(work / "pkg")
    cache = work / "cache"
    cfg = RuntimeConfig.from_dict({"onnx": {"intra_op_threads": 1, "inter_op_threads": 1}})
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    fd = os.memfd_create("worker-floor")
    os.ftruncate(fd, N * SLOT)
    mm = mmap.mmap(fd, N * SLOT)
    slots = [np.frombuffer(mm, np.float32, x.size, i * SLOT).reshape(x.shape) for i in range(N)]
    requests = [socket.socketpair() for _ in range(N)]
    replies = [socket.socketpair() for _ in range(N)]
    pid = os.fork()  # before any thread exists in this process
    if pid == 0:
        servable = open_model(pkg, cfg, cache_dir=cache)

        def serve(i: int) -> None:
            while requests[i][1].recv(1):
                servable.predict({"x": slots[i]})
                replies[i][1].send(b"r")

        for i in range(N):
            threading.Thread(target=serve, args=(i,), daemon=True).start()
        time.sleep(3600)
        os._exit(0)

    from agent.serving.worker import ModelWorker

    servable = open_model(pkg, cfg, cache_dir=cache)
    worker = ModelWorker("cnn", "1", pkg, cfg, cache_dir=cache, max_concurrency=N)
    worker.start()
    free = list(range(N))
    cv = threading.Condition()

    def bare(inputs: dict[str, np.ndarray]) -> None:
        with cv:
            cv.wait_for(lambda: bool(free))
            i = free.pop()
        np.copyto(slots[i], inputs["x"])
        requests[i][0].send(b"q")
        replies[i][0].recv(1)
        with cv:
            free.append(i)
            cv.notify()

    fns = {"inproc": servable.predict, "worker": worker.predict, "bare": bare}
    try:
        for fn in fns.values():
            _throughput(fn, x, 30)
        res: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds):
            order = ["inproc", "worker", "bare"] if r % 2 == 0 else ["inproc", "bare", "worker"]
            for k in order:
                res[k].append(_throughput(fns[k], x, 100))
        for k in ("worker", "bare"):
            rs = [a / b for a, b in zip(res[k], res["inproc"], strict=True)]
            print(
                f"{k:6s} / in-process, 4 callers: median {statistics.median(rs):.3f} "
                f"(per round {' '.join(f'{v:.3f}' for v in rs)})"
            )
    finally:
        worker.stop()
        os.kill(pid, 9)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 11)
