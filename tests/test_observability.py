"""What an operator sees: journald-ready log lines (daemon and workers alike), STATUS=,
RELOADING=1 on SIGHUP, log_level applied on reload, and Prometheus metrics on their own
socket (and optionally loopback TCP) with process, build and per-model families."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.logs import JournalAwareFormatter, journal_stream, setup_logging
from tests.daemon_util import (
    DaemonProc,
    http_unix,
    infer_json,
    needs_worker,
    run_dir,
    start_daemon,
    tiny_model_dir,
)

JOURNAL_LINE = re.compile(r"^<[0-7]>[\w.]+\[(\d+)\]: ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    work = tmp_path_factory.mktemp("obs")
    src = tiny_model_dir(work / "src", "tiny", "1", scale=2.0)
    log = work / "daemon.log"
    log.touch()
    st = os.stat(log)
    port = _free_port()
    d = start_daemon(
        work,
        [src],
        env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        extra=f"\n[metrics]\nport = {port}\n",
    )
    d.metrics_port = port  # type: ignore[attr-defined]
    yield d
    d.stop()


# --- logs, in process -----------------------------------------------------------------


def _record(level: int, msg: str = "hello %s", exc: bool = False) -> logging.LogRecord:
    rec = logging.LogRecord("agent.updater", level, __file__, 1, msg, ("x",), None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            rec.exc_info = sys.exc_info()
    return rec


def test_journal_lines_carry_priorities_and_no_timestamp() -> None:
    f = JournalAwareFormatter("text", journal=True)
    assert f.format(_record(logging.ERROR)) == f"<3>agent.updater[{os.getpid()}]: hello x"
    assert f.format(_record(logging.WARNING)).startswith("<4>")
    assert f.format(_record(logging.INFO)).startswith("<6>")
    assert f.format(_record(logging.DEBUG)).startswith("<7>")
    multi = f.format(_record(logging.ERROR, exc=True)).splitlines()
    assert len(multi) > 2 and all(line.startswith("<3>") for line in multi)
    plain = JournalAwareFormatter("text").format(_record(logging.ERROR))
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ERROR agent\.updater\[\d+\]: ", plain)


def test_json_lines() -> None:
    doc = json.loads(JournalAwareFormatter("json").format(_record(logging.WARNING, exc=True)))
    assert doc["level"] == "warning" and doc["logger"] == "agent.updater"
    assert doc["message"] == "hello x" and "ValueError: boom" in doc["exception"]
    assert doc["time"].endswith("Z")
    line = JournalAwareFormatter("json", journal=True).format(_record(logging.ERROR))
    assert line.startswith("<3>{") and "time" not in json.loads(line[3:])


def test_journal_stream_matches_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stream"
    with open(path, "w") as fh:
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream(fh)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not journal_stream(fh)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal_stream(fh)
    assert not journal_stream(io.StringIO())


def test_setup_logging_replaces_handlers() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        buf = io.StringIO()
        setup_logging("warning", "json", stream=buf)
        setup_logging("warning", "json", stream=buf)
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        logging.getLogger("x").warning("once")
        assert [json.loads(s)["message"] for s in buf.getvalue().splitlines()] == ["once"]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# --- the daemon -----------------------------------------------------------------------


@pytest.mark.e2e
@needs_worker
def test_daemon_and_worker_lines_share_the_journal_format(daemon: DaemonProc) -> None:
    lines = [s for s in daemon.log_path.read_text().splitlines() if s.strip()]
    assert lines
    bad = [s for s in lines if not JOURNAL_LINE.match(s) and not s.startswith("<")]
    if os.environ.get("EDGEWARD_ARM64") == "1":
        # onnxruntime's C++ writes this straight to stderr when it cannot read a CPU
        # description; the emulated root hides the host's x86 one (.ci/arm64.sh)
        bad = [s for s in bad if "cpuid_info warning: Unknown CPU vendor" not in s]
    assert not bad, bad[:5]
    pids = {int(m.group(1)) for s in lines if (m := JOURNAL_LINE.match(s))}
    assert daemon.proc.pid in pids
    assert pids - {daemon.proc.pid}, "no worker line in the log"  # a worker's own lines


@pytest.mark.e2e
@needs_worker
def test_status_names_what_serves(daemon: DaemonProc) -> None:
    status = [m for m in daemon.messages if m.startswith("STATUS=")]
    assert "STATUS=serving 1 model: tiny v1" in status


def _metrics(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


@pytest.mark.e2e
@needs_worker
def test_metrics_socket_and_port(daemon: DaemonProc) -> None:
    infer_json(daemon.infer_sock, "tiny", np.ones((1, 4), np.float32))
    msock = run_dir(daemon.work) / "metrics.sock"
    assert os.stat(msock).st_mode & 0o777 == 0o660
    # a lent connection's requests are counted by the worker and reported shortly after
    deadline = time.monotonic() + 60
    while True:
        status, headers, body = http_unix(msock, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        fams = _metrics(body.decode())
        if fams["edgeward_requests"][0][2] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for name in ("process_resident_memory_bytes", "process_start_time_seconds",
                 "process_open_fds", "process_cpu_seconds"):  # fmt: skip
        assert name in fams, name
    (build,) = fams["edgeward_build_info"]
    assert build[0] == "edgeward_build_info" and build[1]["version"] and build[2] == 1.0
    assert ("edgeward_requests_total", {"model": "tiny"}, 1.0) in fams["edgeward_requests"]
    trans = fams["edgeward_update_transitions"]
    assert all("model" in labels for _n, labels, _v in trans)
    ready = fams["edgeward_model_ready"]
    assert ("edgeward_model_ready", {"model": "tiny", "version": "1"}, 1.0) in ready
    # every per-model family is labelled by model
    for name, samples in fams.items():
        if name.startswith(("edgeward_request", "edgeward_worker", "edgeward_model")):
            assert all("model" in s[1] for s in samples), name
    # the metrics socket answers nothing else; the control socket serves the same text
    status, _h, _b = http_unix(msock, "GET", "/status")
    assert status == 404
    status, _h, ctl = http_unix(daemon.control_sock, "GET", "/metrics")
    assert status == 200 and set(_metrics(ctl.decode())) == set(fams)
    port = daemon.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert "edgeward_requests" in _metrics(resp.read().decode())


@pytest.mark.e2e
@needs_worker
def test_sighup_reloading_ready_and_log_level(daemon: DaemonProc) -> None:
    before = sum(1 for m in daemon.messages if m == "READY=1")
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace('log_level = "info"', 'log_level = "warning"'))
    try:
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("READY=1", count=before + 1)
        i = daemon.messages.index("RELOADING=1")
        assert daemon.messages[i + 1].startswith("MONOTONIC_USEC=")
        assert int(daemon.messages[i + 1].split("=")[1]) > 0
        assert i < len(daemon.messages) - daemon.messages[::-1].index("READY=1") - 1
        # now at warning: the next SIGHUP's info line is not written
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("READY=1", count=before + 2)
        log = daemon.log_path.read_text()
        assert log.count("SIGHUP: reloading configuration") == 1, log[-2000:]
        assert log.count("configuration reloaded") == 0
    finally:
        daemon.config.write_text(text)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("READY=1", count=before + 3)


@pytest.mark.e2e
@needs_worker
def test_second_agent_fails_before_loading_models(daemon: DaemonProc) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agent", "agent", "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=120, check=False,
        env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")},
    )  # fmt: skip
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    # the state directory's lock (or, with another state dir, the socket) refuses it
    # before anything loads: one line, no lifecycle lines
    assert len(lines) == 1, res.stderr
    assert "[store-locked]" in lines[0] or "[socket-in-use]" in lines[0], res.stderr
    assert daemon.proc.poll() is None  # the first agent keeps serving
    # its own state dir, the same sockets: the socket check, still before loading
    other = daemon.work / "other.toml"
    text = daemon.config.read_text()
    other.write_text(text.replace(str(daemon.state_dir), str(daemon.work / "state2")))
    res = subprocess.run(
        [sys.executable, "-m", "agent", "agent", "--config", str(other)],
        capture_output=True, text=True, timeout=120, check=False,
        env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")},
    )  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert lines[0].startswith("edgeward: error [socket-in-use]"), res.stderr
    assert daemon.proc.poll() is None


@pytest.mark.e2e
def test_missing_group_is_one_line_before_any_lifecycle_line(tmp_path: Path) -> None:
    from tests.daemon_util import write_config

    cfg = write_config(tmp_path, group="no-such-group-ew")
    res = subprocess.run(
        [sys.executable, "-m", "agent", "agent", "--config", str(cfg)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeward: error [config-group]"), lines
    assert "inference.group" in lines[0]


def test_status_line_names_an_update_in_progress(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from agent.config import parse_config
    from agent.daemon import Daemon
    from agent.sdnotify import Notifier
    from agent.updater import UpdateMachine

    notify = tmp_path / "n.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(5)
    try:
        d = Daemon(
            parse_config({"paths": {"state_dir": str(tmp_path)}}), notifier=Notifier(str(notify))
        )
        machine = UpdateMachine("det", state="converting", target="4")
        d.updater = SimpleNamespace(machines={"det": machine})  # type: ignore[assignment]
        assert d.status_line() == "serving 0 models: none; updating det -> v4 (converting)"
        d.state = "serving"
        d._send_status()
        assert listener.recv(4096).decode() == (
            "STATUS=serving 0 models: none; updating det -> v4 (converting)"
        )
        machine.state = "active"
        assert d.status_line() == "serving 0 models: none"
    finally:
        listener.close()
