"""KServe v2 / Triton gRPC on a Unix socket, in its own process, as a thin adapter over
the daemon's one data plane.

The transport is our own HTTP/2 core (``agent/serving/h2.py``, sans-I/O) driven by one
blocking thread per connection: grpcio's server costs 360-600 us per RPC by itself
(bench/bench_grpc.py), several times the whole budget. The process needs protobuf (the
generated ``grpc_service_pb2``) and ``hpack``, not grpcio.

Why a process of its own: it keeps protobuf's ~10 MB and the gateway's threads out of
the daemon's 60 MB idle budget, and it is the simplest correct shape: the daemon starts
this process when ``[grpc] enabled = true`` and keeps it running; the gateway maps every
RPC onto the v2 HTTP request that means the same on the daemon's inference socket
(binary tensors, kept-alive connections, one per gateway connection thread) and maps
the answer back. There is no second inference path: validation, admission, errors,
statistics and lent connections (the worker answers the gateway's connection itself)
are the daemon's.

Tensors cross unchanged: ``raw_input_contents`` / ``raw_output_contents`` have exactly
the binary tensor extension's layout (little-endian, row-major, BYTES elements as a
4-byte length then the bytes), so the gateway only slices buffers. Typed ``contents``
(``fp32_contents``, ``bytes_contents``, ...) are packed into that layout here.

Errors: the daemon's v2 error (``{"error", "code"}`` with an HTTP status) becomes the
gRPC status of the same meaning (400 → INVALID_ARGUMENT, 404 → NOT_FOUND, 503 →
UNAVAILABLE, ...) with the message ``[code] error``.

Access: the socket gets the inference socket's mode and group (bound under a temporary
name with a 0600 umask, then chmod/chown and renamed into place, as agent/serving/http.py
does). The gateway does not ask SO_PEERCRED: the file permissions are the access
control, as they are for the inference socket's callers; its limits are the inference
socket's (message size = max_body_bytes, header bytes and fields, connections,
keep-alive and body timeouts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from agent.client import Client
from agent.grpc_v2 import grpc_service_pb2 as _pb
from agent.serving.h2 import Call, H2Limits, H2Server, Status
from agent.serving.http import _resolve_group, clear_stale_socket

logger = logging.getLogger(__name__)

# The generated module builds its classes at import time: typed as Any here.
pb: Any = _pb

__all__ = ["Gateway", "Service", "main"]

_STATUS = {
    400: Status.INVALID_ARGUMENT,
    404: Status.NOT_FOUND,
    405: Status.UNIMPLEMENTED,
    408: Status.DEADLINE_EXCEEDED,
    413: Status.RESOURCE_EXHAUSTED,
    415: Status.INVALID_ARGUMENT,
    503: Status.UNAVAILABLE,
}
HEADER_LENGTH = "inference-header-content-length"
SERVICE = "/inference.GRPCInferenceService/"

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


class Service:
    """The RPCs, each one v2 HTTP request to the daemon: :meth:`call` maps a gRPC
    method and its request message to (gRPC status, answer message or error text)."""

    def __init__(self, upstream: str, timeout: float) -> None:
        self.client = Client(upstream, timeout=timeout, binary=True)
        self.methods: dict[str, tuple[Any, Callable[[Any], Any]]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "ModelInfer": (pb.ModelInferRequest, self.infer),
        }

    def call(self, path: str, message: bytes) -> tuple[int, bytes | str]:
        """(0, the answer's bytes) or (a gRPC status, its message)."""
        method = self.methods.get(path[len(SERVICE) :]) if path.startswith(SERVICE) else None
        if method is None:
            return Status.UNIMPLEMENTED, f"unknown method {path[:200]!r}"
        cls, fn = method
        try:
            request = cls.FromString(message)
        except DecodeError as exc:
            return Status.INVALID_ARGUMENT, f"[bad-message] cannot parse the request: {exc}"
        try:
            return Status.OK, fn(request).SerializeToString()
        except _Upstream as exc:
            return _STATUS.get(exc.status, Status.INTERNAL), f"[{exc.code}] {exc.message}"
        except Exception as exc:  # a gateway bug: say so, keep serving
            logger.exception("grpc gateway failed")
            return Status.INTERNAL, f"[internal] {type(exc).__name__}"

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

    # --- health and metadata ----------------------------------------------------------

    def server_live(self, request: Any) -> Any:
        return pb.ServerLiveResponse(live=self._json("GET", "/v2/health/live")["live"])

    def server_ready(self, request: Any) -> Any:
        status, _h, _d = self._call("GET", "/v2/health/ready", ok=(200, 503))
        return pb.ServerReadyResponse(ready=status == 200)

    def model_ready(self, request: Any) -> Any:
        path = self._model_path(request.name, request.version) + "/ready"
        status, _h, _d = self._call("GET", path, ok=(200, 503))
        return pb.ModelReadyResponse(ready=status == 200)

    def server_metadata(self, request: Any) -> Any:
        doc = self._json("GET", "/v2")
        return pb.ServerMetadataResponse(
            name=doc.get("name", ""),
            version=doc.get("version", ""),
            extensions=doc.get("extensions", []),
        )

    def model_metadata(self, request: Any) -> Any:
        doc = self._json("GET", self._model_path(request.name, request.version))
        return pb.ModelMetadataResponse(
            name=doc.get("name", request.name),
            versions=[str(v) for v in doc.get("versions", [])],
            platform=doc.get("platform", ""),
            inputs=[_tensor_meta(t) for t in doc.get("inputs", [])],
            outputs=[_tensor_meta(t) for t in doc.get("outputs", [])],
        )

    # --- Triton extensions (read-only) ------------------------------------------------

    def model_config(self, request: Any) -> Any:
        doc = self._json("GET", self._model_path(request.name, request.version) + "/config")
        return json_format.ParseDict(
            {"config": doc}, pb.ModelConfigResponse(), ignore_unknown_fields=True
        )

    def model_statistics(self, request: Any) -> Any:
        if request.name:
            path = self._model_path(request.name, request.version) + "/stats"
        else:
            path = "/v2/models/stats"
        doc = self._json("GET", path)
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    def repository_index(self, request: Any) -> Any:
        body = json.dumps({"ready": bool(request.ready)}).encode()
        models = self._json("POST", "/v2/repository/index", body)
        return json_format.ParseDict(
            {"models": models}, pb.RepositoryIndexResponse(), ignore_unknown_fields=True
        )

    # --- inference ----------------------------------------------------------------------

    def infer(self, request: Any) -> Any:
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

READ_SIZE = 256 * 1024  # bytes asked of recv at once


class _Conn:
    """One client connection: its socket and core, and a lock for both (the reader
    thread and pooled calls answer on it)."""

    def __init__(self, sock: socket.socket, h2: H2Server) -> None:
        self.sock = sock
        self.h2 = h2
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.pending = 0  # calls handed to the pool and not yet answered

    def flush(self) -> None:
        """Write what the core queued (the caller holds ``lock``)."""
        out = self.h2.data_to_send()
        if out:
            self.sock.sendall(out)


class Gateway:
    """gRPC on a Unix socket with the inference socket's mode, group and limits:
    start → serve (a thread per connection, each with its H2Server) → stop(grace)."""

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
        idle_timeout: float = 75.0,
        header_timeout: float = 10.0,
        limits: H2Limits | None = None,
    ) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.max_concurrent = max_concurrent  # connections
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._timeouts = {"head": header_timeout, "body": timeout, "idle": idle_timeout}
        self.limits = limits or H2Limits(
            max_message_bytes=max_message_bytes,
            max_buffered_bytes=max(max_message_bytes + 5, 1 << 20),
        )
        self.service = Service(upstream, timeout)
        self.upstream = upstream
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._conns: dict[socket.socket, H2Server] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._accepter: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        # Calls that overlap on one connection (the common one-at-a-time call is
        # answered on the connection's own thread).
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="grpc-call")

    def start(self) -> None:
        gid = _resolve_group(self.group) if self.group else None
        clear_stale_socket(self.path)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the file exists 0600 until it gets its mode and group
        try:
            sock.bind(str(tmp))
        finally:
            os.umask(old)
        try:
            os.chmod(tmp, self.mode)
            if gid is not None:
                os.chown(tmp, -1, gid)
            sock.listen(128)
            os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        st = os.stat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        self._sock = sock
        self._accepter = threading.Thread(target=self._accept, name="grpc-accept", daemon=True)
        self._accepter.start()
        logger.info(
            "grpc listening on %s (mode %04o, group %s) for %s",
            self.path,
            self.mode,
            self.group or "-",
            self.upstream,
        )

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            with self._lock:
                full = len(self._conns) >= self.max_concurrent
                if not full:
                    h2 = H2Server(self.limits)
                    self._conns[conn] = h2
            if full:  # over the connection limit: GOAWAY (REFUSED_STREAM-like) and close
                with contextlib.suppress(OSError):
                    h2 = H2Server(self.limits)
                    h2.goaway(0xB, "too many connections")
                    conn.sendall(h2.data_to_send())
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn, h2), name="grpc-conn", daemon=True)
            self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket, h2: H2Server) -> None:
        c = _Conn(conn, h2)
        try:
            self._loop(c)
        except OSError:
            pass  # the peer went away
        except Exception:  # a gateway bug: log it, lose only this connection
            logger.exception("grpc connection failed")
        finally:
            with c.cond:  # calls still running in the pool answer before the close
                c.cond.wait_for(lambda: c.pending == 0, self.timeout)
            with self._lock:
                self._conns.pop(conn, None)
            self._threads.discard(threading.current_thread())
            conn.close()

    def _loop(self, c: _Conn) -> None:
        conn, h2 = c.sock, c.h2
        with c.lock:
            c.flush()
        while True:
            # The inference socket's timers: an incomplete header block gets
            # header_timeout_s, an incomplete request body body_timeout_s, an idle
            # connection (or one waiting for its answers) keepalive_timeout_s.
            conn.settimeout(self._timeouts[h2.phase])
            try:
                data = conn.recv(READ_SIZE)
            except TimeoutError:
                data = b""
            if not data:
                with c.lock:
                    h2.goaway()
                    with contextlib.suppress(OSError):
                        c.flush()
                return
            with c.lock:
                calls = h2.receive(data)
                c.flush()
                inline = len(calls) == 1 and c.pending == 0
                if not inline:
                    c.pending += len(calls)
            # The usual case, one call at a time, is answered on this thread (no
            # hand-over); calls that overlap run on the pool, answered as they finish.
            if inline:
                self._answer(c, calls[0])
            else:
                for call in calls:
                    self._pool.submit(self._pooled, c, call)
            if h2.closed:
                if h2.error:
                    logger.info("grpc connection closed: %s", h2.error)
                return
            if (h2.peer_goaway or self._stopping) and not h2.open_streams:
                return

    def _answer(self, c: _Conn, call: Call) -> None:
        status, answer = self.service.call(call.path, call.message)
        with c.lock:
            if status == Status.OK:
                assert isinstance(answer, bytes)
                c.h2.respond(call.stream_id, answer)
            else:
                c.h2.fail(call.stream_id, status, str(answer))
            with contextlib.suppress(OSError):  # the reader sees the close
                c.flush()

    def _pooled(self, c: _Conn, call: Call) -> None:
        try:
            self._answer(c, call)
        except Exception:
            logger.exception("grpc call failed")
        finally:
            with c.cond:
                c.pending -= 1
                c.cond.notify_all()

    def stop(self, grace: float) -> None:
        """Refuse new connections, GOAWAY the open ones, wait up to ``grace`` seconds
        for their calls in progress, remove the socket file."""
        self._stopping = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns.items())
        for conn, _h2 in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # its loop answers the call under way, ends
        deadline = time.monotonic() + grace
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)
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
    ap.add_argument("--max-header-bytes", type=int, default=16 * 1024)
    ap.add_argument("--max-headers", type=int, default=100)
    ap.add_argument("--max-inflight-bytes", type=int, default=256 * 1024 * 1024)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--idle-timeout", type=float, default=75.0)
    ap.add_argument("--header-timeout", type=float, default=10.0)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="grpc[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from agent.malloc import tune_malloc

    tune_malloc()  # each call's buffers reuse heap pages (agent/malloc.py; ~25 us a call)
    limits = H2Limits(
        max_message_bytes=args.max_message_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        max_buffered_bytes=max(args.max_inflight_bytes, args.max_message_bytes + 5),
    )
    gw = Gateway(
        args.socket,
        args.upstream,
        mode=int(args.mode, 8),
        group=args.group or None,
        max_concurrent=args.max_concurrent,
        threads=args.threads,
        timeout=args.timeout,
        idle_timeout=args.idle_timeout,
        header_timeout=args.header_timeout,
        limits=limits,
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
