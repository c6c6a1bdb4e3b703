"""Child entry point of a model worker: ``python -m agent.serving.worker_main SOCK_FD SHM_FD
[LEND_FD]``.

Only this process imports the inference engines, and it runs the package's run scripts:
the daemon treats it as untrusted (docs/DAEMON.md, "Trust boundaries"). It reads one
``init`` frame (JSON settings from its own parent; nothing in either direction is
pickled), closes the daemon's files to itself (agent/serving/sandbox.py), opens the
model, warms it up, answers ``ready`` with the KServe metadata (or ``error`` with the
failure and exits 1), then serves ``predict`` and ``self_test`` frames (agent/serving/ipc.py)
on ``max_concurrency`` threads until ``shutdown`` or EOF. With ``LEND_FD`` it also
answers the connections the daemon lends it (agent/serving/direct.py). The daemon's end
of all this is agent/serving/supervisor.py and agent/serving/transport.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.serving import ipc, sandbox
from runtime.config import RuntimeConfig

logger = logging.getLogger("agent.serving.worker_main")

INLINE_US = 500.0  # requests shorter than this on average keep the reader role


def _import(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def main(argv: list[str]) -> int:
    entered = time.monotonic()  # system-wide clock: the parent times our start with it
    from agent.logs import setup_logging

    # The daemon sets both (agent/logs.py): worker lines share the daemon's format.
    setup_logging(
        os.environ.get("EDGEWARD_WORKER_LOG", "warning").lower(),
        os.environ.get("EDGEWARD_LOG_FORMAT", "text"),
    )
    # Hand the GIL over quickly: the reader thread must not wait 5 ms behind a predict
    # thread in Python code while a frame is waiting.
    sys.setswitchinterval(0.0005)
    from agent.malloc import tune_malloc

    tune_malloc()  # per-request tensors reuse heap pages (see agent/malloc.py)
    sock = socket.socket(fileno=int(argv[0]))
    chan = ipc.Channel(sock)
    # A launched child (ModelWorker.launch) waits here while the daemon still downloads
    # and unpacks: import the loader (numpy, the runtime) now, and let it prepare what
    # does not depend on the model (its ``prefetch()``: the engine's import, the device
    # fingerprint). Failing here is not reported: the import after the init frame is.
    with contextlib.suppress(Exception):
        loader = os.environ.get("EDGEWARD_WORKER_LOADER", "").partition(":")[0]
        mod = importlib.import_module(loader)
        prefetch = getattr(mod, "prefetch", None)
        if callable(prefetch):
            prefetch()
    imported = time.monotonic()
    try:
        _header, payload = chan.recv()
    except ipc.ChannelClosed:
        return 1
    init: dict[str, Any] = json.loads(bytes(payload))
    # Before anything of the package runs (and before any other thread exists): close
    # the daemon's secrets and the store to this process; its own model directory stays
    # readable and the converter cache writable (agent/serving/sandbox.py).
    try:
        if init.get("deny") and not sandbox.confine(
            init["deny"], read=[str(init["model_dir"])], write=[str(init["cache_dir"])]
        ):
            logger.warning(
                "this kernel has no Landlock: the worker is not fenced off the daemon's "
                "files (keys, config, store); see docs/DAEMON.md, Trust boundaries"
            )
    except OSError as exc:
        chan.send({"op": "error", "err": ipc.error_to_dict(exc)})
        return 1
    arena = ipc.ShmArena(init["slots"], init["slot_bytes"], fd=int(argv[1]))
    stamps = {"entered": entered, "imported": imported, "init": time.monotonic()}
    try:
        opener = _import(init["loader"])
        config = dataclasses.replace(
            RuntimeConfig.from_dict(init["config"]), explicit=frozenset(init["explicit"])
        )
        servable = opener(Path(init["model_dir"]), config, cache_dir=Path(init["cache_dir"]))
        stamps["opened"] = time.monotonic()
        warm = getattr(servable, "warmup", None)
        if callable(warm):
            warm()
        meta = servable.metadata()
        stamps["warm"] = time.monotonic()
    except BaseException as exc:  # report any start failure to the parent, then exit
        chan.send({"op": "error", "err": ipc.error_to_dict(exc)})
        return 1
    lending = None
    if len(argv) > 2:  # the daemon lends inference connections (agent/serving/direct.py)
        from agent.serving.direct import DirectServer

        lending = DirectServer(socket.socket(fileno=int(argv[2])), servable, meta)
        lending.start()
    chan.send(
        {
            "op": "ready",
            "meta": meta,
            "pid": os.getpid(),
            "lends": lending is not None,
            "stamps": stamps,
        }
    )

    def run(h: dict[str, Any], p: memoryview) -> None:
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
            n = fn(servable, Path(init["model_dir"]))
            chan.send({"op": "result", "id": h["id"], "t": [], "n": n})
        except BaseException as exc:
            chan.send({"op": "fail", "id": h["id"], "err": ipc.error_to_dict(exc)})

    # Leader/follower: each of the max_concurrency threads takes the reader role in
    # turn, reads one frame, hands the role on and serves that frame itself, so a
    # request costs no extra thread hand-off inside the child. Handing the role on wakes
    # a follower (a futex wake and a GIL round on a 2-core box: ~50 us); for requests that
    # take less than INLINE_US on average the leader keeps the role and serves the frame
    # itself (a frame that is already waiting still goes to a follower), so a tiny model
    # costs no wake-up at all and a concurrent frame waits at most one short request.
    recv_lock = threading.Lock()
    cost = {"ema": -1.0}  # moving average of the request time in us; -1 = not known yet

    poller = select.poll()  # used only by the thread holding recv_lock
    poller.register(sock, select.POLLIN)

    def readable() -> bool:
        return bool(poller.poll(0))

    def serve() -> None:
        while True:
            recv_lock.acquire()
            keep = True
            while keep:
                try:
                    h, p = chan.recv()
                except ipc.ChannelClosed:
                    recv_lock.release()
                    return
                op = h.get("op")
                if op == "shutdown":
                    # Stop reading; requests already received still send their answers.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RD)
                    recv_lock.release()
                    return
                ema = cost["ema"]
                keep = op == "predict" and 0 <= ema < INLINE_US and not readable()
                if not keep:
                    recv_lock.release()
                if op == "predict":
                    t0 = time.perf_counter()
                    run(h, p)
                    us = (time.perf_counter() - t0) * 1e6
                    cost["ema"] = us if ema < 0 else ema + 0.2 * (us - ema)
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
