"""KServe v2 tensor codec: JSON tensors and the binary tensor data extension.

Transport-free: bytes in, numpy arrays out (and back). Used by the server's data plane
(``agent.serving.kserve``) and the client (``agent.client``), so both ends agree by construction.

JSON tensors carry ``data`` in row-major order, flat or nested. With the binary
extension the body is ``<JSON header><raw tensor bytes…>``; the header length travels in
the ``Inference-Header-Content-Length`` HTTP header and every binary tensor declares its
byte size in ``parameters.binary_data_size``. Raw bytes are little-endian, row-major;
``BYTES`` elements are each a 4-byte little-endian length followed by the bytes (as in
Triton). Decoding binary tensors is zero-copy (``numpy.frombuffer`` on the body).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
import orjson

from agent.errors import InvalidInputError, InvalidOutputError
from agent.serving.cache import BoundedCache
from runtime.dtypes import DATATYPES  # the one table, shared with the backends

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "InferRequest",
    "RequestedOutput",
    "bytes_elements",
    "datatype_of",
    "decode_bytes",
    "decode_request",
    "decode_response",
    "decode_tensor",
    "dtype_of",
    "encode_request",
    "encode_response",
    "encode_tensor",
    "pack_bytes",
]

HEADER_LENGTH = "inference-header-content-length"

_BY_KIND: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"
}
_LEN = struct.Struct("<I")

# Bounds on untrusted tensor descriptions, checked before anything is allocated or
# reshaped (numpy itself refuses more than 64 dimensions, and dimensions whose product
# overflows, with errors that are not ours).
MAX_DIMS = 32  # dimensions of one tensor
MAX_DIM = 1 << 32  # elements along one dimension
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a JSON body
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def dtype_of(datatype: str, *, name: str = "") -> np.dtype[Any]:
    """v2 datatype → numpy dtype; InvalidInputError naming the tensor if unknown."""
    dt = DATATYPES.get(datatype)
    if dt is None:
        where = f"tensor {name!r}: " if name else ""
        raise InvalidInputError(
            f"{where}unknown datatype {datatype!r}; allowed: {', '.join(DATATYPES)}",
            code="bad-datatype",
        )
    return dt


def datatype_of(arr: np.ndarray[Any, Any], *, name: str = "") -> str:
    """numpy array → v2 datatype (strings and bytes → ``BYTES``)."""
    dt = arr.dtype
    if dt.kind in ("O", "U", "S"):
        return "BYTES"
    found = _BY_KIND.get((dt.kind, dt.itemsize))
    if found is None:
        where = f"tensor {name!r}: " if name else ""
        raise InvalidInputError(
            f"{where}numpy dtype {dt} has no KServe v2 datatype", code="bad-datatype"
        )
    return found


def _shape(spec: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInputError(
            f"tensor {name!r}: 'shape' must be a list of non-negative integers, got {_clip(shape)}",
            code="bad-shape",
        )
    if len(shape) > MAX_DIMS:
        raise InvalidInputError(
            f"tensor {name!r}: {len(shape)} dimensions; at most {MAX_DIMS} are allowed",
            code="bad-shape",
        )
    if any(d > MAX_DIM for d in shape):
        raise InvalidInputError(
            f"tensor {name!r}: dimension over {MAX_DIM} in shape {_clip(shape)}",
            code="bad-shape",
        )
    return tuple(shape)


def _clip(value: Any) -> str:
    """An untrusted value for an error message, at most 80 characters of its repr."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def loads_bounded(
    raw: bytes | bytearray | memoryview,
    tensors: str | None = None,
    split: _Split | None = None,
    *,
    looked: bool = False,
) -> Any:
    """Parse JSON with nesting bounded by MAX_JSON_DEPTH (the C decoders recurse per
    level; a 64 KiB body of ``[`` would otherwise end in RecursionError, a 500).

    ``tensors``: the key of the document's tensor list (``"inputs"``, ``"outputs"``);
    their flat numeric ``data`` arrays may then come back as :class:`_Numbers`, parsed
    straight into numpy by simdjson (:func:`_split_numbers`), which ``decode_tensor``
    takes. Everything else, and every document the fast path is not sure of, is parsed
    as before: orjson first (a [1, 4096] float tensor: ~0.09 ms, ``json.loads``
    ~0.3 ms); what it refuses goes to ``json.loads``, which decides: the same documents
    are accepted as before (``NaN``/``Infinity``, integers past 64 bits, lone surrogate
    escapes) and refused with the same message.

    The bound is checked before parsing and costs nothing for ordinary bodies: only when
    a body has more brackets than the bound is their nesting measured (outside strings,
    vectorised).

    ``looked``: :func:`_split_numbers` already ran on this ``raw`` and gave ``split``
    (not repeated)."""
    if isinstance(raw, memoryview):
        raw = raw.tobytes()  # a copy at memcpy speed; bytes can search for brackets
    if _brackets_over(raw, MAX_JSON_DEPTH):
        depth = _json_depth(bytes(raw))
        if depth > MAX_JSON_DEPTH:
            raise InvalidInputError(
                f"JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are allowed",
                code="bad-json",
            )
    if tensors is not None and len(raw) >= FAST_NUMBERS_MIN_BYTES:
        if not looked:
            split = _split_numbers(raw)
        doc = None if split is None else _place_numbers(split, tensors)
        if doc is not None:
            return doc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except RecursionError:  # the bound above makes this unreachable; never a 500
        raise InvalidInputError("JSON nested too deeply", code="bad-json") from None


# --- numeric tensors parsed straight into numpy --------------------------------------------
#
# orjson turns 4096 numbers into 4096 Python floats (~0.09 ms) that struct then packs
# (~0.03 ms). simdjson parses a flat array of numbers into one float64/int64 buffer
# (~0.05 ms, no Python object per value). The document around those arrays is still
# parsed by orjson, so everything but the numbers is read exactly as before.

FAST_NUMBERS_MIN_BYTES = 4096  # smaller documents: orjson alone is as fast
_FAST_NUMBERS_MAX_BYTES = 1 << 20  # a larger array is parsed by a parser of its own
_FAST_NUMBERS_MIN_TEXT = 256  # bytes of an array worth a parse of its own
_FAST_NUMBERS_MAX_ARRAYS = 64  # arrays taken from one document; the rest: orjson
_DATA_KEY = b'"data"'
_JSON_SPACE = frozenset(b" \t\r\n")
_MARK = "\x00"  # starts the placeholder strings; no JSON string without an escape has it
_simdjson_local = threading.local()


class _Numbers:
    """A flat JSON array of numbers, parsed: int64 if every literal was an integer that
    fits, float64 otherwise (as ``float(x)`` of each: correctly rounded), and its text
    for the general path."""

    __slots__ = ("text", "values")

    def __init__(self, values: np.ndarray[Any, Any], text: memoryview) -> None:
        self.values = values
        self.text = text

    def as_list(self) -> list[Any]:
        """The values as orjson gives them (Python ints and floats)."""
        out: list[Any] = orjson.loads(bytes(self.text))
        return out

    def to_dtype(self, datatype: str, dt: np.dtype[Any], n: int) -> np.ndarray[Any, Any] | None:
        """The array ``_flat_json`` makes of the same values, or None where it would take
        the general path (another count, a value out of range, BOOL or BYTES)."""
        v = self.values
        if v.size != n or not n:
            return None
        if dt.kind == "f":
            if v.dtype.kind != "f":
                v = v.astype(np.float64)  # int64 → float64 → dt, as struct packs an int
            if dt == v.dtype:
                return v
            with np.errstate(over="ignore"):
                out = v.astype(dt)
            # struct refuses a value that overflows (inf here: JSON has no inf literal)
            return None if np.isinf(out).any() else out
        if dt.kind in "iu" and datatype != "BOOL" and v.dtype.kind == "i":
            info = np.iinfo(dt)
            if v.min() < info.min or v.max() > info.max:
                return None
            return v if dt == v.dtype else v.astype(dt)
        return None


def _array_parser(size: int) -> Any:
    """This thread's simdjson parser (it keeps its buffers: no allocation per request),
    or a parser of its own for a big array (its buffers go with it)."""
    import simdjson

    if size > _FAST_NUMBERS_MAX_BYTES:
        return simdjson.Parser()
    parser = getattr(_simdjson_local, "parser", None)
    if parser is None:
        parser = _simdjson_local.parser = simdjson.Parser()
    return parser


def _parse_numbers(raw: bytes | bytearray, start: int, end: int) -> np.ndarray[Any, Any] | None:
    """``raw[start:end]`` (``[`` … ``]``, no ``[`` inside) as int64 or float64 values;
    None if it is not a flat JSON array of numbers (or simdjson refuses a number: past
    64 bits, beyond float64)."""
    # Integer literals only? (A refused try costs as much as a conversion.)
    ints = all(raw.find(c, start, end) < 0 for c in (b".", b"e", b"E"))
    try:
        arr = _array_parser(end - start).parse(memoryview(raw)[start:end])
        buf = None
        kind: Any = np.int64
        if ints:
            with contextlib.suppress(ValueError):  # past int64: as float64
                buf = arr.as_buffer(of_type="i")
        if buf is None:
            buf = arr.as_buffer(of_type="d")
            kind = np.float64
        del arr  # no proxy may outlive the parse: the parser is reused
    except Exception:  # any refusal: the general path decides
        return None
    return np.frombuffer(buf, dtype=kind)  # writable, owns its copy


class _Split(NamedTuple):
    """A document whose flat numeric arrays were parsed (:func:`_split_numbers`)."""

    skeleton: bytes  # the text with each array replaced by a placeholder string
    found: list[_Numbers]  # the arrays, in the order of their placeholders


def _split_numbers(raw: bytes | bytearray) -> _Split | None:
    """The flat numeric arrays of ``raw``, parsed, and the text around them; None if
    there is none (or any doubt).

    The arrays are found in the text: a ``"data"`` key outside strings (a body without
    backslashes has no escaped quote, so every ``"`` opens or closes a string and the
    parity of the quotes before it tells), its value from ``[`` to the first ``]``,
    which simdjson must accept as a flat array of numbers. Each is replaced by a
    placeholder string (:func:`_place_numbers` parses the rest). Replacing a valid array
    by a string keeps a document valid or invalid as it was, so nothing is accepted that
    the ordinary parse refuses; and two documents with the same skeleton differ only in
    those numbers (the JSON plans below rely on it)."""
    if raw.find(b"\\") >= 0:
        return None
    pieces: list[bytes | bytearray] = []
    found: list[_Numbers] = []
    done = 0  # raw[:done] is in pieces
    scan = 0  # where the search goes on; raw[:scan] holds ``quotes`` quotes
    quotes = 0
    end_all = len(raw)
    while True:
        i = raw.find(_DATA_KEY, scan)
        if i < 0:
            break
        quotes += raw.count(b'"', scan, i)
        if quotes & 1:  # this quote closes a string: not a key
            scan = i + 1
            quotes += 1
            continue
        scan = i + len(_DATA_KEY)
        quotes += 2
        j = scan
        while j < end_all and raw[j] in _JSON_SPACE:
            j += 1
        if j >= end_all or raw[j] != 0x3A:  # ":"
            continue
        j += 1
        while j < end_all and raw[j] in _JSON_SPACE:
            j += 1
        if j >= end_all or raw[j] != 0x5B:  # "["
            continue
        k = raw.find(b"]", j)
        if k < 0:
            return None
        big = k + 1 - j >= _FAST_NUMBERS_MIN_TEXT
        values = _parse_numbers(raw, j, k + 1) if big else None
        if values is None:  # go past it: each byte is looked at a bounded number of times
            quotes += raw.count(b'"', scan, k + 1)
            scan = k + 1
            continue
        pieces.append(raw[done:j])
        pieces.append(b'"\\u0000%d"' % len(found))
        found.append(_Numbers(values, memoryview(raw)[j : k + 1]))
        done = scan = k + 1  # numbers only: no quote in between
        if len(found) >= _FAST_NUMBERS_MAX_ARRAYS:
            break
    if not found:
        return None
    pieces.append(raw[done:])
    return _Split(b"".join(pieces), found)


def _place_numbers(split: _Split, tensors: str) -> Any:
    """The skeleton parsed by orjson, each placeholder replaced by its array; None
    unless every placeholder came back as the ``data`` of a tensor under ``tensors``
    (the caller then parses the whole the ordinary way)."""
    try:
        doc = orjson.loads(split.skeleton)
    except orjson.JSONDecodeError:
        return None
    found = split.found
    placed = 0
    specs = doc.get(tensors) if isinstance(doc, dict) else None
    for spec in specs if isinstance(specs, list) else ():
        data = spec.get("data") if isinstance(spec, dict) else None
        if type(data) is str and data.startswith(_MARK):
            spec["data"] = found[int(data[1:])]
            placed += 1
    return doc if placed == len(found) else None


def _brackets_over(raw: bytes | bytearray, limit: int) -> bool:
    """More than ``limit`` of ``[`` and ``{`` in ``raw``? Searched with ``find``
    (memchr: a 50 KB tensor body with three brackets in ~2 us; ``count`` walks it byte
    by byte, ~15 us), stopping at ``limit`` + 1."""
    n = 0
    for ch in (b"[", b"{"):
        i = raw.find(ch)
        while i >= 0:
            n += 1
            if n > limit:
                return True
            i = raw.find(ch, i + 1)
    return False


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside JSON strings."""
    if b'"' in raw:
        raw = _JSON_STRING.sub(b'""', raw)
    a = np.frombuffer(raw, dtype=np.uint8)
    step = (a == ord("[")).astype(np.int32)
    step += a == ord("{")
    step -= a == ord("]")
    step -= a == ord("}")
    return int(np.cumsum(step).max(initial=0))


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def decode_tensor(spec: Mapping[str, Any], raw: memoryview | None = None) -> np.ndarray[Any, Any]:
    """One v2 tensor (its JSON object, plus its raw bytes for binary data) → array.

    Raises:
        InvalidInputError: naming the tensor — unknown datatype, bad shape, element
            count or byte size not matching the shape.
    """
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError("every tensor needs a non-empty string 'name'", code="bad-tensor")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInputError(f"tensor {name!r}: missing 'datatype'", code="bad-datatype")
    dt = dtype_of(datatype, name=name)
    shape = _shape(spec, name)
    n = _count(shape)
    if raw is not None:
        if datatype == "BYTES":
            return decode_bytes(raw, shape, name)
        if raw.nbytes != n * dt.itemsize:
            raise InvalidInputError(
                f"tensor {name!r}: {raw.nbytes} bytes of binary data do not match shape "
                f"{list(shape)} of {datatype} ({n * dt.itemsize} bytes)",
                code="bad-shape",
            )
        return np.frombuffer(raw, dtype=dt).reshape(shape)
    if "data" not in spec:
        raise InvalidInputError(f"tensor {name!r}: missing 'data'", code="bad-tensor")
    data = spec["data"]
    if type(data) is _Numbers:  # parsed by simdjson (loads_bounded)
        fast = data.to_dtype(datatype, dt, n)
        if fast is not None:
            return fast.reshape(shape)
        data = data.as_list()  # the general path words what is wrong, as before
    fast = _flat_json(data, datatype, dt, n)
    if fast is not None:
        return fast.reshape(shape)
    if datatype == "BYTES":
        flat = _flatten(data, name)
        if len(flat) != n:
            raise _count_error(name, len(flat), shape)
        out = np.empty(n, dtype=object)
        for i, v in enumerate(flat):
            if not isinstance(v, str):
                raise InvalidInputError(
                    f"tensor {name!r}: BYTES elements must be strings in JSON", code="bad-tensor"
                )
            try:
                out[i] = v.encode()
            except UnicodeEncodeError:  # a lone surrogate escape (\ud800) is not text
                raise InvalidInputError(
                    f"tensor {name!r}: element {i} is not valid Unicode text", code="bad-tensor"
                ) from None
        return out.reshape(shape)
    try:
        arr = np.asarray(data, dtype=dt)
        if dt.kind == "f" and arr.size and np.isnan(arr).any() and not _all_numbers(data):
            raise ValueError("null or a non-number among the values")
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInputError(
            f"tensor {name!r}: 'data' is not a regular array of {datatype}: {str(exc)[:120]}",
            code="bad-tensor",
        ) from None
    if datatype == "BOOL" and not _all_bool(data):
        raise InvalidInputError(f"tensor {name!r}: BOOL data must be true/false", code="bad-tensor")
    if arr.size != n:
        raise _count_error(name, int(arr.size), shape)
    return arr.reshape(shape)


# struct formats of the numeric datatypes (little-endian, as the wire and DATATYPES).
_STRUCT_CODES = {
    "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q",
    "FP16": "e", "FP32": "f", "FP64": "d",
}  # fmt: skip
_structs: BoundedCache[tuple[str, int], struct.Struct] = BoundedCache(64)


def _flat_json(data: Any, datatype: str, dt: np.dtype[Any], n: int) -> np.ndarray[Any, Any] | None:
    """The common case, fast: ``data`` a flat list of exactly ``n`` values that all
    convert as the general path below would convert them. None (take the general path,
    which also words the errors) for anything else: nested lists, a wrong count, a value
    of another type or out of range.

    Numbers are packed by ``struct`` (one C loop, about twice numpy's speed on a list:
    numpy first walks the list to discover its shape and type). struct refuses what
    numpy would convert differently or refuse: strings, None, floats for integer types,
    integers out of range, floats too large for FP16/FP32 (numpy makes them inf);
    a value it accepts converts to the same bits (C's round-to-nearest double → float,
    Python's correctly rounded double → half)."""
    if type(data) is not list or len(data) != n or not n:
        return None
    code = _STRUCT_CODES.get(datatype)
    if code is not None:
        key = (code, n)
        st = _structs.get(key)
        if st is None:
            st = struct.Struct(f"<{n}{code}")
            _structs.remember(key, st)
        try:
            raw = st.pack(*data)
        except (struct.error, OverflowError, TypeError):
            return None
        return np.frombuffer(bytearray(raw), dtype=dt)  # writable, as np.asarray's
    if datatype == "BOOL":
        if set(map(type, data)) != _BOOL:  # JSON true/false only, as _all_bool says
            return None
        return np.frombuffer(bytearray(bytes(data)), dtype=bool)
    if datatype == "BYTES":
        if set(map(type, data)) != _STR:
            return None
        try:
            items = [v.encode() for v in data]
        except UnicodeEncodeError:  # a lone surrogate escape: the general path words it
            return None
        out = np.empty(n, dtype=object)
        out[:] = items
        return out
    return None


_BOOL = {bool}
_STR = {str}
_BYTES_STR = frozenset((bytes, str))


def _all_bool(data: Any) -> bool:
    return all(isinstance(v, bool) for v in _flatten(data, ""))


def _all_numbers(data: Any) -> bool:
    """Every leaf a JSON number (numpy turns ``null`` into NaN for float dtypes)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in _flatten(data, ""))


def _count_error(name: str, got: int, shape: tuple[int, ...]) -> InvalidInputError:
    return InvalidInputError(
        f"tensor {name!r}: {got} elements do not match shape {list(shape)} "
        f"({_count(shape)} elements)",
        code="bad-shape",
    )


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def decode_bytes(raw: Any, shape: tuple[int, ...], name: str) -> np.ndarray[Any, Any]:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes) →
    an object array of ``bytes`` of ``shape``; InvalidInputError if they do not fill
    ``raw`` exactly. The one reader of this framing: the v2 binary extension and the
    worker boundary (agent/serving/ipc.py) both use it."""
    raw = memoryview(raw).cast("B") if not isinstance(raw, memoryview) else raw
    n = _count(shape)
    size = raw.nbytes
    if n * 4 > size:  # every element has a 4-byte length: refuse before allocating
        raise InvalidInputError(
            f"tensor {name!r}: {size} bytes cannot hold {n} BYTES elements", code="bad-shape"
        )
    out = np.empty(n, dtype=object)
    pos = 0
    for i in range(n):
        if pos + 4 > size:
            raise InvalidInputError(
                f"tensor {name!r}: binary BYTES data truncated at element {i}", code="bad-shape"
            )
        (ln,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + ln > size:
            raise InvalidInputError(
                f"tensor {name!r}: binary BYTES data truncated at element {i}", code="bad-shape"
            )
        out[i] = bytes(raw[pos : pos + ln])
        pos += ln
    if pos != size:
        raise InvalidInputError(
            f"tensor {name!r}: {size - pos} extra bytes after {n} BYTES elements",
            code="bad-shape",
        )
    return out.reshape(shape)


def bytes_elements(arr: np.ndarray[Any, Any], name: str) -> list[bytes]:
    """The elements of a BYTES tensor as ``bytes``: ``bytes`` as they are, ``str`` as
    UTF-8. Anything else is a model or run-script bug (InvalidOutputError, 500), never
    written out as its ``repr``."""
    out: list[bytes] = []
    for i, v in enumerate(arr.reshape(-1).tolist()):
        if isinstance(v, bytes):
            out.append(v)
        elif isinstance(v, str):
            try:
                out.append(v.encode())
            except UnicodeEncodeError:
                raise InvalidOutputError(
                    f"tensor {name!r}: element {i} is a str that is not valid Unicode"
                ) from None
        else:
            raise InvalidOutputError(
                f"tensor {name!r}: element {i} is a {type(v).__name__}; BYTES elements "
                "must be str or bytes"
            )
    return out


def pack_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements → their length-prefixed binary form (see :func:`decode_bytes`)."""
    parts: list[bytes] = []
    for b in items:
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _texts(arr: np.ndarray[Any, Any], name: str) -> list[str]:
    """A BYTES tensor's elements as JSON strings. Bytes that are not UTF-8 cannot be a
    JSON string without an encoding of our own (Triton writes them unchecked, which
    makes invalid JSON): refused with 400 ``not-utf8``; the binary form carries them."""
    items = arr.reshape(-1).tolist()
    if set(map(type, items)) <= _BYTES_STR:  # the common case in one comprehension
        try:
            return [v if type(v) is str else v.decode() for v in items]
        except UnicodeDecodeError:
            pass  # the loop below names the element
    out: list[str] = []
    for i, v in enumerate(items):
        if isinstance(v, str):
            out.append(v)
            continue
        if not isinstance(v, bytes):
            raise InvalidOutputError(
                f"tensor {name!r}: element {i} is a {type(v).__name__}; BYTES elements "
                "must be str or bytes"
            )
        try:
            out.append(v.decode())
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"tensor {name!r}: element {i} is not UTF-8 text and cannot be a JSON "
                "string; ask for it in binary form (parameters.binary_data)",
                code="not-utf8",
            ) from None
    return out


def encode_tensor(
    name: str, arr: np.ndarray[Any, Any], *, binary: bool
) -> tuple[dict[str, Any], Any]:
    """Array → (v2 JSON object, raw buffer or None). Raw buffers are not copied when
    the array is already contiguous little-endian."""
    datatype = datatype_of(arr, name=name)
    obj: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if datatype == "BYTES":
        if binary:
            raw = pack_bytes(bytes_elements(arr, name))
            obj["parameters"] = {"binary_data_size": len(raw)}
            return obj, raw
        obj["data"] = _texts(arr, name)
        return obj, None
    if binary:
        want = DATATYPES[datatype]
        if arr.dtype != want or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=want)
        buf = memoryview(arr.data).cast("B") if arr.size else memoryview(b"")
        obj["parameters"] = {"binary_data_size": buf.nbytes}
        return obj, buf
    obj["data"] = arr.reshape(-1).tolist()
    return obj, None


_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def _json_tensor(name: str, arr: np.ndarray[Any, Any]) -> tuple[bytes, bytes | None]:
    """One tensor as JSON text for the JSON (non-binary) form: (its text up to and
    including ``"data":``, the data's text) or (its whole text, None). Not joined: the
    parts go out with one ``sendmsg`` (a join is a copy of every byte).

    Numbers are written by orjson straight from the array (no Python float per value):
    each float in the shortest text that reads back to the same value of its own width
    (FP32 ``0.69116837``, not the 17 digits of its float64 repr), whole values as
    float literals (``2.0``), integers and booleans as such; a [1, 4096] FP32 tensor in
    ~0.07 ms where ``json.dumps(arr.tolist())`` takes ~3 ms. orjson writes NaN and
    infinities as ``null``: tensors holding them keep the ``json.dumps`` spelling
    (``NaN``, ``Infinity``), which Python's and most v2 clients' parsers read back.
    """
    kind = arr.dtype.kind
    if kind in _PLAIN_KINDS and arr.size and (kind != "f" or np.isfinite(arr).all()):
        key = (name, arr.dtype, arr.shape)
        head = _tensor_heads.get(key)
        if head is None:
            obj = {"name": name, "datatype": datatype_of(arr, name=name), "shape": list(arr.shape)}
            head = _tensor_heads.remember(key, _dumps(obj)[:-1] + b',"data":')
        flat = arr.reshape(-1)
        if not flat.dtype.isnative:  # orjson reads native byte order only
            flat = flat.astype(flat.dtype.newbyteorder("="))
        return head, orjson.dumps(np.ascontiguousarray(flat), option=_NUMPY_JSON)
    obj, _ = encode_tensor(name, arr, binary=False)
    return _dumps(obj), None


# A tensor's JSON text up to its data, by (name, dtype, shape): written once.
_tensor_heads: BoundedCache[tuple[str, np.dtype[Any], tuple[int, ...]], bytes] = BoundedCache(256)


def _join_doc(head: bytes, key: str, tensors: list[tuple[bytes, bytes | None]]) -> list[bytes]:
    """The document ``head`` (compact JSON of an object) with ``key`` = the tensors' JSON
    texts, in parts: the small texts between the tensors' data joined, the data as they
    are."""
    sep = b"" if head == b"{}" else b","
    parts: list[bytes] = []
    pending = [head[:-1], sep, b'"', key.encode(), b'":[']
    for i, (text, data) in enumerate(tensors):
        if i:
            pending.append(b",")
        pending.append(text)
        if data is not None:
            parts.append(b"".join(pending))
            parts.append(data)
            pending = [b"}"]
    pending.append(b"]}")
    parts.append(b"".join(pending))
    return parts


def _dumps(obj: Any) -> bytes:
    """Compact ASCII JSON (non-ASCII escaped, NaN as ``NaN``) as ``json.dumps`` writes it."""
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class RequestedOutput:
    """One entry of a request's ``outputs`` list."""

    name: str
    binary: bool | None = None  # None = the request-wide default


@dataclass
class InferRequest:
    """A decoded v2 inference request."""

    inputs: dict[str, np.ndarray[Any, Any]]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False  # parameters.binary_data_output


def _header_json(
    body: Any,
    header_len: int | None,
    tensors: str,
    split: _Split | None = None,
    looked: bool = False,
) -> tuple[Any, memoryview]:
    view = memoryview(body)
    if header_len is None:
        head = body if isinstance(body, (bytes, bytearray)) else view
        rest = view[view.nbytes :]
    else:
        if header_len < 0 or header_len > view.nbytes:
            raise InvalidInputError(
                f"Inference-Header-Content-Length {header_len} is outside the body "
                f"({view.nbytes} bytes)",
                code="bad-header-length",
            )
        head = view[:header_len]
        rest = view[header_len:]
    try:
        obj = loads_bounded(head, tensors, split, looked=looked)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}", code="bad-json") from None
    return obj, rest


# Parsed JSON headers of binary-tensor messages, keyed by their bytes. A program calling
# one model sends the same header on every request (names, datatypes, shapes, sizes), so
# the JSON parse and the per-tensor checks run once per header, not once per request.
# Only headers whose tensors are all binary and not BYTES are kept (their arrays are
# then views of the body at fixed offsets); the body length is checked on every hit.
_Tensors = tuple[tuple[str, "np.dtype[Any]", tuple[int, ...], int, int], ...]


@dataclass(frozen=True)
class _RequestPlan:
    tensors: _Tensors  # (name, dtype, shape, offset, count) after the header
    total: int  # bytes of binary data after the header
    id: str | None
    parameters: dict[str, Any]
    outputs: list[RequestedOutput] | None
    binary_output: bool


# The plan and head caches keep copies of what senders wrote (headers, skeletons, ids):
# only small ones are kept (BoundedCache.keeps), so 256 distinct 64 MiB headers cannot
# make a process hold 16 GiB. A program's own header (names, shapes, datatypes, a few
# parameters) is a few hundred bytes; the HTTP head cache has the same bound
# (max_header_bytes).
PLAN_MAX_BYTES = 16 * 1024
ID_MAX_CHARS = 256  # response heads are kept per request id up to this length


def _small(key: bytes) -> bool:
    return len(key) <= PLAN_MAX_BYTES


def _small_id(key: tuple[Any, ...]) -> bool:
    """Keys (model, version, request id, ...): the id is the sender's."""
    return key[2] is None or len(key[2]) <= ID_MAX_CHARS


_request_plans: BoundedCache[bytes, _RequestPlan] = BoundedCache(256, _small)


def _frombuffer(rest: memoryview, tensors: _Tensors) -> dict[str, np.ndarray[Any, Any]]:
    return {
        name: np.frombuffer(rest, dtype=dt, count=n, offset=off).reshape(shape)
        for name, dt, shape, off, n in tensors
    }


# Plans of JSON documents, keyed by their skeleton (the text with every flat numeric
# ``data`` array replaced by a placeholder, _split_numbers): a program sending JSON
# tensors sends the same document around different numbers, so the parse of the rest
# and the per-tensor checks run once per skeleton, as for binary headers above. Two
# documents with the same skeleton differ only in those arrays, so a plan holds for
# every document of its skeleton whose arrays convert as they did (count, range; else
# the whole document takes the ordinary path, which words what is wrong). A plan is
# kept only when every tensor's data was such an array.
_JsonTensor = tuple[str, "np.dtype[Any]", tuple[int, ...], int, str]  # .., placeholder, datatype


@dataclass(frozen=True)
class _JsonRequestPlan:
    tensors: tuple[_JsonTensor, ...]
    id: str | None
    parameters: dict[str, Any]
    outputs: list[RequestedOutput] | None
    binary_output: bool


_json_request_plans: BoundedCache[bytes, _JsonRequestPlan] = BoundedCache(256, _small)


@dataclass(frozen=True)
class _JsonResponsePlan:
    doc: dict[str, Any]  # the response document without the tensors' data
    tensors: tuple[_JsonTensor, ...]


_json_response_plans: BoundedCache[bytes, _JsonResponsePlan] = BoundedCache(256, _small)
_P = TypeVar("_P", _JsonRequestPlan, _JsonResponsePlan)


def _json_plan(
    body: Any, plans: BoundedCache[bytes, _P]
) -> tuple[_Split | None, _P | None, dict[str, np.ndarray[Any, Any]] | None]:
    """A JSON body searched for numeric arrays (the search, for the ordinary decode to
    reuse), and on a hit its plan and arrays."""
    if type(body) is memoryview:
        body = body.tobytes()
    if len(body) < FAST_NUMBERS_MIN_BYTES:
        return None, None, None
    split = _split_numbers(body)
    plan = None if split is None else plans.get(split.skeleton)
    if plan is None or split is None:
        return split, None, None
    return split, plan, _json_arrays(plan.tensors, split.found)


def _json_planned(
    planned: list[_JsonTensor], spec: Any, split: _Split | None
) -> list[_JsonTensor] | None:
    """``planned`` with this tensor added, or None if the document cannot have a plan:
    the tensor's data is not one of ``split``'s arrays (or the tensor is not well
    formed: decode_tensor, called next, then says what is wrong)."""
    data = spec.get("data") if isinstance(spec, dict) else None
    if split is None or type(data) is not _Numbers or "parameters" in spec:
        return None
    datatype = spec.get("datatype")
    name = spec.get("name")
    if not isinstance(datatype, str) or not isinstance(name, str) or datatype not in DATATYPES:
        return None
    idx = next((i for i, f in enumerate(split.found) if f is data), -1)
    if idx < 0 or any(t[3] == idx for t in planned):
        return None
    try:
        shape = _shape(spec, name)
    except InvalidInputError:
        return None
    planned.append((name, DATATYPES[datatype], shape, idx, datatype))
    return planned


def _json_arrays(
    tensors: tuple[_JsonTensor, ...], found: list[_Numbers]
) -> dict[str, np.ndarray[Any, Any]] | None:
    """The arrays of a document with a known skeleton, or None if one does not convert
    as when the plan was made."""
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, dt, shape, idx, datatype in tensors:
        arr = found[idx].to_dtype(datatype, dt, _count(shape))
        if arr is None:
            return None
        out[name] = arr.reshape(shape)
    return out


def decode_request(body: Any, header_len: int | None = None) -> InferRequest:
    """Request body (+ the ``Inference-Header-Content-Length`` value) → InferRequest.

    Raises:
        InvalidInputError: bad JSON, bad tensors (naming them), binary sizes that do
            not add up to the body.
    """
    key = None
    if header_len is not None:
        view = memoryview(body)
        if 0 <= header_len <= view.nbytes:
            key = view[:header_len].tobytes()
            plan = _request_plans.get(key)
            if plan is not None and view.nbytes - header_len == plan.total:
                return InferRequest(
                    _frombuffer(view[header_len:], plan.tensors),
                    plan.id,
                    dict(plan.parameters),
                    None if plan.outputs is None else list(plan.outputs),
                    plan.binary_output,
                )
    split = None
    if header_len is None:
        split, jplan, arrays = _json_plan(body, _json_request_plans)
        if jplan is not None and arrays is not None:
            return InferRequest(
                arrays,
                jplan.id,
                dict(jplan.parameters),
                None if jplan.outputs is None else list(jplan.outputs),
                jplan.binary_output,
            )
    obj, rest = _header_json(body, header_len, "inputs", split, header_len is None)
    if not isinstance(obj, dict):
        raise InvalidInputError("request body must be a JSON object", code="bad-json")
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInputError("'id' must be a string", code="bad-json")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInputError("'parameters' must be an object", code="bad-json")
    specs = obj.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise InvalidInputError("'inputs' must be a non-empty list of tensors", code="bad-json")
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    pos = 0
    planned: list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]] | None = []
    jplanned: list[_JsonTensor] | None = [] if split is not None else None
    for spec in specs:
        if not isinstance(spec, dict):
            raise InvalidInputError("every input must be a JSON object", code="bad-json")
        tparams = spec.get("parameters") or {}
        size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInputError(
                    f"input {spec.get('name')!r}: binary_data_size must be a non-negative integer",
                    code="bad-tensor",
                )
            if pos + size > rest.nbytes:
                raise InvalidInputError(
                    f"input {spec.get('name')!r}: binary_data_size {size} runs past the end "
                    f"of the body ({rest.nbytes - pos} bytes left)",
                    code="bad-tensor",
                )
            raw = rest[pos : pos + size]
            pos += size
        if jplanned is not None:
            jplanned = _json_planned(jplanned, spec, split)
        arr = decode_tensor(spec, raw)
        name = spec["name"]
        if name in inputs:
            raise InvalidInputError(f"input {name!r} given twice", code="bad-tensor")
        inputs[name] = arr
        if planned is not None and raw is not None and spec.get("datatype") != "BYTES":
            planned.append((name, arr.dtype, arr.shape, pos - raw.nbytes, arr.size))
        else:
            planned = None
    if pos != rest.nbytes:
        raise InvalidInputError(
            f"{rest.nbytes - pos} bytes of binary data not claimed by any input's binary_data_size",
            code="bad-tensor",
        )
    outputs: list[RequestedOutput] | None = None
    out_specs = obj.get("outputs")
    if out_specs is not None:
        if not isinstance(out_specs, list):
            raise InvalidInputError("'outputs' must be a list", code="bad-json")
        outputs = []
        for o in out_specs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidInputError("every output needs a string 'name'", code="bad-json")
            op = o.get("parameters") or {}
            b = op.get("binary_data") if isinstance(op, dict) else None
            outputs.append(RequestedOutput(o["name"], None if b is None else bool(b)))
    binary_output = bool(params.get("binary_data_output", False))
    if planned is not None and key is not None:
        plan = _RequestPlan(tuple(planned), pos, req_id, dict(params), outputs, binary_output)
        _request_plans.remember(key, plan)
    if split is not None and jplanned is not None and len(jplanned) == len(split.found):
        jp = _JsonRequestPlan(tuple(jplanned), req_id, dict(params), outputs, binary_output)
        _json_request_plans.remember(split.skeleton, jp)
    return InferRequest(
        inputs=inputs,
        id=req_id,
        parameters=params,
        outputs=None if outputs is None else list(outputs),
        binary_output=binary_output,
    )


def encode_response(
    model_name: str,
    model_version: str | None,
    outputs: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
    *,
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[list[Any], int | None]:
    """Outputs (name, array, binary?) → (body parts, header length or None if JSON only)."""
    key = None
    if not parameters and all(b and a.dtype.kind in _PLAIN_KINDS for _, a, b in outputs):
        key = (
            model_name,
            model_version,
            request_id,
            tuple((n, a.dtype, a.shape) for n, a, _ in outputs),
        )
        head = _response_heads.get(key)
        if head is not None:
            return [head, *(_raw(a) for _, a, _ in outputs)], len(head)
    objs: list[tuple[bytes, bytes | None]] = []
    raws: list[Any] = []
    for name, arr, binary in outputs:
        if binary:
            obj, raw = encode_tensor(name, arr, binary=True)
            objs.append((_dumps(obj), None))
            raws.append(raw)
        else:
            objs.append(_json_tensor(name, arr))
    doc_key = (model_name, model_version, request_id)
    doc_head = None if parameters else _response_docs.get(doc_key)
    if doc_head is None:
        doc: dict[str, Any] = {"model_name": model_name}
        if model_version is not None:
            doc["model_version"] = model_version
        if request_id is not None:
            doc["id"] = request_id
        if parameters:
            doc["parameters"] = parameters
        doc_head = _dumps(doc)
        if not parameters:
            _response_docs.remember(doc_key, doc_head)
    parts = _join_doc(doc_head, "outputs", objs)
    if not raws:
        return parts, None
    head = _aligned_head(parts)
    if key is not None:
        _response_heads.remember(key, head)
    return [head, *raws], len(head)


BINARY_ALIGN = 64  # the binary data after a JSON header starts at a multiple of this


def _aligned_head(parts: list[bytes]) -> bytes:
    """The JSON header of a binary message, padded with spaces (JSON whitespace, counted
    in its length) to a multiple of BINARY_ALIGN. A body buffer starts aligned, so the
    first tensor's bytes are then aligned for any datatype, and so are the next ones
    whose predecessors' sizes are multiples of their item size. A misaligned array is
    copied by onnxruntime (numpy's aligned flag) before every run, with the GIL held:
    ~0.15 ms for a 224x224x3 float32 image, measured."""
    head = b"".join(parts)
    pad = -len(head) % BINARY_ALIGN
    return head + b" " * pad if pad else head


# Response headers by (model, version, id, outputs' names, dtypes and shapes): the same
# outputs give the same header, so it is written once.
_response_heads: BoundedCache[Any, bytes] = BoundedCache(256, _small_id)
# The response document's own fields (model, version, id) as JSON, for JSON responses.
_response_docs: BoundedCache[tuple[str, str | None, str | None], bytes] = BoundedCache(
    256, _small_id
)
_PLAIN_KINDS = frozenset("biuf")  # numeric and bool: raw little-endian bytes, no BYTES


def _raw(arr: np.ndarray[Any, Any]) -> Any:
    """The binary form of a numeric array (as encode_tensor makes it)."""
    want = DATATYPES[datatype_of(arr)]
    if arr.dtype != want or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=want)
    return memoryview(arr.data).cast("B") if arr.size else memoryview(b"")


def encode_request(
    inputs: Mapping[str, np.ndarray[Any, Any]],
    *,
    binary: bool = True,
    binary_output: bool = True,
    outputs: Sequence[str] | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[list[Any], int | None]:
    """Client side: arrays → (body parts, header length or None)."""
    key = None
    if binary and not parameters:
        arrays = [(n, np.asarray(a)) for n, a in inputs.items()]
        if all(a.dtype.kind in _PLAIN_KINDS for _, a in arrays):
            sig = tuple((n, a.dtype, a.shape) for n, a in arrays)
            key = (sig, binary_output, None if outputs is None else tuple(outputs), request_id)
            head = _request_heads.get(key)
            if head is not None:
                return [head, *(_raw(a) for _, a in arrays)], len(head)
    specs: list[tuple[bytes, bytes | None]] = []
    raws: list[Any] = []
    for name, arr in inputs.items():
        a = np.asarray(arr)
        if binary:
            obj, raw = encode_tensor(name, a, binary=True)
            specs.append((_dumps(obj), None))
            raws.append(raw)
        else:
            specs.append(_json_tensor(name, a))
    params: dict[str, Any] = dict(parameters or {})
    if binary_output:
        params["binary_data_output"] = True
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    if params:
        doc["parameters"] = params
    if outputs is not None:
        doc["outputs"] = [
            {"name": o, "parameters": {"binary_data": binary_output}} for o in outputs
        ]
    parts = _join_doc(_dumps(doc), "inputs", specs)
    if not raws:
        return parts, None
    head = _aligned_head(parts)
    if key is not None:
        _request_heads.remember(key, head)
    return [head, *raws], len(head)


_request_heads: BoundedCache[Any, bytes] = BoundedCache(256)


def decode_response(
    body: Any, header_len: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Client side: response body → (the JSON document without the tensors' ``data``,
    outputs by name)."""
    key = None
    if header_len is not None:
        view = memoryview(body)
        if 0 <= header_len <= view.nbytes:
            key = view[:header_len].tobytes()
            hit = _response_plans.get(key)
            if hit is not None and view.nbytes - header_len == hit[2]:
                return dict(hit[0]), _frombuffer(view[header_len:], hit[1])
    split = None
    if header_len is None:
        split, jhit, arrays = _json_plan(body, _json_response_plans)
        if jhit is not None and arrays is not None:
            return dict(jhit.doc), arrays
    obj, rest = _header_json(body, header_len, "outputs", split, header_len is None)
    if not isinstance(obj, dict) or not isinstance(obj.get("outputs"), list):
        raise InvalidInputError("response has no 'outputs' list", code="bad-response")
    out: dict[str, np.ndarray[Any, Any]] = {}
    pos = 0
    planned: list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]] | None = []
    jplanned: list[_JsonTensor] | None = [] if split is not None else None
    for spec in obj["outputs"]:
        tparams = spec.get("parameters") or {}
        size = tparams.get("binary_data_size")
        raw = None
        if size is not None:
            raw = rest[pos : pos + int(size)]
            pos += int(size)
        if jplanned is not None:
            jplanned = _json_planned(jplanned, spec, split)
        arr = decode_tensor(spec, raw)
        out[spec["name"]] = arr
        spec.pop("data", None)  # the values are in ``out``
        if planned is not None and raw is not None and spec.get("datatype") != "BYTES":
            planned.append((spec["name"], arr.dtype, arr.shape, pos - raw.nbytes, arr.size))
        else:
            planned = None
    if key is not None and planned is not None and pos == rest.nbytes:
        _response_plans.remember(key, (dict(obj), tuple(planned), pos))
    if split is not None and jplanned is not None and len(jplanned) == len(split.found):
        _json_response_plans.remember(split.skeleton, _JsonResponsePlan(dict(obj), tuple(jplanned)))
    return obj, out


_response_plans: BoundedCache[bytes, tuple[dict[str, Any], _Tensors, int]] = BoundedCache(
    256, _small
)
