"""The gRPC gateway's lifecycle and limits, and the config of the extra listeners:
a gateway killed with SIGKILL comes back, messages over max_body_bytes are refused,
hostile connections get GOAWAY while the gateway serves on,
a missing extra is one clear line, tcp_listen refuses non-loopback addresses."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from agent.serving.h2 import PREFACE
from tests.daemon_util import ROOT, DaemonProc, run_dir, start_daemon, tiny_model_dir


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack("!HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _gateway_pids(d: DaemonProc) -> list[int]:
    pids = []
    for k in psutil.Process(d.proc.pid).children():
        try:  # a child may exit (or be a zombie not yet reaped) while we look
            if "agent.grpc_v2" in " ".join(k.cmdline()):
                pids.append(k.pid)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return pids


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, Path]]:
    root = tmp_path_factory.mktemp("gw")
    work = root / "w"
    sock = run_dir(work) / "grpc.sock"
    d = start_daemon(
        work,
        [tiny_model_dir(root / "src", "tiny", "1")],
        limits={"max_body_bytes": 65536, "header_timeout_s": 2.0},
        extra=f'[grpc]\nenabled = true\nsocket = "{sock}"\n',
    )
    yield d, sock
    d.stop()


@pytest.mark.e2e
def test_messages_over_the_body_limit_are_refused(small: tuple[DaemonProc, Path]) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    _d, sock = small
    c = grpcclient.InferenceServerClient(f"unix:{sock}")
    x = grpcclient.InferInput("x", [8192, 4], "FP32")  # 128 KiB > 64 KiB
    x.set_data_from_numpy(np.zeros((8192, 4), np.float32))
    with pytest.raises(InferenceServerException) as ei:
        c.infer("tiny", [x])
    assert "RESOURCE_EXHAUSTED" in str(ei.value.status())
    ok = grpcclient.InferInput("x", [1, 4], "FP32")
    ok.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert c.infer("tiny", [ok]).as_numpy("y").tolist() == [[2.0] * 4]
    c.close()


@pytest.mark.e2e
def test_a_killed_gateway_is_restarted(small: tuple[DaemonProc, Path]) -> None:
    import tritonclient.grpc as grpcclient

    d, sock = small
    (pid,) = _gateway_pids(d)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = _gateway_pids(d)
        if pids and pids != [pid] and sock.exists():
            try:
                c = grpcclient.InferenceServerClient(f"unix:{sock}")
                if c.is_server_live():
                    c.close()
                    break
            except Exception:
                pass
        time.sleep(0.2)
    else:
        pytest.fail(f"the gateway did not come back:\n{d.log()}")
    assert "grpc gateway exited" in d.log()


@pytest.mark.e2e
def test_sigterm_stops_the_gateway_and_removes_its_socket(tmp_path: Path) -> None:
    sock = run_dir(tmp_path / "w") / "grpc.sock"
    d = start_daemon(tmp_path / "w", extra=f'[grpc]\nenabled = true\nsocket = "{sock}"\n')
    (pid,) = _gateway_pids(d)
    assert sock.exists()
    assert d.stop() == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not sock.exists()


def test_missing_extra_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys, runpy; sys.modules['hpack'] = None; "
        "runpy.run_module('agent.grpc_v2', run_name='__main__')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "--socket", str(tmp_path / "g.sock"), "--upstream", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgeward[grpc]'" in lines[0]


@pytest.mark.parametrize(
    ("listen", "allow", "ok"),
    [
        ("127.0.0.1:8000", False, True),
        ("[::1]:8000", False, True),
        ("localhost:8000", False, True),
        ("0.0.0.0:8000", False, False),
        ("192.168.1.5:8000", False, False),
        ("192.168.1.5:8000", True, True),
        ("127.0.0.1", False, False),
        ("127.0.0.1:99999", False, False),
        ("host.example:80", True, False),
    ],
)
def test_tcp_listen_is_loopback_unless_allowed(listen: str, allow: bool, ok: bool) -> None:
    doc = {"inference": {"tcp_listen": listen, "tcp_allow_non_loopback": allow}}
    if ok:
        assert parse_config(doc).inference.tcp_listen == listen
    else:
        with pytest.raises(ConfigError) as ei:
            parse_config(doc)
        assert "inference.tcp_listen" in ei.value.message


def test_grpc_section() -> None:
    cfg = parse_config({})
    assert cfg.grpc.enabled is False
    cfg = parse_config({"grpc": {"enabled": True, "socket": "/run/x/g.sock"}})
    assert cfg.grpc.enabled and str(cfg.grpc.socket) == "/run/x/g.sock"
    with pytest.raises(ConfigError, match=r"grpc\.socket"):
        parse_config({"grpc": {"socket": "/run/edgeward/infer.sock"}})
    with pytest.raises(ConfigError, match=r"unknown key grpc\.port"):
        parse_config({"grpc": {"port": 1}})


def _read_frames(s: socket.socket) -> list[tuple[int, int, int, bytes]]:
    """Frames until the server closes the connection."""
    data = b""
    s.settimeout(60)
    while chunk := s.recv(65536):
        data += chunk
    out, pos = [], 0
    while pos + 9 <= len(data):
        hi, lo, ftype, flags, sid = struct.unpack_from("!HBBBL", data, pos)
        n = (hi << 8) | lo
        out.append((ftype, flags, sid, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 0x1),  # not HTTP/2: PROTOCOL_ERROR
        # a header block that decodes past max_header_bytes: ENHANCE_YOUR_CALM
        (
            PREFACE
            + _frame(4, 0, 0)
            + _frame(1, 0x5, 1, b"\x40\x05x-big\x7f\xa1\x1e" + b"v" * 4000 + b"\xbe" * 8000),
            0xB,
        ),
    ],
    ids=["bad-preface", "hpack-bomb"],
)
def test_hostile_connections_get_goaway_and_the_gateway_serves_on(
    small: tuple[DaemonProc, Path], payload: bytes, code: int
) -> None:
    import tritonclient.grpc as grpcclient

    _d, sock = small
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(payload)
        frames = _read_frames(s)
    goaways = [f for f in frames if f[0] == 7]
    assert len(goaways) == 1 and struct.unpack_from("!L", goaways[0][3], 4)[0] == code
    c = grpcclient.InferenceServerClient(f"unix:{sock}")
    ok = grpcclient.InferInput("x", [1, 4], "FP32")
    ok.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert c.infer("tiny", [ok]).as_numpy("y").tolist() == [[2.0] * 4]
    c.close()


@pytest.mark.e2e
def test_an_incomplete_header_block_is_closed_after_header_timeout(
    small: tuple[DaemonProc, Path],
) -> None:
    """A client that starts a header block and never ends it (slowloris) gets GOAWAY
    and the close once the inference socket's header_timeout_s (2 s here) runs out."""
    _d, sock = small
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(PREFACE + _frame(4, 0, 0) + _frame(1, 0, 1, b"\x83\x86"))  # no END_HEADERS
        frames = _read_frames(s)
    assert [f[0] for f in frames if f[0] == 7] == [7]
