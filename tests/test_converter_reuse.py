"""The converter's cost rules (issue 12): the validated ONNX session is the one that
serves, a weight-heavy model keeps no optimised copy, a reused artefact must answer
what its validated graph answered, and the signed manifest's digest keys the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import runtime.converter as conv
import runtime.onnx_backend as ob
from runtime.config import RuntimeConfig
from runtime.loader import open_model
from tests.helpers import CLS_OUT, CLS_X, make_package


def _ort(model: Path) -> np.ndarray:
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(s.run([CLS_OUT], {"x": CLS_X})[0])


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ORT session the runtime creates: (model, level, saved-to, prepack)."""
    made: list[dict[str, Any]] = []
    real = ob.create_session

    def counting(model_path: Path, opts: Any, **kw: Any) -> Any:
        made.append({"model": Path(model_path).name, **kw})
        return real(model_path, opts, **kw)

    monkeypatch.setattr(ob, "create_session", counting)
    return made


def test_a_conversion_loads_the_model_twice_and_serves_the_validated_session(
    tmp_path: Path, ppocr_cls: Path, sessions: list[dict[str, Any]]
) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    # the reference (unoptimised, no prepacking) and the serving one, which saved its
    # optimised graph: nothing loaded a third time
    assert len(sessions) == 2, sessions
    ref = next(m for m in sessions if m.get("level") == "disable")
    assert ref["prepack"] is False
    serve = next(m for m in sessions if m.get("level") is None or m.get("level") == "all")
    assert serve["optimized_out"] is not None
    assert s.converted.info["validation"]["validated"] is True
    assert "ort-optimise-all" in s.converted.info["stages"]
    np.testing.assert_allclose(
        s.predict({"x": CLS_X})[CLS_OUT], _ort(ppocr_cls), rtol=1e-4, atol=1e-5
    )
    entry = s.converted.model_path.parent.parent
    assert (entry / conv.GOLDEN).is_file()
    s.close()
    sessions.clear()
    s2 = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    assert s2.converted.from_cache and len(sessions) == 1  # the saved graph, once
    assert sessions[0]["level"] == "disable"
    s2.close()


def test_reused_artefact_that_answers_differently_is_rebuilt(
    tmp_path: Path, ppocr_cls: Path
) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    cache = tmp_path / "c"
    s = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    entry = s.converted.model_path.parent.parent
    s.close()
    # What a saved optimised graph that reloads differently looks like to the check:
    # the golden record no longer matches what the artefact answers.
    golden = entry / conv.GOLDEN
    with np.load(golden, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    shifted = {k: (v + 1.0 if "/output:" in k else v) for k, v in arrays.items()}
    np.savez(golden, **shifted)
    s2 = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    assert not s2.converted.from_cache
    # rebuilt without the saved optimised graph: the package model, optimised at load
    assert "ort-optimise-all" not in s2.converted.info["stages"]
    assert s2.converted.level == "all"
    np.testing.assert_allclose(
        s2.predict({"x": CLS_X})[CLS_OUT], _ort(ppocr_cls), rtol=1e-4, atol=1e-5
    )
    s2.close()
    s3 = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    assert s3.converted.from_cache  # the rebuilt entry passes its own check
    s3.close()


def test_weight_heavy_model_keeps_no_copy(
    tmp_path: Path, ppocr_cls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv, "ONLINE_OPTIMISE_BYTES", 1)  # every model counts as large
    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    cache = tmp_path / "c"
    s = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    info = s.converted.info
    assert info["artefact"] == "package" and "artefact_sha256" not in info
    assert "ort-online-all" in info["stages"] and info["validation"]["validated"] is True
    assert s.converted.model_path == pkg / "Model" / ppocr_cls.name
    assert s.converted.level == "all"
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert not (entry / "model").exists() or not any((entry / "model").iterdir())
    np.testing.assert_allclose(
        s.predict({"x": CLS_X})[CLS_OUT], _ort(ppocr_cls), rtol=1e-4, atol=1e-5
    )
    s.close()
    s2 = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    assert s2.converted.from_cache and s2.converted.model_path == pkg / "Model" / ppocr_cls.name
    s2.close()
    # a batch rewrite is a conversion of its own: that artefact is kept
    pkg2 = make_package(
        tmp_path / "pkg2", ppocr_cls, converter_config={"batch": "static", "batch_size": 1}
    )
    s3 = open_model(pkg2, RuntimeConfig(), cache_dir=cache)
    assert s3.converted.model_path.is_relative_to(cache)
    s3.close()


def test_cache_key_from_the_signed_manifest(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    model = pkg / "Model" / ppocr_cls.name
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    size = model.stat().st_size
    entry = {"id": 0, "name": model.name, "size": size, "sha256": sha}
    (pkg / "manifest.json").write_text(json.dumps({"name": "m", "models": [entry]}))
    # no kept signature: not taken from the manifest
    assert conv.pinned_sha256(pkg, model.name, model) is None
    (pkg / "manifest.sig").write_text("{}")
    assert conv.pinned_sha256(pkg, model.name, model) == sha
    # a size that does not match the file, or a residual model: hashed instead
    (pkg / "manifest.json").write_text(json.dumps({"models": [{**entry, "size": size + 1}]}))
    assert conv.pinned_sha256(pkg, model.name, model) is None
    (pkg / "manifest.json").write_text(json.dumps({"models": [{**entry, "target_digest": "x"}]}))
    assert conv.pinned_sha256(pkg, model.name, model) is None
    # the key is the same either way: the digest is the file's
    cfg = RuntimeConfig()
    cc = conv.ConverterConfig()
    assert conv.cache_key(model, pkg, "onnxruntime", cc, cfg) == conv.cache_key(
        model, pkg, "onnxruntime", cc, cfg, model_sha256=sha
    )


def test_torn_golden_record_is_a_miss_not_a_failure(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(tmp_path / "pkg", ppocr_cls)
    cache = tmp_path / "c"
    s = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    golden = s.converted.model_path.parent.parent / conv.GOLDEN
    s.close()
    golden.write_bytes(golden.read_bytes()[:100])  # what a power cut can leave
    s2 = open_model(pkg, RuntimeConfig(), cache_dir=cache)
    assert not s2.converted.from_cache
    np.testing.assert_allclose(
        s2.predict({"x": CLS_X})[CLS_OUT], _ort(ppocr_cls), rtol=1e-4, atol=1e-5
    )
    s2.close()


def test_reference_reads_weights_in_place_and_still_validates(
    tmp_path: Path, sessions: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime.onnx_weights as ow
    from tests.repo_util import big_onnx

    monkeypatch.setattr(conv, "ONLINE_OPTIMISE_BYTES", 1)  # served from the package
    shared: list[bool] = []
    real = ow.shared_weights_session

    def spy(*a: Any, **kw: Any) -> Any:
        sess = real(*a, **kw)
        shared.append(sess is not None)
        return sess

    monkeypatch.setattr(ow, "shared_weights_session", spy)
    model = big_onnx(tmp_path / "big.onnx", mib=2, seed=4)  # one 2 MiB weight
    pkg = make_package(tmp_path / "pkg", model)
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    ref = next(m for m in sessions if m.get("level") == "disable")
    assert ref["shared_weights"] is True and shared == [True]
    assert s.converted.info["validation"] == {"validated": True, "source": "random", "checked": 1}
    # the serving session is an ordinary load (its own weights, prepacked)
    serve = next(m for m in sessions if m.get("level") != "disable")
    assert not serve.get("shared_weights")
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(s.predict({"x": x})["y"], want[0], rtol=1e-5, atol=1e-5)
    s.close()
