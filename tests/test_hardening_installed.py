"""Issue #13 item 12: installed versions are checked against the signed manifest kept
with them, at start and on ``edgeward verify --installed``: a one-bit weight flip, an
edited ``run.py``, a deleted file, an extra file, a link, an edited manifest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.installed import check_version
from agent.keys import load_trusted
from agent.package import unpack
from tests.daemon_util import (
    edgeward,
    http_unix,
    needs_worker,
    signing_key,
    start_daemon,
    tiny_model_dir,
)


def _package(work: Path, key: Path, version: str, scale: float) -> Path:
    """A signed package with a run script (Program/Scripts/run.py) and samples."""
    src = tiny_model_dir(work / "src", "tiny", version, scale=scale, slow=True)
    out = work / "pkgs" / f"tiny-{version}.emp"
    out.parent.mkdir(parents=True, exist_ok=True)
    edgeward("pack", "--model", str(src / "Model" / "tiny.onnx"), "--name", "tiny",
             "--version", version, "--signing-key", str(key),
             "--program", str(src / "Program"), "--samples", str(src / "Meta-info" / "samples"),
             "-o", str(out))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("pkgs")
    key, trust = signing_key(work)
    return {"trust": trust, "1": _package(work, key, "1", 2.0), "2": _package(work, key, "2", 3.0)}


def _flip_bit(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


TAMPER: dict[str, Callable[[Path], object]] = {
    "weight-bit": lambda d: _flip_bit(d / "Model" / "tiny.onnx"),
    "run.py-edited": lambda d: (d / "Program" / "Scripts" / "run.py").open("a").write("#\n"),
    "file-deleted": lambda d: (d / "Program" / "Scripts" / "run.py").unlink(),
    "extra-file": lambda d: (d / "Program" / "Scripts" / "evil.py").write_text("x = 1\n"),
    "sample-replaced-by-link": lambda d: (
        (d / "Meta-info" / "samples" / "s0.npz").unlink(),
        (d / "Meta-info" / "samples" / "s0.npz").symlink_to("/etc/hostname"),
    ),
    "manifest-edited": lambda d: (d / "manifest.json").write_bytes(
        (d / "manifest.json").read_bytes().replace(b'"tiny"', b'"tinx"', 1)
    ),
    "signature-deleted-and-manifest-edited": lambda d: (
        (d / "manifest.sig").unlink(),
        (d / "manifest.json").write_bytes(b"{}"),
    ),
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_check_version_finds_each_change(tmp_path: Path, pkgs: dict[str, Path], how: str) -> None:
    trust = load_trusted([pkgs["trust"]])
    d = tmp_path / "v"
    unpack(pkgs["1"], d, trust=trust)
    assert (d / "manifest.sig").is_file()
    clean = check_version("tiny", "1", d, trust)
    assert clean.ok and clean.checked and clean.signed and clean.files >= 3, clean.to_dict()
    TAMPER[how](d)
    res = check_version("tiny", "1", d, trust)
    if how == "signature-deleted-and-manifest-edited":
        # no signature and no package manifest left: reported, never silently "ok"
        assert not res.checked or not res.ok
        return
    assert not res.ok, (how, res.to_dict())
    assert res.problems


def test_hand_made_store_is_not_checked(tmp_path: Path) -> None:
    d = tiny_model_dir(tmp_path, "tiny", "1")
    res = check_version("tiny", "1", d, None)
    assert res.ok and not res.checked


@needs_worker
@pytest.mark.e2e
def test_daemon_verifies_installed_at_start_and_on_demand(
    tmp_path: Path, pkgs: dict[str, Path]
) -> None:
    work = tmp_path / "w"
    d = start_daemon(work, [pkgs["1"], pkgs["2"]], trust=[pkgs["trust"]], trust_dir=pkgs["trust"])
    models = d.state_dir / "models" / "tiny" / "versions"
    try:
        r = d.cli("status", "--json")
        assert json.loads(r.stdout)["models"] == {"tiny": "2"}
        r = d.cli("verify", "--installed")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "OK: tiny version 2" in r.stdout and "OK: tiny version 1" in r.stdout
        # on demand: current's run.py edited -> previous serves, loudly
        (models / "2" / "Program" / "Scripts" / "run.py").open("a").write("# edited\n")
        r = d.cli("verify", "--installed")
        assert r.returncode == 1
        assert "MODIFIED: tiny version 2: Program/Scripts/run.py" in r.stderr, r.stderr
        assert "now serving 1" in r.stderr
        st = json.loads(d.cli("status", "--json").stdout)
        assert st["models"] == {"tiny": "1"} and "2" in st["updates"]["tiny"]["bad"]
    finally:
        d.stop()
    # at start: restore 2 (it stays refused), flip one bit in 1's weights -> current (1)
    # modified, previous (2) sound: 2 serves again, said loudly in the log
    src2 = models / "2" / "Program" / "Scripts" / "run.py"
    src2.write_bytes(src2.read_bytes().replace(b"# edited\n", b""))
    _flip_bit(models / "1" / "Model" / "tiny.onnx")
    d = start_daemon(work, config=d.config)
    try:
        st = json.loads(d.cli("status", "--json").stdout)
        assert st["models"] == {"tiny": "2"}, d.log()
        assert "MODIFIED: tiny version 1" in d.log()
        status, _h, body = http_unix(
            d.infer_sock,
            "POST",
            "/v2/models/tiny/infer",
            json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
            ).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [3.0] * 4
    finally:
        d.stop()
    # both modified: the model is not served, the daemon still starts and says why
    _flip_bit(models / "2" / "Model" / "tiny.onnx")
    d = start_daemon(work, config=d.config)
    try:
        st = json.loads(d.cli("status", "--json").stdout)
        assert st["models"] == {}, st
        assert "MODIFIED: tiny version 2" in d.log() and "not served" in d.log()
    finally:
        d.stop()
