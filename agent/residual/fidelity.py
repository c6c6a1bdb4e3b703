"""How close B' runs to B: both models on the publisher's sample inputs.

Samples are ``*.npz`` files with ``input:<name>`` arrays (``output:<name>`` arrays are
ignored here: B itself is the reference). ONNX runs on onnxruntime (CPU), TFLite on
ai_edge_litert. Metrics over every sample and output: the largest absolute difference,
the smallest and mean cosine similarity per sample (a batched output is split along
axis 0), and for outputs with
a class axis (rank ≥ 2, last axis > 1) the share of positions whose argmax agrees. An
output where B' has inf/NaN and B has not counts in ``nonfinite_outputs`` with cosine
−1 and makes ``max_abs_diff`` infinite.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ResidualError

Runner = Callable[[dict[str, np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]]


def _onnx_runner(model: Path) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])

    def run(inputs: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return [np.asarray(o) for o in sess.run(None, inputs)]

    return run


def _tflite_runner(model: Path) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    it.allocate_tensors()

    def run(inputs: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        details = it.get_input_details()
        by_name = {d["name"]: d for d in details}
        for pos, (name, arr) in enumerate(inputs.items()):
            d = by_name.get(name) or details[min(pos, len(details) - 1)]
            if tuple(d["shape"]) != arr.shape:
                it.resize_tensor_input(d["index"], list(arr.shape))
                it.allocate_tensors()
            it.set_tensor(d["index"], arr.astype(d["dtype"], copy=False))
        it.invoke()
        return [np.array(it.get_tensor(d["index"])) for d in it.get_output_details()]

    return run


def _samples(samples: Path) -> list[dict[str, np.ndarray[Any, Any]]]:
    found = []
    for p in sorted(Path(samples).glob("*.npz")):
        with np.load(p, allow_pickle=False) as z:
            ins = {k[6:]: np.array(z[k]) for k in z.files if k.startswith("input:")}
        if ins:
            found.append(ins)
    if not found:
        raise ResidualError(
            f"no *.npz samples with input:<name> arrays in {samples}", code="residual-samples"
        )
    return found


def compare(target: Path, patched: Path, samples: Path, fmt: str) -> dict[str, Any]:
    """Fidelity metrics of ``patched`` (B') against ``target`` (B), as plain numbers."""
    make = _onnx_runner if fmt == "onnx" else _tflite_runner
    try:
        ref, got = make(Path(target)), make(Path(patched))
        cos: list[float] = []
        max_abs = 0.0
        agree = total = nonfinite = 0
        data = _samples(samples)
        rows = 0
        for ins in data:
            for a, b in zip(ref(ins), got(ins), strict=True):
                # One cosine per sample: a batched output (rank >= 2) is split along
                # axis 0, so one bad sample in a batch of 64 is not averaged away.
                n = a.shape[0] if a.ndim >= 2 and a.shape[0] > 0 else 1
                xs = a.astype(np.float64).reshape(n, -1)
                ys = b.astype(np.float64).reshape(n, -1)
                rows += n
                for x, y in zip(xs, ys, strict=True):
                    if not np.all(np.isfinite(y[np.isfinite(x)])):
                        nonfinite += 1  # B' produced inf/NaN where B did not: the worst case
                        cos.append(-1.0)
                        max_abs = float("inf")
                        continue
                    if x.size:
                        max_abs = max(max_abs, float(np.nanmax(np.abs(x - y))))
                    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
                    cos.append(1.0 if nx == ny == 0 else float(x @ y) / (nx * ny or 1.0))
                if a.ndim >= 2 and a.shape[-1] > 1:
                    agree += int(np.sum(np.argmax(a, -1) == np.argmax(b, -1)))
                    total += int(np.prod(a.shape[:-1]))
    except ResidualError:
        raise
    except Exception as exc:  # a runtime refusing a model is a report, not a crash
        raise ResidualError(f"fidelity run failed: {exc}", code="residual-fidelity") from exc
    report: dict[str, Any] = {
        "samples": len(data),
        "sample_rows": rows,
        "max_abs_diff": max_abs,
        "cosine_min": min(cos) if cos else 1.0,
        "cosine_mean": float(np.mean(cos)) if cos else 1.0,
        "nonfinite_outputs": nonfinite,
    }
    if total:
        report["top1_agreement"] = agree / total
    return report
