"""The daemon follows a TUF repository over HTTPS (real nginx, real daemon process), a
repository built by the publisher CLI (``edgeward repo init | add | publish``).

A full install, then a residual chain v1 → v2 → v3 picked up by polling and by
``edgeward check`` with inference traffic running; the bytes nginx served for each
residual update are the residual package's, not the full one's.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_util import (
    DaemonProc,
    http_unix,
    infer_json,
    make_package,
    needs_worker,
    signing_key,
    start_daemon,
    write_config,
)
from tests.nginx_util import Nginx, needs_nginx
from tests.repo_util import (
    PubRepo,
    bytes_for,
    make_residual,
    part_files,
    write_repo_config,
)

pytestmark = [
    pytest.mark.e2e,
    needs_worker,
    needs_nginx,
]


@dataclass
class World:
    trust: Path
    full: dict[str, Path]  # version -> full package
    residual: dict[str, Path]  # version -> residual package from version - 1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from agent.keys import load_trusted
    from agent.package import unpack

    work = tmp_path_factory.mktemp("pkgs")
    key, trust = signing_key(work)
    full = {
        v: make_package(work, key, "tiny", v, scale=s)
        for v, s in (("1", 2.0), ("2", 3.0), ("3", 4.0))
    }
    residual: dict[str, Path] = {}
    # each residual is made against what a box that followed the chain holds: the
    # version rebuilt from the previous residual (a quantised patch is not bit-exact)
    base_dir = work / "box" / "1"
    unpack(full["1"], base_dir, trust=load_trusted(sorted(trust.glob("*.pub"))))
    for v, s in (("2", 3.0), ("3", 4.0)):
        residual[v] = make_residual(work / v, key, "tiny", v, base_dir, scale=s)
        nxt = work / "box" / v
        unpack(residual[v], nxt, trust=load_trusted(sorted(trust.glob("*.pub"))), base_dir=base_dir)
        base_dir = nxt
    return World(trust, full, residual)


@pytest.fixture
def served(tmp_path: Path, world: World) -> Iterator[tuple[PubRepo, Nginx]]:
    """A repository built and published by ``edgeward repo``, served by nginx."""
    repo = PubRepo.create(tmp_path, world.trust)
    nginx = Nginx(tmp_path / "nginx", repo.root_dir)
    try:
        yield repo, nginx
    finally:
        nginx.stop()


def _daemon(tmp_path: Path, world: World, repo: PubRepo, nginx: Nginx, **kw: object) -> DaemonProc:
    rtable = write_repo_config(tmp_path, nginx, repo, **kw.pop("repo", {}))  # type: ignore[arg-type]
    cfg = write_config(tmp_path / "d", trust_dir=world.trust, extra=rtable, **kw)  # type: ignore[arg-type]
    return start_daemon(tmp_path / "d", config=cfg)


class Traffic:
    """Inference requests in a loop; records failures and the scale each answer shows."""

    def __init__(self, d: DaemonProc) -> None:
        self.d = d
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.scales: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = infer_json(self.d.infer_sock, "tiny", [[1.0, 1.0, 1.0, 1.0]])
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if status != 200:
                self.failures.append(f"{status} {body}")
                continue
            self.scales.append(round(float(body["outputs"][0]["data"][0]), 1))
            time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def wait_version(d: DaemonProc, version: str, timeout: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        r = d.cli("status", "--json")
        if r.returncode == 0:
            last = json.loads(r.stdout)
            if last["models"].get("tiny") == version:  # type: ignore[attr-defined]
                return last
        time.sleep(0.2)
    raise AssertionError(f"version {version} not serving; status {last}\n{d.log()}")


def test_full_then_residual_chain_by_poll_and_check(
    tmp_path: Path, world: World, served: tuple[PubRepo, Nginx]
) -> None:
    repo, nginx = served
    repo.add(world.full["1"])
    repo.publish()
    d = _daemon(tmp_path, world, repo, nginx, check_interval=1.0, check_on_start=True)
    try:
        st = wait_version(d, "1")
        assert st["repository"]["chosen"]["tiny"]["kind"] == "full"  # type: ignore[index]
        with Traffic(d) as t:
            time.sleep(0.5)
            repo.add(world.full["2"], world.residual["2"])
            repo.publish()
            st = wait_version(d, "2")
            time.sleep(0.5)
        assert t.failures == []
        assert t.scales[0] == 2.0 and t.scales[-1] == 3.0, t.scales
        chosen = st["repository"]["chosen"]["tiny"]  # type: ignore[index]
        assert chosen["kind"] == "residual" and "residual from 1" in chosen["why"]
        assert bytes_for(nginx, "tiny-2-from-1.emp") == world.residual["2"].stat().st_size
        assert bytes_for(nginx, "tiny-2.emp") == 0
        assert part_files(d.state_dir) == []
    finally:
        d.stop()
    # the same box, now checked by hand only: v3 comes with `edgeward check`
    d = _daemon(tmp_path, world, repo, nginx, check_interval=0.0, check_on_start=False)
    try:
        repo.add(world.full["3"], world.residual["3"])
        repo.publish()
        with Traffic(d) as t:
            time.sleep(0.5)
            r = d.cli("check", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["installed"] == {"tiny": "3"}
            time.sleep(0.5)
        assert t.failures == []
        assert t.scales[0] == 3.0 and t.scales[-1] == 4.0, t.scales
        assert bytes_for(nginx, "tiny-3-from-2.emp") == world.residual["3"].stat().st_size
        assert bytes_for(nginx, "tiny-3.emp") == 0
        models = json.loads(d.cli("models", "--json").stdout)["models"]
        assert models[0]["update"]["kind"] == "residual"
        metrics = http_unix(d.control_sock, "GET", "/metrics")[2].decode()
        assert "edgeward_repository_bytes_downloaded_total" in metrics
        assert 'edgeward_repository_metadata_expires_seconds{role="timestamp"}' in metrics
        # nothing new: an idle check fetches the timestamp (and asks for the next root)
        time.sleep(0.3)
        before = len(nginx.log())
        assert json.loads(d.cli("check", "--json").stdout)["unchanged"] == ["tiny"]
        idle = nginx.wait_log(before + 2)[before:]
        assert sorted(e.path for e in idle) == [
            "/metadata/2.root.json",
            "/metadata/timestamp.json",
        ]
    finally:
        d.stop()


def test_residual_not_matching_the_box_takes_the_full_package(
    tmp_path: Path, world: World, served: tuple[PubRepo, Nginx]
) -> None:
    """A box on v1 offered v3 (residual from 2 only matches v2): the full v3 is fetched.
    The check comes from SIGHUP."""
    repo, nginx = served
    repo.add(world.full["1"])
    repo.publish()
    d = _daemon(tmp_path, world, repo, nginx, check_interval=0.0, check_on_start=True)
    try:
        wait_version(d, "1")
        repo.add(world.full["3"], world.residual["3"])
        repo.publish()
        d.proc.send_signal(signal.SIGHUP)  # reload + check, as `systemctl reload` does
        st = wait_version(d, "3")
        chosen = st["repository"]["chosen"]["tiny"]
        assert chosen["kind"] == "full" and "needs base 2, the box has 1" in chosen["why"]
        assert bytes_for(nginx, "tiny-3-from-2.emp") == 0
        assert bytes_for(nginx, "tiny-3.emp") == world.full["3"].stat().st_size
    finally:
        d.stop()
