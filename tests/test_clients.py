"""Real third-party v2 clients against a real daemon: tritonclient (HTTP over the TCP
listener and over a TCP→Unix relay, gRPC on the ``unix:`` socket), httpx with a
Unix-socket transport, requests-unixsocket and curl. Every endpoint, every datatype
(BYTES with non-ASCII text, empty strings and embedded NULs), JSON and binary form,
gzip/deflate request compression, chunked generator bodies, HEAD. Outputs are compared
with onnxruntime run in this process."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.daemon_util import DaemonProc, http_unix, run_dir, start_daemon, tiny_model_dir
from tests.text_models import TEXTS, TYPES, string_model_dir, type_inputs, types_model_dir

pytestmark = pytest.mark.e2e

CURL = shutil.which("curl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    """A TCP→Unix relay (what a container runtime's port forward would be), so
    tritonclient's HTTP client reaches the socket and its lent connections."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = int(self.lsock.getsockname()[1])
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX)
            u.connect(self.target)
            self.socks += [c, u]
            threading.Thread(target=self._pipe, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.lsock.close()
        for s in self.socks:
            s.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, int, Path]]:
    root = tmp_path_factory.mktemp("clients")
    port = _free_port()
    work = root / "w"
    grpc_sock = run_dir(work) / "grpc.sock"
    d = start_daemon(
        work,
        [
            tiny_model_dir(root / "src", "tiny", "1"),
            string_model_dir(root / "src", "text", "1"),
            types_model_dir(root / "src", "types", "1"),
        ],
        inference_extra=f'tcp_listen = "127.0.0.1:{port}"',
        extra=f'[grpc]\nenabled = true\nsocket = "{grpc_sock}"\n',
    )
    yield d, port, grpc_sock
    d.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """onnxruntime in this process on the every-type model (the expected outputs)."""
    import onnxruntime as ort

    d = types_model_dir(tmp_path_factory.mktemp("ref"))
    sess = ort.InferenceSession(str(d / "Model" / "types.onnx"))

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for dt, a in inputs.items():
            if dt == "BYTES":  # ORT takes str elements
                feed[f"in_{dt}"] = np.array([v.decode() for v in a.flat], dtype=object).reshape(
                    a.shape
                )
            else:
                feed[f"in_{dt}"] = a
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(names, feed), strict=True))
        out["out_BYTES"] = np.array([v.encode() for v in out["out_BYTES"].flat], dtype=object)
        return {k: v.reshape(inputs[k[4:]].shape) for k, v in out.items()}

    return run


def _same(got: np.ndarray, want: np.ndarray) -> None:
    if want.dtype == object:
        g = [v if isinstance(v, bytes) else str(v).encode() for v in np.asarray(got).flat]
        assert g == list(want.flat)
    else:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


# --- tritonclient ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tcp-listener", "relay"])
def triton_http(
    request: pytest.FixtureRequest, daemon: tuple[DaemonProc, int, Path]
) -> Iterator[Any]:
    import tritonclient.http as httpclient

    d, port, _ = daemon
    relay = None
    if request.param == "relay":
        relay = Relay(d.infer_sock)
        port = relay.port
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    yield client
    client.close()
    if relay is not None:
        relay.close()


@pytest.fixture(scope="module")
def triton_grpc(daemon: tuple[DaemonProc, int, Path]) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    _d, _port, sock = daemon
    client = grpcclient.InferenceServerClient(f"unix:{sock}")
    yield client
    client.close()


def test_grpc_socket_has_the_inference_socket_mode(daemon: tuple[DaemonProc, int, Path]) -> None:
    d, _port, sock = daemon
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == stat.S_IMODE(os.stat(d.infer_sock).st_mode)


def test_triton_http_endpoints(triton_http: Any) -> None:
    _endpoints(triton_http, "http")


def test_triton_grpc_endpoints(triton_grpc: Any) -> None:
    _endpoints(triton_grpc, "grpc")


def _endpoints(c: Any, kind: str) -> None:
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("tiny") and c.is_model_ready("tiny", "1")
    from tritonclient.utils import InferenceServerException

    if kind == "http":  # a version not served: 404, which the HTTP client reads as False
        assert not c.is_model_ready("tiny", "9")
    else:
        with pytest.raises(InferenceServerException):  # NOT_FOUND
            c.is_model_ready("tiny", "9")
    js = kind == "grpc"
    meta = c.get_server_metadata(as_json=True) if js else c.get_server_metadata()
    assert meta["name"] == "edgeward" and "statistics" in meta["extensions"]
    mm = c.get_model_metadata("text", as_json=True) if js else c.get_model_metadata("text")
    assert mm["inputs"][0]["datatype"] == "BYTES"
    cfg = c.get_model_config("types", as_json=True) if js else c.get_model_config("types")
    cfg = cfg.get("config", cfg)
    got_types = {i["name"]: i.get("data_type", "TYPE_INVALID") for i in cfg["input"]}
    assert got_types["in_BYTES"] == "TYPE_STRING" and got_types["in_FP16"] == "TYPE_FP16"
    idx = c.get_model_repository_index(as_json=True) if js else c.get_model_repository_index()
    idx = idx.get("models", idx) if isinstance(idx, dict) else idx
    assert sorted((m["name"], m["state"]) for m in idx) == [
        ("text", "READY"),
        ("tiny", "READY"),
        ("types", "READY"),
    ]
    c.infer("tiny", [_tiny_input(kind)])
    stats = (
        c.get_inference_statistics("tiny", as_json=True)
        if js
        else c.get_inference_statistics("tiny")
    )
    (s,) = stats["model_stats"]
    assert s["name"] == "tiny" and "inference_stats" in s
    everything = c.get_inference_statistics(as_json=True) if js else c.get_inference_statistics()
    assert {m["name"] for m in everything["model_stats"]} == {"tiny", "text", "types"}


def _tiny_input(kind: str) -> Any:
    mod = __import__(f"tritonclient.{kind}", fromlist=["InferInput"])
    x = mod.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    return x


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_tritonclient_http_every_datatype(
    triton_http: Any, reference: Any, binary: bool, compression: str | None
) -> None:
    import tritonclient.http as httpclient

    data = type_inputs()
    inputs = []
    for dt, arr in data.items():
        i = httpclient.InferInput(f"in_{dt}", list(arr.shape), dt)
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    outputs = [httpclient.InferRequestedOutput(f"out_{dt}", binary_data=binary) for dt in TYPES]
    res = triton_http.infer(
        "types", inputs, outputs=outputs, request_compression_algorithm=compression
    )
    want = reference(data)
    for dt in TYPES:
        _same(res.as_numpy(f"out_{dt}"), want[f"out_{dt}"])


def test_tritonclient_grpc_every_datatype(triton_grpc: Any, reference: Any) -> None:
    import tritonclient.grpc as grpcclient

    data = type_inputs()
    inputs = []
    for dt, arr in data.items():
        i = grpcclient.InferInput(f"in_{dt}", list(arr.shape), dt)
        i.set_data_from_numpy(arr)  # raw_input_contents
        inputs.append(i)
    res = triton_grpc.infer("types", inputs, request_id="r-1")
    assert res.get_response().id == "r-1"
    want = reference(data)
    for dt in TYPES:
        _same(res.as_numpy(f"out_{dt}"), want[f"out_{dt}"])


def test_grpc_typed_contents(triton_grpc: Any) -> None:
    """Other gRPC clients fill the typed ``contents`` fields instead of raw bytes (all
    inputs of a request one way or the other, as the protocol says)."""
    import tritonclient.grpc as grpcclient

    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x._get_tensor().contents.fp32_contents.extend([1, 2, 3, 4])
    assert triton_grpc.infer("tiny", [x]).as_numpy("y").tolist() == [[2.0, 4.0, 6.0, 8.0]]
    s = grpcclient.InferInput("s", [len(TEXTS)], "BYTES")
    s._get_tensor().contents.bytes_contents.extend(t.encode() for t in TEXTS)
    got = triton_grpc.infer("text", [s]).as_numpy("y")
    assert got.tolist() == [t.encode() for t in TEXTS]


def test_grpc_errors_keep_their_meaning(triton_grpc: Any) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as ei:
        triton_grpc.get_model_metadata("nope")
    assert "NOT_FOUND" in str(ei.value.status()) and "model-not-found" in ei.value.message()
    bad = grpcclient.InferInput("x", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as ei:
        triton_grpc.infer("tiny", [bad])
    assert "INVALID_ARGUMENT" in str(ei.value.status())
    s = grpcclient.InferInput("s", [2], "BYTES")
    s.set_data_from_numpy(np.array([b"ok", b"\xff"], dtype=object))
    with pytest.raises(InferenceServerException) as ei:
        triton_grpc.infer("text", [s])
    assert "not-utf8" in ei.value.message()
    # and the model keeps serving
    assert triton_grpc.infer("tiny", [_tiny_input("grpc")]).as_numpy("y").tolist() == [
        [2.0, 4.0, 6.0, 8.0]
    ]


# --- httpx and requests-unixsocket ------------------------------------------------------


def _json_doc() -> dict[str, Any]:
    return {"inputs": [{"name": "s", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}


def test_httpx_over_the_unix_socket(daemon: tuple[DaemonProc, int, Path]) -> None:
    import httpx

    d, _port, _g = daemon
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.infer_sock))) as c:
        base = "http://localhost"
        for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/text",
                     "/v2/models/text/ready", "/v2/models/text/config", "/v2/models/text/stats",
                     "/v2/models/stats"):  # fmt: skip
            assert c.get(base + path).status_code == 200, path
            h = c.head(base + path)
            assert (
                h.status_code == 200 and h.content == b"" and int(h.headers["content-length"]) > 0
            )
        assert [m["name"] for m in c.post(base + "/v2/repository/index").json()] == [
            "text",
            "tiny",
            "types",
        ]
        body = json.dumps(_json_doc()).encode()

        def gen() -> Iterator[bytes]:  # a generator body goes out chunked
            for i in range(0, len(body), 7):
                yield body[i : i + 7]

        r = c.post(base + "/v2/models/text/infer", content=gen())
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == TEXTS
        r = c.post(
            base + "/v2/models/text/infer",
            content=gzip.compress(body),
            headers={"content-encoding": "gzip"},
        )
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == TEXTS


def test_requests_unixsocket(daemon: tuple[DaemonProc, int, Path]) -> None:
    import requests_unixsocket

    d, _port, _g = daemon
    base = "http+unix://" + urllib.parse.quote(str(d.infer_sock), safe="")
    with requests_unixsocket.Session() as s:
        assert s.get(base + "/v2/health/ready").json() == {"ready": True}
        assert s.head(base + "/v2/models/tiny").status_code == 200
        body = json.dumps(_json_doc()).encode()
        r = s.post(base + "/v2/models/text/infer", data=iter([body[:10], body[10:]]))
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == TEXTS
        tiny = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
        }
        for _ in range(3):  # kept alive: lent to the worker after the first
            r = s.post(base + "/v2/models/tiny/infer", data=iter([json.dumps(tiny).encode()]))
            assert r.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]


# --- curl --------------------------------------------------------------------------------


def _curl(sock: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "-sS", "--unix-socket", str(sock), *args],
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_curl(daemon: tuple[DaemonProc, int, Path], tmp_path: Path) -> None:
    if CURL is None:
        pytest.fail("curl is not installed (CI installs it)")
    d, port, _g = daemon
    r = _curl(d.infer_sock, "-I", "http://localhost/v2/models/tiny")
    assert r.stdout.startswith(b"HTTP/1.1 200") and b"content-length:" in r.stdout.lower()
    body = json.dumps(_json_doc()).encode()
    (tmp_path / "b.json").write_bytes(body)
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(body))
    url = "http://localhost/v2/models/text/infer"
    for extra in (
        ["--data-binary", "@" + str(tmp_path / "b.json")],
        ["-H", "Content-Encoding: gzip", "--data-binary", "@" + str(tmp_path / "b.json.gz")],
        ["-H", "Transfer-Encoding: chunked", "--data-binary", "@" + str(tmp_path / "b.json")],
    ):
        r = _curl(d.infer_sock, *extra, url)
        assert json.loads(r.stdout)["outputs"][0]["data"] == TEXTS, (extra, r.stdout)
    # the TCP listener answers the same
    r = subprocess.run(
        [CURL, "-sS", f"http://127.0.0.1:{port}/v2/health/live"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert json.loads(r.stdout) == {"live": True}
    # the inference socket lists the models (the repository index), no admin needed
    r = _curl(d.infer_sock, "-X", "POST", "http://localhost/v2/repository/index")
    assert {m["name"] for m in json.loads(r.stdout)} == {"tiny", "text", "types"}


def test_chunked_and_gzip_on_a_lent_connection(daemon: tuple[DaemonProc, int, Path]) -> None:
    """The worker's own reader (agent/serving/direct.py) decodes chunked and gzip bodies with
    agent/serving/httpbody.py: chunk lines split across reads, a body bigger than its buffer."""
    d, _port, _g = daemon
    texts = [f"wörd {i}\x00" for i in range(3000)]
    doc = {"inputs": [{"name": "s", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    body = json.dumps(doc).encode()
    stream = b"".join(  # 300-byte chunks: smaller ones, many, are refused (test_body_limits)
        b"%x\r\n%s\r\n" % (len(body[i : i + 300]), body[i : i + 300])
        for i in range(0, len(body), 300)
    )
    stream += b"0\r\n\r\n"
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(d.infer_sock))
    buf = bytearray()

    def answer() -> Any:
        while True:
            head, sep, rest = bytes(buf).partition(b"\r\n\r\n")
            if sep:
                n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(rest) >= n:
                    del buf[: len(head) + 4 + n]
                    return json.loads(rest[:n])
            buf.extend(s.recv(65536))

    tiny = json.dumps(
        {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    ).encode()
    s.sendall(
        b"POST /v2/models/text/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(tiny), tiny)
    )
    assert answer()["outputs"][0]["data"] == ["x"]  # the connection is now lent
    s.sendall(b"POST /v2/models/text/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(stream), 50_001):  # cut inside chunk-size lines
        s.sendall(stream[i : i + 50_001])
    assert answer()["outputs"][0]["data"] == texts
    z = gzip.compress(body)
    s.sendall(
        b"POST /v2/models/text/infer HTTP/1.1\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(z) + z
    )
    assert answer()["outputs"][0]["data"] == texts
    _s, _h, raw = http_unix(d.control_sock, "GET", "/models")
    (text,) = [m for m in json.loads(raw)["models"] if m["name"] == "text"]
    assert text["lent_connections"] >= 1  # it was the worker that read those bodies
    s.close()


def test_grpc_concurrent_and_compressed_calls(triton_grpc: Any) -> None:
    """Calls that overlap on one channel (one HTTP/2 connection) are each answered with
    their own result; gzip and deflate request messages are inflated."""
    import queue

    import tritonclient.grpc as grpcclient

    done: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    for i in range(12):
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.full((1, 4), i, np.float32))
        triton_grpc.async_infer(
            "tiny",
            [x],
            callback=lambda result, error, i=i: done.put((i, result, error)),
            client_timeout=60,
        )
    got = {}
    for _ in range(12):
        i, r, e = done.get(timeout=120)
        assert e is None, e
        got[i] = r.as_numpy("y").tolist()
    assert got == {i: [[2.0 * i] * 4] for i in range(12)}
    for algo in ("gzip", "deflate"):
        res = triton_grpc.infer("tiny", [_tiny_input("grpc")], compression_algorithm=algo)
        assert res.as_numpy("y").tolist() == [[2.0, 4.0, 6.0, 8.0]]
