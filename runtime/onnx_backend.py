"""ONNX Runtime backend.

Thread safety: ``InferenceSession.run`` is documented thread-safe, so one session serves
concurrent callers without a lock.

Providers: see :class:`runtime.config.OnnxOptions`. A provider name ORT does not know
is a :class:`ConfigError`; a known but unavailable one falls back to the next provider
(CPU last) with a warning unless ``unavailable_providers = "error"``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InvalidInputError, RuntimeBackendError
from runtime.backend import Backend, TensorSpec, text_array
from runtime.config import OnnxOptions

logger = logging.getLogger(__name__)

_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}

CPU = "CPUExecutionProvider"
# ORT messages that mean "this input does not fit the graph" (sizes a conv stack or a
# broadcast cannot take), i.e. the caller's fault (400), not an engine failure (500).
_INPUT_FAULT_WORDS = ("invalid_argument", "broadcast", "shape", "dimension")


def resolve_providers(opts: OnnxOptions) -> tuple[list[str], list[dict[str, Any]]]:
    """Turn configured providers into the list this box can actually use.

    Raises:
        ConfigError: a provider name ORT does not know (likely a typo).
        RuntimeBackendError: a known provider is unavailable and the policy is "error".
    """
    import onnxruntime as ort

    from runtime.providers import unknown_provider_error

    known = set(ort.get_all_providers())
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for p in opts.providers:
        if p not in known:
            raise unknown_provider_error(p, known)
        if p not in available:
            if opts.unavailable_providers == "error":
                raise RuntimeBackendError(
                    f"execution provider {p} is not available on this device "
                    f"(available: {', '.join(sorted(available))})",
                    code="provider-unavailable",
                )
            logger.warning("execution provider %s is not available here; skipping it", p)
            continue
        if p not in chosen:
            chosen.append(p)
    if CPU not in chosen:
        chosen.append(CPU)
    options = [dict(opts.provider_options.get(p, {})) for p in chosen]
    return chosen, options


def session_options(
    opts: OnnxOptions,
    *,
    level: str | None = None,
    optimized_out: Path | None = None,
    prepack: bool = True,
) -> Any:
    """ORT ``SessionOptions`` from config; ``optimized_out`` makes ORT save the optimised
    graph there (the built-in converter uses this); ``prepack=False`` skips re-laying
    out weights for faster kernels (a validation reference runs a few inputs only)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so.graph_optimization_level = levels[level or opts.graph_optimization_level]
    if opts.intra_op_threads is not None:
        so.intra_op_num_threads = opts.intra_op_threads
    if opts.inter_op_threads is not None:
        so.inter_op_num_threads = opts.inter_op_threads
        if opts.inter_op_threads > 1:
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if opts.allow_spinning is not None:
        flag = "1" if opts.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", flag)
        so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    # Fatal only: run errors reach the caller as exceptions; ORT's own stderr lines
    # would duplicate them (and warnings are noise in the daemon log).
    so.log_severity_level = 4
    return so


def create_session(
    model_path: Path,
    opts: OnnxOptions,
    *,
    level: str | None = None,
    optimized_out: Path | None = None,
    prepack: bool = True,
    shared_weights: bool = False,
) -> Any:
    """An ``InferenceSession`` with the configured providers. ``shared_weights``: large
    weights are read in place from the mapped file (:mod:`runtime.onnx_weights`; for a
    short-lived validation reference), falling back to the ordinary load.

    Raises:
        RuntimeBackendError: ORT refuses the model (code ``model-load``).
    """
    import onnxruntime as ort

    providers, provider_options = resolve_providers(opts)
    sess = None
    if shared_weights:
        from runtime.onnx_weights import shared_weights_session

        so = session_options(opts, level=level, optimized_out=optimized_out, prepack=prepack)
        try:
            sess = shared_weights_session(
                model_path, so, providers, provider_options=provider_options
            )
        except Exception as exc:  # the ordinary load below decides (and reports) for good
            logger.debug("%s: no shared-weights session (%s)", model_path.name, exc)
    so = session_options(opts, level=level, optimized_out=optimized_out, prepack=prepack)
    try:
        if sess is None:
            sess = ort.InferenceSession(
                str(model_path),
                sess_options=so,
                providers=providers,
                provider_options=provider_options,
            )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... classes
        raise RuntimeBackendError(
            f"onnxruntime cannot load {model_path.name}: {_last_line(exc)}", code="model-load"
        ) from exc
    got = sess.get_providers()
    lost = [p for p in providers if p not in got]
    if lost:
        if opts.unavailable_providers == "error":
            raise RuntimeBackendError(
                f"execution provider(s) {', '.join(lost)} failed to initialise for "
                f"{model_path.name}",
                code="provider-unavailable",
            )
        logger.warning("providers %s failed to initialise; running on %s", lost, got)
    return sess


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _spec(arg: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise RuntimeBackendError(
            f"tensor {arg.name} has unsupported type {arg.type}", code="unsupported-dtype"
        )
    shape = arg.shape
    dims = None if shape is None else tuple(d if isinstance(d, int) else -1 for d in shape)
    return TensorSpec(arg.name, np.dtype(dtype), dims)


class OnnxBackend(Backend):
    """One ``InferenceSession``; thread-safe ``predict``."""

    kind = "onnxruntime"
    platform = "onnxruntime_onnx"

    def __init__(
        self,
        model_path: Path,
        config: Any = None,
        *,
        level: str | None = None,
        optimized_out: Path | None = None,
        prepack: bool = True,
        shared_weights: bool = False,
    ):
        super().__init__(model_path, config)
        self._level = level
        self._optimized_out = optimized_out  # the converter: ORT saves its graph here
        self._prepack = prepack
        self._shared_weights = shared_weights  # weights read in place (a reference)
        self._session: Any = None
        self._output_names: list[str] = []
        self._text_inputs: list[str] = []

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session is not None else []

    def _load(self) -> None:
        self._session = create_session(
            self.model_path,
            self.config.onnx,
            level=self._level,
            optimized_out=self._optimized_out,
            prepack=self._prepack,
            shared_weights=self._shared_weights,
        )
        self._inputs = [_spec(a) for a in self._session.get_inputs()]
        self._outputs = [_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        self._text_inputs = [s.name for s in self._inputs if s.dtype.kind == "O"]

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self._text_inputs:
            if name in inputs:
                inputs[name] = text_array(inputs[name], name)
        try:
            results = self._session.run(self._output_names, inputs)
        except Exception as exc:
            # Shapes that pass the signature check can still be wrong for the graph
            # (e.g. spatial sizes a conv stack cannot take): the caller's fault.
            msg = _last_line(exc)
            text = str(exc).lower()
            if any(w in text for w in _INPUT_FAULT_WORDS):
                raise InvalidInputError(
                    f"{self.model_path.name}: the model cannot run on these inputs: {msg}"
                ) from exc
            raise RuntimeBackendError(
                f"{self.model_path.name}: onnxruntime failed: {msg}", code="inference-failed"
            ) from exc
        return dict(zip(self._output_names, results, strict=True))

    def _unload(self) -> None:
        self._session = None
