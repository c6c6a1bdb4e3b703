"""The HTTP/1.1 protocol core, without I/O: one home for every rule both servers share.

Two shells drive it: the daemon's asyncio protocol (``agent/serving/http.py``, ``_Conn``)
and a worker's blocking thread per lent connection (``agent/serving/direct.py``,
``_Lent``). Each reads bytes its own way; what the bytes mean is decided here:

* where a request head ends, and when it can no longer fit (:func:`find_head`, 431);
* the request line and headers, body framing, keep-alive and ``Expect`` (:func:`parse_request`
  → :class:`Head`; body codings are ``agent/serving/httpbody.py``);
* the response on the wire (:func:`render_response`) and protocol errors
  (:class:`ProtocolError`, answered by :func:`error_bytes` and the connection closed);
* the connection phases and what their timers mean (:data:`PHASES`).

Why our own and not h11 or httptools: measured on the tiny-model request
(``bench/h1_parsers.py``, docs/PROTOCOL.md "One HTTP/1.1 core"), h11 costs several times
this core per request cycle, a large share of the 150 us budget for the whole socket hop;
httptools parses in C but calls back into Python per header and renders nothing, and
ends up no faster than this core with its head cache. Neither would remove the
limits, the lending hand-over or the error bodies the shells need.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING
from urllib.parse import unquote

from agent.errors import EdgewardError, MethodNotAllowedError, OverloadedError, ProtocolError
from agent.serving.cache import BoundedCache
from agent.serving.httpbody import CHUNKED, transfer_length

if TYPE_CHECKING:
    from agent.limits import HTTPLimits

__all__ = [
    "CHUNKED",
    "CONTINUE",
    "PHASES",
    "BoundedCache",
    "Head",
    "HeadCache",
    "PeerCred",
    "Phase",
    "PhaseRule",
    "ProtocolError",
    "Request",
    "Response",
    "content_length",
    "error_bytes",
    "error_response",
    "find_head",
    "json_response",
    "keep_alive",
    "parse_head",
    "parse_request",
    "render_response",
]

Body = bytes | bytearray | memoryview


@dataclass(frozen=True)
class PeerCred:
    """The connecting process (``SO_PEERCRED``): the kernel's word, not the client's."""

    pid: int
    uid: int
    gid: int


@dataclass
class Request:
    """One parsed request. ``headers`` keys are lower-case; ``path`` is percent-decoded."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Body
    peer_cred: PeerCred | None = None
    http_version: str = "HTTP/1.1"


@dataclass
class Response:
    """One response. ``body`` may be a sequence of buffers (written without joining them
    into one copy when large, e.g. binary tensor outputs)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Body | Sequence[Body] = b""


def json_response(status: int, obj: object, headers: dict[str, str] | None = None) -> Response:
    """A JSON response (compact separators: these bodies are on the hot path)."""
    h = {"content-type": "application/json"}
    if headers:
        h.update(headers)
    return Response(status, h, json.dumps(obj, separators=(",", ":")).encode())


# --- connection phases -----------------------------------------------------------------


class Phase(IntEnum):
    IDLE = 0  # between requests (kept alive)
    HEAD = 1  # a request's first byte came; its head is not complete
    BODY = 2  # the head is in; its body is being received
    HANDLING = 3  # the request is complete and being answered
    CLOSED = 4
    LENT = 5  # a worker serves the connection (the daemon holds it, does not read)


@dataclass(frozen=True)
class PhaseRule:
    """What a phase's timer means: how long (an ``HTTPLimits`` field, None: no timer) and
    what expiry answers (None: close silently)."""

    timeout: str | None
    expired: tuple[int, str, str] | None = None
    reads: bool = True  # the shell reads request bytes in this phase


PHASES: dict[Phase, PhaseRule] = {
    Phase.IDLE: PhaseRule("keepalive_timeout_s"),
    Phase.HEAD: PhaseRule(
        "header_timeout_s", (408, "header-timeout", "request headers not received in time")
    ),
    Phase.BODY: PhaseRule(
        "body_timeout_s",
        (408, "body-timeout", "request body shorter than its Content-Length or too slow"),
    ),
    Phase.HANDLING: PhaseRule(None, reads=False),  # re-armed when the answer is written
    Phase.CLOSED: PhaseRule(None, reads=False),
    Phase.LENT: PhaseRule(None, reads=False),  # re-armed when the connection comes back
}


def timeout(phase: Phase, limits: HTTPLimits) -> float | None:
    """Seconds the connection may stay in ``phase``, None for no limit."""
    name = PHASES[phase].timeout
    return None if name is None else float(getattr(limits, name))


def expired(phase: Phase) -> ProtocolError | None:
    """The error that answers ``phase``'s timer (None: close without a word)."""
    what = PHASES[phase].expired
    return None if what is None else ProtocolError(*what)


# --- request heads ---------------------------------------------------------------------

HEADER_END = b"\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def find_head(buf: bytearray, search_from: int, filled: int, limits: HTTPLimits) -> int:
    """Where the head in ``buf[:filled]`` ends (the index of its blank line), -1 while it
    is incomplete; ProtocolError 431 once it is over ``max_header_bytes`` without one.
    ``search_from``: bytes before it were searched already (pass ``old filled - 3``)."""
    limit = limits.max_header_bytes
    end = buf.find(HEADER_END, max(0, search_from), min(filled, limit + 4))
    if end < 0 and filled > limit:
        raise ProtocolError(431, "headers-too-large", f"request headers exceed {limit} bytes")
    return end


def parse_head(head: str, limits: HTTPLimits) -> tuple[str, str, str, str, dict[str, str]]:
    """Request line and headers → (method, path, query, version, headers). No regex."""
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise ProtocolError(400, "bad-request-line", f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise ProtocolError(505, "http-version", f"unsupported HTTP version {version[:16]!r}")
        raise ProtocolError(400, "bad-request-line", f"malformed request line {lines[0][:80]!r}")
    if not method.isalpha() or not method.isupper():
        raise ProtocolError(400, "bad-request-line", f"malformed method {method[:16]!r}")
    if len(lines) - 1 > limits.max_headers:
        raise ProtocolError(
            431, "too-many-headers", f"more than {limits.max_headers} header fields"
        )
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise ProtocolError(400, "bad-header", f"malformed header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        prev = headers.get(key)
        if prev is not None:
            if key == "content-length" and prev != value:
                raise ProtocolError(400, "bad-content-length", "conflicting Content-Length")
            value = prev + ", " + value if key != "content-length" else value
        headers[key] = value
    path, _, query = target.partition("?")
    if "%" in path:
        path = unquote(path)
    return method, path, query, version, headers


def content_length(headers: dict[str, str], limits: HTTPLimits) -> int:
    """The request body's length, or ``CHUNKED``; ProtocolError for a malformed,
    conflicting or too large framing (agent/serving/httpbody.py)."""
    return transfer_length(headers, limits.max_body_bytes)


def keep_alive(version: str, headers: dict[str, str]) -> bool:
    """Whether the connection stays open after this request's answer (RFC 9112 §9.3)."""
    conn = headers.get("connection", "").lower()
    return "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn


@dataclass(frozen=True, slots=True)
class Head:
    """One request head, parsed and judged: read-only, so a cache may hand it out again."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    length: int  # bytes of body, or CHUNKED
    keep_alive: bool
    expect_continue: bool


def parse_request(raw: bytes | bytearray, limits: HTTPLimits) -> Head:
    """The bytes before the blank line → :class:`Head`; ProtocolError for what cannot be
    served (the shell answers it with :func:`error_bytes` and closes)."""
    method, path, query, version, headers = parse_head(raw.decode("latin-1"), limits)
    length = content_length(headers, limits)
    return Head(
        method,
        path,
        query,
        version,
        headers,
        length,
        keep_alive(version, headers),
        "100-continue" in headers.get("expect", "").lower(),
    )


class HeadCache(BoundedCache[bytes, Head]):
    """Parsed heads by their bytes: a program repeats the same head on every request."""

    def parse(self, raw: bytes, limits: HTTPLimits) -> Head:
        head = self.get(raw)
        if head is None:
            head = self.remember(raw, parse_request(raw, limits))
        return head


# --- responses -------------------------------------------------------------------------

_REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
# Pre-encoded status lines: building them per request costs more than the lookup.
_STATUS_LINES = {c: f"HTTP/1.1 {c} {reason}\r\n".encode() for c, reason in _REASONS.items()}
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_CLOSE = b"connection: close\r\n"
_SMALL_BODY = 64 * 1024  # bytes; below this a response is joined into one write


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Status {status}\r\n".encode()
    return line


def render_response(
    resp: Response, keep_alive: bool, head_only: bool = False, gather: bool = False
) -> list[Body]:
    """Status line, headers and body as buffers to write in order (a small response is
    joined into one buffer: one write, one packet). Framing headers are the server's.
    ``head_only``: the answer to a HEAD request, its headers (with the body's length).
    ``gather``: the writer sends all buffers with one ``sendmsg``, so only the head is
    joined (a JSON tensor's 45 KB are not copied once more)."""
    body = resp.body
    parts: Sequence[Body]
    if isinstance(body, (bytes, bytearray, memoryview)):
        parts = (body,)
        length = len(body) if not isinstance(body, memoryview) else body.nbytes
    else:
        parts = body
        length = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)
    head: list[Body] = [_status_line(resp.status)]
    for k, v in resp.headers.items():
        if k.lower() in ("content-length", "connection", "transfer-encoding"):
            continue  # framing is the server's business
        head.append(f"{k}: {v}\r\n".encode("latin-1"))
    head.append(b"content-length: %d\r\n" % length)
    head.append(_KEEP_ALIVE if keep_alive else _CLOSE)
    head.append(b"\r\n")
    if head_only:
        return [b"".join(head)]
    if length <= _SMALL_BODY and not (gather and len(parts) > 1):
        head.extend(parts)
        return [b"".join(head)]
    return [b"".join(head), *parts]


def error_response(exc: EdgewardError | ProtocolError) -> Response:
    """The one mapping from an error to its HTTP answer, for every socket and both
    servers: the v2 error body ``{"error", "code"}`` with the error's status, plus
    ``Retry-After`` for a refusal for load and ``Allow`` for a method not allowed."""
    headers: dict[str, str] | None = None
    retry = exc.retry_after if isinstance(exc, (OverloadedError, ProtocolError)) else None
    if retry is not None:
        headers = {"retry-after": str(max(1, math.ceil(retry)))}
    elif isinstance(exc, MethodNotAllowedError):
        headers = {"allow": exc.allow}
    return json_response(exc.status, {"error": exc.message, "code": exc.code}, headers)


def internal_error(what: str = "internal server error") -> Response:
    """500 for a bug in a handler (logged where it happened; the client gets a code)."""
    return json_response(500, {"error": what, "code": "internal"})


def error_bytes(exc: ProtocolError) -> bytes:
    """A protocol error on the wire: its v2 JSON answer, then the connection closes."""
    return b"".join(render_response(error_response(exc), False))
