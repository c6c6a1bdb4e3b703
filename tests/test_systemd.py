"""The packaged unit passes systemd's own checks: `verify` and the offline security score."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edgeward.service"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's edgeward (verify wants it to exist)."""
    exe = Path(sys.executable).parent / "edgeward"
    assert exe.exists(), exe
    text = UNIT.read_text().replace("/usr/bin/edgeward", str(exe))
    out = tmp_path / "edgeward.service"
    out.write_text(text)
    return out


def test_unit_declares_lifecycle_contract() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "User=edgeward",
        "StateDirectory=edgeward",
        "RuntimeDirectory=edgeward",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "NoNewPrivileges=yes",
    ):
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+s$", text, re.M)
    assert "ExecStart=/usr/bin/edgeward agent --config " in text


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    res = subprocess.run(
        [ANALYZE, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    # verify reports unknown keys and bad values as warnings without failing: none allowed
    assert "edgeward.service" not in res.stderr, res.stderr


def test_security_score_ok(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    res = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 2.0, res.stdout
    assert m.group(2) == "OK"


def test_sysusers_and_tmpfiles_parse() -> None:
    sysusers = (ROOT / "systemd" / "edgeward.sysusers").read_text()
    assert re.search(r"^u edgeward ", sysusers, re.M)
    tmpfiles = (ROOT / "systemd" / "edgeward.tmpfiles").read_text()
    for line in tmpfiles.splitlines():
        if line and not line.startswith("#"):
            assert len(line.split()) >= 6, line
