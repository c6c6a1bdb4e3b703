"""The daemon raises its soft limit on open files toward the hard one at start
(agent.daemon.raise_fd_limit): a worker holds about a dozen descriptors in it."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from tests.helpers import ROOT

CODE = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
from agent.daemon import raise_fd_limit
print(raise_fd_limit())
"""


def _run(soft: int, hard: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(soft=soft, hard=hard)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout.strip())


@pytest.mark.parametrize(
    ("soft", "hard", "want"),
    [(256, 4096, 4096), (1024, 1 << 20, 65536), (100_000, 1 << 20, 100_000), (512, 512, 512)],
    ids=["up-to-hard", "capped", "already-higher", "no-room"],
)
def test_the_soft_limit_rises_toward_the_hard_one(soft: int, hard: int, want: int) -> None:
    _, cur_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if cur_hard != resource.RLIM_INFINITY and hard > cur_hard:
        hard = cur_hard  # an unprivileged run cannot raise its own hard limit
        want = min(want, hard)
        soft = min(soft, hard)
    assert _run(soft, hard) == want
