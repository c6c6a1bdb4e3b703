"""A validation reference that reads an ONNX model's weights where they lie in the file.

The converter validates what it serves against the unconverted model (a second ORT
session). Loaded the ordinary way, that reference copies every weight (protobuf parse,
then the initializer tensors): for a weight-heavy model it costs about half of a
serving session's load and as much memory again, on the critical path of an update.

Here the model file is memory-mapped and scanned (protobuf wire format, headers only;
the weight bytes are never touched): each large top-level initializer held as
``raw_data`` becomes a numpy view of the mapping, handed to ORT as a shared initializer
(``SessionOptions.add_initializer``: ORT uses the caller's buffer, no copy), and the
session loads a *skeleton* of the model: the same bytes with those ``raw_data`` fields
replaced by an external-data reference to the model file itself (which ORT checks
exists but never reads, the initializer being supplied). The weights come from the page
cache the unpacker just filled. Anything the scan does not understand (segments,
strings, exotic types, a big-endian host) stays embedded in the skeleton, loaded as ORT
always does; :func:`shared_weights_session` returns None when there is nothing to gain.
"""

from __future__ import annotations

import mmap
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["shared_weights_session", "skeleton"]

MIN_SHARED = 1 << 20  # initializers at least this large are shared, smaller ones copied

# ONNX TensorProto.DataType -> numpy (raw_data is little-endian, fixed-size types only)
_DTYPES: dict[int, Any] = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
# hosts whose loads need no natural alignment (raw_data sits at any byte offset)
_UNALIGNED_OK = frozenset({"x86_64", "amd64", "aarch64", "arm64"})


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _enc(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of one message."""
    pos = start
    while pos < end:
        key, p = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, q = _varint(buf, p)
            yield num, wt, pos, p, q
        elif wt == 1:
            q = p + 8
            yield num, wt, pos, p, q
        elif wt == 5:
            q = p + 4
            yield num, wt, pos, p, q
        elif wt == 2:
            n, p = _varint(buf, p)
            q = p + n
            yield num, wt, pos, p, q
        else:
            raise ValueError(f"protobuf wire type {wt} not expected in a model")
        if q > end:
            raise ValueError("protobuf field runs past its message")
        pos = q


def _ld(num: int, payload: bytes) -> bytes:
    return _enc(num << 3 | 2) + _enc(len(payload)) + payload


Initializer = tuple[str, int, tuple[int, ...], int, int]  # name, type, dims, offset, end


def _tensor(buf: Any, start: int, end: int) -> tuple[Initializer, int] | None:
    """A TensorProto whose data is a plain ``raw_data`` field: (name, data type, dims,
    raw data offset, its end) and where that field starts; else None."""
    name, dtype, dims, raw = "", 0, [], None
    for num, wt, fs, vs, ve in _fields(buf, start, end):
        if num == 1 and wt == 0:
            dims.append(_varint(buf, vs)[0])
        elif num == 1 and wt == 2:  # packed dims
            p = vs
            while p < ve:
                d, p = _varint(buf, p)
                dims.append(d)
        elif num == 2 and wt == 0:
            dtype = _varint(buf, vs)[0]
        elif num == 8 and wt == 2:
            name = bytes(buf[vs:ve]).decode("utf-8")
        elif num == 9 and wt == 2:
            raw = (fs, vs, ve)
        elif num in (3, 13, 14):  # segment, external data, data location
            return None
    if raw is None or not name:
        return None
    return (name, dtype, tuple(dims), raw[1], raw[2]), raw[0]


def skeleton(
    buf: Any, location: str, min_bytes: int = MIN_SHARED
) -> tuple[bytes, list[Initializer]]:
    """The model in ``buf`` with every top-level initializer of ``min_bytes`` or more
    of raw data pointing at ``location`` (external data at its own offset), and those
    initializers: (name, data type, dims, offset, length)."""
    out = bytearray()
    found: list[Initializer] = []
    last = 0
    for num, wt, fs, vs, ve in _fields(buf, 0, len(buf)):
        if num != 7 or wt != 2:  # ModelProto.graph
            continue
        graph = bytearray()
        glast = vs
        for gnum, gwt, gfs, gvs, gve in _fields(buf, vs, ve):
            if gnum != 5 or gwt != 2:  # GraphProto.initializer
                continue
            got = _tensor(buf, gvs, gve)
            if got is None:
                continue
            t, fstart = got
            _name, dtype, dims, rs, re_ = t
            if re_ - rs < min_bytes or dtype not in _DTYPES:
                continue
            if int(np.prod(dims, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize != re_ - rs:
                continue
            # the tensor without its raw_data field, plus where its bytes lie in the file
            ext = (
                _ld(13, _ld(1, b"location") + _ld(2, location.encode()))
                + _ld(13, _ld(1, b"offset") + _ld(2, str(rs).encode()))
                + _ld(13, _ld(1, b"length") + _ld(2, str(re_ - rs).encode()))
                + _enc(14 << 3)
                + _enc(1)  # data_location = EXTERNAL
            )
            tensor = bytes(buf[gvs:fstart]) + bytes(buf[re_:gve]) + ext
            graph += bytes(buf[glast:gfs]) + _ld(5, tensor)
            glast = gve
            found.append(t)
        graph += bytes(buf[glast:ve])
        out += bytes(buf[last:fs]) + _ld(7, bytes(graph))
        last = ve
    out += bytes(buf[last:])
    return bytes(out), found


def shared_weights_session(model_path: Path, so: Any, providers: list[str], **kw: Any) -> Any:
    """An ORT session of ``model_path`` whose large weights are the file's mapped pages
    (see the module docstring), or None when the model has none to share or the host
    cannot read them in place. ``so`` is consumed (initializers are added to it)."""
    import onnxruntime as ort

    if sys.byteorder != "little":
        return None
    unaligned_ok = platform.machine().lower() in _UNALIGNED_OK
    with open(model_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < MIN_SHARED:
            return None
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    skel, found = skeleton(mm, model_path.name, MIN_SHARED)
    keep: list[Any] = []
    for name, dtype, dims, start, end in found:
        dt = np.dtype(_DTYPES[dtype])
        if start % dt.itemsize and not unaligned_ok:
            return None  # would have to copy: the ordinary load does that as well
        arr = np.frombuffer(mm, dtype=dt, count=(end - start) // dt.itemsize, offset=start)
        value = ort.OrtValue.ortvalue_from_numpy(arr.reshape(dims))
        so.add_initializer(name, value)
        keep.append((arr, value))
    if not found:
        return None
    # external data is looked up beside the model; the skeleton's own references point
    # at the model file itself (supplied above, never read)
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(model_path.parent.resolve())
    )
    sess = ort.InferenceSession(skel, sess_options=so, providers=providers, **kw)
    sess._edgeward_shared = (mm, keep)  # the mapping lives as long as the session
    return sess
