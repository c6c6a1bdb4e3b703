"""agent.serving.h1: the HTTP/1.1 core both servers drive, tested without sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.limits import HTTPLimits
from agent.serving import h1
from agent.serving.h1 import CHUNKED, Phase, ProtocolError, Response

LIM = HTTPLimits(max_header_bytes=256, max_headers=4, max_body_bytes=1000)


def head(raw: bytes) -> h1.Head:
    return h1.parse_request(raw, LIM)


def test_find_head_waits_then_finds_the_blank_line() -> None:
    buf = bytearray(b"POST /x HTTP/1.1\r\ncontent-length: 3\r\n")
    assert h1.find_head(buf, 0, len(buf), LIM) == -1
    old = len(buf)
    buf += b"\r\nabc"
    # searching from just before the old end finds a blank line split across reads
    assert h1.find_head(buf, old - 3, len(buf), LIM) == old - 2


def test_find_head_refuses_a_head_over_the_limit() -> None:
    buf = bytearray(b"GET / HTTP/1.1\r\nx: " + b"a" * 300)
    with pytest.raises(ProtocolError) as ei:
        h1.find_head(buf, 0, len(buf), LIM)
    assert (ei.value.status, ei.value.code) == (431, "headers-too-large")


def test_a_blank_line_past_the_limit_is_not_a_head() -> None:
    buf = bytearray(b"GET / HTTP/1.1\r\nx: " + b"a" * 300 + b"\r\n\r\n")
    with pytest.raises(ProtocolError) as ei:
        h1.find_head(buf, 0, len(buf), LIM)
    assert ei.value.status == 431


@pytest.mark.parametrize(
    ("raw", "keep"),
    [
        (b"GET / HTTP/1.1", True),
        (b"GET / HTTP/1.1\r\nConnection: close", False),
        (b"GET / HTTP/1.1\r\nconnection: Keep-Alive, Close", False),
        (b"GET / HTTP/1.0", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive", True),
    ],
)
def test_keep_alive_decision(raw: bytes, keep: bool) -> None:
    assert head(raw).keep_alive is keep


def test_a_head_is_parsed_and_judged() -> None:
    h = head(
        b"POST /v2/models/m%20x/infer?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
        b"Expect: 100-continue"
    )
    assert (h.method, h.path, h.query) == ("POST", "/v2/models/m x/infer", "a=1")
    assert h.version == "HTTP/1.1"
    assert h.headers == {"host": "x", "content-length": "12", "expect": "100-continue"}
    assert h.length == 12 and h.expect_continue
    assert head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked").length == CHUNKED
    assert head(b"GET / HTTP/1.1").length == 0


def test_repeated_headers_join_and_equal_lengths_pass() -> None:
    h = head(b"GET / HTTP/1.1\r\nA: 1\r\na: 2\r\nContent-Length: 5\r\nContent-Length: 5")
    assert h.headers["a"] == "1, 2" and h.length == 5


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /", 400, "bad-request-line"),
        (b"get / HTTP/1.1", 400, "bad-request-line"),
        (b"GET / HTTP/2.0", 505, "http-version"),
        (b"GET / FTP/1.1", 400, "bad-request-line"),
        (b"GET / HTTP/1.1\r\nno colon", 400, "bad-header"),
        (b"GET / HTTP/1.1\r\nbad name: x", 400, "bad-header"),
        (b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5", 431, "too-many-headers"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400, "bad-content-length"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked",
            400,
            "bad-content-length",
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip", 501, "transfer-encoding"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1001", 413, "payload-too-large"),
    ],
)
def test_protocol_errors(raw: bytes, status: int, code: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        head(raw)
    assert (ei.value.status, ei.value.code) == (status, code)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_head_or_a_protocol_error(raw: bytes) -> None:
    try:
        h = head(raw)
    except ProtocolError as exc:
        assert 400 <= exc.status < 600 and exc.code
    else:
        assert h.method.isupper() and h.version in ("HTTP/1.1", "HTTP/1.0")


def test_head_cache_hands_out_one_parse_and_stays_bounded() -> None:
    cache = h1.HeadCache(2)
    raw = b"GET /a HTTP/1.1"
    first = cache.parse(raw, LIM)
    assert cache.parse(raw, LIM) is first
    cache.parse(b"GET /b HTTP/1.1", LIM)
    cache.parse(b"GET /c HTTP/1.1", LIM)  # full: forgets, then keeps the new one
    assert len(cache) <= 2 and raw not in cache
    with pytest.raises(ProtocolError):
        cache.parse(b"nonsense", LIM)
    assert b"nonsense" not in cache


def test_phases_table() -> None:
    lim = HTTPLimits(keepalive_timeout_s=7, header_timeout_s=3, body_timeout_s=11)
    assert [h1.timeout(p, lim) for p in Phase] == [7.0, 3.0, 11.0, None, None, None]
    assert h1.expired(Phase.IDLE) is None  # an idle keep-alive connection closes silently
    head_err, body_err = h1.expired(Phase.HEAD), h1.expired(Phase.BODY)
    assert head_err is not None and (head_err.status, head_err.code) == (408, "header-timeout")
    assert body_err is not None and (body_err.status, body_err.code) == (408, "body-timeout")
    assert {p for p, rule in h1.PHASES.items() if rule.reads} == {
        Phase.IDLE,
        Phase.HEAD,
        Phase.BODY,
    }


def test_render_owns_the_framing() -> None:
    framing = {"Content-Length": "999", "Connection": "x", "transfer-encoding": "chunked"}
    resp = Response(200, {**framing, "a": "b"}, b"hi")
    (wire,) = h1.render_response(resp, keep_alive=True)
    assert wire == (
        b"HTTP/1.1 200 OK\r\na: b\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nhi"
    )
    (only,) = h1.render_response(resp, keep_alive=False, head_only=True)
    assert only.endswith(b"content-length: 2\r\nconnection: close\r\n\r\n")


def test_render_keeps_large_buffers_apart() -> None:
    big = bytearray(200_000)
    parts = h1.render_response(Response(200, {}, [b"x" * 10, memoryview(big)]), True)
    assert len(parts) == 3 and parts[2].nbytes == len(big)  # type: ignore[union-attr]
    assert b"content-length: 200010\r\n" in bytes(parts[0])
    (odd,) = h1.render_response(Response(299), True)
    assert odd.startswith(b"HTTP/1.1 299 Status 299\r\n")


def test_render_gather_keeps_small_parts_apart() -> None:
    """A writer with one sendmsg (a lent connection) gets a JSON body's parts as they are;
    the bytes on the wire are the same as joined."""
    body = [b'{"outputs":[{"name":"y","data":', b"[1.0,2.0]" * 100, b"}]}"]
    resp = Response(200, {"content-type": "application/json"}, body)
    (joined,) = h1.render_response(resp, True)
    parts = h1.render_response(resp, True, gather=True)
    assert len(parts) == 4 and parts[2] is body[1]
    assert b"".join(parts) == joined
    (one,) = h1.render_response(Response(200, {}, b"hi"), True, gather=True)
    assert one.endswith(b"\r\n\r\nhi")


def test_error_bytes_is_the_v2_error_and_closes() -> None:
    wire = h1.error_bytes(ProtocolError(503, "body-budget", "busy", retry_after=0.2))
    head_part, _, body = wire.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"retry-after: 1\r\n" in head_part + b"\r\n" and b"connection: close" in head_part
    assert json.loads(body) == {"error": "busy", "code": "body-budget"}


def test_bounded_cache_forgets_when_full() -> None:
    c: h1.BoundedCache[int, str] = h1.BoundedCache(3)
    for i in range(3):
        assert c.remember(i, str(i)) == str(i)
    c.remember(9, "9")
    assert dict(c) == {9: "9"}
