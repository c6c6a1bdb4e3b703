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


def string_tflite(path: Path) -> Path:
    """``y = RESHAPE(s, [-1])`` on a TFLite string tensor of any length, written as the
    flatbuffer by hand (no TensorFlow here): LiteRT's string tensors for the BYTES tests.
    Tensor type 5 is STRING, 2 INT32; builtin operator 22 is RESHAPE."""
    import flatbuffers  # type: ignore[import-untyped]

    b = flatbuffers.Builder(1024)

    def ints(items: list[int]) -> int:
        b.StartVector(4, len(items), 4)
        for x in reversed(items):
            b.PrependInt32(x)
        return int(b.EndVector())

    def tables(items: list[int]) -> int:
        b.StartVector(4, len(items), 4)
        for x in reversed(items):
            b.PrependUOffsetTRelative(x)
        return int(b.EndVector())

    b.StartVector(1, 4, 16)
    for byte in reversed((-1).to_bytes(4, "little", signed=True)):
        b.PrependUint8(byte)
    new_shape = b.EndVector()
    b.StartObject(3)
    empty = b.EndObject()  # buffer 0 is always the empty one
    b.StartObject(3)
    b.PrependUOffsetTRelativeSlot(0, new_shape, 0)
    shape_buf = b.EndObject()
    tensors = []
    for name, ttype, buf in (("s", 5, 0), ("y", 5, 0), ("new_shape", 2, 1)):
        nm = b.CreateString(name)
        shape = ints([1])
        signature = ints([1] if buf else [-1])
        b.StartObject(8)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        b.PrependInt8Slot(1, ttype, 0)
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, nm, 0)
        b.PrependUOffsetTRelativeSlot(7, signature, 0)
        tensors.append(b.EndObject())
    tv = tables(tensors)
    op_in, op_out = ints([0, 2]), ints([1])
    b.StartObject(10)
    b.PrependUint32Slot(0, 0, 0)
    b.PrependUOffsetTRelativeSlot(1, op_in, 0)
    b.PrependUOffsetTRelativeSlot(2, op_out, 0)
    ops = tables([b.EndObject()])
    g_in, g_out = ints([0]), ints([1])
    main = b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tv, 0)
    b.PrependUOffsetTRelativeSlot(1, g_in, 0)
    b.PrependUOffsetTRelativeSlot(2, g_out, 0)
    b.PrependUOffsetTRelativeSlot(3, ops, 0)
    b.PrependUOffsetTRelativeSlot(4, main, 0)
    subgraphs = tables([b.EndObject()])
    b.StartObject(4)
    b.PrependInt8Slot(0, 22, 0)
    b.PrependInt32Slot(2, 1, 1)
    b.PrependInt32Slot(3, 22, 0)
    codes = tables([b.EndObject()])
    buffers = tables([empty, shape_buf])
    desc = b.CreateString("edgeward test string reshape")
    b.StartObject(8)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, buffers, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(b.Output()))
    return path


def string_model_dir(
    root: Path, name: str = "text", version: str = "1", *, script: str = "", kind: str = "onnx"
) -> Path:
    """An unpacked package around :func:`string_onnx` (or :func:`string_tflite` for
    ``kind="tflite"``), without samples (the converter makes its own validation
    inputs), optionally with a run script."""
    d = root / f"{name}-{version}"
    if kind == "tflite":
        model, backend = "text.tflite", "litert"
        string_tflite(d / "Model" / model)
    else:
        model, backend = "text.onnx", "onnxruntime"
        string_onnx(d / "Model" / model)
    if script:
        (d / "Program" / "Scripts").mkdir(parents=True, exist_ok=True)
        (d / "Program" / "Scripts" / "run.py").write_text(script)
    (d / "Meta-info").mkdir(parents=True, exist_ok=True)
    (d / "Meta-info" / "technicalinfo.json").write_text(
        json.dumps({"runtime_config": {"backend": backend, "entry_model": model}})
    )
    (d / "manifest.json").write_text(
        json.dumps({"name": name, "version": version, "models": [{"name": model}]})
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
