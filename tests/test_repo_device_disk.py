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
import subprocess
import threading
import time
from pathlib import Path

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


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full."""
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
        assert "[disk-full]" in why and "MiB free after cleanup" in why, why
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
