"""Low-rank Δ records (issue 19, agent/residual/lowrank.py): the device rebuilds the
publisher's B' bit for bit whatever the chunking, the search picks factors on a fine-tune
whose Δ is low-rank and meets its target in onnxruntime, and malformed low-rank records
are refused with a clear error and no output."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from agent.errors import EdgewardError
from agent.residual import apply_patch, encode_patch, lowrank, search
from agent.residual.search import Target
from agent.residual.stream import LOWRANK, Choice
from tests.helpers import mlp_onnx
from tests.test_residual_search import _cos_min

SHAPES = ((96, 256), (256, 256), (256, 10))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A, and a B whose every weight moved along a few directions (rank 3 per matrix,
    plus a little noise), as a fine-tune moves them; samples and held-out inputs."""
    d = tmp_path_factory.mktemp("lowrank")
    rng = np.random.default_rng(7)
    wa = [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in SHAPES]
    wb = []
    for w in wa:
        u = rng.standard_normal((w.shape[0], 3))
        v = rng.standard_normal((3, w.shape[1]))
        shift = 0.3 * (u @ v) * w.std() / np.sqrt(3)
        wb.append((w + shift + 0.002 * rng.standard_normal(w.shape) * w.std()).astype(np.float32))
    for name, seed in (("samples", 1), ("heldout", 2)):
        (d / name).mkdir()
        x = np.random.default_rng(seed).standard_normal((32, SHAPES[0][0])).astype(np.float32)
        np.savez(d / name / "s.npz", **{"input:x": x})  # type: ignore[arg-type]
    return {
        "a": mlp_onnx(wa, d / "a.onnx"),
        "b": mlp_onnx(wb, d / "b.onnx"),
        **{k: d / k for k in ("samples", "heldout")},
    }


def _out(model: Path, samples: Path) -> Any:
    with np.load(samples / "s.npz") as z:
        x = z["input:x"]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0], np.float64)


def _apply(pair: dict[str, Path], patch: bytes, info: Any, out: Path) -> None:
    apply_patch(
        pair["a"],
        io.BytesIO(patch),
        out,
        expected_base_digest=info.base_digest,
        expected_target_digest=info.target_digest,
    )


def test_delta_is_the_same_whatever_the_chunking() -> None:
    rng = np.random.default_rng(3)
    d = rng.standard_normal((37, 4)) @ rng.standard_normal((4, 53)) + 0.01 * rng.standard_normal(
        (37, 53)
    )
    for f in lowrank.factorise(d, (1, 4, 8)):
        fl = f.floats()
        whole = lowrank.delta_piece(f, fl, 0, d.size)
        assert whole.dtype == np.float32
        for step in (1, 7, 52, 53, 60, 200):
            parts = [
                lowrank.delta_piece(f, fl, e0, min(step, d.size - e0))
                for e0 in range(0, d.size, step)
            ]
            assert np.concatenate(parts).view(np.uint32).tolist() == whole.view(np.uint32).tolist()
        if f.rank >= 4:  # the factors hold Δ up to their rounding
            assert np.linalg.norm(whole.reshape(d.shape) - d) < 0.05 * np.linalg.norm(d)


@pytest.mark.parametrize(("rank", "bits"), [(3, 0), (8, 2), (4, 8)])
def test_record_round_trip_is_bit_exact(
    pair: dict[str, Path], tmp_path: Path, rank: int, bits: int
) -> None:
    """A low-rank record (factors alone, or with a remainder) applied on the device
    gives the bytes the publisher reconstructed, checked by the target digest."""
    w = numpy_helper.to_array(onnx.load(str(pair["a"])).graph.initializer[1])
    wb = numpy_helper.to_array(onnx.load(str(pair["b"])).graph.initializer[1])
    (f,) = lowrank.factorise(wb.astype(np.float64) - w, (rank,))
    choices = {"w1": Choice(bits, w.shape[1] if bits else 0, lowrank=f)}
    buf = io.BytesIO()
    recon = tmp_path / "recon.onnx"
    info = encode_patch(pair["a"], pair["b"], buf, choices=choices, reconstruct=recon)
    assert info.stats["lowrank"] == 1
    out = tmp_path / "dev" / "m.onnx"
    _apply(pair, buf.getvalue(), info, out)
    assert out.read_bytes() == recon.read_bytes()


def test_search_picks_factors_on_a_low_rank_finetune(
    pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run() -> tuple[int, Any]:
        buf = io.BytesIO()
        info = encode_patch(
            pair["a"],
            pair["b"],
            buf,
            samples=pair["samples"],
            fidelity_target=Target(cosine=0.999),
        )
        out = tmp_path / f"dev{len(buf.getvalue())}" / "m.onnx"
        _apply(pair, buf.getvalue(), info, out)
        cos = _cos_min(_out(pair["b"], pair["heldout"]), _out(out, pair["heldout"]))
        assert cos >= 0.999, cos  # measured here, on inputs the search never saw
        return len(buf.getvalue()), info.fidelity

    size, fid = run()
    assert any(k.startswith("lr") for k in fid["allocation"]), fid["allocation"]
    monkeypatch.setattr(search, "LOWRANK", False)
    size_without, _ = run()
    assert size * 2 < size_without, (size, size_without)


def _lowrank_record_tail(patch: bytes, key: bytes) -> int:
    """Offset of the (bits, block, rank) fields of the low-rank record of ``key``."""
    i = patch.index(struct.pack("<H", len(key)) + key)
    assert patch[i - 9] == LOWRANK
    o = i + 2 + len(key)
    ndim = patch[o + 1]
    return o + 2 + 8 * ndim + 8


@pytest.mark.parametrize(
    ("field", "value"),
    [("rank", 0), ("rank", 10_000), ("bits", 9), ("bits", 0x88), ("block", 0)],
)
def test_malformed_lowrank_records_are_refused(
    pair: dict[str, Path], tmp_path: Path, field: str, value: int
) -> None:
    w = numpy_helper.to_array(onnx.load(str(pair["a"])).graph.initializer[1])
    wb = numpy_helper.to_array(onnx.load(str(pair["b"])).graph.initializer[1])
    (f,) = lowrank.factorise(wb.astype(np.float64) - w, (4,))
    buf = io.BytesIO()
    info = encode_patch(pair["a"], pair["b"], buf, choices={"w1": Choice(2, 256, lowrank=f)})
    patch = bytearray(buf.getvalue())
    o = _lowrank_record_tail(bytes(patch), b"w1")
    at = {"bits": (o, "<B"), "block": (o + 1, "<Q"), "rank": (o + 9, "<I")}[field]
    struct.pack_into(at[1], patch, at[0], value)
    out = tmp_path / "dev" / "m.onnx"
    with pytest.raises(EdgewardError) as err:
        _apply(pair, bytes(patch), info, out)
    assert "low-rank" in err.value.message, err.value.message
    assert not out.exists()
