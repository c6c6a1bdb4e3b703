"""``kill -9`` of the daemon at ≥ 50 random moments of a network update (real nginx,
real daemon, real kills; the rig is tests/kill9_util.py): after each kill the store
holds the old or the new version, never a mix (weights digests checked), staging holds
nothing but the resumable download, and after a restart the update completes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.daemon_util import needs_worker
from tests.kill9_util import Kill9Rig
from tests.nginx_util import needs_nginx

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_worker, needs_nginx]

ROUNDS = int(os.environ.get("EDGEWARD_KILL9_ROUNDS", "50"))


def test_kill9_at_random_moments(tmp_path: Path) -> None:
    rig = Kill9Rig(tmp_path).create()
    try:
        for _ in range(ROUNDS):
            rig.round()
    finally:
        rig.close()
    r = rig.result
    print(f"kill -9 points: {r.points}, phases hit: {dict(r.phases)}")
    assert r.points == ROUNDS
    assert r.inconsistent == []
    # the kills are spread over the pipeline, not bunched in one stage
    assert len(set(r.phases) - {"unknown"}) >= 3, dict(r.phases)
