"""Request body decoding, sans-I/O: the chunked transfer coding and gzip/deflate content
codings, bounded by the same ``max_body_bytes`` as a ``Content-Length`` body.

One home for both servers that read requests: the daemon's (``agent/serving/http.py``, an
asyncio protocol) and a worker's lent connections (``agent/serving/direct.py``, blocking
reads). Each feeds bytes in and takes a body out; neither parses chunks or inflates
data itself (STYLE rule 13).

Why these: ``requests`` and ``httpx`` send a generator body chunked, and tritonclient's
request compression sends ``Content-Encoding: gzip`` or ``deflate``. A decompressed body
is capped at ``max_body_bytes`` while it is inflated (a 1 KiB zip bomb that expands to
gigabytes stops at the cap with 413), and a chunked body is capped as it arrives.
"""

from __future__ import annotations

import zlib

from agent.errors import ProtocolError

__all__ = [
    "CHUNKED",
    "ChunkedDecoder",
    "ProtocolError",
    "decode_content",
    "transfer_length",
]

#: ``transfer_length`` result for a chunked body (its length is known only at its end).
CHUNKED = -1
_MAX_LINE = 4096  # bytes of one chunk-size line (with extensions) or trailer line


def _too_large(limit: int, what: str = "request body") -> ProtocolError:
    return ProtocolError(413, "payload-too-large", f"{what} exceeds the limit of {limit} bytes")


def transfer_length(headers: dict[str, str], max_body: int) -> int:
    """The body's framing from lower-cased headers: its length, or :data:`CHUNKED`.

    Raises:
        ProtocolError: 400 for a malformed or conflicting framing (``Transfer-Encoding``
            together with ``Content-Length`` is how requests are smuggled past proxies:
            refused), 501 for a transfer coding other than ``chunked``, 413 for a
            ``Content-Length`` over ``max_body``.
    """
    te = headers.get("transfer-encoding")
    if te is not None:
        if "content-length" in headers:
            raise ProtocolError(
                400, "bad-content-length", "both Transfer-Encoding and Content-Length"
            )
        codings = [c.strip().lower() for c in te.split(",") if c.strip()]
        if codings != ["chunked"]:
            raise ProtocolError(
                501,
                "transfer-encoding",
                f"Transfer-Encoding {te[:32]!r} is not supported; use chunked or Content-Length",
            )
        return CHUNKED
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        raise ProtocolError(400, "bad-content-length", f"malformed Content-Length {raw[:32]!r}")
    length = int(raw)
    if length > max_body:
        raise ProtocolError(
            413,
            "payload-too-large",
            f"request body of {length} bytes exceeds the limit of {max_body} bytes",
        )
    return length


# Chunked decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """The chunked transfer coding (RFC 9112 §7.1) as a state machine over bytes.

    ``feed(data)`` consumes what it can and returns how many bytes it used; an
    incomplete chunk-size or trailer line is left unconsumed, so the caller keeps it in
    its buffer and feeds it again with more bytes behind it. ``done`` turns True after
    the last chunk and the trailer; ``body`` holds the decoded bytes. Chunk extensions
    and trailer fields are read and ignored.
    """

    __slots__ = ("_left", "_state", "_trailer", "body", "max_body", "max_trailer")

    def __init__(self, max_body: int, max_trailer: int = 16 * 1024) -> None:
        self.max_body = max_body
        self.max_trailer = max_trailer
        self.body = bytearray()
        self._state = _SIZE
        self._left = 0
        self._trailer = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume bytes of ``data``; returns how many were used.

        Raises:
            ProtocolError: 400 ``bad-chunk`` for malformed framing, 413 when the decoded
                body would exceed ``max_body``, 431 for trailers over ``max_trailer``.
        """
        # One copy per feed: every line search below is then a bytes.find over a window,
        # not a slice copied per chunk (1-byte chunks made that quadratic in the window).
        raw = data if isinstance(data, bytes) else bytes(data)
        view = memoryview(raw)
        pos = 0
        end = len(raw)
        while pos < end and self._state != _DONE:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - pos)
                self.body += view[pos : pos + take]
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
                continue
            line_end = raw.find(b"\r\n", pos, min(end, pos + _MAX_LINE + 2))
            if line_end < 0:
                if end - pos > _MAX_LINE:
                    raise ProtocolError(400, "bad-chunk", "chunk line too long")
                break  # wait for the rest of the line
            line = raw[pos:line_end]
            pos = line_end + 2
            if state == _DATA_END:
                if line:
                    raise ProtocolError(400, "bad-chunk", "chunk data longer than its size")
                self._state = _SIZE
            elif state == _SIZE:
                size = _chunk_size(line)
                if len(self.body) + size > self.max_body:
                    raise _too_large(self.max_body)
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._left = size
                    self._state = _DATA
            elif not line:  # _TRAILER: fields until an empty line
                self._state = _DONE
            else:
                self._trailer += len(line) + 2
                if self._trailer > self.max_trailer:
                    raise ProtocolError(
                        431, "headers-too-large", "chunked trailer fields too large"
                    )
        return pos


def _chunk_size(line: bytes) -> int:
    digits = line.split(b";", 1)[0].strip(b" \t")
    if not digits or len(digits) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in digits):
        raise ProtocolError(400, "bad-chunk", f"malformed chunk size {line[:32]!r}")
    return int(digits, 16)


# Content codings → zlib window bits: gzip header, zlib header (RFC 9110 "deflate").
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_content(
    headers: dict[str, str], body: bytes | bytearray | memoryview, max_body: int
) -> bytes | bytearray | memoryview:
    """The body with its ``Content-Encoding`` undone (gzip, deflate, identity; several
    in the order they were applied). Without the header the body is returned as is.

    Raises:
        ProtocolError: 415 for an unknown coding, 400 ``bad-encoding`` for corrupt or
            truncated data, 413 when the decoded body would exceed ``max_body``
            (checked while inflating: a zip bomb never grows past the cap).
    """
    ce = headers.get("content-encoding")
    if ce is None:
        return body
    codings = [c.strip().lower() for c in ce.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        wbits = _CODINGS.get(coding)
        if wbits is None:
            raise ProtocolError(
                415,
                "unsupported-encoding",
                f"Content-Encoding {coding[:32]!r} is not supported; use gzip or deflate",
            )
        body = _inflate(body, wbits, max_body, coding)
    return body


def _inflate(
    data: bytes | bytearray | memoryview, wbits: int, max_body: int, coding: str
) -> bytearray:
    """Inflate with the output capped at ``max_body`` + 1 bytes (then 413)."""
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, max_body + 1)
    except zlib.error as exc:
        if wbits == zlib.MAX_WBITS:  # some clients send raw deflate without the zlib header
            return _inflate(data, -zlib.MAX_WBITS, max_body, coding)
        raise ProtocolError(
            400, "bad-encoding", f"{coding} request body is corrupt: {exc}"
        ) from None
    if len(out) > max_body:
        raise _too_large(max_body, f"{coding}-decoded request body")
    # Output under the cap means all input was read: no end of stream = truncated.
    if not d.eof:
        raise ProtocolError(400, "bad-encoding", f"{coding} request body is truncated")
    if d.unused_data:
        raise ProtocolError(400, "bad-encoding", f"bytes after the end of the {coding} data")
    return bytearray(out)  # writable, as other bodies (numpy.frombuffer views of it)
