"""How much slower than native this interpreter runs, for tests with deadlines.

``.ci/arm64.sh`` measures the same pure-Python loop with the host's interpreter and with
the emulated one and passes the ratio as ``EDGEWARD_SLOWDOWN``; natively it is 1. A test
whose deadline exists only to catch a hang scales it with :func:`scaled`, so the
emulated run gets the deadline the measured speed calls for, not a blindly raised one.
Hypothesis' input-generation health check has a fixed budget, so it is switched off for
slowed runs (the deadlines stay, scaled).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SLOWDOWN = max(1.0, float(os.environ.get("EDGEWARD_SLOWDOWN") or 1.0))


def scaled(value: float) -> float:
    """A deadline (any unit) stretched by the measured slowdown."""
    return value * SLOWDOWN


if SLOWDOWN > 1.0:
    settings.register_profile(
        "emulated", deadline=scaled(200), suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("emulated")


_THREAD_PROBE = """
import threading, psutil, sys
p = psutil.Process()
def run(n):
    for _ in range(n):
        t = threading.Thread(target=bytearray, args=(1000,)); t.start(); t.join()
run(50)
r0 = p.memory_info().rss
run(int(sys.argv[1]))
print(max(0, p.memory_info().rss - r0) / int(sys.argv[1]))
"""


def thread_rss_cost(threads: int = 300) -> float:
    """Bytes of RSS this interpreter keeps per thread started and joined.

    Natively a finished thread gives its memory back (a few bytes per thread, noise);
    qemu-user 7.2 keeps about 280 KiB of each guest thread's state for good. A test that
    checks RSS stays flat while the server starts a thread per connection allows this
    measured figure times its connection count, which is zero natively.
    """
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _THREAD_PROBE, str(threads)],
        check=True,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    return float(out.stdout.strip())
