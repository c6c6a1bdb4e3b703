"""Calibration statistics for linear layers: what each weight's Δ error does to outputs.

For a weight ``W`` used as ``y = x·W`` (ONNX MatMul / Gemm, ``W`` [K, N]) or ``y = x·Wᵀ``
(Gemm transB, TFLite FULLY_CONNECTED, ``W`` [O, I]), an error ``E`` in W moves the
layer's output by ``x·E``; over the sample inputs its energy is ``tr(Eᵀ H E)`` with
``H = Σ xᵀx`` over every row of the layer's input. The search uses it two ways: as the
error measure of a candidate (the layer-output error, far closer to what the model's
output sees than ‖E‖²), and for error-compensated rounding (:func:`gptq_codes`).

The inputs are read by running the target once on the samples with those activations
exposed (onnxruntime with extra graph outputs; LiteRT with intermediate tensors kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import fidelity, quant

logger = logging.getLogger(__name__)

MAX_K = 4096  # H is K × K float64: 128 MiB at this size; wider inputs go uncalibrated
DAMP = 0.01  # GPTQ's dampening: λ = DAMP · mean(diag H)
GPTQ_BLOCK = 128
SHRINK_ROWS = 1  # 8 (less shrinkage) lost held-out cosine on the TFLite pair: 0.9978


@dataclass
class Linear:
    """``H`` (input-side Gram matrix over the samples, K × K) of one weight; ``in_major``:
    the weight's first axis is the input (``[K, N]``), else its second (``[O, K]``)."""

    h: npt.NDArray[np.float64]
    in_major: bool
    rows: int  # activation rows summed into h

    def out_err(self, e: npt.NDArray[np.float64]) -> float:
        """``tr(Eᵀ H E)`` for a weight error ``e`` in the weight's own layout."""
        m = e if self.in_major else e.T
        return float(np.sum(m * (self.h @ m)))


def linears(model: Path, fmt: str, samples: Path) -> dict[str, Linear]:
    """Per weight key (as the layout scanner names initializers / tensors), its ``H``;
    weights the model does not use as a plain 2-D linear input are absent. Any failure
    here leaves the search without calibration (logged), never stops it."""
    try:
        return _onnx(model, samples) if fmt == "onnx" else _tflite(model, samples)
    except Exception as exc:  # calibration is an optimisation, not a requirement
        logger.warning("no calibration statistics: %s", exc)
        return {}


def _accumulate(
    acts: dict[str, list[Any]], uses: dict[str, tuple[str, bool, int]]
) -> dict[str, Linear]:
    grams: dict[str, Linear] = {}
    by_act: dict[str, npt.NDArray[np.float64]] = {}
    rows: dict[str, int] = {}
    for name, arrays in acts.items():
        for a in arrays:
            x = np.asarray(a, np.float64)
            k = x.shape[-1] if x.ndim else 1
            x = x.reshape(-1, k)
            x = x[np.all(np.isfinite(x), axis=1)]
            g = x.T @ x
            by_act[name] = by_act[name] + g if name in by_act else g
            rows[name] = rows.get(name, 0) + len(x)
    for key, (act, in_major, k) in uses.items():
        gram = by_act.get(act)
        if gram is not None and gram.shape == (k, k) and rows[act]:
            grams[key] = Linear(shrink(gram / rows[act], rows[act]), in_major, rows[act])
    return grams


def shrink(h: npt.NDArray[np.float64], rows: int) -> npt.NDArray[np.float64]:
    """``(1 − α)·H + α·mean(diag H)·I`` with ``α = K / (K + rows)``: with few sample rows
    per input channel H is rank-deficient and rounding would push error into directions
    the samples never excite but other inputs do (a 3072-input layer calibrated on 64
    rows lost held-out cosine 0.9996 → 0.955); shrinking towards the identity keeps
    what the samples can vouch for."""
    k = h.shape[0]
    alpha = k / (k + SHRINK_ROWS * rows)
    out: npt.NDArray[np.float64] = (1 - alpha) * h
    out[np.diag_indices(k)] += alpha * float(np.mean(np.diag(h)))
    return out


def _onnx(model: Path, samples: Path) -> dict[str, Linear]:
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model), load_external_data=True)
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    uses: dict[str, tuple[str, bool, int]] = {}
    for node in m.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = node.input[1]
        dims = inits.get(w)
        if dims is None or len(dims) != 2 or w in uses:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            continue
        in_major = not attrs.get("transB", 0)
        k = dims[0] if in_major else dims[1]
        if k <= MAX_K:
            uses[w] = (node.input[0], in_major, int(k))
    if not uses:
        return {}
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input)}
    outs = {o.name for o in m.graph.output}
    wanted = sorted({a for a, _, _ in uses.values()} - outs)
    for name in wanted:
        if name in types:
            m.graph.output.append(types[name])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    acts: dict[str, list[Any]] = {}
    for ins in fidelity.load_samples(samples):
        for name, val in zip(names, sess.run(None, ins), strict=True):
            if any(a == name for a, _, _ in uses.values()):
                acts.setdefault(name, []).append(val)
    return _accumulate(acts, uses)


def _tflite(model: Path, samples: Path) -> dict[str, Linear]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model), num_threads=1, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    uses: dict[str, tuple[str, bool, int]] = {}
    act_index: dict[str, int] = {}
    for op in it._get_ops_details():
        if op.get("op_name") != "FULLY_CONNECTED" or len(op["inputs"]) < 2:
            continue
        x, w = int(op["inputs"][0]), int(op["inputs"][1])
        wd, xd = tensors.get(w), tensors.get(x)
        if wd is None or xd is None or len(wd["shape"]) != 2 or wd["dtype"] != np.float32:
            continue
        k = int(wd["shape"][1])
        if k <= MAX_K and wd["name"] not in uses:
            uses[wd["name"]] = (xd["name"], False, k)
            act_index[xd["name"]] = x
    if not uses:
        return {}
    acts: dict[str, list[Any]] = {}
    details = it.get_input_details()
    for ins in fidelity.load_samples(samples):
        for pos, (_, arr) in enumerate(ins.items()):
            d = details[min(pos, len(details) - 1)]
            if tuple(d["shape"]) != arr.shape:
                it.resize_tensor_input(d["index"], list(arr.shape))
                it.allocate_tensors()
            it.set_tensor(d["index"], arr.astype(d["dtype"], copy=False))
        it.invoke()
        for name, idx in act_index.items():
            acts.setdefault(name, []).append(np.array(it.get_tensor(idx)))
    return _accumulate(acts, uses)


def gptq_codes(
    delta: npt.NDArray[np.float64],
    scales: quant.F32Array,
    bits: int,
    block: int,
    lin: Linear,
) -> quant.I8Array:
    """Codes for ``delta`` (the weight's shape) at fixed per-block ``scales`` that lower
    the layer-output error ``tr(Eᵀ H E)`` rather than ‖E‖² (GPTQ: quantise one input
    channel at a time, in order of decreasing activation energy, and push its rounding
    error onto the channels not yet quantised through the inverse Hessian's Cholesky
    factor). Deterministic numpy float64; the device only ever sees the codes."""
    qmax = quant.QMAX[bits]
    n = delta.size
    s_el = quant.element_scales(scales, block, 0, n).reshape(delta.shape)
    w = (delta if lin.in_major else delta.T).copy()  # [K, N]: one row per input channel
    s = s_el if lin.in_major else s_el.T
    k = w.shape[0]
    h = lin.h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable")
    inv = np.argsort(perm, kind="stable")
    w, s, h = w[perm], s[perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper
    safe = np.where(s > 0, s, 1.0)
    q = np.zeros(w.shape, np.int8)
    for b0 in range(0, k, GPTQ_BLOCK):
        b1 = min(k, b0 + GPTQ_BLOCK)
        err = np.zeros((b1 - b0, w.shape[1]))
        for i in range(b0, b1):
            qi = np.clip(np.rint(w[i] / safe[i]), -qmax, qmax)
            qi[s[i] == 0] = 0
            q[i] = qi
            e = (w[i] - qi * s[i]) / hinv[i, i]
            w[i + 1 : b1] -= np.outer(hinv[i, i + 1 : b1], e)
            err[i - b0] = e
        w[b1:] -= hinv[b0:b1, b1:].T @ err
    q = q[inv]
    out: quant.I8Array = (q if lin.in_major else q.T).reshape(-1).astype(np.int8)
    return out
