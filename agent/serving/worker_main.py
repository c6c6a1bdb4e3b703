"""Child entry point of a model worker: ``python -m agent.serving.worker_main SOCK_FD SHM_FD
IN_FD:OUT_FD,IN_FD:OUT_FD,... [LEND_FD]`` (a lane per transfer slot).

Only this process imports the inference engines, and it runs the package's run scripts:
the daemon treats it as untrusted (docs/DAEMON.md, "Trust boundaries"). It reads one
``init`` frame (JSON settings from its own parent; nothing in either direction is
pickled), closes the daemon's files to itself (agent/serving/sandbox.py), opens the
model, warms it up, answers ``ready`` with the KServe metadata (or ``error`` with the
failure and exits 1), then serves ``predict`` frames (agent/serving/ipc.py) on one
thread per lane (a socket pair per transfer slot) and ``self_test`` frames on the
control socket, until ``shutdown`` or EOF. With ``LEND_FD`` it also answers the
connections the daemon lends it (agent/serving/direct.py). The daemon's end
of all this is agent/serving/supervisor.py and agent/serving/transport.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.serving import ipc, sandbox
from runtime.config import RuntimeConfig

logger = logging.getLogger("agent.serving.worker_main")


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
    # Hand the GIL over quickly: a lane thread woken by its request must not wait 5 ms
    # behind another lane's Python code (4 callers of a 1.5 ms CNN: the child's CPU per
    # request 1,600 us with this, ~1,740 us without).
    sys.setswitchinterval(0.0005)
    from agent.malloc import tune_malloc

    tune_malloc()  # per-request tensors reuse heap pages (see agent/malloc.py)
    sock = socket.socket(fileno=int(argv[0]))
    chan = ipc.Channel(sock)
    lanes = [  # per lane: requests in, replies out (two one-way socket pairs)
        tuple(ipc.Channel(socket.socket(fileno=int(fd))) for fd in lane.split(":"))
        for lane in argv[2].split(",")
        if lane
    ]
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
    if len(argv) > 3:  # the daemon lends inference connections (agent/serving/direct.py)
        from agent.serving.direct import DirectServer

        lending = DirectServer(socket.socket(fileno=int(argv[3])), servable, meta)
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

    def run(ch: ipc.Channel, h: dict[str, Any], p: memoryview) -> None:
        rid = h["id"]
        slot = h.get("slot")
        try:
            t0 = time.perf_counter()
            inputs = ipc.decode(h["t"], p, arena, copy=False)
            outputs = servable.predict(inputs)
            descs, parts, n_shm = ipc.encode(outputs, arena, slot)
            dt = round((time.perf_counter() - t0) * 1e6)
            ch.send({"op": "result", "id": rid, "t": descs, "shm": n_shm, "us": dt}, parts)
        except ipc.ChannelClosed:
            return
        except BaseException as exc:
            with contextlib.suppress(OSError):
                ch.send({"op": "fail", "id": rid, "err": ipc.error_to_dict(exc)})

    def run_self_test(h: dict[str, Any]) -> None:
        try:
            fn = _import(init["self_test"])
            n = fn(servable, Path(init["model_dir"]))
            chan.send({"op": "result", "id": h["id"], "t": [], "n": n})
        except BaseException as exc:
            chan.send({"op": "fail", "id": h["id"], "err": ipc.error_to_dict(exc)})

    # One thread per lane (two one-way socket pairs per transfer slot, see
    # agent/serving/transport.py): a request wakes exactly the thread that serves it,
    # which answers on the lane's reply socket.
    # No reader role is handed between threads, so a request costs one wake-up in here.
    def serve_lane(inbox: ipc.Channel, outbox: ipc.Channel) -> None:
        while True:
            try:
                h, p = inbox.recv()
            except ipc.ChannelClosed:
                return
            if h.get("op") == "predict":
                run(outbox, h, p)

    threads = [
        threading.Thread(target=serve_lane, args=ln, name=f"lane-{i}", daemon=True)
        for i, ln in enumerate(lanes)
    ]
    for t in threads:
        t.start()
    # The control channel: self-tests, shutdown (and a predict, should one come here).
    while True:
        try:
            h, p = chan.recv()
        except ipc.ChannelClosed:
            break
        op = h.get("op")
        if op == "shutdown":
            break
        if op == "predict":
            run(chan, h, p)
        elif op == "self_test":
            run_self_test(h)
    # Stop reading; requests already received still send their answers.
    for inbox, _ in lanes:
        with contextlib.suppress(OSError):
            inbox.sock.shutdown(socket.SHUT_RD)
    for t in threads:
        t.join()
    try:
        servable.close()
    finally:
        chan.close()
        for inbox, outbox in lanes:
            inbox.close()
            outbox.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown of native engines (slow, sometimes crashy)
