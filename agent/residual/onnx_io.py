"""ONNX: a protobuf wire-format scanner for initializer payloads.

Only ModelProto.graph (field 7) → GraphProto.initializer (field 5) → TensorProto is
read: dims (1), data_type (2), name (8), raw_data (9), external_data (13),
data_location (14), and packed float_data (4) / double_data (10) of FLOAT / DOUBLE
tensors, whose bytes are laid out exactly like raw_data. Weights held by top-level
``Constant`` nodes (GraphProto.node 1 → NodeProto op_type 4 == "Constant", attribute 5
→ AttributeProto name 1 == "value", t 5), as exporters such as Paddle2ONNX write them,
count too, keyed by the node's first output. Initializers in subgraphs and functions,
and tensors stored as int32_data/int64_data/… (varints), are left in the skeleton
(copied as bytes).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from agent.errors import FormatError, ResidualError

from . import quant
from .layout import Hole, Layout, safe_location, typed_or_opaque, unique_key

ONNX_DTYPES = {
    1: quant.F32,
    2: quant.U8,
    3: quant.I8,
    4: quant.U16,
    5: quant.I16,
    6: quant.I32,
    7: quant.I64,
    9: quant.BOOL,
    10: quant.F16,
    11: quant.F64,
    12: quant.U32,
    13: quant.U64,
    16: quant.BF16,
}


def _bad(path: Path, what: str) -> FormatError:
    return FormatError(f"{path} is not a valid ONNX protobuf ({what})", code="residual-format")


def _varint(buf: mmap.mmap | bytes, pos: int, end: int, path: Path) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _bad(path, "truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(
    buf: mmap.mmap | bytes, start: int, end: int, path: Path
) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, varint value) in [start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end, path)
        fn, wt = key >> 3, key & 7
        if fn == 0:
            raise _bad(path, "field number 0")
        if wt == 0:
            v, nxt = _varint(buf, pos, end, path)
            yield fn, wt, pos, nxt, v
            pos = nxt
        elif wt == 2:
            n, pos = _varint(buf, pos, end, path)
            if pos + n > end:
                raise _bad(path, "length past the end")
            yield fn, wt, pos, pos + n, n
            pos += n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            if pos + n > end:
                raise _bad(path, "truncated fixed field")
            yield fn, wt, pos, pos + n, 0
            pos += n
        else:
            raise _bad(path, f"wire type {wt}")


def _tensor(
    buf: mmap.mmap, start: int, end: int, path: Path
) -> tuple[str, int, tuple[int, ...], tuple[int, int] | None, dict[str, str], int]:
    dims: list[int] = []
    dt = 0
    name = ""
    raw: tuple[int, int] | None = None
    packed: tuple[int, int, int] | None = None
    ext: dict[str, str] = {}
    loc = 0
    for fn, wt, a, b, v in _fields(buf, start, end, path):
        if fn == 1:
            if wt == 0:
                dims.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif wt == 2:
                p = a
                while p < b:
                    d, p = _varint(buf, p, b, path)
                    dims.append(d - (1 << 64) if d >= 1 << 63 else d)
        elif fn == 2 and wt == 0:
            dt = v
        elif fn == 8 and wt == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif fn == 9 and wt == 2:
            raw = (a, b - a)
        elif fn in (4, 10) and wt == 2 and raw is None:
            # packed float_data (fixed32) / double_data (fixed64): the same bytes as
            # raw_data would hold, so the payload is a hole just the same
            packed = (a, b - a, fn)
        elif fn == 13 and wt == 2:
            k = val = ""
            for fn2, wt2, a2, b2, _ in _fields(buf, a, b, path):
                if wt2 == 2 and fn2 in (1, 2):
                    s = bytes(buf[a2:b2]).decode("utf-8", "replace")
                    k, val = (s, val) if fn2 == 1 else (k, s)
            ext[k] = val
        elif fn == 14 and wt == 0:
            loc = v
    if raw is None and packed is not None and (packed[2], dt) in ((4, 1), (10, 11)):
        raw = packed[:2]
    return name, dt, tuple(dims), raw, ext, loc


def _constant(
    buf: mmap.mmap, start: int, end: int, path: Path
) -> tuple[str, tuple[int, int]] | None:
    """(first output, TensorProto range) of a ``Constant`` node with a ``value``."""
    op = domain = out = ""
    tensor: tuple[int, int] | None = None
    for fn, wt, a, b, _ in _fields(buf, start, end, path):
        if wt != 2:
            continue
        if fn == 4:
            op = bytes(buf[a:b]).decode("utf-8", "replace")
        elif fn == 7:
            domain = bytes(buf[a:b]).decode("utf-8", "replace")
        elif fn == 2 and not out:
            out = bytes(buf[a:b]).decode("utf-8", "replace")
        elif fn == 5:
            aname = ""
            t: tuple[int, int] | None = None
            for afn, awt, aa, ab, _ in _fields(buf, a, b, path):
                if afn == 1 and awt == 2:
                    aname = bytes(buf[aa:ab]).decode("utf-8", "replace")
                elif afn == 5 and awt == 2:
                    t = (aa, ab)
            if aname == "value" and t is not None:
                tensor = t
    if op != "Constant" or domain not in ("", "ai.onnx") or tensor is None or not out:
        return None
    return out, tensor


def scan(path: Path) -> Layout:
    path = Path(path)
    size = os.path.getsize(path)
    layout = Layout("onnx", [path], [""], [size])
    if size == 0:
        raise _bad(path, "empty file")
    seen: set[str] = set()
    ext_files: dict[str, int] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for fn, wt, a, b, _ in _fields(buf, 0, size, path):
            if fn != 7 or wt != 2:
                continue
            for gfn, gwt, ga, gb, _ in _fields(buf, a, b, path):
                if gwt != 2:
                    continue
                if gfn == 1:
                    found = _constant(buf, ga, gb, path)
                    if found is None:
                        continue
                    out_name, (ta, tb) = found
                    name, dt, dims, raw, ext, loc = _tensor(buf, ta, tb, path)
                    name = out_name
                elif gfn == 5:
                    name, dt, dims, raw, ext, loc = _tensor(buf, ga, gb, path)
                else:
                    continue
                dtype = ONNX_DTYPES.get(dt, quant.OPAQUE)
                if loc == 1:
                    location = safe_location(ext.get("location", ""))
                    if location not in ext_files:
                        ext_path = path.parent / location
                        try:
                            ext_size = os.path.getsize(ext_path)
                        except OSError:
                            raise ResidualError(
                                f"{path}: external data file {location} is missing",
                                code="residual-io",
                            ) from None
                        ext_files[location] = len(layout.paths)
                        layout.paths.append(ext_path)
                        layout.names.append(location)
                        layout.sizes.append(ext_size)
                    fi = ext_files[location]
                    try:
                        off = int(ext.get("offset", "0"))
                        if "length" in ext:
                            n = int(ext["length"])
                        else:
                            n = quant.ITEMSIZE[dtype] * _count(dims) if dtype else -1
                    except (ValueError, OverflowError):
                        raise _bad(path, f"external data of {name!r}") from None
                    if n <= 0 or off < 0:
                        continue  # unknown extent: the bytes stay skeleton of that file
                    layout.holes.append(
                        typed_or_opaque(
                            unique_key(name, seen), dtype, dims, file=fi, offset=off, nbytes=n
                        )
                    )
                elif raw is not None and raw[1] > 0:
                    layout.holes.append(
                        typed_or_opaque(
                            unique_key(name, seen),
                            dtype,
                            dims,
                            file=0,
                            offset=raw[0],
                            nbytes=raw[1],
                        )
                    )
    return layout


def _count(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= max(d, 0)
    return n


__all__ = ["ONNX_DTYPES", "Hole", "scan"]
