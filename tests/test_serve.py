"""``edgeward serve``: plain model files, package directories and trusted .emp files on
a socket in the current directory, no config; driven with curl like a first-time user."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from tests.daemon_util import ROOT, tiny_model_dir, tiny_onnx

CURL = shutil.which("curl")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CURL is None, reason="curl is not installed"),
]


def _curl(sock: Path, path: str, body: str | None = None) -> tuple[int, str]:
    # relative to the socket's directory: pytest's tmp paths exceed a socket address
    cmd = [str(CURL), "-sS", "-o", "-", "-w", "\\n%{http_code}", "--unix-socket", sock.name]
    if body is not None:
        cmd += ["-X", "POST", "-H", "Content-Type: application/json", "-d", body]
    res = subprocess.run(
        [*cmd, f"http://localhost{path}"], capture_output=True, text=True, timeout=60,
        check=False, cwd=sock.parent,
    )  # fmt: skip
    out, _, code = res.stdout.rpartition("\n")
    return int(code or 0), out


def _start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "serve", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def _wait_ready(proc: subprocess.Popen[str], sock: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        if sock.exists() and _curl(sock, "/v2/health/ready")[0] == 200:
            return
        time.sleep(0.2)
    raise TimeoutError("edgeward serve did not become ready")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    assert proc.returncode == 0, err
    return err


def test_serve_file_directory_and_emp(tmp_path: Path) -> None:
    """(Deep on purpose: the socket is bound by its relative name, so a project directory
    longer than a Unix socket address still works.)"""
    tiny_onnx(tmp_path / "double.onnx", scale=2.0)
    pkg_dir = tiny_model_dir(tmp_path / "pkgs", "triple", "7", scale=3.0)
    assert main(["keygen", "--kind", "signing", "--out", str(tmp_path / "keys")]) == 0
    sk = next((tmp_path / "keys").glob("*.key"))
    pub = next((tmp_path / "keys").glob("*.pub"))
    tiny_onnx(tmp_path / "q.onnx", scale=4.0)
    emp = tmp_path / "quad.emp"
    args = ["pack", "--model", str(tmp_path / "q.onnx"), "--name", "quad", "--version", "3"]
    assert main([*args, "--signing-key", str(sk), "-o", str(emp)]) == 0
    work = tmp_path / ("deep-" * 12) / "cwd"
    work.mkdir(parents=True)
    assert len(str(work / "edgeward.sock")) > 108
    proc = _start(work, str(tmp_path / "double.onnx"), str(pkg_dir), str(emp), "--trust", str(pub))
    sock = work / "edgeward.sock"
    try:
        _wait_ready(proc, sock)
        code, body = _curl(sock, "/v2/models/double")
        assert code == 200 and json.loads(body)["versions"] == ["1"], body
        x = '{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
        for model, scale in (("double", 2), ("triple", 3), ("quad", 4)):
            code, body = _curl(sock, f"/v2/models/{model}/infer", x)
            assert code == 200, body
            assert json.loads(body)["outputs"][0]["data"] == [scale * v for v in (1, 2, 3, 4)]
        code, body = _curl(sock, "/v2/models/triple/versions/7")
        assert code == 200, body
    finally:
        err = _stop(proc)
    assert "double v1" in err and "triple v7" in err and "quad v3" in err
    assert not sock.exists()
    tmp_dirs = set(re.findall(r"(/\S+/edgeward-serve-[^/\s]+)/", err))
    assert tmp_dirs and not any(Path(d).exists() for d in tmp_dirs)
    assert sorted(p.name for p in work.iterdir()) == []


def test_serve_refuses_emp_without_trust_and_unknown_files(tmp_path: Path) -> None:
    (tmp_path / "m.emp").write_bytes(b"x")
    (tmp_path / "m.txt").write_text("x")
    for args, code in ((["m.emp"], "serve-trust"), (["m.txt"], "serve-path")):
        res = subprocess.run(
            [sys.executable, "-m", "agent", "serve", *args], cwd=tmp_path, capture_output=True,
            text=True, timeout=120, check=False, env={"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith(f"edgeward: error [{code}]") and res.stderr.count("\n") == 1
        assert not (tmp_path / "edgeward.sock").exists()
