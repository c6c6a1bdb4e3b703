"""What installing and operating the agent costs (issue 17).

* CLI start: ``edgeward --version`` wall time, anchored on ``python -I -c pass`` in the
  same run (the interpreter's own start). The CLI imports its commands' heavy modules
  inside the handlers, so this ratio stays near 1.
* A metrics scrape: ``GET /metrics`` on the metrics socket of a daemon serving the tiny
  model, anchored on ``GET /v2/health/live`` on its inference socket (the cheapest
  request the same HTTP server answers), both over http.client.
* The daemon's idle RSS before and after its first scrape: prometheus_client is
  imported at the first scrape (agent/metrics.py), so a device nobody scrapes does not
  carry it.

Anchor and measured calls alternate in blocks so load from other processes hits both.
``EDGEWARD_BENCH_QUICK=1`` shortens the loops.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUICK = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"
ROOT = Path(__file__).resolve().parents[1]


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def _cli_start() -> tuple[float, float]:
    anchor = [sys.executable, "-I", "-c", "pass"]
    cli = [sys.executable, "-m", "agent", "--version"]
    a, c = [], []
    for _ in range(5 if QUICK else 15):
        a.append(_wall(anchor))
        c.append(_wall(cli))
    return statistics.median(a), statistics.median(c)


def _scrapes(work: Path) -> tuple[float, float, float, float]:
    from tests.daemon_util import http_unix, run_dir, start_daemon, tiny_model_dir

    shutil.rmtree(work / "install", ignore_errors=True)
    src = tiny_model_dir(work / "install" / "src", "tiny", "1")
    d = start_daemon(work / "install" / "d", [src])
    try:
        time.sleep(1.0)
        rss_before = d.rss_bytes() / 2**20
        msock = run_dir(d.work) / "metrics.sock"
        live, scrape = [], []
        n = 20 if QUICK else 100
        for _ in range(5):
            for _ in range(n):
                t0 = time.perf_counter()
                http_unix(d.infer_sock, "GET", "/v2/health/live")
                live.append(time.perf_counter() - t0)
            for _ in range(n):
                t0 = time.perf_counter()
                status, _h, _b = http_unix(msock, "GET", "/metrics")
                scrape.append(time.perf_counter() - t0)
                assert status == 200
        rss_after = d.rss_bytes() / 2**20
    finally:
        d.stop()
    return statistics.median(live), statistics.median(scrape), rss_before, rss_after


def run(work: Path) -> dict[str, float]:
    anchor, cli = _cli_start()
    print(
        f"CLI start: edgeward --version {cli * 1e3:.0f} ms, python -I -c pass "
        f"{anchor * 1e3:.0f} ms: {cli / anchor:.2f}x the interpreter's start"
    )
    live, scrape, before, after = _scrapes(work)
    print(
        f"metrics scrape p50 {scrape * 1e3:.2f} ms vs /v2/health/live p50 {live * 1e3:.2f} ms "
        f"({scrape / live:.1f}x); daemon RSS {before:.1f} MB idle, {after:.1f} MB after "
        f"scrapes (+{after - before:.1f} MB: prometheus_client loaded at the first scrape)"
    )
    return {
        "cli_version_start_ratio": cli / anchor,
        "cli_version_start_ms": cli * 1e3,
        "metrics_scrape_p50_ms": scrape * 1e3,
        "metrics_scrape_vs_live_ratio": scrape / live,
        "daemon_rss_idle_unscraped_mb": before,
        "daemon_rss_after_scrapes_mb": after,
    }
