"""`edgeward demo` from an installed wheel, not from the source checkout.

The wheel is built from this tree, installed with its dependencies into a fresh virtual
environment (no system site-packages, no source tree on the path), and the demo's
publisher half runs from an empty directory: the example package ships as package data
and the model is read out of its PyPI wheel (kept in ``$EDGEWARD_ASSETS``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.demo import MODEL_SOURCE
from tests.assets import asset

ROOT = Path(__file__).resolve().parent.parent


def _run(
    argv: list[str | Path],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> str:
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    asset("ppocr_det.onnx")  # the rapidocr wheel is in the assets cache from here on
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, ROOT])
    (wheel,) = dist.glob("edgeward-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    # the demo's model comes out of the rapidocr wheel, copied so no download is needed
    assets = tmp_path / "assets"
    (assets / "wheels").mkdir(parents=True)
    cache = Path(os.environ.get("EDGEWARD_ASSETS", ROOT / ".cache" / "assets"))
    (rapidocr,) = (cache / "wheels").glob(MODEL_SOURCE[1])
    shutil.copy(rapidocr, assets / "wheels")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["EDGEWARD_ASSETS"] = str(assets)
    where = _run(
        [venv / "bin" / "python", "-c", "import agent; print(agent.__file__)"], cwd=cwd, env=env
    )
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    out = _run([venv / "bin" / "edgeward", "demo", "--publish-only"], cwd=cwd, env=env)
    assert "demo publish steps complete" in out
    assert "signature and 6 file digests verified" in out, out
    assert "Program/Scripts/run.py" in out  # the example package's run script, shipped
    assert (assets / "ppocr_det.onnx").read_bytes() == asset("ppocr_det.onnx").read_bytes()
    assert (cwd / ".cache" / "demo" / "ppocr-det-1.emp").is_file()
