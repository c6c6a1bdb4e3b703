"""Residual patches on TFLite: real mediapipe float16/float32 models and hand-built
int8 models (LiteRT has no converter, and no int8 model ships in a wheel at hand), with
payloads inside the flatbuffer and after it (Buffer.offset/size)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import BaseMismatchError
from agent.residual import apply_patch, encode_patch, weights_digest
from tests.assets import _wheel
from tests.helpers import build_fc_int8, perturb


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
    target = perturb(hand_tflite, tmp_path / "t.tflite", 0.02, 1)
    x = np.random.default_rng(0).uniform(0, 1, (1, 224, 224, 3)).astype(np.float32)
    want, base_out = _run(target, x), _run(hand_tflite, x)
    assert not np.allclose(want[0], base_out[0])  # the perturbed buffers are weights
    info, size, out = _round_trip(hand_tflite, target, tmp_path, bits=8)
    assert info.stats["q8"] >= 90 and size < 0.6 * target.stat().st_size
    got = _run(out, x)
    assert _cos(want[0], got[0]) > 0.9999
    assert np.max(np.abs(want[0] - got[0])) < 0.01 * np.max(np.abs(want[0] - base_out[0])) + 1e-3


def test_float32_recrop_int4_and_fidelity(recrop: Path, tmp_path: Path) -> None:
    target = perturb(recrop, tmp_path / "t.tflite", 0.02, 2)
    x = np.random.default_rng(1).uniform(0, 1, (1, 256, 256, 3)).astype(np.float32)
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "a.npz", **{"input:input_1": x})  # type: ignore[arg-type]
    info, size, out = _round_trip(recrop, target, tmp_path, bits=4, group_size=64, samples=samples)
    assert info.stats["q4"] > 40 and size < 0.3 * target.stat().st_size
    assert _cos(_run(target, x)[0], _run(out, x)[0]) > 0.999
    assert info.fidelity is not None and info.fidelity["cosine_min"] > 0.999


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
    target = perturb(face_tflite, tmp_path / "t.tflite", 0.02, 4)
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
