"""Bad versions from the repository: a failing self-test, and a version that turns
unhealthy inside the health window. Each is rolled back (or never activated), marked
bad, and not fetched again until a newer version appears (real nginx, real daemon)."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.daemon_util import (
    DaemonProc,
    edgeward,
    infer_json,
    make_package,
    needs_worker,
    signing_key,
    start_daemon,
    tiny_model_dir,
    write_config,
)
from tests.nginx_util import Nginx, needs_nginx
from tests.repo_util import TufRepo, bytes_for, fields_of, write_repo_config

pytestmark = [pytest.mark.e2e, needs_worker, needs_nginx]

#: A run script whose model answers a few calls (warm-up, self-test, first requests)
#: and then fails every request.
FAILING_RUN_SCRIPT = """\
class Model:
    thread_safe = True

    def __init__(self, model_dir, backend, config):
        self.backend = backend
        self.calls = 0

    def predict(self, inputs):
        self.calls += 1
        if self.calls > 6:
            raise RuntimeError("the model went bad after a few requests")
        return self.backend.predict(inputs)
"""


def _pack(work: Path, key: Path, version: str, src: Path) -> Path:
    out = work / "pkgs" / f"tiny-{version}.emp"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["pack", "--model", str(src / "Model" / "tiny.onnx"), "--name", "tiny"]
    args += ["--version", version, "--signing-key", str(key), "-o", str(out)]
    args += ["--samples", str(src / "Meta-info" / "samples")]
    if (src / "Program").is_dir():
        args += ["--program", str(src / "Program")]
    edgeward(*args)
    return out


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("health")
    key, trust = signing_key(work)
    out = {"trust": trust, "1": make_package(work, key, "tiny", "1", scale=2.0)}
    # v2: samples that the model does not reproduce -> the self-test fails
    src = tiny_model_dir(work / "src-bad", "tiny", "2", scale=3.0)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(src / "Meta-info" / "samples" / "s0.npz", **{"input:x": x, "output:y": x * 5})
    out["2"] = _pack(work, key, "2", src)
    # v3: passes its self-test, then fails requests
    src = tiny_model_dir(work / "src-sick", "tiny", "3", scale=4.0)
    (src / "Program" / "Scripts").mkdir(parents=True)
    (src / "Program" / "Scripts" / "run.py").write_text(FAILING_RUN_SCRIPT)
    out["3"] = _pack(work, key, "3", src)
    out["4"] = make_package(work, key, "tiny", "4", scale=5.0)
    return out


@pytest.fixture
def box(tmp_path: Path, pkgs: dict[str, Path]) -> Iterator[tuple[TufRepo, Nginx, DaemonProc]]:
    repo = TufRepo.create(tmp_path / "repo")
    repo.add(pkgs["1"], fields_of(pkgs["1"]))
    repo.publish()
    nginx = Nginx(tmp_path / "nginx", tmp_path / "repo")
    rtable = write_repo_config(tmp_path, nginx, repo)
    cfg = write_config(tmp_path / "d", trust_dir=pkgs["trust"], extra=rtable, check_on_start=True)
    d = start_daemon(tmp_path / "d", config=cfg)
    try:
        _wait(d, lambda st: st["models"] == {"tiny": "1"})
        yield repo, nginx, d
    finally:
        d.stop()
        nginx.stop()


def _status(d: DaemonProc) -> dict[str, object]:
    out: dict[str, object] = json.loads(d.cli("status", "--json").stdout)
    return out


def _wait(d: DaemonProc, cond: object, timeout: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = _status(d)
        if cond(st):  # type: ignore[operator]
            return st
        assert time.monotonic() < deadline, f"{st}\n{d.log()}"
        time.sleep(0.2)


def _check(d: DaemonProc) -> dict[str, object]:
    out: dict[str, object] = json.loads(d.cli("check", "--json", timeout=180).stdout)
    return out


def _scale(d: DaemonProc) -> float:
    status, body = infer_json(d.infer_sock, "tiny", [[1.0, 1.0, 1.0, 1.0]])
    assert status == 200, body
    return float(body["outputs"][0]["data"][0])


def test_failed_self_test_is_not_retried(
    box: tuple[TufRepo, Nginx, DaemonProc], pkgs: dict[str, Path]
) -> None:
    repo, nginx, d = box
    repo.add(pkgs["2"], fields_of(pkgs["2"]))
    repo.publish()
    res = _check(d)
    assert "self-test" in str(res["failed"]), res
    assert _scale(d) == 2.0
    st = _status(d)
    assert "2" in st["updates"]["tiny"]["bad"]  # type: ignore[index]
    fetched = bytes_for(nginx, "tiny-2.emp")
    assert fetched == pkgs["2"].stat().st_size
    res = _check(d)  # marked bad: not fetched again
    assert res["failed"] == {} and res["installed"] == {}, res
    assert bytes_for(nginx, "tiny-2.emp") == fetched
    repo.add(pkgs["4"], fields_of(pkgs["4"]))
    repo.publish()
    assert _check(d)["installed"] == {"tiny": "4"}
    assert _scale(d) == 5.0


def test_unhealthy_version_is_rolled_back_and_marked_bad(
    box: tuple[TufRepo, Nginx, DaemonProc], pkgs: dict[str, Path]
) -> None:
    repo, nginx, d = box
    repo.add(pkgs["3"], fields_of(pkgs["3"]))
    repo.publish()
    assert _check(d)["installed"] == {"tiny": "3"}
    failures = 0
    deadline = time.monotonic() + 60
    while _status(d)["models"] != {"tiny": "1"}:  # requests until the window trips
        assert time.monotonic() < deadline, d.log()
        status, _body = infer_json(d.infer_sock, "tiny", [[1.0, 1.0, 1.0, 1.0]])
        failures += status != 200
        time.sleep(0.05)
    assert failures >= 1
    assert _scale(d) == 2.0
    st = _status(d)
    upd = st["updates"]["tiny"]  # type: ignore[index]
    assert upd["state"] == "rolled-back" and "unhealthy" in upd["bad"]["3"], upd
    assert "health window" in d.log()
    _assert_fell_back(d, nginx)


def _assert_fell_back(d: DaemonProc, nginx: Nginx) -> None:
    """After a health rollback from 3 to 1: 1 serves, 3 is refused, no link names it,
    its directory is gone, and the next check does not fetch it again."""
    assert _scale(d) == 2.0
    st = _status(d)
    assert st["models"] == {"tiny": "1"}, st
    upd = st["updates"]["tiny"]  # type: ignore[index]
    assert "unhealthy" in upd["bad"]["3"] and upd["rollback"] is None, upd
    (m,) = json.loads(d.cli("models", "--json").stdout)["models"]
    assert m["previous"] is None, m  # nothing healthy to go back to
    tiny = d.work / "state" / "models" / "tiny"
    assert sorted(p.name for p in (tiny / "versions").iterdir()) == ["1"]
    assert not (tiny / "previous").exists() and not (tiny / "previous").is_symlink()
    fetched = bytes_for(nginx, "tiny-3.emp")
    res = _check(d)
    assert res["installed"] == {} and res["failed"] == {}, res
    assert bytes_for(nginx, "tiny-3.emp") == fetched
    assert _scale(d) == 2.0


#: The durable steps of a health rollback (agent/updater.py, agent/store.py): a real
#: SIGKILL of the daemon at each, then a restart must finish the rollback.
HEALTH_CRASH_POINTS = (
    "rollback-journaled",  # bad mark + intent written, no link moved
    "store-fall-back-switched",  # current -> 1, previous still -> 1
    "rollback-switched",  # links done, version 3's directory still there
    "rollback-discarded",  # all done but the intent cleared
)


def _crash_box(
    tmp_path: Path, pkgs: dict[str, Path], point: str, new: str = "3"
) -> tuple[Nginx, DaemonProc, Path]:
    """A daemon serving 1 that dies at ``point``, with ``new`` published after 1."""
    repo = TufRepo.create(tmp_path / "repo")
    for v in ("1", new):
        repo.add(pkgs[v], fields_of(pkgs[v]))
        if v == "1":
            repo.publish()
            nginx = Nginx(tmp_path / "nginx", tmp_path / "repo")
            rtable = write_repo_config(tmp_path, nginx, repo)
            cfg = write_config(tmp_path / "d", trust_dir=pkgs["trust"], extra=rtable)
            d = start_daemon(tmp_path / "d", config=cfg, env={"EDGEWARD_FAILPOINT": point})
            assert _check(d)["installed"] == {"tiny": "1"}
    repo.publish()
    return nginx, d, cfg


def _run_until_dead(d: DaemonProc) -> None:
    """Requests until the health window trips and the failpoint kills the daemon."""
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while d.proc.poll() is None:
        assert time.monotonic() < deadline, d.log()
        workers.update(d.worker_pids())
        with contextlib.suppress(OSError):
            infer_json(d.infer_sock, "tiny", [[1.0, 1.0, 1.0, 1.0]])
        time.sleep(0.05)
    assert d.proc.returncode == -signal.SIGKILL, d.log()
    d.kill_group(sorted(workers))  # what a power cut does to the workers too


@pytest.mark.parametrize("point", HEALTH_CRASH_POINTS)
def test_crash_during_health_rollback_is_finished_at_restart(
    tmp_path: Path, pkgs: dict[str, Path], point: str
) -> None:
    nginx, d, cfg = _crash_box(tmp_path, pkgs, point)
    try:
        assert _check(d)["installed"] == {"tiny": "3"}
        _run_until_dead(d)
        d = start_daemon(tmp_path / "d", config=cfg)
        assert "was interrupted; finishing it" in d.log()
        _assert_fell_back(d, nginx)
    finally:
        d.stop()
        nginx.stop()


@pytest.mark.parametrize("point", ["rollback-journaled", "rollback-switched"])
def test_crash_during_manual_rollback_keeps_the_mark(
    tmp_path: Path, pkgs: dict[str, Path], point: str
) -> None:
    """``edgeward rollback`` swaps the links (previous = the refused version, for the
    operator to see); a crash inside it still ends with the swap done and the mark kept,
    so the next check does not install the refused version again."""
    nginx, d, cfg = _crash_box(tmp_path, pkgs, point, new="4")
    try:
        assert _check(d)["installed"] == {"tiny": "4"}
        assert _scale(d) == 5.0
        d.cli("rollback", "tiny", timeout=60)  # the daemon dies inside it
        d.proc.wait(30)
        assert d.proc.returncode == -signal.SIGKILL, d.log()
        d.kill_group()
        d = start_daemon(tmp_path / "d", config=cfg)
        assert _scale(d) == 2.0
        st = _status(d)
        assert st["models"] == {"tiny": "1"}, st
        assert st["updates"]["tiny"]["bad"]["4"] == "rolled back"  # type: ignore[index]
        (m,) = json.loads(d.cli("models", "--json").stdout)["models"]
        assert m["previous"] == "4", m
        fetched = bytes_for(nginx, "tiny-4.emp")
        res = _check(d)
        assert res["installed"] == {} and res["failed"] == {}, res
        assert bytes_for(nginx, "tiny-4.emp") == fetched
    finally:
        d.stop()
        nginx.stop()
