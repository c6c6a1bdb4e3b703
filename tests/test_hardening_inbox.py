"""Issue #13 items 1-4: what anyone who can write the inbox can try, without a key.

1. links planted where the daemon writes (the refusal's ``.rejected``/``.reason`` names)
   pointing at a served model file, a directory, nowhere;
2. unsigned input built to break the parser before the signature is checked (nested
   ``[``, deep objects, huge numbers and strings), in ``manifest.json``,
   ``manifest.sig`` and a key envelope: one clear line from the CLI, one file's cost in
   the daemon;
3. things that are not regular files (a link to ``/dev/zero``, a FIFO, a socket, a
   directory, a 4 GiB sparse file of zeros): refused at once, the update path and
   shutdown stay responsive;
4. names and labels with newlines and escape sequences: escaped in logs and output.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import EdgewardError
from agent.keys import load_trusted
from agent.package import inspect, read_manifest, unpack, verify
from agent.tario import TarReader, TarWriter
from agent.textsafe import printable
from tests.daemon_util import (
    ROOT,
    edgeward,
    http_unix,
    make_package,
    needs_worker,
    signing_key,
    start_daemon,
)
from tests.helpers import drop_in_inbox, updater_setup

# --- hostile package builders -----------------------------------------------------------


def _members(pkg: Path) -> list[tuple[str, str, bytes]]:
    """(path, kind, data) of every member of a real package (read with our reader)."""
    with open(pkg, "rb") as f:
        tar = TarReader(f, max_entries=10_000, max_total=1 << 40)
        out = []
        while (e := tar.next()) is not None:
            out.append((e.path, e.kind, tar.read_all(1 << 30, e.path) if e.kind == "file" else b""))
    return out


def _rebuild(pkg: Path, out: Path, **replace: bytes) -> Path:
    """``pkg`` with some members' bytes replaced (keys: member path with '.' -> '_')."""
    buf = io.BytesIO()
    tw = TarWriter(buf)
    for path, kind, data in _members(pkg):
        if kind == "dir":
            tw.add_dir(path)
        else:
            tw.add_bytes(path, replace.get(path.replace(".", "_").replace("/", "__"), data))
    tw.close()
    out.write_bytes(buf.getvalue())
    return out


#: name -> bytes built to break a JSON parser (each within the default size caps)
HOSTILE_JSON: dict[str, bytes] = {
    "nested-lists": b"[" * 60_000,
    "nested-lists-closed": b"[" * 30_000 + b"]" * 30_000,
    "deep-objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "huge-int": b'{"format": 1, "signatures": ' + b"9" * 60_000 + b"}",
    "huge-float": b'{"format": 1e99999999, "signatures": []}',
    "huge-string": b'{"format": 1, "signatures": ["' + b"A" * 60_000 + b'"]}',
    "nan": b'{"format": NaN, "signatures": []}',
    "bad-utf8": b'{"format": 1, "signatures": ["\xff\xfe"]}',
    "nested-in-string-ok-then-deep": b'["[[[[[[[[[[", ' + b"[" * 5000 + b"]" * 5000 + b"]",
}


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("pkgs")
    key, trust = signing_key(work)
    out = {"trust": trust, "key": key}
    for v, scale in (("1", 2.0), ("2", 3.0)):
        out[v] = make_package(work, key, "tiny", v, scale=scale)
    out["other-1"] = make_package(work, key, "other", "1")
    return out


def _hostile_packages(base: Path, work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in HOSTILE_JSON.items():
        out[f"sig-{name}"] = _rebuild(base, work / f"sig-{name}.emp", manifest_sig=data[:65_000])
        out[f"man-{name}"] = _rebuild(base, work / f"man-{name}.emp", manifest_json=data)
    return out


# --- 2: bounded parsing before the signature --------------------------------------------


def test_hostile_json_is_one_error_each(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    trust = load_trusted([pkgs["trust"]])
    calls: dict[str, Callable[[Path], object]] = {
        "verify": lambda p: verify(p, trust),
        "read_manifest": lambda p: read_manifest(p, trust),
        "unpack": lambda p: unpack(p, tmp_path / "out", trust=trust),
        "inspect": inspect,
    }
    for label, pkg in _hostile_packages(pkgs["1"], tmp_path).items():
        for what, call in calls.items():
            if what == "inspect" and label.startswith("sig-"):
                # inspect verifies nothing: a garbled signature just names no signer
                assert inspect(pkg)["signature_key_ids"] == []
                continue
            with pytest.raises(EdgewardError) as ei:
                call(pkg)
            # the signature is checked before the manifest is parsed: a hostile manifest
            # fails there when keys are given, in the bounded parser when not (inspect)
            if what == "inspect" and ("nested" in label or "deep" in label):
                assert "deeper than" in ei.value.message, (label, ei.value.message)
            if label.startswith("sig-"):
                assert ei.value.code == "signature-malformed", (label, what, ei.value.code)
        assert not (tmp_path / "out").exists()


def _cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def _one_line_error(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeward: error ["), r.stderr[-2000:]


def test_cli_prints_one_line_never_a_traceback(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    hostile = _hostile_packages(pkgs["1"], tmp_path / "h")
    picks = ["sig-nested-lists", "man-nested-lists", "man-deep-objects", "sig-huge-int"]
    picks += ["man-huge-string", "man-huge-float"]
    trust = str(pkgs["trust"])
    for label in picks:
        pkg = str(hostile[label])
        _one_line_error(_cli("verify", pkg, "--trust", trust))
        _one_line_error(_cli("unpack", pkg, "--trust", trust, "-o", str(tmp_path / "o")))
        if label.startswith("man-"):
            _one_line_error(_cli("inspect", pkg))
    # a key envelope of nested brackets, given to unpack of an encrypted package
    dev = tmp_path / "dev"
    edgeward("keygen", "--kind", "device", "--out", str(dev))
    src = tmp_path / "m.onnx"
    shutil.copy(next((pkgs["1"].parent.parent / "src").glob("tiny-1/Model/tiny.onnx")), src)
    enc = tmp_path / "enc.emp"
    key = str(pkgs["key"])
    edgeward("pack", "--model", str(src), "--name", "tiny", "--version", "5",
             "--signing-key", key, "--encrypt-for", str(dev), "-o", str(enc))  # fmt: skip
    for name in ("nested-lists", "deep-objects", "huge-int"):
        env = tmp_path / f"{name}.env"
        env.write_bytes(HOSTILE_JSON[name])
        r = _cli("unpack", str(enc), "--trust", trust, "--envelope", str(env),
                 "-o", str(tmp_path / "o2"))  # fmt: skip
        _one_line_error(r)
        assert "envelope" in r.stderr


def test_one_bad_file_costs_only_that_file(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    """The issue's scenario: a 64 KiB manifest.sig of '[' beside a valid newer package."""
    hostile = _hostile_packages(pkgs["2"], tmp_path / "h")

    async def go() -> None:
        _cfg, store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
        drop_in_inbox(tmp_path, pkgs["1"])
        await up.check()
        for label, p in hostile.items():
            shutil.copy(p, tmp_path / "inbox" / f"{label}.emp")
        drop_in_inbox(tmp_path, pkgs["2"])
        res = await up.check()
        assert res.installed == {"tiny": "2"}, res.to_dict()
        assert set(res.failed) == {f"{label}.emp" for label in hostile}
        for label in hostile:
            assert (tmp_path / "inbox" / f"{label}.emp.rejected").exists()
        assert store.current("tiny") == "2"

    asyncio.run(go())


# --- 3: non-regular files -----------------------------------------------------------------


def _plant_non_regular(inbox: Path) -> dict[str, Callable[[], None]]:
    """name -> undo; every kind of entry that is not a regular file."""
    made: dict[str, Callable[[], None]] = {}
    (inbox / "zero.emp").symlink_to("/dev/zero")
    made["zero.emp"] = lambda: None
    os.mkfifo(inbox / "fifo.emp")
    made["fifo.emp"] = lambda: None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(inbox / "sock.emp"))
    made["sock.emp"] = s.close
    (inbox / "dir.emp").mkdir()
    (inbox / "dir.emp" / "x").write_text("x")
    made["dir.emp"] = lambda: None
    (inbox / "dangling.emp").symlink_to(inbox / "nowhere")
    made["dangling.emp"] = lambda: None
    return made


def _sparse(path: Path, size: int = 4 << 30) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_non_regular_and_sparse_refused(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    trust = load_trusted([pkgs["trust"]])
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "fifo.emp")
    (d / "zero.emp").symlink_to("/dev/zero")
    (d / "dir.emp").mkdir()
    sparse = _sparse(d / "sparse.emp")
    # a valid manifest and signature, then gigabytes of zeros
    with open(pkgs["1"], "rb") as f:
        tar = TarReader(f, max_entries=10, max_total=1 << 30)
        for _ in range(2):
            assert tar.next() is not None
            tar.read_all(1 << 20, "member")
        signed_head = tar.position + (-tar.position % 512)
    tail = _sparse(d / "tail.emp")
    with open(tail, "r+b") as f:
        f.write(pkgs["1"].read_bytes()[:signed_head])
    for p, code in (
        (d / "fifo.emp", "package-not-regular"),
        (d / "zero.emp", "package-not-regular"),
        (d / "dir.emp", "package-not-regular"),
        (sparse, "manifest-not-first"),
    ):
        for call in (lambda q: verify(q, trust), lambda q: read_manifest(q, trust)):
            with pytest.raises(EdgewardError) as ei:
                call(p)
            assert ei.value.code == code, (p.name, ei.value.code, ei.value.message)
    with pytest.raises(EdgewardError) as ei:
        verify(tail, trust)
    assert ei.value.code == "tar-trailing", ei.value.message
    head_link = d / "link.emp"
    head_link.symlink_to(pkgs["1"])
    # following a link is the CLI's choice; the daemon's reads never follow one
    with pytest.raises(EdgewardError) as ei:
        verify(head_link, trust, nofollow=True)
    assert ei.value.code == "package-not-regular"
    assert verify(head_link, trust).name == "tiny"
    r = _cli("verify", str(d / "fifo.emp"), "--trust", str(pkgs["trust"]), timeout=60)
    _one_line_error(r)
    assert "FIFO" in r.stderr
    _one_line_error(_cli("verify", str(sparse), "--trust", str(pkgs["trust"]), timeout=60))


def test_inbox_non_regular_entries_do_not_block(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    async def go() -> None:
        _cfg, _store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
        inbox = tmp_path / "inbox"
        undo = _plant_non_regular(inbox)
        _sparse(inbox / "sparse.emp")
        drop_in_inbox(tmp_path, pkgs["1"])
        try:
            res = await asyncio.wait_for(up.check(), 120)
        finally:
            for u in undo.values():
                u()
        assert res.installed == {"tiny": "1"}, res.to_dict()
        for name in [*undo, "sparse.emp"]:
            assert name in res.failed, (name, res.failed)
            assert os.path.lexists(inbox / f"{name}.rejected"), name
        assert os.path.realpath(inbox / "zero.emp.rejected") == "/dev/zero"  # moved, not read

    asyncio.run(go())


# --- 1: refusals never write through a planted link -----------------------------------------


def test_refusal_never_writes_through_planted_links(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    async def go() -> None:
        _cfg, store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
        drop_in_inbox(tmp_path, pkgs["1"])
        await up.check()
        served = store.version_dir("tiny", "1") / "Model" / "tiny.onnx"
        before = hashlib.sha256(served.read_bytes()).hexdigest()
        inbox = tmp_path / "inbox"
        victim_dir = tmp_path / "victim"
        victim_dir.mkdir()
        plants = {
            "a.emp.rejected.reason": served,  # to a served model file
            "b.emp.rejected.reason": tmp_path / "nowhere" / "x",  # dangling
            "c.emp.rejected.reason": victim_dir,  # to a directory
            "d.emp.rejected": served,  # the rename target itself
        }
        for name, target in plants.items():
            (inbox / name).symlink_to(target)
        for stem in "abcd":
            (inbox / f"{stem}.emp").write_bytes(b"not a package" * 100)
        res = await up.check()
        assert {f"{s}.emp" for s in "abcd"} <= set(res.failed)
        assert hashlib.sha256(served.read_bytes()).hexdigest() == before
        assert list(victim_dir.iterdir()) == []
        assert not (tmp_path / "nowhere").exists()
        for stem in "abc":
            reason = inbox / f"{stem}.emp.rejected.reason"
            assert not reason.is_symlink() and "[" in reason.read_text()
        assert not (inbox / "d.emp.rejected").is_symlink()  # replaced by the refused file
        assert store.current("tiny") == "1"

    asyncio.run(go())


# --- 4: escaping -----------------------------------------------------------------------------


def test_printable_escapes_controls() -> None:
    assert printable("a\nb") == "a\\x0ab"
    assert printable("\x1b[2J\x1b]0;pwned\x07") == "\\x1b[2J\\x1b]0;pwned\\x07"
    assert printable("\u202egnp.exe") == "\\u202egnp.exe"
    assert printable("x" * 1000, limit=10) == "x" * 10 + "..."
    assert printable("plain ascii, äöü") == "plain ascii, äöü"


def test_inspect_escapes_label(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    src = next((pkgs["1"].parent.parent / "src").glob("tiny-1/Model/tiny.onnx"))
    out = tmp_path / "x.emp"
    edgeward("pack", "--model", str(src), "--name", "tiny", "--version", "3",
             "--label", "\x1b[31mred\x1b]0;title\x07\nforged line",
             "--signing-key", str(pkgs["key"]), "-o", str(out))  # fmt: skip
    r = _cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "\\x1b[31mred" in r.stdout and "forged line" in r.stdout
    assert not any(ln.startswith("forged line") for ln in r.stdout.splitlines())


# --- the daemon: items 1-4 end to end ---------------------------------------------------------


@needs_worker
@pytest.mark.e2e
def test_daemon_hostile_inbox(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    """A real daemon serving tiny 1; into its inbox: planted links to the served model, a
    FIFO, a link to /dev/zero, a sparse 4 GiB file, hostile JSON, a file name with a
    newline and an escape sequence, and a valid tiny 2. The check returns, tiny 2
    serves, the model files are intact after a restart, the log has no forged line,
    and SIGTERM stops the daemon while a FIFO sits in the inbox."""
    work = tmp_path / "w"
    d = start_daemon(work, [pkgs["1"]], trust=[pkgs["trust"]], trust_dir=pkgs["trust"])
    try:
        served = d.state_dir / "models" / "tiny" / "current" / "Model" / "tiny.onnx"
        served_real = served.resolve()
        before = hashlib.sha256(served.read_bytes()).hexdigest()
        inbox = d.inbox
        (inbox / "evil.emp.rejected.reason").symlink_to(served)
        (inbox / "evil.emp").write_bytes(b"x" * 4096)
        os.mkfifo(inbox / "fifo.emp")
        (inbox / "zero.emp").symlink_to("/dev/zero")
        _sparse(inbox / "sparse.emp")
        for label, p in _hostile_packages(pkgs["2"], tmp_path / "h").items():
            if label in ("sig-nested-lists", "man-deep-objects"):
                shutil.copy(p, inbox / f"{label}.emp")
        forged = "x\nERROR agent.daemon: forged\x1b[2J.emp"
        (inbox / forged).write_bytes(b"junk")
        not_utf8 = os.fsdecode(b"\xff\xfe-not-utf8.emp")
        os.mkfifo(inbox / not_utf8)  # refused with its name in the reason
        shutil.copy(pkgs["2"], inbox / "tiny-2.emp")
        r = d.cli("check", "--json", timeout=300)
        res = json.loads(r.stdout)
        assert res["installed"] == {"tiny": "2"}, r.stdout + r.stderr
        for name in ("evil.emp", "fifo.emp", "zero.emp", "sparse.emp", forged, not_utf8):
            assert name in res["failed"], (name, res["failed"])
        assert os.path.exists(inbox / f"{not_utf8}.rejected.reason")
        assert hashlib.sha256(served_real.read_bytes()).hexdigest() == before
        log = d.log()
        assert "\nERROR agent.daemon: forged" not in log and "\x1b[2J" not in log
        assert "forged\\x1b[2J.emp" in log
        # r.stderr of the text form is escaped too
        r2 = d.cli("status")
        assert "\x1b" not in r2.stdout
        # restart: both versions' files are intact and the new one serves
        assert d.stop() == 0
        d = start_daemon(work, config=d.config)
        status, _h, body = http_unix(
            d.infer_sock,
            "POST",
            "/v2/models/tiny/infer",
            json.dumps(
                {
                    "inputs": [
                        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}
                    ]
                }
            ).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 200, body
        assert json.loads(body)["outputs"][0]["data"] == [3.0, 3.0, 3.0, 3.0]
        # SIGTERM while a FIFO and a link to /dev/zero wait in the inbox
        os.mkfifo(inbox / "fifo2.emp")
        (inbox / "zero2.emp").symlink_to("/dev/zero")
        check = subprocess.Popen(
            [sys.executable, "-m", "agent", "check", "--control-socket", str(d.control_sock)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.2)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=60)  # systemd's stop timeout is 90 s; this is well inside
        assert d.proc.returncode == 0, d.log()
        check.wait(timeout=60)
    finally:
        d.stop()
