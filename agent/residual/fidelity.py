"""How close B' runs to B: both models on the publisher's sample inputs.

Samples are ``*.npz`` files with ``input:<name>`` arrays (``output:<name>`` arrays are
ignored here: B itself is the reference). ONNX runs on onnxruntime (CPU), TFLite on
ai_edge_litert. Which metrics matter depends on what the output is (``kind``):

- ``classification`` (logits or scores): top-1 agreement and cosine;
- ``embedding``: cosine only (an argmax over embedding dimensions means nothing);
- ``dense`` (maps, boxes, images): largest absolute difference and PSNR;
- ``auto`` (nothing known): cosine, max-abs, and top-1 for outputs with a class axis.

Every report carries ``output_kind``, the per-sample cosine minimum and mean (a batched
output is split along axis 0), ``max_abs_diff`` and ``nmse_mean`` (mean over samples of
‖y'−y‖²/‖y‖², what the search's error model predicts). An output where B' has inf/NaN
and B has not counts in ``nonfinite_outputs`` with cosine −1 and makes ``max_abs_diff``
infinite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ResidualError

Runner = Callable[[dict[str, np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]]
KINDS = ("classification", "embedding", "dense")
Outputs = list[list[np.ndarray[Any, Any]]]  # per sample, per model output


def kind_from_meta(meta_dir: Path | None) -> str | None:
    """The output kind a package's ``technicalinfo.json`` states (``task``, then
    ``runtime_config.output_format``), or None."""
    if meta_dir is None:
        return None
    try:
        doc = json.loads((Path(meta_dir) / "technicalinfo.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    task = doc.get("task")
    rc = doc.get("runtime_config")
    words = " ".join(
        str(v).lower()
        for v in (
            task if not isinstance(task, dict) else json.dumps(task),
            rc.get("output_format") if isinstance(rc, dict) else None,
        )
        if v
    )
    for kind, keys in (
        ("embedding", ("embed", "retriev", "feature", "similar", "vector")),
        ("classification", ("classif", "logit", "recogni", "categor")),
        ("dense", ("detect", "segment", "depth", "dense", "mask", "heatmap", "image", "pose")),
    ):
        if any(k in words for k in keys):
            return kind
    return None


def runner(model: Path, fmt: str, threads: int = 0) -> Runner:
    """A callable running ``model`` on one sample's inputs (0 threads: runtime default)."""
    return _onnx_runner(model, threads) if fmt == "onnx" else _tflite_runner(model, threads)


def _onnx_runner(model: Path, threads: int = 0) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])

    def run(inputs: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return [np.asarray(o) for o in sess.run(None, inputs)]

    return run


def _tflite_runner(model: Path, threads: int = 0) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model), num_threads=threads or None)
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


def load_samples(samples: Path) -> list[dict[str, np.ndarray[Any, Any]]]:
    return _samples(samples)


def run_all(run: Runner, data: list[dict[str, np.ndarray[Any, Any]]]) -> Outputs:
    try:
        return [run(ins) for ins in data]
    except Exception as exc:  # a runtime refusing a model is a report, not a crash
        raise ResidualError(f"fidelity run failed: {exc}", code="residual-fidelity") from exc


def metrics(ref: Outputs, got: Outputs, kind: str | None = None) -> dict[str, Any]:
    """Fidelity of ``got`` against ``ref`` (outputs per sample) for an output kind."""
    cos: list[float] = []
    nmse: list[float] = []
    max_abs = 0.0
    peak = 0.0
    sq = 0.0
    count = 0
    agree = total = nonfinite = 0
    rows = 0
    for ref_s, got_s in zip(ref, got, strict=True):
        for a, b in zip(ref_s, got_s, strict=True):
            # One cosine per sample: a batched output (rank >= 2) is split along
            # axis 0, so one bad sample in a batch of 64 is not averaged away.
            n = a.shape[0] if a.ndim >= 2 and a.shape[0] > 0 else 1
            xs = a.astype(np.float64).reshape(n, -1)
            ys = b.astype(np.float64).reshape(n, -1)
            rows += n
            for x0, y0 in zip(xs, ys, strict=True):
                if not np.all(np.isfinite(y0[np.isfinite(x0)])):
                    nonfinite += 1  # B' produced inf/NaN where B did not: the worst case
                    cos.append(-1.0)
                    nmse.append(float("inf"))
                    max_abs = float("inf")
                    continue
                fin = np.isfinite(x0)
                x, y = x0[fin], y0[fin]
                if x.size:
                    d = np.abs(x - y)
                    max_abs = max(max_abs, float(d.max()))
                    peak = max(peak, float(np.abs(x).max()))
                    sq += float(d @ d)
                    count += x.size
                nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
                cos.append(1.0 if nx == ny == 0 else float(x @ y) / (nx * ny or 1.0))
                e = float((x - y) @ (x - y))
                nmse.append(e / (nx * nx) if nx else (0.0 if e == 0 else float("inf")))
            if a.ndim >= 2 and a.shape[-1] > 1:
                agree += int(np.sum(np.argmax(a, -1) == np.argmax(b, -1)))
                total += int(np.prod(a.shape[:-1]))
    report: dict[str, Any] = {
        "output_kind": kind or "auto",
        "samples": len(ref),
        "sample_rows": rows,
        "max_abs_diff": max_abs,
        "cosine_min": min(cos) if cos else 1.0,
        "cosine_mean": float(np.mean(cos)) if cos else 1.0,
        "nmse_mean": float(np.mean(nmse)) if nmse else 0.0,
        "nonfinite_outputs": nonfinite,
    }
    if total and kind in (None, "classification"):
        report["top1_agreement"] = agree / total
    if kind == "dense":
        mse = sq / count if count else 0.0
        report["psnr_db"] = (
            10 * math.log10(peak * peak / mse) if mse > 0 and peak > 0 else float("inf")
        )
    return report


def compare(
    target: Path, patched: Path, samples: Path, fmt: str, *, kind: str | None = None
) -> dict[str, Any]:
    """Fidelity metrics of ``patched`` (B') against ``target`` (B), as plain numbers."""
    if kind is not None and kind not in KINDS:
        raise ResidualError(
            f"output kind must be one of {', '.join(KINDS)}, not {kind!r}",
            code="residual-option",
        )
    data = _samples(samples)
    try:
        ref_run, got_run = runner(Path(target), fmt), runner(Path(patched), fmt)
    except Exception as exc:
        raise ResidualError(f"fidelity run failed: {exc}", code="residual-fidelity") from exc
    return metrics(run_all(ref_run, data), run_all(got_run, data), kind)
