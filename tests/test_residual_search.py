"""The rate–distortion search (issue 19): the smallest patch meeting a fidelity target,
deterministic, verified by running B' in onnxruntime; refusals; output-kind metrics."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from agent.cli import main
from agent.errors import ResidualError
from agent.residual import apply_patch, encode_patch
from agent.residual.fidelity import kind_from_meta, metrics
from agent.residual.search import Target
from tests.helpers import mlp_onnx

SHAPES = ((64, 192), (192, 192), (192, 10))


def _mlp(ws: list[np.ndarray[Any, Any]], bias: np.ndarray[Any, Any], path: Path) -> Path:
    return mlp_onnx(ws, path, bias=bias)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A and a B where every weight moved (noise plus a low-rank shift, like a
    fine-tune), with 32 sample inputs and 32 held-out ones."""
    d = tmp_path_factory.mktemp("rd")
    rng = np.random.default_rng(19)
    wa = [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in SHAPES]
    wb = []
    for w in wa:
        lowrank = np.outer(rng.standard_normal(w.shape[0]), rng.standard_normal(w.shape[1]))
        wb.append(
            (w + 0.03 * rng.standard_normal(w.shape) * w.std() + 0.01 * lowrank * w.std()).astype(
                np.float32
            )
        )
    bias = rng.standard_normal(10).astype(np.float32)
    a = _mlp(wa, bias, d / "a.onnx")
    b = _mlp(wb, (bias + 0.01).astype(np.float32), d / "b.onnx")
    for name, seed in (("samples", 1), ("heldout", 2)):
        (d / name).mkdir()
        x = np.random.default_rng(seed).standard_normal((32, SHAPES[0][0])).astype(np.float32)
        np.savez(d / name / "s.npz", **{"input:x": x})  # type: ignore[arg-type]
    return {"a": a, "b": b, "samples": d / "samples", "heldout": d / "heldout", "dir": d}


def _logits(model: Path, samples: Path) -> np.ndarray[Any, Any]:
    with np.load(samples / "s.npz") as z:
        x = z["input:x"]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out: np.ndarray[Any, Any] = sess.run(None, {"x": x})[0].astype(np.float64)
    return out


def _cos_min(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_target_cosine_met_and_smaller_than_int8(pair: dict[str, Path], tmp_path: Path) -> None:
    int8 = io.BytesIO()
    encode_patch(pair["a"], pair["b"], int8)
    buf = io.BytesIO()
    recon = tmp_path / "recon.onnx"
    info = encode_patch(
        pair["a"],
        pair["b"],
        buf,
        samples=pair["samples"],
        reconstruct=recon,
        fidelity_target=Target(cosine=0.999),
    )
    f = info.fidelity
    assert f is not None and f["met"] is True and f["target"] == {"cosine": 0.999}
    assert f["cosine_min"] >= 0.999 and sum(f["allocation"].values()) == 4
    assert info.stats["search"]["verify_runs"] >= 1
    assert len(buf.getvalue()) < len(int8.getvalue())
    # independently: the device's B' on the samples, run here
    out = tmp_path / "dev" / "m.onnx"
    apply_patch(
        pair["a"],
        io.BytesIO(buf.getvalue()),
        out,
        expected_base_digest=info.base_digest,
        expected_target_digest=info.target_digest,
    )
    assert out.read_bytes() == recon.read_bytes()
    assert _cos_min(_logits(pair["b"], pair["samples"]), _logits(out, pair["samples"])) >= 0.999


def test_search_is_deterministic(pair: dict[str, Path]) -> None:
    runs = []
    for _ in range(2):
        buf = io.BytesIO()
        encode_patch(
            pair["a"], pair["b"], buf, samples=pair["samples"], fidelity_target=Target(cosine=0.99)
        )
        runs.append(buf.getvalue())
    assert runs[0] == runs[1]


def test_top1_and_max_abs_targets(pair: dict[str, Path]) -> None:
    info = encode_patch(
        pair["a"],
        pair["b"],
        io.BytesIO(),
        samples=pair["samples"],
        fidelity_target=Target(top1=1.0, max_abs=0.05),
        output_kind="classification",
    )
    f = info.fidelity
    assert f is not None and f["met"] and f["output_kind"] == "classification"
    assert f["top1_agreement"] == 1.0 and f["max_abs_diff"] <= 0.05


def test_unreachable_target_refused_with_best_numbers(pair: dict[str, Path]) -> None:
    with pytest.raises(ResidualError) as e:
        encode_patch(
            pair["a"],
            pair["b"],
            io.BytesIO(),
            samples=pair["samples"],
            fidelity_target=Target(cosine=0.999999),
            max_patch_ratio=0.05,
        )
    assert e.value.code == "residual-target"
    msg = str(e.value)
    assert "best achievable cosine_min" in msg and "within 0.05" in msg
    best = float(msg.split("best achievable cosine_min ")[1].split(",", maxsplit=1)[0])
    assert 0 < best < 0.999999


def test_target_needs_samples_and_sane_bounds(pair: dict[str, Path]) -> None:
    with pytest.raises(ResidualError) as e:
        encode_patch(pair["a"], pair["b"], io.BytesIO(), fidelity_target=Target(cosine=0.99))
    assert e.value.code == "residual-samples"
    for bad in ({"cosine": 1.5}, {"top1": -0.1}, {"max_abs": -1.0}, {}):
        with pytest.raises(ResidualError) as e:
            Target(**bad)
        assert e.value.code == "residual-option"


def test_metrics_by_output_kind() -> None:
    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((4, 16)).astype(np.float32)]]
    got = [[(ref[0][0] + 0.01).astype(np.float32)]]
    emb = metrics(ref, got, "embedding")
    cls = metrics(ref, got, "classification")
    dense = metrics(ref, got, "dense")
    auto = metrics(ref, got, None)
    assert "top1_agreement" not in emb and emb["output_kind"] == "embedding"
    assert cls["top1_agreement"] == 1.0 and cls["output_kind"] == "classification"
    assert "top1_agreement" not in dense and 30 < dense["psnr_db"] < 60
    assert auto["output_kind"] == "auto" and "top1_agreement" in auto
    assert all(abs(m["max_abs_diff"] - 0.01) < 1e-6 for m in (emb, cls, dense))


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        ({"task": "image-classification"}, "classification"),
        ({"task": "text-embedding"}, "embedding"),
        ({"task": "text-detection"}, "dense"),
        ({"task": {"name": "x"}, "runtime_config": {"output_format": "logits"}}, "classification"),
        ({"task": "something"}, None),
        (["not", "an", "object"], None),
    ],
)
def test_output_kind_from_meta(tmp_path: Path, doc: Any, kind: str | None) -> None:
    (tmp_path / "technicalinfo.json").write_text(json.dumps(doc))
    assert kind_from_meta(tmp_path) == kind
    assert kind_from_meta(tmp_path / "missing") is None and kind_from_meta(None) is None


def test_cli_diff_with_target(
    pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patch = tmp_path / "p.ewr"
    argv = ["diff", str(pair["a"]), str(pair["b"]), "-o", str(patch)]
    assert main([*argv, "--bits", "1"]) != 0
    err = capsys.readouterr().err
    assert "[residual-lossy]" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--target-cosine", "0.99"]) != 0
    assert "[residual-samples]" in capsys.readouterr().err
    rc = main(
        [
            *argv,
            "--target-cosine",
            "0.999",
            "--samples",
            str(pair["samples"]),
            "--output-kind",
            "embedding",
            "--json",
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fidelity"]["met"] and doc["fidelity"]["output_kind"] == "embedding"
    assert "top1_agreement" not in doc["fidelity"] and doc["stats"]["search"]["allocation"]
    # the patch exists now: it is replaced only with --force
    again = [*argv, "--target-cosine", "0.999", "--samples", str(pair["samples"])]
    assert main(again) == 2 and "[output-exists]" in capsys.readouterr().err
    assert main([*again, "--force"]) == 0
    assert "search  4 tensors" in capsys.readouterr().out


def test_pack_records_allocation_in_manifest(pair: dict[str, Path], tmp_path: Path) -> None:
    from agent.keys import generate_key, load_private
    from agent.package import PackSpec, pack, read_manifest

    sk = load_private(generate_key("signing", tmp_path / "keys").private)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "technicalinfo.json").write_text(
        json.dumps({"task": "image-classification", "runtime_config": {"backend": "onnxruntime"}})
    )
    out = tmp_path / "v2.emp"
    pack(
        PackSpec(
            models=[pair["b"]],
            name="rd",
            version=2,
            signing_keys=[sk],  # type: ignore[list-item]
            base=pair["a"],
            samples_dir=pair["samples"],
            meta_dir=meta,
            fidelity_target=Target(cosine=0.999),
        ),
        out,
    )
    m = read_manifest(out)
    f = m.models[0].fidelity
    assert f is not None and f["met"] is True and f["output_kind"] == "classification"
    assert f["target"] == {"cosine": 0.999} and sum(f["allocation"].values()) == 4
    assert f["cosine_min"] >= 0.999


def test_calibration_finds_linear_inputs_and_gptq_lowers_output_error(
    pair: dict[str, Path],
) -> None:
    """H comes from the layer inputs onnxruntime really produced; error-compensated
    codes at the same scales give less layer-output error than plain rounding (and
    more weight error: the search must judge them at the output)."""
    from agent.residual import calib, quant

    lins = calib.linears(pair["b"], "onnx", pair["samples"])
    assert sorted(lins) == ["w0", "w1", "w2"]
    assert lins["w1"].h.shape == (192, 192) and lins["w1"].in_major
    assert lins["w0"].rows == 32
    ma = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pair["a"])).graph.initializer}
    mb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pair["b"])).graph.initializer}
    d = mb["w1"].astype(np.float64) - ma["w1"].astype(np.float64)
    row = quant.row_length(d.shape)
    scales = (np.abs(d).max(1) / quant.QMAX[3]).astype(np.float32)
    plain = quant.codes(d.reshape(-1), scales, 3, row, 0)
    comp = calib.gptq_codes(d, scales, 3, row, lins["w1"])
    assert comp.dtype == np.int8 and np.abs(comp).max() <= quant.QMAX[3]
    el = quant.element_scales(scales, row, 0, d.size).reshape(d.shape)
    e_plain = plain.reshape(d.shape) * el - d
    e_comp = comp.reshape(d.shape) * el - d
    # 32 rows for 192 inputs: H is mostly shrunk towards I, little to gain, none lost
    assert lins["w1"].out_err(e_comp) < lins["w1"].out_err(e_plain)
    assert calib.gptq_codes(d, scales, 3, row, lins["w1"]).tobytes() == comp.tobytes()
    # correlated inputs with plenty of rows: the compensation pays several times over
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4096, 8)) @ rng.standard_normal((8, 192))
    x += 0.1 * rng.standard_normal(x.shape)
    lin = calib.Linear(calib.shrink(x.T @ x / len(x), len(x)), True, len(x))
    comp = calib.gptq_codes(d, scales, 3, row, lin)
    e_comp = comp.reshape(d.shape) * el - d
    assert lin.out_err(e_comp) < 0.3 * lin.out_err(e_plain)
    assert float(np.sum(e_comp**2)) > float(np.sum(e_plain**2))


def test_shrink_keeps_rank_deficient_gram_invertible() -> None:
    from agent.residual import calib

    x = np.random.default_rng(0).standard_normal((8, 64))
    h = x.T @ x / 8  # rank 8 of 64
    s = calib.shrink(h, 8)
    assert np.linalg.eigvalsh(s).min() > 0.5 * np.mean(np.diag(h))
    assert np.allclose(calib.shrink(h, 10**9), h, atol=1e-6)
