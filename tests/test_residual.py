"""Residual patches on real ONNX models (PP-OCR det): round trips, layouts, refusals.

The "fine-tuned" target is the real model with its weights perturbed through
onnx.numpy_helper; every round trip checks that the device's output is byte-identical to
the publisher's reconstruction and that onnxruntime gives nearly the target's outputs.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from agent.errors import BaseMismatchError, EdgewardError, FormatError, TargetDigestError
from agent.residual import PatchInfo, apply_patch, encode_patch, quant, weights_digest
from agent.residual.layout import scan


def _perturb(model: onnx.ModelProto, scale: float, seed: int) -> onnx.ModelProto:
    """Copy with every float tensor (Constant values and initializers) nudged."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rng = np.random.default_rng(seed)
    tensors = list(m.graph.initializer) + [
        a.t
        for n in m.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    for t in tensors:
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.size < 16:  # small ones include Resize scales
            continue
        noise = rng.normal(0, 1, a.shape) * scale * (np.abs(a).mean() + 1e-6)
        t.CopyFrom(numpy_helper.from_array((a + noise).astype(np.float32), t.name))
    m.ir_version = 10
    return m


def _to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its Constant nodes turned into graph initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.ir_version = 10
    return m


def _save(model: onnx.ModelProto, path: Path, external: str | None = None) -> Path:
    if external:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save rewrites the proto in place for external data
        onnx.save(
            copy,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external,
            size_threshold=256,
        )
    else:
        onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray[Any, Any] = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return out


def _cos(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def det(ppocr_det: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("det")
    model = onnx.load(str(ppocr_det))
    # compare logits: the final sigmoid saturates to ~0 on synthetic inputs
    assert model.graph.node[-1].op_type == "Sigmoid"
    logits = model.graph.node[-1].input[0]
    del model.graph.node[-1]
    model.graph.output[0].name = logits
    init = _to_initializers(model)
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 64, 64)).astype(np.float32)
    return {
        "dir": d,
        "base": _save(model, d / "base.onnx"),
        "target": _save(_perturb(model, 0.02, 1), d / "target.onnx"),
        "base_init": _save(init, d / "base_init.onnx"),
        "target_init": init,
        "target_init_perturbed": _perturb(init, 0.02, 2),
        "x": x,
    }


def _round_trip(base: Path, target: Path, work: Path, **kw: Any) -> tuple[PatchInfo, bytes, Path]:
    buf = io.BytesIO()
    recon = work / "recon" / target.name
    recon.parent.mkdir(parents=True, exist_ok=True)
    info = encode_patch(base, target, buf, reconstruct=recon, **kw)
    out = work / "device" / target.name
    got = apply_patch(
        base,
        io.BytesIO(buf.getvalue()),
        out,
        expected_base_digest=info.base_digest,
        expected_target_digest=info.target_digest,
    )
    assert got == info.target_digest == weights_digest(out) == weights_digest(recon)
    assert info.base_digest == weights_digest(base)
    assert out.read_bytes() == recon.read_bytes()  # publisher B' == device B'
    return info, buf.getvalue(), out


def test_constants_round_trip_int8(det: dict[str, Any], tmp_path: Path) -> None:
    info, patch, out = _round_trip(det["base"], det["target"], tmp_path)
    s = info.stats
    assert info.format == "onnx" and s["tensors"] == 336
    assert s["q8"] > 100 and s["q4"] == 0 and s["skip"] + s["full"] + s["q8"] == 336
    assert len(patch) < 0.35 * det["target"].stat().st_size
    want, got = _run(det["target"], det["x"]), _run(out, det["x"])
    assert _cos(want, got) > 0.999
    assert out.stat().st_size == det["target"].stat().st_size


def test_identical_models_are_all_skips(det: dict[str, Any], tmp_path: Path) -> None:
    info, patch, out = _round_trip(det["base"], det["base"], tmp_path)
    assert info.stats["skip"] == info.stats["tensors"] and info.target_digest == info.base_digest
    assert out.read_bytes() == det["base"].read_bytes()
    assert len(patch) < 30_000


def test_external_data_and_layout_change(det: dict[str, Any], tmp_path: Path) -> None:
    """Base with inline initializers, target with external data: the device writes the
    target's layout (model + w.data next to it); tensors are matched by name."""
    src = tmp_path / "src"
    src.mkdir()
    target = _save(det["target_init_perturbed"], src / "t.onnx", external="w.data")
    info, _, out = _round_trip(det["base_init"], target, tmp_path, bits=4)
    assert (out.parent / "w.data").read_bytes() == (tmp_path / "recon" / "w.data").read_bytes()
    assert info.stats["q4"] > 100
    assert _cos(_run(target, det["x"]), _run(out, det["x"])) > 0.99
    # and external → external (base from the external-data target itself)
    info2, _, out2 = _round_trip(target, target, tmp_path / "again")
    assert info2.stats["skip"] == info2.stats["tensors"]
    assert (out2.parent / "w.data").read_bytes() == (src / "w.data").read_bytes()


def test_graph_change_new_node_and_initializer(det: dict[str, Any], tmp_path: Path) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(det["target_init_perturbed"])
    out_name = m.graph.output[0].name
    m.graph.node[-1].output[0] = "pre_scale"
    m.graph.initializer.append(numpy_helper.from_array(np.array([0.5], np.float32), "k_new"))
    m.graph.node.append(helper.make_node("Mul", ["pre_scale", "k_new"], [out_name]))
    target = _save(m, tmp_path / "changed.onnx")
    info, _, out = _round_trip(det["base_init"], target, tmp_path)
    assert info.stats["full"] >= 1
    want, got = _run(target, det["x"]), _run(out, det["x"])
    assert _cos(want, got) > 0.999
    plain = _run(_save(det["target_init_perturbed"], tmp_path / "plain.onnx"), det["x"])
    np.testing.assert_allclose(want, 0.5 * plain, rtol=1e-5, atol=1e-5)  # the new node acts
    assert _cos(got, plain) > 0.999 and np.abs(got).max() < 0.6 * np.abs(plain).max()


def test_wrong_base_refused(det: dict[str, Any], tmp_path: Path) -> None:
    buf = io.BytesIO()
    info = encode_patch(det["base"], det["target"], buf)
    wrong = tmp_path / "wrong.onnx"
    shutil.copy(det["target"], wrong)
    before = _sha(wrong)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(BaseMismatchError) as e:
        apply_patch(
            wrong,
            io.BytesIO(buf.getvalue()),
            out,
            expected_base_digest=None,
            expected_target_digest=info.target_digest,
        )
    assert e.value.code == "base-mismatch"
    assert info.base_digest in e.value.message and weights_digest(wrong) in e.value.message
    assert _sha(wrong) == before and not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    # the right base, but the caller expects another one
    with pytest.raises(BaseMismatchError):
        apply_patch(
            det["base"],
            io.BytesIO(buf.getvalue()),
            out,
            expected_base_digest="sha256:" + "0" * 64,
            expected_target_digest=None,
        )
    assert not out.exists()


def test_base_checked_through_the_output(det: dict[str, Any], tmp_path: Path) -> None:
    """The base is hashed only when the output fails: a base differing in a weight the
    patch reads is refused naming both digests; one differing only in its skeleton (a
    byte the output does not depend on) yields the exact target, unless verify_base."""
    model = onnx.load(str(det["base"]))
    model.producer_name = "edgeward-test"
    base = _save(model, tmp_path / "base.onnx")
    buf = io.BytesIO()
    info = encode_patch(base, det["target"], buf)
    assert info.stats["q8"] > 0
    data = base.read_bytes()
    big = max(scan(base).holes, key=lambda h: h.nbytes)
    weight = bytearray(data)
    i = big.offset + big.nbytes // 2 // 4 * 4
    weight[i : i + 4] = np.float32(123.0).tobytes()  # no rounding can absorb this
    skel = bytearray(data)
    assert data.count(b"edgeward-test") == 1
    j = data.index(b"edgeward-test")
    skel[j : j + 1] = b"E"
    for changed, refused in ((weight, True), (skel, False)):
        p = tmp_path / "b.onnx"
        p.write_bytes(bytes(changed))
        out = tmp_path / "o" / "m.onnx"
        for verify in (False, True):
            if refused or verify:
                with pytest.raises(BaseMismatchError) as e:
                    apply_patch(
                        p,
                        io.BytesIO(buf.getvalue()),
                        out,
                        expected_base_digest=info.base_digest,
                        expected_target_digest=info.target_digest,
                        verify_base=verify,
                    )
                assert info.base_digest in e.value.message
                assert weights_digest(p) in e.value.message
                assert not out.exists()
            else:
                got = apply_patch(
                    p,
                    io.BytesIO(buf.getvalue()),
                    out,
                    expected_base_digest=info.base_digest,
                    expected_target_digest=info.target_digest,
                )
                assert got == info.target_digest == weights_digest(out)
                out.unlink()


def test_wrong_expected_target_refused(det: dict[str, Any], tmp_path: Path) -> None:
    buf = io.BytesIO()
    encode_patch(det["base"], det["target"], buf)
    out = tmp_path / "m.onnx"
    with pytest.raises(TargetDigestError):
        apply_patch(
            det["base"],
            io.BytesIO(buf.getvalue()),
            out,
            expected_base_digest=None,
            expected_target_digest="sha256:" + "1" * 64,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
def test_corrupt_patch_refused(det: dict[str, Any], tmp_path: Path, where: float) -> None:
    buf = io.BytesIO()
    info = encode_patch(det["base"], det["target"], buf)
    data = buf.getvalue()
    flipped = bytearray(data)
    flipped[int(len(data) * where)] ^= 0x10
    for bad in (bytes(flipped), data[: int(len(data) * where)]):
        out = tmp_path / "m.onnx"
        with pytest.raises(EdgewardError) as e:
            apply_patch(
                det["base"],
                io.BytesIO(bad),
                out,
                expected_base_digest=info.base_digest,
                expected_target_digest=info.target_digest,
            )
        assert isinstance(e.value, FormatError | TargetDigestError | BaseMismatchError)
        assert list(tmp_path.iterdir()) == []


def test_max_rel_err_fallback(det: dict[str, Any], tmp_path: Path) -> None:
    loose, _, _ = _round_trip(det["base"], det["target"], tmp_path / "a", bits=1, allow_lossy=True)
    assert loose.stats["fallbacks"] == 0 and loose.stats["q1"] > 100
    tight, _, _ = _round_trip(
        det["base"],
        det["target"],
        tmp_path / "b",
        bits=1,
        allow_lossy=True,
        max_rel_err=loose.stats["max_rel_err"] / 2,
    )
    assert tight.stats["fallbacks"] > 0 and tight.stats["q1"] < loose.stats["q1"]
    assert tight.stats["q2"] + tight.stats["q4"] + tight.stats["q8"] > 0
    assert tight.stats["max_rel_err"] <= loose.stats["max_rel_err"] / 2
    exact, _, out = _round_trip(det["base"], det["target"], tmp_path / "c", max_rel_err=0.0)
    assert exact.stats["q8"] == 0 and out.read_bytes() == det["target"].read_bytes()


def test_widths_and_group_sizes(det: dict[str, Any], tmp_path: Path) -> None:
    sizes, errs = {}, {}
    for bits, g in ((8, 128), (4, 128), (4, 64), (2, 128), (1, 128)):
        info, patch, out = _round_trip(
            det["base"],
            det["target"],
            tmp_path / f"{bits}-{g}",
            bits=bits,
            group_size=g,
            allow_lossy=True,
        )
        assert info.stats[f"q{bits}"] > 100
        sizes[bits, g], errs[bits, g] = len(patch), info.stats["max_rel_err"]
        assert _cos(_run(det["target"], det["x"]), _run(out, det["x"])) > 0.98
    assert sizes[1, 128] < sizes[2, 128] < sizes[4, 128] < sizes[4, 64] < sizes[8, 128]
    assert errs[8, 128] < errs[4, 64] < errs[4, 128] < errs[2, 128]


def test_fidelity_report(det: dict[str, Any], tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(2):
        x = np.random.default_rng(i).normal(0, 1, (1, 3, 64, 64)).astype(np.float32)
        np.savez(samples / f"s{i}.npz", **{"input:x": x})  # type: ignore[arg-type]
    info = encode_patch(det["base"], det["target"], io.BytesIO(), bits=4, samples=samples)
    f = info.fidelity
    assert f is not None and f["samples"] == 2
    assert f["nonfinite_outputs"] == 0
    assert all(
        isinstance(v, float)
        for k, v in f.items()
        if k not in ("samples", "sample_rows", "nonfinite_outputs", "output_kind")
    )
    assert f["output_kind"] == "auto"
    assert 0.99 < f["cosine_min"] <= f["cosine_mean"] <= 1.0 + 1e-9
    assert 0 < f["max_abs_diff"] < 5.0 and 0.5 < f["top1_agreement"] <= 1.0


# --- arithmetic --------------------------------------------------------------------


def test_bf16_rne_matches_ml_dtypes() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(0, 1e3, 10_000).astype(np.float32),
            np.array(
                [0.0, -0.0, np.inf, -np.inf, 1e-40, 3.4e38, 1.00390625, 1.01171875], np.float32
            ),
            rng.integers(0, 2**32, 10_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        ]
    )
    got = quant.bf16_rne(x)
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(got[finite], want[finite])
    assert np.all((got[~finite] & 0x7FFF) == 0x7FC0)


def test_dequant_is_separate_multiply_then_add() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 1000).astype(np.float32)
    q = rng.integers(-127, 128, 1000).astype(np.int8)
    s = rng.uniform(1e-4, 1e-2, 8).astype(np.float32)
    got = quant.dequant_add(a, q, s, 128, 0)
    for i in range(0, 1000, 37):
        d = np.float32(np.float32(q[i]) * s[i // 128])
        assert got[i] == np.float32(a[i] + d)
    # chunk boundaries inside a block give the same bits
    parts = [
        quant.dequant_add(a[o : o + 300], q[o : o + 300], s, 128, o) for o in range(0, 1000, 300)
    ]
    assert np.array_equal(np.concatenate(parts), got)


@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 129, 1000])
def test_pack_round_trip(bits: int, n: int) -> None:
    rng = np.random.default_rng(n)
    lo = -1 if bits == 1 else -quant.QMAX[bits]
    q = rng.integers(lo, quant.QMAX[bits] + 1, n).astype(np.int8)
    if bits == 1:
        q[q == 0] = 1
    packed = quant.pack(q, bits)
    assert len(packed) == quant.packed_size(n, bits)
    assert np.array_equal(quant.unpack(packed, bits, n), q)


@pytest.mark.parametrize("bits", [8, 4, 1])
def test_large_tensors_cross_chunks(tmp_path: Path, bits: int) -> None:
    """Tensors over one dequantisation chunk (2^20 elements) with rows and groups that
    straddle chunk boundaries, in float32, float16 and bfloat16: device == publisher,
    and every element is within half a quantisation step of the target."""
    import ml_dtypes

    rng = np.random.default_rng(bits)
    shape = (1031, 1100)
    kinds = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
    paths = []
    for version in range(2):
        inits, nodes, outs = [], [], []
        for name, dt in kinds.items():
            a = np.random.default_rng(5).normal(0, 1, shape).astype(np.float32)
            if version:
                a += rng.normal(0, 0.01, shape).astype(np.float32)
            raw = a.astype(dt).tobytes()
            code = {"f32": onnx.TensorProto.FLOAT, "f16": onnx.TensorProto.FLOAT16}.get(
                name, onnx.TensorProto.BFLOAT16
            )
            inits.append(helper.make_tensor(name, code, shape, raw, raw=True))
            nodes.append(helper.make_node("Identity", [name], [f"y_{name}"]))
            outs.append(helper.make_tensor_value_info(f"y_{name}", code, shape))
        m = helper.make_model(helper.make_graph(nodes, "big", [], outs, inits))
        m.ir_version = 10
        paths.append(_save(m, tmp_path / f"v{version}.onnx"))
    info, _, out = _round_trip(paths[0], paths[1], tmp_path, bits=bits, allow_lossy=True)
    assert info.stats[f"q{bits}"] == 3
    got = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    want = {t.name: t for t in onnx.load(str(paths[1])).graph.initializer}
    for name, dt in kinds.items():
        b = np.frombuffer(want[name].raw_data, dt).astype(np.float64).reshape(shape)
        a = np.frombuffer(
            {t.name: t for t in onnx.load(str(paths[0])).graph.initializer}[name].raw_data, dt
        ).astype(np.float64)
        r = np.frombuffer(got[name].raw_data, dt).astype(np.float64).reshape(shape)
        err = np.abs(r - b)
        if bits == 8:  # per row: within half a step plus the storage rounding
            step = np.abs(b - a.reshape(shape)).max(axis=1, keepdims=True) / 127
        elif bits == 4:  # per group of 128 flattened elements
            d = np.abs(b - a.reshape(shape)).ravel()
            pad = np.concatenate([d, np.zeros(-len(d) % 128)])
            step = np.repeat(pad.reshape(-1, 128).max(axis=1) / 7, 128)[: len(d)].reshape(shape)
        else:
            continue
        ulp = np.abs(b) * {"f32": 2**-23, "f16": 2**-10, "bf16": 2**-7}[name]
        assert np.all(err <= step / 2 * 1.001 + ulp + 1e-7), name


def test_raw_files_are_exact(tmp_path: Path) -> None:
    """Files that are neither ONNX nor TFLite travel as one exact integer delta (same
    size) or as full bytes."""
    rng = np.random.default_rng(9)
    a = tmp_path / "a.bin"
    a.write_bytes(rng.bytes(50_000))
    data = bytearray(a.read_bytes())
    data[1000:1100] = bytes(100)
    for name, content in (("same.bin", bytes(data)), ("longer.bin", bytes(data) + b"tail")):
        b = tmp_path / name
        b.write_bytes(content)
        info, patch, out = _round_trip(a, b, tmp_path / name.split(".")[0])
        assert info.format == "raw" and out.read_bytes() == content
        assert info.stats["idelta" if name == "same.bin" else "full"] == 1
        if name == "same.bin":
            assert len(patch) < 2_000


def test_output_may_not_replace_the_base(det: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    base = _save(det["target_init_perturbed"], src / "m.onnx", external="w.data")
    buf = io.BytesIO()
    encode_patch(base, base, buf)
    before = (src / "w.data").read_bytes()
    for out in (base, src / "other.onnx"):  # the second would replace w.data
        with pytest.raises(EdgewardError) as e:
            apply_patch(
                base,
                io.BytesIO(buf.getvalue()),
                out,
                expected_base_digest=None,
                expected_target_digest=None,
            )
        assert e.value.code == "residual-output"
    assert (src / "w.data").read_bytes() == before
    assert sorted(p.name for p in src.iterdir()) == ["m.onnx", "w.data"]


def test_unusable_base_is_a_base_mismatch(det: dict[str, Any], tmp_path: Path) -> None:
    buf = io.BytesIO()
    info = encode_patch(det["base"], det["target"], buf)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 100)
    with pytest.raises(BaseMismatchError) as e:
        apply_patch(
            bad,
            io.BytesIO(buf.getvalue()),
            tmp_path / "o.onnx",
            expected_base_digest=None,
            expected_target_digest=None,
        )
    assert info.base_digest in e.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_digest_and_header_follow_format_md(tmp_path: Path) -> None:
    """The canonical digest and the stream header, recomputed from FORMAT.md by hand."""
    import struct

    payload = b"edgeward" * 100
    f = tmp_path / "w.bin"
    f.write_bytes(payload)
    sha = hashlib.sha256
    d = b"edgeward-weights-v1\x00" + struct.pack("<BI", 3, 1)
    d += struct.pack("<HB", 4, 0) + b"data" + struct.pack("<BQ", 1, len(payload))
    d += struct.pack("<QHQ", len(payload), 0, 0) + sha(payload).digest()
    d += struct.pack("<H", 1) + struct.pack("<H", 0) + struct.pack("<Q", 0) + sha(b"").digest()
    want = "sha256:" + sha(d).hexdigest()
    assert weights_digest(f) == want
    buf = io.BytesIO()
    info = encode_patch(f, f, buf)
    raw = buf.getvalue()
    assert raw[:8] == b"EWRP\x01\x03\x00\x00" and raw[8:40].hex() == want[7:]
    assert raw[40:42] == b"\x01\x00" and raw[42:44] == b"\x00\x00"  # one file, name ""
    assert struct.unpack("<QQ", raw[44:60]) == (len(payload), 0)
    assert raw[-36:-32] == b"EWRT" and raw[-32:].hex() == info.target_digest[7:]


def test_float_data_tensors(ppocr_cls: Path, tmp_path: Path) -> None:
    """PP-OCR cls keeps its weights in packed float_data: those bytes are holes too."""
    model = onnx.load(str(ppocr_cls))
    rng = np.random.default_rng(11)
    changed = 0
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute[0].t.float_data) >= 16:
            t = n.attribute[0].t
            a = np.array(t.float_data, np.float32)
            a += rng.normal(0, 0.01, a.shape).astype(np.float32) * np.float32(np.abs(a).mean())
            t.float_data[:] = a.tolist()
            changed += 1
    assert changed > 50
    model.ir_version = 10
    target = _save(model, tmp_path / "cls.onnx")
    info, patch, out = _round_trip(ppocr_cls, target, tmp_path)
    assert info.stats["q8"] >= changed and len(patch) < 0.4 * target.stat().st_size
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    assert _cos(_run(target, x), _run(out, x)) > 0.999


def test_positive_tensors_stay_positive(tmp_path: Path) -> None:
    """Low widths may not make a strictly positive tensor (e.g. BatchNorm variances)
    non-positive: such a tensor goes at a wider width or full."""
    rng = np.random.default_rng(12)
    var = rng.uniform(1e-4, 1.0, (64, 32)).astype(np.float32)
    paths = []
    for i, raw in enumerate((var, var * (1 + rng.normal(0, 0.2, var.shape)).astype(np.float32))):
        v = np.abs(raw) + np.float32(1e-5)
        g = helper.make_graph(
            [helper.make_node("Sqrt", ["var"], ["y"])],
            "pos",
            [],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(v.shape))],
            [numpy_helper.from_array(v, "var")],
        )
        m = helper.make_model(g)
        m.ir_version = 10
        paths.append(_save(m, tmp_path / f"p{i}.onnx"))
    info, _, out = _round_trip(paths[0], paths[1], tmp_path, bits=1, allow_lossy=True)
    assert info.stats["fallbacks"] == 1 and info.stats["q1"] == 0
    r = numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0])
    assert r.min() > 0 and np.isfinite(_run_noinput(out)).all()


def _run_noinput(path: Path) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    out: np.ndarray[Any, Any] = ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    ).run(None, {})[0]
    return out
