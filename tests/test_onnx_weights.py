"""The converter's validation reference reads large weights in place (runtime/onnx_weights.py):
it must answer exactly what the ordinary load of the same file answers, copy none of
those weights, and fall back to the ordinary load (and its errors) on anything else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime.onnx_weights as ow
from agent.errors import RuntimeBackendError
from runtime.config import RuntimeConfig
from runtime.converter import random_inputs
from runtime.onnx_backend import OnnxBackend


def _mixed(path: Path, k: int) -> Path:
    """Float32, float16 and int64 weights above the threshold, a small one below it and a
    Constant node: y = x @ W + b, h = Cast(H), i = I + c."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, k)).astype(np.float32)
    b = rng.standard_normal((k,)).astype(np.float32)[:8]  # small: stays embedded
    h = rng.standard_normal((k,)).astype(np.float16)
    i = rng.integers(-(2**40), 2**40, (k // 2,), dtype=np.int64)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("Slice", ["z", "s0", "s1", "ax"], ["zs"]),
        helper.make_node("Add", ["zs", "b"], ["y"]),
        helper.make_node("Cast", ["H"], ["h"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.int64(7))),
        helper.make_node("Add", ["I", "c"], ["i"]),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(h, "H"),
        numpy_helper.from_array(i, "I"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([8], np.int64), "s1"),
        numpy_helper.from_array(np.array([1], np.int64), "ax"),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [k]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [k // 2]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _answers(b: OnnxBackend) -> dict[str, np.ndarray]:
    b.load()
    try:
        return b.predict(random_inputs(b.inputs, batch=3))
    finally:
        b.unload()


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_shared_reference_answers_as_the_ordinary_load(tmp_path: Path) -> None:
    model = _mixed(tmp_path / "m.onnx", 1 << 19)  # W 8 MiB, H 1 MiB, I 2 MiB
    raw = model.read_bytes()
    skel, found = ow.skeleton(raw, model.name, ow.MIN_SHARED)
    assert sorted(f[0] for f in found) == ["H", "I", "W"]
    assert len(skel) < 4096  # the weights are referenced, not carried
    for name, _t, _dims, start, end in found:  # offsets point at the very bytes
        want = numpy_helper.to_array(
            next(t for t in onnx.load(str(model)).graph.initializer if t.name == name)
        )
        assert raw[start:end] == want.tobytes()
    cfg = RuntimeConfig()
    shared = OnnxBackend(model, cfg, level="disable", prepack=False, shared_weights=True)
    plain = OnnxBackend(model, cfg, level="disable", prepack=False)
    got, want = _answers(shared), _answers(plain)
    assert set(got) == set(want) == {"y", "h", "i"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_shared_reference_copies_no_weights(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _mixed(tmp_path / "m.onnx", 1 << 22)  # W 64 MiB
    opts = RuntimeConfig().onnx
    from runtime.onnx_backend import session_options

    before = _rss_anon()
    so = session_options(opts, level="disable", prepack=False)
    sess = ow.shared_weights_session(model, so, ["CPUExecutionProvider"])
    assert isinstance(sess, ort.InferenceSession)
    grown = _rss_anon() - before
    assert grown < 32 << 20, grown  # an ordinary load copies the 64 MiB (and more)
    del sess


def test_nothing_to_share_and_bad_files_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.onnx_backend import session_options

    opts = RuntimeConfig().onnx
    small = _mixed(tmp_path / "s.onnx", 1 << 10)  # every weight below the threshold
    assert ow.shared_weights_session(small, session_options(opts), ["CPUExecutionProvider"]) is None
    # a file that is no model: the ordinary load's error, as without shared weights
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    with pytest.raises(RuntimeBackendError, match=r"cannot load junk\.onnx"):
        OnnxBackend(junk, RuntimeConfig(), level="disable", shared_weights=True).load()
    # a host that would need aligned weights: no shared session, the ordinary load serves
    monkeypatch.setattr(ow, "_UNALIGNED_OK", frozenset())
    model = _mixed(tmp_path / "m.onnx", 1 << 19)
    b = OnnxBackend(model, RuntimeConfig(), level="disable", prepack=False, shared_weights=True)
    np.testing.assert_array_equal(
        _answers(b)["h"], _answers(OnnxBackend(model, RuntimeConfig()))["h"]
    )
