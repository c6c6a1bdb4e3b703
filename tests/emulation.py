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
