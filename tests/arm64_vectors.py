"""Residual patches packed on this (host) machine, for the arm64 parity test.

``python -m tests.arm64_vectors DIR`` writes, for real ONNX and TFLite models with
perturbed weights, the base model, the patch stream and the SHA-256 of the publisher's
reconstruction of B' into DIR, with an ``index.json``. ``.ci/arm64.sh`` runs it with the
host's interpreter and hands DIR to the emulated root, where
``tests/test_arm64_parity.py`` applies each patch and compares the bytes: the format
promises the same B' on every platform (float32 multiply, then add, round to nearest
even, no fused multiply-add).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from agent.residual import encode_patch, quant
from agent.residual.layout import scan
from tests.assets import asset

#: name -> (asset, encode_patch keyword arguments)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "onnx-int8": ("ppocr_det.onnx", {"bits": 8}),
    "onnx-int4-g64": ("ppocr_det.onnx", {"bits": 4, "group_size": 64}),
    "tflite-int8": ("hand_landmark_lite.tflite", {"bits": 8}),
    "tflite-int4": ("hand_landmark_lite.tflite", {"bits": 4}),
    # low-rank records (float32 matrices as rank-8 factors, with and without a remainder;
    # the TFLite asset keeps float16 weights, which have no low-rank records)
    "onnx-lowrank": ("ppocr_det.onnx", {"lowrank": (8, 0)}),
    "onnx-lowrank-q2": ("ppocr_det.onnx", {"lowrank": (8, 2)}),
}


def _lowrank_choices(base: Path, target: Path, rank: int, bits: int) -> dict[str, Any]:
    """A low-rank choice for every float32 matrix that can be factorised at ``rank``."""
    from agent.residual import lowrank
    from agent.residual.stream import Choice

    bl, tl = scan(base), scan(target)
    by_key = bl.by_key()
    out: dict[str, Any] = {}
    for h in tl.holes:
        b = by_key.get(h.key)
        mn = lowrank.matrix(h.shape)
        if b is None or mn is None or h.dtype != quant.F32 or b.shape != h.shape:
            continue
        a_raw = bl.paths[b.file].read_bytes()[b.offset : b.offset + b.nbytes]
        t_raw = tl.paths[h.file].read_bytes()[h.offset : h.offset + h.nbytes]
        delta = np.frombuffer(t_raw, "<f4").astype(np.float64) - np.frombuffer(a_raw, "<f4")
        factors = lowrank.factorise(delta.reshape(mn), (rank,))
        if factors:
            out[h.key] = Choice(bits, mn[1] if bits else 0, lowrank=factors[-1])
    return out


def _perturb_onnx(src: Path, dst: Path, seed: int) -> None:
    m = onnx.load(str(src))
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
        if a.dtype != np.float32 or a.size < 16:
            continue
        noise = rng.normal(0, 1, a.shape) * 0.02 * (np.abs(a).mean() + 1e-6)
        t.CopyFrom(numpy_helper.from_array((a + noise).astype(np.float32), t.name))
    m.ir_version = 10
    onnx.save(m, str(dst))


def _perturb_tflite(src: Path, dst: Path, seed: int) -> None:
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    for h in scan(src).holes:
        if h.dtype not in (quant.F32, quant.F16) or h.nbytes < 64:
            continue
        dt = "<f4" if h.dtype == quant.F32 else "<f2"
        n = h.nbytes // np.dtype(dt).itemsize
        a = np.frombuffer(data, dt, n, h.offset).astype(np.float32)
        a += rng.normal(0, 1, a.shape).astype(np.float32) * np.float32(0.02 * np.abs(a).mean())
        data[h.offset : h.offset + h.nbytes] = a.astype(dt).tobytes()
    dst.write_bytes(bytes(data))


def write(out: Path) -> dict[str, Any]:
    """Write every case into ``out`` and return the index (also written as index.json)."""
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    for i, (case, (name, kw)) in enumerate(sorted(CASES.items())):
        base = asset(name)
        suffix = base.suffix
        target = out / f"{case}.target{suffix}"
        (_perturb_onnx if suffix == ".onnx" else _perturb_tflite)(base, target, seed=100 + i)
        base_copy = out / f"{case}.base{suffix}"
        base_copy.write_bytes(base.read_bytes())
        recon = out / f"{case}.recon{suffix}"
        args = dict(kw)
        if "lowrank" in args:
            rank, bits = args.pop("lowrank")
            args["choices"] = _lowrank_choices(base_copy, target, rank, bits)
            assert args["choices"], case  # the case must hold low-rank records
        with (out / f"{case}.patch").open("wb") as f:
            info = encode_patch(base_copy, target, f, reconstruct=recon, **args)
        if "choices" in args:
            assert info.stats["lowrank"] == len(args["choices"]), info.stats
        index[case] = {
            "base": base_copy.name,
            "patch": f"{case}.patch",
            "suffix": suffix,
            "base_digest": info.base_digest,
            "target_digest": info.target_digest,
            "recon_sha256": hashlib.sha256(recon.read_bytes()).hexdigest(),
        }
        target.unlink()
        recon.unlink()
    (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return index


if __name__ == "__main__":
    write(Path(sys.argv[1]))
