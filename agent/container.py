"""The model container of GB/T 42382.2 §8.2.2 (``Model/<file>`` inside a package).

A container is one file header followed, per model, by a model header and that model's
data. All integers are little-endian and every struct has a fixed size, so a device
parses it with ``struct`` and never reads a byte it did not expect. The byte-by-byte
layout is in ``docs/FORMAT.md`` ("Model container"); ``tests/vectors/container_v1.bin``
is a decoded example.

Model data is the model after its encoding transforms, applied in this order by the
writer and undone in reverse by the reader: residual patch (done by the residual
module before the data gets here) → zstd → STREAM AEAD encryption. Encrypted data
starts with a 16-byte encryption preamble (nonce prefix, chunk size) that is part of
the AAD, and every chunk's AAD also binds the magic, the format version and the model
header fields (all but the data length, which the writer back-patches and which the
STREAM last-chunk flag pins down anyway).

The reader trusts nothing: it checks every header field against ``ContainerLimits`` and
the bytes actually present, and its per-model readers never read past the declared
data length.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import IO, Any, BinaryIO, cast

from agent import crypto
from agent.errors import CryptoError, FormatError, LimitError, UnsupportedVersionError

logger = logging.getLogger(__name__)

MAGIC = b"EMPC"
MAGIC_U32 = struct.unpack("<I", MAGIC)[0]  # 0x43504D45
FORMAT_VERSION = 1

FILE_HEADER = struct.Struct("<IIII")  # magic, version, model count, header size
FILE_HEADER_SIZE = FILE_HEADER.size  # 16
MODEL_HEADER = struct.Struct("<IIIIQ")  # model id, format, flags, header size, data length
MODEL_HEADER_SIZE = MODEL_HEADER.size  # 24
PREAMBLE = struct.Struct("<7sBII")  # nonce prefix, reserved u8, chunk size, reserved u32
PREAMBLE_SIZE = PREAMBLE.size  # 16
AAD_PREFIX = b"EMPC-AAD"  # domain separation of the chunk AAD (see docs/FORMAT.md)

FLAG_RESIDUAL = 1 << 0
FLAG_ZSTD = 1 << 1
FLAG_ENCRYPTED = 1 << 2
ALG_SHIFT = 8
ALG_MASK = 0xF << ALG_SHIFT
KNOWN_FLAGS = FLAG_RESIDUAL | FLAG_ZSTD | FLAG_ENCRYPTED | ALG_MASK

ALG_IDS = {"aes-256-gcm": 1, "sm4-gcm": 2, "chacha20-poly1305": 3}
ALG_NAMES = {v: k for k, v in ALG_IDS.items()}

MAX_ZSTD_LEVEL = 19  # higher levels need windows > 8 MiB, too much for small devices
ZSTD_MAX_WINDOW = 1 << 25  # the device refuses frames needing a larger window (32 MiB)
_COPY = 1 << 20


class ModelFormat(IntEnum):
    """Values of the model header ``format`` field."""

    ONNX = 1
    TFLITE = 2
    RAW = 3  # any other file; the runtime does not load it directly

    @classmethod
    def from_name(cls, name: str) -> ModelFormat:
        """``"onnx" | "tflite" | "raw"/"other"`` to the enum (manifest uses names)."""
        key = name.lower()
        if key == "other":
            key = "raw"
        try:
            return cls[key.upper()]
        except KeyError:
            raise FormatError(f"unknown model format {name!r}", code="container-format") from None

    @property
    def label(self) -> str:
        return self.name.lower()


def encoding_flags(*, residual: bool = False, zstd: bool = False, alg: str | None = None) -> int:
    """Build the ``encoding flags`` field; ``alg`` set means encrypted with it."""
    flags = (FLAG_RESIDUAL if residual else 0) | (FLAG_ZSTD if zstd else 0)
    if alg is not None:
        flags |= FLAG_ENCRYPTED | (ALG_IDS[crypto.check_alg(alg)] << ALG_SHIFT)
    return flags


@dataclass(frozen=True)
class ContainerLimits:
    """Caps a device applies to untrusted containers."""

    max_models: int = 64
    max_model_bytes: int = 64 << 30  # per model, stored (encoded) size, 64 GiB
    max_decoded_bytes: int = 64 << 30  # per model, after decrypt + decompress
    max_chunk_size: int = crypto.MAX_CHUNK_SIZE


@dataclass(frozen=True)
class FileHeader:
    magic: int
    version: int
    model_count: int
    header_size: int

    def pack(self) -> bytes:
        return FILE_HEADER.pack(self.magic, self.version, self.model_count, self.header_size)


@dataclass(frozen=True)
class ModelHeader:
    """One model header. ``flags`` is the raw encoding-flags field."""

    model_id: int
    format: int
    flags: int
    header_size: int
    data_length: int

    def pack(self) -> bytes:
        return MODEL_HEADER.pack(
            self.model_id, self.format, self.flags, self.header_size, self.data_length
        )

    @property
    def residual(self) -> bool:
        return bool(self.flags & FLAG_RESIDUAL)

    @property
    def zstd(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def alg(self) -> str | None:
        """AEAD algorithm name if encrypted, else None."""
        if not self.encrypted:
            return None
        return ALG_NAMES[(self.flags & ALG_MASK) >> ALG_SHIFT]

    @property
    def format_name(self) -> str:
        return ModelFormat(self.format).label

    def encoding(self) -> list[str]:
        """Manifest-style list of transforms in applied order, e.g. ["zstd", "aes-256-gcm"]."""
        out = []
        if self.residual:
            out.append("residual")
        if self.zstd:
            out.append("zstd")
        if self.encrypted:
            out.append(str(self.alg))
        return out


def chunk_aad(header: ModelHeader, preamble: bytes) -> bytes:
    """The header AAD every encrypted chunk of this model binds (before index ‖ last).

    ``"EMPC-AAD" ‖ u32 version ‖ model header bytes 0..15 (id, format, flags, header
    size) ‖ the 16-byte encryption preamble``. The data length (bytes 16..23) is left
    out because the writer learns it only after encrypting.
    """
    return AAD_PREFIX + struct.pack("<I", FORMAT_VERSION) + header.pack()[:16] + preamble


def parse_file_header(data: bytes, limits: ContainerLimits | None = None) -> FileHeader:
    """Parse and validate the 16-byte file header."""
    limits = limits or ContainerLimits()
    if len(data) < FILE_HEADER_SIZE:
        raise FormatError(
            f"container truncated in the file header ({len(data)} of {FILE_HEADER_SIZE} bytes)",
            code="container-truncated",
        )
    magic, version, count, size = FILE_HEADER.unpack_from(data)
    if magic != MAGIC_U32:
        raise FormatError(
            f"not a model container: magic {magic:#010x}, expected {MAGIC_U32:#010x} ('EMPC')",
            code="container-magic",
        )
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"container format version {version} is not supported (this agent reads "
            f"{FORMAT_VERSION})",
            code="container-version",
        )
    if size != FILE_HEADER_SIZE:
        raise FormatError(
            f"file header size field is {size}, expected {FILE_HEADER_SIZE}",
            code="container-header-size",
        )
    if count == 0 or count > limits.max_models:
        raise FormatError(
            f"model count {count} outside 1..{limits.max_models}", code="container-model-count"
        )
    return FileHeader(magic, version, count, size)


def parse_model_header(
    data: bytes, limits: ContainerLimits | None = None, *, index: int = 0
) -> ModelHeader:
    """Parse and validate one 24-byte model header (``index`` is for messages)."""
    limits = limits or ContainerLimits()
    if len(data) < MODEL_HEADER_SIZE:
        raise FormatError(
            f"container truncated in model header {index} "
            f"({len(data)} of {MODEL_HEADER_SIZE} bytes)",
            code="container-truncated",
        )
    model_id, fmt, flags, size, length = MODEL_HEADER.unpack_from(data)
    where = f"model header {index}"
    if size != MODEL_HEADER_SIZE:
        raise FormatError(
            f"{where}: header size field is {size}, expected {MODEL_HEADER_SIZE}",
            code="container-model-header-size",
        )
    if fmt not in ModelFormat._value2member_map_:
        raise FormatError(f"{where}: unknown model format code {fmt}", code="container-format")
    if flags & ~KNOWN_FLAGS:
        raise FormatError(
            f"{where}: unknown encoding flag bits {flags & ~KNOWN_FLAGS:#x}",
            code="container-flags",
        )
    alg_id = (flags & ALG_MASK) >> ALG_SHIFT
    if flags & FLAG_ENCRYPTED:
        if alg_id not in ALG_NAMES:
            raise FormatError(
                f"{where}: unknown encryption algorithm id {alg_id}", code="container-alg"
            )
        if length < PREAMBLE_SIZE + crypto.TAG_SIZE:
            raise FormatError(
                f"{where}: encrypted data length {length} is shorter than its preamble and one tag",
                code="container-data-length",
            )
    elif alg_id:
        raise FormatError(
            f"{where}: algorithm id {alg_id} set on unencrypted data", code="container-alg"
        )
    if length > limits.max_model_bytes:
        raise FormatError(
            f"{where}: data length {length} exceeds the limit {limits.max_model_bytes}",
            code="container-data-length",
        )
    return ModelHeader(model_id, fmt, flags, size, length)


def parse_preamble(data: bytes, limits: ContainerLimits | None = None) -> tuple[bytes, int]:
    """Parse the encryption preamble; returns ``(nonce_prefix, chunk_size)``."""
    limits = limits or ContainerLimits()
    if len(data) < PREAMBLE_SIZE:
        raise FormatError(
            "container truncated in the encryption preamble", code="container-truncated"
        )
    prefix, res1, chunk_size, res2 = PREAMBLE.unpack_from(data)
    if res1 or res2:
        raise FormatError(
            "encryption preamble reserved bytes are not zero", code="container-preamble"
        )
    if not 1 <= chunk_size <= limits.max_chunk_size:
        raise FormatError(
            f"encryption chunk size {chunk_size} outside 1..{limits.max_chunk_size}",
            code="container-chunk-size",
        )
    return prefix, chunk_size


# --- writer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Encryption:
    """How a model is encrypted: the package's data key, algorithm and chunk size."""

    key: bytes
    alg: str = crypto.DEFAULT_ALG
    chunk_size: int = crypto.DEFAULT_CHUNK_SIZE
    nonce_prefix: bytes | None = None  # None = random (always, except for test vectors)

    def __repr__(self) -> str:  # never show the key
        return f"Encryption(alg={self.alg!r}, chunk_size={self.chunk_size})"


class ContainerWriter:
    """Stream models into a container on a seekable binary file.

    Usage::

        with ContainerWriter(f) as w:
            w.begin_model(0, ModelFormat.ONNX, zstd_level=3, encryption=Encryption(key))
            for piece in source: w.write(piece)
            header = w.end_model()

    ``write`` takes the model bytes *before* zstd/encryption (already residual-encoded if
    ``residual=True``); the writer compresses and encrypts as data streams through, so
    memory stays at about one chunk. The model header is written with data length 0
    and back-patched by ``end_model`` (hence the seekable ``dst``); the file header's
    model count is back-patched by ``close``. ``dst`` must be positioned where the
    container starts; nothing before that position is touched.
    """

    def __init__(self, dst: BinaryIO) -> None:
        if not dst.seekable():
            raise ValueError("ContainerWriter needs a seekable file")
        self._dst = dst
        self._start = dst.tell()
        self._count = 0
        self._ids: set[int] = set()
        self._open: _OpenModel | None = None
        self._closed = False
        dst.write(FileHeader(MAGIC_U32, FORMAT_VERSION, 0, FILE_HEADER_SIZE).pack())

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()

    def begin_model(
        self,
        model_id: int,
        fmt: ModelFormat | int,
        *,
        residual: bool = False,
        zstd_level: int | None = None,
        encryption: Encryption | None = None,
    ) -> None:
        """Start a model. ``zstd_level`` None means no compression."""
        if self._open is not None or self._closed:
            raise ValueError("end the current model (or open a new writer) first")
        if not 0 <= model_id <= 0xFFFFFFFF or model_id in self._ids:
            raise ValueError(f"model id {model_id} is out of range or already used")
        fmt = ModelFormat(fmt)
        if zstd_level is not None and not 1 <= zstd_level <= MAX_ZSTD_LEVEL:
            raise ValueError(f"zstd level must be 1..{MAX_ZSTD_LEVEL}")
        flags = encoding_flags(
            residual=residual,
            zstd=zstd_level is not None,
            alg=encryption.alg if encryption else None,
        )
        header = ModelHeader(model_id, int(fmt), flags, MODEL_HEADER_SIZE, 0)
        # Build the transforms first so a bad key or chunk size raises before any byte
        # of this model is written.
        om = _OpenModel(header, self._dst.tell())
        preamble = b""
        if encryption is not None:
            crypto.check_chunk_size(encryption.chunk_size)
            prefix = encryption.nonce_prefix or os.urandom(crypto.NONCE_PREFIX_SIZE)
            preamble = PREAMBLE.pack(prefix, 0, encryption.chunk_size, 0)
            om.encryptor = crypto.StreamEncryptor(
                encryption.key,
                encryption.alg,
                chunk_aad(header, preamble),
                encryption.chunk_size,
                prefix,
            )
        if zstd_level is not None:
            import zstandard

            params = zstandard.ZstdCompressionParameters.from_level(zstd_level, write_checksum=True)
            om.compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
        self._dst.write(header.pack())
        self._emit(om, preamble)
        self._ids.add(model_id)
        self._open = om

    def _emit(self, om: _OpenModel, data: bytes) -> None:
        if data:
            self._dst.write(data)
            om.length += len(data)

    def _push(self, om: _OpenModel, data: bytes) -> None:
        if om.encryptor is not None:
            data = om.encryptor.update(data)
        self._emit(om, data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add model bytes (pre-compression, pre-encryption)."""
        om = self._open
        if om is None:
            raise ValueError("begin_model first")
        view = memoryview(data).cast("B")
        om.plain += len(view)
        # Bound what one call hands to the compressor/encryptor.
        for pos in range(0, len(view), 64 << 20):
            piece = bytes(view[pos : pos + (64 << 20)])
            if om.compressor is not None:
                piece = om.compressor.compress(piece)
            self._push(om, piece)

    def write_from(self, src: BinaryIO) -> None:
        """Copy a whole stream into the current model, 1 MiB at a time."""
        while piece := src.read(_COPY):
            self.write(piece)

    def end_model(self) -> ModelHeader:
        """Flush the transforms, back-patch the data length and return the header."""
        om = self._open
        if om is None:
            raise ValueError("no model is open")
        if om.compressor is not None:
            self._push(om, om.compressor.flush())
        if om.encryptor is not None:
            self._emit(om, om.encryptor.finalize())
        end = self._dst.tell()
        header = ModelHeader(
            om.header.model_id, om.header.format, om.header.flags, MODEL_HEADER_SIZE, om.length
        )
        self._dst.seek(om.pos)
        self._dst.write(header.pack())
        self._dst.seek(end)
        self._count += 1
        self._open = None
        logger.debug(
            "container model %d: %d bytes in, %d bytes stored, encoding %s",
            header.model_id,
            om.plain,
            om.length,
            header.encoding(),
        )
        return header

    def add_model(
        self,
        model_id: int,
        fmt: ModelFormat | int,
        src: BinaryIO,
        *,
        residual: bool = False,
        zstd_level: int | None = None,
        encryption: Encryption | None = None,
    ) -> ModelHeader:
        """``begin_model`` + ``write_from(src)`` + ``end_model``."""
        self.begin_model(
            model_id, fmt, residual=residual, zstd_level=zstd_level, encryption=encryption
        )
        self.write_from(src)
        return self.end_model()

    def close(self) -> None:
        """Back-patch the model count. A container needs at least one model."""
        if self._closed:
            return
        if self._open is not None:
            raise ValueError("a model is still open")
        if self._count == 0:
            raise ValueError("a container needs at least one model")
        end = self._dst.tell()
        self._dst.seek(self._start)
        self._dst.write(FileHeader(MAGIC_U32, FORMAT_VERSION, self._count, FILE_HEADER_SIZE).pack())
        self._dst.seek(end)
        self._closed = True


@dataclass
class _OpenModel:
    header: ModelHeader
    pos: int
    length: int = 0
    plain: int = 0
    compressor: Any = None
    encryptor: crypto.StreamEncryptor | None = None


# --- reader ---------------------------------------------------------------------------


def _read_exact(src: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = src.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


class BoundedReader(io.RawIOBase):
    """Reads at most ``length`` bytes of ``src``; EOF before that is a FormatError."""

    def __init__(self, src: BinaryIO, length: int, what: str) -> None:
        super().__init__()
        self._src = src
        self.remaining = length
        self._what = what

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        if size == 0:
            return b""
        data = self._src.read(min(size, _COPY * 4))
        if not data:
            raise FormatError(
                f"container truncated in {self._what} ({self.remaining} bytes missing)",
                code="container-truncated",
            )
        self.remaining -= len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buf))
        memoryview(buf).cast("B")[: len(data)] = data
        return len(data)

    def skip(self) -> None:
        while self.remaining:
            self.read(_COPY)


class ContainerReader:
    """Parse a container from a binary stream, one model at a time.

    The file header is read and checked on construction. Iterating yields
    :class:`ModelEntry` objects in order; an entry's data must be consumed (or is
    skipped) before the next header is read, so ``src`` need not be seekable. Pass
    ``total_size`` (e.g. the tar member size) so impossible data lengths are refused
    before any data is read; seekable sources are measured automatically.
    """

    def __init__(
        self,
        src: BinaryIO,
        limits: ContainerLimits | None = None,
        *,
        total_size: int | None = None,
    ) -> None:
        self._src = src
        self.limits = limits or ContainerLimits()
        if total_size is None and _seekable(src):
            try:
                here = src.tell()
                total_size = src.seek(0, io.SEEK_END) - here
                src.seek(here)
            except OSError:  # claims to be seekable but is not (some wrapped streams)
                total_size = None
        self._remaining = total_size
        self.header = parse_file_header(_read_exact(src, FILE_HEADER_SIZE), self.limits)
        self._consume(FILE_HEADER_SIZE)
        self._current: ModelEntry | None = None
        self._started = False

    def _consume(self, n: int) -> None:
        if self._remaining is not None:
            self._remaining -= n

    def __iter__(self) -> Iterator[ModelEntry]:
        if self._started:
            raise ValueError("a ContainerReader can be iterated once")
        self._started = True
        seen: set[int] = set()
        for index in range(self.header.model_count):
            if self._current is not None:
                self._current.raw.skip()
            if self._remaining is not None and self._remaining < MODEL_HEADER_SIZE:
                raise FormatError(
                    f"container truncated before model header {index} "
                    f"({self._remaining} of {MODEL_HEADER_SIZE} bytes)",
                    code="container-truncated",
                )
            header = parse_model_header(
                _read_exact(self._src, MODEL_HEADER_SIZE), self.limits, index=index
            )
            self._consume(MODEL_HEADER_SIZE)
            if header.model_id in seen:
                raise FormatError(
                    f"model header {index}: duplicate model id {header.model_id}",
                    code="container-model-id",
                )
            seen.add(header.model_id)
            if self._remaining is not None and header.data_length > self._remaining:
                raise FormatError(
                    f"model header {index}: data length {header.data_length} exceeds the "
                    f"{self._remaining} bytes left in the container",
                    code="container-data-length",
                )
            self._consume(header.data_length)
            raw = BoundedReader(self._src, header.data_length, f"the data of model {index}")
            self._current = ModelEntry(header, raw, index, self.limits)
            yield self._current
        if self._current is not None:
            self._current.raw.skip()
        if self._remaining not in (None, 0) or (self._remaining is None and self._src.read(1)):
            raise FormatError("bytes after the last model", code="container-trailing")


def read_headers(
    src: BinaryIO, limits: ContainerLimits | None = None, *, total_size: int | None = None
) -> tuple[FileHeader, list[ModelHeader]]:
    """All headers of a container, skipping (not decoding) the data; for ``inspect``."""
    reader = ContainerReader(src, limits, total_size=total_size)
    return reader.header, [entry.header for entry in reader]


def _seekable(src: BinaryIO) -> bool:
    try:
        return bool(src.seekable())
    except (AttributeError, OSError):
        return False


@dataclass
class ModelEntry:
    """One model: its header, a bounded reader over its stored bytes, and decoding."""

    header: ModelHeader
    raw: BoundedReader
    index: int
    limits: ContainerLimits

    def decoded(self, key: bytes | None = None, *, read_size: int = _COPY) -> Iterator[bytes]:
        """Yield the model bytes with zstd and encryption undone, streaming.

        Residual patches are not applied here (the residual module needs the base
        model); for a residual model this yields the patch stream.

        Raises:
            CryptoError: ``no-data-key`` if encrypted and ``key`` is None.
            IntegrityError: chunk-auth / stream-truncated / stream-trailing.
            FormatError: ``zstd-corrupt`` for a bad compressed stream.
            LimitError: ``decoded-size`` above ``limits.max_decoded_bytes``.
        """
        if self.raw.remaining != self.header.data_length:
            raise ValueError("model data was already (partly) read; decode it only once")
        src: io.RawIOBase = self.raw
        if self.header.encrypted:
            if key is None:
                raise CryptoError(
                    f"model {self.header.model_id} is encrypted and no data key was given",
                    code="no-data-key",
                )
            src = _DecryptingReader(self, key)
        produced = 0
        if self.header.zstd:
            stream = _zstd_pieces(src, read_size, self.index)
        else:
            stream = iter(lambda: src.read(read_size), b"")
        for piece in stream:
            produced += len(piece)
            if produced > self.limits.max_decoded_bytes:
                raise LimitError(
                    f"model {self.header.model_id} decodes to more than "
                    f"{self.limits.max_decoded_bytes} bytes",
                    code="decoded-size",
                )
            yield piece

    def open(self, key: bytes | None = None) -> BinaryIO:
        """The decoded model as a read-only binary file object (see :meth:`decoded`)."""
        return cast(BinaryIO, io.BufferedReader(_IterReader(self.decoded(key)), _COPY))


class _ZstdFrameScanner:
    """Walks the zstd frame structure (RFC 8878 §3.1) of the bytes passing by.

    ``stream_reader`` bounds output per call (no decompression bomb) but reports
    neither a frame cut short nor bytes after the frame. This scanner reads only the
    frame header and the 3-byte block headers, skipping block contents, so it knows
    exactly where the single frame ends: bytes after it are ``zstd-trailing``, a stream
    ending before it is ``zstd-truncated``. Decoding errors inside blocks are left to
    zstd itself.
    """

    ZSTD_MAGIC = 0xFD2FB528

    def __init__(self, index: int) -> None:
        self._index = index
        self._pending = bytearray()
        self._need = 5  # magic (4) + frame header descriptor (1)
        self._handler: Callable[[bytes], None] | None = self._on_magic
        self._skip = 0
        self._checksum = False

    @property
    def done(self) -> bool:
        return self._handler is None and self._skip == 0

    def _fail(self, what: str, code: str) -> FormatError:
        return FormatError(f"model {self._index}: {what}", code=code)

    def _expect(self, n: int, handler: Callable[[bytes], None] | None) -> None:
        self._need, self._handler = n, handler

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._skip:
                step = min(self._skip, len(view) - pos)
                self._skip -= step
                pos += step
                continue
            handler = self._handler
            if handler is None:
                raise self._fail("data after the zstd frame", "zstd-trailing")
            take = min(self._need - len(self._pending), len(view) - pos)
            self._pending += view[pos : pos + take]
            pos += take
            if len(self._pending) == self._need:
                buf = bytes(self._pending)
                self._pending.clear()
                handler(buf)

    def _on_magic(self, buf: bytes) -> None:
        magic, fhd = struct.unpack("<IB", buf)
        if magic != self.ZSTD_MAGIC or fhd & 0x08:  # bit 3 is reserved
            raise self._fail("not a zstd frame", "zstd-corrupt")
        single = bool(fhd & 0x20)
        fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        did = (0, 1, 2, 4)[fhd & 0x03]
        self._checksum = bool(fhd & 0x04)
        rest = (0 if single else 1) + did + fcs
        if rest:
            self._expect(rest, lambda _b: self._expect(3, self._on_block))
        else:
            self._expect(3, self._on_block)

    def _on_block(self, buf: bytes) -> None:
        (hdr,) = struct.unpack("<I", buf + b"\0")
        last, btype, size = hdr & 1, (hdr >> 1) & 3, hdr >> 3
        if btype == 3:
            raise self._fail("reserved zstd block type", "zstd-corrupt")
        self._skip = 1 if btype == 1 else size  # RLE blocks carry one byte
        if not last:
            self._expect(3, self._on_block)
        elif self._checksum:
            self._expect(4, lambda _b: self._expect(0, None))
        else:
            self._expect(0, None)


class _ScannedSource(io.RawIOBase):
    """Source wrapper feeding every byte read through a frame scanner."""

    def __init__(self, src: io.RawIOBase, scanner: _ZstdFrameScanner) -> None:
        super().__init__()
        self._src = src
        self._scanner = scanner

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._src.read(-1 if size is None else size)
        if data:
            self._scanner.feed(data)
        return data or b""

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buf))
        memoryview(buf).cast("B")[: len(data)] = data
        return len(data)


class _IterReader(io.RawIOBase):
    """Read-only file object over an iterator of byte pieces."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        super().__init__()
        self._pieces = pieces
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            nxt = next(self._pieces, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(buf), len(self._buf))
        memoryview(buf).cast("B")[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _zstd_pieces(src: io.RawIOBase, read_size: int, index: int) -> Iterator[bytes]:
    """Decompress exactly one zstd frame with output bounded per step.

    ``stream_reader`` returns at most ``read_size`` bytes per call however well the
    input compresses, so a decompression bomb costs time, not memory, and the decoded
    size limit stops it.
    """
    import zstandard

    scanner = _ZstdFrameScanner(index)
    source = _ScannedSource(src, scanner)
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    reader = dctx.stream_reader(
        cast(IO[bytes], source), read_size=128 * 1024, read_across_frames=False
    )
    try:
        while piece := reader.read(read_size):
            yield piece
    except zstandard.ZstdError as exc:
        raise FormatError(
            f"model {index}: corrupt zstd stream ({exc})", code="zstd-corrupt"
        ) from exc
    while source.read(_COPY):  # feed the rest through the scanner: trailing data raises
        pass
    if not scanner.done:
        raise FormatError(f"model {index}: zstd stream truncated", code="zstd-truncated")


class _DecryptingReader(io.RawIOBase):
    """File-like plaintext view over an encrypted model's bounded raw reader."""

    def __init__(self, entry: ModelEntry, key: bytes) -> None:
        super().__init__()
        self._raw = entry.raw
        preamble = _read_exact(entry.raw, PREAMBLE_SIZE)  # type: ignore[arg-type]
        prefix, chunk_size = parse_preamble(preamble, entry.limits)
        alg = entry.header.alg
        assert alg is not None
        self._dec = crypto.StreamDecryptor(
            key, alg, chunk_aad(entry.header, preamble), chunk_size, prefix
        )
        self._step = chunk_size + crypto.TAG_SIZE
        self._buf = memoryview(b"")
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Decrypt the next chunk when the current one is used up; False at the end."""
        while self._pos >= len(self._buf):
            if self._eof:
                return False
            data = self._raw.read(self._step)
            if data:
                self._buf = memoryview(self._dec.update(data))
            else:
                self._buf = memoryview(self._dec.finalize())
                self._eof = True
            self._pos = 0
        return True

    def read(self, size: int | None = -1) -> bytes:
        # An offset into the decrypted chunk instead of re-slicing it on every read:
        # the zstd reader asks for 128 KiB at a time out of 1 MiB chunks.
        if not self._fill():
            return b""
        if size is None or size < 0:
            size = len(self._buf) - self._pos
        out = bytes(self._buf[self._pos : self._pos + size])
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        if not self._fill():
            return 0
        n = min(len(b), len(self._buf) - self._pos)
        memoryview(b).cast("B")[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n


__all__ = [
    "FILE_HEADER_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MODEL_HEADER_SIZE",
    "PREAMBLE_SIZE",
    "BoundedReader",
    "ContainerLimits",
    "ContainerReader",
    "ContainerWriter",
    "Encryption",
    "FileHeader",
    "ModelEntry",
    "ModelFormat",
    "ModelHeader",
    "chunk_aad",
    "encoding_flags",
    "parse_file_header",
    "parse_model_header",
    "parse_preamble",
    "read_headers",
]
