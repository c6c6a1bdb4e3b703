"""KServe v2 data plane + HTTP adapter over real Unix sockets and a real onnxruntime
model; the in-test registry and server thread are reused by the http/client tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import Client
from agent.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    OverloadedError,
)
from agent.serving.kserve import InferenceApp
from tests.helpers import (
    DictRegistry,
    EchoModel,
    OrtModel,
    ServerThread,
    body_of,
    raw,
    status_of,
    tiny_onnx,
)

# --- test doubles over real parts ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture
def stack(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[ServerThread, DictRegistry]]:
    reg = DictRegistry(OrtModel("tiny", "1", tiny_model), EchoModel())
    app = InferenceApp(reg, max_concurrent_per_model=2, max_queue_per_model=2)
    srv = ServerThread(tmp_path / "infer.sock", app)
    yield srv, reg
    srv.close()


# --- endpoints -------------------------------------------------------------------------


def test_health_and_metadata(stack: tuple[ServerThread, DictRegistry]) -> None:
    srv, reg = stack
    c = Client(str(srv.path))
    assert c.health() == {"live": True, "ready": True}
    meta = c.server_metadata()
    assert meta["name"] == "edgeward" and "binary_tensor_data" in meta["extensions"]
    m = c.metadata("tiny")
    assert m["name"] == "tiny" and m["versions"] == ["1"]
    assert [i["name"] for i in m["inputs"]] == ["x", "k"]
    assert c.metadata("tiny", version="1")["platform"] == "onnxruntime"
    assert c.ready("tiny") and c.ready("tiny", "1")
    reg.routes["tiny"].ready = False
    assert not c.ready("tiny")
    assert c.health() == {"live": True, "ready": False}
    with pytest.raises(ModelNotReadyError):
        c.infer("tiny", {"x": np.zeros((1, 4), np.float32), "k": np.zeros(1, np.int64)})
    with pytest.raises(ModelNotFoundError):
        c.metadata("nope")
    with pytest.raises(ModelNotFoundError):
        c.ready("tiny", "2")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_real_model(stack: tuple[ServerThread, DictRegistry], binary: bool) -> None:
    srv, reg = stack
    c = Client(str(srv.path), binary=binary)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    k = np.array([5, -6, 7], np.int64)
    doc, out = c.infer_full(
        "tiny", {"x": x, "k": k}, request_id="req-1", parameters={"temperature": 0.5}
    )
    assert doc["id"] == "req-1" and doc["model_name"] == "tiny" and doc["model_version"] == "1"
    np.testing.assert_array_equal(out["y"], x * 2 + 1)
    np.testing.assert_array_equal(out["n"], k)
    assert out["y"].dtype == np.float32 and out["n"].dtype == np.int64
    assert reg.routes["tiny"].parameters[-1]["temperature"] == 0.5
    # outputs selection
    only = c.infer("tiny", {"x": x, "k": k}, outputs=["n"], version="1")
    assert list(only) == ["n"]
    with pytest.raises(InvalidInputError, match="'zz'"):
        c.infer("tiny", {"x": x, "k": k}, outputs=["zz"])


DTYPES = [
    np.bool_,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
]


@pytest.mark.parametrize("binary", [True, False])
def test_all_dtypes_round_trip(stack: tuple[ServerThread, DictRegistry], binary: bool) -> None:
    srv, _ = stack
    c = Client(str(srv.path), binary=binary)
    rng = np.random.default_rng(0)
    inputs = {}
    for dt in DTYPES:
        a = rng.integers(0, 100, size=(2, 3)).astype(dt)
        if dt == np.bool_:
            a = rng.integers(0, 2, size=(2, 3)).astype(bool)
        inputs[np.dtype(dt).name] = a
    inputs["scalar"] = np.array(3.5, np.float32)
    inputs["empty"] = np.zeros((0, 3), np.int16)
    inputs["text"] = np.array([b"hello", "wörld".encode(), b""], dtype=object)
    out = c.infer("echo", inputs)
    for name, a in inputs.items():
        got = out[f"{name}_out"]
        assert got.shape == a.shape, name
        if a.dtype == object:
            assert list(got) == list(a)
        else:
            assert got.dtype == a.dtype, name
            np.testing.assert_array_equal(got, a)


def test_json_floats_round_trip_bit_exact(stack: tuple[ServerThread, DictRegistry]) -> None:
    """JSON tensors write FP32/FP16 with 9/5 significant digits: still bit-exact, both
    ways, over the whole range (subnormals, max, tiny), and -0.0/NaN/inf keep JSON's
    spelling."""
    srv, _ = stack
    c = Client(str(srv.path), binary=False)
    rng = np.random.default_rng(3)
    inputs: dict[str, np.ndarray] = {}
    for dt in (np.float32, np.float16, np.float64):
        fi = np.finfo(dt)
        with np.errstate(over="ignore"):
            a = (rng.standard_normal(400) * 10.0 ** rng.integers(-45, 39, 400)).astype(dt)
        a = np.where(np.isfinite(a) & (a != 0), a, fi.max).astype(dt)  # the fast path
        a[:3] = [fi.max, fi.tiny, fi.smallest_subnormal]
        inputs[np.dtype(dt).name] = a.reshape(20, 20)
    inputs["special"] = np.array([1.5, -0.0, np.nan, np.inf, -np.inf], np.float32)
    out = c.infer("echo", inputs)
    for name, a in inputs.items():
        got = out[f"{name}_out"]
        assert got.dtype == a.dtype and got.shape == a.shape, name
        assert got.tobytes() == a.tobytes(), name
    # whole values stay float literals ("2.0", not "2"), as json.dumps writes them
    from agent.serving.tensors import encode_request

    parts, _ = encode_request({"w": np.array([2.0, 0.0, -7.0, 0.5], np.float32)}, binary=False)
    data = json.loads(b"".join(parts))["inputs"][0]["data"]
    assert data == [2.0, 0.0, -7.0, 0.5] and all(isinstance(v, float) for v in data)


def test_curl_endpoints(stack: tuple[ServerThread, DictRegistry]) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is required"
    srv, _ = stack

    def run(*args: str) -> tuple[int, Any]:
        p = subprocess.run(
            [curl, "-sS", "--unix-socket", str(srv.path), "-w", "\n%{http_code}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        body, _, code = p.stdout.rpartition("\n")
        return int(code), json.loads(body)

    assert run("http://localhost/v2/health/ready") == (200, {"ready": True})
    code, meta = run("http://localhost/v2")
    assert code == 200 and meta["extensions"][0] == "binary_tensor_data"
    req = {
        "id": "c1",
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]},
            {"name": "k", "shape": [1], "datatype": "INT64", "data": [9]},
        ],
    }
    code, doc = run(
        "-H", "Content-Type: application/json", "-d", json.dumps(req),
        "http://localhost/v2/models/tiny/infer",
    )  # fmt: skip
    assert code == 200 and doc["id"] == "c1"
    assert doc["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [1, 4],
                                 "data": [3.0, 5.0, 7.0, 9.0]}  # fmt: skip
    code, err = run("http://localhost/v2/models/nope/ready")
    assert code == 404 and err["code"] == "model-not-found"


# --- errors ----------------------------------------------------------------------------


def _post(path: Path, url: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    return raw(path, head + body)


def _tiny_req(**over: Any) -> dict[str, Any]:
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    x.update(over)
    return {"inputs": [x, {"name": "k", "shape": [1], "datatype": "INT64", "data": [1]}]}


@pytest.mark.parametrize(
    ("url", "body", "status", "code", "needle"),
    [
        ("/v2/models/tiny/infer", b"{not json", 400, "bad-json", "JSON"),
        ("/v2/models/tiny/infer", b"[1]", 400, "bad-json", "object"),
        ("/v2/models/tiny/infer", b'{"inputs": []}', 400, "bad-json", "inputs"),
        ("/v2/models/nope/infer", b"{}", 404, "model-not-found", "nope"),
        ("/v2/models/tiny/versions/9/infer", b"{}", 404, "model-not-found", "'9'"),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(shape=[1, 5])).encode(), 400,
         "bad-shape", "'x'"),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(shape=[2, 4], data=[0] * 8)).encode(),
         200, "", ""),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(shape=[4], data=[0] * 4)).encode(), 400,
         "bad-shape", "'x'"),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(datatype="FP64")).encode(), 400,
         "bad-datatype", "'x'"),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(datatype="FP99")).encode(), 400,
         "bad-datatype", "'x'"),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(name="q")).encode(), 400,
         "unknown-input", "'q'"),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(data=[[1, 2], [3]])).encode(), 400,
         "bad-tensor", "'x'"),
        ("/v2/models/tiny/infer", json.dumps(_tiny_req(data=["a"] * 4)).encode(), 400,
         "bad-tensor", "'x'"),
        ("/v2/nothing", b"", 404, "not-found", "/v2/nothing"),
        ("/v2/models/tiny/explode", b"", 404, "not-found", "explode"),
        ("/v2/health/ready", b"", 405, "method-not-allowed", "GET"),
        ("/v2/models/tiny", b"", 405, "method-not-allowed", "GET"),
    ],
)  # fmt: skip
def test_error_statuses(
    stack: tuple[ServerThread, DictRegistry],
    url: str,
    body: bytes,
    status: int,
    code: str,
    needle: str,
) -> None:
    srv, _ = stack
    resp = _post(srv.path, url, body)
    assert status_of(resp) == status, resp
    doc = body_of(resp)
    if status != 200:
        assert doc["code"] == code and needle in doc["error"], doc
        assert b"content-type: application/json" in resp.lower()
    if status == 405:
        assert b"allow: GET" in resp


def test_binary_header_errors(stack: tuple[ServerThread, DictRegistry]) -> None:
    srv, _ = stack
    head = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                     "parameters": {"binary_data_size": 16}},
                    {"name": "k", "shape": [1], "datatype": "INT64", "data": [1]}]}
    ).encode()  # fmt: skip
    good = head + np.ones(4, np.float32).tobytes()
    hl = f"Inference-Header-Content-Length: {len(head)}\r\n"
    assert status_of(_post(srv.path, "/v2/models/tiny/infer", good, hl)) == 200
    short = head + np.ones(3, np.float32).tobytes()
    doc = body_of(_post(srv.path, "/v2/models/tiny/infer", short, hl))
    assert "'x'" in doc["error"] and doc["code"] == "bad-tensor"
    extra = good + b"zz"
    assert body_of(_post(srv.path, "/v2/models/tiny/infer", extra, hl))["code"] == "bad-tensor"
    bad_hl = "Inference-Header-Content-Length: 99999\r\n"
    doc = body_of(_post(srv.path, "/v2/models/tiny/infer", good, bad_hl))
    assert doc["code"] == "bad-header-length"
    for bad in ("x", "\xb2"):  # latin-1 superscript two: isdigit() but not a number
        hdr = f"Inference-Header-Content-Length: {bad}\r\n"
        doc = body_of(_post(srv.path, "/v2/models/tiny/infer", good, hdr))
        assert doc["code"] == "bad-header-length"


def test_overload_gives_503_retry_after(stack: tuple[ServerThread, DictRegistry]) -> None:
    srv, reg = stack
    echo = reg.routes["echo"]
    echo.gate = srv.call(_make_event())
    c = Client(str(srv.path))
    x = {"a": np.zeros(2, np.float32)}
    # limit 2 running + 2 queued: the 5th and 6th requests overflow.
    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(c.infer, "echo", x) for _ in range(4)]
        assert echo.started.wait(10)
        gates = srv.server.handler.plane._gates  # type: ignore[attr-defined]
        for _ in range(1000):  # wait until 2 run and 2 wait: the queue is full
            if echo.running == 2 and "echo" in gates and len(gates["echo"].waiters) == 2:
                break
            threading.Event().wait(0.01)
        assert echo.running == 2 and len(gates["echo"].waiters) == 2
        with pytest.raises(OverloadedError) as ei:
            c.infer("echo", x)
        assert ei.value.retry_after >= 1
        resp = _post(
            srv.path,
            "/v2/models/echo/infer",
            json.dumps(
                {"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}
            ).encode(),
        )
        assert status_of(resp) == 503 and b"retry-after: 1" in resp.lower()
        srv.loop.call_soon_threadsafe(echo.gate.set)
        for f in futs:  # every queued request is served once the model frees up
            np.testing.assert_array_equal(f.result(10)["a_out"], x["a"])


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


def test_large_tensors_round_trip(stack: tuple[ServerThread, DictRegistry]) -> None:
    srv, _ = stack
    big = np.random.default_rng(3).standard_normal((2, 1024, 1024)).astype(np.float32)  # 8 MiB
    c = Client(str(srv.path))
    out = c.infer("echo", {"big": big, "small": np.arange(3, dtype=np.int8)})
    np.testing.assert_array_equal(out["big_out"], big)
    assert out["big_out"].flags.writeable
    np.testing.assert_array_equal(out["small_out"], np.arange(3, dtype=np.int8))
    # a slow reader: the server waits for the socket to drain and then serves again
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(srv.path))
    from agent.serving.tensors import encode_request

    parts, hl = encode_request({"big": big})
    body = b"".join(parts)
    head = (
        f"POST /v2/models/echo/infer HTTP/1.1\r\nInference-Header-Content-Length: {hl}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    s.sendall(head + body + b"GET /v2/health/live HTTP/1.1\r\n\r\n")
    threading.Event().wait(0.2)
    got = b""
    while b'{"live":true}' not in got[-64:]:
        chunk = s.recv(1 << 20)
        assert chunk
        got += chunk
    assert got.startswith(b"HTTP/1.1 200 OK") and len(got) > big.nbytes
    s.close()
