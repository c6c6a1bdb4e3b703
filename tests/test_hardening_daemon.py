"""Issue #13 items 13 and 16: one daemon per state directory (flock, checked before
anything is loaded), and socket groups a user namespace does not map (systemd's
``PrivateUsers=yes``) refused with a message naming the group and the fix."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import unmapped_group
from agent.errors import StoreError
from agent.store import Store
from tests.daemon_util import ROOT, start_daemon, write_config


def test_store_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "state"), Store(tmp_path / "state")
    fd = a.lock()
    with pytest.raises(StoreError) as ei:
        b.lock()
    assert ei.value.code == "store-locked" and f"pid {os.getpid()}" in ei.value.message
    os.close(fd)
    os.close(b.lock())  # free again once the holder let go
    # the lock file is never followed if someone planted a link there
    os.unlink(tmp_path / "state" / ".lock")
    (tmp_path / "state" / ".lock").symlink_to(tmp_path / "victim")
    with pytest.raises(StoreError) as ei:
        a.lock()
    assert ei.value.code == "store-lock" and not (tmp_path / "victim").exists()


@pytest.mark.e2e
def test_second_daemon_refused_before_touching_anything(tmp_path: Path) -> None:
    """Two real daemon processes on one state directory: the second exits with one
    clear line and the first one's staging and sockets are untouched."""
    work = tmp_path / "w"
    d1 = start_daemon(work)
    try:
        marker = d1.state_dir / "staging" / "in-progress"
        marker.mkdir()
        cfg2 = tmp_path / "second.toml"
        text = d1.config.read_text()
        # its own sockets, so the only thing shared is the state directory
        run2 = tmp_path / "r2"
        run2.mkdir()
        text = text.replace(str(d1.infer_sock), str(run2 / "i.sock"))
        text = text.replace(str(d1.control_sock), str(run2 / "c.sock"))
        cfg2.write_text(text)
        r = subprocess.run(
            [sys.executable, "-m", "agent", "agent", "--config", str(cfg2)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=False,
        )
        assert r.returncode != 0
        assert "store-locked" in r.stderr and f"pid {d1.proc.pid}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert marker.is_dir(), "the second daemon wiped the first one's staging"
        assert not (run2 / "i.sock").exists() and not (run2 / "c.sock").exists()
        assert d1.cli("status").returncode == 0  # the first one is unaffected
    finally:
        d1.stop()
    # after the first stopped, a daemon starts on that directory again
    d2 = start_daemon(work, config=d1.config)
    d2.stop()


def test_unmapped_group_message() -> None:
    pu = "0 0 1\n1000 1000 1\n"  # what a user namespace like PrivateUsers=yes maps
    assert unmapped_group(0, "root", "inference.group", pu) is None
    assert unmapped_group(1000, "edgeward", "inference.group", pu) is None
    why = unmapped_group(998, "edgeward-admin", "control.admin_group", pu)
    assert why is not None and "edgeward-admin" in why and "PrivateUsers" in why
    assert "control.admin_group" in why
    assert unmapped_group(998, "x", "k", "0 0 4294967295\n") is None  # no namespace


def _other_group() -> str:
    for name in ("daemon", "bin", "sys", "adm", "nogroup"):
        try:
            if grp.getgrnam(name).gr_gid != os.getgid():
                return name
        except KeyError:
            continue
    pytest.skip("no group other than the current one exists here")


def _userns_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "true"], capture_output=True, check=False
    )
    return r.returncode == 0


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["group", "admin_group"])
def test_daemon_in_user_namespace(tmp_path: Path, key: str) -> None:
    """The unit's combination (PrivateUsers=yes with the daemon's own group on the
    sockets) starts; any other group is refused with a message naming it and the fix,
    not ``[os] Errno 22``. Simulated with ``unshare --user --map-root-user`` (only the
    daemon's own uid/gid mapped, as PrivateUsers=yes does)."""
    if not _userns_ok():
        pytest.skip("unshare --user is not available here")
    other = _other_group()
    own = grp.getgrgid(os.getgid()).gr_name
    for group, ok in ((own, True), (other, False)):
        work = tmp_path / f"{group}"
        kw = {"group": group} if key == "group" else {"admin_group": group}
        if key == "admin_group":
            kw["control_mode"] = "0660"
        cfg = write_config(work, **kw)  # type: ignore[arg-type]
        r = subprocess.run(
            ["unshare", "--user", "--map-root-user", sys.executable, "-c",
             "import sys, asyncio\n"
             "from agent.config import load_config\n"
             "from agent.daemon import Daemon\n"
             "async def main():\n"
             "    d = Daemon(load_config(__import__('pathlib').Path(sys.argv[1])))\n"
             "    try:\n"
             "        await d.startup()\n"
             "    finally:\n"
             "        await d.shutdown()\n"
             "    print('STARTED')\n"
             "asyncio.run(main())\n",
             str(cfg)],
            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        )  # fmt: skip
        if ok:
            assert r.returncode == 0 and "STARTED" in r.stdout, r.stderr[-2000:]
        else:
            assert r.returncode != 0
            assert "Errno 22" not in r.stderr
            assert f"group {other!r}" in r.stderr and "PrivateUsers" in r.stderr, r.stderr[-2000:]
            # and through the CLI: one line
            r2 = subprocess.run(
                ["unshare", "--user", "--map-root-user", sys.executable, "-m", "agent", "agent",
                 "--config", str(cfg)],
                capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
            )  # fmt: skip
            assert r2.returncode == 2 and "Traceback" not in r2.stderr, r2.stderr[-2000:]
            assert "[config-group]" in r2.stderr and "PrivateUsers" in r2.stderr
