"""Bad versions from the repository: a failing self-test, and a version that turns
unhealthy inside the health window. Each is rolled back (or never activated), marked
bad, and not fetched again until a newer version appears (real nginx, real daemon)."""

from __future__ import annotations

import json
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
    fetched = bytes_for(nginx, "tiny-3.emp")
    res = _check(d)
    assert res["installed"] == {} and res["failed"] == {}, res
    assert bytes_for(nginx, "tiny-3.emp") == fetched
    assert _scale(d) == 2.0
