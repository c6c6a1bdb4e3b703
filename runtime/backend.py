"""The one small base class every backend subclasses (MLServer ``MLModel`` style).

A backend owns one model file on one engine. :meth:`Backend.predict` validates the
request against the model's own signature before the engine sees it, so a bad request
is a 400 :class:`InvalidInputError` naming the input, never a native crash or a 500.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.errors import InvalidInputError, InvalidOutputError, RuntimeBackendError
from runtime.config import RuntimeConfig
from runtime.dtypes import numpy_dtype, v2_datatype

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model signature; ``-1`` in ``shape`` is a free dimension."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...] | None  # None: rank unknown, any shape accepted

    def to_v2(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": v2_datatype(self.dtype),
            "shape": list(self.shape) if self.shape is not None else [-1],
        }

    @classmethod
    def from_v2(cls, d: Mapping[str, Any]) -> TensorSpec:
        shape = d.get("shape")
        return cls(
            name=str(d["name"]),
            dtype=numpy_dtype(str(d["datatype"])),
            shape=tuple(int(x) for x in shape) if shape is not None else None,
        )


def validate_inputs(
    inputs: Mapping[str, Any],
    specs: Sequence[TensorSpec],
    *,
    check_shape: bool = True,
    model: str = "model",
) -> dict[str, np.ndarray]:
    """Check names, dtypes and shapes of a request against a signature.

    Returns the inputs as numpy arrays (no copies for arrays already right).

    The one input validator: the in-process API, run scripts, and the daemon's and a
    worker's data plane (over the model's v2 metadata) all refuse a request with the
    same codes, whatever path it took.

    Raises:
        InvalidInputError: ``unknown-input``, ``missing-input``, ``bad-datatype`` or
            ``bad-shape`` (wrong rank, or a fixed dimension that differs); the message
            names the input.
    """
    if not isinstance(inputs, Mapping):
        raise InvalidInputError(f"{model}: inputs must be a mapping of name -> array")
    by_name = {s.name: s for s in specs}
    unknown = [n for n in inputs if n not in by_name]
    if unknown:
        raise InvalidInputError(
            f"{model}: unknown input {unknown[0]!r}; expected {sorted(by_name)}",
            code="unknown-input",
        )
    missing = [n for n in by_name if n not in inputs]
    if missing:
        raise InvalidInputError(f"{model}: missing input {missing[0]!r}", code="missing-input")
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        spec = by_name[name]
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if arr.dtype != spec.dtype and not (
            spec.dtype.kind in _TEXT_KINDS and arr.dtype.kind in _TEXT_KINDS
        ):
            raise InvalidInputError(
                f"{model}: input {name!r} has datatype {_dt_name(arr.dtype)}, "
                f"expected {_dt_name(spec.dtype)}",
                code="bad-datatype",
            )
        if check_shape and spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise InvalidInputError(
                    f"{model}: input {name!r} has shape {list(arr.shape)} (rank {arr.ndim}), "
                    f"expected rank {len(spec.shape)} {list(spec.shape)}",
                    code="bad-shape",
                )
            for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
                if want >= 0 and got != want:
                    raise InvalidInputError(
                        f"{model}: input {name!r} has shape {list(arr.shape)}, expected "
                        f"{list(spec.shape)} (dimension {axis} must be {want})",
                        code="bad-shape",
                    )
        out[name] = arr
    return out


_TEXT_KINDS = ("U", "S", "O")


def text_array(arr: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    """A BYTES tensor as ONNX Runtime takes a string tensor: an object array of ``str``.

    ORT's Python binding stringifies anything else (``bytes`` become ``"b'...'"``) and
    cuts fixed-width ``U`` arrays at an embedded NUL, so every element is decoded here
    (UTF-8; a byte string that is not UTF-8 is refused with 400 ``not-utf8``, since an
    ORT string tensor only takes text from Python)."""
    if arr.dtype.kind == "O" and all(type(v) is str for v in arr.flat):
        return arr
    out = np.empty(arr.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.reshape(-1).tolist()):
        if isinstance(v, bytes):
            try:
                flat[i] = v.decode()
            except UnicodeDecodeError:
                raise InvalidInputError(
                    f"input {name!r}: element {i} is not UTF-8 text; ONNX Runtime string "
                    "tensors take text",
                    code="not-utf8",
                ) from None
        elif isinstance(v, str):
            flat[i] = v
        else:
            raise InvalidInputError(
                f"input {name!r}: element {i} is a {type(v).__name__}, not text",
                code="bad-tensor",
            )
    return out


def bytes_array(arr: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    """A BYTES tensor as an object array of ``bytes`` (``str`` as UTF-8): what LiteRT
    string tensors and run scripts receive."""
    if arr.dtype.kind == "O" and all(type(v) is bytes for v in arr.flat):
        return arr
    out = np.empty(arr.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.reshape(-1).tolist()):
        if isinstance(v, bytes):
            flat[i] = v
        elif isinstance(v, str):
            flat[i] = v.encode("utf-8", "surrogatepass")
        else:
            raise InvalidInputError(
                f"input {name!r}: element {i} is a {type(v).__name__}, not bytes",
                code="bad-tensor",
            )
    return out


_OUTPUT_KINDS = frozenset("biufUSO")


def check_output(name: str, arr: np.ndarray[Any, Any], where: str) -> None:
    """An output a model or run script returned must be a tensor v2 can carry: numbers,
    bools, or text/bytes elements. Anything else (an arbitrary object, a structured
    dtype) is the producer's bug: InvalidOutputError (500 ``invalid-output``)."""
    kind = arr.dtype.kind
    if kind not in _OUTPUT_KINDS or (kind == "f" and arr.dtype.itemsize not in (2, 4, 8)):
        raise InvalidOutputError(f"{where}: output {name!r} has dtype {arr.dtype}, not a tensor")
    if kind == "O":
        for i, v in enumerate(arr.flat):
            if not isinstance(v, (str, bytes)):
                raise InvalidOutputError(
                    f"{where}: output {name!r} element {i} is a {type(v).__name__}; "
                    "text outputs must be str or bytes"
                )


def _signature(
    inputs: Mapping[str, Any],
) -> tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...] | None:
    """What validate_inputs looks at, if every input is already an ndarray; else None."""
    if not isinstance(inputs, dict):
        return None
    sig = tuple((n, v.dtype, v.shape) for n, v in inputs.items() if type(v) is np.ndarray)
    return sig if len(sig) == len(inputs) else None


def _dt_name(dt: np.dtype[Any]) -> str:
    try:
        return f"{v2_datatype(dt)} ({dt})"
    except RuntimeBackendError:
        return str(dt)


class Backend(ABC):
    """Base class: ``load`` → many ``predict`` → ``unload``.

    Subclasses implement :meth:`_load`, :meth:`_run`, :meth:`_unload`, and fill
    ``self._inputs`` / ``self._outputs`` during load. ``predict`` is safe to call from
    several threads at once (each backend documents how it achieves that).
    """

    kind: ClassVar[str] = ""
    platform: ClassVar[str] = ""

    def __init__(self, model_path: Path, config: RuntimeConfig | None = None):
        self.model_path = Path(model_path)
        self.config = config if config is not None else RuntimeConfig()
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._ready = False
        # Input signatures (name, dtype, shape of every input) that passed
        # validate_inputs: a program sends the same shapes on every call.
        self._valid: set[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]] = set()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def load(self) -> None:
        """Load the model; idempotent.

        Raises:
            RuntimeBackendError: the file is missing or the engine refuses it.
        """
        if self._ready:
            return
        if not self.model_path.is_file():
            raise RuntimeBackendError(
                f"{self.kind}: model file {self.model_path} does not exist", code="model-missing"
            )
        self._load()
        self._ready = True
        logger.debug("%s backend loaded %s", self.kind, self.model_path)

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on named arrays.

        Raises:
            InvalidInputError: the request does not match the model signature.
            RuntimeBackendError: the backend is not loaded or the engine failed.
        """
        if not self._ready:
            raise RuntimeBackendError(
                f"{self.kind}: model {self.model_path.name} is not loaded", code="not-loaded"
            )
        sig = _signature(inputs)
        if sig is not None and sig in self._valid:
            return self._run(dict(inputs))
        arrays = validate_inputs(inputs, self._inputs, model=self.model_path.name)
        if sig is not None:
            if len(self._valid) >= 64:
                self._valid.clear()
            self._valid.add(sig)
        return self._run(arrays)

    def unload(self) -> None:
        if not self._ready:
            return
        self._ready = False
        self._unload()

    def metadata(self) -> dict[str, Any]:
        """KServe v2 shape: ``{"platform", "inputs": [{name, datatype, shape}], "outputs"}``."""
        return {
            "platform": self.platform,
            "inputs": [s.to_v2() for s in self._inputs],
            "outputs": [s.to_v2() for s in self._outputs],
        }

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _unload(self) -> None: ...


BACKEND_KINDS: tuple[str, ...] = ("onnxruntime", "litert")


def make_backend(kind: str, model_path: Path, config: RuntimeConfig | None = None) -> Backend:
    """Instantiate (not load) the backend for ``kind``.

    Raises:
        RuntimeBackendError: unknown kind (code ``unknown-backend``).
    """
    if kind == "onnxruntime":
        from runtime.onnx_backend import OnnxBackend

        return OnnxBackend(model_path, config)
    if kind in ("litert", "tflite"):
        from runtime.litert_backend import LiteRTBackend

        return LiteRTBackend(model_path, config)
    raise RuntimeBackendError(
        f"unknown backend {kind!r}; allowed: {', '.join(BACKEND_KINDS)}", code="unknown-backend"
    )
