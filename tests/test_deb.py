"""The Debian package, built and installed as a user would get it (docs/INSTALL.md).

``make deb``'s builder makes the package for this machine's architecture (amd64 here,
arm64 in the emulated root, where ``.ci/arm64.sh`` hands in the arm64 package the x86
host built, ``EDGEWARD_DEB``); ``dpkg --root`` installs it into a
temporary root with its maintainer scripts (pointed there by ``DPKG_ROOT``), so the
test never changes the machine it runs on. Then: the files a user expects are there
with the right owners and modes, ``systemd-analyze verify`` is clean on the installed
unit, the installed agent (its own venv and interpreter) starts from a temporary config
and answers an inference, and ``dpkg --purge`` removes it all.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.daemon_util import infer_json, install_into_store, run_dir, tiny_model_dir, write_config

ROOT = Path(__file__).resolve().parents[1]
DPKG = shutil.which("dpkg")
DPKG_DEB = shutil.which("dpkg-deb")
ANALYZE = shutil.which("systemd-analyze")
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        DPKG is None or DPKG_DEB is None or not SYSTEM_PYTHON.exists(),
        reason="needs dpkg, dpkg-deb and a system python3 (Debian/Ubuntu)",
    ),
]


def _system_python_version() -> str:
    out = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip()


def _version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]["version"]


def _dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """dpkg on the temporary root only (its own database, log and maintainer-script root)."""
    return subprocess.run(
        [str(DPKG), f"--root={root}", f"--log={root}/var/log/dpkg.log",
         "--force-script-chrootless", "--force-not-root", *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("deb")
    arch = subprocess.run(
        [str(DPKG), "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    prebuilt = os.environ.get("EDGEWARD_DEB")
    if prebuilt:  # built on another machine for this architecture (.ci/arm64.sh)
        deb = Path(prebuilt)
    else:
        wheels = ROOT / ".cache" / "wheels" / arch  # reused between runs, like pip's cache
        res = subprocess.run(
            [sys.executable, str(ROOT / "systemd" / "deb" / "build.py"), "--arch", arch,
             "--python", _system_python_version(), "--compress", "zstd:1",
             "--wheelhouse", str(wheels), "--out", str(work / "dist")],
            capture_output=True, text=True, timeout=1800, check=False, cwd=work,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-4000:]
        deb = work / "dist" / f"edgeward_{_version()}_{arch}.deb"
        assert res.stdout.strip() == str(deb)
    assert deb.is_file(), deb
    info = subprocess.run(
        [str(DPKG_DEB), "--field", str(deb), "Package", "Architecture", "Depends"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert "Package: edgeward" in info and f"Architecture: {arch}" in info
    assert "python3 (>= " in info
    root = work / "root"
    for d in ("var/lib/dpkg/updates", "var/lib/dpkg/info", "var/log", "etc"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    # --force-depends: the temporary root has no python3 or libc6 *packages*; the files
    # the package needs (/usr/bin/python3) are the host's.
    res = _dpkg(root, "--force-depends", "-i", str(deb))
    assert res.returncode == 0, res.stdout + res.stderr
    yield root
    res = _dpkg(root, "--purge", "edgeward")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (root / "opt" / "edgeward").exists()
    assert not (root / "usr" / "bin" / "edgeward").is_symlink()
    assert not (root / "var" / "lib" / "edgeward").exists()  # postrm purge
    assert not (root / "etc" / "edgeward" / "edgeward.toml").exists()


def test_files_owners_and_modes(installed: Path) -> None:
    r = installed
    assert os.readlink(r / "usr/bin/edgeward") == "/opt/edgeward/bin/edgeward"
    cli = (r / "opt/edgeward/bin/edgeward").read_text()
    assert cli.startswith("#!/opt/edgeward/bin/python3 -I\n")
    assert os.readlink(r / "opt/edgeward/bin/python3") == "/usr/bin/python3"
    assert "include-system-site-packages = false" in (r / "opt/edgeward/pyvenv.cfg").read_text()
    for f in ("lib/systemd/system/edgeward.service", "usr/lib/sysusers.d/edgeward.conf",
              "usr/lib/tmpfiles.d/edgeward.conf", "etc/edgeward/edgeward.toml",
              "usr/share/doc/edgeward/INSTALL.md", "usr/share/doc/edgeward/DAEMON.md",
              "usr/share/doc/edgeward/METRICS.md", "usr/share/doc/edgeward/LICENSE",
              "usr/share/doc/edgeward/copyright"):  # fmt: skip
        assert (r / f).is_file(), f
    assert "Apache License" in (r / "usr/share/doc/edgeward/LICENSE").read_text()
    conffiles = (r / "var/lib/dpkg/info/edgeward.conffiles").read_text().split()
    assert conffiles == ["/etc/edgeward/edgeward.toml"]
    # postinst ran systemd-sysusers and systemd-tmpfiles inside the root
    passwd = (r / "etc/passwd").read_text()
    m = re.search(r"^edgeward:x:(\d+):(\d+):", passwd, re.M)
    assert m, passwd
    uid, gid = int(m.group(1)), int(m.group(2))
    keys = (r / "etc/edgeward/keys").stat()
    assert (keys.st_uid, keys.st_gid, keys.st_mode & 0o777) == (uid, gid, 0o700)
    inbox = (r / "var/lib/edgeward/inbox").stat()
    assert (inbox.st_uid, inbox.st_gid) == (uid, gid)
    assert (r / "etc/edgeward/trust").stat().st_mode & 0o777 == 0o755
    # bytecode compiled at build time (/opt is read-only to the service)
    assert list((r / "opt/edgeward/lib").glob("python3.*/site-packages/agent/__pycache__/*.pyc"))


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_installed_unit_verifies(installed: Path, tmp_path: Path) -> None:
    unit = (installed / "lib/systemd/system/edgeward.service").read_text()
    for url in re.findall(r"file:(\S+)", unit.split("Documentation=", 1)[1].split("\n", 1)[0]):
        assert (installed / url.lstrip("/")).is_file(), url  # points at installed docs
    m = re.search(r"^ExecStart=(\S+) ", unit, re.M)
    assert m and m.group(1) == "/usr/bin/edgeward"
    # verify resolves ExecStart on this host, where the package lives under the
    # temporary root: point it at the installed program there.
    copy = tmp_path / "edgeward.service"
    copy.write_text(unit.replace("/usr/bin/edgeward", str(installed / "opt/edgeward/bin/edgeward")))
    res = subprocess.run(
        [str(ANALYZE), "verify", str(copy)], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0 and "edgeward.service" not in res.stderr, res.stderr


def test_installed_agent_serves(installed: Path, tmp_path: Path) -> None:
    python = installed / "opt/edgeward/bin/python3"
    cli = [str(python), "-I", str(installed / "opt/edgeward/bin/edgeward")]
    res = subprocess.run(
        [*cli, "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == f"edgeward {_version()}", res.stderr
    # the installed code, not this checkout's
    res = subprocess.run(
        [str(python), "-I", "-c", "import agent, onnxruntime; print(agent.__file__)"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert res.stdout.startswith(str(installed / "opt/edgeward/lib")), res.stdout + res.stderr

    work = tmp_path / "w"
    cfg = write_config(work)
    install_into_store(work / "state", tiny_model_dir(work / "src", "tiny", "1", scale=3.0))
    res = subprocess.run([*cli, "config", "check", "--no-groups", str(cfg)], capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    notify = tmp_path / "notify.sock"
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(str(notify))
    nsock.settimeout(1.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["NOTIFY_SOCKET"] = str(notify)
    log = tmp_path / "agent.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [*cli, "agent", "--config", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
            env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 180
        while "READY=1" not in messages and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                messages += nsock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
        assert "READY=1" in messages, log.read_text()
        assert "STATUS=serving 1 model: tiny v1" in messages
        status, out = infer_json(run_dir(work) / "infer.sock", "tiny", np.ones((1, 4), np.float32))
        assert status == 200, out
        assert out["outputs"][0]["data"] == [3.0, 3.0, 3.0, 3.0]
        # the model worker runs on the installed onnxruntime, not this checkout's venv
        workers = _children(proc.pid)
        assert workers
        maps = Path(f"/proc/{workers[0]}/maps").read_text()
        assert str(installed / "opt/edgeward/lib") in maps and "onnxruntime" in maps
        assert str(ROOT / ".venv") not in maps
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its workers
        nsock.close()
    assert proc.returncode == 0, log.read_text()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out
