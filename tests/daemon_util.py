"""Start a real ``edgeward agent`` in a subprocess on temp paths (tests and benchmarks).

Usage (e.g. from bench/bench_daemon.py)::

    from tests.daemon_util import start_daemon, tiny_model_dir
    d = start_daemon(work, [tiny_model_dir(work / "src", "tiny", "1")])
    # d.infer_sock, d.control_sock are Unix socket paths; d.proc is the Popen
    ...
    d.stop()

``packages`` are ``.emp`` files (unpacked into the store with ``agent.package.unpack``
against ``trust`` keys before the daemon starts) or already unpacked directories (a
``manifest.json`` with name and version, or a ``(name, version, dir)`` tuple), copied
into the hand-written store layout. Readiness is the daemon's own ``READY=1`` on a
``NOTIFY_SOCKET`` datagram socket this helper listens on, exactly as under systemd.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_worker() -> bool:
    import importlib.util

    return importlib.util.find_spec("agent.serving.worker") is not None


#: Tests that serve a model need the runtime's worker processes (agent/serving/worker.py).
needs_worker = pytest.mark.skipif(
    not _has_worker(), reason="agent.serving.worker (model worker processes) is not in the tree yet"
)

PackageSpec = Path | tuple[str, str, Path]


def tiny_onnx(path: Path, *, scale: float = 2.0, width: int = 4) -> Path:
    """A model of a few microseconds: ``y = x * scale`` on float32 ``[N, width]``."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    s = helper.make_tensor("s", TensorProto.FLOAT, [1], [scale])
    node = helper.make_node("Mul", ["x", "s"], ["y"])
    graph = helper.make_graph([node], "tiny", [x], [y], initializer=[s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


SLOW_RUN_SCRIPT = """\
import time


class Model:
    # a negative first input value -v makes the call take v seconds (drain tests)
    thread_safe = True

    def __init__(self, model_dir, backend, config):
        self.backend = backend

    def predict(self, inputs):
        x = inputs["x"]
        if x.size and float(x.ravel()[0]) < 0:
            time.sleep(min(-float(x.ravel()[0]), 10.0))
        return self.backend.predict(inputs)
"""


def tiny_model_dir(
    root: Path, name: str, version: str, *, scale: float = 2.0, slow: bool = False
) -> Path:
    """An unpacked package directory (INTERFACES.md layout) around :func:`tiny_onnx`.

    ``slow=True`` adds a run script that sleeps ``-x[0]`` seconds when ``x[0] < 0``.
    """
    import numpy as np

    d = root / f"{name}-{version}"
    tiny_onnx(d / "Model" / "tiny.onnx", scale=scale)
    if slow:
        (d / "Program" / "Scripts").mkdir(parents=True, exist_ok=True)
        (d / "Program" / "Scripts" / "run.py").write_text(SLOW_RUN_SCRIPT)
    (d / "Meta-info" / "samples").mkdir(parents=True, exist_ok=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(d / "Meta-info" / "samples" / "s0.npz", **{"input:x": x, "output:y": x * scale})
    (d / "Meta-info" / "technicalinfo.json").write_text(
        json.dumps({"runtime_config": {"backend": "onnxruntime", "entry_model": "tiny.onnx"}})
    )
    (d / "manifest.json").write_text(
        json.dumps({"name": name, "version": version, "models": [{"name": "tiny.onnx"}]})
    )
    return d


def install_into_store(state_dir: Path, spec: PackageSpec, trust: Sequence[Path] = ()) -> str:
    """Put one package into the store as ``current`` (before the daemon starts)."""
    from agent.store import Store

    store = Store(state_dir).open()
    if isinstance(spec, tuple):
        name, version, src = spec
    elif spec.is_dir():
        man = json.loads((spec / "manifest.json").read_text())
        name, version, src = str(man["name"]), str(man["version"]), spec
    else:
        from agent.keys import load_trusted
        from agent.package import unpack

        stage = store.staging()
        out = stage / "pkg"
        manifest = unpack(spec, out, trust=load_trusted(list(trust)))
        name, version = str(manifest.name), str(manifest.version)
        store.install(name, version, out)
        shutil.rmtree(stage, ignore_errors=True)
        store.activate(name, version)
        return name
    stage = store.staging()
    shutil.copytree(src, stage / "pkg")
    store.install(name, version, stage / "pkg")
    shutil.rmtree(stage, ignore_errors=True)
    store.activate(name, version)
    return name


def run_dir(work: Path) -> Path:
    """Directory for the daemon's sockets: ``work/run``, or a short path under /tmp
    derived from ``work`` when that would exceed the 108-byte Unix socket path limit
    (pytest-xdist's tmp paths are long)."""
    run = work / "run"
    if len(os.fsencode(str(run / ".control.sock.4194304.tmp"))) <= 100:
        return run
    import hashlib

    digest = hashlib.sha256(os.fsencode(str(work.resolve()))).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ew-{digest}"


def write_config(
    work: Path,
    *,
    trust_dir: Path | None = None,
    group: str = "",
    control_mode: str = "0600",
    admin_group: str = "",
    check_interval: float = 0.0,
    check_on_start: bool = False,
    drain_timeout: float = 10.0,
    limits: dict[str, Any] | None = None,
    lend: bool = True,
    extra: str = "",
    inference_extra: str = "",
    worker_user: str = "",
    daemon_extra: str = "",
) -> Path:
    """A config whose paths all live under ``work``; ``lend=False`` relays every request
    through the daemon (no lent connections, agent/serving/direct.py);
    ``inference_extra`` and ``daemon_extra`` are TOML lines added to ``[inference]``
    and ``[daemon]``.

    Workers run as the daemon's user (``worker_user = ""``): the suite runs as root in
    pytest's temp directories, which only root may enter, so a worker under another uid
    could not reach its model there. Workers under another uid are tested by
    tests/test_hardening_serve.py in a tree that user may read (``worker_user``)."""
    state = work / "state"
    run = run_dir(work)
    inbox = work / "inbox"
    for d in (state, run, inbox):
        d.mkdir(parents=True, exist_ok=True)
    lim = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (limits or {}).items())
    text = f"""
[paths]
state_dir = "{state}"
inbox_dir = "{inbox}"
trust_dir = "{trust_dir or (work / "trust")}"
keys_dir = ""

[inference]
socket = "{run / "infer.sock"}"
mode = "0660"
group = "{group}"
lend_connections = {str(lend).lower()}
{inference_extra}

[inference.limits]
{lim}
[control]
socket = "{run / "control.sock"}"
mode = "{control_mode}"
admin_group = "{admin_group}"

[updates]
check_interval = {check_interval}
jitter = 0.1
check_on_start = {"true" if check_on_start else "false"}

[daemon]
drain_timeout = {drain_timeout}
worker_start_timeout = 120.0
log_level = "info"
worker_user = "{worker_user}"
{daemon_extra}

[runtime]
onnx = {{ intra_op_threads = 1, inter_op_threads = 1 }}
{extra}
"""
    cfg = work / "edgeward.toml"
    cfg.write_text(text)
    return cfg


@dataclass
class DaemonProc:
    """A running daemon subprocess and what it told the service manager."""

    proc: subprocess.Popen[bytes]
    work: Path
    config: Path
    infer_sock: Path
    control_sock: Path
    notify_path: Path
    log_path: Path
    messages: list[str] = field(default_factory=list)
    _nsock: socket.socket | None = None
    _thread: threading.Thread | None = None

    @property
    def state_dir(self) -> Path:
        return self.work / "state"

    @property
    def inbox(self) -> Path:
        return self.work / "inbox"

    def _listen(self) -> None:
        sock = self._nsock  # stop() clears the attribute (and closes it) meanwhile
        assert sock is not None
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.messages.extend(data.decode(errors="replace").splitlines())

    def wait_for(self, message: str, timeout: float = 90.0, *, count: int = 1) -> None:
        """Block until the daemon sent ``message`` (e.g. "READY=1") ``count`` times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for m in self.messages if m == message) >= count:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode} before {message}:\n{self.log()}"
                )
            time.sleep(0.02)
        raise TimeoutError(f"daemon did not send {message} in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``edgeward <args> --control-socket <this daemon's>``."""
        return subprocess.run(
            [sys.executable, "-m", "agent", *args, "--control-socket", str(self.control_sock)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
        )

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.kill_group()
        self.close()
        return self.proc.returncode

    def kill(self, *, group: bool = True) -> None:
        """kill -9 the daemon (and, with ``group``, the workers it started)."""
        workers = self.worker_pids() if group else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if group:
            self.kill_group(workers)
        self.close()

    def worker_pids(self) -> list[int]:
        """The daemon's child processes (model workers, each its own process group)."""
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []

    def kill_group(self, workers: Sequence[int] = ()) -> None:
        """SIGKILL what is left of the daemon's process group, and of each worker's."""
        for pgid in (self.proc.pid, *workers):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def close(self) -> None:
        if self._nsock is not None:
            self._nsock.close()
            self._nsock = None


def start_daemon(
    work: Path,
    packages: Iterable[PackageSpec] = (),
    *,
    trust: Sequence[Path] = (),
    config: Path | None = None,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    watchdog_usec: int | None = None,
    python: str = sys.executable,
    **config_kw: Any,
) -> DaemonProc:
    """Install ``packages``, start ``edgeward agent`` on temp sockets, wait for READY=1.

    Returns a :class:`DaemonProc`; call ``.stop()`` (SIGTERM) when done.
    """
    work.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = write_config(work, **config_kw)
    for spec in packages:
        install_into_store(work / "state", spec, trust)
    notify_path = work / "notify.sock"
    notify_path.unlink(missing_ok=True)
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(str(notify_path))
    log_path = work / "daemon.log"
    penv = dict(os.environ)
    penv.update(env or {})
    penv["NOTIFY_SOCKET"] = str(notify_path)
    penv["PYTHONUNBUFFERED"] = "1"
    penv.pop("WATCHDOG_PID", None)
    if watchdog_usec is not None:
        penv["WATCHDOG_USEC"] = str(watchdog_usec)
    else:
        penv.pop("WATCHDOG_USEC", None)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [python, "-m", "agent", "agent", "--config", str(config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=penv,
            cwd=ROOT,
            start_new_session=True,  # its own process group: kill() reaps the workers too
        )
    d = DaemonProc(
        proc=proc,
        work=work,
        config=config,
        infer_sock=run_dir(work) / "infer.sock",
        control_sock=run_dir(work) / "control.sock",
        notify_path=notify_path,
        log_path=log_path,
        _nsock=nsock,
    )
    d._thread = threading.Thread(target=d._listen, daemon=True)
    d._thread.start()
    if wait_ready:
        try:
            d.wait_for("READY=1")
        except BaseException:
            d.kill()
            raise
    return d


def http_unix(
    sock_path: Path,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a Unix socket (the one client connection class)."""
    from agent.serving.connection import UnixHTTPConnection

    with UnixHTTPConnection(str(sock_path), timeout) as conn:
        h = dict(headers or {})
        if body or method == "POST":
            h.setdefault("Content-Type", "application/json")
        status, rh, data = conn.request(method, path, body or None, h)
        return status, rh, bytes(data)


def infer_json(sock_path: Path, model: str, x: Any) -> tuple[int, Any]:
    """POST a v2 JSON infer request for input ``x`` (float32 [N,4]); returns (status, json)."""
    import numpy as np

    arr = np.asarray(x, dtype=np.float32)
    req = {
        "inputs": [
            {
                "name": "x",
                "shape": list(arr.shape),
                "datatype": "FP32",
                "data": arr.ravel().tolist(),
            }
        ]
    }
    status, _h, body = http_unix(
        sock_path, "POST", f"/v2/models/{model}/infer", json.dumps(req).encode()
    )
    return status, json.loads(body)


def edgeward(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the ``edgeward`` CLI of this checkout; raises with its stderr on failure."""
    res = subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    if res.returncode != 0:
        raise RuntimeError(f"edgeward {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def signing_key(work: Path) -> tuple[Path, Path]:
    """A fresh publisher key pair via ``edgeward keygen``: (private .key, trust dir)."""
    kdir = work / "keys"
    kdir.mkdir(parents=True, exist_ok=True)
    edgeward("keygen", "--kind", "signing", "--out", str(kdir))
    key = next(kdir.glob("*.key"))
    trust = work / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    for pub in kdir.glob("*.pub"):
        shutil.copy(pub, trust / pub.name)
    return key, trust


def make_package(work: Path, key: Path, name: str, version: str, *, scale: float = 2.0) -> Path:
    """A signed ``.emp`` of the tiny model (``y = x * scale``) via ``edgeward pack``."""
    src = tiny_model_dir(work / "src", name, version, scale=scale)
    out = work / "pkgs" / f"{name}-{version}.emp"
    out.parent.mkdir(parents=True, exist_ok=True)
    edgeward(
        "pack",
        "--model",
        str(src / "Model" / "tiny.onnx"),
        "--name",
        name,
        "--version",
        version,
        "--signing-key",
        str(key),
        "--samples",
        str(src / "Meta-info" / "samples"),
        "-o",
        str(out),
    )
    return out
