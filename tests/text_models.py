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
