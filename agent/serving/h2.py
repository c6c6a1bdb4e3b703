"""The HTTP/2 protocol core for unary gRPC, without I/O (as ``h1.py`` is for HTTP/1.1).

A shell reads bytes its own way and feeds them to :meth:`H2Server.receive`, which
returns the calls whose request is complete (:class:`Call`: path, headers, the one
gRPC message, its deadline); the shell answers each with :meth:`H2Server.respond` or
:meth:`H2Server.fail` and writes :meth:`H2Server.data_to_send`. Everything the bytes
mean is decided here: the connection preface, SETTINGS and their ACKs, HEADERS +
CONTINUATION (HPACK decoding with the ``hpack`` package, bounded), DATA with flow
control both ways (our windows replenished as bytes arrive, the peer's initial window
and maximum frame size respected, answers queued until the peer opens its window),
PING, RST_STREAM, GOAWAY, the concurrent-stream limit, gRPC's length-prefixed messages
(uncompressed, gzip or deflate, charged to the body budget before and after inflating) and the
trailers that carry ``grpc-status`` / ``grpc-message``.

Errors follow RFC 9113: a frame that breaks the connection's state (a bad preface,
frame sizes, HPACK failures, flow-control overflow of the connection, frames on idle
streams) queues GOAWAY with its error code and sets :attr:`H2Server.closed` (the shell
flushes and closes); a stream's own fault gets RST_STREAM with its code and the
connection goes on. A request the server refuses at the gRPC level (too large, a bad
message prefix, an unknown encoding) gets a trailers-only answer with the gRPC status
of that meaning.

Answers are encoded without the HPACK dynamic table (literal fields, never indexed):
no encoder state to keep, and the fixed fields are precomputed bytes.

Why not the ``h2`` package: measured on the tiny-model RPC (``python -m bench.h2_cores``,
docs/PROTOCOL.md "One HTTP/2 core"), h2's state machine costs several times this core
per call, a large share of the 200 us budget of ``grpc_added_p50_us_tiny``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import quote

import hpack

__all__ = [
    "PREFACE",
    "Call",
    "ErrorCode",
    "H2Limits",
    "H2Server",
    "Status",
    "encode_headers",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
MIN_FRAME = 16384
MAX_FRAME = 2**24 - 1
FRAME = struct.Struct("!HBBBL")  # length (24 bits as H + B), type, flags, stream id
U32 = struct.Struct("!L")
MSG_PREFIX = struct.Struct("!BL")
MAX_CLOSED_KEPT = 256  # recently reset streams remembered (their late frames ignored)
MAX_BLOCKS_KEPT = 64  # parsed header blocks kept per connection (see H2Server._end_block)
MAX_OUTPUT = 1 << 20  # bytes of control frames queued and not written: the peer is not reading


class ErrorCode:
    """RFC 9113 section 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Status:
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


@dataclass(frozen=True)
class H2Limits:
    """The inference socket's limits in HTTP/2 terms (see agent/limits.py HTTPLimits)."""

    max_message_bytes: int = 64 * 1024 * 1024  # one request message (after inflating)
    max_header_bytes: int = 16 * 1024  # a header block, compressed and decoded
    max_headers: int = 100  # fields of one header block
    max_concurrent_streams: int = 100  # open streams per connection; more → REFUSED_STREAM
    # Request bytes held per connection: bodies being received and the messages of calls
    # not yet answered (inflated ones count both ways); over it → RESOURCE_EXHAUSTED.
    max_buffered_bytes: int = 256 * 1024 * 1024
    window: int = 1 << 20  # our stream and connection receive windows (>= 65535)
    header_table_size: int = 4096  # the HPACK dynamic table we let the peer use

    def __post_init__(self) -> None:
        # A peer may send a whole default window before it reads our SETTINGS.
        if not DEFAULT_WINDOW <= self.window <= MAX_WINDOW:
            raise ValueError(f"window {self.window} outside [65535, 2^31-1]")


@dataclass
class Call:
    """One complete unary request. ``headers`` keys are lower-case and exclude the
    pseudo-headers; ``timeout`` is grpc-timeout in seconds (None: none sent)."""

    stream_id: int
    path: str
    headers: dict[str, str]
    message: bytes
    timeout: float | None = None


class _ConnError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _StreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Stream:
    sid: int
    send_window: int
    recv_window: int
    method: str = ""
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    remote_done: bool = False  # END_STREAM received (half-closed remote)
    answered: bool = False  # respond()/fail() called: the answer is queued
    unacked: int = 0  # bytes received and not yet given back in a WINDOW_UPDATE
    pending: memoryview | None = None  # DATA not yet sent (waiting for window)
    trailers: bytes = b""  # the trailers' header block, sent after ``pending``
    declared: int = -1  # the message's length from its 5-byte prefix
    charged: int = 0  # request bytes held for it (received, then the call's message)


# --- HPACK output (literal fields, never indexed, no Huffman) --------------------------


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first``'s high bits set."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal field never indexed with a literal name (0x10, RFC 7541 6.2.3)."""
    return b"".join((b"\x10", _int(len(name), 7), name, _int(len(value), 7), value))


def encode_headers(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A header block of literal fields (``:status 200`` uses its static index)."""
    out = []
    for name, value in fields:
        if name == b":status" and value == b"200":
            out.append(b"\x88")
        else:
            out.append(_literal(name, value))
    return b"".join(out)


_RESPONSE_HEAD = encode_headers(
    [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-accept-encoding", b"identity,gzip,deflate"),
    ]
)
_TRAILERS_OK = encode_headers([(b"grpc-status", b"0")])
_WBITS = {"gzip": 31, "deflate": 15}  # grpc-encoding → zlib's wbits (deflate = zlib format)
_MESSAGE_MAX = 1024  # characters of grpc-message kept
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_CONNECTION_HEADERS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))


def _status_block(status: int, message: str) -> bytes:
    fields = [(b"grpc-status", str(status).encode())]
    if message:
        text = message[:_MESSAGE_MAX]
        fields.append(
            (b"grpc-message", quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
        )
    return encode_headers(fields)


def _request_head(fields: list[tuple[bytes, bytes]]) -> tuple[str, str, dict[str, str]]:
    """A request's header fields → (method, path, regular headers); _StreamError when
    malformed (RFC 9113 8.2, 8.3)."""
    method = path = b""
    seen: set[bytes] = set()
    regular = False
    headers: dict[str, str] = {}
    for name, value in fields:
        if name[:1] == b":":
            if regular or name not in _PSEUDO or name in seen:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR, "bad pseudo-header")
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            continue
        regular = True
        if name.lower() != name or name in _CONNECTION_HEADERS:
            raise _StreamError(ErrorCode.PROTOCOL_ERROR, "malformed header field")
        if name == b"te" and value != b"trailers":
            raise _StreamError(ErrorCode.PROTOCOL_ERROR, "te other than trailers")
        key = name.decode("latin-1")
        prev = headers.get(key)
        text = value.decode("latin-1")
        headers[key] = text if prev is None else prev + "," + text
    if not {b":method", b":scheme", b":path"} <= seen or not path:
        raise _StreamError(ErrorCode.PROTOCOL_ERROR, "missing pseudo-headers")
    return method.decode("latin-1"), path.decode("latin-1"), headers


def _only_indexed(block: bytes) -> bool:
    """Whether ``block`` is indexed field representations only (RFC 7541 6.1)."""
    i, n = 0, len(block)
    while i < n:
        b = block[i]
        if not b & 0x80:
            return False
        i += 1
        if b & 0x7F == 0x7F:  # a multi-byte index
            while i < n and block[i] & 0x80:
                i += 1
            i += 1
    return True


def grpc_timeout(value: str) -> float | None:
    """grpc-timeout (``1..8 digits`` + unit) in seconds; None if malformed."""
    if len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


# --- the connection ------------------------------------------------------------------


class H2Server:
    """The server side of one HTTP/2 connection carrying unary gRPC calls."""

    def __init__(self, limits: H2Limits | None = None) -> None:
        self.limits = lim = limits or H2Limits()
        self.closed = False  # the connection is over: flush data_to_send, then close
        self.error: str | None = None  # why it is over (a connection error), if one
        self.peer_goaway = False  # the peer will open no more streams
        self._out = bytearray()
        self._in = bytearray()
        self._preface = False
        self._settings_seen = False
        self._streams: dict[int, _Stream] = {}
        self._reset: dict[int, None] = {}  # recently reset stream ids (ordered)
        self._last_sid = 0
        self._cont: _Stream | None = None  # the stream whose CONTINUATION is expected
        self._cont_block = bytearray()
        self._cont_end = False  # the HEADERS that started the block had END_STREAM
        self._cont_refused = False
        self._cont_error: _StreamError | None = None
        self._peer_window = DEFAULT_WINDOW  # the peer's initial stream window
        self._peer_frame = MIN_FRAME
        self._send_window = DEFAULT_WINDOW  # connection-level, toward the peer
        self._recv_window = lim.window  # connection-level, from the peer
        self._unacked = 0
        self._buffered = 0
        self._decoder = hpack.Decoder(max_header_list_size=lim.max_header_bytes)
        self._decoder.max_allowed_table_size = lim.header_table_size
        self._heads: dict[bytes, tuple[str, str, dict[str, str]]] = {}  # see _end_block
        settings = [
            (S_HEADER_TABLE_SIZE, lim.header_table_size),
            (S_ENABLE_PUSH, 0),
            (S_MAX_CONCURRENT_STREAMS, lim.max_concurrent_streams),
            (S_INITIAL_WINDOW_SIZE, lim.window),
            (S_MAX_FRAME_SIZE, MIN_FRAME),
            (S_MAX_HEADER_LIST_SIZE, lim.max_header_bytes),
        ]
        self._frame(SETTINGS, 0, 0, b"".join(struct.pack("!HL", k, v) for k, v in settings))
        if lim.window > DEFAULT_WINDOW:
            self._frame(WINDOW_UPDATE, 0, 0, U32.pack(lim.window - DEFAULT_WINDOW))

    # --- output ------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write, in order (the buffer is emptied)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def phase(self) -> str:
        """What the connection waits for from the peer, for the shell's timers (as
        ``h1.PHASES``): ``head`` (a header block is incomplete), ``body`` (a request's
        DATA is incomplete), else ``idle`` (between calls, or calls being answered)."""
        if self._cont is not None or (self._preface and not self._settings_seen):
            return "head"
        if any(not st.remote_done for st in self._streams.values()):
            return "body"
        return "idle"

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes | memoryview = b"") -> None:
        n = len(payload)
        self._out += FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid)
        self._out += payload

    def _header_frames(self, sid: int, block: bytes, end_stream: bool) -> None:
        size = self._peer_frame
        first = block[:size]
        rest = block[size:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        self._frame(HEADERS, flags, sid, first)
        while rest:
            chunk, rest = rest[:size], rest[size:]
            self._frame(CONTINUATION, 0 if rest else END_HEADERS, sid, chunk)

    def goaway(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Queue GOAWAY (the last stream we will answer) and mark the connection over."""
        if self.closed:
            return
        self._frame(
            GOAWAY, 0, 0, U32.pack(self._last_sid) + U32.pack(code) + message.encode()[:256]
        )
        self.closed = True
        if code != ErrorCode.NO_ERROR:
            self.error = message

    def _rst(self, sid: int, code: int) -> None:
        self._frame(RST_STREAM, 0, sid, U32.pack(code))
        self._drop(sid)

    def _drop(self, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is not None:
            self._buffered -= st.charged
        self._reset[sid] = None
        if len(self._reset) > MAX_CLOSED_KEPT:
            del self._reset[next(iter(self._reset))]

    # --- answers -----------------------------------------------------------------------

    def respond(self, sid: int, message: bytes | bytearray | memoryview) -> None:
        """Answer call ``sid`` with one uncompressed message and grpc-status 0. A call
        the peer reset meanwhile is silently dropped."""
        st = self._streams.get(sid)
        if st is None or st.answered:
            return
        st.answered = True
        self._header_frames(sid, _RESPONSE_HEAD, False)
        st.pending = memoryview(MSG_PREFIX.pack(0, len(message)) + bytes(message))
        st.trailers = _TRAILERS_OK
        self._flush(st)

    def fail(self, sid: int, status: int, message: str) -> None:
        """Answer call ``sid`` with a gRPC error (a trailers-only response)."""
        st = self._streams.get(sid)
        if st is None or st.answered:
            return
        st.answered = True
        self._header_frames(sid, _RESPONSE_HEAD + _status_block(status, message), True)
        self._finish(st)

    def _finish(self, st: _Stream) -> None:
        """Our side of ``st`` is closed: forget it, resetting a request still arriving."""
        if st.remote_done:
            self._streams.pop(st.sid, None)
            self._buffered -= st.charged
        else:  # we answered before the request ended (too large): stop its DATA
            self._rst(st.sid, ErrorCode.NO_ERROR)

    def _flush(self, st: _Stream) -> None:
        data = st.pending
        if data is None:
            return
        while data.nbytes:
            n = min(data.nbytes, st.send_window, self._send_window, self._peer_frame)
            if n <= 0:
                st.pending = data
                return
            self._frame(DATA, 0, st.sid, data[:n])
            data = data[n:]
            st.send_window -= n
            self._send_window -= n
        st.pending = None
        self._header_frames(st.sid, st.trailers, True)
        self._finish(st)

    def _flush_all(self) -> None:
        for st in list(self._streams.values()):
            if st.pending is not None:
                self._flush(st)

    # --- input -------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Call]:
        """Feed bytes read from the peer; the calls whose request is now complete."""
        if self.closed:
            return []
        buf = self._in
        buf += data
        calls: list[Call] = []
        try:
            pos = 0
            if not self._preface:
                n = min(len(buf), len(PREFACE))
                if buf[:n] != PREFACE[:n]:
                    raise _ConnError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                if n < len(PREFACE):
                    return calls
                self._preface = True
                pos = len(PREFACE)
            end = len(buf)
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = FRAME.unpack_from(buf, pos)
                length = (hi << 8) | lo
                sid &= MAX_WINDOW
                if length > MIN_FRAME:
                    raise _ConnError(
                        ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes over {MIN_FRAME}"
                    )
                if end - pos - 9 < length:
                    break
                payload = memoryview(buf)[pos + 9 : pos + 9 + length]
                pos += 9 + length
                try:
                    self._on_frame(ftype, flags, sid, payload, calls)
                except _StreamError as exc:
                    self._rst(sid, exc.code)
                finally:
                    payload.release()
                if self.closed:
                    break
            del buf[:pos]
        except _ConnError as exc:
            self.goaway(exc.code, str(exc))
            buf.clear()
        if len(self._out) > MAX_OUTPUT:
            self.goaway(ErrorCode.ENHANCE_YOUR_CALM, "the peer does not read its answers")
        return calls

    def _on_frame(
        self, ftype: int, flags: int, sid: int, payload: memoryview, calls: list[Call]
    ) -> None:
        if not self._settings_seen:
            if ftype != SETTINGS or flags & ACK:
                raise _ConnError(
                    ErrorCode.PROTOCOL_ERROR, "the preface must be followed by SETTINGS"
                )
            self._settings_seen = True
        if self._cont is not None and (ftype != CONTINUATION or sid != self._cont.sid):
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "a header block was interrupted")
        if ftype == DATA:
            self._on_data(flags, sid, payload, calls)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload, calls)
        elif ftype == CONTINUATION:
            if self._cont is None:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._add_block(payload)
            if flags & END_HEADERS:
                self._end_block(calls)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == PING:
            if sid != 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "PING of a length other than 8")
            if not flags & ACK:
                self._frame(PING, ACK, 0, bytes(payload))
        elif ftype == RST_STREAM:
            if sid == 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM of a length other than 4")
            if sid > self._last_sid:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            self._drop(sid)
        elif ftype == GOAWAY:
            if sid != 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            self.peer_goaway = True
        elif ftype == PRIORITY:
            if sid == 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _StreamError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY of a length other than 5")
        elif ftype == PUSH_PROMISE:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "a client cannot push")
        # Unknown frame types are ignored (RFC 9113 5.5).

    def _unpad(self, flags: int, payload: memoryview) -> memoryview:
        if flags & PADDED:
            if not payload:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "padded frame without a pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - pad]
        return payload

    # --- settings and windows ------------------------------------------------------------

    def _on_settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        for off in range(0, len(payload), 6):
            key, value = struct.unpack_from("!HL", payload, off)
            if key == S_ENABLE_PUSH and value > 1:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                delta = value - self._peer_window
                self._peer_window = value
                for st in self._streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window overflows")
            elif key == S_MAX_FRAME_SIZE:
                if not MIN_FRAME <= value <= MAX_FRAME:
                    raise _ConnError(
                        ErrorCode.PROTOCOL_ERROR, f"bad SETTINGS_MAX_FRAME_SIZE {value}"
                    )
                self._peer_frame = value
            # HEADER_TABLE_SIZE: we never index; others are advisory for a server.
        self._frame(SETTINGS, ACK, 0)
        self._flush_all()

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of a length other than 4")
        inc = U32.unpack(payload)[0] & MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "the connection window overflows")
            self._flush_all()
            return
        if sid > self._last_sid:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        st = self._streams.get(sid)
        if st is None:
            return  # closed: late frames are ignored
        if inc == 0:
            raise _StreamError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, "the stream window overflows")
        self._flush(st)

    # --- requests ------------------------------------------------------------------------

    def _on_headers(self, flags: int, sid: int, payload: memoryview, calls: list[Call]) -> None:
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        # A stream's fault is answered after its block is decoded (the block changes the
        # HPACK table whatever becomes of the stream).
        error: _StreamError | None = None
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if U32.unpack_from(block)[0] & MAX_WINDOW == sid:
                error = _StreamError(ErrorCode.PROTOCOL_ERROR, "a stream cannot depend on itself")
            block = block[5:]
        st = self._streams.get(sid)
        refused = False
        if st is not None:  # trailers of a request
            if st.remote_done:
                error = _StreamError(ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM")
            elif not flags & END_STREAM:
                error = _StreamError(
                    ErrorCode.PROTOCOL_ERROR, "request trailers without END_STREAM"
                )
        else:
            if sid % 2 == 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"even stream id {sid} from a client")
            if sid <= self._last_sid:
                raise _ConnError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
            self._last_sid = sid
            # Its block must still be decoded (it changes the HPACK table): refused after.
            refused = len(self._streams) >= self.limits.max_concurrent_streams
            st = _Stream(sid, self._peer_window, self.limits.window)
        self._cont = st
        self._cont_block = bytearray()
        self._cont_end = bool(flags & END_STREAM)
        self._cont_refused = refused
        self._cont_error = error
        self._add_block(block)
        if flags & END_HEADERS:
            self._end_block(calls)

    def _add_block(self, part: memoryview) -> None:
        self._cont_block += part
        if len(self._cont_block) > self.limits.max_header_bytes:
            raise _ConnError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"a header block over {self.limits.max_header_bytes} bytes",
            )

    def _end_block(self, calls: list[Call]) -> None:
        st = self._cont
        assert st is not None
        self._cont = None
        block = bytes(self._cont_block)
        self._cont_block = bytearray()
        # A program repeats its header block; once its fields are in the dynamic table
        # the block is indexed references only, which do not change the table: such a
        # block's parsed head is kept and reused until a block that may change the
        # table comes (then every kept head is forgotten; see _decode).
        head = self._heads.get(block)
        fields = self._decode(block) if head is None else []
        if self._cont_error is not None:
            raise self._cont_error
        if self._cont_refused:
            self._reset[st.sid] = None
            self._frame(RST_STREAM, 0, st.sid, U32.pack(ErrorCode.REFUSED_STREAM))
            return
        if st.sid in self._streams:  # request trailers: END_STREAM is set
            self._on_end(st, calls)
            return
        if head is None:
            if len(fields) > self.limits.max_headers:
                raise _StreamError(
                    ErrorCode.PROTOCOL_ERROR, f"more than {self.limits.max_headers} header fields"
                )
            head = _request_head(fields)
            if _only_indexed(block):
                if len(self._heads) >= MAX_BLOCKS_KEPT:
                    self._heads.clear()
                self._heads[block] = head
        st.method, st.path = head[0], head[1]
        st.headers = dict(head[2])
        self._streams[st.sid] = st
        if self._cont_end:
            self._on_end(st, calls)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """HPACK-decode ``block`` (forgetting the kept heads if it may change the table)."""
        if not _only_indexed(block):
            self._heads.clear()
        try:
            return cast("list[tuple[bytes, bytes]]", self._decoder.decode(block, raw=True))
        except hpack.OversizedHeaderListError:
            raise _ConnError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"decoded headers over {self.limits.max_header_bytes} bytes",
            ) from None
        except hpack.HPACKError as exc:
            raise _ConnError(ErrorCode.COMPRESSION_ERROR, f"HPACK: {exc}") from None

    def _on_data(self, flags: int, sid: int, payload: memoryview, calls: list[Call]) -> None:
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if sid > self._last_sid:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
        size = len(payload)
        self._recv_window -= size
        if self._recv_window < 0:
            raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "DATA over the connection window")
        self._consumed(size)  # buffered data is charged to the body budget instead
        st = self._streams.get(sid)
        if st is None:
            if sid in self._reset:
                return  # in flight when we reset it
            raise _StreamError(ErrorCode.STREAM_CLOSED, f"DATA on closed stream {sid}")
        if st.remote_done:
            raise _StreamError(ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
        st.recv_window -= size
        if st.recv_window < 0:
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, "DATA over the stream window")
        data = self._unpad(flags, payload)
        if not st.answered:
            if self._buffered + len(data) > self.limits.max_buffered_bytes:
                self.fail(sid, Status.RESOURCE_EXHAUSTED, "too many request bytes in flight")
                return
            st.body += data
            st.charged += len(data)
            self._buffered += len(data)
            if st.declared < 0 and len(st.body) >= 5:
                st.declared = MSG_PREFIX.unpack_from(st.body)[1]
                if st.declared > self.limits.max_message_bytes:
                    self.fail(
                        sid,
                        Status.RESOURCE_EXHAUSTED,
                        f"message of {st.declared} bytes over the limit of "
                        f"{self.limits.max_message_bytes}",
                    )
                    return
            if len(st.body) > self.limits.max_message_bytes + 5:
                self.fail(sid, Status.RESOURCE_EXHAUSTED, "request body over the limit")
                return
        if flags & END_STREAM:
            self._on_end(st, calls)
        else:
            st.unacked += size
            if st.unacked >= self.limits.window // 2:
                self._frame(WINDOW_UPDATE, 0, sid, U32.pack(st.unacked))
                st.recv_window += st.unacked
                st.unacked = 0

    def _consumed(self, size: int) -> None:
        self._unacked += size
        if self._unacked >= self.limits.window // 2:
            self._frame(WINDOW_UPDATE, 0, 0, U32.pack(self._unacked))
            self._recv_window += self._unacked
            self._unacked = 0

    def _on_end(self, st: _Stream, calls: list[Call]) -> None:
        """The request of ``st`` is complete: one gRPC message, or a gRPC error."""
        st.remote_done = True
        h = st.headers
        if st.method != "POST":
            self._http_error(st, b"405")
            return
        if not h.get("content-type", "").startswith("application/grpc"):
            self._http_error(st, b"415")
            return
        body = st.body
        if len(body) < 5:
            self.fail(st.sid, Status.INTERNAL, "a request must carry one gRPC message")
            return
        flag, n = MSG_PREFIX.unpack_from(body)
        if n != len(body) - 5:
            self.fail(st.sid, Status.INTERNAL, "the gRPC message prefix does not match its body")
            return
        message = bytes(memoryview(body)[5:])
        if flag == 1:
            enc = h.get("grpc-encoding", "identity")
            if enc not in _WBITS:
                self.fail(
                    st.sid, Status.UNIMPLEMENTED, f"message compression {enc!r} is not supported"
                )
                return
            inflated = self._inflate(st, message, _WBITS[enc])
            if inflated is None:
                return
            if self._buffered + len(inflated) > self.limits.max_buffered_bytes:
                self.fail(st.sid, Status.RESOURCE_EXHAUSTED, "too many request bytes in flight")
                return
            st.charged += len(inflated)
            self._buffered += len(inflated)
            message = inflated
        elif flag != 0:
            self.fail(st.sid, Status.INTERNAL, f"bad gRPC message flag {flag}")
            return
        st.body = bytearray()  # still charged: the call holds its message until answered
        t = h.get("grpc-timeout")
        calls.append(Call(st.sid, st.path, h, message, grpc_timeout(t) if t else None))

    def _inflate(self, st: _Stream, data: bytes, wbits: int) -> bytes | None:
        """A compressed message inflated within the message budget (a bomb stops at
        ``max_message_bytes`` + 1 bytes), or None when refused."""
        limit = self.limits.max_message_bytes
        d = zlib.decompressobj(wbits=wbits)
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error as exc:
            self.fail(st.sid, Status.INTERNAL, f"inflating the message: {exc}")
            return None
        if len(out) > limit or d.unconsumed_tail:
            self.fail(
                st.sid, Status.RESOURCE_EXHAUSTED, f"message inflates over the limit of {limit}"
            )
            return None
        if not d.eof:
            self.fail(st.sid, Status.INTERNAL, "a truncated compressed message")
            return None
        return out

    def _http_error(self, st: _Stream, status: bytes) -> None:
        """A request that is not gRPC: an HTTP status, no gRPC trailers."""
        st.answered = True
        self._header_frames(st.sid, encode_headers([(b":status", status)]), True)
        self._finish(st)
