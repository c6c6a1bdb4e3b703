"""The §8.2.2 model container (agent/container.py) against docs/FORMAT.md."""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import container as C
from agent import crypto
from agent.errors import (
    CryptoError,
    EdgewardError,
    FormatError,
    IntegrityError,
    LimitError,
    UnsupportedVersionError,
)
from tests.emulation import scaled

VECTOR = Path(__file__).parent / "vectors" / "container_v1.bin"
# The values docs/FORMAT.md ("Test vector") documents for tests/vectors/container_v1.bin.
VKEY = bytes(range(32))
VPREFIX = bytes.fromhex("a0a1a2a3a4a5a6")
VMODEL0 = b"EMPC model 0: plain bytes\n"
VMODEL1 = b"EMPC model 1: zstd, then AES-256-GCM STREAM in 16-byte chunks\n" * 2
M0_HDR, M0_DATA = 16, 40
M1_HDR = M0_DATA + len(VMODEL0)  # 66
M1_DATA = M1_HDR + 24  # 90
M1_LEN = 195
KEY = crypto.new_data_key()


class _Stream(io.RawIOBase):
    """A non-seekable source that hands out at most ``piece`` bytes per read."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._pos = 0
        self._piece = piece

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._piece, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def _decode_all(
    data: bytes, key: bytes | None = VKEY, *, seekable: bool = True, **limits: int
) -> list[tuple[C.ModelHeader, bytes]]:
    src = io.BytesIO(data) if seekable else io.BufferedReader(_Stream(data), 5)
    reader = C.ContainerReader(src, C.ContainerLimits(**limits))  # type: ignore[arg-type]
    return [(e.header, b"".join(e.decoded(key))) for e in reader]


def _expect(exc_type: type[EdgewardError], code: str, fn: Callable[[], object]) -> EdgewardError:
    with pytest.raises(exc_type) as ei:
        fn()
    assert ei.value.code == code, ei.value
    return ei.value


# --- the checked-in vector ------------------------------------------------------------


def test_vector_file_header_fields() -> None:
    data = VECTOR.read_bytes()
    assert len(data) == M1_DATA + M1_LEN == 285
    assert data[0:4] == b"EMPC"
    assert struct.unpack_from("<I", data, 0)[0] == 0x43504D45
    assert struct.unpack_from("<I", data, 4)[0] == 1  # format version
    assert struct.unpack_from("<I", data, 8)[0] == 2  # model count
    assert struct.unpack_from("<I", data, 12)[0] == 16  # header size
    assert data[:16].hex() == "454d5043010000000200000010000000"


def test_vector_model_headers_fields() -> None:
    data = VECTOR.read_bytes()
    # model 0: id 0, onnx, no transforms, header 24, 26 data bytes, then the data
    assert struct.unpack_from("<IIIIQ", data, M0_HDR) == (0, 1, 0, 24, 26)
    assert data[M0_DATA:M1_HDR] == VMODEL0
    # model 1: id 7, tflite, flags 0x106 = zstd | encrypted | alg 1 (aes-256-gcm)
    assert struct.unpack_from("<IIIIQ", data, M1_HDR) == (7, 2, 0x106, 24, M1_LEN)
    assert data[M1_HDR : M1_HDR + 24].hex() == ("07000000020000000601000018000000c300000000000000")
    # encryption preamble: nonce prefix, reserved u8, chunk size u32 (16), reserved u32
    assert data[M1_DATA : M1_DATA + 7] == VPREFIX
    assert data[M1_DATA + 7] == 0
    assert struct.unpack_from("<II", data, M1_DATA + 8) == (16, 0)
    # 179 sealed bytes = 83 bytes of zstd in 6 chunks of <= 16 bytes, each + 16-byte tag
    assert crypto.ciphertext_size(83, 16) == M1_LEN - 16


def test_vector_decodes() -> None:
    reader = C.ContainerReader(io.BytesIO(VECTOR.read_bytes()))
    assert reader.header == C.FileHeader(0x43504D45, 1, 2, 16)
    entries = []
    for e in reader:
        entries.append((e.header, b"".join(e.decoded(VKEY))))
    (h0, d0), (h1, d1) = entries
    assert h0 == C.ModelHeader(0, C.ModelFormat.ONNX, 0, 24, 26) and d0 == VMODEL0
    assert h0.encoding() == [] and h0.format_name == "onnx" and h0.alg is None
    assert h1 == C.ModelHeader(7, C.ModelFormat.TFLITE, 0x106, 24, M1_LEN) and d1 == VMODEL1
    assert h1.encoding() == ["zstd", "aes-256-gcm"] and h1.zstd and h1.encrypted
    assert not h1.residual and h1.format_name == "tflite"


def test_vector_first_chunk_by_hand() -> None:
    """Check the documented nonce and AAD layout independently of the reader."""
    data = VECTOR.read_bytes()
    preamble = data[M1_DATA : M1_DATA + 16]
    header_aad = b"EMPC-AAD" + struct.pack("<I", 1) + data[M1_HDR : M1_HDR + 16] + preamble
    chunk0 = data[M1_DATA + 16 : M1_DATA + 16 + 32]
    nonce = VPREFIX + (0).to_bytes(4, "big") + b"\x00"
    aad = header_aad + (0).to_bytes(8, "big") + b"\x00"
    plain = AESGCM(VKEY).decrypt(nonce, chunk0, aad)
    assert plain[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame magic
    assert plain.endswith(b"EMPC ")  # a raw literal block starts the frame


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", [None, *crypto.ALGORITHMS])
@pytest.mark.parametrize("zstd_level", [None, 3])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 50_000])
def test_round_trip(alg: str | None, zstd_level: int | None, size: int) -> None:
    payload = os.urandom(size // 2) + bytes(size - size // 2)
    buf = io.BytesIO()
    enc = C.Encryption(KEY, alg, 4096) if alg else None
    with C.ContainerWriter(buf) as w:
        w.begin_model(3, C.ModelFormat.RAW, residual=True, zstd_level=zstd_level, encryption=enc)
        for i in range(0, size, 1000):
            w.write(payload[i : i + 1000])
        h = w.end_model()
        w.add_model(1, C.ModelFormat.ONNX, io.BytesIO(b"second"))
    assert h.alg == alg and h.zstd == (zstd_level is not None) and h.residual
    for seekable in (True, False):
        out = _decode_all(buf.getvalue(), KEY, seekable=seekable)
        assert [x[1] for x in out] == [payload, b"second"]
        assert out[0][0] == h


def test_open_gives_a_file_object_and_skipping_works() -> None:
    buf = io.BytesIO()
    data = os.urandom(300_000)
    with C.ContainerWriter(buf) as w:
        for i in range(3):
            w.add_model(i, 1, io.BytesIO(data), zstd_level=1, encryption=C.Encryption(KEY))
    buf.seek(0)
    got = []
    for e in C.ContainerReader(buf):
        if e.header.model_id == 1:
            continue  # not read at all: the reader skips it
        f = e.open(KEY)
        got.append(f.read(10) + f.read())
    assert got == [data, data]


def test_writer_back_patches_and_respects_start_offset() -> None:
    buf = io.BytesIO(b"prefix")
    buf.seek(6)
    with C.ContainerWriter(buf) as w:
        w.add_model(5, 2, io.BytesIO(b"abc"))
    assert buf.getvalue()[:6] == b"prefix"
    assert _decode_all(buf.getvalue()[6:]) == [(C.ModelHeader(5, 2, 0, 24, 3), b"abc")]


def test_writer_misuse() -> None:
    w = C.ContainerWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.end_model()
    with pytest.raises(ValueError):
        w.close()  # no model yet
    w.begin_model(1, 1)
    with pytest.raises(ValueError):
        w.begin_model(2, 1)
    w.end_model()
    with pytest.raises(ValueError):
        w.begin_model(1, 1)  # duplicate id
    with pytest.raises(ValueError):
        w.begin_model(2, 99)  # unknown format
    with pytest.raises(ValueError):
        C.ContainerWriter(_Stream(b""))  # type: ignore[arg-type]


def test_bad_encryption_parameters_write_nothing() -> None:
    buf = io.BytesIO()
    w = C.ContainerWriter(buf)
    size = len(buf.getvalue())
    for enc in (C.Encryption(b"short"), C.Encryption(KEY, "des"), C.Encryption(KEY, chunk_size=0)):
        with pytest.raises(CryptoError):
            w.begin_model(0, 1, encryption=enc)
        assert len(buf.getvalue()) == size
    assert KEY.hex() not in repr(C.Encryption(KEY))


# --- malformed containers -------------------------------------------------------------


def _patch(offset: int, fmt: str, value: int) -> Callable[[bytes], bytes]:
    def f(data: bytes) -> bytes:
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    return f


BAD_CASES: list[tuple[str, Callable[[bytes], bytes], type[EdgewardError], str]] = [
    ("magic", _patch(0, "<I", 0x43504D46), FormatError, "container-magic"),
    ("version-2", _patch(4, "<I", 2), UnsupportedVersionError, "container-version"),
    ("version-0", _patch(4, "<I", 0), UnsupportedVersionError, "container-version"),
    ("count-0", _patch(8, "<I", 0), FormatError, "container-model-count"),
    ("count-huge", _patch(8, "<I", 0xFFFFFFFF), FormatError, "container-model-count"),
    ("count-more", _patch(8, "<I", 3), FormatError, "container-truncated"),
    ("count-fewer", _patch(8, "<I", 1), FormatError, "container-trailing"),
    ("file-header-size", _patch(12, "<I", 20), FormatError, "container-header-size"),
    (
        "model-header-size",
        _patch(M0_HDR + 12, "<I", 28),
        FormatError,
        "container-model-header-size",
    ),
    ("model-format", _patch(M0_HDR + 4, "<I", 9), FormatError, "container-format"),
    ("flags-unknown", _patch(M0_HDR + 8, "<I", 1 << 20), FormatError, "container-flags"),
    ("alg-unencrypted", _patch(M0_HDR + 8, "<I", 0x100), FormatError, "container-alg"),
    ("alg-unknown", _patch(M1_HDR + 8, "<I", 0x506), FormatError, "container-alg"),
    ("length-beyond-file", _patch(M0_HDR + 16, "<Q", 1000), FormatError, "container-data-length"),
    ("length-huge", _patch(M1_HDR + 16, "<Q", 1 << 63), FormatError, "container-data-length"),
    ("length-short", _patch(M0_HDR + 16, "<Q", 20), FormatError, "container-model-header-size"),
    ("enc-length-tiny", _patch(M1_HDR + 16, "<Q", 20), FormatError, "container-data-length"),
    ("duplicate-id", _patch(M1_HDR, "<I", 0), FormatError, "container-model-id"),
    ("preamble-reserved", _patch(M1_DATA + 7, "<B", 1), FormatError, "container-preamble"),
    ("preamble-reserved2", _patch(M1_DATA + 12, "<I", 1), FormatError, "container-preamble"),
    ("chunk-size-0", _patch(M1_DATA + 8, "<I", 0), FormatError, "container-chunk-size"),
    ("chunk-size-big", _patch(M1_DATA + 8, "<I", 1 << 30), FormatError, "container-chunk-size"),
    # AAD binding: header fields and the preamble are authenticated
    ("chunk-size-17", _patch(M1_DATA + 8, "<I", 17), IntegrityError, "chunk-auth"),
    ("model-id-changed", _patch(M1_HDR, "<I", 8), IntegrityError, "chunk-auth"),
    ("format-changed", _patch(M1_HDR + 4, "<I", 1), IntegrityError, "chunk-auth"),
    ("residual-flag-set", _patch(M1_HDR + 8, "<I", 0x107), IntegrityError, "chunk-auth"),
    ("alg-changed", _patch(M1_HDR + 8, "<I", 0x306), IntegrityError, "chunk-auth"),
    ("nonce-prefix", _patch(M1_DATA, "<B", 0xA1), IntegrityError, "chunk-auth"),
    ("chunk-byte", _patch(M1_DATA + 40, "<B", 0), IntegrityError, "chunk-auth"),
    ("last-tag", lambda d: d[:-1] + bytes([d[-1] ^ 1]), IntegrityError, "chunk-auth"),
    ("trailing-byte", lambda d: d + b"\0", FormatError, "container-trailing"),
    ("empty", lambda d: b"", FormatError, "container-truncated"),
]


@pytest.mark.parametrize(
    ("name", "mutate", "exc", "code"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
@pytest.mark.parametrize("seekable", [True, False])
def test_malformed_vector(
    name: str,
    mutate: Callable[[bytes], bytes],
    exc: type[EdgewardError],
    code: str,
    seekable: bool,
) -> None:
    bad = mutate(VECTOR.read_bytes())
    if not seekable and code == "container-data-length" and name == "length-beyond-file":
        code = "container-truncated"  # without a known size it shows as truncation
    err = _expect(exc, code, lambda: _decode_all(bad, seekable=seekable))
    assert "\n" not in err.message


def test_swapped_chunks_and_dropped_chunk_in_container() -> None:
    data = VECTOR.read_bytes()
    start = M1_DATA + 16
    chunks = [data[start + i : start + i + 32] for i in range(0, 160, 32)]
    swapped = data[:start] + chunks[1] + chunks[0] + data[start + 64 :]
    _expect(IntegrityError, "chunk-auth", lambda: _decode_all(swapped))
    # drop the (partial) last chunk and shorten the declared length to match
    cut = _patch(M1_HDR + 16, "<Q", M1_LEN - 19)(data)[: M1_DATA + M1_LEN - 19]
    _expect(IntegrityError, "stream-truncated", lambda: _decode_all(cut))


def test_limits() -> None:
    data = VECTOR.read_bytes()
    _expect(FormatError, "container-model-count", lambda: _decode_all(data, max_models=1))
    _expect(FormatError, "container-data-length", lambda: _decode_all(data, max_model_bytes=100))
    _expect(FormatError, "container-chunk-size", lambda: _decode_all(data, max_chunk_size=8))
    _expect(LimitError, "decoded-size", lambda: _decode_all(data, max_decoded_bytes=100))
    _expect(CryptoError, "no-data-key", lambda: _decode_all(data, None))


@pytest.mark.parametrize("seekable", [True, False])
def test_truncation_at_every_offset(seekable: bool) -> None:
    data = VECTOR.read_bytes()
    for n in range(len(data)):
        with pytest.raises(FormatError) as ei:
            _decode_all(data[:n], seekable=seekable)
        allowed = {"container-truncated", "container-data-length"}
        assert ei.value.code in allowed, (n, ei.value)


def test_every_bit_flip_is_detected_or_changes_the_result() -> None:
    data = VECTOR.read_bytes()
    good = _decode_all(data)
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            try:
                got = _decode_all(bytes(bad))
            except EdgewardError:
                continue
            assert got != good, (i, bit)


# --- zstd inside the container --------------------------------------------------------


def _zstd_container(frame: bytes) -> bytes:
    header = C.ModelHeader(0, 3, C.FLAG_ZSTD, 24, len(frame))
    return C.FileHeader(C.MAGIC_U32, 1, 1, 16).pack() + header.pack() + frame


def test_zstd_errors() -> None:
    payload = os.urandom(1000) * 50
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(payload)
    assert _decode_all(_zstd_container(frame))[0][1] == payload
    _expect(FormatError, "zstd-trailing", lambda: _decode_all(_zstd_container(frame + b"x")))
    _expect(FormatError, "zstd-trailing", lambda: _decode_all(_zstd_container(frame + frame)))
    for cut in (1, 4, 5, len(frame) // 2, len(frame) - 1):
        with pytest.raises(FormatError) as ei:
            _decode_all(_zstd_container(frame[:cut]))
        assert ei.value.code in {"zstd-truncated", "zstd-corrupt"}, cut
    _expect(FormatError, "zstd-corrupt", lambda: _decode_all(_zstd_container(b"\0" * 64)))
    bad = bytearray(frame)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(FormatError):
        _decode_all(_zstd_container(bytes(bad)))


def test_zstd_frame_without_checksum_and_unknown_size() -> None:
    cobj = zstandard.ZstdCompressor(level=1, write_checksum=False).compressobj()
    frame = cobj.compress(b"abc" * 1000) + cobj.flush()
    assert _decode_all(_zstd_container(frame))[0][1] == b"abc" * 1000
    _expect(FormatError, "zstd-truncated", lambda: _decode_all(_zstd_container(frame[:-1])))


def test_decompression_bomb_is_bounded() -> None:
    """64 MiB of zeros in a few KiB: refused by the limit, pieces stay small."""
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(64 << 20))
    assert len(frame) < 64 << 10
    reader = C.ContainerReader(
        io.BytesIO(_zstd_container(frame)), C.ContainerLimits(max_decoded_bytes=8 << 20)
    )
    entry = next(iter(reader))
    biggest = 0
    with pytest.raises(LimitError) as ei:
        for piece in entry.decoded(read_size=1 << 20):
            biggest = max(biggest, len(piece))
    assert ei.value.code == "decoded-size" and biggest <= 1 << 20


# --- property tests -------------------------------------------------------------------


@settings(max_examples=300, deadline=scaled(2000), suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_edgeward_errors(data: bytes) -> None:
    with contextlib.suppress(EdgewardError):
        _decode_all(data)


@settings(max_examples=300, deadline=scaled(2000))
@given(
    st.integers(0, 3),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=300),
)
def test_arbitrary_model_headers(
    count: int, fmt: int, flags: int, size: int, length: int, tail: bytes
) -> None:
    head = C.FileHeader(C.MAGIC_U32, 1, count, 16).pack()
    body = struct.pack("<IIIIQ", 0, fmt, flags, size, length) + tail
    for seekable in (True, False):
        with contextlib.suppress(EdgewardError):
            _decode_all(head + body, seekable=seekable)


@settings(max_examples=200, deadline=scaled(2000))
@given(st.integers(0, 285 * 8 - 1), st.integers(1, 300))
def test_random_flip_then_truncate(bit: int, keep: int) -> None:
    data = bytearray(VECTOR.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    with contextlib.suppress(EdgewardError):
        _decode_all(bytes(data[:keep]), seekable=False)


@pytest.mark.parametrize("mode", ["r:", "r|"])
def test_streaming_from_a_tar_member(tmp_path: Path, mode: str) -> None:
    """The package reader's case: decode a container straight out of a tar member."""
    import tarfile

    payload = os.urandom(200_000) + bytes(300_000)
    cpath = tmp_path / "c.bin"
    with cpath.open("wb") as f, C.ContainerWriter(f) as w:
        w.add_model(0, 1, io.BytesIO(payload), zstd_level=3, encryption=C.Encryption(KEY))
        w.add_model(1, 2, io.BytesIO(b"tail"))
    tpath = tmp_path / "p.tar"
    with tarfile.open(tpath, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(cpath, "Model/c.bin")
        tar.addfile(tarfile.TarInfo("Model/after"), io.BytesIO(b""))
    with tarfile.open(tpath, mode) as tar:
        member = tar.next()
        assert member is not None
        f = tar.extractfile(member)
        assert f is not None
        reader = C.ContainerReader(f, total_size=member.size)  # type: ignore[arg-type]
        got = [b"".join(e.decoded(KEY)) for e in reader]
    assert got == [payload, b"tail"]


def test_read_headers() -> None:
    fh, headers = C.read_headers(io.BytesIO(VECTOR.read_bytes()))
    assert fh.model_count == 2
    assert [h.model_id for h in headers] == [0, 7]
    assert [h.encoding() for h in headers] == [[], ["zstd", "aes-256-gcm"]]
