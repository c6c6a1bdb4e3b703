"""Run-script host (GB/T 42382.2 §8.2.3 *Scripts*).

A package's run script (``Program/Scripts/run.py`` or ``runtime_config.run_script``) is a
Python module that defines::

    class Model:
        thread_safe = False          # optional; True lets calls run concurrently
        def __init__(self, model_dir: Path, backend: Backend, config: dict): ...
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
        def metadata(self) -> dict: ...   # optional: {"inputs": [...], "outputs": [...]}
        def close(self) -> None: ...      # optional

``config`` holds the package's ``runtime_config`` and ``converter_config`` (keys
``"runtime_config"``, ``"converter_config"``). The script is third-party code: it runs in
the model's worker process (crash isolation is the worker's job). Any exception from
import, ``__init__`` or ``predict`` becomes :class:`RunScriptError` (code ``run-script``)
naming the script and the exception's last line; an :class:`EdgewardError` the script
raises on purpose (for example ``InvalidInputError`` for a bad request) passes through.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import sys
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import EdgewardError, RunScriptError
from runtime.backend import Backend, TensorSpec, check_output, validate_inputs

logger = logging.getLogger(__name__)

_counter = itertools.count()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    lines = traceback.format_exception_only(type(exc), exc)
    last = lines[-1].strip() if lines else type(exc).__name__
    return last


class RunScript:
    """A loaded run script wrapped so that failures are :class:`RunScriptError`."""

    def __init__(
        self, path: Path, model_dir: Path, backend: Backend, config: Mapping[str, Any]
    ) -> None:
        self.path = path
        self._lock: threading.Lock | None = None
        module = self._import(path)
        cls = getattr(module, "Model", None)
        if not isinstance(cls, type):
            raise RunScriptError(f"run script {path} defines no class Model")
        if not callable(getattr(cls, "predict", None)):
            raise RunScriptError(f"run script {path}: class Model has no predict method")
        try:
            self._obj = cls(model_dir, backend, dict(config))
        except EdgewardError:
            raise
        except Exception as exc:
            raise RunScriptError(f"run script {path}: Model() failed: {_describe(exc)}") from exc
        if not getattr(cls, "thread_safe", False):
            self._lock = threading.Lock()
        self._in_specs: list[TensorSpec] | None = None
        self._meta: dict[str, Any] | None = None
        if callable(getattr(self._obj, "metadata", None)):
            try:
                meta = self._obj.metadata()
                if not isinstance(meta, Mapping):
                    raise TypeError(f"metadata() returned {type(meta).__name__}, not a dict")
                self._meta = {}
                for key in ("inputs", "outputs"):
                    if key in meta:
                        specs = [TensorSpec.from_v2(d) for d in meta[key]]
                        self._meta[key] = [s.to_v2() for s in specs]
                        if key == "inputs":
                            self._in_specs = specs
            except Exception as exc:
                raise RunScriptError(
                    f"run script {path}: metadata() is not v2 metadata: {_describe(exc)}"
                ) from exc

    @staticmethod
    def _import(path: Path) -> Any:
        name = f"edgeward_run_script_{next(_counter)}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise RunScriptError(f"run script {path} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        # Helper modules next to the script are importable (worker process: one package).
        script_dir = str(path.parent)
        if script_dir not in sys.path:
            sys.path.append(script_dir)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise RunScriptError(f"run script {path} failed to import: {_describe(exc)}") from exc
        return module

    def metadata(self) -> dict[str, Any] | None:
        """The script's declared v2 ``inputs``/``outputs`` (either may be absent: the
        model's own then apply), or None if it has no ``metadata()``."""
        return self._meta

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Call the script; names and datatypes are checked against its declared
        inputs (shapes are the script's business: an image may come encoded or raw)."""
        if self._in_specs is not None:
            inputs = validate_inputs(
                inputs, self._in_specs, check_shape=False, model=self.path.name
            )
        try:
            if self._lock is not None:
                with self._lock:
                    out = self._obj.predict(dict(inputs))
            else:
                out = self._obj.predict(dict(inputs))
        except EdgewardError:
            raise
        except Exception as exc:
            raise RunScriptError(
                f"run script {self.path}: predict failed: {_describe(exc)}"
            ) from exc
        if not isinstance(out, Mapping) or not all(isinstance(k, str) for k in out):
            raise RunScriptError(
                f"run script {self.path}: predict must return dict[str, ndarray], "
                f"got {type(out).__name__}"
            )
        try:
            arrays = {k: np.asarray(v) for k, v in out.items()}
        except Exception as exc:
            raise RunScriptError(
                f"run script {self.path}: output is not array-like: {_describe(exc)}"
            ) from exc
        for k, a in arrays.items():
            check_output(k, a, f"run script {self.path}")
        return arrays

    def close(self) -> None:
        fn = getattr(self._obj, "close", None)
        if callable(fn):
            try:
                fn()
            except Exception as exc:  # closing must not mask the caller's own work
                logger.warning("run script %s close() failed: %s", self.path, _describe(exc))


def load_run_script(
    path: Path, model_dir: Path, backend: Backend, config: Mapping[str, Any]
) -> RunScript:
    """Import and instantiate a run script (see module docstring for the interface)."""
    if not path.is_file():
        raise RunScriptError(f"run script {path} does not exist")
    return RunScript(path, model_dir, backend, config)
