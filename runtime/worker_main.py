"""Child entry point of a model worker: ``python -m runtime.worker_main SOCK_FD SHM_FD``.

Only this process imports the inference engines. It reads one ``init`` frame (pickled
settings from its own parent), opens the model, warms it up, answers ``ready`` with the
KServe metadata (or ``error`` with the failure and exits 1), then serves ``predict``
frames on ``max_concurrency`` threads until ``shutdown`` or EOF.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import socket
import sys
import threading
import time
from typing import Any

from runtime import ipc

logger = logging.getLogger("runtime.worker_main")


def _import(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("EDGEWARD_WORKER_LOG", "WARNING"),
        format="worker[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # Hand the GIL over quickly: the reader thread must not wait 5 ms behind a predict
    # thread in Python code while a frame is waiting.
    sys.setswitchinterval(0.0005)
    sock = socket.socket(fileno=int(argv[0]))
    chan = ipc.Channel(sock)
    try:
        _header, payload = chan.recv()
    except ipc.ChannelClosed:
        return 1
    init: dict[str, Any] = pickle.loads(payload)
    arena = ipc.ShmArena(init["slots"], init["slot_bytes"], fd=int(argv[1]))
    try:
        opener = _import(init["loader"])
        servable = opener(init["model_dir"], init["config"], cache_dir=init["cache_dir"])
        warm = getattr(servable, "warmup", None)
        if callable(warm):
            warm()
        meta = servable.metadata()
    except BaseException as exc:  # report any start failure to the parent, then exit
        chan.send({"op": "error", "err": ipc.error_to_dict(exc)})
        return 1
    chan.send({"op": "ready", "meta": meta, "pid": os.getpid()})

    def run(h: dict[str, Any], p: bytearray) -> None:
        rid = h["id"]
        slot = h.get("slot")
        try:
            t0 = time.perf_counter()
            inputs = ipc.decode(h["t"], p, arena, copy=False)
            outputs = servable.predict(inputs)
            descs, parts, n_shm = ipc.encode(outputs, arena, slot)
            dt = round((time.perf_counter() - t0) * 1e6)
            chan.send({"op": "result", "id": rid, "t": descs, "shm": n_shm, "us": dt}, parts)
        except ipc.ChannelClosed:
            return
        except BaseException as exc:
            with contextlib.suppress(OSError):
                chan.send({"op": "fail", "id": rid, "err": ipc.error_to_dict(exc)})

    def run_self_test(h: dict[str, Any]) -> None:
        try:
            fn = _import(init["self_test"])
            n = fn(servable, init["model_dir"])
            chan.send({"op": "result", "id": h["id"], "t": [], "n": n})
        except BaseException as exc:
            chan.send({"op": "fail", "id": h["id"], "err": ipc.error_to_dict(exc)})

    # Leader/follower: each of the max_concurrency threads takes the reader role in
    # turn, reads one frame, hands the role on and serves that frame itself, so a
    # request costs no extra thread hand-off inside the child.
    recv_lock = threading.Lock()

    def serve() -> None:
        while True:
            with recv_lock:
                try:
                    h, p = chan.recv()
                except ipc.ChannelClosed:
                    return
                op = h.get("op")
                if op == "shutdown":
                    # Stop reading; requests already received still send their answers.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RD)
                    return
            if op == "predict":
                run(h, p)
            elif op == "self_test":
                run_self_test(h)

    threads = [
        threading.Thread(target=serve, name=f"predict-{i}", daemon=True)
        for i in range(max(1, int(init["max_concurrency"])))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        servable.close()
    finally:
        chan.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown of native engines (slow, sometimes crashy)
