"""Issue #13 items 14 and 15: a rolled-back version stays refused (mark-bad) and one
model's candidate never blocks another; local faults (disk full, device key with wrong
permissions, a misspelled execution provider) are retried after a backoff and reported
with what to fix, the package kept in place."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import (
    ConfigError,
    KeyFileError,
    PreflightError,
    SignatureError,
    WorkerError,
    local_fault,
)
from agent.keys import generate_key
from tests.daemon_util import (
    ROOT,
    make_package,
    needs_worker,
    signing_key,
    start_daemon,
    write_config,
)
from tests.helpers import drop_in_inbox, updater_setup


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("pkgs")
    key, trust = signing_key(work)
    out = {"trust": trust, "key": key}
    for v, scale in (("1", 2.0), ("2", 3.0), ("3", 4.0)):
        out[v] = make_package(work, key, "tiny", v, scale=scale)
    out["other-1"] = make_package(work, key, "other", "1")
    return out


def test_whose_fault() -> None:
    assert local_fault(PreflightError("x", code="disk-space")) is not None
    assert local_fault(KeyFileError("x", code="key-permissions")) is not None
    assert local_fault(KeyFileError("x", code="key-read")) is not None  # unreadable key
    assert local_fault(WorkerError("x", code="config-runtime")) is not None
    assert local_fault(WorkerError("x", code="provider-unavailable")) is not None
    assert local_fault(OSError(13, "Permission denied")) is not None
    assert local_fault(ConfigError("typo")) is not None
    assert local_fault(WorkerError("x", code="config")) is not None  # from a worker child
    assert local_fault(OSError(28, "No space left on device")) is not None
    assert local_fault(SignatureError("x", code="bad-signature")) is None
    assert local_fault(WorkerError("x", code="self-test")) is None
    assert local_fault(RecursionError()) is None


def test_rollback_with_newer_package_still_in_inbox(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    async def go() -> None:
        _cfg, store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
        drop_in_inbox(tmp_path, pkgs["1"])
        assert (await up.check()).installed == {"tiny": "1"}
        drop_in_inbox(tmp_path, pkgs["2"])
        assert (await up.check()).installed == {"tiny": "2"}
        await up.rollback("tiny")
        assert store.current("tiny") == "1" and up.is_bad("tiny", "2")
        for _ in range(3):  # tiny-2.emp is still in the inbox: no failure, no loop
            res = await up.check()
            assert res.failed == {} and res.unchanged == ["tiny"]
            assert (store.current("tiny"), store.previous("tiny")) == ("1", "2")
        # another model dropped in later installs
        drop_in_inbox(tmp_path, pkgs["other-1"])
        res = await up.check()
        assert res.installed == {"other": "1"} and res.failed == {}
        # the refusal survives a restart (journal)
        _cfg, store, _reg, up2, _made = updater_setup(tmp_path, pkgs["trust"])
        assert up2.is_bad("tiny", "2")
        assert json.loads(store.journal_path.read_text())["models"]["tiny"]["bad"]["2"]
        # until a newer version appears
        drop_in_inbox(tmp_path, pkgs["3"])
        res = await up2.check()
        assert res.installed == {"tiny": "3"}, res.to_dict()

    asyncio.run(go())


def test_one_model_failing_never_blocks_another(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    async def go() -> None:
        _cfg, store, _reg, up, _made = updater_setup(
            tmp_path, pkgs["trust"], fail={"2": "self_test"}
        )
        drop_in_inbox(tmp_path, pkgs["1"])
        await up.check()
        # a half-installed directory of the candidate in the way, and a failing self-test
        (store.models_dir / "tiny" / "versions" / "2").mkdir(parents=True)
        drop_in_inbox(tmp_path, pkgs["2"])
        drop_in_inbox(tmp_path, pkgs["other-1"])
        res = await up.check()
        assert "tiny" in res.failed and "self-test" in res.failed["tiny"]
        assert res.installed == {"other": "1"}
        assert store.current("tiny") == "1"

    asyncio.run(go())


def test_device_key_permissions_deferred_not_rejected(
    tmp_path: Path, pkgs: dict[str, Path]
) -> None:
    async def go() -> None:
        cfg, store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
        keys = tmp_path / "devkeys"
        kp = generate_key("device", keys)
        os.chmod(kp.private, 0o644)  # the operator's mistake
        object.__setattr__(cfg.paths, "keys_dir", keys)
        drop_in_inbox(tmp_path, pkgs["1"])
        res = await up.check()
        assert "key-permissions" in res.failed["tiny"]
        res = await up.check()  # backing off: reported, not tried
        assert "key-permissions" in res.deferred["tiny"] and "tiny" not in res.failed
        m = up.machines["tiny"]
        assert m.fix and "chmod 600" in m.fix and m.retries == 1  # 2nd check: backing off
        assert up.deferred("tiny") > 0
        assert (tmp_path / "inbox" / "tiny-1.emp").exists()
        assert not list((tmp_path / "inbox").glob("*.rejected*"))
        assert "to fix" in (m.error or "")
        os.chmod(kp.private, 0o600)
        res = await up.check()  # still backing off
        assert res.installed == {} and store.current("tiny") is None
        res = await up.check(retry_deferred=True)  # the operator asks: now
        assert res.installed == {"tiny": "1"}
        assert (m.retries, m.fix) == (0, None)

    asyncio.run(go())


_DISK_SCRIPT = """
import asyncio, json, subprocess, sys
from pathlib import Path
from tests.helpers import drop_in_inbox, updater_setup
tmp, trust, pkg, mnt = (Path(a) for a in sys.argv[1:5])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
(mnt / "state").mkdir()
(tmp / "state").symlink_to(mnt / "state")

async def go():
    _cfg, store, _reg, up, _made = updater_setup(tmp, trust)
    object.__setattr__(up.cfg.updates, "retry_backoff", 0.0)
    drop_in_inbox(tmp, pkg)
    first = (await up.check()).to_dict()
    kept = (tmp / "inbox" / pkg.name).exists()
    fix = up.machines["tiny"].fix
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
    second = (await up.check()).to_dict()
    print(json.dumps({"first": first, "kept": kept, "fix": fix, "second": second,
                      "current": store.current("tiny")}))

asyncio.run(go())
"""


def test_disk_full_is_retried(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    """A real 1 MiB filesystem under the state directory (tmpfs in a private mount
    namespace), then grown: the package waits in the inbox and installs."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root (a private mount namespace with a tmpfs)")
    (tmp_path / "mnt").mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _DISK_SCRIPT,
         str(tmp_path), str(pkgs["trust"]), str(pkgs["1"]), str(tmp_path / "mnt")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    if proc.returncode != 0 and "mount" in proc.stderr and "permission" in proc.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "disk-space" in out["first"]["failed"]["tiny"], out
    assert out["kept"] and "disk space" in out["fix"]
    assert out["second"]["installed"] == {"tiny": "1"} and out["current"] == "1"


@needs_worker
@pytest.mark.e2e
def test_daemon_provider_unavailable_then_rollback_and_other_model(
    tmp_path: Path, pkgs: dict[str, Path]
) -> None:
    """Real daemon: an execution provider the box lacks defers the update (package kept,
    status says what to fix); fixed by a reload, it installs. A rollback with the newer
    package still in the inbox: checks stay clean and a second model installs."""
    work = tmp_path / "w"
    cfg = write_config(work, trust_dir=pkgs["trust"])
    text = cfg.read_text()
    good = "onnx = { intra_op_threads = 1, inter_op_threads = 1 }"
    # a provider this onnxruntime knows but this box lacks, with the "error" policy: the
    # worker refuses to start (a typo is refused when the config loads, before this)
    lacking = good.replace(
        " }", ', providers = ["CUDAExecutionProvider"], unavailable_providers = "error" }'
    )
    cfg.write_text(text.replace(good, lacking))
    d = start_daemon(work, config=cfg)
    try:
        shutil.copy(pkgs["1"], d.inbox / "tiny-1.emp")
        r = d.cli("check", "--json")
        assert r.returncode == 1, r.stderr  # a failure to report, not a daemon error
        failed = json.loads(r.stdout)["failed"]
        assert "tiny" in failed and "CUDAExecutionProvider" in failed["tiny"], r.stdout
        assert (d.inbox / "tiny-1.emp").exists() and not list(d.inbox.glob("*.rejected"))
        st = json.loads(d.cli("status", "--json").stdout)
        assert "runtime.onnx.providers" in st["updates"]["tiny"]["fix"]
        assert "to fix" in d.log()
        cfg.write_text(text)
        os.kill(d.proc.pid, signal.SIGHUP)  # reload: retried now, not after the backoff
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = json.loads(d.cli("status", "--json").stdout)
            if st["models"].get("tiny") == "1":
                break
            time.sleep(0.3)
        assert st["models"].get("tiny") == "1", d.log()
        shutil.copy(pkgs["2"], d.inbox / "tiny-2.emp")
        assert json.loads(d.cli("check", "--json").stdout)["installed"] == {"tiny": "2"}
        r = d.cli("rollback", "tiny")
        assert r.returncode == 0, r.stderr
        for _ in range(2):
            r = d.cli("check", "--json")
            assert r.returncode == 0 and json.loads(r.stdout)["failed"] == {}, r.stdout + r.stderr
        shutil.copy(pkgs["other-1"], d.inbox / "other-1.emp")
        res = json.loads(d.cli("check", "--json").stdout)
        assert res["installed"] == {"other": "1"} and res["failed"] == {}, res
        st = json.loads(d.cli("status", "--json").stdout)
        assert st["models"] == {"tiny": "1", "other": "1"}
        assert "2" in st["updates"]["tiny"]["bad"]
    finally:
        d.stop()


def test_stopping_abandons_reads_without_blame(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    """SIGTERM must not wait for a big package: every read the updater starts gives up
    at its next piece once the daemon stops, and nothing is refused or deferred for it."""
    from agent.errors import UpdateError
    from agent.keys import load_trusted
    from agent.package import unpack, verify

    trust = load_trusted([pkgs["trust"]])
    calls = []

    def hook(n: int) -> None:
        calls.append(n)
        raise UpdateError("stop", code="stopping")

    with pytest.raises(UpdateError):
        verify(pkgs["1"], trust, progress=hook)
    with pytest.raises(UpdateError):
        unpack(pkgs["1"], tmp_path / "out", trust=trust, progress=hook)
    assert calls and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    async def go() -> None:
        _cfg, store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
        drop_in_inbox(tmp_path, pkgs["1"])
        up.stop()
        with pytest.raises(UpdateError) as ei:  # the check itself gives up
            await up.check()
        assert ei.value.code == "stopping"
        assert (tmp_path / "inbox" / "tiny-1.emp").exists()
        assert not list((tmp_path / "inbox").glob("*.rejected*"))
        assert store.current("tiny") is None and not up.is_bad("tiny", "1")
        # the next start (a fresh updater) installs it
        _cfg, store, _reg, up2, _made = updater_setup(tmp_path, pkgs["trust"])
        assert (await up2.check()).installed == {"tiny": "1"}

    asyncio.run(go())
