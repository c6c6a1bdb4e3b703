"""ONNX Runtime and LiteRT backends on real models from PyPI wheels."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter

from agent.errors import ConfigError, InvalidInputError, RuntimeBackendError
from runtime.backend import make_backend
from runtime.config import RuntimeConfig
from runtime.dtypes import numpy_dtype, v2_datatype


def _plain_ort(model: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feed), strict=True))


def _plain_tflite(model: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], feed[d["name"]])
    it.invoke()
    return {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}


def test_datatype_mapping() -> None:
    assert v2_datatype(np.float32) == "FP32"
    assert v2_datatype(np.int64) == "INT64"
    assert v2_datatype(np.uint8) == "UINT8"
    assert numpy_dtype("FP16") == np.float16
    with pytest.raises(InvalidInputError, match="FP8"):
        numpy_dtype("FP8")


def test_onnx_metadata(ppocr_det: Path, ppocr_cls: Path) -> None:
    b = make_backend("onnxruntime", ppocr_det, RuntimeConfig())
    assert not b.ready
    b.load()
    assert b.ready
    assert b.metadata() == {
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
        "outputs": [{"name": "sigmoid_0.tmp_0", "datatype": "FP32", "shape": [-1, 1, -1, -1]}],
    }
    c = make_backend("onnxruntime", ppocr_cls)
    c.load()
    assert c.metadata()["outputs"] == [
        {"name": "save_infer_model/scale_0.tmp_1", "datatype": "FP32", "shape": [-1, 2]}
    ]
    b.unload()
    assert not b.ready
    with pytest.raises(RuntimeBackendError) as ei:
        b.predict({"x": np.zeros((1, 3, 32, 32), np.float32)})
    assert ei.value.code == "not-loaded"


def test_onnx_outputs_equal_plain_ort_concurrently(ppocr_cls: Path) -> None:
    cfg = RuntimeConfig.from_dict({"onnx": {"intra_op_threads": 1, "allow_spinning": False}})
    b = make_backend("onnxruntime", ppocr_cls, cfg)
    b.load()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.random((2, 3, 48, 192), dtype=np.float32)} for _ in range(4)]
    want = [_plain_ort(ppocr_cls, f) for f in feeds]
    got: list[dict[str, np.ndarray] | None] = [None] * 4

    def call(i: int) -> None:
        got[i] = b.predict(feeds[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want, strict=True):
        assert g is not None
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ({"y": np.zeros((1, 3, 48, 192), np.float32)}, ["unknown input 'y'"]),
        ({}, ["missing input 'x'"]),
        ({"x": np.zeros((1, 3, 48, 192), np.float64)}, ["'x'", "FP64", "FP32"]),
        ({"x": np.zeros((3, 48, 192), np.float32)}, ["'x'", "rank 4"]),
        ({"x": np.zeros((1, 4, 48, 192), np.float32)}, ["'x'", "dimension 1 must be 3"]),
    ],
)
def test_onnx_bad_inputs(ppocr_cls: Path, inputs: dict[str, np.ndarray], words: list[str]) -> None:
    b = make_backend("onnxruntime", ppocr_cls)
    b.load()
    with pytest.raises(InvalidInputError) as ei:
        b.predict(inputs)
    assert ei.value.status == 400
    for w in words:
        assert w in ei.value.message


def test_onnx_providers(ppocr_cls: Path) -> None:
    from runtime.onnx_backend import OnnxBackend

    with pytest.raises(ConfigError, match="NopeExecutionProvider"):
        make_backend(
            "onnxruntime",
            ppocr_cls,
            RuntimeConfig.from_dict({"onnx": {"providers": ["NopeExecutionProvider"]}}),
        ).load()
    # A real provider name that this box lacks: documented fallback to CPU ...
    missing = next(
        p
        for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "QNNExecutionProvider")
        if p not in ort.get_available_providers()
    )
    b = OnnxBackend(ppocr_cls, RuntimeConfig.from_dict({"onnx": {"providers": [missing]}}))
    b.load()
    assert b.providers == ["CPUExecutionProvider"]
    # ... or a clear error when the device asks for strictness.
    strict = RuntimeConfig.from_dict(
        {"onnx": {"providers": [missing], "unavailable_providers": "error"}}
    )
    with pytest.raises(RuntimeBackendError) as ei:
        make_backend("onnxruntime", ppocr_cls, strict).load()
    assert ei.value.code == "provider-unavailable"
    assert missing in ei.value.message


def test_unknown_backend_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeBackendError) as ei:
        make_backend("tensorrt", tmp_path / "m.plan")
    assert ei.value.code == "unknown-backend"
    b = make_backend("onnxruntime", tmp_path / "absent.onnx")
    with pytest.raises(RuntimeBackendError) as ei:
        b.load()
    assert ei.value.code == "model-missing"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(RuntimeBackendError) as ei:
        make_backend("onnxruntime", garbage).load()
    assert ei.value.code == "model-load"
    assert "garbage.onnx" in ei.value.message


def test_litert_metadata_and_outputs(hand_tflite: Path, face_tflite: Path) -> None:
    b = make_backend("litert", face_tflite, RuntimeConfig.from_dict({"litert": {"num_threads": 1}}))
    b.load()
    meta = b.metadata()
    assert meta["platform"] == "tensorflow_lite"
    # Fixed batch 1 in the model; the backend accepts any batch (split into single runs).
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 128, 128, 3]}]
    assert meta["outputs"] == [
        {"name": "regressors", "datatype": "FP32", "shape": [-1, 896, 16]},
        {"name": "classificators", "datatype": "FP32", "shape": [-1, 896, 1]},
    ]
    x = np.random.default_rng(2).random((1, 128, 128, 3), dtype=np.float32)
    got = b.predict({"input": x})
    want = _plain_tflite(face_tflite, {"input": x})
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])

    h = make_backend("litert", hand_tflite)
    h.load()
    assert [o["name"] for o in h.metadata()["outputs"]] == [
        "Identity",
        "Identity_1",
        "Identity_2",
        "Identity_3",
    ]
    xs = np.random.default_rng(3).random((3, 224, 224, 3), dtype=np.float32)
    batch = h.predict({"input_1": xs})
    assert batch["Identity"].shape == (3, 63)
    for i in range(3):
        one = _plain_tflite(hand_tflite, {"input_1": xs[i : i + 1]})
        for k in one:
            np.testing.assert_allclose(batch[k][i : i + 1], one[k], rtol=1e-5, atol=1e-5)


def test_litert_pool_is_safe_under_threads(face_tflite: Path) -> None:
    b = make_backend("litert", face_tflite, RuntimeConfig.from_dict({"litert": {"pool_size": 2}}))
    b.load()
    rng = np.random.default_rng(4)
    feeds = [rng.random((1, 128, 128, 3), dtype=np.float32) for _ in range(6)]
    want = [_plain_tflite(face_tflite, {"input": f})["regressors"] for f in feeds]
    got: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        for _ in range(3):
            got[i] = b.predict({"input": feeds[i]})["regressors"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5)


def test_litert_bad_inputs(face_tflite: Path) -> None:
    b = make_backend("litert", face_tflite)
    b.load()
    with pytest.raises(InvalidInputError, match=r"'input'.*dimension 1 must be 128"):
        b.predict({"input": np.zeros((1, 64, 64, 3), np.float32)})
    with pytest.raises(InvalidInputError, match=r"'input'.*UINT8"):
        b.predict({"input": np.zeros((1, 128, 128, 3), np.uint8)})
    with pytest.raises(InvalidInputError, match="unknown input 'image'"):
        b.predict({"image": np.zeros((1, 128, 128, 3), np.float32)})


def test_litert_delegates(face_tflite: Path, tmp_path: Path) -> None:
    missing = RuntimeConfig.from_dict({"litert": {"delegates": [str(tmp_path / "libnpu.so")]}})
    with pytest.raises(RuntimeBackendError) as ei:
        make_backend("litert", face_tflite, missing).load()
    assert ei.value.code == "delegate-load"
    assert "libnpu.so" in ei.value.message
    garbage = tmp_path / "libgarbage.so"
    garbage.write_bytes(b"\x7fELF not really")
    bad = RuntimeConfig.from_dict({"litert": {"delegates": [{"path": str(garbage)}]}})
    with pytest.raises(RuntimeBackendError) as ei:
        make_backend("litert", face_tflite, bad).load()
    assert ei.value.code == "delegate-load"
    # A shared library that is not a TFLite delegate.
    libm = next(
        (
            p
            for p in (
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/aarch64-linux-gnu/libm.so.6",
                "/usr/lib/libm.so.6",
            )
            if Path(p).exists()
        ),
        None,
    )
    if libm is not None:
        notdel = RuntimeConfig.from_dict({"litert": {"delegates": [libm]}})
        with pytest.raises(RuntimeBackendError, match="not an external delegate"):
            make_backend("litert", face_tflite, notdel).load()
    optional = RuntimeConfig.from_dict(
        {"litert": {"delegates": [{"path": str(tmp_path / "libnpu.so"), "required": False}]}}
    )
    b = make_backend("litert", face_tflite, optional)
    b.load()
    assert b.predict({"input": np.zeros((1, 128, 128, 3), np.float32)})["regressors"].shape == (
        1,
        896,
        16,
    )


def test_onnx_shape_the_graph_cannot_take_is_a_400(ppocr_det: Path) -> None:
    b = make_backend("onnxruntime", ppocr_det)
    b.load()
    # Passes the signature ([-1, 3, -1, -1]) but the FPN cannot add 33x47 feature maps.
    with pytest.raises(InvalidInputError) as ei:
        b.predict({"x": np.zeros((1, 3, 33, 47), np.float32)})
    assert ei.value.status == 400
    # The session is still fine afterwards.
    assert b.predict({"x": np.zeros((1, 3, 64, 64), np.float32)})["sigmoid_0.tmp_0"].shape == (
        1,
        1,
        64,
        64,
    )
