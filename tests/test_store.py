"""The store: atomic links, install by rename, crash leftovers cleaned, journal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.durable import atomic_write_bytes
from agent.errors import StoreError, UpdateError
from agent.store import Store


def _version(store: Store, name: str, version: str) -> Path:
    src = store.staging()
    (src / "Model").mkdir()
    (src / "Model" / "m.onnx").write_bytes(version.encode())
    return store.install(name, version, src)


def test_install_activate_rollback_gc(tmp_path: Path) -> None:
    store = Store(tmp_path / "state").open()
    assert store.names() == []
    _version(store, "det", "1")
    assert store.current("det") is None
    assert store.activate("det", "1") is None
    assert store.current("det") == "1" and store.previous("det") is None
    _version(store, "det", "2")
    assert store.activate("det", "2") == "1"
    assert (store.current("det"), store.previous("det")) == ("2", "1")
    # links are relative, so the state dir may move (e.g. into a chroot image)
    assert os.readlink(store.models_dir / "det" / "current") == "versions/2"
    assert store.rollback("det") == ("1", "2")
    assert (store.current("det"), store.previous("det")) == ("1", "2")
    _version(store, "det", "3")
    store.activate("det", "3")
    assert store.versions("det") == ["1", "2", "3"]
    assert store.gc("det") == ["2"]
    assert store.versions("det") == ["1", "3"]
    assert store.names() == ["det"]
    assert store.info("det").to_dict() == {
        "name": "det",
        "current": "3",
        "previous": "1",
        "versions": ["1", "3"],
    }


def test_refusals(tmp_path: Path) -> None:
    store = Store(tmp_path).open()
    _version(store, "m", "1")
    with pytest.raises(StoreError) as ei:
        _version(store, "m", "1")
    assert ei.value.code == "store-exists"
    with pytest.raises(StoreError):
        store.activate("m", "9")
    store.activate("m", "1")
    with pytest.raises(UpdateError) as ei2:
        store.rollback("m")
    assert ei2.value.code == "no-previous"
    with pytest.raises(StoreError) as ei3:
        store.version_dir("../etc", "1")
    assert ei3.value.code == "store-name"
    with pytest.raises(StoreError):
        store.version_dir("m", "..")
    with pytest.raises(StoreError):
        store.remove_version("m", "1")


def test_open_cleans_half_done(tmp_path: Path) -> None:
    store = Store(tmp_path).open()
    _version(store, "m", "1")
    store.activate("m", "1")
    # leftovers of a crash: staging content, a temp link, an unpacker temp dir, dangling link
    (store.staging_dir / "stage-x").mkdir()
    (store.staging_dir / "stage-x" / "part").write_bytes(b"half")
    os.symlink("versions/1", store.models_dir / "m" / ".tmp-current-1-2")
    (store.models_dir / "m" / "versions" / ".2.tmp").mkdir()
    os.symlink("versions/7", store.models_dir / "m" / "previous")
    Store(tmp_path).open()
    assert list(store.staging_dir.iterdir()) == []
    assert sorted(p.name for p in (store.models_dir / "m").iterdir()) == ["current", "versions"]
    assert store.versions("m") == ["1"]
    assert store.current("m") == "1"


def test_kill9_during_switches_never_mixes(tmp_path: Path) -> None:
    """A child flips current between two versions in a loop; we kill -9 it at random
    moments. Every time, current names a complete version and open() cleans up."""
    store = Store(tmp_path).open()
    _version(store, "m", "1")
    _version(store, "m", "2")
    store.activate("m", "1")
    code = (
        "import sys; from pathlib import Path; from agent.store import Store\n"
        "s = Store(Path(sys.argv[1]))\n"
        "print('go', flush=True)\n"
        "while True:\n"
        "    s.activate('m', '2'); s.rollback('m')\n"
    )
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "go"
        for _ in range(200):  # let it run some switches
            if store.current("m") == "2":
                break
        proc.kill()
        proc.wait()
        reopened = Store(tmp_path).open()
        assert reopened.current("m") in {"1", "2"}
        assert (reopened.models_dir / "m" / "versions" / reopened.current("m")).is_dir()  # type: ignore[operator]
        assert not [p for p in (tmp_path / "models" / "m").iterdir() if p.name.startswith(".tmp")]


def test_journal_roundtrip_and_corruption(tmp_path: Path) -> None:
    store = Store(tmp_path).open()
    assert store.read_journal() == {}
    store.write_journal({"models": {"m": {"state": "active"}}})
    assert store.read_journal()["models"]["m"]["state"] == "active"
    store.journal_path.write_bytes(b"{not json")
    assert store.read_journal() == {}
    atomic_write_bytes(tmp_path / "x", b"abc", mode=0o600)
    assert (tmp_path / "x").read_bytes() == b"abc"
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
