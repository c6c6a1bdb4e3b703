"""KServe / Open Inference Protocol v2: a transport-free data plane and its HTTP adapter.

``DataPlane`` knows models, tensors and errors, nothing of HTTP (STYLE rule 7, as
MLServer's ``handlers/dataplane.py``); ``InferenceApp`` maps v2 paths and the binary
tensor extension onto it and turns every ``EdgewardError`` into a v2 error response
(``{"error": ..., "code": ...}``) with the error's status — in one place.

Endpoints::

    GET  /v2/health/live        200 {"live": true}
    GET  /v2/health/ready       200 {"ready": true} | 503 while a model is not ready
    GET  /v2                    server metadata (name, version, extensions)
    GET  /v2/models/{m}[/versions/{v}]           model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready     200 | 503 (model-not-ready)
    POST /v2/models/{m}[/versions/{v}]/infer     inference (JSON or binary tensors)
    GET  /v2/models/{m}[/versions/{v}]/config    Triton model configuration (read-only)
    GET  /v2/models/{m}[/versions/{v}]/stats     Triton statistics; /v2/models/stats: all
    POST /v2/repository/index                    the served models (Triton index)

HEAD is answered wherever GET is (headers only, agent/serving/http.py).

Per model at most ``max_concurrent_per_model`` requests run at once and at most
``max_queue_per_model`` wait; beyond that the request fails fast with 503 and
``Retry-After`` (``OverloadedError``) instead of piling up memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import (
    EdgewardError,
    InvalidInputError,
    MethodNotAllowedError,
    ModelNotReadyError,
    NotFoundError,
    OverloadedError,
)
from agent.serving.h1 import (
    BoundedCache,
    error_response,
    internal_error,
)
from agent.serving.http import Lender, Request, Response, json_response
from runtime.backend import TensorSpec, validate_inputs

if TYPE_CHECKING:
    import numpy as np

    from agent.serving.tensors import InferRequest

# numpy and the codec are imported on the first inference, not at daemon start: an idle
# daemon without models stays ~12 MB smaller.
HEADER_LENGTH = "inference-header-content-length"

logger = logging.getLogger(__name__)

__all__ = [
    "EXTENSIONS",
    "DataPlane",
    "Gate",
    "InferResult",
    "InferenceApp",
    "Registry",
    "ServedModel",
    "error_response",
    "header_length",
    "infer_response",
    "input_specs",
    "select_outputs",
]

EXTENSIONS = [
    "binary_tensor_data",
    "health",
    "model_metadata",
    "model_configuration",
    "model_repository",
    "statistics",
]

_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorflow_lite": "litert"}
# v2 datatype → Triton model-configuration data type (the model_configuration extension).
CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


class ServedModel(Protocol):
    """One served model version (implemented by ``agent.serving.registry``)."""

    name: str
    version: str

    @property
    def ready(self) -> bool: ...

    def metadata(self) -> dict[str, Any]: ...

    async def infer(
        self, inputs: dict[str, np.ndarray[Any, Any]], parameters: dict[str, Any]
    ) -> dict[str, np.ndarray[Any, Any]]: ...

    def statistics(self) -> dict[str, Any]: ...

    def lender(self) -> Lender | None:
        """Who may serve this model's inference connections itself now, or None."""


class BlockingModel(Protocol):
    """A model the blocking face of the data plane runs (a worker's own servable)."""

    name: str
    version: str

    @property
    def ready(self) -> bool: ...

    def metadata(self) -> dict[str, Any]: ...

    def predict(self, inputs: dict[str, np.ndarray[Any, Any]]) -> Mapping[str, Any]: ...


class Registry(Protocol):
    """Name (and version) → served model; ``ModelNotFoundError`` if unknown."""

    def models(self) -> Any: ...

    def get(self, name: str, version: str | None = None) -> Any: ...


# --- per-model admission ---------------------------------------------------------------


class Gate:
    """Per-model admission: at most ``limit`` predictions at once and ``queue`` waiting,
    first come first served; beyond that :class:`OverloadedError` (503 + Retry-After).

    The one gate, with two faces: :meth:`acquire` awaits on the event loop (the daemon's
    data plane), :meth:`acquire_blocking` blocks a thread (a worker's lent connections);
    one gate is used through one face. :meth:`release` hands the slot straight to the
    oldest waiter."""

    __slots__ = ("_lock", "active", "limit", "queue", "waiters")

    def __init__(self, limit: int, queue: int) -> None:
        self.limit = max(1, limit)
        self.queue = max(0, queue)
        self.active = 0
        # A waiter is a future (async face) or a held lock (blocking face).
        self.waiters: collections.deque[asyncio.Future[None] | threading.Lock] = collections.deque()
        self._lock = threading.Lock()

    def _enter(self, model: str) -> bool:
        """Under the lock: True if a slot was taken; False: wait; raises when full."""
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return True
        if len(self.waiters) >= self.queue:
            raise OverloadedError(
                f"model {model!r} is overloaded ({self.active} running, "
                f"{len(self.waiters)} queued); retry later",
                retry_after=1.0,
            )
        return False

    async def acquire(self, model: str) -> None:
        with self._lock:
            if self._enter(model):
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed the slot but are going away: pass it on
            else:
                with self._lock, contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            raise

    def acquire_blocking(self, model: str) -> None:
        with self._lock:
            if self._enter(model):
                return
            handed = threading.Lock()
            handed.acquire()
            self.waiters.append(handed)
        handed.acquire()  # released by release(): the slot is ours

    def release(self) -> None:
        with self._lock:
            while self.waiters:
                w = self.waiters.popleft()
                if isinstance(w, asyncio.Future):
                    if not w.done():
                        w.set_result(None)  # the slot passes on; active unchanged
                        return
                else:
                    w.release()
                    return
            self.active -= 1


# --- the data plane ----------------------------------------------------------------------


@dataclass
class InferResult:
    """What the data plane returns for one inference."""

    model_name: str
    model_version: str
    id: str | None
    outputs: list[tuple[str, np.ndarray[Any, Any], bool]]


class DataPlane:
    """v2 semantics over a ``Registry``; raises ``EdgewardError`` subclasses.

    One inference sequence — find the model, check it is ready, validate the inputs
    against its metadata, pass the admission gate, run, select the outputs — with two
    faces: :meth:`infer` awaits a ``ServedModel`` (the daemon), :meth:`infer_blocking`
    calls a ``BlockingModel`` on the calling thread (a worker answering a lent
    connection, agent/serving/direct.py)."""

    def __init__(
        self,
        registry: Registry,
        *,
        server_name: str = "edgeward",
        version: str | None = None,
        max_queue_per_model: int = 64,
        max_concurrent_per_model: int = 8,
    ) -> None:
        self.registry = registry
        self.server_name = server_name
        self.version = version or _package_version()
        self.max_queue = max_queue_per_model
        self.max_concurrent = max_concurrent_per_model
        self._gates: dict[str, Gate] = {}
        self._specs: BoundedCache[tuple[str, str, int], list[TensorSpec] | None] = BoundedCache(256)
        # Input signatures (names, dtypes, shapes) that passed, per model: a program
        # sends the same ones on every request, validated once.
        self._valid: BoundedCache[tuple[Any, ...], bool] = BoundedCache(64)

    def live(self) -> dict[str, Any]:
        return {"live": True}

    def ready(self) -> bool:
        return all(m.ready for m in self.registry.models())

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.server_name, "version": self.version, "extensions": EXTENSIONS}

    def model(self, name: str, version: str | None) -> Any:
        return self.registry.get(name, version)

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        m = self.model(name, version)
        meta = dict(m.metadata())
        meta.setdefault("name", m.name)
        meta.setdefault("versions", [m.version])
        meta.setdefault("platform", "")
        return meta

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration (read-only), derived from the model's metadata:
        no batching dimension of its own (``max_batch_size`` 0, dims as served)."""
        meta = self.model_metadata(name, version)

        def tensors(key: str) -> list[dict[str, Any]]:
            return [
                {
                    "name": t.get("name", ""),
                    "data_type": CONFIG_TYPES.get(str(t.get("datatype", "")), "TYPE_INVALID"),
                    "dims": [int(d) for d in t.get("shape", [])],
                }
                for t in meta.get(key) or []
            ]

        platform = str(meta.get("platform", ""))
        config: dict[str, Any] = {
            "name": meta["name"],
            "platform": platform,
            "backend": _BACKENDS.get(platform, ""),
            "max_batch_size": 0,
            "input": tensors("inputs"),
            "output": tensors("outputs"),
        }
        versions = [int(v) for v in meta.get("versions", []) if str(v).isdigit()]
        if versions:  # Triton's versions are integers; others have no policy to show
            config["version_policy"] = {"specific": {"versions": versions}}
        return config

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The served models (Triton's repository index, read-only): readable by anyone
        who may call the models, unlike the control socket's list."""
        out = []
        for m in sorted(self.registry.models(), key=lambda m: m.name):
            ready = bool(m.ready)
            if ready_only and not ready:
                continue
            out.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "state": "READY" if ready else "UNAVAILABLE",
                    "reason": "" if ready else "loading, restarting or unloading",
                }
            )
        return out

    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        """Triton's statistics extension: one model, or every served model."""
        models = (
            [self.model(name, version)]
            if name is not None
            else sorted(self.registry.models(), key=lambda m: m.name)
        )
        return {"model_stats": [m.statistics() for m in models]}

    def model_ready(self, name: str, version: str | None) -> dict[str, Any]:
        m = self.model(name, version)
        if not m.ready:
            raise ModelNotReadyError(f"model {name!r} version {m.version} is not ready")
        return {"name": m.name, "ready": True}

    def _input_specs(self, m: Any) -> list[TensorSpec] | None:
        key = (m.name, m.version, id(m))
        try:
            return self._specs[key]
        except KeyError:
            pass
        try:
            specs = input_specs(m.metadata())
        except Exception:  # metadata of unusual shape: let the backend validate instead
            logger.debug("model %s: cannot read input metadata", m.name, exc_info=True)
            specs = None
        return self._specs.remember(key, specs)

    def _validate(self, m: Any, inputs: Mapping[str, np.ndarray[Any, Any]]) -> None:
        sig = (m.name, m.version, id(m), *((n, a.dtype, a.shape) for n, a in inputs.items()))
        if sig not in self._valid:  # what validate_inputs looks at, checked once
            specs = self._input_specs(m)
            if specs is not None:  # the one validator (runtime/backend.py), one set of codes
                validate_inputs(inputs, specs, model=f"model {m.name!r}")
            self._valid.remember(sig, True)

    def _admit(self, name: str, version: str | None, req: InferRequest) -> tuple[Any, Gate]:
        m = self.model(name, version)
        if not m.ready:
            raise ModelNotReadyError(f"model {name!r} version {m.version} is not ready")
        self._validate(m, req.inputs)
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = Gate(self.max_concurrent, self.max_queue)
        return m, gate

    async def infer(self, name: str, version: str | None, req: InferRequest) -> InferResult:
        m, gate = self._admit(name, version, req)
        await gate.acquire(name)
        try:
            result = await m.infer(req.inputs, req.parameters)
        finally:
            gate.release()
        return InferResult(m.name, m.version, req.id, select_outputs(result, req))

    def infer_blocking(self, name: str, version: str | None, req: InferRequest) -> InferResult:
        m, gate = self._admit(name, version, req)
        gate.acquire_blocking(name)
        try:
            result = m.predict(req.inputs)
        finally:
            gate.release()
        return InferResult(m.name, m.version, req.id, select_outputs(result, req))


def select_outputs(
    result: Mapping[str, np.ndarray[Any, Any]], req: InferRequest
) -> list[tuple[str, np.ndarray[Any, Any], bool]]:
    import numpy as np

    if req.outputs is None:
        return [(k, np.asarray(v), req.binary_output) for k, v in result.items()]
    out = []
    for o in req.outputs:
        if o.name not in result:
            raise InvalidInputError(
                f"requested output {o.name!r} does not exist; outputs: {', '.join(result)}",
                code="unknown-output",
            )
        binary = req.binary_output if o.binary is None else o.binary
        out.append((o.name, np.asarray(result[o.name]), binary))
    return out


def input_specs(meta: Mapping[str, Any]) -> list[TensorSpec] | None:
    """The model's inputs from its v2 metadata (None: no usable list, the backend checks)."""
    raw = meta.get("inputs")
    if not isinstance(raw, list) or not raw:
        return None
    return [TensorSpec.from_v2(s) for s in raw]


def header_length(headers: Mapping[str, str]) -> int | None:
    """The ``Inference-Header-Content-Length`` value (None: the body is all JSON)."""
    raw = headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidInputError(
            f"Inference-Header-Content-Length {raw[:32]!r} is not a number",
            code="bad-header-length",
        )
    return int(raw)


def infer_response(res: InferResult) -> Response:
    """The 200 response for an inference result (JSON, or binary tensor extension)."""
    from agent.serving.tensors import encode_response

    parts, out_hl = encode_response(
        res.model_name, res.model_version, res.outputs, request_id=res.id
    )
    if out_hl is None:  # JSON: its parts unjoined (the tensors' data as orjson wrote them)
        return Response(200, {"content-type": _JSON}, parts[0] if len(parts) == 1 else parts)
    return Response(
        200,
        {"content-type": _OCTET, "inference-header-content-length": str(out_hl)},
        parts,
    )


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeward")
    except Exception:
        return "0"


# --- the HTTP adapter --------------------------------------------------------------------


_OCTET = "application/octet-stream"
_JSON = "application/json"


class InferenceApp:
    """HTTP adapter: ``await app(request) -> Response`` for ``agent.serving.http``."""

    def __init__(
        self,
        registry: Registry,
        *,
        server_name: str = "edgeward",
        version: str | None = None,
        max_queue_per_model: int = 64,
        max_concurrent_per_model: int = 8,
    ) -> None:
        self.plane = DataPlane(
            registry,
            server_name=server_name,
            version=version,
            max_queue_per_model=max_queue_per_model,
            max_concurrent_per_model=max_concurrent_per_model,
        )
        self._server_meta = json_response(200, self.plane.server_metadata())

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except EdgewardError as exc:
            if exc.status >= 500 and not isinstance(exc, (OverloadedError, ModelNotReadyError)):
                logger.warning("%s %s: %s", request.method, request.path, exc.message)
            return error_response(exc)
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.path)
            return internal_error(f"internal error: {type(exc).__name__}")

    def lender_for(self, method: str, path: str, headers: dict[str, str]) -> Lender | None:
        """The worker that may serve this connection itself from this request on (an
        inference on a ready model whose worker lends, see agent/serving/direct.py), or None:
        the request is answered here."""
        if method != "POST" or not path.endswith("/infer"):
            return None
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v2", "models"]:
            name, version = parts[3], None
        elif len(parts) == 7 and parts[:3] == ["", "v2", "models"] and parts[4] == "versions":
            name, version = parts[3], parts[5]
        else:
            return None
        if not name or version == "":
            return None
        try:
            m: ServedModel = self.plane.model(name, version)
        except EdgewardError:
            return None
        return m.lender()

    async def _route(self, request: Request) -> Response:
        parts = request.path.split("/")
        # ["", "v2", ...]; a trailing slash is tolerated.
        if parts[-1] == "" and len(parts) > 2:
            parts.pop()
        if len(parts) < 2 or parts[0] != "" or parts[1] != "v2":
            raise NotFoundError(f"no endpoint {request.path[:200]}")
        method = request.method
        n = len(parts)
        if n == 4 and parts[2] == "models" and parts[3] == "stats":
            _allow(method, "GET", request.path)
            return json_response(200, self.plane.statistics(None, None))
        if n >= 4 and parts[2] == "models":
            name = parts[3]
            rest = parts[4:]
            version: str | None = None
            if len(rest) >= 2 and rest[0] == "versions":
                version = rest[1]
                rest = rest[2:]
            if not name or (version is not None and not version):
                raise NotFoundError(f"no endpoint {request.path[:200]}")
            if not rest:
                _allow(method, "GET", request.path)
                return json_response(200, self.plane.model_metadata(name, version))
            if rest == ["infer"]:
                _allow(method, "POST", request.path)
                return await self._infer(request, name, version)
            if rest == ["ready"]:
                _allow(method, "GET", request.path)
                return json_response(200, self.plane.model_ready(name, version))
            if rest == ["config"]:
                _allow(method, "GET", request.path)
                return json_response(200, self.plane.model_config(name, version))
            if rest == ["stats"]:
                _allow(method, "GET", request.path)
                return json_response(200, self.plane.statistics(name, version))
            raise NotFoundError(f"no endpoint {request.path[:200]}")
        if n == 3 and parts[2] == "models":  # GET /v2/models/stats below; this: no name
            raise NotFoundError(f"no endpoint {request.path[:200]}")
        if n == 4 and parts[2] == "repository" and parts[3] == "index":
            _allow(method, "POST", request.path)
            return json_response(200, self.plane.repository_index(_ready_only(request.body)))
        if n == 2:
            _allow(method, "GET", request.path)
            return self._server_meta
        if n == 4 and parts[2] == "health":
            _allow(method, "GET", request.path)
            if parts[3] == "live":
                return json_response(200, self.plane.live())
            if parts[3] == "ready":
                if self.plane.ready():
                    return json_response(200, {"ready": True})
                return json_response(
                    503, {"error": "not every model is ready", "code": "not-ready", "ready": False}
                )
        raise NotFoundError(f"no endpoint {request.path[:200]}")

    async def _infer(self, request: Request, name: str, version: str | None) -> Response:
        # Look the model up before decoding: an unknown model is 404 whatever the body.
        self.plane.model(name, version)
        header_len = header_length(request.headers)
        from agent.serving.tensors import decode_request

        req = decode_request(request.body, header_len)
        return infer_response(await self.plane.infer(name, version, req))


def _ready_only(body: Any) -> bool:
    """The repository index request's optional ``{"ready": true}``."""
    if not body:
        return False
    import json

    try:
        doc = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError("request body is not valid JSON", code="bad-json") from None
    if not isinstance(doc, dict):
        raise InvalidInputError("request body must be a JSON object", code="bad-json")
    return bool(doc.get("ready", False))


def _allow(method: str, allowed: str, path: str) -> None:
    """405 unless ``method`` is ``allowed`` (HEAD goes wherever GET does: the server
    sends the headers only)."""
    if method != allowed and not (method == "HEAD" and allowed == "GET"):
        allow = "GET, HEAD" if allowed == "GET" else allowed
        exc = MethodNotAllowedError(f"{method} is not allowed on {path[:200]}; use {allow}")
        exc.allow = allow
        raise exc
