"""A small disk: the state directory is a size-limited tmpfs (real nginx, real daemon).

The preflight refuses a package the disk cannot hold, naming the numbers; a disk that
fills up during the download fails cleanly (the partial file is reclaimed, the old
version serves); with room again the next check installs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_util import (
    infer_json,
    make_package,
    needs_worker,
    signing_key,
    start_daemon,
    write_config,
)
from tests.nginx_util import Nginx, needs_nginx
from tests.repo_util import TufRepo, big_package, fields_of, part_files, write_repo_config

pytestmark = [
    pytest.mark.e2e,
    needs_worker,
    needs_nginx,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]


def _fill(path: Path, leave: int = 0) -> None:
    """Write ``path`` until the filesystem is full, or has ``leave`` bytes free."""
    if leave:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, shutil.disk_usage(path.parent).free - leave)
        finally:
            os.close(fd)
        return
    block = b"\0" * (1 << 20)
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_small_disk(tmp_path: Path) -> None:
    key, trust = signing_key(tmp_path / "keys")
    v1 = make_package(tmp_path, key, "tiny", "1", scale=2.0)
    v2 = big_package(tmp_path, key, "tiny", "2", mib=4, seed=2)
    repo = TufRepo.create(tmp_path / "repo")
    repo.add(v1, fields_of(v1))
    repo.publish()
    nginx = Nginx(tmp_path / "nginx", tmp_path / "repo", limit_rate=1 << 20)
    rtable = write_repo_config(tmp_path, nginx, repo, retries=0)
    cfg = write_config(tmp_path / "d", trust_dir=trust, extra=rtable, check_on_start=True)
    state = tmp_path / "d" / "state"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(state)], check=True)
    d = None
    try:
        d = start_daemon(tmp_path / "d", config=cfg)
        deadline = time.monotonic() + 120
        while json.loads(d.cli("status", "--json").stdout)["models"] != {"tiny": "1"}:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.2)
        repo.add(v2, fields_of(v2))
        repo.publish()
        # 1. preflight: too little room for download + unpack + convert; nothing fetched
        ballast = state / "ballast"
        with open(ballast, "wb") as fh:
            fh.truncate(0)
            fh.write(b"\0" * (40 << 20))
        res = json.loads(d.cli("check", "--json").stdout)
        why = res["failed"]["tiny"]
        assert "[disk-space]" in why and "MiB free" in why and "MiB needed" in why, why
        assert not any(e.path.endswith("tiny-2.emp") for e in nginx.log())
        ballast.unlink()
        # 2. the disk fills up during the download: clean failure, space reclaimed
        out: list[str] = []
        t = threading.Thread(
            target=lambda: out.append(d.cli("check", "--json", timeout=180).stdout)  # type: ignore[union-attr]
        )
        t.start()
        part = state / "staging" / "tiny-2.part"
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= 1 << 20):
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        _fill(state / "filler")
        t.join(120)
        why = json.loads(out[0])["failed"]["tiny"]
        assert "[disk-full]" in why and "free after cleanup" in why, why
        assert "while downloading and unpacking tiny version 2" in why, why
        assert part_files(state) == []
        status, body = infer_json(d.infer_sock, "tiny", [[1.0, 1.0, 1.0, 1.0]])
        assert status == 200 and body["outputs"][0]["data"][0] == 2.0
        # 3. room again: the next check installs
        (state / "filler").unlink()
        nginx.reconfigure(limit_rate=None)
        res = json.loads(d.cli("check", "--json", timeout=180).stdout)
        assert res["installed"] == {"tiny": "2"}, res
    finally:
        if d is not None:
            d.stop()
        nginx.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(state)], check=True)


#: A package converter that writes the model and then a scratch file larger than any
#: preflight estimate into its output directory (on the state filesystem).
GREEDY_CONVERTER = """\
import argparse, shutil, sys
from pathlib import Path
from typing import Any

p = argparse.ArgumentParser()
for opt in ("--input", "--output", "--backend", "--device-info"):
    p.add_argument(opt)
a = p.parse_args()
src = Path(a.input) / "Model" / "big.onnx"
shutil.copyfile(src, Path(a.output) / "big.onnx")
with open(Path(a.output) / "scratch.bin", "wb") as fh:
    block = bytes(1 << 20)
    for _ in range(%d):
        fh.write(block)
print("converted")
"""


class _Box:
    """A daemon serving tiny version 1 from a real repository, its state directory a
    tmpfs of ``mib`` MiB; ``v2`` published on :meth:`publish`."""

    def __init__(self, tmp_path: Path, mib: int, v2: Path, trust: Path, v1: Path) -> None:
        self.v2 = v2
        self.repo = TufRepo.create(tmp_path / "repo")
        self.repo.add(v1, fields_of(v1))
        self.repo.publish()
        self.nginx = Nginx(tmp_path / "nginx", tmp_path / "repo")
        rtable = write_repo_config(tmp_path, self.nginx, self.repo, retries=0)
        cfg = write_config(tmp_path / "d", trust_dir=trust, extra=rtable, check_on_start=True)
        self.state = tmp_path / "d" / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(self.state)], check=True
        )
        self.d = start_daemon(tmp_path / "d", config=cfg)
        deadline = time.monotonic() + 120
        while self.status()["models"] != {"tiny": "1"}:
            assert time.monotonic() < deadline, self.d.log()
            time.sleep(0.2)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.d.cli("status", "--json").stdout)
        return out

    def check(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.d.cli("check", "--json", timeout=180).stdout)
        return out

    def publish(self) -> None:
        self.repo.add(self.v2, fields_of(self.v2))
        self.repo.publish()

    def serves_v1(self) -> None:
        status, body = infer_json(self.d.infer_sock, "tiny", [[1.0, 1.0, 1.0, 1.0]])
        assert status == 200 and body["outputs"][0]["data"][0] == 2.0, body

    def grow(self, mib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mib}m", str(self.state)], check=True)

    def close(self) -> None:
        self.d.stop()
        self.nginx.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(self.state)], check=True)


def _refused_for_now(box: _Box, why: str, code: str = "disk-full") -> None:
    """A full disk is this device's fault: nothing half-done is left, version 1 keeps
    serving, version 2 is not refused for good but retried."""
    assert why.count("\n") == 0, why
    assert f"[{code}]" in why, why
    if code == "disk-full":  # the partial download goes too: room is what is missing
        assert "free after cleanup" in why, why
        assert part_files(box.state) == [], part_files(box.state)
    else:  # the download is kept (it resumes); nothing was decoded
        assert set(part_files(box.state)) <= {"tiny-2.part", "tiny-2.part.json"}
    tiny = box.state / "models" / "tiny"
    assert sorted(p.name for p in (tiny / "versions").iterdir()) == ["1"]
    box.serves_v1()
    upd = box.status()["updates"]["tiny"]
    assert "2" not in upd["bad"] and upd["retries"] == 1 and upd["fix"], upd


def test_declared_size_is_checked_before_unpacking(tmp_path: Path) -> None:
    """A package tiny on the wire whose signed manifest declares more than the disk
    holds (zeros compress well): refused as ``disk-space`` once the manifest is read,
    before anything is decoded, instead of filling the disk; not refused for good: with
    room, the next check installs it."""
    key, trust = signing_key(tmp_path / "keys")
    v1 = make_package(tmp_path, key, "tiny", "1", scale=2.0)
    v2 = big_package(tmp_path, key, "tiny", "2", mib=48, seed=0, zeros=True)
    assert v2.stat().st_size < 1 << 20  # the first preflight expects little
    box = _Box(tmp_path, 40, v2, trust, v1)
    try:
        box.publish()
        why = box.check()["failed"]["tiny"]
        assert why.startswith("[disk-space] not enough disk space"), why
        assert "its signed manifest declares 48.0 MiB once unpacked" in why, why
        _refused_for_now(box, why, code="disk-space")
        assert "unpacking the download" not in box.d.log()  # no second unpack
        assert sum(e.path.endswith("tiny-2.emp") for e in box.nginx.log()) == 1
        box.grow(160)
        res = box.check()
        assert res["installed"] == {"tiny": "2"}, (res, box.d.log())
    finally:
        box.close()


def test_disk_filled_during_unpack(tmp_path: Path) -> None:
    """Another writer fills the disk while the package downloads and unpacks in one
    pass: whichever write hits ENOSPC first (the unpack's or the download's), one clean
    ``disk-full`` failure, no second unpack, nothing left behind; with room again the
    next check installs."""
    key, trust = signing_key(tmp_path / "keys")
    v1 = make_package(tmp_path, key, "tiny", "1", scale=2.0)
    v2 = big_package(tmp_path, key, "tiny", "2", mib=4, seed=5)
    box = _Box(tmp_path, 64, v2, trust, v1)
    try:
        box.nginx.reconfigure(limit_rate=1 << 20)
        box.publish()
        out: list[str] = []
        t = threading.Thread(
            target=lambda: out.append(box.d.cli("check", "--json", timeout=180).stdout)
        )
        t.start()
        part = box.state / "staging" / "tiny-2.part"
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= 1 << 20):
            assert time.monotonic() < deadline, box.d.log()
            time.sleep(0.02)
        # room for the rest of the download, not for the unpacked copy beside it
        left = v2.stat().st_size - part.stat().st_size
        _fill(box.state / "filler", leave=left + (512 << 10))
        t.join(120)
        why = json.loads(out[0])["failed"]["tiny"]
        assert "while downloading and unpacking tiny version 2" in why, why
        _refused_for_now(box, why)
        assert "unpacking the download" not in box.d.log()
        (box.state / "filler").unlink()
        box.nginx.reconfigure(limit_rate=None)
        res = box.check()
        assert res["installed"] == {"tiny": "2"}, (res, box.d.log())
    finally:
        box.close()


def test_disk_full_during_convert(tmp_path: Path) -> None:
    """The package's converter writes more than the preflight's estimate and fails on a
    full disk: ``disk-full`` (retried later), not ``converter-failed`` (which would
    refuse a good version for good)."""
    key, trust = signing_key(tmp_path / "keys")
    v1 = make_package(tmp_path, key, "tiny", "1", scale=2.0)
    program = tmp_path / "program"
    conv = program / "Library" / "converter"
    conv.mkdir(parents=True)
    (conv / "convert.py").write_text(GREEDY_CONVERTER % 64)
    v2 = big_package(tmp_path, key, "tiny", "2", mib=1, seed=3, program=program)
    box = _Box(tmp_path, 40, v2, trust, v1)
    try:
        box.publish()
        why = box.check()["failed"]["tiny"]
        assert "while converting" in why, why
        _refused_for_now(box, why)
        assert not any(box.state.glob("cache/*/model/scratch.bin"))  # the half-done entry went
        box.grow(160)
        res = box.check()
        assert res["installed"] == {"tiny": "2"}, (res, box.d.log())
    finally:
        box.close()
