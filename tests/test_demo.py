"""`make demo` end to end: the README's first command must keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.assets import asset
from tests.emulation import scaled


@pytest.mark.e2e
def test_demo_runs_the_whole_path(tmp_path: Path) -> None:
    """keygen → pack → verify → daemon → inference → residual update → hot swap → stop."""
    work = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--model", str(asset("ppocr_det.onnx")),
         "--workdir", str(work), "--timeout", str(scaled(60))],
        capture_output=True, text=True, timeout=scaled(600), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "demo complete" in out
    # the detector finds the three printed lines of the demo page, before and after
    boxes = re.findall(r"^ {4}box \[(\d+), (\d+), (\d+), (\d+)\]$", out, re.MULTILINE)
    assert len(boxes) == 6, out
    assert "v2 finds the same text boxes as v1: True" in out
    ratio = float(re.search(r"\(([0-9.]+) of full\)", out).group(1))  # type: ignore[union-attr]
    assert ratio < 0.5, out
    assert "daemon exited with 0" in out
    assert not (work / "state").exists()  # cleaned up unless --keep
