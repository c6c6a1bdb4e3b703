"""Edgeward runtime: backends, converters, the run-script host and the device fingerprint.

Public API (see docs/RUNTIME.md): :func:`open_model` turns an unpacked package into a
:class:`Servable`; :func:`self_test` checks it against the package's samples.

Names are imported on first use (PEP 562): a process that needs one module (the
client's dtype table, the daemon's typed config) does not load converters and loaders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.backend import Backend, TensorSpec, make_backend
    from runtime.config import DelegateSpec, LiteRTOptions, OnnxOptions, RuntimeConfig
    from runtime.converter import Converted, ConverterConfig
    from runtime.dtypes import numpy_dtype, v2_datatype
    from runtime.fingerprint import device_fingerprint, device_info
    from runtime.loader import PackageInfo, Servable, open_model, read_package, self_test

_HOME = {
    "Backend": "runtime.backend",
    "TensorSpec": "runtime.backend",
    "make_backend": "runtime.backend",
    "DelegateSpec": "runtime.config",
    "LiteRTOptions": "runtime.config",
    "OnnxOptions": "runtime.config",
    "RuntimeConfig": "runtime.config",
    "Converted": "runtime.converter",
    "ConverterConfig": "runtime.converter",
    "numpy_dtype": "runtime.dtypes",
    "v2_datatype": "runtime.dtypes",
    "device_fingerprint": "runtime.fingerprint",
    "device_info": "runtime.fingerprint",
    "PackageInfo": "runtime.loader",
    "Servable": "runtime.loader",
    "open_model": "runtime.loader",
    "read_package": "runtime.loader",
    "self_test": "runtime.loader",
}

__all__ = [
    "Backend",
    "Converted",
    "ConverterConfig",
    "DelegateSpec",
    "LiteRTOptions",
    "OnnxOptions",
    "PackageInfo",
    "RuntimeConfig",
    "Servable",
    "TensorSpec",
    "device_fingerprint",
    "device_info",
    "make_backend",
    "numpy_dtype",
    "open_model",
    "read_package",
    "self_test",
    "v2_datatype",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
