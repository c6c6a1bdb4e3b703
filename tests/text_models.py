"""Models with string (BYTES) tensors for the client and BYTES tests, built with
onnx.helper, and the awkward texts every client must carry unchanged."""

from __future__ import annotations

import json
from pathlib import Path

#: Non-ASCII text, an empty string and an embedded NUL: what BYTES tensors must carry.
TEXTS = ["héllo", "", "a\x00b", "模型 ✓", "yo"]

OBJECT_SCRIPT = """\
class Model:
    def __init__(self, model_dir, backend, config):
        self.backend = backend

    def predict(self, inputs):
        mode = inputs["s"].reshape(-1)[0]
        if mode == b"object":
            return {"y": object()}
        if mode == b"list":
            return {"y": ["one", "twö", ""]}
        return {"y": "plain str"}
"""


def string_onnx(path: Path) -> Path:
    """``y = Identity(s)`` on a string tensor of any shape."""
    import onnx
    from onnx import TensorProto, helper

    s = helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["N"])
    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["y"])], "text", [s], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def string_model_dir(
    root: Path, name: str = "text", version: str = "1", *, script: str = ""
) -> Path:
    """An unpacked package around :func:`string_onnx`, without samples (the converter
    makes its own validation inputs), optionally with a run script."""
    d = root / f"{name}-{version}"
    string_onnx(d / "Model" / "text.onnx")
    if script:
        (d / "Program" / "Scripts").mkdir(parents=True, exist_ok=True)
        (d / "Program" / "Scripts" / "run.py").write_text(script)
    (d / "Meta-info").mkdir(parents=True, exist_ok=True)
    (d / "Meta-info" / "technicalinfo.json").write_text(
        json.dumps({"runtime_config": {"backend": "onnxruntime", "entry_model": "text.onnx"}})
    )
    (d / "manifest.json").write_text(
        json.dumps({"name": name, "version": version, "models": [{"name": "text.onnx"}]})
    )
    return d


#: v2 datatype → (ONNX element type name, numpy dtype) for the every-type model.
TYPES = {
    "BOOL": ("BOOL", "?"),
    "UINT8": ("UINT8", "u1"),
    "UINT16": ("UINT16", "<u2"),
    "UINT32": ("UINT32", "<u4"),
    "UINT64": ("UINT64", "<u8"),
    "INT8": ("INT8", "i1"),
    "INT16": ("INT16", "<i2"),
    "INT32": ("INT32", "<i4"),
    "INT64": ("INT64", "<i8"),
    "FP16": ("FLOAT16", "<f2"),
    "FP32": ("FLOAT", "<f4"),
    "FP64": ("DOUBLE", "<f8"),
    "BYTES": ("STRING", "O"),
}


def types_model_dir(root: Path, name: str = "types", version: str = "1") -> Path:
    """One Identity per v2 datatype: input ``in_<DT>`` → output ``out_<DT>``, shape [2, N]."""
    import onnx
    from onnx import TensorProto, helper

    ins, outs, nodes = [], [], []
    for dt, (onnx_type, _np) in TYPES.items():
        et = getattr(TensorProto, onnx_type)
        ins.append(helper.make_tensor_value_info(f"in_{dt}", et, [2, "N"]))
        outs.append(helper.make_tensor_value_info(f"out_{dt}", et, [2, "N"]))
        nodes.append(helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]))
    graph = helper.make_graph(nodes, "types", ins, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    d = root / f"{name}-{version}"
    (d / "Model").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(d / "Model" / "types.onnx"))
    (d / "Meta-info").mkdir(parents=True, exist_ok=True)
    (d / "Meta-info" / "technicalinfo.json").write_text(
        json.dumps({"runtime_config": {"backend": "onnxruntime", "entry_model": "types.onnx"}})
    )
    (d / "manifest.json").write_text(
        json.dumps({"name": name, "version": version, "models": [{"name": "types.onnx"}]})
    )
    return d


def type_inputs() -> dict[str, object]:
    """Inputs for :func:`types_model_dir`: extremes of every type, awkward texts."""
    import numpy as np

    out: dict[str, object] = {}
    for dt, (_onnx, npt) in TYPES.items():
        if dt == "BYTES":
            arr = np.array([t.encode() for t in TEXTS[:4]], dtype=object).reshape(2, 2)
        elif dt == "BOOL":
            arr = np.array([[True, False], [False, True]])
        else:
            info = np.finfo(npt) if np.dtype(npt).kind == "f" else np.iinfo(npt)
            arr = np.array([[info.min, info.max], [0, 1]], dtype=npt)
        out[dt] = arr
    return out
