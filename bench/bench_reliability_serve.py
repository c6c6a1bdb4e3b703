"""Serving under a hostile local client (issue #13, items 5-7): memory and fairness.

Measured on the real daemon (``tests.daemon_util.start_daemon``) with the tiny model:

* **RSS under 40 hostile connections.** Anchor: the daemon's own idle RSS after one
  request, and the configured body budget (``max_inflight_body_bytes``). Then 40
  connections each declare a 64 MiB body and send only its first KiB, and then 40 more
  stream 64 MiB bodies as fast as they can but never finish them. The figure is the
  peak RSS seen (sampled while they run) over ``2 × idle + budget`` (goal ≤ 1). Lending
  is off for the daemon figure (the daemon buffers every body itself); the same is
  measured for the model's worker with lending on (it then buffers the bodies of lent
  connections against its own budget).
* **Legit requests during a 512-connection flood.** Anchor: the same requests with no
  flood (all served). Four other processes of the same uid hold 128 connections each
  and keep closing and re-opening them; this process sends requests, each on a new
  connection, and counts the 200s (goal ≥ 99 %). The p50 latency with and without the
  flood is printed as a ratio.
* **Edge-case tensors refused with 400.** The vectors of tests/test_hardening_serve.py
  (huge/too many/negative dimensions, shape/data mismatch, 64 KiB of nested ``[``,
  non-numeric data, binary size mismatches), relayed and lent; the figure is the share
  answered 400 (goal 1.0; anything else was a 500 or worse).

``EDGEWARD_BENCH_QUICK=1`` shortens the flood.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"
MIB = 1024 * 1024
BUDGET = 256 * MIB  # the default max_inflight_body_bytes

FLOODER = """\
import socket, sys, time
path, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s
for _ in range(n):
    s = conn()
    if s is not None:
        socks.append(s)
print("held", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:  # churn: close the oldest, open a new one
    if socks:
        socks.pop(0).close()
    s = conn()
    if s is not None:
        socks.append(s)
    time.sleep(0.002)
"""


def _head(length: int) -> bytes:
    return (
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


def _rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def _hostile_peak(sock: Path, pid: int) -> int:
    """Peak RSS of ``pid`` while 40 header-only and then 40 streaming connections run."""
    peak = [_rss(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    held: list[socket.socket] = []
    try:
        for _ in range(40):  # header-only: 64 MiB declared, 1 KiB sent
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(str(sock))
            s.sendall(_head(64 * MIB) + b" " * 1024)
            held.append(s)
        time.sleep(0.5)
        chunk = b" " * MIB

        def stream() -> None:  # 64 MiB minus a byte: never complete
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            try:
                s.connect(str(sock))
                s.sendall(_head(64 * MIB))
                for _ in range(63):
                    s.sendall(chunk)
                s.sendall(chunk[:-1])
                time.sleep(0.5)
            except OSError:  # refused (body budget) and closed
                pass
            finally:
                s.close()

        streams = [threading.Thread(target=stream) for _ in range(40)]
        for t in streams:
            t.start()
        for t in streams:
            t.join(120)
    finally:
        for s in held:
            s.close()
        stop.set()
        sampler.join(5)
    return peak[0]


def _rss_figures(work: Path) -> dict[str, float]:
    from tests.daemon_util import infer_json, start_daemon, tiny_model_dir

    out: dict[str, float] = {}
    src = tiny_model_dir(work / "src", "tiny", "1")
    for lend in (False, True):
        d = start_daemon(work / ("lent" if lend else "relayed"), [src], lend=lend)
        try:
            assert infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])[0] == 200
            models = json.loads(d.cli("models", "--json").stdout)["models"]
            pid = d.proc.pid if not lend else int(models[0]["pid"])
            who = "daemon" if not lend else "worker"
            time.sleep(0.5)
            idle = _rss(pid)
            peak = _hostile_peak(d.infer_sock, pid)
            bound = 2 * idle + BUDGET
            ok = infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])[0] == 200
            print(
                f"{who} RSS: idle {idle / MIB:.0f} MiB, peak under 40+40 hostile connections "
                f"{peak / MIB:.0f} MiB, bound 2 x idle + budget {bound / MIB:.0f} MiB -> "
                f"{peak / bound:.2f} of the bound; still serving: {ok}"
            )
            out[f"reliability_{who}_rss_hostile_ratio"] = peak / bound
            out[f"reliability_{who}_rss_idle_mb"] = idle / MIB
            out[f"reliability_{who}_rss_hostile_mb"] = peak / MIB
        finally:
            d.stop()
    return out


def _request(sock: Path, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect(str(sock))
        s.sendall(_head(len(body)) + body)
        buf = b""
        while b"\r\n\r\n" not in buf:
            got = s.recv(65536)
            if not got:
                break
            buf += got
        status = int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/1.1 ") else 0
    except OSError:
        status = 0
    finally:
        s.close()
    return status, time.perf_counter() - t0


def _flood_figures(work: Path) -> dict[str, float]:
    from tests.daemon_util import start_daemon, tiny_model_dir

    n = 200 if QUICK else 1000
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    ).encode()
    d = start_daemon(work / "flood", [tiny_model_dir(work / "src", "tiny", "1")])
    flooders: list[subprocess.Popen[str]] = []
    try:
        base = [_request(d.infer_sock, body) for _ in range(n // 4)]
        base_ok = sum(1 for st, _ in base if st == 200) / len(base)
        for _ in range(4):
            p = subprocess.Popen(
                [sys.executable, "-c", FLOODER, str(d.infer_sock), "128", "600"],
                stdout=subprocess.PIPE,
                text=True,
            )
            flooders.append(p)
        for p in flooders:
            assert p.stdout is not None
            p.stdout.readline()
        conns = json.loads(d.cli("status", "--json").stdout)
        flood = [_request(d.infer_sock, body) for _ in range(n)]
        ok = sum(1 for st, _ in flood if st == 200) / len(flood)
        lat = statistics.median(t for st, t in flood if st == 200) if ok else float("nan")
        lat0 = statistics.median(t for _, t in base)
        codes = sorted({st for st, _ in flood})
        print(
            f"flood: 4 processes x 128 connections, churning; {len(flood)} legit requests "
            f"(a new connection each): {ok:.2%} served (no flood: {base_ok:.2%}); statuses "
            f"{codes}; p50 {lat * 1e3:.2f} ms vs {lat0 * 1e3:.2f} ms without the flood "
            f"({lat / lat0:.2f}x); daemon state {conns.get('state')}"
        )
        return {
            "reliability_flood_legit_served_ratio": ok,
            "reliability_flood_p50_ratio": lat / lat0,
        }
    finally:
        for p in flooders:
            p.kill()
            p.wait()
        d.stop()


def _tensor_figures(work: Path) -> dict[str, float]:
    from tests.daemon_util import http_unix, start_daemon, tiny_model_dir
    from tests.test_hardening_serve import _vectors

    tried = refused = 0
    for lend in (False, True):
        d = start_daemon(
            work / f"tensors-{lend}", [tiny_model_dir(work / "src", "tiny", "1")], lend=lend
        )
        try:
            for name, body, headers in _vectors():
                status, _h, resp = http_unix(
                    d.infer_sock, "POST", "/v2/models/tiny/infer", body, headers=headers
                )
                tried += 1
                if status == 400:
                    refused += 1
                else:
                    print(f"  {'lent' if lend else 'relayed'} {name}: {status} {resp[:120]!r}")
        finally:
            d.stop()
    print(f"edge-case tensors: {refused} of {tried} answered 400 (relayed and lent)")
    return {"reliability_tensor_cases_400_ratio": refused / tried}


def run(work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, float] = {}
    out.update(_rss_figures(work))
    out.update(_flood_figures(work))
    out.update(_tensor_figures(work))
    return out
