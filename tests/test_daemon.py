"""The real daemon in a subprocess: endpoints, sd_notify, signals, stale sockets, kill -9."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.daemon_util import (
    DaemonProc,
    http_unix,
    infer_json,
    needs_worker,
    run_dir,
    start_daemon,
    tiny_model_dir,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    work = tmp_path_factory.mktemp("daemon")
    src = tiny_model_dir(work / "src", "tiny", "1", scale=2.0, slow=True)
    d = start_daemon(work, [src], watchdog_usec=300_000)
    yield d
    d.stop()


def _get(d: DaemonProc, path: str) -> tuple[int, Any]:
    status, _h, body = http_unix(d.infer_sock, "GET", path)
    return status, json.loads(body) if body else None


@needs_worker
def test_ready_status_and_watchdog(daemon: DaemonProc) -> None:
    assert "READY=1" in daemon.messages
    assert any(m.startswith("STATUS=serving 1 model: tiny v1") for m in daemon.messages)
    daemon.wait_for("WATCHDOG=1", timeout=30, count=2)  # pings repeat at WATCHDOG_USEC/2
    # READY comes only after the sockets exist
    assert daemon.infer_sock.is_socket() and daemon.control_sock.is_socket()
    assert daemon.infer_sock.stat().st_mode & 0o777 == 0o660
    assert daemon.control_sock.stat().st_mode & 0o777 == 0o600


@needs_worker
def test_v2_endpoints(daemon: DaemonProc) -> None:
    assert _get(daemon, "/v2/health/live")[0] == 200
    assert _get(daemon, "/v2/health/ready")[0] == 200
    status, meta = _get(daemon, "/v2")
    assert status == 200 and "extensions" in meta
    status, meta = _get(daemon, "/v2/models/tiny")
    assert status == 200
    assert meta["name"] == "tiny" and "1" in meta["versions"]
    assert meta["inputs"][0]["name"] == "x"
    assert _get(daemon, "/v2/models/tiny/versions/1")[0] == 200
    assert _get(daemon, "/v2/models/tiny/ready")[0] == 200
    assert _get(daemon, "/v2/models/tiny/versions/1/ready")[0] == 200
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    status, out = infer_json(daemon.infer_sock, "tiny", x)
    assert status == 200, out
    y = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(y, x * 2)
    status, err = _get(daemon, "/v2/models/nope")
    assert status == 404 and "error" in err
    status, err = _get(daemon, "/v2/models/tiny/versions/9")
    assert status == 404 and "error" in err


@needs_worker
def test_curl_on_both_sockets(daemon: DaemonProc) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    res = subprocess.run(
        [curl, "-sS", "--unix-socket", str(daemon.infer_sock), "-w", "\n%{http_code}",
         "http://localhost/v2/health/ready"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.stdout.strip().endswith("200"), res.stdout + res.stderr
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    )
    res = subprocess.run(
        [curl, "-sS", "--unix-socket", str(daemon.infer_sock), "-H",
         "Content-Type: application/json", "-d", body, "http://localhost/v2/models/tiny/infer"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert json.loads(res.stdout)["outputs"][0]["data"] == [2, 4, 6, 8], res.stdout
    res = subprocess.run(
        [curl, "-sS", "--unix-socket", str(daemon.control_sock), "http://localhost/models"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    models = json.loads(res.stdout)["models"]
    assert models[0]["name"] == "tiny" and models[0]["version"] == "1"
    assert models[0]["pid"] and models[0]["rss_bytes"] > 0


@needs_worker
def test_cli_status_models_metrics(daemon: DaemonProc) -> None:
    infer_json(daemon.infer_sock, "tiny", np.ones((1, 4), np.float32))
    res = daemon.cli("status")
    assert res.returncode == 0, res.stderr
    assert "serving" in res.stdout and "tiny v1" in res.stdout
    res = daemon.cli("status", "--json")
    st = json.loads(res.stdout)
    assert st["models"] == {"tiny": "1"} and st["pid"] == daemon.proc.pid
    res = daemon.cli("models")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "VERSION", "STATE"]
    assert lines[1].split()[:2] == ["tiny", "1"]
    res = daemon.cli("models", "--json")
    m = json.loads(res.stdout)["models"][0]
    assert m["state"] == "ready" and m["since"] <= time.time() and m["rss_bytes"] > 0
    res = daemon.cli("rollback", "tiny")
    assert res.returncode != 0
    assert "no previous version" in res.stderr and res.stderr.count("\n") == 1
    status, _h, body = http_unix(daemon.control_sock, "GET", "/metrics")
    text = body.decode()
    assert status == 200
    line = next(
        s for s in text.splitlines() if s.startswith('edgeward_requests_total{model="tiny"}')
    )
    assert float(line.split()[-1]) >= 1
    for name in (
        "edgeward_request_errors_total",
        'edgeward_request_duration_seconds_bucket{le="+Inf",model="tiny"}',
        "edgeward_worker_rss_bytes",
        "edgeward_worker_restarts_total",
        'edgeward_update_state{model="tiny",state="active"} 1.0',
    ):
        assert name in text, name
    status, _h, body = http_unix(daemon.control_sock, "GET", "/nope")
    assert status == 404 and json.loads(body)["code"] == "not-found"
    status, _h, body = http_unix(daemon.control_sock, "GET", "/check")
    assert status == 405


@needs_worker
def test_check_with_empty_inbox_and_no_trust(daemon: DaemonProc) -> None:
    res = daemon.cli("check")
    assert res.returncode == 0, res.stderr
    assert "no packages in the inbox" in res.stdout
    (daemon.inbox / "x.emp").write_bytes(b"not a package")
    try:
        res = daemon.cli("check", "--json")
        data = json.loads(res.stdout)
        assert res.returncode == 1  # no trusted keys configured: a clear failure
        assert "trusted publisher keys" in data["failed"]["*"]
    finally:
        (daemon.inbox / "x.emp").unlink()


def test_control_cli_errors_are_one_line(tmp_path: Path) -> None:
    from tests.daemon_util import edgeward

    with pytest.raises(RuntimeError, match="does not exist"):
        edgeward("status", "--control-socket", str(tmp_path / "none.sock"))
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(RuntimeError, match="nothing listens"):
        edgeward("status", "--control-socket", str(stale))


def _inflight(d: DaemonProc) -> int:
    _s, _h, body = http_unix(d.control_sock, "GET", "/models")
    return int(json.loads(body)["models"][0]["inflight"])


@needs_worker
def test_sighup_reload_then_sigterm_drains(tmp_path: Path) -> None:
    src = tiny_model_dir(tmp_path / "src", "tiny", "1", slow=True)
    d = start_daemon(tmp_path / "w", [src])
    try:
        # SIGHUP: config re-read (a changed key is reported) and a check triggered
        text = d.config.read_text().replace("check_interval = 0.0", "check_interval = 7200.0")
        d.config.write_text(text)
        before = json.loads(d.cli("status", "--json").stdout)["checks"]
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while json.loads(d.cli("status", "--json").stdout)["checks"] <= before:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        assert "configuration reloaded (changed: updates)" in d.log()
        status, _h, body = http_unix(d.control_sock, "POST", "/reload")
        assert status == 200 and json.loads(body)["changed"] == []

        # SIGTERM while a 2-second request is in flight: it still completes
        result: dict[str, Any] = {}

        def slow() -> None:
            result["r"] = infer_json(d.infer_sock, "tiny", [[-2.0, 1, 1, 1]])

        t = threading.Thread(target=slow)
        t.start()
        while _inflight(d) == 0:
            assert t.is_alive()
            time.sleep(0.02)
        d.proc.send_signal(signal.SIGTERM)
        t.join(30)
        status, out = result["r"]
        assert status == 200, out
        assert out["outputs"][0]["data"] == [-4.0, 2, 2, 2]
        assert d.proc.wait(30) == 0
        assert "STOPPING=1" in d.messages
        assert not d.infer_sock.exists() and not d.control_sock.exists()
    finally:
        d.kill()


@needs_worker
def test_stale_sockets_and_kill9_restart(tmp_path: Path) -> None:
    work = tmp_path / "w"
    run = run_dir(work)
    run.mkdir(parents=True, exist_ok=True)
    # stale socket files of a dead daemon (bound, never unlinked)
    for name in ("infer.sock", "control.sock"):
        (run / name).unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(run / name))
        s.close()
    src1 = tiny_model_dir(tmp_path / "src", "tiny", "1", scale=2.0)
    src2 = tiny_model_dir(tmp_path / "src", "tiny", "2", scale=3.0)
    d = start_daemon(work, [src1, src2])  # 2 is current, 1 previous
    assert infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])[1]["outputs"][0]["data"] == [3] * 4
    assert d.cli("rollback", "tiny").returncode == 0
    assert infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])[1]["outputs"][0]["data"] == [2] * 4
    d.kill(group=False)  # kill -9 the daemon alone, as the OOM killer would
    # the workers notice their parent is gone and exit; the restart must not need them
    d2 = start_daemon(work, config=d.config)
    try:
        status, out = infer_json(d2.infer_sock, "tiny", [[1, 1, 1, 1]])
        assert status == 200 and out["outputs"][0]["data"] == [2] * 4  # rolled-back current
        st = json.loads(d2.cli("status", "--json").stdout)
        assert st["models"] == {"tiny": "1"}
        m = json.loads(d2.cli("models", "--json").stdout)["models"][0]
        assert m["previous"] == "2"
    finally:
        d2.stop()
        d.kill_group()


def test_bad_config_fails_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[inference]\nmode = "0666"\n')
    res = subprocess.run(
        [sys.executable, "-m", "agent", "agent", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert "inference.mode" in res.stderr
