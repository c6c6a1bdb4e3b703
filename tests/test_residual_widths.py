"""Quant widths 1–8, packed and one-byte codes (issue 19): the format as FORMAT.md states
it, rebuilt bit for bit, and patches made before the change still apply."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from agent.errors import ResidualError
from agent.residual import apply_patch, encode_patch, quant, weights_digest
from agent.residual.layout import scan
from agent.residual.stream import Choice

VECTORS = Path(__file__).parent / "vectors"


def _model(ws: list[np.ndarray[Any, Any]], path: Path) -> Path:
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    nodes = [
        helper.make_node("Add" if w.ndim == 1 else "MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"])
        for i, w in enumerate(ws)
    ]
    dtype = helper.np_dtype_to_tensor_dtype(ws[0].dtype)
    g = helper.make_graph(
        nodes,
        "w",
        [helper.make_tensor_value_info("h0", dtype, None)],
        [helper.make_tensor_value_info(f"h{len(ws)}", dtype, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("name", ["q8", "q4", "q2", "q1"])
def test_patches_from_before_the_change_apply(name: str, tmp_path: Path) -> None:
    """Vectors written by the encoder before issue 19 (tests/vectors/README.md)."""
    meta = json.loads((VECTORS / "residual_v1.json").read_text())[name]
    out = tmp_path / "m.onnx"
    digest = apply_patch(
        VECTORS / "residual_v1_base.onnx",
        io.BytesIO((VECTORS / f"residual_v1_{name}.ewr").read_bytes()),
        out,
        expected_base_digest=meta["base_digest"],
        expected_target_digest=meta["target_digest"],
    )
    assert digest == meta["target_digest"]


def _spec_pack(stored: list[int], w: int) -> bytes:
    """FORMAT.md, bit by bit: element i occupies bits i·w and up, LSB first."""
    out = bytearray((len(stored) * w + 7) // 8)
    for i, v in enumerate(stored):
        for j in range(w):
            if v >> j & 1:
                pos = i * w + j
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@pytest.mark.parametrize("unpacked", [False, True])
@pytest.mark.parametrize("w", [3, 5, 6, 7])
def test_hand_built_record_per_format_md(w: int, unpacked: bool, tmp_path: Path) -> None:
    """A quant record written from FORMAT.md alone (no encoder) rebuilds exactly the
    float32 arithmetic the spec states."""
    rng = np.random.default_rng(w)
    base = VECTORS / "residual_v1_base.onnx"
    layout = scan(base)
    a = {
        h.key: np.frombuffer(base.read_bytes()[h.offset : h.offset + h.nbytes], "<f4")
        for h in layout.holes
    }
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    block = 48  # not a divisor of 256: the last block is short
    raw = base.read_bytes()
    expected = bytearray(raw)
    z = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    records = b""
    skel_pos = 0
    pos = 0
    skel = b""
    for h in sorted(layout.holes, key=lambda h: h.offset):
        skel += raw[pos : h.offset]
        skel_pos = len(skel)
        pos = h.offset + h.nbytes
        n = h.nbytes // 4
        q = rng.integers(lo, hi + 1, n)
        s = rng.uniform(1e-3, 1e-1, -(-n // block)).astype(np.float32)
        codes = (
            np.asarray(q, np.int8).tobytes()
            if unpacked
            else _spec_pack([int(v) - lo for v in q], w)
        )
        payload = s.astype("<f4").tobytes() + codes
        frame = z.compress(payload)
        key = h.key.encode()
        records += struct.pack("<BQH", 3, skel_pos, len(key)) + key
        records += struct.pack("<BB2Q", 1, 2, *h.shape) + struct.pack("<Q", h.nbytes)
        records += struct.pack("<BQ", w | (0x80 if unpacked else 0), block)
        records += struct.pack("<Q", len(frame)) + frame
        want = np.empty(n, np.float32)
        for i in range(n):
            d = np.float32(np.float32(q[i]) * s[i // block])
            want[i] = np.float32(a[h.key][i] + d)
        expected[h.offset : h.offset + h.nbytes] = want.astype("<f4").tobytes()
    skel += raw[pos:]
    exp_path = tmp_path / "expected.onnx"
    exp_path.write_bytes(bytes(expected))
    target_digest = weights_digest(exp_path)
    head = b"EWRP" + struct.pack("<BBH", 1, 1, 0) + bytes.fromhex(weights_digest(base)[7:])
    head += struct.pack("<H", 1) + struct.pack("<H", 0) + struct.pack("<QQ", len(raw), len(skel))
    sk = z.compress(skel)
    stream = head + struct.pack("<Q", len(sk)) + sk + records + b"\x00"
    stream += b"EWRT" + bytes.fromhex(target_digest[7:])
    out = tmp_path / "out.onnx"
    got = apply_patch(
        base, io.BytesIO(stream), out, expected_base_digest=None, expected_target_digest=None
    )
    assert got == target_digest and out.read_bytes() == bytes(expected)


def test_one_byte_codes_flag_not_with_8_bits(tmp_path: Path) -> None:
    buf = io.BytesIO()
    info = encode_patch(VECTORS / "residual_v1_base.onnx", VECTORS / "residual_v1_base.onnx", buf)
    assert info.stats["skip"] == 4
    data = (VECTORS / "residual_v1_q8.ewr").read_bytes()
    i = data.index(struct.pack("<BQ", 8, 16))  # bits 8, block = one row of 16
    bad = data[:i] + bytes([0x88]) + data[i + 1 :]
    with pytest.raises(Exception, match="bad quantisation header"):
        apply_patch(
            VECTORS / "residual_v1_base.onnx",
            io.BytesIO(bad),
            tmp_path / "o.onnx",
            expected_base_digest=None,
            expected_target_digest=None,
        )


def test_int1_int2_need_allow_lossy(tmp_path: Path) -> None:
    base = VECTORS / "residual_v1_base.onnx"
    for bits in (1, 2):
        with pytest.raises(ResidualError) as e:
            encode_patch(base, base, io.BytesIO(), bits=bits)
        assert e.value.code == "residual-lossy"
        encode_patch(base, base, io.BytesIO(), bits=bits, allow_lossy=True)
    encode_patch(base, base, io.BytesIO(), bits=3)  # 3 bits and up need nothing


_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    w=st.integers(1, 8),
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    block=st.sampled_from([0, 1, 7, 64, 128]),
    dtype=st.sampled_from(sorted(_DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_round_trip_any_width(
    tmp_path_factory: pytest.TempPathFactory,
    w: int,
    rows: int,
    cols: int,
    block: int,
    dtype: str,
    seed: int,
) -> None:
    """Any width, block and float dtype: the device rebuilds the publisher's B' bytes."""
    tmp = tmp_path_factory.mktemp("rt")
    rng = np.random.default_rng(seed)
    t = _DTYPES[dtype]
    a = (rng.standard_normal((rows, cols)) * 0.1).astype(t)
    b = (a.astype(np.float32) + rng.standard_normal((rows, cols)).astype(np.float32) * 0.01).astype(
        t
    )
    bias_a = rng.standard_normal(cols).astype(t)
    bias_b = (bias_a.astype(np.float32) * 1.01).astype(t)
    pa, pb = _model([a, bias_a], tmp / "a.onnx"), _model([b, bias_b], tmp / "b.onnx")
    blk = block or cols
    choices = {"w0": Choice(w, blk), "w1": Choice(w, cols)}
    buf = io.BytesIO()
    recon = tmp / "recon.onnx"
    info = encode_patch(pa, pb, buf, choices=choices, reconstruct=recon)
    out = tmp / "out" / "m.onnx"
    apply_patch(
        pa,
        io.BytesIO(buf.getvalue()),
        out,
        expected_base_digest=info.base_digest,
        expected_target_digest=info.target_digest,
    )
    assert out.read_bytes() == recon.read_bytes()
    n_q = sum(info.stats[f"q{b}"] for b in quant.BITS)
    assert n_q + info.stats["full"] + info.stats["skip"] == 2
