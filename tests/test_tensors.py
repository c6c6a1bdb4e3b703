"""agent.serving.tensors: the v2 JSON and binary tensor codec, driven directly (no sockets)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from agent.errors import InvalidInputError
from agent.serving.tensors import (
    DATATYPES,
    datatype_of,
    decode_request,
    decode_response,
    decode_tensor,
    encode_request,
    encode_response,
)

NUMERIC = [k for k in DATATYPES if k != "BYTES"]


def _array(datatype: str) -> np.ndarray[Any, Any]:
    dt = DATATYPES[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    info_max = 100 if dt.kind in "iu" else 1.5
    return (np.arange(6).reshape(2, 3) * info_max / 7).astype(dt)


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("binary", [True, False])
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    a = _array(datatype)
    assert datatype_of(a) == datatype
    parts, hl = encode_request({"a": a}, binary=binary, request_id="r", parameters={"p": 1})
    body = b"".join(parts)
    assert (hl is not None) == binary
    req = decode_request(body, hl)
    assert req.id == "r" and req.parameters["p"] == 1 and req.binary_output
    got = req.inputs["a"]
    assert got.dtype == a.dtype and got.shape == a.shape
    np.testing.assert_array_equal(got, a)


def test_binary_decode_is_zero_copy() -> None:
    a = np.arange(1000, dtype=np.float32).reshape(10, 100)
    parts, hl = encode_request({"a": a})
    body = bytearray(b"".join(parts))
    got = decode_request(body, hl).inputs["a"]
    assert np.shares_memory(got, np.frombuffer(body, np.uint8))
    assert got.flags.writeable  # a bytearray body gives writable arrays


def test_json_nested_and_flat_data_agree() -> None:
    flat = {"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    nested = dict(flat, data=[[1, 2], [3, 4]])
    np.testing.assert_array_equal(decode_tensor(flat), decode_tensor(nested))


def test_bytes_tensors_json_and_binary() -> None:
    a = np.array([[b"ab", b""], ["é".encode(), b"z" * 300]], dtype=object)
    for binary in (True, False):
        parts, hl = encode_request({"s": a}, binary=binary)
        got = decode_request(b"".join(parts), hl).inputs["s"]
        assert got.shape == (2, 2) and list(got.reshape(-1)) == list(a.reshape(-1))


def test_encode_handles_odd_arrays() -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2]
    scalar = np.array(7, np.int16)
    outs = [("be", big_endian, True), ("st", strided, True), ("sc", scalar, True),
            ("js", strided, False)]  # fmt: skip
    parts, hl = encode_response("m", "1", outs, request_id="q")
    doc, got = decode_response(b"".join(parts), hl)
    assert doc["model_name"] == "m" and doc["model_version"] == "1" and doc["id"] == "q"
    np.testing.assert_array_equal(got["be"], big_endian)
    np.testing.assert_array_equal(got["st"], strided)
    np.testing.assert_array_equal(got["js"], strided)
    assert got["sc"].shape == () and int(got["sc"]) == 7


@pytest.mark.parametrize(
    ("spec", "code", "needle"),
    [
        ({"datatype": "FP32", "shape": [1], "data": [1]}, "bad-tensor", "name"),
        ({"name": "t", "shape": [1], "data": [1]}, "bad-datatype", "'t'"),
        ({"name": "t", "datatype": "FP128", "shape": [1], "data": [1]}, "bad-datatype", "FP128"),
        ({"name": "t", "datatype": "FP32", "shape": [-1], "data": [1]}, "bad-shape", "'t'"),
        ({"name": "t", "datatype": "FP32", "shape": "2", "data": [1]}, "bad-shape", "'t'"),
        ({"name": "t", "datatype": "FP32", "shape": [3], "data": [1, 2]}, "bad-shape", "'t'"),
        ({"name": "t", "datatype": "FP32", "shape": [2]}, "bad-tensor", "'data'"),
        ({"name": "t", "datatype": "INT8", "shape": [1], "data": [1000]}, "bad-tensor", "'t'"),
        ({"name": "t", "datatype": "BOOL", "shape": [1], "data": [1]}, "bad-tensor", "true"),
        ({"name": "t", "datatype": "BYTES", "shape": [1], "data": [1]}, "bad-tensor", "'t'"),
        ({"name": "t", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}, "bad-tensor",
         "'t'"),
    ],
)  # fmt: skip
def test_bad_tensors_name_the_tensor(spec: dict[str, Any], code: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle) as ei:
        decode_tensor(spec)
    assert ei.value.code == code and ei.value.status == 400


def test_bad_binary_layouts() -> None:
    head = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                        "parameters": {"binary_data_size": 8}}]}  # fmt: skip
    hb = json.dumps(head).encode()
    ok = hb + np.zeros(2, np.float32).tobytes()
    assert decode_request(ok, len(hb)).inputs["x"].shape == (2,)
    with pytest.raises(InvalidInputError, match="runs past"):
        decode_request(hb + b"1234", len(hb))
    with pytest.raises(InvalidInputError, match="not claimed"):
        decode_request(ok + b"!", len(hb))
    with pytest.raises(InvalidInputError, match="outside the body"):
        decode_request(ok, len(ok) + 1)
    with pytest.raises(InvalidInputError, match="JSON"):
        decode_request(ok, len(hb) - 1)
    wrong = json.loads(hb)
    wrong["inputs"][0]["parameters"]["binary_data_size"] = 4
    wb = json.dumps(wrong).encode()
    with pytest.raises(InvalidInputError, match="'x'"):
        decode_request(wb + b"1234", len(wb))
    trunc = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2],
                         "parameters": {"binary_data_size": 9}}]}  # fmt: skip
    tb = json.dumps(trunc).encode()
    with pytest.raises(InvalidInputError, match="truncated"):
        decode_request(tb + b"\x01\x00\x00\x00a\x09\x00\x00\x00", len(tb))
    huge = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [10**9],
                        "parameters": {"binary_data_size": 4}}]}  # fmt: skip
    hb2 = json.dumps(huge).encode()
    with pytest.raises(InvalidInputError, match="cannot hold"):
        decode_request(hb2 + b"\x00" * 4, len(hb2))


@pytest.mark.parametrize(
    "doc",
    [
        "[]",
        '{"inputs": {}}',
        '{"inputs": [1]}',
        '{"id": 5, "inputs": []}',
        '{"parameters": [], "inputs": []}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}], '
        '"outputs": [{"nom": "y"}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]},'
        '{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]}',
        "\xff",
    ],
)
def test_bad_request_documents(doc: str) -> None:
    with pytest.raises(InvalidInputError):
        decode_request(doc.encode("latin-1"))


def test_outputs_selection_parsed() -> None:
    doc = {
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
    }
    req = decode_request(json.dumps(doc).encode())
    assert [(o.name, o.binary) for o in req.outputs or []] == [("y", True), ("z", None)]
    assert not req.binary_output


# --- the fast JSON path decides as the general one ----------------------------------------
#
# A flat ``data`` list of the declared length takes agent.serving.tensors._flat_json (struct,
# type sets); the same values nested one level deeper take the general path. Both must
# give the same array, bit for bit, or the same error code, for whatever JSON holds.

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON_SCALARS = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 127, 128, 255, 256, 32767, 65535, 2**31, 2**32, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, -1e39, 65504.0, 65520.0, 1e-46, 5e-324, 3.4028235e38, -0.0]),
    st.text(max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
)


_JSON_LISTS = st.one_of(
    st.lists(_JSON_SCALARS, max_size=6),  # mixed: mostly the general path
    st.lists(st.floats(width=32), max_size=40),  # homogeneous: mostly the fast path
    st.lists(st.floats(), max_size=40),
    st.lists(st.integers(min_value=-(2**65), max_value=2**65), max_size=40),
    st.lists(st.integers(min_value=-300, max_value=300), max_size=40),
    st.lists(st.booleans(), max_size=40),
    st.lists(st.text(max_size=4), max_size=10),
)


def _outcome(spec: dict[str, Any]) -> tuple[str, Any]:
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # numpy's own warnings
            arr = decode_tensor(spec)
    except InvalidInputError as exc:
        return "error", exc.code
    flat = arr.reshape(-1)
    return arr.dtype.str, flat.tobytes() if arr.dtype != object else flat.tolist()


@settings(max_examples=300, deadline=None)
@given(datatype=st.sampled_from(list(DATATYPES)), data=_JSON_LISTS)
def test_fast_json_path_agrees_with_the_general_one(datatype: str, data: list[Any]) -> None:
    n = len(data)
    fast = _outcome({"name": "t", "datatype": datatype, "shape": [n], "data": data})
    general = _outcome({"name": "t", "datatype": datatype, "shape": [1, n], "data": [data]})
    assert fast == general


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_fast_json_path_same_values_every_datatype(datatype: str) -> None:
    """Typical values of every datatype: a flat list and its nested twin agree, and the
    JSON encoder's text reads back to the same bits (extremes, subnormals, -0.0)."""
    dt = DATATYPES[datatype]
    if datatype == "BYTES":
        a = np.array([b"", b"abc", "é€".encode(), b'\\"'], dtype=object)
    elif datatype == "BOOL":
        a = np.array([True, False, False, True])
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        a = np.array([info.min, info.max, 0, 1, info.max // 3], dtype=dt)
    else:
        fi = np.finfo(dt)
        a = np.array([fi.max, -fi.max, fi.tiny, fi.smallest_subnormal, -0.0, 0.1, 2.0], dtype=dt)
    parts, hl = encode_request({"t": a}, binary=False)
    assert hl is None
    doc = json.loads(b"".join(parts))
    flat = doc["inputs"][0]
    assert flat["data"] == json.loads(json.dumps(flat["data"]))  # plain JSON values
    got = decode_request(b"".join(parts)).inputs["t"]
    nested = decode_tensor(dict(flat, shape=[1, a.size], data=[flat["data"]])).reshape(-1)
    if datatype == "BYTES":
        assert got.tolist() == a.tolist() == nested.tolist()
    else:
        assert got.dtype == a.dtype and got.tobytes() == a.tobytes() == nested.tobytes()


# --- numeric arrays parsed straight into numpy (simdjson) decide as orjson's parse --------
#
# loads_bounded finds flat numeric ``data`` arrays in the text and parses them with
# simdjson; the rest of the document goes through orjson. Whatever the text, the request
# must decode to the same arrays, bit for bit, or be refused with the same error code, as
# with the fast path off.

from agent.serving import tensors as tensors_mod  # noqa: E402


@contextlib.contextmanager
def _fast_path(fast: bool) -> Iterator[None]:
    """The simdjson path on for every array (or off for every document)."""
    with pytest.MonkeyPatch.context() as mp, np.errstate(over="ignore", invalid="ignore"):
        mp.setattr(tensors_mod, "FAST_NUMBERS_MIN_BYTES", 0 if fast else 1 << 62)
        mp.setattr(tensors_mod, "_FAST_NUMBERS_MIN_TEXT", 0)
        yield


def _request_outcome(body: bytes, fast: bool) -> tuple[str, Any]:
    try:
        with _fast_path(fast):
            req = decode_request(body)
    except InvalidInputError as exc:
        return "error", exc.code
    out = []
    for name, arr in req.inputs.items():
        flat = arr.reshape(-1)
        out.append((name, arr.dtype.str, arr.shape, flat.tobytes() if arr.dtype != object
                    else flat.tolist()))  # fmt: skip
    return "ok", (out, req.id, req.parameters)


def _both_paths(body: bytes) -> tuple[str, Any]:
    fast = _request_outcome(body, True)
    assert fast == _request_outcome(body, False), body[:300]
    return fast


@settings(max_examples=300, deadline=None)
@given(datatype=st.sampled_from(list(DATATYPES)), data=_JSON_LISTS, spaced=st.booleans())
def test_numbers_fast_path_agrees_with_orjson(datatype: str, data: list[Any], spaced: bool) -> None:
    spec = {"name": "t", "datatype": datatype, "shape": [len(data)], "data": data}
    sep = (", ", " : ") if spaced else (",", ":")
    _both_paths(json.dumps({"inputs": [spec]}, separators=sep).encode())


@pytest.mark.parametrize(
    "text",
    [
        # "data" inside strings, as a value, in parameters, twice, nested, escaped quotes
        '{"id": "\\"data\\": [1, 2]", "inputs": [{"name": "a", "datatype": "FP32", '
        '"shape": [2], "data": [1.5, 2]}]}',
        '{"id": "data", "inputs": [{"name": "data", "datatype": "FP32", "shape": [2], '
        '"data": [1.5, 2]}]}',
        '{"parameters": {"data": [1, 2]}, "inputs": [{"name": "a", "datatype": "INT32", '
        '"shape": [2], "data": [3, 4]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2], '
        '"data": [3, 4]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2, 1], "data": [[1], [2]]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [3], "data": [[], 1, [2, 3]]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, "]"]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, {"data": [2]}]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]}], '
        '"outputs": [{"name": "y", "data": [1, 2]}]}',
        # numbers simdjson or orjson refuse, or read differently
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, NaN]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP64", "shape": [2], "data": [1, 1e400]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 1e39]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP16", "shape": [2], "data": [1, 65520]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1e-400, -0]}]}',
        '{"inputs": [{"name": "a", "datatype": "UINT64", "shape": [2], '
        '"data": [18446744073709551615, 0]}]}',
        '{"inputs": [{"name": "a", "datatype": "INT64", "shape": [2], '
        '"data": [123456789012345678901234567890, 0]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP64", "shape": [2], '
        '"data": [9007199254740993, 18446744073709551615]}]}',
        '{"inputs": [{"name": "a", "datatype": "INT8", "shape": [2], "data": [1.5, 2]}]}',
        '{"inputs": [{"name": "a", "datatype": "UINT8", "shape": [2], "data": [-1, 2]}]}',
        '{"inputs": [{"name": "a", "datatype": "BOOL", "shape": [2], "data": [1, 0]}]}',
        '{"inputs": [{"name": "a", "datatype": "BYTES", "shape": [2], "data": [1, 0]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [0], "data": []}]}',
        # broken JSON stays broken: around, inside and after the array
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1,, 2]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [01, 2]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]}]',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data" [1, 2]}]}',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2',
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]}]} x',
        '"data": [1, 2]',
    ],
)
def test_numbers_fast_path_hostile_documents(text: str) -> None:
    _both_paths(text.encode())


def test_numbers_fast_path_reads_big_tensors_exactly() -> None:
    """Every float32 bit pattern class (extremes, subnormals, -0.0, random) written by
    the encoder reads back bit-exactly through simdjson; the body takes the fast path."""
    rng = np.random.default_rng(7)
    fi = np.finfo(np.float32)
    special = np.array([fi.max, -fi.max, fi.tiny, fi.smallest_subnormal, -0.0, 0.1, 2.0,
                        1e-40, 3.4e38], np.float32)  # fmt: skip
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    a = np.concatenate([special, bits[np.isfinite(bits)]]).reshape(1, -1)
    parts, _ = encode_request({"x": a}, binary=False)
    body = b"".join(parts)
    doc = tensors_mod.loads_bounded(body, "inputs")
    assert type(doc["inputs"][0]["data"]).__name__ == "_Numbers"
    got = decode_request(body).inputs["x"]
    assert got.dtype == np.float32 and got.tobytes() == a.tobytes()
    # the response direction, and int64 beyond float64's 53 bits
    k = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    parts, _ = encode_response("m", "1", [("y", a, False), ("k", k, False)])
    doc2, out = decode_response(b"".join(parts))
    assert out["y"].tobytes() == a.tobytes() and out["k"].tobytes() == k.tobytes()
    assert doc2["model_name"] == "m" and "data" not in doc2["outputs"][0]


# --- JSON plans: a document's skeleton is parsed and checked once --------------------------
#
# decode_request and decode_response keep, per skeleton (the text around the numeric
# arrays), what the ordinary decode made of it. A later document with the same skeleton
# and any other numbers must decode exactly as with the fast path off, or be refused
# with the same code.


def _response_outcome(body: bytes, fast: bool) -> tuple[str, Any]:
    try:
        with _fast_path(fast):
            doc, out = decode_response(body)
    except InvalidInputError as exc:
        return "error", exc.code
    return "ok", (
        doc,
        [
            (n, a.dtype.str, a.shape, a.tolist() if a.dtype == object else a.tobytes())
            for n, a in out.items()
        ],
    )


@settings(max_examples=300, deadline=None)
@example(datatype="BYTES", first=[0.0] * 7, then=["", "", "", "", "", "", "00"], ints=False)
@given(
    datatype=st.sampled_from(list(DATATYPES)),
    first=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1,
                   max_size=20),
    then=_JSON_LISTS,
    ints=st.booleans(),
)  # fmt: skip
def test_json_plans_agree_with_the_ordinary_decode(
    datatype: str, first: list[float], then: list[Any], ints: bool
) -> None:
    """The first document makes the plan (when it decodes); the second, same skeleton,
    other numbers (another count, other kinds, out of range, not numbers at all), must
    come out as the ordinary decode has it, requests and responses alike."""
    if ints:
        first = [int(v) for v in first]
    for key, outcome in (("inputs", _request_outcome), ("outputs", _response_outcome)):
        bodies = [
            json.dumps(
                {
                    "id": "r",
                    key: [{"name": "t", "datatype": datatype, "shape": [len(first)], "data": data}],
                }
            ).encode()
            for data in (first, then)
        ]
        outcome(bodies[0], True)
        for body in bodies:
            assert outcome(body, True) == outcome(body, False), body[:300]


def test_a_json_plan_skips_the_per_tensor_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second request of a skeleton is decoded from its plan (no decode_tensor), and
    what the caller gets is its own: changing one request's parameters or outputs does
    not reach the next."""
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((2, 3000)).astype(np.float32) for _ in range(2))

    def mk(v: np.ndarray[Any, Any]) -> list[Any]:
        return encode_request(
            {"x": v},
            binary=False,
            binary_output=False,
            outputs=["y"],
            request_id="q",
            parameters={"p": 1},
        )[0]

    first = decode_request(b"".join(mk(a)))
    calls: list[Any] = []
    real = tensors_mod.decode_tensor

    def counted(*x: Any) -> Any:
        calls.append(x)
        return real(*x)

    monkeypatch.setattr(tensors_mod, "decode_tensor", counted)
    first.parameters["p"] = 2
    assert first.outputs is not None
    first.outputs.clear()
    second = decode_request(b"".join(mk(b)))
    assert not calls
    assert second.inputs["x"].tobytes() == b.tobytes() and second.inputs["x"].shape == (2, 3000)
    assert second.parameters == {"p": 1} and second.id == "q"
    assert second.outputs is not None and [o.name for o in second.outputs] == ["y"]
    # responses: the same, and the document comes back without the numbers
    parts, _ = encode_response("m", "1", [("y", a, False)])
    decode_response(b"".join(parts))
    assert calls  # the first response of its skeleton: the ordinary decode
    calls.clear()
    doc, out = decode_response(b"".join(encode_response("m", "1", [("y", b, False)])[0]))
    assert not calls
    assert out["y"].tobytes() == b.tobytes() and doc["model_name"] == "m"
    assert "data" not in doc["outputs"][0]
    # a count that no longer matches the shape: the ordinary decode words it
    body = b"".join(mk(a))
    i = body.index(b"]", body.index(b'"data":['))
    with pytest.raises(InvalidInputError) as err:
        decode_request(body[:i] + b",1.5" + body[i:])
    assert err.value.code == "bad-shape" and calls


def test_binary_data_starts_aligned() -> None:
    """The JSON header of a binary message is padded (spaces) to a multiple of 64 bytes,
    so tensors decoded from a body buffer are aligned: onnxruntime copies a misaligned
    input before every run."""
    a = np.arange(3 * 224 * 224, dtype=np.float32).reshape(1, 3, 224, 224)
    b = np.arange(7, dtype=np.float64)
    parts, hl = encode_request({"image": a, "w": b}, request_id="odd-length-id-7")
    assert hl is not None and hl % 64 == 0 and bytes(parts[0]).endswith(b" ")
    req = decode_request(bytearray(b"".join(bytes(p) for p in parts)), hl)
    assert req.inputs["image"].flags.aligned and req.inputs["w"].flags.aligned
    np.testing.assert_array_equal(req.inputs["image"], a)
    parts, hl = encode_response("m", "1", [("y", a, True), ("z", b, False)])
    assert hl is not None and hl % 64 == 0
    doc, out = decode_response(bytearray(b"".join(bytes(p) for p in parts)), hl)
    assert out["y"].flags.aligned and doc["model_name"] == "m"
    np.testing.assert_array_equal(out["z"], b)


def test_caches_keep_only_small_headers_skeletons_and_ids() -> None:
    """Plans and heads are copies of what a sender wrote: 256 distinct 64 MiB headers
    must not stay in memory. Big ones decode and encode as usual, uncached."""
    x = np.arange(2000, dtype=np.float32).reshape(1, 2000)
    for rid in ("small", "i" * (tensors_mod.PLAN_MAX_BYTES + 10)):
        big = len(rid) > tensors_mod.ID_MAX_CHARS
        parts, hl = encode_request({"x": x}, request_id=rid)
        body = b"".join(bytes(p) for p in parts)
        assert hl is not None
        req = decode_request(body, hl)
        assert req.id == rid and req.inputs["x"].tobytes() == x.tobytes()
        assert (body[:hl] in tensors_mod._request_plans) is not big
        jparts, _ = encode_request({"x": x}, binary=False, request_id=rid)
        jbody = b"".join(jparts)
        assert decode_request(jbody).id == rid
        split = tensors_mod._split_numbers(jbody)
        assert split is not None
        assert (split.skeleton in tensors_mod._json_request_plans) is not big
        for binary in (True, False):
            rparts, rhl = encode_response("m", "1", [("y", x, binary)], request_id=rid)
            doc, out = decode_response(b"".join(bytes(p) for p in rparts), rhl)
            assert doc["id"] == rid and out["y"].tobytes() == x.tobytes()
        assert any(k[2] == rid for k in tensors_mod._response_heads) is not big
        assert any(k[2] == rid for k in tensors_mod._response_docs) is not big
    cached = [*tensors_mod._request_plans, *tensors_mod._json_request_plans]
    assert max(len(k) for k in cached) <= tensors_mod.PLAN_MAX_BYTES


def test_a_json_document_is_searched_for_numeric_arrays_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """decode_request looks for a plan first; when there is none (or no numeric array at
    all), the ordinary decode takes what that search found instead of searching again."""
    calls: list[int] = []
    real = tensors_mod._split_numbers

    def counted(raw: Any) -> Any:
        calls.append(len(raw))
        return real(raw)

    monkeypatch.setattr(tensors_mod, "_split_numbers", counted)
    words = {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [2000], "data": ["ab"] * 2000}]}
    nums = {"inputs": [{"name": "n", "datatype": "INT32", "shape": [3000], "data": [7] * 3000}]}
    for doc in (words, nums, nums):
        decode_request(json.dumps(doc).encode())
        assert len(calls) == 1
        calls.clear()
    out = encode_response("m", "1", [("y", np.arange(3000, dtype=np.int32), False)])[0]
    decode_response(b"".join(out))
    assert len(calls) == 1
