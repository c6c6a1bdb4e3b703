"""LiteRT (TFLite) backend.

Import order: ``ai_edge_litert.interpreter`` first, then ``tflite_runtime.interpreter``
(vendor NPU images often ship only that one). ``tflite_runtime`` crashes under numpy 2,
so it is only a fallback.

Thread safety: a TFLite ``Interpreter`` is *not* thread-safe (its input/output tensors
are shared state). The backend keeps a pool of ``litert.pool_size`` interpreters
(default 1); each ``predict`` checks one out, so at most ``pool_size`` calls run at once
and the rest wait.

Dynamic shapes: a dimension that is ``-1`` in the model's ``shape_signature`` is free;
the interpreter is resized (``resize_tensor_input`` + ``allocate_tensors``) when a request
has a different shape. A model with a fixed batch of 1 still accepts a batch of N: the
backend runs the N items one by one and concatenates the outputs.

External delegates (``litert.delegates``): each ``.so`` is checked with ``ctypes`` before
``load_delegate`` (which leaves a half-built object behind on failure). A required
delegate that is missing or fails is a :class:`RuntimeBackendError` (code
``delegate-load``); an optional one is dropped with a warning.
"""

from __future__ import annotations

import ctypes
import logging
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InvalidInputError, RuntimeBackendError
from runtime.backend import Backend, TensorSpec, bytes_array
from runtime.config import DelegateSpec, LiteRTOptions

logger = logging.getLogger(__name__)


def _import_interpreter() -> tuple[Any, Callable[..., Any], Any, str]:
    """(Interpreter class, load_delegate, OpResolverType or None, module name)."""
    try:
        from ai_edge_litert import interpreter as mod

        return mod.Interpreter, mod.load_delegate, mod.OpResolverType, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as mod  # type: ignore[import-not-found,unused-ignore]

        return (
            mod.Interpreter,
            mod.load_delegate,
            getattr(mod, "OpResolverType", None),
            "tflite_runtime",
        )
    except ImportError:
        raise RuntimeBackendError(
            "no TFLite interpreter: install ai-edge-litert (or tflite-runtime)",
            code="backend-missing",
        ) from None


def litert_version() -> str:
    """Version of the interpreter package in use (for the device fingerprint)."""
    try:
        from importlib.metadata import version

        for dist in ("ai-edge-litert", "tflite-runtime"):
            try:
                return f"{dist}=={version(dist)}"
            except Exception:  # noqa: S112 - try the next distribution
                continue
    except ImportError:  # pragma: no cover
        pass
    return "none"


def load_delegates(specs: list[DelegateSpec]) -> list[Any]:
    """Load external delegates; optional ones that fail are skipped with a warning.

    Raises:
        RuntimeBackendError: a required delegate is missing or fails (``delegate-load``).
    """
    _, load_delegate, _, _ = _import_interpreter()
    loaded = []
    for spec in specs:
        try:
            path = Path(spec.path)
            if not path.is_file():
                raise RuntimeBackendError(
                    f"TFLite delegate {spec.path} does not exist", code="delegate-load"
                )
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise RuntimeBackendError(
                    f"TFLite delegate {spec.path} cannot be loaded: {exc}", code="delegate-load"
                ) from None
            if not hasattr(lib, "tflite_plugin_create_delegate"):
                raise RuntimeBackendError(
                    f"TFLite delegate {spec.path} is not an external delegate "
                    "(no tflite_plugin_create_delegate symbol)",
                    code="delegate-load",
                )
            try:
                loaded.append(load_delegate(str(path), dict(spec.options)))
            except Exception as exc:
                raise RuntimeBackendError(
                    f"TFLite delegate {spec.path} failed: {exc}", code="delegate-load"
                ) from None
        except RuntimeBackendError as exc:
            if spec.required:
                raise
            logger.warning("optional delegate skipped: %s", exc.message)
    return loaded


class LiteRTBackend(Backend):
    """A pool of TFLite interpreters over one model file."""

    kind = "litert"
    platform = "tensorflow_lite"

    def __init__(
        self,
        model_path: Path,
        config: Any = None,
        *,
        delegates: list[DelegateSpec] | None = None,
    ):
        super().__init__(model_path, config)
        # The converter may pass the delegate selection it validated.
        self._delegate_specs = (
            list(delegates) if delegates is not None else list(self.config.litert.delegates)
        )
        self._pool: queue.Queue[_Slot] = queue.Queue()
        self._slots: list[_Slot] = []
        self._signature: dict[str, tuple[int, ...]] = {}
        self._split_batch = False
        self.module = ""

    @property
    def delegate_paths(self) -> list[str]:
        return [d.path for d in self._delegate_specs]

    def _new_interpreter(self, opts: LiteRTOptions) -> Any:
        interp_cls, _, resolver, self.module = _import_interpreter()
        kwargs: dict[str, Any] = {"model_path": str(self.model_path)}
        if opts.num_threads:
            kwargs["num_threads"] = opts.num_threads
        delegates = load_delegates(self._delegate_specs)
        if delegates:
            kwargs["experimental_delegates"] = delegates
        if not opts.use_xnnpack and resolver is not None:
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            interp = interp_cls(**kwargs)
            interp.allocate_tensors()
        except Exception as exc:
            raise RuntimeBackendError(
                f"LiteRT cannot load {self.model_path.name}: {exc}", code="model-load"
            ) from exc
        return interp

    def _load(self) -> None:
        opts = self.config.litert
        self._slots = [_Slot(self._new_interpreter(opts)) for _ in range(max(1, opts.pool_size))]
        for s in self._slots:
            self._pool.put(s)
        interp = self._slots[0].interp
        ins = interp.get_input_details()
        outs = interp.get_output_details()
        self._inputs = [_spec(d) for d in ins]
        self._outputs = [_spec(d) for d in outs]
        self._signature = {d["name"]: tuple(int(x) for x in d["shape"]) for d in ins}
        # Fixed batch 1 everywhere: accept batch N by running items one by one.
        sig_in = [s.shape for s in self._inputs]
        sig_out = [s.shape for s in self._outputs]
        self._split_batch = all(
            s is not None and len(s) >= 1 and s[0] == 1 for s in sig_in + sig_out
        )
        if self._split_batch:
            self._inputs = [_free_batch(s) for s in self._inputs]
            self._outputs = [_free_batch(s) for s in self._outputs]

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._split_batch:
            n = {a.shape[0] for a in inputs.values()}
            if len(n) != 1:
                raise InvalidInputError(
                    f"{self.model_path.name}: inputs disagree on the batch size: "
                    f"{ {k: v.shape[0] for k, v in inputs.items()} }"
                )
            batch = n.pop()
            if batch != 1:
                parts = [
                    self._run_one({k: v[i : i + 1] for k, v in inputs.items()})
                    for i in range(batch)
                ]
                if not parts:
                    return {
                        o.name: np.zeros((0, *(o.shape or ())[1:]), o.dtype) for o in self._outputs
                    }
                return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._run_one(inputs)

    def _run_one(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot = self._pool.get()
        try:
            return slot.run(inputs, self.model_path.name)
        finally:
            self._pool.put(slot)

    def _unload(self) -> None:
        self._slots = []
        self._pool = queue.Queue()


class _Slot:
    """One interpreter plus the shapes it is currently allocated for."""

    def __init__(self, interp: Any):
        self.interp = interp
        self.in_details = {d["name"]: d for d in interp.get_input_details()}
        self.out_details = interp.get_output_details()
        self.shapes = {n: tuple(int(x) for x in d["shape"]) for n, d in self.in_details.items()}

    def run(self, inputs: dict[str, np.ndarray], model: str) -> dict[str, np.ndarray]:
        it = self.interp
        resized = False
        for name, arr in inputs.items():
            if arr.shape != self.shapes.get(name):
                try:
                    it.resize_tensor_input(self.in_details[name]["index"], list(arr.shape))
                except Exception as exc:
                    self.shapes = {}
                    raise InvalidInputError(
                        f"{model}: input {name!r} cannot take shape {list(arr.shape)}: {exc}"
                    ) from exc
                resized = True
        try:
            if resized:
                it.allocate_tensors()
                self.out_details = it.get_output_details()
                self.shapes.update({n: a.shape for n, a in inputs.items()})
            for name, value in inputs.items():
                # a TFLite string tensor takes bytes elements
                arr = bytes_array(value, name) if value.dtype.kind in "OU" else value
                it.set_tensor(self.in_details[name]["index"], np.ascontiguousarray(arr))
            it.invoke()
            return {d["name"]: it.get_tensor(d["index"]) for d in self.out_details}
        except Exception as exc:
            # The interpreter may be half-resized: force a resize on the next call.
            self.shapes = {}
            if isinstance(exc, InvalidInputError):
                raise
            raise RuntimeBackendError(
                f"{model}: LiteRT failed: {exc}", code="inference-failed"
            ) from exc


def _spec(d: dict[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature")
    shape = sig if sig is not None and len(sig) else d["shape"]
    return TensorSpec(str(d["name"]), np.dtype(d["dtype"]), tuple(int(x) for x in shape))


def _free_batch(s: TensorSpec) -> TensorSpec:
    assert s.shape is not None
    return TensorSpec(s.name, s.dtype, (-1, *s.shape[1:]))
