"""Hardening of the serving side against a hostile local client and a misbehaving run
script (issue #13 items 5-11), on a real daemon, real workers and real Unix sockets.

Each class is tried with several vectors, on the relayed path (``lend=False``) and on
lent connections (``lend=True``) where both exist:

* memory follows bytes received, under one body budget (item 5);
* connection slots: per-pid/uid caps, idle eviction, a reserve for other users (item 6);
* edge-case tensors give 400, never 500 (item 7);
* a prediction that hangs or spins gets 504, readiness drops, the worker restarts
  (item 8);
* a worker killed while a forked grandchild holds its sockets is noticed (item 9);
* what a run script forks or spawns dies with its worker on restart and on stop
  (item 10).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tests.daemon_util import (
    DaemonProc,
    http_unix,
    infer_json,
    needs_worker,
    run_dir,
    start_daemon,
    tiny_model_dir,
    write_config,
)

pytestmark = [needs_worker, pytest.mark.e2e]

# A run script whose behaviour the first input value selects (the test's own vectors):
#   -1 sleep forever, -2 spin forever, -5 write the "busy" marker and sleep 60 s.
# At start it forks a child and spawns `sleep` (both hold the worker's inherited
# sockets) and records their pids; with the "hold" marker present a restart waits for
# the "release" marker (so the test sees the restart window without racing it).
HOSTILE_RUN_SCRIPT = """\
import os
import subprocess
import time
from pathlib import Path

DIR = Path(os.environ["EW_TEST_DIR"])


class Model:
    thread_safe = True

    def __init__(self, model_dir, backend, config):
        self.backend = backend
        if (DIR / "hold").exists():
            for _ in range(1200):
                if (DIR / "release").exists():
                    break
                time.sleep(0.05)
        (DIR / "hold").write_text("1")
        pid = os.fork()
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        sleeper = subprocess.Popen(["sleep", "3600"])
        with open(DIR / "pids", "a") as fh:
            fh.write("%d %d %d\\n" % (os.getpid(), pid, sleeper.pid))

    def predict(self, inputs):
        v = float(inputs["x"].ravel()[0])
        if v == -1:
            time.sleep(3600)
        elif v == -2:
            while True:
                pass
        elif v == -5:
            (DIR / "busy").write_text("1")
            time.sleep(60)
        return self.backend.predict(inputs)
"""


def hostile_model(tmp: Path) -> Path:
    d = tiny_model_dir(tmp / "src", "tiny", "1", slow=True)
    (d / "Program" / "Scripts" / "run.py").write_text(HOSTILE_RUN_SCRIPT)
    return d


def _wait(pred: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _model(d: DaemonProc) -> dict[str, Any]:
    res = d.cli("models", "--json")
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)["models"][0]
    return out


def _ready(d: DaemonProc) -> tuple[int, int]:
    """(/v2/health/ready status, /v2/models/tiny/ready status)."""
    return (
        http_unix(d.infer_sock, "GET", "/v2/health/ready")[0],
        http_unix(d.infer_sock, "GET", "/v2/models/tiny/ready")[0],
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _x_body(v: float) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [v, 1, 1, 1]}]}
    ).encode()


def _pids(test_dir: Path) -> list[tuple[int, int, int]]:
    path = test_dir / "pids"
    if not path.exists():
        return []
    return [
        (int(a), int(b), int(c))
        for a, b, c in (line.split() for line in path.read_text().splitlines() if line)
    ]


@pytest.fixture
def hostile(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[DaemonProc, Path]]:
    lend = bool(request.param)
    test_dir = tmp_path / "t"
    test_dir.mkdir()
    d = start_daemon(
        tmp_path / "w",
        [hostile_model(tmp_path)],
        lend=lend,
        inference_extra="request_timeout_s = 30.0\nrequest_timeouts = { tiny = 2.0 }",
        env={"EW_TEST_DIR": str(test_dir)},
        daemon_extra='worker_env = ["EW_TEST_DIR"]',  # workers get an allow-listed env
    )
    try:
        yield d, test_dir
    finally:
        (test_dir / "release").write_text("1")
        d.stop()
        for _w, child, sleeper in _pids(test_dir):  # never leave them behind
            for pid in (child, sleeper):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


LEND = pytest.mark.parametrize("hostile", [False, True], ids=["relayed", "lent"], indirect=True)


# --- item 8: per-request timeout ---------------------------------------------------------


@LEND
@pytest.mark.parametrize("how", [-1.0, -2.0], ids=["sleeps", "spins"])
def test_hung_predict_answers_504_and_restarts(
    hostile: tuple[DaemonProc, Path], how: float
) -> None:
    d, test_dir = hostile
    pid0 = _model(d)["pid"]
    assert _ready(d) == (200, 200)
    status, _h, body = http_unix(
        d.infer_sock, "POST", "/v2/models/tiny/infer", _x_body(how), timeout=60.0
    )
    assert status == 504, body
    assert json.loads(body)["code"] == "worker-timeout"
    # The restart waits for "release": readiness must say so meanwhile.
    assert _ready(d) == (503, 503)
    _st, _h, b = http_unix(d.infer_sock, "GET", "/v2/health/ready")
    assert json.loads(b)["ready"] is False
    # the hung worker (and its group) is killed as the 504 goes out; a SIGKILL'd process
    # that spins on a loaded CPU can take a moment to be gone
    _wait(lambda: not _alive(pid0), "the hung worker to be gone")
    (test_dir / "release").write_text("1")
    _wait(lambda: _ready(d) == (200, 200), "the model to be ready again")
    m = _model(d)
    assert m["pid"] != pid0 and m["restarts"] >= 1 and m["state"] == "ready"
    status, out = infer_json(d.infer_sock, "tiny", [[1, 2, 3, 4]])
    assert status == 200 and out["outputs"][0]["data"] == [2, 4, 6, 8]


# --- item 9: a dead worker whose grandchild keeps its sockets ------------------------------


@LEND
def test_dead_worker_noticed_though_grandchild_holds_sockets(
    hostile: tuple[DaemonProc, Path],
) -> None:
    d, test_dir = hostile
    (test_dir / "release").write_text("1")  # restarts need not wait here
    worker, child, sleeper = _pids(test_dir)[-1]
    assert _model(d)["pid"] == worker and _alive(child) and _alive(sleeper)
    got: dict[str, Any] = {}

    def slow() -> None:
        got["r"] = http_unix(
            d.infer_sock, "POST", "/v2/models/tiny/infer", _x_body(-5.0), timeout=45.0
        )

    t = threading.Thread(target=slow)
    t.start()
    _wait((test_dir / "busy").exists, "the slow request to run")
    os.kill(worker, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive()
    status, _h, body = got["r"]  # answered before the 60 s sleep (or 45 s timeout) ended
    assert status == 503 and json.loads(body)["code"] == "worker-crashed", body
    _wait(lambda: not _alive(child) and not _alive(sleeper), "the grandchildren to be killed")
    _wait(lambda: _ready(d) == (200, 200), "the restarted worker")
    assert _model(d)["pid"] not in (worker, None)
    status, out = infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])
    assert status == 200 and out["outputs"][0]["data"] == [2] * 4


# --- item 10: children of run scripts die with their worker ---------------------------------


@LEND
def test_run_script_children_die_on_restart_and_stop(hostile: tuple[DaemonProc, Path]) -> None:
    d, test_dir = hostile
    (test_dir / "release").write_text("1")
    first = _pids(test_dir)[-1]
    assert all(_alive(p) for p in first)
    # restart: a hung request kills the worker and its process group
    status, _h, _b = http_unix(
        d.infer_sock, "POST", "/v2/models/tiny/infer", _x_body(-1.0), timeout=60.0
    )
    assert status == 504
    _wait(lambda: len(_pids(test_dir)) >= 2 and _ready(d) == (200, 200), "the restart")
    _wait(lambda: not any(_alive(p) for p in first), "the first worker's children to die")
    second = _pids(test_dir)[-1]
    assert all(_alive(p) for p in second)
    # a clean stop (SIGTERM) takes the new worker's children too
    assert d.stop() == 0
    _wait(lambda: not any(_alive(p) for p in second), "the children to die on stop")


# --- item 7: edge-case tensors → 400 -----------------------------------------------------------


def _binary(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    h = json.dumps(header).encode()
    return h + data, {
        "Inference-Header-Content-Length": str(len(h)),
        "Content-Type": "application/octet-stream",
    }


def _vectors() -> list[tuple[str, bytes, dict[str, str]]]:
    def doc(**t: Any) -> bytes:
        return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", **t}]}).encode()

    deep_data = b"[" * 200 + b"1" + b"]" * 200
    out: list[tuple[str, bytes, dict[str, str]]] = [
        ("nested-brackets-64k", b"[" * 65536, {}),
        ("nested-objects", b'{"a":' * 5000 + b"1" + b"}" * 5000, {}),
        ("deep-data", doc(shape=[1, 4], data=None)[:-3] + deep_data + b"}]}", {}),
        ("huge-dims", doc(shape=[2**40, 2**40], data=[1.0]), {}),
        ("dim-over-int64", doc(shape=[0, 2**70], data=[]), {}),
        ("too-many-dims", doc(shape=[1] * 100, data=[1.0]), {}),
        ("negative-dim", doc(shape=[-1, 4], data=[1.0] * 4), {}),
        ("shape-data-mismatch", doc(shape=[1, 4], data=[1.0] * 5), {}),
        ("ragged-data", doc(shape=[2, 2], data=[[1.0, 2.0], [3.0]]), {}),
        ("non-numeric", doc(shape=[1, 4], data=["a", "b", "c", "d"]), {}),
        ("null-values", doc(shape=[1, 4], data=[None, 1.0, 1.0, 1.0]), {}),
        ("object-data", doc(shape=[1, 4], data={"a": 1}), {}),
        ("shape-not-list", doc(shape="1,4", data=[1.0] * 4), {}),
        ("not-json", b"\xff\xfe not json", {}),
    ]
    spec = {"name": "x", "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    out += [
        ("binary-huge-dims", *_binary({"inputs": [{**spec, "shape": [2**31, 2**31]}]}, b"\0" * 16)),
        ("binary-zero-x-huge", *_binary({"inputs": [{**spec, "shape": [0, 2**40]}]}, b"\0" * 16)),
        ("binary-too-many-dims", *_binary({"inputs": [{**spec, "shape": [1] * 65}]}, b"\0" * 16)),
        ("binary-size-mismatch", *_binary({"inputs": [{**spec, "shape": [1, 3]}]}, b"\0" * 16)),
        ("binary-short-body", *_binary({"inputs": [{**spec, "shape": [1, 4]}]}, b"\0" * 8)),
    ]
    body, headers = _binary({"inputs": [{**spec, "shape": [1, 4]}]}, b"\0" * 16)
    out.append(
        ("header-length-past-body", body, {**headers, "Inference-Header-Content-Length": "99999"})
    )
    return out


@pytest.mark.parametrize("lend", [False, True], ids=["relayed", "lent"])
def test_edge_case_tensors_are_400(tmp_path: Path, lend: bool) -> None:
    d = start_daemon(tmp_path / "w", [tiny_model_dir(tmp_path / "src", "tiny", "1")], lend=lend)
    try:
        pid = _model(d)["pid"]
        for name, body, headers in _vectors():
            status, _h, resp = http_unix(
                d.infer_sock, "POST", "/v2/models/tiny/infer", body, headers=headers
            )
            assert status == 400, (name, status, resp[:300])
            err = json.loads(resp)
            assert err["code"].startswith("bad-") and err["error"], (name, err)
        # the model kept serving, in the same worker
        status, out = infer_json(d.infer_sock, "tiny", [[1, 2, 3, 4]])
        assert status == 200 and out["outputs"][0]["data"] == [2, 4, 6, 8]
        assert _model(d)["pid"] == pid
    finally:
        d.stop()


# --- item 5: memory follows bytes received, under a budget -----------------------------------

MIB = 1024 * 1024


def _head(length: int) -> bytes:
    return (
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@pytest.mark.parametrize("lend", [False, True], ids=["relayed", "lent"])
def test_declared_bodies_cost_nothing_and_the_budget_holds(tmp_path: Path, lend: bool) -> None:
    budget = 128 * MIB
    limits = {"max_body_bytes": 64 * MIB, "max_inflight_body_bytes": budget}
    d = start_daemon(
        tmp_path / "w", [tiny_model_dir(tmp_path / "src", "tiny", "1")], lend=lend, limits=limits
    )
    socks: list[socket.socket] = []
    try:
        assert infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])[0] == 200
        worker = _model(d)["pid"]
        idle_daemon, idle_worker = _rss(d.proc.pid), _rss(worker)
        # 40 requests declaring 64 MiB, each followed by a few KiB of body only
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(60)
            s.connect(str(d.infer_sock))
            s.sendall(_head(64 * MIB) + b"[" * 4096)
            socks.append(s)
        # a request answered after all of them were read (one event loop, in order)
        assert infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])[0] == 200
        bound_d = 2 * idle_daemon + budget
        bound_w = 2 * idle_worker + budget
        assert _rss(d.proc.pid) <= bound_d, (_rss(d.proc.pid), idle_daemon)
        assert _rss(worker) <= bound_w, (_rss(worker), idle_worker)
        for s in socks:
            s.close()
        socks.clear()
        # Full bodies: two of 40 MiB fit the 128 MiB budget, a third does not (its last
        # growth, 32 -> 40 MiB, holds both buffers for a moment: 40 + 40 + 72 > 128).
        payload = b" " * (40 * MIB - 1)
        senders = []
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(60)
            s.connect(str(d.infer_sock))
            socks.append(s)
        refused: list[bytes] = []

        def send(s: socket.socket) -> None:
            with contextlib.suppress(OSError):  # refused and closed mid-body
                s.sendall(_head(40 * MIB) + payload)  # one byte short: held in flight
            try:
                s.settimeout(5)
                got = s.recv(4096)
                if got:
                    refused.append(got)
            except OSError:
                pass

        for s in socks:
            senders.append(threading.Thread(target=send, args=(s,)))
            senders[-1].start()
        for t in senders:
            t.join(120)
        assert len(refused) == 1, refused
        assert refused[0].startswith(b"HTTP/1.1 503") and b"retry-after: 1" in refused[0].lower()
        assert b'"body-budget"' in refused[0]
        assert _rss(d.proc.pid) <= bound_d
        assert _rss(worker) <= bound_w
        for s in socks:
            s.close()
        socks.clear()
        status, out = infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])
        assert status == 200 and out["outputs"][0]["data"] == [2] * 4
    finally:
        for s in socks:
            s.close()
        d.stop()


# --- item 6: connection slots ----------------------------------------------------------------

HOLDER = """\
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
print("held", flush=True)
sys.stdin.read()
"""

# One request with a raw socket (runs as another uid: no imports from the checkout).
CLIENT = """\
import json, socket, sys
body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]}).encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: "
          b"application/json\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
buf = b""
while b"\\r\\n\\r\\n" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(buf.split(b"\\r\\n", 1)[0].decode())
"""


def _client(sock: Path, *, nobody: bool) -> str:
    kw: dict[str, Any] = {}
    if nobody:
        kw = {"user": 65534, "group": 65534, "extra_groups": []}
    res = subprocess.run(
        ["/usr/bin/python3", "-c", CLIENT, str(sock)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        **kw,
    )
    return res.stdout.strip() or res.stderr.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
@pytest.mark.parametrize("lend", [False, True], ids=["relayed", "lent"])
def test_connection_flood_leaves_room_for_others(tmp_path: Path, lend: bool) -> None:
    # The inference socket in a directory other users can reach, group nogroup.
    sock_dir = Path(tempfile.mkdtemp(prefix="ew-slots-", dir="/tmp"))
    sock_dir.chmod(0o755)
    d = start_daemon(tmp_path / "w", [tiny_model_dir(tmp_path / "src", "tiny", "1")], lend=lend)
    d.stop()
    cfg = d.config.read_text().replace(str(d.infer_sock), str(sock_dir / "infer.sock"))
    cfg = cfg.replace('group = ""', 'group = "nogroup"', 1)
    d.config.write_text(cfg)
    d = start_daemon(tmp_path / "w", config=d.config)
    sock = sock_dir / "infer.sock"
    own: list[socket.socket] = []
    holders: list[subprocess.Popen[str]] = []
    try:
        # 520 idle connections from this process, then 2 x 200 from two more of our uid
        for _ in range(520):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            own.append(s)
        for _ in range(2):
            p = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(sock), "200"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "held"
        # another user is served, repeatedly, while our uid keeps every slot it can
        for _ in range(3):
            assert _client(sock, nobody=True) == "HTTP/1.1 200 OK"
        # a fresh process of the flooding uid is served too (it pushes out idle ones)
        assert _client(sock, nobody=False) == "HTTP/1.1 200 OK"
        # re-opening connections from the flooder does not lock the other user out
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            own.append(s)
        assert _client(sock, nobody=True) == "HTTP/1.1 200 OK"
        st, _h, _body = http_unix(sock, "GET", "/v2/health/ready")
        assert st == 200
    finally:
        for s in own:
            s.close()
        for p in holders:
            p.kill()
            p.wait()
        d.stop()


def test_limits_are_validated() -> None:
    from agent.errors import ConfigError
    from agent.serving.http import HTTPLimits

    with pytest.raises(ConfigError, match="max_inflight_body_bytes"):
        HTTPLimits(max_body_bytes=64 * MIB, max_inflight_body_bytes=MIB)
    with pytest.raises(ConfigError, match="max_inflight_body_bytes"):
        HTTPLimits(max_inflight_body_bytes=0)
    with pytest.raises(ConfigError, match="reserved_connections"):
        HTTPLimits(max_connections=16, reserved_connections=16)
    with pytest.raises(ConfigError, match="max_connections_per_pid"):
        HTTPLimits(max_connections_per_pid=0)
    lim = HTTPLimits()
    assert lim.pid_cap == 256 and lim.uid_cap == 480


def test_request_timeout_config_is_validated() -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    cfg = parse_config({"inference": {"request_timeout_s": 5, "request_timeouts": {"det": 9}}})
    assert cfg.inference.request_timeout("det") == 9 and cfg.inference.request_timeout("x") == 5
    with pytest.raises(ConfigError, match="request_timeout_s"):
        parse_config({"inference": {"request_timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"request_timeouts\.det"):
        parse_config({"inference": {"request_timeouts": {"det": "soon"}}})


# --- item 11 / issue #15: the worker is a trust boundary -----------------------------------
#
# A run script is third-party code. It runs in the model's worker, which must not reach
# what the daemon holds: the device keys, the daemon's config, other models in the store,
# the daemon's environment; nor write into the store. Each vector is a probe the hostile
# run script makes at load time; the positive controls (its own model directory, a
# directory the test gave it) prove the probes ran and the fence is not "deny all".

PROBE_RUN_SCRIPT = """\
import json
import os
from pathlib import Path

PROBES = json.loads(%r)


def _try(fn):
    try:
        return "ok: " + str(fn())
    except OSError as exc:
        return "denied: " + str(exc.strerror)


class Model:
    thread_safe = True

    def __init__(self, model_dir, backend, config):
        self.backend = backend
        own = Path(model_dir)
        found = {
            "own_model": _try(lambda: len((own / "manifest.json").read_bytes())),
            "device_key": _try(lambda: len(Path(PROBES["key"]).read_bytes())),
            "key_dir_listing": _try(lambda: os.listdir(PROBES["keys"])),
            "config": _try(lambda: len(Path(PROBES["config"]).read_bytes())),
            "other_model": _try(lambda: len(Path(PROBES["other"]).read_bytes())),
            "store_listing": _try(lambda: os.listdir(own.parents[2])),
            "write_own_model": _try(lambda: (own / "planted.py").write_text("x")),
            "write_store": _try(lambda: (own.parents[2] / "planted").mkdir()),
            "env_secret": os.environ.get("EW_DAEMON_SECRET", "absent"),
            "home": os.environ.get("HOME", ""),
            "uid": os.getuid(),
        }
        Path(PROBES["out"]).write_text(json.dumps(found))

    def predict(self, inputs):
        out = Path(PROBES["out"]).with_name("control.txt")
        if not out.exists():  # the control socket is bound after the workers are up
            import socket

            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(PROBES["control"])
                s.sendall(b"POST /check HTTP/1.1\\r\\nhost: x\\r\\ncontent-length: 0\\r\\n\\r\\n")
                line = s.recv(4096).split(b"\\r\\n")[0].decode()
            except (FileNotFoundError, ConnectionRefusedError):
                line = ""  # a warm-up call: not bound yet
            except OSError as exc:
                line = "denied: " + str(exc.strerror)
            if line:
                out.write_text(line)
        return self.backend.predict(inputs)
"""


def _landlock() -> bool:
    from agent.serving.sandbox import landlock_abi

    return landlock_abi() > 0


def _probe_daemon(
    base: Path, *, worker_user: str = "", sandbox: str = "landlock", python: str = sys.executable
) -> dict[str, Any]:
    """A daemon with a device key, a secret in its environment, a second model, and the
    probing run script in model ``tiny``; returns what the probe found."""
    out_dir = base / "t"
    out_dir.mkdir()
    out_dir.chmod(0o777)  # a worker under another uid writes its findings here
    keys = base / "keys"
    keys.mkdir(mode=0o700)
    (keys / "device.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nsecret\n")
    (keys / "device.key").chmod(0o600)
    work = base / "w"
    cfg = write_config(work, worker_user=worker_user, daemon_extra=f'worker_sandbox = "{sandbox}"')
    cfg.write_text(cfg.read_text().replace('keys_dir = ""', f'keys_dir = "{keys}"'))
    cfg.chmod(0o600)
    other = tiny_model_dir(base / "src", "other", "1")
    probes = {
        "key": str(keys / "device.key"),
        "keys": str(keys),
        "config": str(cfg),
        "other": str(work / "state" / "models" / "other" / "versions" / "1" / "manifest.json"),
        "out": str(out_dir / "found.json"),
        "control": str(run_dir(work) / "control.sock"),
    }
    src = tiny_model_dir(base / "src", "tiny", "1", slow=True)
    (src / "Program" / "Scripts" / "run.py").write_text(PROBE_RUN_SCRIPT % json.dumps(probes))
    env = {"EW_DAEMON_SECRET": "s3cr3t"}
    if python != sys.executable:  # this checkout's packages, under that interpreter
        import sysconfig

        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join((root, sysconfig.get_paths()["purelib"]))
    d = start_daemon(work, [src, other], config=cfg, env=env, python=python)
    try:
        assert Path(probes["other"]).is_file()  # the probe's target is where it looks
        found: dict[str, Any] = json.loads((out_dir / "found.json").read_text())
        found["model_dir"] = str(work / "state" / "models" / "tiny" / "versions" / "1")
        # the fenced worker still serves
        status, out = infer_json(d.infer_sock, "tiny", np.ones((1, 4), np.float32))
        assert status == 200, out
        found["control"] = (out_dir / "control.txt").read_text()
        # the same request from the test (root) is answered: the refusal is the worker's
        st, _h, _b = http_unix(d.control_sock, "GET", "/status")
        assert st == 200
    finally:
        d.stop()
    return found


def _assert_fenced(found: dict[str, Any]) -> None:
    assert found["own_model"].startswith("ok"), found  # the probes ran, and not "deny all"
    for vector in ("device_key", "key_dir_listing", "config", "write_own_model", "write_store"):
        assert found[vector].startswith("denied"), (vector, found)
    assert found["env_secret"] == "absent", found
    # the control socket: refused by the daemon (a worker of its own: 403) or, for a
    # worker under another uid, by the socket file's mode before that
    c = found["control"]
    assert c.startswith("HTTP/1.1 403") or (
        found["uid"] != os.getuid() and c == "denied: Permission denied"
    ), found
    assert Path(found["home"]).resolve() == Path(found["model_dir"]).resolve(), found


@pytest.mark.skipif(not _landlock(), reason="this kernel has no Landlock")
def test_run_script_cannot_read_the_device_key(tmp_path: Path) -> None:
    """Same uid as the daemon (a daemon under systemd, User=edgeward): Landlock fences
    the worker off the keys, the config, the store but its own model; the daemon's
    environment does not reach it."""
    found = _probe_daemon(tmp_path)
    _assert_fenced(found)
    assert found["uid"] == os.getuid()
    for vector in ("other_model", "store_listing"):
        assert found[vector].startswith("denied"), (vector, found)


def _shared_python() -> str:
    """An interpreter of this Python version that another user may run: this one, or
    the system's when this one lives where only root may go (pyenv under /root)."""
    import shutil

    with contextlib.suppress(OSError):
        probe = [sys.executable, "-c", "pass"]
        if subprocess.run(probe, user="nobody", capture_output=True, check=False).returncode == 0:
            return sys.executable
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
    assert found, f"no {name} that user nobody may run (this one: {sys.executable})"
    return found


def _traversable_base() -> Path:
    """A temp tree another uid may enter (pytest's own is root-only, mode 0700)."""
    base = Path(tempfile.mkdtemp(prefix="ew-fence-", dir="/tmp"))
    base.chmod(0o755)
    return base


@pytest.mark.skipif(os.geteuid() != 0, reason="changing the worker's uid needs a root daemon")
@pytest.mark.parametrize("sandbox", ["off", "landlock"])
def test_root_daemon_runs_workers_as_another_user(sandbox: str) -> None:
    """A root daemon runs workers as an unprivileged user ("auto": edgeward-worker, else
    nobody): file permissions alone close the key directory (0700 root), the config
    file (0600 root) and the store (root's, 0755) to it; with Landlock other models'
    directories too (their files are 0644)."""
    if sandbox == "landlock" and not _landlock():
        pytest.skip("this kernel has no Landlock")
    import pwd
    import shutil

    base = _traversable_base()
    try:
        found = _probe_daemon(base, worker_user="auto", sandbox=sandbox, python=_shared_python())
        want = next(n for n in ("edgeward-worker", "nobody") if _user_exists(n))
        assert found["uid"] == pwd.getpwnam(want).pw_uid != 0, found
        _assert_fenced(found)
        if sandbox == "landlock":
            assert found["other_model"].startswith("denied"), found
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_no_pickle_on_the_daemon_side() -> None:
    """Nothing a worker sends can execute code in the daemon: no module the daemon
    imports unpickles (BYTES cross as length-prefixed bytes, errors as JSON); the only
    ``pickle.loads`` is the worker's, of the daemon's init frame."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*root.glob("agent/**/*.py"), *root.glob("runtime/**/*.py")]):
        if path.name == "worker_main.py":  # the child: it unpickles what its parent sent
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] in ("pickle", "marshal", "shelve", "dill") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == [], offenders
