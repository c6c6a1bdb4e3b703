"""Helpers shared by several test modules (servers, toy models, packages, daemons).

One module, so no test module imports another.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
import onnxruntime as ort

from agent.config import parse_config
from agent.errors import ModelNotFoundError, RuntimeBackendError
from agent.residual import quant
from agent.residual.layout import scan
from agent.serving.http import HTTPLimits, Request, Response, UnixHTTPServer
from agent.serving.registry import ModelRegistry, WorkerLike
from agent.serving.worker import ModelWorker
from agent.store import Store
from agent.updater import Updater
from runtime import RuntimeConfig
from tests.emulation import scaled

# --- from test_daemon_updater.py ---------------------------------------------------


def updater_setup(tmp_path: Path, trust: Path, fail: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    cfg = parse_config(
        {
            "paths": {
                "state_dir": str(tmp_path / "state"),
                "inbox_dir": str(tmp_path / "inbox"),
                "trust_dir": str(trust),
            },
            "daemon": {"drain_timeout": 1.0},
        }
    )
    (tmp_path / "inbox").mkdir(exist_ok=True)
    store = Store(cfg.paths.state_dir).open()
    made: list[StandInWorker] = []

    def factory(name: str, version: str, model_dir: Path) -> WorkerLike:
        assert (model_dir / "Model").is_dir()  # a complete unpacked version
        w = StandInWorker(name, version, model_dir, fail=(fail or {}).get(version, ""))
        made.append(w)
        return w

    reg = ModelRegistry(factory)
    return cfg, store, reg, Updater(cfg, store, reg), made


def drop_in_inbox(tmp_path: Path, pkg: Path) -> None:
    (tmp_path / "inbox" / pkg.name).write_bytes(pkg.read_bytes())


# --- from test_http.py -------------------------------------------------------------


class Echo:
    """Answers with what it saw; ``/slow`` waits for ``release`` (set from the test)."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    async def __call__(self, req: Request) -> Response:
        self.seen.append(req)
        if req.path == "/slow":
            self.entered.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        if req.path == "/boom":
            raise RuntimeError("bug")
        doc = {
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "len": len(req.body),
            "sum": sum(req.body[:1000]),
            "peer": None if req.peer_cred is None else req.peer_cred.pid,
        }
        return Response(200, {"content-type": "application/json"}, json.dumps(doc).encode())


def unix_conn(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(scaled(5))
    s.connect(str(path))
    return s


def read_response(s: socket.socket, buf: bytearray) -> bytes:
    """Read one full response from ``s`` (leftover bytes stay in ``buf``)."""
    while True:
        head, sep, rest = bytes(buf).partition(b"\r\n\r\n")
        if sep:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.lower() == b"content-length":
                    length = int(v)
            if len(rest) >= length:
                total = len(head) + 4 + length
                out = bytes(buf[:total])
                del buf[:total]
                return out
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed with {bytes(buf)!r}")
        buf += chunk


# --- from test_kserve.py -----------------------------------------------------------


def tiny_onnx(path: Path, width: int = 4) -> Path:
    """y = x * 2 + 1 (FP32 [-1, width]); n = argmax-free int64 passthrough of k."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, ["N"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
        helper.make_node("Identity", ["k"], ["n"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [x, k], [y, n], initializer=[two, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


_V2 = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}


class OrtModel:
    """A ServedModel over an in-process onnxruntime session."""

    def __init__(self, name: str, version: str, path: Path) -> None:

        self.name = name
        self.version = version
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.ready = True
        self.parameters: list[dict[str, Any]] = []

    def metadata(self) -> dict[str, Any]:
        def spec(t: Any) -> dict[str, Any]:
            shape = [d if isinstance(d, int) else -1 for d in t.shape]
            return {"name": t.name, "datatype": _V2[t.type], "shape": shape}

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime",
            "inputs": [spec(t) for t in self.sess.get_inputs()],
            "outputs": [spec(t) for t in self.sess.get_outputs()],
        }

    def lender(self) -> None:  # every request is answered by the server
        return None

    async def infer(self, inputs: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        self.parameters.append(parameters)
        return dict(zip(self.out_names, self.sess.run(None, inputs), strict=True))


class EchoModel:
    """Returns every input as ``<name>_out``; no input metadata (any dtype passes)."""

    def __init__(self, name: str = "echo", version: str = "1") -> None:
        self.name = name
        self.version = version
        self.ready = True
        self.gate: asyncio.Event | None = None
        self.started = threading.Event()
        self.running = 0

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": "echo"}

    def lender(self) -> None:  # every request is answered by the server
        return None

    async def infer(self, inputs: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        self.running += 1
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if parameters.get("sleep"):
                await asyncio.sleep(float(parameters["sleep"]))
            return {f"{k}_out": v for k, v in inputs.items()}
        finally:
            self.running -= 1


class DictRegistry:
    def __init__(self, *models: Any) -> None:
        self.routes = {m.name: m for m in models}

    def models(self) -> list[Any]:
        return list(self.routes.values())

    def get(self, name: str, version: str | None = None) -> Any:
        m = self.routes.get(name)
        if m is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        if version is not None and version != m.version:
            raise ModelNotFoundError(f"model {name!r} version {version!r} is not served")
        return m


class ServerThread:
    """A UnixHTTPServer running on its own event loop in a background thread."""

    def __init__(
        self,
        path: Path,
        handler: Callable[[Request], Any],
        *,
        limits: HTTPLimits | None = None,
        mode: int = 0o660,
        group: str | None = None,
    ) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = UnixHTTPServer(
            path, handler, limits=limits or HTTPLimits(), mode=mode, group=group
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self, drain: float = 5.0) -> None:
        try:
            self.call(self.server.close(drain))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def raw(path: Path, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send bytes, read until the server closes or a full response is in."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    s.sendall(data)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if _complete(out):
                break
    finally:
        s.close()
    return out


def _complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v)
    return True


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def body_of(resp: bytes) -> Any:
    return json.loads(resp.partition(b"\r\n\r\n")[2])


# --- from test_registry.py ---------------------------------------------------------


class StandInWorker:
    def __init__(self, name: str, version: str, model_dir: Path, *, fail: str = "") -> None:
        self.name, self.version, self.model_dir = name, version, model_dir
        self.state = "new"
        self.pid: int | None = None
        self.fail = fail
        self.served = 0
        self.lending = None  # every request is relayed (no LendingWorker)

    def start(self, timeout: float = 120.0) -> None:
        if self.fail == "start":
            raise RuntimeBackendError("cannot load", code="backend")
        self.state, self.pid = "ready", 1234

    async def apredict(self, inputs: Any, timeout: float | None = None) -> Any:
        if self.state != "ready":
            raise RuntimeBackendError(f"worker {self.version} is {self.state}", code="worker")
        await asyncio.sleep(0.002)
        if self.state != "ready":
            raise RuntimeBackendError("stopped mid-request", code="worker")
        self.served += 1
        return {"y": self.version}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "platform": "stand-in", "inputs": [], "outputs": []}

    def self_test(self) -> None:
        if self.fail == "self_test":
            raise RuntimeBackendError("sample mismatch", code="self-test")

    def stop(self, drain_timeout: float = 10.0) -> None:
        self.state = "stopped"

    def rss_bytes(self) -> int:
        return 1000

    def stats(self) -> dict[str, Any]:
        return {"restarts": 0}


# --- from test_residual_tflite.py --------------------------------------------------


def perturb(src: Path, dst: Path, scale: float, seed: int) -> Path:
    """Copy with every float weight buffer (≥ 16 values) nudged in place."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    for h in scan(src).holes:
        if h.dtype not in (quant.F32, quant.F16) or h.nbytes < 64:
            continue
        dt = "<f4" if h.dtype == quant.F32 else "<f2"
        a = np.frombuffer(data, dt, h.nbytes // np.dtype(dt).itemsize, h.offset).astype(np.float32)
        a += rng.normal(0, 1, a.shape).astype(np.float32) * np.float32(scale * np.abs(a).mean())
        data[h.offset : h.offset + h.nbytes] = a.astype(dt).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _vec(b: flatbuffers.Builder, items: list[Any], kind: str) -> int:
    if kind == "table":
        b.StartVector(4, len(items), 4)
        for x in reversed(items):
            b.PrependUOffsetTRelative(x)
        return int(b.EndVector())
    fmt = {
        "i32": b.PrependInt32,
        "u8": b.PrependUint8,
        "f32": b.PrependFloat32,
        "i64": b.PrependInt64,
    }[kind]
    size = {"i32": 4, "u8": 1, "f32": 4, "i64": 8}[kind]
    b.StartVector(size, len(items), max(size, 4) if kind == "u8" else size)
    for x in reversed(items):
        fmt(x)
    return int(b.EndVector())


def build_fc_int8(
    w: np.ndarray[Any, Any], bias: np.ndarray[Any, Any], path: Path, *, external: bool = False
) -> Path:
    """Int8 FULLY_CONNECTED x int8 [1,K] → y int8 [1,N] with int8 weights [N,K] and an
    int32 bias; ``external`` puts the payloads after the flatbuffer (offset/size)."""
    if not external:
        path.write_bytes(_build(w, bias, None))
        return path
    payloads = [w.astype(np.int8).tobytes(), bias.astype("<i4").tobytes()]
    size = len(_build(w, bias, [(1 << 40, 1)] * 2))
    offs, pos = [], -(-size // 64) * 64
    for p in payloads:
        offs.append((pos, len(p)))
        pos = -(-(pos + len(p)) // 64) * 64
    fb = _build(w, bias, offs)
    assert len(fb) == size
    out = bytearray(fb)
    for (o, _n), p in zip(offs, payloads, strict=True):
        out += bytes(o - len(out))
        out += p
    path.write_bytes(bytes(out))
    return path


def _build(
    w: np.ndarray[Any, Any], bias: np.ndarray[Any, Any], offsets: list[tuple[int, int]] | None
) -> bytes:
    """The flatbuffer; payloads inline, or at the given (offset, size) after it."""
    n, k = w.shape
    b = flatbuffers.Builder(1024)
    payloads = [b"", w.astype(np.int8).tobytes(), bias.astype("<i4").tobytes()]
    bufs = []
    for i, p in enumerate(payloads):
        if p and offsets is None:
            b.StartVector(1, len(p), 16)
            for byte in reversed(p):
                b.PrependUint8(byte)
            data = b.EndVector()
        else:
            data = None
        b.StartObject(3)
        if data is not None:
            b.PrependUOffsetTRelativeSlot(0, data, 0)
        if offsets is not None and i:
            b.ForceDefaults(True)
            b.PrependUint64Slot(1, offsets[i - 1][0], 0)
            b.PrependUint64Slot(2, offsets[i - 1][1], 0)
            b.ForceDefaults(False)
        bufs.append(b.EndObject())
    # tensors: 0 x, 1 w, 2 bias, 3 y
    specs = [
        ("x", [1, k], 9, 0, 0.05, 0),
        ("w", [n, k], 9, 1, 0.01, 0),
        ("bias", [n], 2, 2, 0.0005, 0),
        ("y", [1, n], 9, 0, 0.1, 3),
    ]
    tensors = []
    for name, shape, ttype, buf, scale, zp in specs:
        nm = b.CreateString(name)
        sh = _vec(b, shape, "i32")
        sc = _vec(b, [scale], "f32")
        zpv = _vec(b, [zp], "i64")
        b.StartObject(7)
        b.PrependUOffsetTRelativeSlot(2, sc, 0)
        b.PrependUOffsetTRelativeSlot(3, zpv, 0)
        q = b.EndObject()
        b.StartObject(8)
        b.PrependUOffsetTRelativeSlot(0, sh, 0)
        b.PrependInt8Slot(1, ttype, 0)
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, nm, 0)
        b.PrependUOffsetTRelativeSlot(4, q, 0)
        tensors.append(b.EndObject())
    tv = _vec(b, tensors, "table")
    ins = _vec(b, [0, 1, 2], "i32")
    outs = _vec(b, [3], "i32")
    b.StartObject(10)
    b.PrependUint32Slot(0, 0, 0)
    b.PrependUOffsetTRelativeSlot(1, ins, 0)
    b.PrependUOffsetTRelativeSlot(2, outs, 0)
    op = b.EndObject()
    opv = _vec(b, [op], "table")
    gi = _vec(b, [0], "i32")
    go = _vec(b, [3], "i32")
    name = b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tv, 0)
    b.PrependUOffsetTRelativeSlot(1, gi, 0)
    b.PrependUOffsetTRelativeSlot(2, go, 0)
    b.PrependUOffsetTRelativeSlot(3, opv, 0)
    b.PrependUOffsetTRelativeSlot(4, name, 0)
    sg = b.EndObject()
    sgv = _vec(b, [sg], "table")
    b.StartObject(4)
    b.PrependInt8Slot(0, 9, 0)  # deprecated_builtin_code FULLY_CONNECTED
    b.PrependInt32Slot(2, 1, 1)
    b.PrependInt32Slot(3, 9, 0)
    oc = b.EndObject()
    ocv = _vec(b, [oc], "table")
    bv = _vec(b, bufs, "table")
    desc = b.CreateString("edgeward test int8 fc")
    b.StartObject(8)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, ocv, 0)
    b.PrependUOffsetTRelativeSlot(2, sgv, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, bv, 0)
    model = b.EndObject()
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


# --- from test_runtime_loader.py ---------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent


# the ppocr_cls model's input and output (runtime loader and converter tests)
CLS_X = np.random.default_rng(7).random((1, 3, 48, 192), dtype=np.float32)
CLS_OUT = "save_infer_model/scale_0.tmp_1"
EXAMPLE_PROGRAM = ROOT / "agent" / "examples" / "ppocr-det" / "Program"


def make_package(
    root: Path,
    model: Path,
    *,
    name: str = "m",
    version: str = "1",
    backend: str | None = None,
    entry: str | None = None,
    runtime_config: dict[str, Any] | None = None,
    converter_config: dict[str, Any] | None = None,
    converter: str | None = None,
    run_script: str | None = None,
    samples: dict[str, dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write an unpacked package: manifest.json, Meta-info/, Model/<entry>, Program/."""
    entry = entry or model.name
    (root / "Model").mkdir(parents=True)
    (root / "Meta-info").mkdir()
    shutil.copyfile(model, root / "Model" / entry)
    (root / "manifest.json").write_text(
        json.dumps({"name": name, "version": version, "models": [{"id": 0, "name": entry}]})
    )
    rc = dict(runtime_config or {})
    if backend:
        rc["backend"] = backend
    tech: dict[str, Any] = {"runtime_config": rc}
    if converter_config is not None:
        tech["converter_config"] = converter_config
    (root / "Meta-info" / "technicalinfo.json").write_text(json.dumps(tech))
    (root / "Meta-info" / "managementinfo.json").write_text(json.dumps({"name": name}))
    if converter is not None:
        cdir = root / "Program" / "Library" / "converter"
        cdir.mkdir(parents=True)
        (cdir / "convert.py").write_text(textwrap.dedent(converter))
    if run_script is not None:
        sdir = root / "Program" / "Scripts"
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "run.py").write_text(textwrap.dedent(run_script))
    if samples:
        sd = root / "Meta-info" / "samples"
        sd.mkdir()
        for fname, arrays in samples.items():
            np.savez(sd / fname, **arrays)  # type: ignore[arg-type]
    return root


# --- from test_runtime_worker.py ---------------------------------------------------


L = "tests.test_runtime_worker_loaders"


def toy_worker(tmp_path: Path, **kw: object) -> ModelWorker:
    d = tmp_path / "toy"
    d.mkdir(exist_ok=True)
    return ModelWorker(
        "toy",
        "1",
        d,
        RuntimeConfig(),
        cache_dir=tmp_path / "c",
        **{  # type: ignore[arg-type]
            "loader": f"{L}:toy",
            "self_test_fn": f"{L}:toy_self_test",
            "restart_backoff": (0.05, 0.5),
            **kw,
        },
    )


def wait_state(w: ModelWorker, state: str, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while w.state != state and time.monotonic() < end:
        time.sleep(0.02)
    assert w.state == state


def mlp_onnx(ws: list[Any], path: Path, *, bias: Any = None, out: str | None = None) -> Path:
    """An ONNX MLP ``x → MatMul(w0) → Relu → … → MatMul(w_last) [+ bias]`` (ir_version 10),
    the residual tests' model pairs. ``out``: the output's name (default ``logits``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    nodes, h = [], "x"
    for i in range(len(ws)):
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]))
        if i < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
            h = f"r{i}"
    last = f"m{len(ws) - 1}"
    name = out or "logits"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b2"))
        nodes.append(helper.make_node("Add", [last, "b2"], [name]))
    else:
        nodes.append(helper.make_node("Identity", [last], [name]))
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", ws[0].shape[0]])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", ws[-1].shape[1]])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return path
