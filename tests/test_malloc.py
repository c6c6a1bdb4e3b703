"""agent.malloc: big per-request tensors reuse heap pages in the daemon and its workers.

Without the tuning the daemon faults in ~350 fresh pages for every 600 KB request
(glibc hands such blocks out as new mmaps); with it, none after warm-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil

from agent.client import Client
from tests.daemon_util import start_daemon, tiny_model_dir


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_big_requests_do_not_fault_pages_in_again(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, [tiny_model_dir(tmp_path / "src", "tiny", "1")])
    try:
        client = Client(str(d.infer_sock))
        x = np.ones((37632, 4), np.float32)  # 600 KB in, 600 KB out
        for _ in range(30):
            client.infer("tiny", {"x": x})
        pids = [d.proc.pid] + [c.pid for c in psutil.Process(d.proc.pid).children()]
        assert len(pids) == 2  # the daemon and the model's worker
        before = [_minor_faults(p) for p in pids]
        n = 100
        for _ in range(n):
            np.testing.assert_array_equal(client.infer("tiny", {"x": x})["y"], x * 2)
        per_request = [(_minor_faults(p) - b) / n for p, b in zip(pids, before, strict=True)]
        assert max(per_request) < 30, per_request  # untuned: ~350 in the daemon
    finally:
        d.stop()
