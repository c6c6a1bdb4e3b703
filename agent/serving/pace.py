"""How long to poll for something that usually comes soon: the next request on a lent
connection (agent/serving/direct.py) and the answer to a request
(agent/serving/connection.py).

On a virtual machine a thread that sleeps halts its vCPU: waking it costs 40-70 us, and
the code after it runs with cold caches. So both sides poll their socket for a while
before they sleep: SLACK times the moving average of how long the thing usually takes
to come, plus PAD_S, at most the caller's bound. A sample longer than CAP_S counts as
CAP_S, so one long pause does not stop the polling for long.
"""

from __future__ import annotations

__all__ = ["CAP_S", "PAD_S", "SLACK", "Pace"]

SLACK = 1.5
PAD_S = 30e-6
CAP_S = 0.01


class Pace:
    """The moving average of one connection's waits (seconds)."""

    __slots__ = ("avg",)

    def __init__(self) -> None:
        self.avg = -1.0  # nothing seen yet

    def note(self, seconds: float) -> None:
        """Fold one wait into the average (weight 0.2: a few samples move it)."""
        s = min(seconds, CAP_S)
        self.avg = s if self.avg < 0 else self.avg + 0.2 * (s - self.avg)

    def budget(self, bound: float) -> float:
        """Seconds the next poll may last: ``bound`` while nothing is known, 0 when the
        usual wait is longer than ``bound`` (a poll would rarely catch it)."""
        if self.avg < 0:
            return bound
        if self.avg > bound:
            return 0.0
        return min(bound, SLACK * self.avg + PAD_S)
