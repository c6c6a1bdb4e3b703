"""Request body decoding, sans-I/O: the chunked transfer coding and gzip/deflate content
codings, bounded by the same ``max_body_bytes`` as a ``Content-Length`` body.

One home for both servers that read requests: the daemon's (``agent/serving/http.py``, an
asyncio protocol) and a worker's lent connections (``agent/serving/direct.py``, blocking
reads). Each feeds bytes in and takes a body out; neither parses chunks or inflates
data itself (STYLE rule 13).

Why these: ``requests`` and ``httpx`` send a generator body chunked, and tritonclient's
request compression sends ``Content-Encoding: gzip`` or ``deflate``.

Both are held to the limits of a plain body, because neither has a ``Content-Length``
to refuse up front:

* the decoded bytes are charged to the server's body budget (``max_inflight_body_bytes``,
  agent/serving/http.py ``BodyBudget``) as they are produced, through a :class:`Charge` the
  caller releases once the request is answered: many chunked or compressed bodies at
  once get 503 ``body-budget`` like plain ones;
* a decompressed body stops at ``max_body_bytes`` and at :data:`MAX_RATIO` times its
  compressed size (above :data:`RATIO_FLOOR`), checked while inflating, a piece at a
  time: a 1 KiB bomb that expands to gigabytes is refused with 413 after at most
  ``RATIO_FLOOR`` bytes, and nested codings (``gzip, gzip``) multiply nothing;
* a chunked body may have at most :data:`MAX_CHUNKS` chunks plus one per
  :data:`CHUNK_BYTES` of data (413 ``too-many-chunks``): a stream of 1-byte chunks
  costs Python a loop turn per byte, which would make parsing, not the body, the cost
  of a request (bounded so to ~1 µs of parsing per 256 bytes).
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

from agent.errors import ProtocolError

__all__ = [
    "CHUNKED",
    "CHUNK_BYTES",
    "MAX_CHUNKS",
    "MAX_RATIO",
    "RATIO_FLOOR",
    "Budget",
    "Charge",
    "ChunkedDecoder",
    "ProtocolError",
    "decode_content",
    "transfer_length",
]

#: ``transfer_length`` result for a chunked body (its length is known only at its end).
CHUNKED = -1
_MAX_LINE = 4096  # bytes of one chunk-size line (with extensions) or trailer line
#: Chunks a body may have beyond one per ``CHUNK_BYTES`` of its data (an 8 KiB-chunked
#: body never comes near it; 1-byte chunks stop after this many).
MAX_CHUNKS = 1024
CHUNK_BYTES = 256
#: A decoded body may be this many times its encoded size (deflate's own limit is about
#: 1032:1, reached only by runs of one byte) ...
MAX_RATIO = 256
#: ... once it is past this many bytes (small bodies of zeros are fine).
RATIO_FLOOR = 1024 * 1024
_PIECE = 1024 * 1024  # bytes inflated per step (charged before the next step)
_WINDOW = 256 * 1024  # encoded bytes given to zlib per step


class Budget(Protocol):
    """The server's shared body budget (``agent.serving.http.BodyBudget``)."""

    limit: int

    def take(self, n: int) -> bool: ...

    def give(self, n: int) -> None: ...


def over_budget(budget: Budget) -> ProtocolError:
    """503 ``body-budget``: bodies in flight would pass the budget (retry later)."""
    return ProtocolError(
        503,
        "body-budget",
        f"request bodies in flight exceed {budget.limit} bytes; retry later",
        retry_after=1.0,
    )


class Charge:
    """Bytes of one decoded body charged to a budget; :meth:`release` once answered.
    Without a budget it only counts."""

    __slots__ = ("budget", "n")

    def __init__(self, budget: Budget | None) -> None:
        self.budget = budget
        self.n = 0  # bytes charged now

    def add(self, n: int) -> None:
        """Charge ``n`` more bytes.

        Raises:
            ProtocolError: 503 ``body-budget`` (nothing charged) past the budget.
        """
        if self.budget is not None and not self.budget.take(n):
            raise over_budget(self.budget)
        self.n += n

    def release(self) -> None:
        """Give every byte back (idempotent)."""
        if self.n and self.budget is not None:
            self.budget.give(self.n)
        self.n = 0


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
    the last chunk and the trailer; ``body`` holds the decoded bytes, charged to
    ``budget`` as they arrive (call :meth:`release` once the request is answered or
    refused). Chunk extensions and trailer fields are read and ignored.
    """

    __slots__ = (
        "_chunks",
        "_left",
        "_state",
        "_trailer",
        "body",
        "charge",
        "max_body",
        "max_trailer",
    )

    def __init__(
        self, max_body: int, max_trailer: int = 16 * 1024, budget: Budget | None = None
    ) -> None:
        self.max_body = max_body
        self.max_trailer = max_trailer
        self.body = bytearray()
        self.charge = Charge(budget)
        self._state = _SIZE
        self._left = 0
        self._trailer = 0
        self._chunks = 0

    def release(self) -> None:
        """The body's bytes go back to the budget (idempotent)."""
        self.charge.release()

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume bytes of ``data``; returns how many were used.

        Raises:
            ProtocolError: 400 ``bad-chunk`` for malformed framing, 413 when the decoded
                body would exceed ``max_body`` or has too many chunks for its size
                (``too-many-chunks``), 431 for trailers over ``max_trailer``, 503
                ``body-budget`` past the server's budget.
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
                self.charge.add(take)
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
                    self._chunks += 1
                    if self._chunks > MAX_CHUNKS + len(self.body) // CHUNK_BYTES:
                        raise ProtocolError(
                            413,
                            "too-many-chunks",
                            f"chunked request body has more than {self._chunks - 1} chunks "
                            f"for {len(self.body)} bytes; send larger chunks",
                        )
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
    headers: dict[str, str],
    body: bytes | bytearray | memoryview,
    max_body: int,
    charge: Charge | None = None,
) -> bytes | bytearray | memoryview:
    """The body with its ``Content-Encoding`` undone (gzip, deflate, identity; several
    in the order they were applied). Without the header the body is returned as is.
    The decoded bytes are charged to ``charge`` as they are inflated (the caller
    releases it once the request is answered, or refused: it holds what was charged).

    Raises:
        ProtocolError: 415 for an unknown coding, 400 ``bad-encoding`` for corrupt or
            truncated data, 413 when the decoded body would exceed ``max_body`` or
            :data:`MAX_RATIO` times the encoded size (checked while inflating: a zip
            bomb never grows past the cap), 503 ``body-budget`` past the budget.
    """
    ce = headers.get("content-encoding")
    if ce is None:
        return body
    if charge is None:
        charge = Charge(None)
    codings = [c.strip().lower() for c in ce.split(",") if c.strip()]
    encoded = len(body)  # the ratio cap of every layer: nesting codings gains nothing
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
        body = _inflate(
            body, wbits, max_body=max_body, encoded=encoded, coding=coding, charge=charge
        )
    return body


def _inflate(
    data: bytes | bytearray | memoryview,
    wbits: int,
    *,
    max_body: int,
    encoded: int,
    coding: str,
    charge: Charge,
) -> bytearray:
    """Inflate a piece at a time, each charged before the next, the output capped at
    ``max_body`` and at ``MAX_RATIO`` x ``encoded`` bytes above ``RATIO_FLOOR`` (413)."""
    ratio_cap = max(RATIO_FLOOR, MAX_RATIO * encoded)
    d = zlib.decompressobj(wbits)
    out = bytearray()  # writable, as other bodies (numpy.frombuffer views of it)
    src = memoryview(data)
    pos = 0
    # Input goes in a window at a time: zlib copies what a capped call leaves unread
    # (``unconsumed_tail``), and a whole large body copied per piece is quadratic.
    pending: Any = b""
    try:
        while not d.eof:
            if not pending and pos < src.nbytes:
                pending = src[pos : pos + _WINDOW]
                pos += _WINDOW
            piece = d.decompress(pending, _PIECE)
            pending = d.unconsumed_tail
            if not piece:
                if not pending and pos >= src.nbytes:
                    break  # all input read, no end of stream: truncated (below)
                continue
            if len(out) + len(piece) > max_body:
                raise _too_large(max_body, f"{coding}-decoded request body")
            if len(out) + len(piece) > ratio_cap:
                raise ProtocolError(
                    413,
                    "payload-too-large",
                    f"{coding}-decoded request body expands more than {MAX_RATIO}x its "
                    f"{encoded} bytes as sent (a decompression bomb?); send it uncompressed",
                )
            charge.add(len(piece))
            out += piece
    except zlib.error as exc:
        if wbits == zlib.MAX_WBITS and not out:  # raw deflate without the zlib header
            return _inflate(
                data,
                -zlib.MAX_WBITS,
                max_body=max_body,
                encoded=encoded,
                coding=coding,
                charge=charge,
            )
        raise ProtocolError(
            400, "bad-encoding", f"{coding} request body is corrupt: {exc}"
        ) from None
    if not d.eof:
        raise ProtocolError(400, "bad-encoding", f"{coding} request body is truncated")
    if d.unused_data or pos < src.nbytes:
        raise ProtocolError(400, "bad-encoding", f"bytes after the end of the {coding} data")
    return out
