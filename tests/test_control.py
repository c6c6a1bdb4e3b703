"""Who may talk to the daemon: socket modes and SO_PEERCRED, with a real second user."""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control import PeerCred, peer_allowed, peer_credentials
from tests.daemon_util import DaemonProc, start_daemon

OUTSIDER = "edgeward-test"  # no extra groups
ADMIN = "edgeward-tadm"  # primary group edgeward-tadm = the control socket's admin group


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None or os.geteuid() != 0:
        pytest.skip("useradd unavailable or not root: cannot create a second user")
    subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
         name],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    return _ensure_user(OUTSIDER), _ensure_user(ADMIN)


def _connect_as(user: pwd.struct_passwd, path: Path, request: bytes | None = None) -> str:
    """Fork, drop to ``user`` (uid, primary gid, no supplementary groups), connect.

    Returns "ok:<first response line>" or "errno:<name>". A forked child rather than
    runuser: this venv's interpreter lives under /root, which other users cannot enter.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            try:
                s.connect(str(path))
                msg = "ok:"
                if request is not None:
                    s.sendall(request)
                    msg += s.recv(65536).split(b"\r\n", 1)[0].decode(errors="replace")
            except OSError as exc:
                msg = f"errno:{errno.errorcode.get(exc.errno or 0, str(exc))}"
            os.write(w, msg.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_daemon(users: tuple[pwd.struct_passwd, pwd.struct_passwd]) -> Iterator[DaemonProc]:
    # pytest's tmp dirs are 0700: the second user would fail on the directory, not on the
    # socket. Use a traversable dir so the socket's own mode and owner are what is tested.
    work = Path(tempfile.mkdtemp(prefix="edgeward-ctl-"))
    os.chmod(work, 0o755)
    (work / "run").mkdir(mode=0o755)
    os.chmod(work / "run", 0o755)
    try:
        d = start_daemon(work, [], group="", admin_group=ADMIN, control_mode="0660")
        try:
            yield d
        finally:
            d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


GET_STATUS = b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
GET_READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.e2e
def test_outsider_gets_eacces_admin_gets_in(
    shared_daemon: DaemonProc, users: tuple[pwd.struct_passwd, pwd.struct_passwd]
) -> None:
    outsider, admin = users
    d = shared_daemon
    assert d.infer_sock.stat().st_mode & 0o777 == 0o660
    assert d.infer_sock.stat().st_gid == os.getegid()
    assert d.control_sock.stat().st_gid == grp.getgrnam(ADMIN).gr_gid
    assert _connect_as(outsider, d.infer_sock, GET_READY) == "errno:EACCES"
    assert _connect_as(outsider, d.control_sock, GET_STATUS) == "errno:EACCES"
    # the admin group's member passes both the file mode and the SO_PEERCRED check ...
    assert _connect_as(admin, d.control_sock, GET_STATUS) == "ok:HTTP/1.1 200 OK"
    # ... but is not in the inference socket's group (root's here)
    assert _connect_as(admin, d.infer_sock, GET_READY) == "errno:EACCES"
    # root passes
    status = json.loads(d.cli("status", "--json").stdout)
    assert status["state"] == "serving"


def test_peer_allowed_rules(users: tuple[pwd.struct_passwd, pwd.struct_passwd]) -> None:
    outsider, admin = users
    assert peer_allowed(PeerCred(1, 0, 0), None)  # root
    assert peer_allowed(PeerCred(1, os.geteuid(), 12345), None)  # the daemon's own user
    assert not peer_allowed(PeerCred(1, outsider.pw_uid, outsider.pw_gid), None)
    assert not peer_allowed(PeerCred(1, outsider.pw_uid, outsider.pw_gid), ADMIN)
    assert peer_allowed(PeerCred(1, admin.pw_uid, admin.pw_gid), ADMIN)
    assert not peer_allowed(PeerCred(1, admin.pw_uid, admin.pw_gid), "no-such-group-x")


def test_peer_credentials_of_a_real_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = peer_credentials(a)
    assert cred == PeerCred(os.getpid(), os.geteuid(), os.getegid())


def test_dispatch_refuses_non_admin_peer(
    users: tuple[pwd.struct_passwd, pwd.struct_passwd],
) -> None:
    """Even if a socket's file mode were loosened by hand, SO_PEERCRED still decides."""
    import asyncio
    from types import SimpleNamespace

    from agent.config import Config
    from agent.control import ControlApp

    outsider, _admin = users
    app = ControlApp(SimpleNamespace(cfg=Config()))  # type: ignore[arg-type]
    status, ctype, body = asyncio.run(
        app.dispatch("GET", "/status", PeerCred(1, outsider.pw_uid, outsider.pw_gid))
    )
    assert status == 403 and ctype == "application/json"
    assert json.loads(body)["code"] == "forbidden"
    status, _c, body = asyncio.run(app.dispatch("GET", "/status", None))
    assert status == 403
