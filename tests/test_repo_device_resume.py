"""A download cut half-way resumes with HTTP Range (real nginx, real daemon).

Cut by the server going away, and by the daemon being killed (the partial file and its
record survive the restart). nginx's access log proves the resume: the bytes it sent
for the package in total stay within 1.1 × the package.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.daemon_util import DaemonProc, needs_worker, signing_key, start_daemon, write_config
from tests.nginx_util import Nginx, needs_nginx
from tests.repo_util import TufRepo, big_package, fields_of, part_files, write_repo_config

pytestmark = [pytest.mark.e2e, needs_worker, needs_nginx]

RATE = 512 * 1024  # bytes/s: slow enough to cut the transfer half-way


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("big")
    key, trust = signing_key(work)
    return big_package(work, key, "big", "1", mib=4, seed=1), trust


def _setup(tmp_path: Path, pkg: Path, trust: Path) -> tuple[TufRepo, Nginx, Path]:
    repo = TufRepo.create(tmp_path / "repo")
    repo.add(pkg, fields_of(pkg))
    repo.publish()
    nginx = Nginx(tmp_path / "nginx", tmp_path / "repo", limit_rate=RATE)
    rtable = write_repo_config(tmp_path, nginx, repo, retries=1, backoff_s=0.1)
    cfg = write_config(tmp_path / "d", trust_dir=trust, extra=rtable)
    return repo, nginx, cfg


def _part(d: DaemonProc) -> Path:
    return d.state_dir / "staging" / "big-1.part"


def _wait_part(d: DaemonProc, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            size = _part(d).stat().st_size
        except FileNotFoundError:
            size = 0
        if size >= at_least:
            return size
        time.sleep(0.05)
    raise AssertionError(f"download did not reach {at_least} bytes:\n{d.log()}")


def _served(nginx: Nginx, pkg: Path) -> tuple[int, list[str]]:
    time.sleep(0.3)
    hits = [e for e in nginx.log() if e.path.endswith("big-1.emp")]
    return sum(e.body_bytes for e in hits), [e.range for e in hits]


def _check_in_background(d: DaemonProc) -> tuple[threading.Thread, list[str]]:
    out: list[str] = []

    def run() -> None:
        out.append(d.cli("check", "--json", timeout=180).stdout)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_server_cut_resumes(tmp_path: Path, pkg: tuple[Path, Path]) -> None:
    package, trust = pkg
    size = package.stat().st_size
    _repo, nginx, cfg = _setup(tmp_path, package, trust)
    d = start_daemon(tmp_path / "d", config=cfg)
    try:
        t, out = _check_in_background(d)
        _wait_part(d, size // 3)
        nginx.stop()  # the connection is cut; the retries find no server
        t.join(120)
        res = json.loads(out[0])
        assert "repo-download" in res["failed"]["big"], res
        kept = _part(d).stat().st_size
        assert size // 3 <= kept < size
        assert sorted(part_files(d.state_dir)) == ["big-1.part", "big-1.part.json"]
        status = json.loads(d.cli("status", "--json").stdout)
        assert status["models"] == {}
        assert "repo-download" in status["updates"]["big"]["error"]
        nginx.reconfigure(limit_rate=None)
        res = json.loads(d.cli("check", "--json", timeout=180).stdout)
        assert res["installed"] == {"big": "1"}, res
        served, ranges = _served(nginx, package)
        assert served <= 1.1 * size, (served, size)
        assert any(r.startswith("bytes=") for r in ranges), ranges
        assert part_files(d.state_dir) == []
        status = json.loads(d.cli("status", "--json").stdout)
        assert status["repository"]["resumes"] >= 1
    finally:
        d.stop()
        nginx.stop()


def test_daemon_killed_mid_download_resumes_after_restart(
    tmp_path: Path, pkg: tuple[Path, Path]
) -> None:
    package, trust = pkg
    size = package.stat().st_size
    _repo, nginx, cfg = _setup(tmp_path, package, trust)
    d = start_daemon(tmp_path / "d", config=cfg)
    try:
        _check_in_background(d)
        _wait_part(d, size // 2)
        d.kill()
        kept = _part(d).stat().st_size
        assert kept < size
        nginx.reconfigure(limit_rate=None)
        d = start_daemon(tmp_path / "d", config=cfg)
        assert _part(d).stat().st_size == kept  # the restart kept the partial download
        res = json.loads(d.cli("check", "--json", timeout=180).stdout)
        assert res["installed"] == {"big": "1"}, res
        served, ranges = _served(nginx, package)
        assert served <= 1.1 * size, (served, size)
        assert f"bytes={kept}-" in ranges, ranges
        assert part_files(d.state_dir) == []
    finally:
        d.stop()
        nginx.stop()


def test_download_that_starts_over_is_unpacked_from_the_file(
    tmp_path: Path, pkg: tuple[Path, Path]
) -> None:
    """A server that ignores Range restarts a resumed download from byte 0: the unpack
    that followed the first bytes is dropped and the finished file is unpacked instead."""
    package, trust = pkg
    repo = TufRepo.create(tmp_path / "repo")
    tf = repo.add(package, fields_of(package))
    repo.publish()
    nginx = Nginx(tmp_path / "nginx", tmp_path / "repo", extra_server="max_ranges 0;")
    rtable = write_repo_config(tmp_path, nginx, repo, retries=1, backoff_s=0.1)
    cfg = write_config(tmp_path / "d", trust_dir=trust, extra=rtable)
    staging = tmp_path / "d" / "state" / "staging"
    staging.mkdir(parents=True)
    expect = {"path": tf.path, "length": tf.length, "hashes": dict(tf.hashes)}
    (staging / "big-1.part").write_bytes(package.read_bytes()[: tf.length // 2])
    (staging / "big-1.part.json").write_text(json.dumps(expect, sort_keys=True))
    d = start_daemon(tmp_path / "d", config=cfg)
    try:
        res = json.loads(d.cli("check", "--json", timeout=180).stdout)
        assert res["installed"] == {"big": "1"}, res
        _served_bytes, ranges = _served(nginx, package)
        assert any(r.startswith("bytes=") for r in ranges), ranges  # it did try to resume
        log = d.log()
        assert "the server ignored Range; starting over" in log
        assert "unpacking while downloading failed" in log and "started over" in log
        assert part_files(d.state_dir) == []
    finally:
        d.stop()
        nginx.stop()
