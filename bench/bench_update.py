"""Network update benchmark (issue 12): the daemon following a TUF repository on nginx.

Everything is real: nginx over HTTPS on 127.0.0.1 (``tests/nginx_util.py``), a TUF
repository (``tests/repo_util.py``), the daemon as a process, its control socket.

- ``update_full_ratio``: anchor / daemon for a full update of a model of ``FULL_MIB`` MiB
  (100; 24 with ``EDGEWARD_BENCH_QUICK=1``). The anchor does the same work by hand, one
  step after the other: ``curl`` downloads the package through the same nginx, ``edgeward
  unpack`` unpacks it, onnxruntime creates a session and runs one inference. The daemon's
  time runs from the trigger (``POST /check``) until the new version serves (the call
  returns after activation, metadata refresh included). ``FULL_PAIRS`` updates, each
  followed by its anchor on the same package (interleaved); median over median. Goal ≥ 0.8.
- ``update_residual_wire_ratio``: bytes nginx served for the residual update / for the
  full update of the benchmark's fine-tune pair (``bench.bench_residual``: A, and B = A
  fine-tuned; int8). Goal ≤ 0.2.
- ``update_residual_time_ratio``: the same two updates with nginx limited to 2 MB/s (a
  cellular link): residual trigger→serving / full trigger→serving. Goal ≤ 0.3.
- ``update_idle_check_bytes``: bytes (headers and bodies, nginx ``$bytes_sent``) one
  check costs when nothing changed: the timestamp and the 404 of the next root. Goal
  ≤ 2 KiB. docs/FLEET.md scales it to a fleet.
- ``update_kill9_points``: kill -9 rounds survived with no inconsistent state
  (``tests/kill9_util.py``; 200 rounds, 20 quick, or ``EDGEWARD_KILL9_ROUNDS``). It is a
  count, not a timing, so it runs once per bench process; an inconsistency fails the
  bench.

Runs alone as ``python -m bench.bench_update [work]``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

QUICK = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"
FULL_MIB = 24 if QUICK else 100
FULL_PAIRS = 3  # daemon update + anchor pairs, interleaved (medians)
KILL9_ROUNDS = int(os.environ.get("EDGEWARD_KILL9_ROUNDS", "20" if QUICK else "200"))
CELLULAR = 2 * 1000 * 1000  # bytes/s
ROOT = Path(__file__).resolve().parents[1]

_kill9_done: dict[str, float] = {}


def _edgeward(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "agent", *args], check=True, cwd=ROOT, capture_output=True
    )


def _pack(model: Path, name: str, version: int, key: Any, out: Path, **kw: Any) -> Path:
    from agent.package import PackSpec, pack

    out.parent.mkdir(parents=True, exist_ok=True)
    pack(PackSpec(models=[model], name=name, version=version, signing_keys=[key], **kw), out)
    return out


class _Box:
    """One daemon following one repository (its own state directory)."""

    def __init__(self, work: Path, nginx: Any, repo: Any, trust: Path) -> None:
        from tests.daemon_util import start_daemon, write_config
        from tests.repo_util import write_repo_config

        rtable = write_repo_config(work, nginx, repo, read_timeout=60.0)
        cfg = write_config(work / "d", trust_dir=trust, extra=rtable)
        self.d = start_daemon(work / "d", config=cfg)

    def check(self) -> tuple[float, dict[str, Any]]:
        from tests.daemon_util import http_unix

        t0 = time.perf_counter()
        _s, _h, body = http_unix(self.d.control_sock, "POST", "/check", timeout=1800)
        return time.perf_counter() - t0, json.loads(body)

    def stop(self) -> None:
        self.d.stop()


def _served(nginx: Any, suffix: str, *, headers: bool = False) -> int:
    time.sleep(0.3)
    return sum(
        (e.bytes_sent if headers else e.body_bytes) for e in nginx.log() if e.path.endswith(suffix)
    )


def _anchor(work: Path, nginx: Any, tf: Any, trust: Path) -> tuple[float, float, float]:
    """The full update by hand, one step after the other: (curl, unpack, session + one
    inference) seconds."""
    import numpy as np
    import onnxruntime as ort

    out = work / "anchor"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    url = f"{nginx.url}/targets/{tf.path.rpartition('/')[0]}/"
    url += f"{tf.hashes['sha256']}.{tf.path.rpartition('/')[2]}"
    pub = next(trust.glob("*.pub"))
    t0 = time.perf_counter()
    subprocess.run(
        ["curl", "-sSf", "--cacert", str(nginx.ca_bundle), "-o", str(out / "pkg.emp"), url],
        check=True,
    )
    t1 = time.perf_counter()
    _edgeward("unpack", str(out / "pkg.emp"), "--trust", str(pub), "-o", str(out / "u"))
    t2 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        str(out / "u" / "Model" / "big.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    sess.run(None, {"x": np.ones((1, 4), np.float32)})
    t3 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    return t1 - t0, t2 - t1, t3 - t2


def _full_ratio(work: Path, key: Any, trust: Path) -> dict[str, float]:
    """``FULL_PAIRS`` full updates (versions 2, 3, ...), each followed by the anchor doing
    the same by hand on the same package: interleaved, so a load swing on the shared box
    hits both; the figure is the median anchor over the median daemon time."""
    from tests.nginx_util import Nginx
    from tests.repo_util import TufRepo, big_onnx, fields_of

    versions = range(1, FULL_PAIRS + 2)
    pkgs = {
        v: _pack(
            big_onnx(work / f"m{v}" / "big.onnx", mib=FULL_MIB, seed=v),
            "big",
            v,
            key,
            work / "pkgs" / f"big-{v}.emp",
        )
        for v in versions
    }
    for v in versions:
        shutil.rmtree(work / f"m{v}", ignore_errors=True)
    repo = TufRepo.create(work / "repo")
    repo.add(pkgs[1], fields_of(pkgs[1]))
    repo.publish()
    nginx = Nginx(work / "nginx", work / "repo")
    box = _Box(work / "box", nginx, repo, trust)
    daemon: list[float] = []
    anchors: list[tuple[float, float, float]] = []
    try:
        _t, res = box.check()
        assert res["installed"] == {"big": "1"}, res
        size = pkgs[2].stat().st_size
        print(f"full update of a {size / 1e6:.0f} MB package ({FULL_MIB} MiB model):")
        for v in versions[1:]:
            tf = repo.add(pkgs[v], fields_of(pkgs[v]))
            repo.publish()
            daemon_s, res = box.check()
            assert res["installed"] == {"big": str(v)}, res
            daemon.append(daemon_s)
            anchors.append(_anchor(work, nginx, tf, trust))
            c, u, s = anchors[-1]
            print(
                f"  v{v}: daemon trigger -> serving {daemon_s:.2f} s; anchor "
                f"{c + u + s:.2f} s (curl {c:.2f} + unpack {u:.2f} + session and one "
                f"inference {s:.2f})"
            )
            stages = [ln for ln in box.d.log().splitlines() if f"updated big to version {v}" in ln]
            if stages:  # the daemon's own account of its stages
                print("    daemon stages: " + stages[-1].split("; ", 1)[-1])
        anchor = statistics.median(sum(a) for a in anchors)
        daemon_med = statistics.median(daemon)
        print(f"  median: anchor {anchor:.2f} s, daemon {daemon_med:.2f} s")
        print(f"  update_full_ratio = {anchor / daemon_med:.3f} (goal >= 0.8)")
        return {"update_full_ratio": anchor / daemon_med}
    finally:
        box.stop()
        nginx.stop()


def _pair(work: Path) -> tuple[Path, Path]:
    """The fine-tune pair of bench_residual (trained once, cached beside its own)."""
    from bench import bench_residual as br

    cache = work.parent / "residual" / "cache" / br.PAIR_VERSION
    br._build_pair(cache)
    return cache / "A.onnx", cache / "B.onnx"


def _residual_ratios(work: Path, key: Any, trust: Path) -> dict[str, float]:
    from tests.nginx_util import Nginx
    from tests.repo_util import TufRepo, fields_of

    # no self-test samples: the pair's samples are B's exact logits, which A (v1) does not
    # reproduce, nor the int8 reconstruction of B to the self-test's tolerance
    a, b = _pair(work)
    v1 = _pack(a, "ft", 1, key, work / "pkgs" / "ft-1.emp")
    v2 = _pack(b, "ft", 2, key, work / "pkgs" / "ft-2.emp")
    r2 = _pack(b, "ft", 2, key, work / "pkgs" / "ft-2-from-1.emp", base=v1, bits=8)
    out: dict[str, float] = {}
    times: dict[str, float] = {}
    wire: dict[str, int] = {}
    idle = 0
    for kind in ("full", "residual"):
        w = work / kind
        shutil.rmtree(w, ignore_errors=True)
        repo = TufRepo.create(w / "repo")
        repo.add(v1, fields_of(v1))
        repo.publish()
        nginx = Nginx(w / "nginx", w / "repo")
        box = _Box(w / "box", nginx, repo, trust)
        try:
            _t, res = box.check()
            assert res["installed"] == {"ft": "1"}, res
            nginx.reconfigure(limit_rate=CELLULAR)
            repo.add(v2, fields_of(v2))
            if kind == "residual":
                repo.add(r2, fields_of(r2))
            repo.publish()
            times[kind], res = box.check()
            assert res["installed"] == {"ft": "2"}, res
            wire[kind] = _served(nginx, "ft-2-from-1.emp" if kind == "residual" else "ft-2.emp")
            before = len(nginx.log())
            _t, res = box.check()
            assert res["unchanged"] == ["ft"], res
            time.sleep(0.3)
            idle = sum(e.bytes_sent for e in nginx.log()[before:])
            paths = [e.path for e in nginx.log()[before:]]
        finally:
            box.stop()
            nginx.stop()
    print(f"fine-tune pair update over a {CELLULAR / 1e6:.0f} MB/s link:")
    print(f"  full: {wire['full'] / 1e6:.2f} MB served, trigger -> serving {times['full']:.2f} s")
    print(
        f"  residual: {wire['residual'] / 1e6:.2f} MB served, trigger -> serving "
        f"{times['residual']:.2f} s"
    )
    out["update_residual_wire_ratio"] = wire["residual"] / wire["full"]
    out["update_residual_time_ratio"] = times["residual"] / times["full"]
    print(f"  update_residual_wire_ratio = {out['update_residual_wire_ratio']:.3f} (goal <= 0.2)")
    print(f"  update_residual_time_ratio = {out['update_residual_time_ratio']:.3f} (goal <= 0.3)")
    out["update_idle_check_bytes"] = float(idle)
    print(f"idle check: {idle} bytes on the wire (headers + bodies) for {', '.join(paths)}")
    print(f"  update_idle_check_bytes = {idle} (goal <= 2048)")
    return out


def _kill9(work: Path) -> dict[str, float]:
    from tests.kill9_util import Kill9Rig

    if _kill9_done:
        print(f"kill -9: {int(_kill9_done['update_kill9_points'])} points (counted once per run)")
        return dict(_kill9_done)
    shutil.rmtree(work, ignore_errors=True)
    rig = Kill9Rig(work).create()
    t0 = time.perf_counter()
    try:
        for _ in range(KILL9_ROUNDS):
            rig.round()
    finally:
        rig.close()
    r = rig.result
    print(
        f"kill -9 at {r.points} random moments of a {r.update_s:.2f} s update "
        f"({time.perf_counter() - t0:.0f} s): phases hit {dict(sorted(r.phases.items()))}, "
        f"{len(r.inconsistent)} inconsistent"
    )
    if r.inconsistent:
        raise SystemExit(f"kill -9 left inconsistent states: {r.inconsistent[:5]}")
    _kill9_done["update_kill9_points"] = float(r.points)
    print(f"  update_kill9_points = {r.points} (goal >= 200, 0 inconsistent)")
    return dict(_kill9_done)


def run(work: Path) -> dict[str, float]:
    from agent.keys import load_private
    from tests.daemon_util import signing_key

    work = work.resolve()  # nginx gets absolute paths
    shutil.rmtree(work / "full", ignore_errors=True)
    shutil.rmtree(work / "keys", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    key_path, trust = signing_key(work / "keys")
    key = load_private(key_path)
    out = _full_ratio(work / "full", key, trust)
    shutil.rmtree(work / "full", ignore_errors=True)
    out.update(_residual_ratios(work / "pair", key, trust))
    out.update(_kill9(work / "kill9"))
    return out


if __name__ == "__main__":
    w = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent / "work" / "update"
    )
    print(run(w))
