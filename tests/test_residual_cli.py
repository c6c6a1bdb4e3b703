"""``edgeward diff`` / ``patch`` / ``digest`` on a real TFLite model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.residual import weights_digest
from tests.helpers import perturb


@pytest.fixture
def models(face_tflite: Path, tmp_path: Path) -> tuple[Path, Path]:
    return face_tflite, perturb(face_tflite, tmp_path / "v2.tflite", 0.02, 7)


def test_diff_patch_digest(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, target = models
    patch = tmp_path / "v2.ewr"
    assert main(["diff", str(base), str(target), "-o", str(patch), "--bits", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["patch_bytes"] == patch.stat().st_size < target.stat().st_size / 2
    assert doc["base_digest"] == weights_digest(base) and doc["stats"]["q4"] > 50
    out = tmp_path / "out" / "v2.tflite"
    rc = main(
        [
            "patch",
            str(base),
            str(patch),
            "-o",
            str(out),
            "--expect-base",
            doc["base_digest"],
            "--expect-target",
            doc["target_digest"],
            "--json",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["target_digest"] == doc["target_digest"]
    # digest through a real process: the entry point users run
    r = subprocess.run(
        [sys.executable, "-m", "agent", "digest", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == doc["target_digest"]
    # human output names the digests and the ratio
    argv = ["diff", str(base), str(target), "-o", str(patch), "--max-rel-err", "0"]
    assert main(argv) == 2  # the patch exists: replaced only with --force
    assert "[output-exists]" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    text = capsys.readouterr().out
    assert doc["base_digest"] in text and "% of" in text and "fallbacks" in text


def test_patch_wrong_base_is_one_line_error(
    models: tuple[Path, Path], hand_tflite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, target = models
    patch = tmp_path / "p.ewr"
    assert main(["diff", str(base), str(target), "-o", str(patch)]) == 0
    capsys.readouterr()
    out = tmp_path / "o.tflite"
    rc = main(["patch", str(hand_tflite), str(patch), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "[base-mismatch]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    rc = main(["patch", str(base), str(tmp_path / "missing.ewr"), "-o", str(out)])
    assert rc != 0 and "[residual-io]" in capsys.readouterr().err


def test_patch_verify_base_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A base differing only in bytes the output does not use (the producer name) gives
    the exact target by default; ``--verify-base`` refuses it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(w: np.ndarray, producer: str, path: Path) -> Path:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
            [numpy_helper.from_array(w, "W")],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version, m.producer_name = 10, producer
        onnx.save(m, str(path))
        return path

    w = np.random.default_rng(0).normal(0, 1, (64, 64)).astype(np.float32)
    base = save(w, "publisher", tmp_path / "a.onnx")
    target = save(w * 1.01, "publisher", tmp_path / "b.onnx")
    other = save(w, "Publisher", tmp_path / "a2.onnx")  # same weights, one skeleton byte
    patch = tmp_path / "p.ewr"
    assert main(["diff", str(base), str(target), "-o", str(patch)]) == 0
    capsys.readouterr()
    out = tmp_path / "o.onnx"
    assert main(["patch", str(other), str(patch), "-o", str(out)]) == 0
    assert out.exists()
    out.unlink()
    rc = main(["patch", str(other), str(patch), "-o", str(out), "--verify-base"])
    assert rc != 0 and "[base-mismatch]" in capsys.readouterr().err
    assert not out.exists()
    assert main(["patch", str(base), str(patch), "-o", str(out), "--verify-base"]) == 0
