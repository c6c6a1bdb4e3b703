"""agent/serving/httpbody.py: chunked and gzip/deflate request bodies, as a table of byte
streams fed in every split, and through the daemon's server on a real socket."""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.serving.http import HTTPLimits
from agent.serving.httpbody import (
    CHUNK_BYTES,
    CHUNKED,
    MAX_CHUNKS,
    MAX_RATIO,
    RATIO_FLOOR,
    Charge,
    ChunkedDecoder,
    ProtocolError,
    decode_content,
    transfer_length,
)
from tests.helpers import Echo, ServerThread, body_of, read_response, status_of, unix_conn


def chunked(body: bytes, size: int = 7, trailer: bytes = b"") -> bytes:
    out = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n" + trailer + b"\r\n"


def feed_all(dec: ChunkedDecoder, stream: bytes, cuts: list[int]) -> int:
    """Feed ``stream`` split at ``cuts`` as a server would (unconsumed bytes kept)."""
    buf = b""
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        buf += stream[pos:cut]
        pos = max(pos, cut)
        used = dec.feed(buf)
        buf = buf[used:]
        if dec.done:
            return len(buf) + len(stream) - pos  # bytes of the stream not consumed
    return -1


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=300),
    st.integers(1, 40),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_chunked_decodes_in_any_split(body: bytes, size: int, cuts: list[int]) -> None:
    stream = chunked(body, size, b"X-T: 1\r\n") + b"NEXT"
    dec = ChunkedDecoder(1000)
    left = feed_all(dec, stream, [c for c in cuts if c <= len(stream)])
    assert dec.done and bytes(dec.body) == body and left == 4  # "NEXT" stays unread


@pytest.mark.parametrize(
    ("stream", "status", "code"),
    [
        (b"g\r\n", 400, "bad-chunk"),
        (b"\r\n", 400, "bad-chunk"),
        (b"3\r\nabcX\r\n", 400, "bad-chunk"),
        (b"1" * 17 + b"\r\n", 400, "bad-chunk"),
        (b"11\r\n", 413, "payload-too-large"),
        (b"8\r\n12345678\r\n8\r\n", 413, "payload-too-large"),
        (b"0\r\n" + b"X: y\r\n" * 40, 431, "headers-too-large"),
        (b"1" * 5000, 400, "bad-chunk"),
    ],
)
def test_chunked_errors(stream: bytes, status: int, code: str) -> None:
    dec = ChunkedDecoder(15, max_trailer=100)
    with pytest.raises(ProtocolError) as ei:
        dec.feed(stream)
    assert (ei.value.status, ei.value.code) == (status, code)


def test_transfer_length() -> None:
    assert transfer_length({"transfer-encoding": "Chunked"}, 10) == CHUNKED
    assert transfer_length({"content-length": "7"}, 10) == 7
    assert transfer_length({}, 10) == 0


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some clients send
        ("identity", lambda b: b),
        ("gzip, deflate", lambda b: zlib.compress(gzip.compress(b))),
    ],
)
def test_content_codings(coding: str, pack: object) -> None:
    body = b'{"inputs": []}' * 100
    assert callable(pack)
    assert bytes(decode_content({"content-encoding": coding}, pack(body), len(body))) == body


def test_zip_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 100_000
    with pytest.raises(ProtocolError) as ei:
        decode_content({"content-encoding": "gzip"}, bomb, 1 << 20)
    assert ei.value.status == 413


@pytest.mark.parametrize(
    ("coding", "data", "status", "code"),
    [
        ("br", b"x", 415, "unsupported-encoding"),
        ("gzip", b"not gzip", 400, "bad-encoding"),
        ("gzip", gzip.compress(b"abc" * 100, mtime=0)[:-10], 400, "bad-encoding"),
        ("gzip", gzip.compress(b"abc", mtime=0) + b"junk", 400, "bad-encoding"),
        ("deflate", b"\xff\xff\xff", 400, "bad-encoding"),
    ],
    ids=["unknown", "not-gzip", "truncated", "trailing-junk", "bad-deflate"],
)
def test_content_coding_errors(coding: str, data: bytes, status: int, code: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        decode_content({"content-encoding": coding}, data, 1000)
    assert (ei.value.status, ei.value.code) == (status, code)


# --- through the server ---------------------------------------------------------------


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path / "b.sock", Echo(), limits=HTTPLimits(max_body_bytes=1 << 20))
    yield s
    s.close()


def _sum(b: bytes) -> int:
    return sum(b[:1000])


@pytest.mark.parametrize(("size", "n"), [(1, 1000), (300, 256_000), (70_000, 256_000)])
def test_chunked_body_on_a_kept_alive_connection(srv: ServerThread, size: int, n: int) -> None:
    body = (bytes(range(256)) * 1000)[:n]
    s = unix_conn(srv.path)
    buf = bytearray()
    stream = chunked(body, size)
    s.sendall(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + stream[:5000])
    s.sendall(stream[5000:] + b"GET /after HTTP/1.1\r\n\r\n")
    r = read_response(s, buf)
    assert status_of(r) == 200 and body_of(r)["len"] == len(body)
    assert body_of(r)["sum"] == _sum(body)
    r = read_response(s, buf)
    assert body_of(r)["path"] == "/after"
    s.close()


def test_gzip_body_and_head(srv: ServerThread) -> None:
    body = json.dumps({"k": list(range(1000))}).encode()
    z = gzip.compress(body)
    s = unix_conn(srv.path)
    buf = bytearray()
    s.sendall(
        b"POST /z HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(z) + z
    )
    r = read_response(s, buf)
    assert status_of(r) == 200 and body_of(r)["len"] == len(body)
    # chunked and gzip together: the transfer coding first, then the content coding
    s.sendall(
        b"POST /zc HTTP/1.1\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(z, 333)
    )
    assert body_of(read_response(s, buf))["len"] == len(body)
    # HEAD: the headers with the body's length, no body; the connection stays usable
    s.sendall(b"HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\n\r\n")
    data = b""
    while data.count(b"\r\n\r\n") < 2 or not data.endswith(b"}"):
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head
    assert rest.startswith(b"HTTP/1.1 200")
    s.close()


def test_zip_bomb_over_the_socket_is_413(srv: ServerThread) -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))
    s = unix_conn(srv.path)
    s.sendall(
        b"POST /b HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb)
        + bomb
    )
    r = read_response(s, bytearray())
    assert status_of(r) == 413 and body_of(r)["code"] == "payload-too-large"
    s.close()
    s2 = socket.socket(socket.AF_UNIX)
    s2.connect(str(srv.path))  # the server keeps serving
    s2.close()


class _Budget:
    """A budget as agent.http.BodyBudget, counting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


def test_chunked_body_is_charged_and_released() -> None:
    budget = _Budget(1000)
    dec = ChunkedDecoder(10_000, budget=budget)
    dec.feed(chunked(b"x" * 600, 100))
    assert dec.done and budget.used == 600
    dec.release()
    dec.release()  # idempotent
    assert budget.used == 0
    over = ChunkedDecoder(10_000, budget=budget)
    with pytest.raises(ProtocolError) as ei:
        over.feed(chunked(b"x" * 1200, 100))
    assert (ei.value.status, ei.value.code) == (503, "body-budget")
    assert ei.value.retry_after is not None
    over.release()
    assert budget.used == 0


def test_one_byte_chunks_stop_at_the_chunk_cap() -> None:
    dec = ChunkedDecoder(1 << 20)
    with pytest.raises(ProtocolError) as ei:
        dec.feed(chunked(b"y" * 5000, 1))
    assert (ei.value.status, ei.value.code) == (413, "too-many-chunks")
    assert len(dec.body) == MAX_CHUNKS + MAX_CHUNKS // CHUNK_BYTES  # where it stopped
    big = ChunkedDecoder(1 << 20)
    big.feed(chunked(b"y" * 500_000, CHUNK_BYTES))  # chunks of the ratio's size: any number
    assert big.done


def test_inflated_body_is_charged_and_ratio_capped() -> None:
    budget = _Budget(1 << 30)
    charge = Charge(budget)
    body = bytes(range(256)) * 4000  # ~1 MB, compresses ~250x
    out = decode_content({"content-encoding": "gzip"}, gzip.compress(body), 1 << 30, charge)
    assert bytes(out) == body and budget.used == len(body)
    charge.release()
    assert budget.used == 0
    bomb = zlib.compress(bytes(RATIO_FLOOR * 2))  # under max_body, ~1000x
    with pytest.raises(ProtocolError) as ei:
        decode_content({"content-encoding": "deflate"}, bomb, 1 << 30, Charge(budget))
    assert ei.value.status == 413 and f"more than {MAX_RATIO}x" in ei.value.message
    small = Charge(_Budget(1000))
    with pytest.raises(ProtocolError) as ei:
        decode_content({"content-encoding": "gzip"}, gzip.compress(body), 1 << 30, small)
    assert ei.value.code == "body-budget"
