"""Edgeward runtime: backends, converters, run-script host and worker processes.

Public API (see docs/RUNTIME.md): :func:`open_model` turns an unpacked package into a
:class:`Servable`; :func:`self_test` checks it against the package's samples.
"""

from runtime.backend import Backend, TensorSpec, make_backend, numpy_dtype, v2_datatype
from runtime.config import DelegateSpec, LiteRTOptions, OnnxOptions, RuntimeConfig
from runtime.converter import Converted, ConverterConfig
from runtime.fingerprint import device_fingerprint, device_info
from runtime.loader import PackageInfo, Servable, open_model, read_package, self_test

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
