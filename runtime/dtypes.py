"""The one table of KServe / Open Inference Protocol v2 datatypes and their numpy dtypes.

Its own small module (numpy and the error tree only) so that the serving wire codec
(``agent/serving/tensors.py``, also imported by the client) and the backends share it
without importing the rest of the runtime. Dtypes are little-endian, the wire byte
order (and the byte order of every device Edgeward runs on).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.errors import InvalidInputError, RuntimeBackendError

__all__ = ["DATATYPES", "numpy_dtype", "v2_datatype"]

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_DTYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPES.items()}


def v2_datatype(dtype: Any) -> str:
    """numpy dtype → v2 datatype name (``float32`` → ``"FP32"``; text → ``"BYTES"``)."""
    dt = np.dtype(dtype)
    if dt.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _BY_DTYPE[dt]
    except KeyError:
        raise RuntimeBackendError(
            f"dtype {dt} has no KServe v2 datatype", code="unsupported-dtype"
        ) from None


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """v2 datatype name → numpy dtype (``"FP32"`` → ``float32``)."""
    try:
        return DATATYPES[datatype.upper()]
    except KeyError:
        raise InvalidInputError(
            f"unknown datatype {datatype!r}; allowed: {', '.join(DATATYPES)}",
            code="bad-datatype",
        ) from None
