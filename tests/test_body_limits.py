"""Chunked and compressed request bodies are held to the limits of plain ones, against a
real daemon's inference socket, lent (the worker reads the body, agent/serving/direct.py) and
relayed (the daemon reads it, agent/serving/http.py): decompression bombs (nested gzip to
1 GiB, deflate past the expansion ratio), a chunked body over ``max_body_bytes``, a
stream of 1-byte chunks, and chunked or gzip bodies that together pass the body budget.
Every refusal is one line, and the model keeps serving."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.serving.httpbody import MAX_RATIO
from tests.daemon_util import DaemonProc, start_daemon
from tests.text_models import string_model_dir

pytestmark = pytest.mark.e2e

MAX_BODY = 4 << 20  # bytes; the budget is the same (the least the config accepts)
PATH = b"/v2/models/text/infer"


@pytest.fixture(scope="module", params=[True, False], ids=["lent", "relayed"])
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProc]:
    root = tmp_path_factory.mktemp("limits")
    d = start_daemon(
        root / "w",
        [string_model_dir(root / "src", "text", "1")],
        lend=request.param,
        limits={"max_body_bytes": MAX_BODY, "max_inflight_body_bytes": MAX_BODY},
    )
    yield d
    d.stop()


def _doc(n: int) -> bytes:
    """A valid request for the text model of about ``n`` bytes."""
    words = [f"wörd-{i:07d}" for i in range(max(1, n // 16))]
    return json.dumps(
        {"inputs": [{"name": "s", "shape": [len(words)], "datatype": "BYTES", "data": words}]}
    ).encode()


def _chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


def _connect(d: DaemonProc) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(str(d.infer_sock))
    return s


def _answer(s: socket.socket) -> tuple[int, dict[str, Any]]:
    """One response: (status, JSON body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(65536)
        assert got, f"connection closed without an answer: {buf[:200]!r}"
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < n:
        got = s.recv(65536)
        assert got
        rest += got
    return int(head.split(b" ")[1]), json.loads(rest[:n])


def _send(s: socket.socket, data: bytes) -> None:
    """Send what the server reads; it may answer and close before reading all of it."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(data)


def _request(d: DaemonProc, headers: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    s = _connect(d)
    try:
        _send(s, b"POST " + PATH + b" HTTP/1.1\r\n" + headers + b"\r\n" + body)
        return _answer(s)
    finally:
        s.close()


def _serves(d: DaemonProc) -> None:
    body = _doc(100)
    status, doc = _request(d, b"Content-Length: %d\r\n" % len(body), body)
    assert status == 200, doc
    assert doc["outputs"][0]["data"] == json.loads(body)["inputs"][0]["data"]


def _peak_rss(d: DaemonProc) -> dict[int, int]:
    """VmHWM (peak resident bytes) of the daemon and each of its children."""
    procs = [psutil.Process(d.proc.pid), *psutil.Process(d.proc.pid).children(recursive=True)]
    out = {}
    for p in procs:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out[p.pid] = int(line.split()[1]) * 1024
    return out


def _gzip_of_zeros(n_mib: int) -> bytes:
    """A valid gzip member of ``n_mib`` MiB of zeros, built in milliseconds: after a full
    flush the compressor's output for the next MiB of zeros repeats byte for byte."""
    block = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(block) + c.flush(zlib.Z_FULL_FLUSH) == again  # it does repeat
    last = c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(n_mib):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03"
    trailer = struct.pack("<II", crc, (n_mib << 20) & 0xFFFFFFFF)
    return header + first + again * (n_mib - 1) + last + trailer


def test_the_bomb_builder_is_a_real_gzip() -> None:
    assert gzip.decompress(_gzip_of_zeros(5)) == bytes(5 << 20)


def test_nested_gzip_bomb_is_413_without_allocating_it(daemon: DaemonProc) -> None:
    bomb = gzip.compress(_gzip_of_zeros(1024))  # 1 GiB of zeros in a few KiB
    assert len(bomb) < 16 * 1024
    before = _peak_rss(daemon)
    status, doc = _request(
        daemon, b"Content-Encoding: gzip, gzip\r\nContent-Length: %d\r\n" % len(bomb), bomb
    )
    assert status == 413 and doc["code"] == "payload-too-large", doc
    assert "\n" not in doc["error"] and "gzip-decoded request body" in doc["error"]
    after = _peak_rss(daemon)
    for pid, peak in after.items():  # nobody's peak moved by more than the cap, far from 1 GiB
        assert peak - before.get(pid, 0) < 3 * MAX_BODY, (pid, peak, before.get(pid))
    _serves(daemon)


def test_deflate_bomb_is_refused_by_the_expansion_ratio(daemon: DaemonProc) -> None:
    # 3 MiB of zeros is under max_body_bytes but ~1000 times its deflate size.
    bomb = zlib.compress(bytes(3 << 20), 9)
    assert MAX_RATIO * len(bomb) < (3 << 20) < MAX_BODY
    status, doc = _request(
        daemon, b"Content-Encoding: deflate\r\nContent-Length: %d\r\n" % len(bomb), bomb
    )
    assert status == 413 and doc["code"] == "payload-too-large", doc
    assert f"more than {MAX_RATIO}x" in doc["error"] and "\n" not in doc["error"]
    # a compressible body under the ratio goes through, deflate and gzip
    body = _doc(2 << 20)
    for coding, z in (("deflate", zlib.compress(body)), ("gzip", gzip.compress(body))):
        status, doc = _request(
            daemon,
            b"Content-Encoding: %s\r\nContent-Length: %d\r\n" % (coding.encode(), len(z)),
            z,
        )
        assert status == 200, doc
        assert len(doc["outputs"][0]["data"]) == len(json.loads(body)["inputs"][0]["data"])


def test_chunked_body_over_the_limit_is_413(daemon: DaemonProc) -> None:
    status, doc = _request(
        daemon, b"Transfer-Encoding: chunked\r\n", _chunked(bytes(MAX_BODY + 1), 64 * 1024)
    )
    assert (status, doc["code"]) == (413, "payload-too-large"), doc
    assert f"limit of {MAX_BODY} bytes" in doc["error"]
    _serves(daemon)


def test_many_one_byte_chunks_are_refused_early(daemon: DaemonProc) -> None:
    # 100 KiB of 1-byte chunks: ~600 KiB on the wire, refused after about a thousand.
    status, doc = _request(daemon, b"Transfer-Encoding: chunked\r\n", _chunked(_doc(100_000), 1))
    assert (status, doc["code"]) == (413, "too-many-chunks"), doc
    assert "send larger chunks" in doc["error"]
    # the same body in 4 KiB chunks is served
    body = _doc(100_000)
    status, doc = _request(daemon, b"Transfer-Encoding: chunked\r\n", _chunked(body, 4096))
    assert status == 200, doc
    _serves(daemon)


@pytest.mark.parametrize("second", ["chunked", "gzip"])
def test_chunked_and_gzip_bodies_are_charged_to_the_budget(daemon: DaemonProc, second: str) -> None:
    """One chunked body held open at 3.5 MiB, then a second body of 1.5 MiB (chunked, or
    gzip that decodes to it): together past the 4 MiB budget → 503, Retry-After."""
    held = _connect(daemon)
    try:
        held.sendall(b"POST " + PATH + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        # No end chunk: the body stays in flight. sendall returns once the server has
        # read all but a socket buffer (~208 KiB) of it: ≥ 3.2 MiB are charged by now.
        held.sendall(_chunked(bytes(7 << 19), 64 * 1024)[: -len(b"0\r\n\r\n")])
        body = _doc(3 << 19)
        if second == "chunked":
            status, doc = _request(daemon, b"Transfer-Encoding: chunked\r\n", _chunked(body, 8192))
        else:
            z = gzip.compress(body)
            assert len(z) < (1 << 20)  # the bytes received alone fit in the budget
            status, doc = _request(
                daemon, b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(z), z
            )
        assert (status, doc["code"]) == (503, "body-budget"), doc
        assert "retry later" in doc["error"]
    finally:
        held.close()
    # The held body's bytes went back to the budget when its connection closed.
    for _ in range(200):
        status, doc = _request(daemon, b"Transfer-Encoding: chunked\r\n", _chunked(body, 8192))
        if status != 503:
            break
    assert status == 200, doc
