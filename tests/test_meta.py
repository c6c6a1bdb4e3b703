"""Meta-info schemas (tables 62-67), validation messages, generation and samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent import meta
from agent.errors import MetaInfoError

EXAMPLE = Path(__file__).resolve().parent.parent / "agent" / "examples" / "ppocr-det"


def test_example_meta_is_valid() -> None:
    for name in (meta.MANAGEMENT, meta.TECHNICAL):
        doc = meta.parse(name, (EXAMPLE / "Meta-info" / name).read_bytes())
        assert doc
    tech = json.loads((EXAMPLE / "Meta-info" / meta.TECHNICAL).read_text())
    assert tech["converter_config"]["batch"] == "static"
    assert tech["PTM_info"]["architecture"]


@pytest.mark.parametrize(
    ("file", "doc", "message"),
    [
        (
            meta.TECHNICAL,
            {"runtime_config": {"backend": "foo"}},
            "Meta-info/technicalinfo.json: runtime_config.backend: 'foo' is not one of "
            "['onnxruntime', 'litert']",
        ),
        (
            meta.TECHNICAL,
            {},
            "Meta-info/technicalinfo.json: 'runtime_config' is a required property",
        ),
        (
            meta.TECHNICAL,
            {"runtime_config": {}, "converter_config": {"batch_size": 0}},
            "Meta-info/technicalinfo.json: converter_config.batch_size: 0 is less than the "
            "minimum of 1",
        ),
        (
            meta.TECHNICAL,
            {"runtime_config": {"inputs": [{"name": "x", "modality": "smell"}]}},
            "Meta-info/technicalinfo.json: runtime_config.inputs[0].modality: 'smell' is "
            "not one of",
        ),
        (
            meta.TECHNICAL,
            {"runtime_config": {}, "PTM_info": {"num_layers": -1}},
            "Meta-info/technicalinfo.json: PTM_info.num_layers: -1 is less than the minimum of 0",
        ),
        (
            meta.TECHNICAL,
            {"runtime_config": {"run_script": "../evil.py"}},
            "Meta-info/technicalinfo.json: runtime_config.run_script",
        ),
        (
            meta.TECHNICAL,
            {"runtime_config": {}, "converter_config": {"preprocessing": {"layout": "CHWN"}}},
            "Meta-info/technicalinfo.json: converter_config.preprocessing.layout: 'CHWN' is "
            "not one of",
        ),
        (
            meta.MANAGEMENT,
            {"name": "x"},
            "Meta-info/managementinfo.json: 'version' is a required property",
        ),
        (
            meta.MANAGEMENT,
            {"name": "x", "version": 1, "metrics": {"f1": [1]}},
            "Meta-info/managementinfo.json: metrics.f1: [1] is not of type",
        ),
    ],
)
def test_errors_name_the_field(file: str, doc: object, message: str) -> None:
    with pytest.raises(MetaInfoError) as info:
        meta.parse(file, json.dumps(doc).encode())
    assert info.value.code == "meta-invalid"
    assert str(info.value).startswith(message), str(info.value)


def test_not_json() -> None:
    with pytest.raises(MetaInfoError) as info:
        meta.parse(meta.TECHNICAL, b"{nope")
    assert info.value.code == "meta-json"


def test_generate_from_onnx(ppocr_det: Path) -> None:
    mgmt, tech = meta.generate("det", 2, "v2", [("det.onnx", ppocr_det, "onnx")])
    assert mgmt["name"] == "det" and mgmt["version"] == 2
    rc = tech["runtime_config"]
    assert rc["backend"] == "onnxruntime" and rc["entry_model"] == "det.onnx"
    assert rc["inputs"] == [
        {"name": "x", "data_type": "float32", "shape": [-1, 3, -1, -1], "modality": "image"}
    ]
    meta.check_entry_model(tech, ["det.onnx"])
    with pytest.raises(MetaInfoError):
        meta.check_entry_model(tech, ["other.onnx"])


def test_generate_unreadable_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(MetaInfoError) as info:
        meta.generate("x", 1, "", [("bad.onnx", bad, "onnx")])
    assert info.value.code == "meta-generate"
    # a raw (non-runnable) model still gets valid, minimal Meta-info
    _, tech = meta.generate("x", 1, "", [("blob.bin", bad, "raw")])
    assert tech["runtime_config"] == {}


def test_samples(tmp_path: Path) -> None:
    good = tmp_path / "s0.npz"
    np.savez(good, **{"input:x": np.zeros(3, np.float32), "output:y": np.ones(3, np.float32)})
    meta.check_sample(good)
    bad_keys = tmp_path / "s1.npz"
    np.savez(bad_keys, x=np.zeros(3))
    pickled = tmp_path / "s2.npz"
    np.savez(pickled, **{"input:x": np.array([{"a": 1}], dtype=object)})
    junk = tmp_path / "s3.npz"
    junk.write_bytes(b"PK nonsense")
    for p in (bad_keys, pickled, junk, tmp_path / "s4.npy"):
        if not p.exists():
            p.write_bytes(b"")
        with pytest.raises(MetaInfoError) as info:
            meta.check_sample(p)
        assert info.value.code == "sample-invalid"
