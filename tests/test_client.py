"""agent.client and ``edgeward infer`` against a real server on a real Unix socket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.client import Client
from agent.errors import InvalidInputError, ModelNotFoundError, PayloadTooLargeError
from agent.serving.http import HTTPLimits
from agent.serving.kserve import InferenceApp
from tests.test_kserve import DictRegistry, EchoModel, OrtModel, ServerThread, tiny_onnx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    d = tmp_path_factory.mktemp("client")
    reg = DictRegistry(OrtModel("tiny", "3", tiny_onnx(d / "tiny.onnx")), EchoModel())
    limits = HTTPLimits(max_body_bytes=1024 * 1024, keepalive_timeout_s=0.3)
    srv = ServerThread(d / "infer.sock", InferenceApp(reg), limits=limits)
    yield srv
    srv.close()


def _tiny_inputs(n: int = 2) -> dict[str, np.ndarray]:
    return {
        "x": np.arange(4 * n, dtype=np.float32).reshape(n, 4),
        "k": np.arange(n, dtype=np.int64),
    }


def test_two_lines_and_errors(served: ServerThread) -> None:
    out = Client(str(served.path)).infer("tiny", _tiny_inputs())
    np.testing.assert_array_equal(out["y"], _tiny_inputs()["x"] * 2 + 1)
    c = Client(str(served.path))
    with pytest.raises(ModelNotFoundError, match="nope") as ei:
        c.infer("nope", _tiny_inputs())
    assert ei.value.status == 404 and ei.value.code == "model-not-found"
    with pytest.raises(InvalidInputError, match="'x'") as e2:
        c.infer("tiny", {"x": np.zeros((2, 4), np.float64), "k": np.zeros(2, np.int64)})
    assert e2.value.code == "bad-datatype"
    with pytest.raises(PayloadTooLargeError) as e3:
        c.infer("echo", {"big": np.zeros(2 * 1024 * 1024, np.uint8)})
    assert e3.value.status == 413
    # the client recovers from the server closing the connection after the 413
    assert c.ready("tiny")


def test_keep_alive_reuse_and_reconnect(served: ServerThread) -> None:
    c = Client(str(served.path))
    c.infer("tiny", _tiny_inputs())
    first = c._conn().sock
    c.infer("tiny", _tiny_inputs())
    assert c._conn().sock is first  # same connection reused
    time.sleep(0.6)  # the server closes the idle connection (keepalive_timeout_s=0.3)
    out = c.infer("tiny", _tiny_inputs(1))  # reconnects transparently
    assert out["y"].shape == (1, 4)
    c.close()


def test_shared_between_threads(served: ServerThread) -> None:
    c = Client(str(served.path))

    def work(i: int) -> bool:
        for j in range(20):
            x = np.full((1, 4), i * 100 + j, np.float32)
            out = c.infer("tiny", {"x": x, "k": np.array([j], np.int64)})
            if not (np.array_equal(out["y"], x * 2 + 1) and out["n"][0] == j):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


def test_no_daemon_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Client(str(tmp_path / "none.sock")).health()


def test_cli_infer(
    served: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ins = _tiny_inputs(3)
    np.save(tmp_path / "x.npy", ins["x"])
    np.save(tmp_path / "k.npy", ins["k"])
    args = ["infer", "tiny", "--socket", str(served.path), "-i", f"x={tmp_path / 'x.npy'}",
            "--input", f"k={tmp_path / 'k.npy'}"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "tiny version 3" in text and "y: shape [3, 4] float32" in text
    assert main([*args, "--json", "--output-dir", str(tmp_path / "out"), "--version", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["outputs"]["y"]["data"] == (ins["x"] * 2 + 1).reshape(-1).tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "n.npy"), ins["k"])
    # failures: one line on stderr, non-zero exit
    assert (
        main(["infer", "nope", "--socket", str(served.path), "-i", f"x={tmp_path / 'x.npy'}"]) == 1
    )
    assert "[model-not-found]" in capsys.readouterr().err
    assert main(["infer", "tiny", "--socket", str(served.path), "-i", "x"]) == 2
    assert "NAME=FILE.npy" in capsys.readouterr().err
    assert main(["infer", "tiny", "--socket", str(tmp_path / "no.sock"),
                 "-i", f"x={tmp_path / 'x.npy'}"]) == 1  # fmt: skip
    assert "is the daemon" in capsys.readouterr().err


def test_cli_subprocess(served: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.array([1, 2, 3], np.int32))
    p = subprocess.run(
        [sys.executable, "-m", "agent", "infer", "echo", "--socket", str(served.path),
         "--input", f"a={tmp_path / 'a.npy'}", "--json"],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["outputs"]["a_out"] == {
        "shape": [3], "dtype": "int32", "data": [1, 2, 3]
    }  # fmt: skip


def test_no_blind_retry_on_a_fresh_connection(tmp_path: Path) -> None:
    """A server that closes a fresh connection without answering may have run the
    request: the client reports it instead of sending it again."""
    import socket
    import threading

    path = tmp_path / "rude.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen()
    accepted: list[bytes] = []

    def serve() -> None:  # answers nothing, once; a retry would hang until the timeout
        conn, _ = lsock.accept()
        accepted.append(conn.recv(65536))
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(ConnectionResetError, match="without answering"):
        Client(str(path), timeout=3).infer("m", {"x": np.zeros(1, np.float32)})
    lsock.close()
    t.join(5)
    assert len(accepted) == 1 and accepted[0].startswith(b"POST /v2/models/m/infer")
