"""KServe v2 / Triton gRPC on a Unix socket, in its own process, as a thin adapter over
the daemon's one data plane.

Why a process of its own: ``import grpc`` alone costs ~26 MB of resident memory, which
would take the daemon's idle RSS past its 60 MB budget. So the daemon starts this
process when ``[grpc] enabled = true`` and keeps it running; the gateway maps every RPC
onto the v2 HTTP request that means the same on the daemon's inference socket (binary
tensors, kept-alive connections, one per gateway thread) and maps the answer back.
There is no second inference path: validation, admission, errors, statistics and lent
connections (the worker answers the gateway's connection itself) are the daemon's.

Tensors cross unchanged: ``raw_input_contents`` / ``raw_output_contents`` have exactly
the binary tensor extension's layout (little-endian, row-major, BYTES elements as a
4-byte length then the bytes), so the gateway only slices buffers. Typed ``contents``
(``fp32_contents``, ``bytes_contents``, ...) are packed into that layout here.

Errors: the daemon's v2 error (``{"error", "code"}`` with an HTTP status) becomes the
gRPC status of the same meaning (400 → INVALID_ARGUMENT, 404 → NOT_FOUND, 503 →
UNAVAILABLE, ...) with the message ``[code] error``.

Access: the socket gets the inference socket's mode and group (bound under a temporary
name with a 0600 umask, then chmod/chown and renamed into place, as agent/serving/http.py
does). gRPC cannot report the peer's SO_PEERCRED, so the file permissions are the
access control, as they are for the inference socket's callers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from agent.client import Client
from agent.grpc_v2 import grpc_service_pb2 as _pb
from agent.grpc_v2 import grpc_service_pb2_grpc as _pb_grpc
from agent.serving.http import _resolve_group, clear_stale_socket

logger = logging.getLogger(__name__)

# The generated modules build their classes at import time: typed as Any here.
pb: Any = _pb
pb_grpc: Any = _pb_grpc

__all__ = ["Gateway", "main"]

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
HEADER_LENGTH = "inference-header-content-length"

# Typed contents → (the InferTensorContents field, numpy dtype of the wire form).
_CONTENTS = {
    "BOOL": ("bool_contents", "?"),
    "UINT8": ("uint_contents", "u1"),
    "UINT16": ("uint_contents", "<u2"),
    "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "INT8": ("int_contents", "i1"),
    "INT16": ("int_contents", "<i2"),
    "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "FP16": ("fp32_contents", "<f2"),
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
}
_LEN = struct.Struct("<I")


class _Upstream(Exception):
    """The daemon answered with a v2 error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _param_value(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _set_param(msg: Any, key: str, value: Any) -> None:
    p = msg[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if value >= 0 and value > 2**63 - 1:
            p.uint64_param = value
        else:
            p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _pack_contents(t: Any) -> bytes:
    """An input's typed ``contents`` as the binary tensor form."""
    datatype = t.datatype
    if datatype == "BYTES":
        return b"".join(_LEN.pack(len(b)) + b for b in t.contents.bytes_contents)
    spec = _CONTENTS.get(datatype)
    if spec is None:
        raise _Upstream(400, "bad-datatype", f"tensor {t.name!r}: unknown datatype {datatype!r}")
    import numpy as np

    field, dtype = spec
    try:
        return np.asarray(list(getattr(t.contents, field)), dtype=dtype).tobytes()
    except (OverflowError, ValueError) as exc:
        raise _Upstream(400, "bad-tensor", f"tensor {t.name!r}: {exc}") from None


class Servicer(_pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs, each one v2 HTTP request to the daemon."""

    def __init__(self, upstream: str, timeout: float) -> None:
        self.client = Client(upstream, timeout=timeout, binary=True)

    # --- plumbing ---------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: Sequence[Any] | bytes | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> tuple[int, dict[str, str], bytearray]:
        try:
            status, hdrs, data = self.client.request(method, path, body, headers)
        except OSError as exc:
            raise _Upstream(503, "unavailable", f"the daemon does not answer: {exc}") from None
        if status not in ok:
            try:
                doc = json.loads(data)
                code, message = str(doc.get("code", "error")), str(doc.get("error", ""))
            except (ValueError, AttributeError):
                code, message = "error", data[:200].decode("utf-8", "replace")
            raise _Upstream(status, code, message)
        return status, hdrs, data

    def _json(self, method: str, path: str, body: bytes | None = None) -> Any:
        _s, _h, data = self._call(method, path, body)
        return json.loads(data)

    @staticmethod
    def _model_path(name: str, version: str) -> str:
        if not name or "/" in name or "/" in version:
            raise _Upstream(400, "bad-model-name", f"invalid model name {name!r}")
        return f"/v2/models/{name}" + (f"/versions/{version}" if version else "")

    @staticmethod
    def _abort(context: Any, exc: _Upstream) -> None:
        code = _STATUS.get(exc.status, grpc.StatusCode.INTERNAL)
        context.abort(code, f"[{exc.code}] {exc.message}")

    def _run(self, context: Any, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _Upstream as exc:
            self._abort(context, exc)
        except Exception as exc:  # a gateway bug: say so, keep serving
            logger.exception("grpc gateway failed")
            context.abort(grpc.StatusCode.INTERNAL, f"[internal] {type(exc).__name__}")
        return None  # pragma: no cover - abort raises

    # --- health and metadata ----------------------------------------------------------

    def ServerLive(self, request: Any, context: Any) -> Any:
        return self._run(
            context,
            lambda: pb.ServerLiveResponse(live=self._json("GET", "/v2/health/live")["live"]),
        )

    def ServerReady(self, request: Any, context: Any) -> Any:
        def go() -> Any:
            status, _h, _d = self._call("GET", "/v2/health/ready", ok=(200, 503))
            return pb.ServerReadyResponse(ready=status == 200)

        return self._run(context, go)

    def ModelReady(self, request: Any, context: Any) -> Any:
        def go() -> Any:
            path = self._model_path(request.name, request.version) + "/ready"
            status, _h, _d = self._call("GET", path, ok=(200, 503))
            return pb.ModelReadyResponse(ready=status == 200)

        return self._run(context, go)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        def go() -> Any:
            doc = self._json("GET", "/v2")
            return pb.ServerMetadataResponse(
                name=doc.get("name", ""),
                version=doc.get("version", ""),
                extensions=doc.get("extensions", []),
            )

        return self._run(context, go)

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        def go() -> Any:
            doc = self._json("GET", self._model_path(request.name, request.version))
            return pb.ModelMetadataResponse(
                name=doc.get("name", request.name),
                versions=[str(v) for v in doc.get("versions", [])],
                platform=doc.get("platform", ""),
                inputs=[_tensor_meta(t) for t in doc.get("inputs", [])],
                outputs=[_tensor_meta(t) for t in doc.get("outputs", [])],
            )

        return self._run(context, go)

    # --- Triton extensions (read-only) ------------------------------------------------

    def ModelConfig(self, request: Any, context: Any) -> Any:
        def go() -> Any:
            doc = self._json("GET", self._model_path(request.name, request.version) + "/config")
            return json_format.ParseDict(
                {"config": doc}, pb.ModelConfigResponse(), ignore_unknown_fields=True
            )

        return self._run(context, go)

    def ModelStatistics(self, request: Any, context: Any) -> Any:
        def go() -> Any:
            if request.name:
                path = self._model_path(request.name, request.version) + "/stats"
            else:
                path = "/v2/models/stats"
            doc = self._json("GET", path)
            return json_format.ParseDict(
                doc, pb.ModelStatisticsResponse(), ignore_unknown_fields=True
            )

        return self._run(context, go)

    def RepositoryIndex(self, request: Any, context: Any) -> Any:
        def go() -> Any:
            body = json.dumps({"ready": bool(request.ready)}).encode()
            models = self._json("POST", "/v2/repository/index", body)
            return json_format.ParseDict(
                {"models": models}, pb.RepositoryIndexResponse(), ignore_unknown_fields=True
            )

        return self._run(context, go)

    # --- inference ----------------------------------------------------------------------

    def ModelInfer(self, request: Any, context: Any) -> Any:
        return self._run(context, self._infer, request)

    def _infer(self, request: Any) -> Any:
        raws = request.raw_input_contents
        if raws and len(raws) != len(request.inputs):
            raise _Upstream(
                400,
                "bad-tensor",
                f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs",
            )
        parts = list(raws) if raws else [_pack_contents(t) for t in request.inputs]
        path = self._model_path(request.model_name, request.model_version) + "/infer"
        # A program sends the same model, names, shapes and sizes over and over: the
        # request's JSON head is built once per such signature (bounded, as client.py).
        key = None
        if not request.parameters and not request.id:
            key = (
                path,
                tuple(
                    (t.name, t.datatype, tuple(t.shape), len(d))
                    for t, d in zip(request.inputs, parts, strict=True)
                ),
                tuple(o.name for o in request.outputs),
            )
        head = _heads.get(key) if key is not None else None
        if head is None:
            head = _request_head(request, parts)
            if key is not None:
                if len(_heads) >= _CACHE_MAX:
                    _heads.clear()
                _heads[key] = head
        _s, hdrs, body = self._call(
            "POST",
            path,
            [head, *parts],
            {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))},
        )
        return _infer_response(hdrs, body)


_CACHE_MAX = 256  # entries of each cache below (cleared when full)
_heads: dict[Any, bytes] = {}  # request signature → the v2 JSON head
_answers: dict[bytes, tuple[Any, list[int] | None]] = {}  # response head → (template, sizes)


def _request_head(request: Any, parts: list[bytes]) -> bytes:
    """The v2 binary request's JSON head for a ModelInferRequest."""
    inputs: list[dict[str, Any]] = [
        {
            "name": t.name,
            "datatype": t.datatype,
            "shape": list(t.shape),
            "parameters": {"binary_data_size": len(data)},
        }
        for t, data in zip(request.inputs, parts, strict=True)
    ]
    params = {k: _param_value(v) for k, v in request.parameters.items()}
    params["binary_data_output"] = True
    doc: dict[str, Any] = {"parameters": params, "inputs": inputs}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [
            {"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs
        ]
    return json.dumps(doc, separators=(",", ":")).encode()


def _tensor_meta(t: dict[str, Any]) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=t.get("name", ""), datatype=t.get("datatype", ""), shape=t.get("shape", [])
    )


def _infer_response(hdrs: dict[str, str], body: bytearray) -> Any:
    """The daemon's binary v2 answer → ModelInferResponse with raw_output_contents.
    The same model answers the same head over and over (names, shapes, sizes): the
    message without its tensors is built once per head and copied."""
    raw_len = hdrs.get(HEADER_LENGTH)
    view = memoryview(body)
    hl = int(raw_len) if raw_len is not None else view.nbytes
    raw_head = bytes(view[:hl])
    cached = _answers.get(raw_head)
    if cached is None:
        doc = json.loads(raw_head)
        cached = _answer_template(doc)
        # Not kept: answers that carry an id or JSON data (they do not repeat).
        if not doc.get("id") and cached[1] is not None and len(cached[1]) == len(doc["outputs"]):
            if len(_answers) >= _CACHE_MAX:
                _answers.clear()
            _answers[raw_head] = cached
    template, sizes = cached
    resp = pb.ModelInferResponse()
    resp.CopyFrom(template)
    if sizes:
        pos = hl
        raws = []
        for size in sizes:
            raws.append(bytes(view[pos : pos + size]))
            pos += size
        resp.raw_output_contents.extend(raws)
    return resp


def _answer_template(doc: dict[str, Any]) -> tuple[Any, list[int] | None]:
    """(the response without binary tensors, the binary tensors' sizes in order)."""
    resp = pb.ModelInferResponse(
        model_name=doc.get("model_name", ""),
        model_version=str(doc.get("model_version", "")),
        id=doc.get("id", "") or "",
    )
    for k, v in (doc.get("parameters") or {}).items():
        _set_param(resp.parameters, k, v)
    sizes: list[int] = []
    for o in doc.get("outputs", []):
        out = resp.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:  # a JSON output (not asked for, but be exact): pack it
            out.contents.CopyFrom(_json_contents(o))
            continue
        sizes.append(int(size))
    if sizes and len(sizes) != len(resp.outputs):
        raise _Upstream(500, "internal", "mixed binary and JSON outputs from the daemon")
    return resp, sizes or None


def _json_contents(o: dict[str, Any]) -> Any:
    c = pb.InferTensorContents()
    datatype = o["datatype"]
    data = o.get("data", [])
    if datatype == "BYTES":
        c.bytes_contents.extend(s.encode() for s in data)
    else:
        getattr(c, _CONTENTS[datatype][0]).extend(data)
    return c


# --- the process ----------------------------------------------------------------------


class Gateway:
    """A gRPC server on a Unix socket with the inference socket's mode, group and
    limits: bind → serve → stop(grace)."""

    def __init__(
        self,
        path: Path,
        upstream: str,
        *,
        mode: int = 0o660,
        group: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_concurrent: int = 512,
        threads: int = 8,
        timeout: float = 60.0,
    ) -> None:
        self.path = path
        self.upstream = upstream
        self.mode = mode
        self.group = group
        self.max_message_bytes = max_message_bytes
        self.max_concurrent = max_concurrent
        self.threads = threads
        self.timeout = timeout
        self.server: Any = None
        self._ino: tuple[int, int] | None = None

    def start(self) -> None:
        gid = _resolve_group(self.group) if self.group else None
        clear_stale_socket(self.path)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=self.max_concurrent,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            Servicer(self.upstream, self.timeout), server
        )
        old = os.umask(0o177)  # the file exists 0600 until it gets its mode and group
        try:
            server.add_insecure_port(f"unix:{tmp}")
            server.start()
        finally:
            os.umask(old)
        try:
            os.chmod(tmp, self.mode)
            if gid is not None:
                os.chown(tmp, -1, gid)
            os.rename(tmp, self.path)
        except BaseException:
            server.stop(0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        st = os.stat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        self.server = server
        logger.info(
            "grpc listening on %s (mode %04o, group %s) for %s",
            self.path,
            self.mode,
            self.group or "-",
            self.upstream,
        )

    def stop(self, grace: float) -> None:
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if self._ino == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.grpc_v2 --socket PATH --upstream INFER_SOCK ...`` (the daemon
    starts it; see agent/daemon.py)."""
    ap = argparse.ArgumentParser(prog="edgeward-grpc")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--mode", default="0660")
    ap.add_argument("--group", default="")
    ap.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--max-concurrent", type=int, default=512)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="grpc[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    gw = Gateway(
        args.socket,
        args.upstream,
        mode=int(args.mode, 8),
        group=args.group or None,
        max_message_bytes=args.max_message_bytes,
        max_concurrent=args.max_concurrent,
        threads=args.threads,
        timeout=args.timeout,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gw.start()
    except Exception as exc:
        print(f"edgeward-grpc: {exc}", file=sys.stderr)
        return 1
    # The daemon reads this line: the socket is in place.
    print("READY", flush=True)
    stop.wait()
    gw.stop(args.grace)
    return 0
