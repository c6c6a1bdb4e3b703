"""open_model / converters / self_test on hand-built unpacked package directories.

``make_package`` writes the layout of docs/INTERFACES.md by hand (no agent.package), so
other runtime tests (worker, daemon) may import it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.errors import ConverterError, MetaInfoError, RuntimeBackendError
from runtime import RuntimeConfig, open_model, self_test
from runtime.converter import find_package_converter
from tests.helpers import CLS_OUT, CLS_X, EXAMPLE_PROGRAM, make_package


def _ort(model: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feed), strict=True))


def test_open_onnx_cache_reused(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls, name="cls", version="3")
    cache = tmp_path / "cache"
    s = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    assert (s.name, s.version) == ("cls", "3")
    assert s.ready and not s.converted.from_cache
    assert "ort-optimise-all" in s.converted.info["stages"]
    assert s.converted.info["validation"]["validated"] is True
    np.testing.assert_allclose(
        s.predict({"x": CLS_X})[CLS_OUT],
        _ort(ppocr_cls, {"x": CLS_X})[CLS_OUT],
        rtol=1e-4,
        atol=1e-5,
    )
    meta = s.metadata()
    assert meta["name"] == "cls" and meta["versions"] == ["3"]
    assert meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}
    assert s.warmup() is True
    artefact = s.converted.model_path
    assert artefact.is_relative_to(cache)
    mtime = artefact.stat().st_mtime_ns
    s.close()
    assert not s.ready

    # "Restart": a new open_model reuses the artefact without rebuilding it.
    s2 = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    assert s2.converted.from_cache
    assert s2.converted.model_path == artefact
    assert artefact.stat().st_mtime_ns == mtime
    info = json.loads((artefact.parent.parent / "info.json").read_text())
    assert info["hits"] == 1
    np.testing.assert_allclose(
        s2.predict({"x": CLS_X})[CLS_OUT],
        _ort(ppocr_cls, {"x": CLS_X})[CLS_OUT],
        rtol=1e-4,
        atol=1e-5,
    )
    # Another optimisation level is another artefact.
    s3 = open_model(
        pkg,
        RuntimeConfig.from_dict({"onnx": {"graph_optimization_level": "basic"}}),
        cache_dir=cache,
    )
    assert s3.converted.model_path != artefact and not s3.converted.from_cache
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_samples_validation_and_self_test(tmp_path: Path, ppocr_cls: Path) -> None:
    want = _ort(ppocr_cls, {"x": CLS_X})[CLS_OUT]
    pkg = make_package(
        tmp_path / "pkg",
        ppocr_cls,
        samples={"s0.npz": {"input:x": CLS_X, f"output:{CLS_OUT}": want}},
    )
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    assert s.converted.info["validation"]["source"] == "samples"
    assert self_test(s) == 1
    # Wrong expected outputs: the self-test names the sample and the output.
    bad = pkg / "Meta-info" / "samples" / "s1.npz"
    np.savez(bad, **{"input:x": CLS_X, f"output:{CLS_OUT}": want[:, ::-1].copy()})
    with pytest.raises(RuntimeBackendError) as ei:
        self_test(s)
    assert ei.value.code == "self-test"
    assert "s1.npz" in ei.value.message and CLS_OUT in ei.value.message


def test_static_batch_and_weight_compression(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(
        tmp_path / "pkg", ppocr_cls, converter_config={"batch": "static", "batch_size": 2}
    )
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    assert s.metadata()["inputs"][0]["shape"][0] == 2
    assert "static-batch-2" in s.converted.info["stages"]
    x2 = np.concatenate([CLS_X, CLS_X[:, :, ::-1].copy()])
    np.testing.assert_allclose(
        s.predict({"x": x2})[CLS_OUT], _ort(ppocr_cls, {"x": x2})[CLS_OUT], rtol=1e-4, atol=1e-5
    )
    with pytest.raises(Exception, match="dimension 0 must be 2"):
        s.predict({"x": CLS_X})

    try:
        import onnxconverter_common  # noqa: F401

        has_fp16 = True
    except ImportError:
        has_fp16 = False
    pkg16 = make_package(
        tmp_path / "pkg16", ppocr_cls, converter_config={"weight_compression": "fp16"}
    )
    if has_fp16:
        s16 = open_model(pkg16, RuntimeConfig(), cache_dir=tmp_path / "c")
        assert "fp16-weights" in s16.converted.info["stages"]
    else:
        with pytest.raises(ConverterError) as ei:
            open_model(pkg16, RuntimeConfig(), cache_dir=tmp_path / "c")
        assert ei.value.code == "unsupported-compression"
        assert "onnxconverter-common" in ei.value.message
    bad = make_package(tmp_path / "bad", ppocr_cls, converter_config={"batch": "sometimes"})
    with pytest.raises(MetaInfoError, match=r"converter_config\.batch"):
        open_model(bad, RuntimeConfig(), cache_dir=tmp_path / "c")


def test_builtin_preprocessing(tmp_path: Path, ppocr_cls: Path) -> None:
    pre = {"resize_height": 48, "resize_width": 192, "mean": [0.5], "std": [0.5], "scale": 1 / 255}
    pkg = make_package(
        tmp_path / "pkg",
        ppocr_cls,
        converter_config={"preprocessing": pre},
        runtime_config={"inputs": [{"name": "x", "modality": "image"}]},
    )
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    img = np.random.default_rng(3).integers(0, 256, (96, 384, 3), dtype=np.uint8)
    # Manual: 2x bilinear downscale at pixel centres = mean of each 2x2 block.
    small = img.reshape(48, 2, 192, 2, 3).astype(np.float32).mean(axis=(1, 3))
    x = ((small / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)
    np.testing.assert_allclose(
        s.predict({"x": img})[CLS_OUT], _ort(ppocr_cls, {"x": x})[CLS_OUT], rtol=1e-3, atol=1e-4
    )
    # Float tensors still pass straight through.
    np.testing.assert_allclose(
        s.predict({"x": CLS_X})[CLS_OUT],
        _ort(ppocr_cls, {"x": CLS_X})[CLS_OUT],
        rtol=1e-4,
        atol=1e-5,
    )


def test_open_litert(tmp_path: Path, face_tflite: Path) -> None:
    pkg = make_package(tmp_path / "pkg", face_tflite, name="face")
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    assert s.backend.kind == "litert"
    assert s.metadata()["platform"] == "tensorflow_lite"
    x = np.random.default_rng(5).random((1, 128, 128, 3), dtype=np.float32)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(face_tflite))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    want = {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}
    got = s.predict({"input": x})
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
    # An optional delegate that is missing is dropped by the delegate selection.
    cfg = RuntimeConfig.from_dict(
        {"litert": {"delegates": [{"path": str(tmp_path / "libnpu.so"), "required": False}]}}
    )
    s2 = open_model(pkg, cfg, cache_dir=tmp_path / "c")
    assert s2.converted.delegates == []
    req = RuntimeConfig.from_dict({"litert": {"delegates": [str(tmp_path / "libnpu.so")]}})
    with pytest.raises(ConverterError) as ei:
        open_model(pkg, req, cache_dir=tmp_path / "c")
    assert ei.value.code == "delegate-load"


@pytest.mark.parametrize(
    ("tech_rc", "words"),
    [
        ({"backend": "tensorflow"}, ["runtime_config.backend", "onnxruntime"]),
        ({"entry_model": "../secret.onnx"}, ["entry_model"]),
        ({"entry_model": "other.onnx"}, ["Model/other.onnx"]),
        ({"run_script": "../../evil.py"}, ["outside the package"]),
    ],
)
def test_bad_technicalinfo(
    tmp_path: Path, ppocr_cls: Path, tech_rc: dict[str, Any], words: list[str]
) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls, runtime_config=tech_rc)
    with pytest.raises(MetaInfoError) as ei:
        open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    for w in words:
        assert w in ei.value.message


# --- package converters ---------------------------------------------------------------

GOOD_CONVERTER = EXAMPLE_PROGRAM / "Library" / "converter" / "convert.py"


def test_example_package_converter(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls, converter=GOOD_CONVERTER.read_text())
    assert find_package_converter(pkg) == pkg / "Program/Library/converter/convert.py"
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    assert s.converted.info["stages"][0] == "package-converter"
    assert s.converted.info["package_converter"]["validated"] is True
    assert s.metadata()["inputs"][0]["shape"] == [1, 3, -1, -1]  # batch fixed by the converter
    np.testing.assert_allclose(
        s.predict({"x": CLS_X})[CLS_OUT],
        _ort(ppocr_cls, {"x": CLS_X})[CLS_OUT],
        rtol=1e-4,
        atol=1e-5,
    )
    assert open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c").converted.from_cache


def test_executable_converter_gets_contract(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    cdir = pkg / "Program" / "Library" / "converter"
    cdir.mkdir(parents=True)
    record = tmp_path / "args.txt"
    conv = cdir / "convert"
    conv.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {record}\n'
        f'echo "cwd=$(pwd) home=$HOME secret=$EDGEWARD_SECRET" >> {record}\n'
        'cp "$2/Model/ppocr_cls.onnx" "$4/ppocr_cls.onnx"\n'
    )
    conv.chmod(conv.stat().st_mode | stat.S_IXUSR)
    os.environ["EDGEWARD_SECRET"] = "leak"
    try:
        s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    finally:
        del os.environ["EDGEWARD_SECRET"]
    assert s.ready
    lines = record.read_text().splitlines()
    assert lines[0] == "--input" and Path(lines[1]) == pkg.resolve()
    assert lines[2] == "--output" and lines[4:6] == ["--backend", "onnxruntime"]
    assert lines[6] == "--device-info"
    dev = json.loads(lines[7])
    assert {"machine", "cpu_flags", "onnxruntime", "ort_providers"} <= set(dev)
    assert "secret= " in lines[8] + " " and "edgeward-conv-" in lines[8]


BROKEN = {
    "exit1": (
        """
        import sys
        print("loading weights ...")
        print("CUDA not found, giving up", file=sys.stderr)
        sys.exit(1)
        """,
        "converter-failed",
        ["exit status 1", "CUDA not found"],
    ),
    "timeout": (
        """
        import subprocess, sys, time
        print("thinking", flush=True)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        time.sleep(60)
        """,
        "converter-timeout",
        ["timed out after 1 s", "thinking"],
    ),
    "garbage": (
        """
        import argparse, pathlib
        p = argparse.ArgumentParser(); p.add_argument("--input"); p.add_argument("--output")
        p.add_argument("--backend"); p.add_argument("--device-info")
        a = p.parse_args()
        (pathlib.Path(a.output) / "ppocr_cls.onnx").write_bytes(b"garbage" * 100)
        """,
        "converter-output",
        ["does not load"],
    ),
    "no-output": ("print('done')\n", "converter-output", ["wrote no ppocr_cls.onnx", "done"]),
    "wrong-numbers": (
        """
        import argparse, pathlib, onnx, numpy as np
        from onnx import helper, numpy_helper
        p = argparse.ArgumentParser(); p.add_argument("--input"); p.add_argument("--output")
        p.add_argument("--backend"); p.add_argument("--device-info")
        a = p.parse_args()
        m = onnx.load(str(pathlib.Path(a.input) / "Model" / "ppocr_cls.onnx"))
        # Loads fine, same signature, wrong numbers: output = 1 - probabilities.
        out = m.graph.output[0].name
        for node in m.graph.node:
            node.output[:] = [o + "_raw" if o == out else o for o in node.output]
        m.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "one"))
        m.graph.node.append(helper.make_node("Sub", ["one", out + "_raw"], [out]))
        onnx.save(m, str(pathlib.Path(a.output) / "ppocr_cls.onnx"))
        """,
        "converter-validation",
        ["does not match the unconverted model", CLS_OUT],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_package_converter(tmp_path: Path, ppocr_cls: Path, case: str) -> None:
    script, code, words = BROKEN[case]
    pkg = make_package(tmp_path / "pkg", ppocr_cls, converter=script)
    cache = tmp_path / "cache"
    # Only the hanging converter needs a short limit; the others finish by themselves, and a
    # 1 s limit turned them into converter-timeout on a loaded or emulated machine.
    cfg = RuntimeConfig.from_dict({"converter_timeout_s": 1 if case == "timeout" else 300})
    with pytest.raises(ConverterError) as ei:
        open_model(pkg, cfg, cache_dir=cache)
    assert ei.value.code == code
    for w in words:
        assert w in ei.value.message
    assert list(cache.iterdir()) == []  # nothing half-installed


def test_cache_damage_stale_temps_and_prune(tmp_path: Path, ppocr_cls: Path) -> None:
    from runtime.converter import prune_cache

    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    cache = tmp_path / "cache"
    s = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    artefact = s.converted.model_path
    good = artefact.read_bytes()
    # Bit rot / tampering in the cache: detected by sha256, rebuilt, never served.
    damaged = good[:-10] + b"\x00" * 10
    artefact.write_bytes(damaged)
    # Leftovers of a crashed conversion (dead pid) go; a live process's stay.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cache / f".tmp-{dead.pid}-abcdef01-xyz"
    stale.mkdir()
    live = cache / f".tmp-{os.getppid()}-abcdef01-xyz"
    live.mkdir()
    s2 = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    assert not s2.converted.from_cache
    assert s2.converted.model_path == artefact and artefact.read_bytes() != damaged
    np.testing.assert_allclose(
        s2.predict({"x": CLS_X})[CLS_OUT],
        _ort(ppocr_cls, {"x": CLS_X})[CLS_OUT],
        rtol=1e-4,
        atol=1e-5,
    )
    assert not stale.exists() and live.exists()
    live.rmdir()
    assert open_model(pkg, RuntimeConfig(), cache_dir=cache).converted.from_cache

    assert prune_cache(cache, unused_for_s=3600) == []
    assert prune_cache(cache, unused_for_s=0, keep={artefact}) == []
    assert prune_cache(cache, unused_for_s=0) == [artefact.parent.parent]
    assert list(cache.iterdir()) == []


def test_concurrent_opens_share_one_conversion(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    cache = tmp_path / "cache"
    results: list[Any] = []

    def go() -> None:
        try:
            results.append(open_model(pkg, RuntimeConfig(), cache_dir=cache))
        except Exception as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.converted.model_path for r in results}) == 1
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [
        results[0].converted.model_path.parent.parent.name
    ]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_converter_timeout_kills_grandchildren(tmp_path: Path, ppocr_cls: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(120)
        """
    pkg = make_package(tmp_path / "pkg", ppocr_cls, converter=script)
    with pytest.raises(ConverterError) as ei:
        open_model(
            pkg, RuntimeConfig.from_dict({"converter_timeout_s": 2}), cache_dir=tmp_path / "c"
        )
    assert ei.value.code == "converter-timeout"
    pid = int(pidfile.read_text())
    # Killed with the process group (it may linger as a zombie of init; not running).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X")


def test_litert_package_converter(tmp_path: Path, face_tflite: Path) -> None:
    conv = """
        import argparse, pathlib, shutil
        p = argparse.ArgumentParser(); p.add_argument("--input"); p.add_argument("--output")
        p.add_argument("--backend"); p.add_argument("--device-info")
        a = p.parse_args()
        assert a.backend == "litert"
        name = "face_detection_short_range.tflite"
        shutil.copy(pathlib.Path(a.input) / "Model" / name, pathlib.Path(a.output) / name)
        """
    pkg = make_package(tmp_path / "pkg", face_tflite, converter=conv)
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    assert s.converted.info["stages"] == ["package-converter"]
    assert s.backend.kind == "litert"
    out = s.predict({"input": np.zeros((2, 128, 128, 3), np.float32)})
    assert out["regressors"].shape == (2, 896, 16)
    assert open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c").converted.from_cache


def _matmul_model(path: Path) -> Path:
    """A tiny generated ONNX model whose weights are a real initializer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).random((64, 16), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_converter_output_with_external_data(tmp_path: Path) -> None:
    model = _matmul_model(tmp_path / "mm.onnx")
    conv = """
        import argparse, pathlib, onnx
        p = argparse.ArgumentParser(); p.add_argument("--input"); p.add_argument("--output")
        p.add_argument("--backend"); p.add_argument("--device-info")
        a = p.parse_args()
        m = onnx.load(str(pathlib.Path(a.input) / "Model" / "mm.onnx"))
        onnx.save(m, str(pathlib.Path(a.output) / "mm.onnx"),
                  save_as_external_data=True, location="weights.bin", size_threshold=0)
        """
    pkg = make_package(tmp_path / "pkg", model, converter=conv)
    cfg = RuntimeConfig.from_dict({"onnx": {"graph_optimization_level": "disable"}})
    s = open_model(pkg, cfg, cache_dir=tmp_path / "c")
    assert (s.converted.model_path.parent / "weights.bin").is_file()
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    np.testing.assert_allclose(s.predict({"x": x})["y"], _ort(model, {"x": x})["y"], rtol=1e-5)
    # With the ORT stage the optimised model is self-contained.
    s2 = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    np.testing.assert_allclose(s2.predict({"x": x})["y"], _ort(model, {"x": x})["y"], rtol=1e-5)
