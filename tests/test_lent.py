"""Lent connections (agent/serving/direct.py): the model's worker answers kept-alive inference
connections itself. Real daemon, real worker processes, real sockets, real kill -9."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import Client
from agent.errors import InvalidInputError, ModelNotFoundError, WorkerError
from agent.serving.connection import UnixHTTPConnection
from tests.daemon_util import (
    DaemonProc,
    http_unix,
    needs_worker,
    start_daemon,
    tiny_model_dir,
)

pytestmark = needs_worker


def _models(d: DaemonProc) -> dict[str, dict[str, Any]]:
    _s, _h, body = http_unix(d.control_sock, "GET", "/models")
    return {m["name"]: m for m in json.loads(body)["models"]}


def _wait(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class RawConn(UnixHTTPConnection):
    """One kept-alive HTTP/1.1 connection, requests written by hand (pipelining too);
    the agent's one client connection class reads the responses."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), 30)
        self.connect()

    @staticmethod
    def infer_bytes(model: str, x: list[list[float]], extra: str = "") -> bytes:
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(x), len(x[0])],
                           "data": [v for row in x for v in row]}]}  # fmt: skip
        body = json.dumps(doc).encode()
        head = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nhost: x\r\n"
            f"content-type: application/json\r\n{extra}content-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def read(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = self.read_response()
        return status, headers, bytes(body)

    def infer(self, model: str, x: list[list[float]]) -> tuple[int, Any]:
        self.send(self.infer_bytes(model, x))
        status, _h, body = self.read()
        return status, json.loads(body)

    def closed_by_peer(self) -> bool:
        if self.sock is None:  # the last answer said "connection: close"
            return True
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def _answer_while(
    d: DaemonProc, conn: RawConn, row: list[float], act: Any
) -> tuple[int, dict[str, str], bytes]:
    """Send a slow tiny request on ``conn``; once it is in flight, ``act()``; the answer."""
    result: dict[str, Any] = {}

    def slow() -> None:
        conn.send(conn.infer_bytes("tiny", [row]))
        result["r"] = conn.read()

    t = threading.Thread(target=slow)
    t.start()
    _wait(lambda: _models(d)["tiny"]["inflight"] == 1, "the slow request in the worker")
    act()
    t.join(30)
    status, headers, body = result["r"]
    return status, headers, body


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    root = tmp_path_factory.mktemp("lent")
    a = tiny_model_dir(root / "src", "tiny", "1", scale=2.0, slow=True)
    b = tiny_model_dir(root / "src", "other", "1", scale=3.0)
    d = start_daemon(root / "w", [a, b])
    yield d
    d.stop()


def test_the_worker_serves_a_lent_connection_and_hands_back_what_it_does_not(
    two: DaemonProc,
) -> None:
    c = RawConn(two.infer_sock)
    try:
        assert c.infer("tiny", [[1, 2, 3, 4]]) == (200, c.infer("tiny", [[1, 2, 3, 4]])[1])
        assert _models(two)["tiny"]["lent_connections"] == 1
        # another model on the same connection: tiny's worker hands it back, the daemon
        # lends it to other's worker
        status, out = c.infer("other", [[1, 1, 1, 1]])
        assert status == 200 and out["outputs"][0]["data"] == [3, 3, 3, 3]
        assert out["model_name"] == "other"
        _wait(lambda: _models(two)["other"]["lent_connections"] == 1, "other to hold it")
        assert _models(two)["tiny"]["lent_connections"] == 0
        # a body larger than any scratch buffer after a hand-back (the worker read ahead)
        status, out = c.infer("tiny", [[1, 1, 1, 1]])
        status, out = c.infer("other", [[1, 2, 3, 4]] * 6000)
        assert status == 200 and out["outputs"][0]["data"] == [3, 6, 9, 12] * 6000
        # a metadata request is the daemon's; then tiny again, versioned this time
        c.send(b"GET /v2/models/tiny HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _h, body = c.read()
        assert status == 200 and json.loads(body)["name"] == "tiny"
        c.send(c.infer_bytes("tiny/versions/1", [[0.5, 1, 1, 1]]))
        status, _h, body = c.read()
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1, 2, 2, 2]
        # two requests in one write (pipelined): both answered, in order
        c.send(c.infer_bytes("tiny", [[1, 1, 1, 1]]) + c.infer_bytes("tiny", [[5, 5, 5, 5]]))
        first, second = c.read(), c.read()
        assert json.loads(first[2])["outputs"][0]["data"] == [2, 2, 2, 2]
        assert json.loads(second[2])["outputs"][0]["data"] == [10, 10, 10, 10]
    finally:
        c.close()
    _wait(lambda: _models(two)["tiny"]["lent_connections"] == 0, "the closed connection")


def test_errors_on_a_lent_connection_are_v2_errors_and_keep_it_usable(two: DaemonProc) -> None:
    c = RawConn(two.infer_sock)
    try:
        assert c.infer("tiny", [[1, 1, 1, 1]])[0] == 200  # now lent
        status, out = c.infer("tiny", [[1, 1, 1]])  # wrong shape
        assert status == 400 and out["code"] == "bad-shape" and "'x'" in out["error"]
        c.send(b"POST /v2/models/tiny/infer HTTP/1.1\r\ncontent-length: 5\r\n\r\n{nope")
        status, _h, body = c.read()
        assert status == 400 and json.loads(body)["code"] == "bad-json"
        status, out = c.infer("missing", [[1, 1, 1, 1]])  # not the worker's: 404 by the daemon
        assert status == 404 and out["code"] == "model-not-found"
        assert c.infer("tiny", [[2, 2, 2, 2]]) == (200, c.infer("tiny", [[2, 2, 2, 2]])[1])
        # a body over the limit: 413 and the connection closes, as the daemon does
        c.send(b"POST /v2/models/tiny/infer HTTP/1.1\r\ncontent-length: 999999999999\r\n\r\n")
        status, _h, body = c.read()
        assert status == 413 and json.loads(body)["code"] == "payload-too-large"
        assert c.closed_by_peer()
    finally:
        c.close()


def test_binary_requests_and_metrics_count_what_the_worker_answered(two: DaemonProc) -> None:
    def served() -> float:
        _s, _h, body = http_unix(two.control_sock, "GET", "/metrics")
        for line in body.decode().splitlines():
            if line.startswith("edgeward_requests_total") and 'model="other"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = served()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Client(str(two.infer_sock)) as client:
        for i in range(20):
            out = client.infer("other", {"x": x + i})
            np.testing.assert_array_equal(out["y"], (x + i) * 3)
        with pytest.raises(InvalidInputError, match="'x'"):
            client.infer("other", {"x": np.zeros((1, 4), np.float64)})
        with pytest.raises(ModelNotFoundError):
            client.infer("other", {"x": x}, version="7")
        np.testing.assert_array_equal(client.infer("other", {"x": x})["y"], x * 3)
    _wait(lambda: served() >= before + 21, "the worker's counts in /metrics")


def _worker_pid(d: DaemonProc, model: str) -> int:
    pid = _models(d)[model]["pid"]
    assert isinstance(pid, int)
    return pid


def test_kill9_of_the_worker_fails_only_the_request_in_flight(tmp_path: Path) -> None:
    src = tiny_model_dir(tmp_path / "src", "tiny", "1", slow=True)
    d = start_daemon(tmp_path / "w", [src])
    busy, idle = RawConn(d.infer_sock), RawConn(d.infer_sock)
    try:
        assert busy.infer("tiny", [[1, 1, 1, 1]])[0] == 200
        assert idle.infer("tiny", [[1, 1, 1, 1]])[0] == 200
        assert _models(d)["tiny"]["lent_connections"] == 2
        pid = _worker_pid(d, "tiny")
        status, headers, body = _answer_while(
            d, busy, [-5.0, 1, 1, 1], lambda: os.kill(pid, signal.SIGKILL)
        )
        err = json.loads(body)
        assert status == 503 and err["code"] == "worker-crashed", err
        assert "SIGKILL" in err["error"] and "request not served" in err["error"]
        assert headers["connection"] == "close" and busy.closed_by_peer()
        # the idle lent connection went back to the daemon and stays usable: 503
        # model-not-ready while the worker restarts, then answers again
        deadline = time.monotonic() + 30
        while True:
            status, out = idle.infer("tiny", [[3, 3, 3, 3]])
            if status == 200:
                break
            assert status == 503 and out["code"] == "model-not-ready", out
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert out["outputs"][0]["data"] == [6, 6, 6, 6]
        assert _worker_pid(d, "tiny") != pid
        _wait(lambda: _models(d)["tiny"]["lent_connections"] == 1, "the lent connection again")
    finally:
        busy.close()
        idle.close()
        d.stop()


def test_lending_off_relays_through_the_daemon(tmp_path: Path) -> None:
    src = tiny_model_dir(tmp_path / "src", "tiny", "1", slow=True)
    d = start_daemon(tmp_path / "w", [src], lend=False)
    c = RawConn(d.infer_sock)
    try:
        for _ in range(3):
            status, out = c.infer("tiny", [[1, 2, 3, 4]])
            assert status == 200 and out["outputs"][0]["data"] == [2, 4, 6, 8]
        assert _models(d)["tiny"]["lent_connections"] == 0
        pid = _worker_pid(d, "tiny")
        status, _h, body = _answer_while(
            d, c, [-5.0, 1, 1, 1], lambda: os.kill(pid, signal.SIGKILL)
        )
        assert status == 503 and json.loads(body)["code"] == "worker-crashed"
    finally:
        c.close()
        d.stop()


def test_sigterm_waits_for_the_answer_on_a_lent_connection(tmp_path: Path) -> None:
    src = tiny_model_dir(tmp_path / "src", "tiny", "1", slow=True)
    d = start_daemon(tmp_path / "w", [src])
    c = RawConn(d.infer_sock)
    try:
        assert c.infer("tiny", [[1, 1, 1, 1]])[0] == 200
        status, _h, body = _answer_while(
            d, c, [-1.5, 1, 1, 1], lambda: d.proc.send_signal(signal.SIGTERM)
        )
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [-3, 2, 2, 2]
        assert c.closed_by_peer()
        assert d.proc.wait(30) == 0
    finally:
        c.close()
        d.kill()


def test_worker_error_names_the_crash_for_the_client(tmp_path: Path) -> None:
    """The Python client raises WorkerError for a request cut by a worker crash."""
    src = tiny_model_dir(tmp_path / "src", "tiny", "1", slow=True)
    d = start_daemon(tmp_path / "w", [src])
    try:
        client = Client(str(d.infer_sock))
        client.infer("tiny", {"x": np.ones((1, 4), np.float32)})
        errors: list[BaseException] = []

        def slow() -> None:
            try:
                client.infer("tiny", {"x": np.full((1, 4), -5.0, np.float32)})
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=slow)
        t.start()
        _wait(lambda: _models(d)["tiny"]["inflight"] == 1, "the slow request")
        os.kill(_worker_pid(d, "tiny"), signal.SIGKILL)
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], WorkerError), errors
    finally:
        d.stop()


def test_swaps_leak_no_descriptors(tmp_path: Path) -> None:
    """Every worker's lent-connection channel and state memfd go with it."""
    src1 = tiny_model_dir(tmp_path / "src", "tiny", "1", scale=2.0)
    src2 = tiny_model_dir(tmp_path / "src", "tiny", "2", scale=3.0)
    d = start_daemon(tmp_path / "w", [src1, src2])
    c = RawConn(d.infer_sock)
    try:

        def fds() -> int:
            return len(os.listdir(f"/proc/{d.proc.pid}/fd"))

        def swap_and_check() -> None:
            before = c.infer("tiny", [[1, 1, 1, 1]])[1]["model_version"]
            assert d.cli("rollback", "tiny").returncode == 0
            _wait(lambda: c.infer("tiny", [[1, 1, 1, 1]])[1]["model_version"] != before, "swap")

        swap_and_check()
        base = fds()
        for _ in range(4):
            swap_and_check()
        assert fds() <= base + 1, (base, fds())
    finally:
        c.close()
        d.stop()


def test_worker_idles_after_a_burst(two: DaemonProc) -> None:
    """The worker polls briefly for a connection's next request (lend_spin_us) and then
    sleeps: once requests stop, its threads use no CPU, with the connection still open."""
    import psutil

    worker = psutil.Process(_worker_pid(two, "other"))
    x = np.ones((1, 4), np.float32)
    with Client(str(two.infer_sock)) as client:
        for _ in range(200):
            client.infer("other", {"x": x})
        time.sleep(0.5)  # the stats batch goes out, every spin has ended
        before = worker.cpu_times()
        time.sleep(1.0)
        after = worker.cpu_times()
        assert _models(two)["other"]["lent_connections"] == 1
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.05, f"an idle worker used {used * 1000:.0f} ms of CPU in 1 s"
