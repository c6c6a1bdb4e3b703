"""agent/serving/sandbox.py: the worker's environment, user and Landlock plan, in process
(the fenced worker itself is driven end to end in tests/test_hardening_serve.py)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from agent.serving.sandbox import plan, worker_env, worker_identity


def test_worker_env_is_an_allow_list() -> None:
    daemon_env = {
        "PATH": "/usr/bin",
        "LANG": "de_DE.UTF-8",
        "TZ": "Europe/Berlin",
        "OMP_NUM_THREADS": "2",
        "ORT_LOGGING_LEVEL": "3",
        "AWS_SECRET_ACCESS_KEY": "leak",
        "EDGEWARD_MQTT_PASSWORD": "leak",
        "HOME": "/root",
        "PYTHONPATH": "/elsewhere",
        "VENDOR_NPU_LIB": "/opt/npu",
        "QNN_SDK_ROOT": "/opt/qnn",
    }
    env = worker_env(
        daemon_env,
        home="/var/lib/m/1",
        pythonpath="/opt/edgeward",
        extra=("VENDOR_NPU_LIB", "QNN_*"),
    )
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "de_DE.UTF-8",
        "TZ": "Europe/Berlin",
        "OMP_NUM_THREADS": "2",
        "ORT_LOGGING_LEVEL": "3",
        "VENDOR_NPU_LIB": "/opt/npu",
        "QNN_SDK_ROOT": "/opt/qnn",
        "HOME": "/var/lib/m/1",
        "PYTHONPATH": "/opt/edgeward",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "ORT_DISABLE_TELEMETRY": "1",
    }
    bare = worker_env({}, home="/m", pythonpath="/p", tmpdir="/t")
    assert bare["PATH"] and bare["LANG"] == "C.UTF-8" and bare["TMPDIR"] == "/t"


def test_worker_identity() -> None:
    assert worker_identity("") is None
    if os.geteuid() != 0:
        assert worker_identity("auto") is None  # only root changes user
        return
    uid, gid, name = worker_identity("auto") or (0, 0, "")
    assert name in ("edgeward-worker", "nobody") and uid == pwd.getpwnam(name).pw_uid != 0
    assert gid == pwd.getpwnam(name).pw_gid
    assert worker_identity("root") is None
    with pytest.raises(LookupError, match="no-such-user"):
        worker_identity("no-such-user")


def test_landlock_plan_opens_all_but_the_denied(tmp_path: Path) -> None:
    for d in ("state/models/a/1", "state/models/b/1", "keys", "other/deep"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "keys")
    got = dict(plan([str(tmp_path / "keys"), str(tmp_path / "state")]))
    mine = {p: d for p, d in got.items() if p.startswith(str(tmp_path))}
    # siblings of denied paths are open; denied ones, their ancestors and links are not
    assert mine == {str(tmp_path / "other"): True, str(tmp_path / "file.txt"): False}
    assert str(tmp_path) not in got and "/" not in got
    # everything else of the file system stays reachable: every top-level entry but the
    # one leading to tmp_path is granted
    top = "/" + str(tmp_path).split("/")[1]
    for e in os.scandir("/"):
        if not e.is_symlink() and e.path != top:
            assert got.get(e.path) is not None, e.path
