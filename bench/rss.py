"""Peak-RSS measurement for benchmarks: run a callable in a fresh child process so the
figure is that work's own high-water mark, not the benchmark driver's."""

from __future__ import annotations

import multiprocessing as mp
import resource
from collections.abc import Callable
from typing import Any


def _vm_hwm_kb() -> float:
    """This process's own peak RSS. ``ru_maxrss`` is not: Linux carries it over from the
    parent across vfork+exec, so a child of a driver that once peaked high reports the
    driver's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # not Linux


def _child(fn: Callable[..., Any], args: tuple[Any, ...], q: Any) -> None:
    result = fn(*args)
    q.put((result, _vm_hwm_kb() / 1024.0))


def peak_rss_mb(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Run ``fn(*args)`` in a spawned process; return (its result, its peak RSS in MB)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    result, peak = q.get()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"benchmark child exited with {p.exitcode}")
    return result, peak
