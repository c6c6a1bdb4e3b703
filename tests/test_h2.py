"""The HTTP/2 core for gRPC (agent/serving/h2.py) without sockets: the ``h2`` package's
client state machine as a conforming peer, then hand-made hostile frames (bad preface,
oversized frames, HPACK bombs, window overflow, too many streams, half-closed misuse)
and gRPC-level refusals. Every case checks the error code on the wire and, where the
connection survives, that the next call on it is still answered."""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.serving.h2 import PREFACE, Call, ErrorCode, H2Limits, H2Server, Status, grpc_timeout

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
GRPC_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/inference.GRPCInferenceService/ModelInfer"),
    (":authority", "localhost"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack("!HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        hi, lo, ftype, flags, sid = struct.unpack_from("!HBBBL", data, pos)
        n = (hi << 8) | lo
        out.append((ftype, flags, sid, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    assert pos == len(data)
    return out


def grpc_msg(body: bytes, flag: int = 0) -> bytes:
    return struct.pack("!BL", flag, len(body)) + body


class Raw:
    """A client that writes frames by hand (with a real HPACK encoder)."""

    def __init__(self, limits: H2Limits | None = None) -> None:
        self.srv = H2Server(limits)
        self.enc = hpack.Encoder()
        self.calls: list[Call] = []
        self.srv.data_to_send()
        self.send(PREFACE + frame(SETTINGS, 0, 0))

    def send(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        self.calls += self.srv.receive(data)
        return frames(self.srv.data_to_send())

    def headers(self, sid: int, end: bool = False, extra: list[Any] | None = None) -> bytes:
        block = self.enc.encode(GRPC_HEADERS + (extra or []))
        return frame(HEADERS, 0x4 | (0x1 if end else 0), sid, block)

    def request(self, sid: int, body: bytes) -> list[tuple[int, int, int, bytes]]:
        return self.send(self.headers(sid) + frame(DATA, 0x1, sid, grpc_msg(body)))

    def answer_and_check(self, sid: int) -> None:
        """A call on ``sid`` is answered: the connection is still sound."""
        self.calls.clear()
        self.request(sid, b"ping")
        assert [c.message for c in self.calls] == [b"ping"]
        self.srv.respond(sid, b"pong")
        out = frames(self.srv.data_to_send())
        assert [f[0] for f in out] == [HEADERS, DATA, HEADERS]
        assert out[1][3] == grpc_msg(b"pong")


def goaway_code(out: list[tuple[int, int, int, bytes]]) -> int:
    (g,) = [f for f in out if f[0] == GOAWAY]
    return int(struct.unpack_from("!L", g[3], 4)[0])


def rst_codes(out: list[tuple[int, int, int, bytes]]) -> dict[int, int]:
    return {f[2]: struct.unpack("!L", f[3])[0] for f in out if f[0] == RST_STREAM}


def trailers(out: list[tuple[int, int, int, bytes]], sid: int) -> dict[str, str]:
    """The grpc-status/grpc-message of the last HEADERS on ``sid``."""
    blocks = [f[3] for f in out if f[0] == HEADERS and f[2] == sid]
    fields = hpack.Decoder().decode(blocks[-1])
    return {str(k): str(v) for k, v in fields}


# --- a conforming peer: the h2 package's client ------------------------------------------


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    return c


def _pump(c: h2.connection.H2Connection, srv: H2Server) -> tuple[list[Call], list[Any]]:
    calls = srv.receive(c.data_to_send())
    return calls, c.receive_data(srv.data_to_send())


def test_a_unary_call_with_the_h2_client() -> None:
    c, srv = _client(), H2Server()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [*GRPC_HEADERS, ("grpc-timeout", "250m")])
    c.send_data(sid, grpc_msg(b"hello"), end_stream=True)
    calls, _ = _pump(c, srv)
    assert len(calls) == 1
    call = calls[0]
    assert (call.path, call.message, call.timeout) == (GRPC_HEADERS[2][1], b"hello", 0.25)
    assert call.headers["content-type"] == "application/grpc"
    srv.respond(call.stream_id, b"world")
    events = c.receive_data(srv.data_to_send())
    got: dict[str, Any] = {type(e).__name__: e for e in events}
    assert dict(got["ResponseReceived"].headers)[b":status"] == b"200"
    assert got["DataReceived"].data == grpc_msg(b"world")
    assert dict(got["TrailersReceived"].headers)[b"grpc-status"] == b"0"
    assert "StreamEnded" in got
    assert srv.open_streams == 0


def test_large_messages_both_ways_follow_flow_control() -> None:
    """A 3 MB request through our windows; a 300 KB answer held at the peer's 65535-byte
    window and 16 KiB frames, sent on as the peer's WINDOW_UPDATEs come."""
    c, srv = _client(), H2Server(H2Limits(window=65535))
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, GRPC_HEADERS)
    body = grpc_msg(bytes(range(256)) * (3 * 4096))
    sent = 0
    calls: list[Call] = []
    while sent < len(body):
        room = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
        chunk = body[sent : sent + room]
        sent += len(chunk)
        c.send_data(sid, chunk, end_stream=sent == len(body))
        got, _ = _pump(c, srv)
        calls += got
    assert [x.message for x in calls] == [body[5:]]
    answer = b"x" * 300_000
    srv.respond(sid, answer)
    received = bytearray()
    ended = False
    for _ in range(100):
        out = srv.data_to_send()
        assert all(f[0] != DATA or len(f[3]) <= 16384 for f in frames(out))
        for e in c.receive_data(out):
            if isinstance(e, h2.events.DataReceived):
                received += e.data
                c.acknowledge_received_data(e.flow_controlled_length, sid)
            ended = ended or isinstance(e, h2.events.StreamEnded)
        srv.receive(c.data_to_send())
        if ended:
            break
    assert ended and bytes(received) == grpc_msg(answer)


def test_ping_and_settings_are_acknowledged() -> None:
    r = Raw()
    out = r.send(
        frame(PING, 0, 0, b"12345678") + frame(SETTINGS, 0, 0, struct.pack("!HL", 4, 1000))
    )
    assert (PING, 1, 0, b"12345678") in out
    assert (SETTINGS, 1, 0, b"") in out
    assert r.send(frame(PING, 1, 0, b"12345678")) == []  # an ACK is not answered


# --- connection errors ------------------------------------------------------------------


def test_a_bad_preface_is_a_protocol_error() -> None:
    srv = H2Server()
    srv.data_to_send()
    assert srv.receive(b"GET / HTTP/1.1\r\n\r\n") == []
    assert srv.closed and goaway_code(frames(srv.data_to_send())) == ErrorCode.PROTOCOL_ERROR


def test_the_preface_may_arrive_byte_by_byte_but_settings_must_follow() -> None:
    srv = H2Server()
    for b in PREFACE:
        srv.receive(bytes((b,)))
    assert not srv.closed
    srv.data_to_send()
    srv.receive(frame(PING, 0, 0, b"12345678"))
    assert goaway_code(frames(srv.data_to_send())) == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(DATA, 0, 1, b"x" * 16385), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 0, b"1234"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 1, 0, b"\x00" * 6), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 0, struct.pack("!HL", 5, 100)), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, struct.pack("!HL", 2, 2)), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, struct.pack("!HL", 4, 2**31)), ErrorCode.FLOW_CONTROL_ERROR),
        (frame(WINDOW, 0, 0, struct.pack("!L", 0)), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW, 0, 0, struct.pack("!L", 2**31 - 1)), ErrorCode.FLOW_CONTROL_ERROR),
        (frame(WINDOW, 0, 0, b"\x00\x01"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(WINDOW, 0, 7, struct.pack("!L", 1)), ErrorCode.PROTOCOL_ERROR),  # idle
        (frame(DATA, 1, 5, b"xxxxx"), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (frame(DATA, 1, 0, b"xxxxx"), ErrorCode.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 9, b"\x00\x00\x00\x08"), ErrorCode.PROTOCOL_ERROR),  # idle
        (frame(RST_STREAM, 0, 0, b"\x00\x00\x00\x08"), ErrorCode.PROTOCOL_ERROR),
        (frame(PUSH, 0x4, 1, b"\x00\x00\x00\x02"), ErrorCode.PROTOCOL_ERROR),
        (frame(CONT, 0x4, 1, b"\x82"), ErrorCode.PROTOCOL_ERROR),  # without HEADERS
        (frame(HEADERS, 0x5, 2, b"\x83"), ErrorCode.PROTOCOL_ERROR),  # even stream id
        (frame(HEADERS, 0x5, 0, b"\x83"), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, 0x5 | 0x8, 1, b"\x09\x83"), ErrorCode.PROTOCOL_ERROR),  # pad > frame
        (frame(HEADERS, 0x5, 1, b"\xff\xff\xff\xff\x0f"), ErrorCode.COMPRESSION_ERROR),
        (frame(HEADERS, 0x5, 1, b"\x3f\xe1\xff\x03"), ErrorCode.COMPRESSION_ERROR),  # table
    ],
)
def test_connection_errors_get_goaway_with_their_code(data: bytes, code: int) -> None:
    r = Raw()
    out = r.send(data)
    assert r.srv.closed and goaway_code(out) == code
    assert r.srv.receive(frame(PING, 0, 0, b"12345678")) == [] and not r.srv.data_to_send()


def test_hpack_bomb_of_repeated_references_is_refused() -> None:
    """One 4000-byte header indexed once, then referenced thousands of times: a small
    block that would decode to megabytes."""
    r = Raw()
    enc = hpack.Encoder()
    first = enc.encode([(":method", "POST"), ("x-big", "v" * 4000)])
    ref = enc.encode([("x-big", "v" * 4000)])  # now one indexed byte
    assert len(ref) <= 2
    block = first + ref * 2000
    out = r.send(frame(HEADERS, 0x5, 1, block[:16000]))
    assert goaway_code(out) == ErrorCode.ENHANCE_YOUR_CALM


def test_a_continuation_flood_is_refused() -> None:
    r = Raw()
    out = r.send(frame(HEADERS, 0, 1, b"\x82"))
    assert out == []
    for _ in range(16):
        out = r.send(frame(CONT, 0, 1, b"\x82" * 1024))
        if out:
            break
    assert goaway_code(out) == ErrorCode.ENHANCE_YOUR_CALM


def test_an_interrupted_header_block_is_a_protocol_error() -> None:
    r = Raw()
    out = r.send(frame(HEADERS, 0, 1, b"\x83") + frame(PING, 0, 0, b"12345678"))
    assert goaway_code(out) == ErrorCode.PROTOCOL_ERROR


# --- stream errors: the connection goes on ----------------------------------------------


def test_stream_window_overflow_resets_only_that_stream() -> None:
    r = Raw()
    r.send(r.headers(1))
    out = r.send(frame(WINDOW, 0, 1, struct.pack("!L", 2**31 - 1)))
    assert rst_codes(out) == {1: ErrorCode.FLOW_CONTROL_ERROR}
    out = r.send(frame(WINDOW, 0, 1, struct.pack("!L", 5)))  # late frame: ignored
    assert out == []
    r.answer_and_check(3)


def test_too_many_streams_are_refused_and_hpack_stays_in_step() -> None:
    r = Raw(H2Limits(max_concurrent_streams=2))
    r.send(r.headers(1) + r.headers(3))
    out = r.send(r.headers(5, extra=[("x-new", "indexed-now")]))
    assert rst_codes(out) == {5: ErrorCode.REFUSED_STREAM}
    r.send(frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08"))
    r.calls.clear()
    r.send(r.headers(7, extra=[("x-new", "indexed-now")]) + frame(DATA, 1, 7, grpc_msg(b"a")))
    assert [(c.stream_id, c.headers["x-new"]) for c in r.calls] == [(7, "indexed-now")]


def test_half_closed_misuse_is_stream_closed() -> None:
    r = Raw()
    r.request(1, b"one")
    assert len(r.calls) == 1
    out = r.send(frame(DATA, 0, 1, b"late"))
    assert rst_codes(out) == {1: ErrorCode.STREAM_CLOSED}
    r.srv.respond(1, b"x")  # the call was reset meanwhile: nothing is sent
    assert r.srv.data_to_send() == b""
    r.request(3, b"two")
    out = r.send(r.headers(3, end=True))  # HEADERS again after END_STREAM
    assert rst_codes(out) == {3: ErrorCode.STREAM_CLOSED}
    out = r.send(r.headers(1))  # a closed, lower stream id re-opened
    assert goaway_code(out) == ErrorCode.STREAM_CLOSED


def test_malformed_request_headers_reset_the_stream() -> None:
    r = Raw()
    out = r.send(
        frame(
            HEADERS, 0x5, 1, r.enc.encode([("content-type", "application/grpc"), (":path", "/x")])
        )
    )
    assert rst_codes(out) == {1: ErrorCode.PROTOCOL_ERROR}
    out = r.send(r.headers(3, end=True, extra=[("connection", "close")]))
    assert rst_codes(out) == {3: ErrorCode.PROTOCOL_ERROR}
    r.answer_and_check(5)


# --- gRPC-level refusals ----------------------------------------------------------------


def test_a_message_over_the_limit_is_refused_before_its_body() -> None:
    r = Raw(H2Limits(max_message_bytes=1000))
    out = r.send(r.headers(1) + frame(DATA, 0, 1, struct.pack("!BL", 0, 5000) + b"x" * 100))
    t = trailers(out, 1)
    assert t["grpc-status"] == str(Status.RESOURCE_EXHAUSTED) and "5000" in t["grpc-message"]
    assert rst_codes(out) == {1: ErrorCode.NO_ERROR}
    assert r.send(frame(DATA, 1, 1, b"x" * 1000)) == []  # the rest, in flight: ignored
    r.answer_and_check(3)


def test_compressed_messages_gzip_or_refused() -> None:
    r = Raw(H2Limits(max_message_bytes=10_000))
    body = gzip.compress(b"abc" * 100)
    r.send(r.headers(1, extra=[("grpc-encoding", "gzip")]) + frame(DATA, 1, 1, grpc_msg(body, 1)))
    assert [c.message for c in r.calls] == [b"abc" * 100]
    out = r.send(r.headers(3) + frame(DATA, 1, 3, grpc_msg(body, 1)))
    assert trailers(out, 3)["grpc-status"] == str(Status.UNIMPLEMENTED)
    bomb = gzip.compress(b"\x00" * 1_000_000)
    out = r.send(
        r.headers(5, extra=[("grpc-encoding", "gzip")]) + frame(DATA, 1, 5, grpc_msg(bomb, 1))
    )
    assert trailers(out, 5)["grpc-status"] == str(Status.RESOURCE_EXHAUSTED)
    out = r.send(r.headers(7) + frame(DATA, 1, 7, grpc_msg(b"x")[:-1]))
    assert trailers(out, 7)["grpc-status"] == str(Status.INTERNAL)
    r.calls.clear()
    deflated = zlib.compress(b"xyz" * 50)
    r.send(
        r.headers(9, extra=[("grpc-encoding", "deflate")])
        + frame(DATA, 1, 9, grpc_msg(deflated, 1))
    )
    assert [c.message for c in r.calls] == [b"xyz" * 50]
    r.answer_and_check(11)


def test_not_grpc_gets_an_http_status() -> None:
    r = Raw()
    block = r.enc.encode(
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), ("content-type", "text/plain")]
    )
    out = r.send(frame(HEADERS, 0x5, 1, block))
    assert trailers(out, 1)[":status"] == "405"
    block = r.enc.encode(
        [(":method", "POST"), (":scheme", "http"), (":path", "/"), ("content-type", "text/plain")]
    )
    out = r.send(frame(HEADERS, 0x5, 3, block))
    assert trailers(out, 3)[":status"] == "415"


def test_errors_are_trailers_only_with_an_encoded_message() -> None:
    r = Raw()
    r.request(1, b"x")
    r.srv.fail(1, Status.NOT_FOUND, "[model-not-found] no model 'é%'\n")
    out = frames(r.srv.data_to_send())
    assert [(f[0], f[1]) for f in out] == [(HEADERS, 0x5)]
    t = trailers(out, 1)
    assert t["grpc-status"] == "5"
    assert t["grpc-message"] == "[model-not-found] no model '%C3%A9%25'%0A"


def test_grpc_timeout_units() -> None:
    assert grpc_timeout("2S") == 2.0 and grpc_timeout("1M") == 60.0
    assert grpc_timeout("100u") == pytest.approx(1e-4)
    assert grpc_timeout("") is None and grpc_timeout("5x") is None
    assert grpc_timeout("123456789S") is None  # more than 8 digits


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_after_the_preface_never_escape(data: bytes) -> None:
    """Whatever follows the preface is answered with frames or GOAWAY, never an
    exception, and what is written is well-formed frames."""
    srv = H2Server()
    srv.data_to_send()
    srv.receive(PREFACE + frame(SETTINGS, 0, 0) + data)
    frames(srv.data_to_send())


def test_kept_heads_are_forgotten_when_the_table_changes() -> None:
    """The same indexed-only block means other fields once the dynamic table changed."""
    r = Raw()
    pseudo = b"\x83\x86\x84"  # :method POST, :scheme http, :path / (static table)
    ctype = b"\x5f\x10application/grpc"  # content-type, literal, indexed → entry 62

    def tag(value: bytes) -> bytes:  # x-tag: value, literal with indexing → entry 62
        return b"\x40\x05x-tag" + bytes((len(value),)) + value

    def call(sid: int, block: bytes) -> str:
        r.calls.clear()
        r.send(frame(HEADERS, 0x4, sid, block) + frame(DATA, 1, sid, grpc_msg(b"m")))
        (c,) = r.calls
        r.srv.respond(sid, b"")
        r.srv.data_to_send()
        return c.headers["x-tag"]

    assert call(1, pseudo + tag(b"one") + ctype) == "one"  # 62 content-type, 63 x-tag one
    same = pseudo + b"\xbe\xbf"  # indexed only: entries 62 and 63
    assert call(3, same) == "one"
    assert call(5, same) == "one"  # from the kept head
    # 62 x-tag two, 63 content-type, 64 x-tag one: the same bytes now mean x-tag two
    assert call(7, pseudo + tag(b"two") + b"\xbf") == "two"
    assert call(9, same) == "two"


def test_calls_not_yet_answered_stay_charged_to_the_connection_budget() -> None:
    """Complete calls hold their message until answered: a client cannot pile up
    messages past ``max_buffered_bytes`` by sending many calls at once."""
    r = Raw(H2Limits(max_message_bytes=800, max_buffered_bytes=1000))
    r.request(1, b"a" * 600)
    assert len(r.calls) == 1
    out = r.request(3, b"b" * 600)
    t = trailers(out, 3)
    assert t["grpc-status"] == str(Status.RESOURCE_EXHAUSTED) and "in flight" in t["grpc-message"]
    r.srv.respond(1, b"done")
    r.srv.data_to_send()
    r.calls.clear()
    r.request(5, b"c" * 600)
    assert [c.message for c in r.calls] == [b"c" * 600]


def test_the_phase_says_which_timer_runs() -> None:
    srv = H2Server()
    srv.receive(PREFACE[:10])
    assert srv.phase == "idle"  # nothing of a request yet (the preface is a connection's)
    srv.receive(PREFACE[10:])
    assert srv.phase == "head"  # the preface, and its SETTINGS not yet
    r = Raw()
    assert r.srv.phase == "idle"
    r.send(frame(HEADERS, 0, 1, r.enc.encode(GRPC_HEADERS)))  # no END_HEADERS
    assert r.srv.phase == "head"
    r.send(frame(CONT, 0x4, 1, b""))
    assert r.srv.phase == "body"
    r.send(frame(DATA, 1, 1, grpc_msg(b"x")))
    assert len(r.calls) == 1 and r.srv.phase == "idle"  # the call is being answered
