"""Stand-in loaders the worker child imports by ``module:function`` (no tests here).

They exercise failure paths a real package cannot produce on demand: a native crash
while loading, a failing start, and a servable that grabs memory on request.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ConverterError, InvalidInputError


def segfault(model_dir: Path, config: Any, *, cache_dir: Path) -> Any:
    ctypes.string_at(0)  # SIGSEGV in native code
    raise AssertionError("unreachable")


def failing(model_dir: Path, config: Any, *, cache_dir: Path) -> Any:
    raise ConverterError("stage onnxsim failed: bad graph", code="converter-stage")


class Toy:
    """Echo/sum servable: ``x`` -> ``y = x * 2``; ``hog`` (MiB) allocates and holds;
    ``scribble`` overwrites ``x`` in place first; ``oserror`` fails as a run script that
    cannot open a file does; ``garble`` writes junk into every socket it has, then hangs;
    ``hangup`` shuts every socket it has for writing (the daemon sees EOF), then hangs;
    ``barrier`` (n) returns only once n requests are inside ``predict`` at the same time
    (a request served alone fails after 20 s)."""

    def __init__(self) -> None:
        self._held: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._barriers: dict[int, threading.Barrier] = {}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "hog" in inputs:
            mib = int(inputs["hog"].reshape(-1)[0])
            a = np.ones(mib << 20, dtype=np.uint8)
            self._held.append(a)
            time.sleep(30)
            return {"y": a[:1]}
        if "sleep" in inputs:
            time.sleep(float(inputs["sleep"].reshape(-1)[0]))
        if "barrier" in inputs:
            n = int(inputs["barrier"].reshape(-1)[0])
            with self._lock:
                b = self._barriers.setdefault(n, threading.Barrier(n, timeout=20))
            b.wait()
        if "hangup" in inputs:  # shut every socket it has for writing, keep running
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                        s = socket.socket(fileno=os.dup(int(name)))
                        s.shutdown(socket.SHUT_WR)
                        s.close()
            time.sleep(30)
        if "garble" in inputs:
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                        os.write(int(name), b"\xff" * 64)
            time.sleep(30)
        if "oserror" in inputs:
            raise FileNotFoundError(2, "No such file or directory", "labels.txt")
        if "x" not in inputs:
            raise InvalidInputError("input 'x' is missing", code="missing-input")
        if "scribble" in inputs:  # a run script that writes into its input
            inputs["x"][...] = -1
        return {"y": inputs["x"] * 2, "pid": np.array([os.getpid()])}

    def metadata(self) -> dict[str, Any]:
        return {"name": "toy", "versions": ["1"], "platform": "toy", "inputs": [], "outputs": []}

    def close(self) -> None:
        self._held.clear()


def toy(model_dir: Path, config: Any, *, cache_dir: Path) -> Any:
    return Toy()


def toy_self_test(servable: Any, model_dir: Path) -> int:
    if (Path(model_dir) / "bad").exists():
        from agent.errors import RuntimeBackendError

        raise RuntimeBackendError("sample s.npz output y differs", code="self-test")
    return 1
