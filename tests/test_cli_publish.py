"""The publisher CLI: pack, inspect, verify, unpack through ``edgeward`` itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main


def _keys(tmp: Path) -> tuple[Path, Path, Path]:
    assert main(["keygen", "--kind", "signing", "--out", str(tmp / "sign")]) == 0
    assert main(["keygen", "--kind", "device", "--out", str(tmp / "dev")]) == 0
    return next((tmp / "sign").glob("*.key")), tmp / "sign", tmp / "dev"


def test_pack_inspect_verify_unpack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sk, sign_dir, dev_dir = _keys(tmp_path)
    capsys.readouterr()
    model = tmp_path / "w.bin"
    model.write_bytes(np.arange(10_000, dtype=np.float32).tobytes())
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "s0.npz", **{"input:x": np.ones(2, np.float32)})
    pkg = tmp_path / "p.emp"
    rc = main(
        [
            "pack",
            "--model",
            str(model),
            "--name",
            "cli",
            "--version",
            "4",
            "--label",
            "4.0",
            "--signing-key",
            str(sk),
            "--encrypt-for",
            str(dev_dir),
            "--alg",
            "chacha20-poly1305",
            "--samples",
            str(samples),
            "-o",
            str(pkg),
            "--json",
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 4 and doc["encryption"]["alg"] == "chacha20-poly1305"
    assert main(["inspect", str(pkg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "cli" and info["verified"] is False
    assert main(["inspect", str(pkg)]) == 0
    text = capsys.readouterr().out
    assert "cli version 4 (4.0)" in text and "chacha20-poly1305" in text
    assert main(["verify", str(pkg), "--trust", str(sign_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    out = tmp_path / "u"
    assert (
        main(
            [
                "unpack",
                str(pkg),
                "--trust",
                str(sign_dir),
                "--device-key",
                str(dev_dir),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "Model" / "w.bin").read_bytes() == model.read_bytes()
    assert (out / "Meta-info" / "samples" / "s0.npz").is_file()


def test_failures_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sk, sign_dir, dev_dir = _keys(tmp_path)
    model = tmp_path / "w.bin"
    model.write_bytes(b"\0" * 1000)
    pkg = tmp_path / "p.emp"
    assert (
        main(
            [
                "pack",
                "--model",
                str(model),
                "--name",
                "x",
                "--version",
                "1",
                "--signing-key",
                str(sk),
                "--encrypt-for",
                str(dev_dir),
                "-o",
                str(pkg),
            ]
        )
        == 0
    )
    capsys.readouterr()
    other = tmp_path / "other"
    assert main(["keygen", "--kind", "signing", "--out", str(other)]) == 0
    capsys.readouterr()
    cases = [
        (["verify", str(pkg), "--trust", str(other)], "[unknown-signer]"),
        (
            ["unpack", str(pkg), "--trust", str(sign_dir), "-o", str(tmp_path / "u")],
            "[no-recipient-key]",
        ),
        (["inspect", str(tmp_path / "missing.emp")], "[package-read]"),
        (
            [
                "pack",
                "--model",
                str(model),
                "--name",
                "../bad",
                "--version",
                "1",
                "--signing-key",
                str(sk),
                "-o",
                str(tmp_path / "q.emp"),
            ],
            "[manifest-field]",
        ),
        (
            [
                "pack",
                "--model",
                str(model),
                "--name",
                "x",
                "--version",
                "1",
                "--signing-key",
                str(sk),
                "--no-encrypt",
                "--encrypt-for",
                str(dev_dir),
                "-o",
                str(tmp_path / "q.emp"),
            ],
            "[usage]",
        ),
    ]
    for argv, code in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc != 0, argv
        assert err.count("\n") == 1 and code in err, err
    assert not (tmp_path / "u").exists() and not (tmp_path / "q.emp").exists()


@pytest.mark.e2e
def test_real_model_cli_round_trip(tmp_path: Path, ppocr_det: Path) -> None:
    """The installed console entry point, a real ONNX model, then onnxruntime on the output."""
    import onnxruntime as ort

    exe = [sys.executable, "-m", "agent"]

    def run(*args: str) -> str:
        p = subprocess.run([*exe, *args], capture_output=True, text=True, check=False)
        assert p.returncode == 0, p.stderr
        return p.stdout

    run("keygen", "--kind", "signing", "--out", str(tmp_path / "sign"))
    run("keygen", "--kind", "device", "--out", str(tmp_path / "dev"))
    sk = next((tmp_path / "sign").glob("*.key"))
    example = Path(__file__).resolve().parent.parent / "agent" / "examples" / "ppocr-det"
    pkg = tmp_path / "det.emp"
    run(
        "pack",
        "--model",
        str(ppocr_det),
        "--name",
        "ppocr-det",
        "--version",
        "1",
        "--signing-key",
        str(sk),
        "--encrypt-for",
        str(tmp_path / "dev"),
        "--meta",
        str(example / "Meta-info"),
        "--program",
        str(example / "Program"),
        "-o",
        str(pkg),
    )
    assert "OK" in run("verify", str(pkg), "--trust", str(tmp_path / "sign"))
    out = tmp_path / "u"
    run(
        "unpack",
        str(pkg),
        "--trust",
        str(tmp_path / "sign"),
        "--device-key",
        str(tmp_path / "dev"),
        "-o",
        str(out),
    )
    det = out / "Model" / ppocr_det.name
    assert det.read_bytes() == ppocr_det.read_bytes()
    assert (out / "Program" / "Scripts" / "run.py").is_file()
    from runtime.loader import read_package  # the runtime accepts the unpacked layout

    info = read_package(out)
    assert (info.name, info.version, info.backend) == ("ppocr-det", "1", "onnxruntime")
    assert info.entry_model == ppocr_det.name and info.run_script is not None
    x = np.random.default_rng(0).random((1, 3, 96, 96), dtype=np.float32)
    a = ort.InferenceSession(str(ppocr_det), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(det), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(a.run(None, {"x": x})[0], b.run(None, {"x": x})[0])


def test_envelope_add(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sk, sign_dir, dev_dir = _keys(tmp_path)
    assert main(["keygen", "--kind", "device", "--out", str(tmp_path / "dev2")]) == 0
    model = tmp_path / "w.bin"
    model.write_bytes(b"weights" * 100)
    pkg = tmp_path / "p.emp"
    assert (
        main(
            [
                "pack",
                "--model",
                str(model),
                "--name",
                "env",
                "--version",
                "1",
                "--signing-key",
                str(sk),
                "--encrypt-for",
                str(dev_dir),
                "-o",
                str(pkg),
            ]
        )
        == 0
    )
    before = pkg.read_bytes()
    # the new device cannot unpack yet
    assert (
        main(
            [
                "unpack",
                str(pkg),
                "--trust",
                str(sign_dir),
                "--device-key",
                str(tmp_path / "dev2"),
                "-o",
                str(tmp_path / "u"),
            ]
        )
        != 0
    )
    env = tmp_path / "dev2.envelope"
    assert (
        main(
            [
                "envelope",
                "add",
                str(pkg),
                "--signing-key",
                str(sk),
                "--key",
                str(dev_dir),
                "--encrypt-for",
                str(tmp_path / "dev2"),
                "-o",
                str(env),
            ]
        )
        == 0
    )
    assert pkg.read_bytes() == before  # the package was not touched
    assert (
        main(
            [
                "unpack",
                str(pkg),
                "--trust",
                str(sign_dir),
                "--device-key",
                str(tmp_path / "dev2"),
                "--envelope",
                str(env),
                "-o",
                str(tmp_path / "u"),
            ]
        )
        == 0
    )
    assert (tmp_path / "u" / "Model" / "w.bin").read_bytes() == model.read_bytes()
