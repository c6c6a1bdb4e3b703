"""Corrupt patches and model files: arbitrary bytes and bit flips raise Edgeward errors
(never a raw exception, never a hang) and leave no output behind."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import EdgewardError
from agent.residual import apply_patch, encode_patch, weights_digest
from agent.residual.layout import scan
from tests.helpers import build_fc_int8

FUZZ = settings(
    max_examples=150,
    deadline=None,  # the 300 s pytest timeout catches hangs; timings on shared CI vary
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, str]:
    """A small int8 TFLite base and a patch to a changed version (idelta + quant)."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    w = rng.integers(-60, 60, (32, 64))
    base = build_fc_int8(w, rng.integers(-9, 9, 32), d / "a.tflite")
    target = build_fc_int8(w + (rng.random(w.shape) < 0.2), rng.integers(-9, 9, 32), d / "b.tflite")
    buf = io.BytesIO()
    info = encode_patch(base, target, buf)
    return base, buf.getvalue(), info.target_digest


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(pair: tuple[Path, bytes, str], tmp_path: Path, data: bytes) -> None:
    base, _, _ = pair
    out = tmp_path / "o.tflite"
    with pytest.raises(EdgewardError):
        apply_patch(
            base, io.BytesIO(data), out, expected_base_digest=None, expected_target_digest=None
        )
    assert not out.exists()


@FUZZ
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_bit_flips(pair: tuple[Path, bytes, str], tmp_path: Path, pos: int, bit: int) -> None:
    base, patch, target = pair
    bad = bytearray(patch)
    bad[pos % len(bad)] ^= 1 << bit
    out = tmp_path / "o.tflite"
    try:
        got = apply_patch(
            base,
            io.BytesIO(bytes(bad)),
            out,
            expected_base_digest=None,
            expected_target_digest=target,
        )
    except EdgewardError:
        assert not out.exists()
    else:  # a flip zstd may ignore (e.g. window size): the result must still be right
        assert got == target == weights_digest(out)
        out.unlink()
    assert [p.name for p in tmp_path.iterdir()] == []


@FUZZ
@given(cut=st.integers(min_value=0))
def test_truncation(pair: tuple[Path, bytes, str], tmp_path: Path, cut: int) -> None:
    base, patch, _ = pair
    out = tmp_path / "o.tflite"
    with pytest.raises(EdgewardError):
        apply_patch(
            base,
            io.BytesIO(patch[: cut % len(patch)]),
            out,
            expected_base_digest=None,
            expected_target_digest=None,
        )
    assert not out.exists()


@FUZZ
@given(
    data=st.binary(max_size=2048),
    suffix=st.sampled_from([".onnx", ".tflite"]),
)
def test_model_scanners(tmp_path: Path, data: bytes, suffix: str) -> None:
    p = tmp_path / f"m{suffix}"
    p.write_bytes(data if suffix == ".onnx" else data[:4] + b"TFL3" + data[8:])
    with contextlib.suppress(EdgewardError):  # anything else fails the test
        scan(p)


@FUZZ
@given(pos=st.integers(min_value=0), val=st.integers(min_value=0, max_value=255))
def test_model_byte_changes(
    pair: tuple[Path, bytes, str], tmp_path: Path, pos: int, val: int
) -> None:
    """A base differing in any byte is refused with ``verify_base`` (the base digest
    covers every byte). By default the base is only hashed when the output fails its
    digest: a change in a tensor the patch reads (here all exact integer deltas) is
    refused, any other change (skeleton bytes) can only yield the exact target."""
    base, patch, target = pair
    data = bytearray(base.read_bytes())
    at = pos % len(data)
    changed = data[at] != val
    data[at] = val
    p = tmp_path / "m.tflite"
    p.write_bytes(bytes(data))
    out = tmp_path / "o.tflite"
    if changed:
        with pytest.raises(EdgewardError):
            apply_patch(
                p,
                io.BytesIO(patch),
                out,
                expected_base_digest=None,
                expected_target_digest=None,
                verify_base=True,
            )
        assert not out.exists()
        read = any(h.offset <= at < h.offset + h.nbytes for h in scan(base).holes)
        try:
            got = apply_patch(
                p, io.BytesIO(patch), out, expected_base_digest=None, expected_target_digest=None
            )
        except EdgewardError:
            assert not out.exists()
        else:
            assert not read and got == target == weights_digest(out)
            out.unlink()
