"""What a writer of the inbox can try, and what the store does with modified files
(issue #13 items 1-4, 12): cases tried per class and refused, and the time a refusal
costs.

* **Cases per class** (``reliability_inbox_<class>_tried`` / ``_refused``): the same
  vectors as tests/test_hardening_inbox.py and tests/test_hardening_installed.py, run
  against the production code paths the daemon uses: planted links at the names a
  refusal writes (the target must stay untouched), hostile JSON before the signature
  (nested ``[``, deep objects, huge numbers and strings; one ``EdgewardError`` each),
  non-regular inbox entries (refused as such), names with control characters (escaped),
  tampered installed versions (found by the start-up check). The figure
  ``reliability_inbox_cases_refused_ratio`` is refused / tried over all classes (goal 1).
* **Time to refuse** (``reliability_refuse_*``, goal ≤ 1 s): a FIFO, a link to
  ``/dev/zero``, a socket, a directory, a 4 GiB sparse file of zeros, and a valid signed
  head followed by 4 GiB of zeros, each read the way the daemon's inbox scan reads it
  (``agent.package.verify(nofollow=True)``); the worst of 3. Anchor: verifying the valid
  tiny package (same run), printed as a ratio.
* **The daemon** (``reliability_refuse_check_s``, ``reliability_refuse_sigterm_s``): a
  real daemon's ``POST /check`` with all of those in its inbox beside a valid package
  (which installs), and the time from SIGTERM to exit while a FIFO and a link to
  ``/dev/zero`` sit in the inbox during a check (systemd's stop timeout is 90 s).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"
SPARSE = 4 << 30


def _rebuild(pkg: Path, out: Path, **replace: bytes) -> Path:
    from agent.tario import TarReader, TarWriter

    buf = io.BytesIO()
    tw = TarWriter(buf)
    with open(pkg, "rb") as f:
        tar = TarReader(f, max_entries=10_000, max_total=1 << 40)
        while (e := tar.next()) is not None:
            if e.kind == "dir":
                tw.add_dir(e.path)
            else:
                data = tar.read_all(1 << 30, e.path)
                tw.add_bytes(e.path, replace.get(e.path.replace(".", "_"), data))
    tw.close()
    out.write_bytes(buf.getvalue())
    return out


HOSTILE_JSON = {
    "nested-lists": b"[" * 60_000,
    "nested-closed": b"[" * 30_000 + b"]" * 30_000,
    "deep-objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "huge-int": b'{"format": 1, "signatures": ' + b"9" * 60_000 + b"}",
    "huge-float": b'{"format": 1e99999999, "signatures": []}',
    "huge-string": b'{"format": 1, "signatures": ["' + b"A" * 60_000 + b'"]}',
    "nan": b'{"format": NaN, "signatures": []}',
    "bad-utf8": b'{"format": 1, "signatures": ["\xff\xfe"]}',
}


def _sparse(path: Path, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(SPARSE)
        f.write(head)
    return path


def _signed_head(pkg: Path) -> bytes:
    from agent.tario import TarReader

    with open(pkg, "rb") as f:
        tar = TarReader(f, max_entries=10, max_total=1 << 30)
        for _ in range(2):
            tar.next()
            tar.read_all(1 << 20, "member")
        end = tar.position + (-tar.position % 512)
    return pkg.read_bytes()[:end]


def _timed(fn: Callable[[], object]) -> tuple[float, str]:
    from agent.errors import EdgewardError

    t0 = time.perf_counter()
    try:
        fn()
        what = "accepted"
    except EdgewardError as exc:
        what = exc.code
    return time.perf_counter() - t0, what


def _non_regular(d: Path, pkg: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "fifo.emp")
    (d / "zero.emp").symlink_to("/dev/zero")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(d / "sock.emp"))
    s.close()
    (d / "dir.emp").mkdir()
    (d / "dangling.emp").symlink_to(d / "nowhere")
    (d / "link-to-valid.emp").symlink_to(pkg)
    return {
        "fifo": d / "fifo.emp",
        "dev-zero": d / "zero.emp",
        "socket": d / "sock.emp",
        "directory": d / "dir.emp",
        "dangling-link": d / "dangling.emp",
        "link-to-valid": d / "link-to-valid.emp",
        "sparse-4GiB": _sparse(d / "sparse.emp"),
        "signed-head-then-4GiB-zeros": _sparse(d / "tail.emp", _signed_head(pkg)),
    }


def _classes(
    work: Path, pkg: Path, trust: Any
) -> tuple[dict[str, tuple[int, int]], dict[str, float]]:
    """(class -> (tried, refused)), (case -> seconds to refuse, worst of 3)."""
    from agent.installed import check_version
    from agent.package import inspect, unpack, verify
    from agent.store import reject_file
    from agent.textsafe import printable

    work.mkdir(parents=True, exist_ok=True)
    counts: dict[str, tuple[int, int]] = {}
    # hostile JSON before the signature: manifest.sig and manifest.json
    tried = refused = 0
    for name, data in HOSTILE_JSON.items():
        for member, calls in (
            ("manifest_sig", (lambda p: verify(p, trust),)),
            ("manifest_json", (lambda p: verify(p, trust), inspect)),
        ):
            p = _rebuild(pkg, work / f"{member}-{name}.emp", **{member: data})
            for call in calls:
                tried += 1
                refused += _timed(lambda c=call, q=p: c(q))[1] != "accepted"
    counts["json"] = (tried, refused)
    # non-regular entries, read as the inbox scan reads them
    times: dict[str, float] = {}
    tried = refused = 0
    for case, p in _non_regular(work / "nr", pkg).items():
        worst = 0.0
        for _ in range(1 if QUICK else 3):
            secs, what = _timed(lambda q=p: verify(q, trust, nofollow=True))
            worst = max(worst, secs)
        tried += 1
        refused += what != "accepted"
        times[case] = worst
        print(f"  refuse {case:30s} {worst * 1000:8.1f} ms  ({what})")
    counts["nonregular"] = (tried, refused)
    # planted links where a refusal writes
    tried = refused = 0
    victim = work / "victim.bin"
    victim.write_bytes(b"served model bytes")
    vdir = work / "victim-dir"
    vdir.mkdir()
    inbox = work / "inbox-links"
    inbox.mkdir()
    plants = {
        "reason-to-file": ("a.emp.rejected.reason", victim),
        "reason-dangling": ("b.emp.rejected.reason", work / "nowhere" / "x"),
        "reason-to-dir": ("c.emp.rejected.reason", vdir),
        "rejected-to-file": ("d.emp.rejected", victim),
    }
    for stem, (name, target) in zip("abcd", plants.values(), strict=True):
        (inbox / name).symlink_to(target)
        (inbox / f"{stem}.emp").write_bytes(b"junk")
        reject_file(inbox / f"{stem}.emp", "[format] junk")
        tried += 1
        intact = victim.read_bytes() == b"served model bytes" and not list(vdir.iterdir())
        refused += intact and not (work / "nowhere").exists()
    counts["links"] = (tried, refused)
    # names and labels with control characters
    names = ["a\nERROR forged", "\x1b[2J\x1b]0;t\x07", "\u202egnp.emp", "tab\there", "\x7f\x85"]
    counts["names"] = (
        len(names),
        sum(all(ch.isprintable() for ch in printable(n)) for n in names),
    )
    # tampered installed versions
    tried = refused = 0

    def flip(d: Path) -> None:
        f = d / "Model" / "tiny.onnx"
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 1
        f.write_bytes(bytes(b))

    tamper: dict[str, Callable[[Path], object]] = {
        "weight-bit": flip,
        "sample-deleted": lambda d: next((d / "Meta-info").rglob("*.npz")).unlink(),
        "extra-file": lambda d: (d / "Model" / "extra.py").write_text("x = 1\n"),
        "manifest-edited": lambda d: (d / "manifest.json").write_bytes(
            (d / "manifest.json").read_bytes().replace(b'"tiny"', b'"tinx"', 1)
        ),
    }
    for case, how in tamper.items():
        d = work / f"installed-{case}"
        unpack(pkg, d, trust=trust)
        how(d)
        tried += 1
        refused += not check_version("tiny", "1", d, trust).ok
    counts["installed"] = (tried, refused)
    return counts, times


def _daemon(work: Path, pkg: Path, pkg2: Path, trust_dir: Path) -> dict[str, float]:
    import signal

    from tests.daemon_util import start_daemon

    d = start_daemon(work / "daemon", trust_dir=trust_dir)
    try:
        _non_regular(d.inbox / "x", pkg)  # build in a subdirectory, then move in
        for p in sorted((d.inbox / "x").iterdir()):
            os.replace(p, d.inbox / p.name)
        (d.inbox / "x").rmdir()
        shutil.copy(pkg, d.inbox / "tiny-1.emp")
        t0 = time.perf_counter()
        r = d.cli("check", "--json", timeout=600)
        check_s = time.perf_counter() - t0
        res = json.loads(r.stdout)
        assert res["installed"] == {"tiny": "1"}, r.stdout + r.stderr
        print(f"  daemon check with {len(res['failed'])} hostile entries: {check_s:.2f} s")
        os.mkfifo(d.inbox / "fifo2.emp")
        (d.inbox / "zero2.emp").symlink_to("/dev/zero")
        shutil.copy(pkg2, d.inbox / "tiny-2.emp")
        check = subprocess.Popen(
            [sys.executable, "-m", "agent", "check", "--control-socket", str(d.control_sock)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        t0 = time.perf_counter()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=120)
        sigterm_s = time.perf_counter() - t0
        check.wait(timeout=60)
        print(f"  SIGTERM during a check -> exit: {sigterm_s:.2f} s (systemd stop timeout 90 s)")
    finally:
        d.stop()
    return {"reliability_refuse_check_s": check_s, "reliability_refuse_sigterm_s": sigterm_s}


def run(work: Path) -> dict[str, float]:
    from agent.keys import load_trusted
    from agent.package import verify
    from tests.daemon_util import make_package, signing_key

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    key, trust_dir = signing_key(work)
    pkg = make_package(work, key, "tiny", "1")
    pkg2 = make_package(work, key, "tiny", "2", scale=3.0)
    trust = load_trusted([trust_dir])
    anchor = statistics.median(_timed(lambda: verify(pkg, trust))[0] for _ in range(5))
    print(
        f"anchor: verify the valid tiny package ({pkg.stat().st_size:,} B): {anchor * 1000:.1f} ms"
    )
    counts, times = _classes(work / "cases", pkg, trust)
    out: dict[str, float] = {}
    total_tried = total_refused = 0
    for cls, (tried, refused) in counts.items():
        print(f"  class {cls:12s} tried {tried:3d} refused {refused:3d}")
        out[f"reliability_inbox_{cls}_tried"] = float(tried)
        out[f"reliability_inbox_{cls}_refused"] = float(refused)
        total_tried += tried
        total_refused += refused
    out["reliability_inbox_cases_refused_ratio"] = total_refused / total_tried
    nonreg = max(v for k, v in times.items() if "4GiB" not in k)
    out["reliability_refuse_nonregular_max_s"] = nonreg
    out["reliability_refuse_sparse_s"] = times["sparse-4GiB"]
    out["reliability_refuse_sparse_signed_head_s"] = times["signed-head-then-4GiB-zeros"]
    for k in ("reliability_refuse_nonregular_max_s", "reliability_refuse_sparse_s",
              "reliability_refuse_sparse_signed_head_s"):  # fmt: skip
        print(
            f"  {k}: {out[k] * 1000:.1f} ms = {out[k] / anchor:.2f} x verifying the valid package"
        )
    out.update(_daemon(work, pkg, pkg2, trust_dir))
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for k, v in run(Path(tmp) / "reliability").items():
            print(f"{k} = {v:.4g}")
