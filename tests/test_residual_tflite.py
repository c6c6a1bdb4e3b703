"""Residual patches on TFLite: real mediapipe float16/float32 models and hand-built
int8 models (LiteRT has no converter, and no int8 model ships in a wheel at hand), with
payloads inside the flatbuffer and after it (Buffer.offset/size)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
import pytest

from agent.errors import BaseMismatchError
from agent.residual import apply_patch, encode_patch, quant, weights_digest
from agent.residual.layout import scan
from tests.assets import _wheel


def _interp(path: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


def _run(path: Path, x: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    it = _interp(path)
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return [np.array(it.get_tensor(d["index"])) for d in it.get_output_details()]


def _cos(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def _perturb(src: Path, dst: Path, scale: float, seed: int) -> Path:
    """Copy with every float weight buffer (≥ 16 values) nudged in place."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    for h in scan(src).holes:
        if h.dtype not in (quant.F32, quant.F16) or h.nbytes < 64:
            continue
        dt = "<f4" if h.dtype == quant.F32 else "<f2"
        a = np.frombuffer(data, dt, h.nbytes // np.dtype(dt).itemsize, h.offset).astype(np.float32)
        a += rng.normal(0, 1, a.shape).astype(np.float32) * np.float32(scale * np.abs(a).mean())
        data[h.offset : h.offset + h.nbytes] = a.astype(dt).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _round_trip(base: Path, target: Path, work: Path, **kw: Any) -> tuple[Any, int, Path]:
    buf = io.BytesIO()
    recon = work / "recon.tflite"
    info = encode_patch(base, target, buf, reconstruct=recon, **kw)
    out = work / "out" / "m.tflite"
    got = apply_patch(
        base,
        io.BytesIO(buf.getvalue()),
        out,
        expected_base_digest=info.base_digest,
        expected_target_digest=info.target_digest,
    )
    assert info.format == "tflite"
    assert got == info.target_digest == weights_digest(out)
    assert out.read_bytes() == recon.read_bytes()
    return info, len(buf.getvalue()), out


@pytest.fixture(scope="module")
def recrop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mediapipe's hand_recrop.tflite: float32 weights."""
    wheel = _wheel("mediapipe==0.10.14", "mediapipe-0.10.14-*.whl")
    p = tmp_path_factory.mktemp("recrop") / "hand_recrop.tflite"
    with zipfile.ZipFile(wheel) as zf:
        p.write_bytes(zf.read("mediapipe/modules/holistic_landmark/hand_recrop.tflite"))
    return p


def test_float16_hand_landmark(hand_tflite: Path, tmp_path: Path) -> None:
    target = _perturb(hand_tflite, tmp_path / "t.tflite", 0.02, 1)
    x = np.random.default_rng(0).uniform(0, 1, (1, 224, 224, 3)).astype(np.float32)
    want, base_out = _run(target, x), _run(hand_tflite, x)
    assert not np.allclose(want[0], base_out[0])  # the perturbed buffers are weights
    info, size, out = _round_trip(hand_tflite, target, tmp_path, bits=8)
    assert info.stats["q8"] >= 90 and size < 0.6 * target.stat().st_size
    got = _run(out, x)
    assert _cos(want[0], got[0]) > 0.9999
    assert np.max(np.abs(want[0] - got[0])) < 0.01 * np.max(np.abs(want[0] - base_out[0])) + 1e-3


def test_float32_recrop_int4_and_fidelity(recrop: Path, tmp_path: Path) -> None:
    target = _perturb(recrop, tmp_path / "t.tflite", 0.02, 2)
    x = np.random.default_rng(1).uniform(0, 1, (1, 256, 256, 3)).astype(np.float32)
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "a.npz", **{"input:input_1": x})  # type: ignore[arg-type]
    info, size, out = _round_trip(recrop, target, tmp_path, bits=4, group_size=64, samples=samples)
    assert info.stats["q4"] > 40 and size < 0.3 * target.stat().st_size
    assert _cos(_run(target, x)[0], _run(out, x)[0]) > 0.999
    assert info.fidelity is not None and info.fidelity["cosine_min"] > 0.999


def _vec(b: flatbuffers.Builder, items: list[Any], kind: str) -> int:
    if kind == "table":
        b.StartVector(4, len(items), 4)
        for x in reversed(items):
            b.PrependUOffsetTRelative(x)
        return int(b.EndVector())
    fmt = {
        "i32": b.PrependInt32,
        "u8": b.PrependUint8,
        "f32": b.PrependFloat32,
        "i64": b.PrependInt64,
    }[kind]
    size = {"i32": 4, "u8": 1, "f32": 4, "i64": 8}[kind]
    b.StartVector(size, len(items), max(size, 4) if kind == "u8" else size)
    for x in reversed(items):
        fmt(x)
    return int(b.EndVector())


def build_fc_int8(
    w: np.ndarray[Any, Any], bias: np.ndarray[Any, Any], path: Path, *, external: bool = False
) -> Path:
    """Int8 FULLY_CONNECTED x int8 [1,K] → y int8 [1,N] with int8 weights [N,K] and an
    int32 bias; ``external`` puts the payloads after the flatbuffer (offset/size)."""
    if not external:
        path.write_bytes(_build(w, bias, None))
        return path
    payloads = [w.astype(np.int8).tobytes(), bias.astype("<i4").tobytes()]
    size = len(_build(w, bias, [(1 << 40, 1)] * 2))
    offs, pos = [], -(-size // 64) * 64
    for p in payloads:
        offs.append((pos, len(p)))
        pos = -(-(pos + len(p)) // 64) * 64
    fb = _build(w, bias, offs)
    assert len(fb) == size
    out = bytearray(fb)
    for (o, _n), p in zip(offs, payloads, strict=True):
        out += bytes(o - len(out))
        out += p
    path.write_bytes(bytes(out))
    return path


def _build(
    w: np.ndarray[Any, Any], bias: np.ndarray[Any, Any], offsets: list[tuple[int, int]] | None
) -> bytes:
    """The flatbuffer; payloads inline, or at the given (offset, size) after it."""
    n, k = w.shape
    b = flatbuffers.Builder(1024)
    payloads = [b"", w.astype(np.int8).tobytes(), bias.astype("<i4").tobytes()]
    bufs = []
    for i, p in enumerate(payloads):
        if p and offsets is None:
            b.StartVector(1, len(p), 16)
            for byte in reversed(p):
                b.PrependUint8(byte)
            data = b.EndVector()
        else:
            data = None
        b.StartObject(3)
        if data is not None:
            b.PrependUOffsetTRelativeSlot(0, data, 0)
        if offsets is not None and i:
            b.ForceDefaults(True)
            b.PrependUint64Slot(1, offsets[i - 1][0], 0)
            b.PrependUint64Slot(2, offsets[i - 1][1], 0)
            b.ForceDefaults(False)
        bufs.append(b.EndObject())
    # tensors: 0 x, 1 w, 2 bias, 3 y
    specs = [
        ("x", [1, k], 9, 0, 0.05, 0),
        ("w", [n, k], 9, 1, 0.01, 0),
        ("bias", [n], 2, 2, 0.0005, 0),
        ("y", [1, n], 9, 0, 0.1, 3),
    ]
    tensors = []
    for name, shape, ttype, buf, scale, zp in specs:
        nm = b.CreateString(name)
        sh = _vec(b, shape, "i32")
        sc = _vec(b, [scale], "f32")
        zpv = _vec(b, [zp], "i64")
        b.StartObject(7)
        b.PrependUOffsetTRelativeSlot(2, sc, 0)
        b.PrependUOffsetTRelativeSlot(3, zpv, 0)
        q = b.EndObject()
        b.StartObject(8)
        b.PrependUOffsetTRelativeSlot(0, sh, 0)
        b.PrependInt8Slot(1, ttype, 0)
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, nm, 0)
        b.PrependUOffsetTRelativeSlot(4, q, 0)
        tensors.append(b.EndObject())
    tv = _vec(b, tensors, "table")
    ins = _vec(b, [0, 1, 2], "i32")
    outs = _vec(b, [3], "i32")
    b.StartObject(10)
    b.PrependUint32Slot(0, 0, 0)
    b.PrependUOffsetTRelativeSlot(1, ins, 0)
    b.PrependUOffsetTRelativeSlot(2, outs, 0)
    op = b.EndObject()
    opv = _vec(b, [op], "table")
    gi = _vec(b, [0], "i32")
    go = _vec(b, [3], "i32")
    name = b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tv, 0)
    b.PrependUOffsetTRelativeSlot(1, gi, 0)
    b.PrependUOffsetTRelativeSlot(2, go, 0)
    b.PrependUOffsetTRelativeSlot(3, opv, 0)
    b.PrependUOffsetTRelativeSlot(4, name, 0)
    sg = b.EndObject()
    sgv = _vec(b, [sg], "table")
    b.StartObject(4)
    b.PrependInt8Slot(0, 9, 0)  # deprecated_builtin_code FULLY_CONNECTED
    b.PrependInt32Slot(2, 1, 1)
    b.PrependInt32Slot(3, 9, 0)
    oc = b.EndObject()
    ocv = _vec(b, [oc], "table")
    bv = _vec(b, bufs, "table")
    desc = b.CreateString("edgeward test int8 fc")
    b.StartObject(8)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, ocv, 0)
    b.PrependUOffsetTRelativeSlot(2, sgv, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, bv, 0)
    model = b.EndObject()
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.mark.parametrize("external", [False, True], ids=["inline", "offset-buffers"])
def test_int8_integer_delta_is_exact(tmp_path: Path, external: bool) -> None:
    rng = np.random.default_rng(3)
    w = rng.integers(-60, 60, (64, 128))
    bias = rng.integers(-500, 500, 64)
    w2 = np.clip(w + (rng.random(w.shape) < 0.1) * rng.integers(-3, 4, w.shape), -127, 127)
    base = build_fc_int8(w, bias, tmp_path / "a.tflite", external=external)
    target = build_fc_int8(w2, bias + 1, tmp_path / "b.tflite", external=external)
    info, _, out = _round_trip(base, target, tmp_path, bits=1, allow_lossy=True)
    assert info.stats["idelta"] == 2 and info.stats["q1"] == 0
    assert out.read_bytes() == target.read_bytes()  # integer deltas are exact
    x = rng.integers(-128, 128, (1, 128)).astype(np.int8)
    assert np.array_equal(_run(out, x)[0], _run(target, x)[0])
    assert not np.array_equal(_run(base, x)[0], _run(target, x)[0])


def test_tflite_patch_refuses_other_base(
    hand_tflite: Path, face_tflite: Path, tmp_path: Path
) -> None:
    target = _perturb(face_tflite, tmp_path / "t.tflite", 0.02, 4)
    buf = io.BytesIO()
    info = encode_patch(face_tflite, target, buf)
    with pytest.raises(BaseMismatchError) as e:
        apply_patch(
            hand_tflite,
            io.BytesIO(buf.getvalue()),
            tmp_path / "o.tflite",
            expected_base_digest=None,
            expected_target_digest=None,
        )
    assert info.base_digest in e.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tflite"]
