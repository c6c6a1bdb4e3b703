"""Residual patch streams: encode (publisher) and apply (device).

A patch rebuilds the *target's* files: the target with every tensor payload cut out
(the skeleton, one zstd frame per file) plus one record per payload saying how to fill
that hole from the base — skip (copy the base tensor), quantised Δ (base + dequantised
Δ), integer Δ (exact, wrapping), or full (new bytes). Structure changes of any kind
therefore just work, and the output has the target's byte layout. The byte format is in
docs/FORMAT.md ("Residual patch stream"); the design in docs/RESIDUAL.md.

The device never loads a model: base tensors are read from memory maps chunk by chunk,
the output is written chunk by chunk to temp files next to ``out`` and renamed into
place only when the digest of what was written equals the expected target digest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import mmap
import os
import queue
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from agent.durable import WriteHashPipeline, atomic_replace
from agent.errors import (
    BaseMismatchError,
    EdgewardError,
    FormatError,
    ResidualError,
    TargetDigestError,
)

from . import lowrank as lowrank_mod
from . import plan as plan_mod
from . import quant
from .layout import Hole, Layout, element_count, scan

logger = logging.getLogger(__name__)

MAGIC = b"EWRP"
TRAILER = b"EWRT"
VERSION = 1
FORMATS = {"onnx": 1, "tflite": 2, "raw": 3}
SKIP, FULL, QUANT, IDELTA, LOWRANK = 1, 2, 3, 4, 5
KIND_NAMES = {SKIP: "skip", FULL: "full", QUANT: "quant", IDELTA: "idelta", LOWRANK: "lowrank"}
END_FILE = 0

IO_CHUNK = 1 << 22  # bytes per copy step
MAX_SKELETON = 1 << 30  # compressed skeleton bytes held in memory on the device
ONESHOT = 1 << 16  # frames up to this size are decoded in one call, larger ones streamed
MAX_NDIM = 32
MAX_FILES = 1 << 10
PAGE = mmap.PAGESIZE


def _zstd() -> Any:
    import zstandard

    return zstandard


def _bad(what: str) -> FormatError:
    return FormatError(f"corrupt residual patch: {what}", code="residual-format")


# --- canonical digest ----------------------------------------------------------------


@dataclass
class _Digest:
    """Canonical weights digest: tensors sorted by key, then each file's skeleton.

    ``sha256("edgeward-weights-v1\\0" || u8 format || u32 n || for each tensor in key
    order (UTF-8 bytes): u16 len, u8 dtype, key, u8 ndim, u64 dims…, u64 nbytes, u16
    file, u64 skeleton position, sha256(payload) || u16 files || for each file: u16 len,
    name, u64 len, sha256(skeleton))``, integers little-endian (FORMAT.md). Positions
    bind where each payload sits, so the digest fixes every byte of every file; per-part
    hashes let both sides hash in whatever order they meet the bytes.
    """

    format: str
    tensors: dict[bytes, bytes] = field(default_factory=dict)
    files: list[bytes] = field(default_factory=list)

    def tensor(self, h: Hole, sha: bytes, file: int, skel_pos: int) -> None:
        k = h.key.encode()
        self.tensors[k] = (
            struct.pack("<HB", len(k), h.dtype)
            + k
            + struct.pack(f"<B{len(h.shape)}Q", len(h.shape), *h.shape)
            + struct.pack("<QHQ", h.nbytes, file, skel_pos)
            + sha
        )

    def file(self, name: str, skeleton_len: int, sha: bytes) -> None:
        n = name.encode()
        self.files.append(struct.pack("<H", len(n)) + n + struct.pack("<Q", skeleton_len) + sha)

    def value(self) -> str:
        h = hashlib.sha256(b"edgeward-weights-v1\x00")
        h.update(struct.pack("<BI", FORMATS[self.format], len(self.tensors)))
        for k in sorted(self.tensors):
            h.update(self.tensors[k])
        h.update(struct.pack("<H", len(self.files)))
        for f in self.files:
            h.update(f)
        return "sha256:" + h.hexdigest()


def _segments(layout: Layout, i: int) -> Iterator[tuple[Hole | None, int, int]]:
    """(hole or None for skeleton, offset, length) covering file ``i`` in order."""
    pos = 0
    for h in layout.file_holes(i):
        if h.offset > pos:
            yield None, pos, h.offset - pos
        yield h, h.offset, h.nbytes
        pos = h.offset + h.nbytes
    if pos < layout.sizes[i]:
        yield None, pos, layout.sizes[i] - pos


def _layout_digest(layout: Layout) -> str:
    dig = _Digest(layout.format)
    buf = bytearray(IO_CHUNK)
    view = memoryview(buf)
    for i, path in enumerate(layout.paths):
        skel = hashlib.sha256()
        skel_len = 0
        with open(path, "rb") as f:
            for hole, off, n in _segments(layout, i):
                f.seek(off)
                h = hashlib.sha256() if hole is not None else skel
                left = n
                while left:
                    got = f.readinto(view[: min(left, IO_CHUNK)])
                    if not got:
                        raise ResidualError(f"{path} shrank while reading", code="residual-io")
                    h.update(view[:got])
                    left -= got
                if hole is not None:
                    dig.tensor(hole, h.digest(), i, skel_len)
                else:
                    skel_len += n
        dig.file(layout.names[i], skel_len, skel.digest())
    return dig.value()


def weights_digest(model: Path) -> str:
    """``sha256:<hex>`` of a model's tensors and skeleton in canonical form (see
    :class:`_Digest`); reads the files sequentially with a fixed buffer."""
    return _layout_digest(scan(Path(model)))


# --- reading the patch ---------------------------------------------------------------


class _In:
    """Exact reads from the patch stream; short reads are corruption, not EOF."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def exact(self, n: int) -> bytes:
        first = self.f.read(min(n, 1 << 25))  # one read, no copy, for sane lengths
        if len(first) == n:
            return first
        out = bytearray(first)
        if not first and n:
            raise _bad("truncated")
        while len(out) < n:
            got = self.f.read(min(n - len(out), IO_CHUNK))
            if not got:
                raise _bad("truncated")
            out += got
        return bytes(out)

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.exact(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("<H")
        try:
            return self.exact(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("name is not UTF-8") from None


class _Sub(io.RawIOBase):
    """At most ``left`` bytes of the underlying stream (one zstd frame)."""

    def __init__(self, f: BinaryIO, left: int, prefix: bytes = b"") -> None:
        self.f, self.left, self.prefix = f, left, prefix

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        got = self.f.read(n)
        if not got:
            raise _bad("truncated")
        b[: len(got)] = got
        self.left -= len(got)
        return len(got)

    def read(self, size: int = -1) -> bytes:
        """What the zstd stream reader calls: one read of the source, no extra copy."""
        if self.prefix:
            out, self.prefix = self.prefix, b""
            return out
        n = self.left if size < 0 else min(size, self.left)
        if n <= 0:
            return b""
        got = self.f.read(n)
        if not got:
            raise _bad("truncated")
        self.left -= len(got)
        return got

    def drain(self) -> None:
        while self.left:
            self.readinto(bytearray(min(self.left, IO_CHUNK)))


class _Frame:
    """Streaming decompression of one length-prefixed zstd frame of known size."""

    def __init__(self, f: BinaryIO, size: int, dctx: Any = None) -> None:
        rd = _In(f)
        (comp,) = rd.unpack("<Q")
        if comp < 9:
            raise _bad("compressed frame too short")
        head = rd.exact(min(comp, 18))  # 18 = the longest zstd frame header
        # zstd frame magic, and the descriptor must announce the content checksum (bit
        # 2) so that no flipped bit can silently drop the integrity check, and the
        # content size, which must be the record's (no decompression bombs)
        z = _zstd()
        if head[:4] != b"\x28\xb5\x2f\xfd" or not head[4] & 0x04:
            raise _bad("not a checksummed zstd frame")
        try:
            declared = z.frame_content_size(head)
        except z.ZstdError as exc:
            raise _bad(f"zstd: {exc}") from None
        if declared != size:
            raise _bad("frame size differs from the record")
        self.left = size
        self.whole: memoryview | None = None
        if size <= ONESHOT and comp <= 2 * ONESHOT:
            # small frames: one call, no stream bookkeeping (most tensors)
            data = head + rd.exact(comp - len(head))
            try:
                dobj = (dctx or z.ZstdDecompressor()).decompressobj()
                out = dobj.decompress(data)
            except z.ZstdError as exc:
                raise _bad(f"zstd: {exc}") from None
            if len(out) != size or not dobj.eof or dobj.unused_data:
                raise _bad("compressed frame does not match its record")
            self.whole, self.pos = memoryview(out), 0
            return
        self.sub = _Sub(f, comp - len(head), head)
        self.reader = (dctx or z.ZstdDecompressor()).stream_reader(
            self.sub, read_size=1 << 20, read_across_frames=False
        )

    def read(self, n: int) -> bytes | memoryview:
        if n > self.left:
            raise _bad("record longer than declared")
        if self.whole is not None:
            self.left -= n
            self.pos += n
            return self.whole[self.pos - n : self.pos]
        out = bytearray(n)
        self.readinto(out)
        return bytes(out)

    def readinto(self, buf: Any) -> None:
        """Fill ``buf`` (any writable buffer) with the next ``len`` decompressed bytes:
        large frames decode straight into the caller's reusable buffer."""
        view = memoryview(buf).cast("B")
        n = len(view)
        if n > self.left:
            raise _bad("record longer than declared")
        if self.whole is not None:
            view[:] = self.whole[self.pos : self.pos + n]
            self.pos += n
            self.left -= n
            return
        got = 0
        try:
            while got < n:
                k = self.reader.readinto(view[got:])
                if not k:
                    raise _bad("compressed data ends early")
                got += k
        except _zstd().ZstdError as exc:
            raise _bad(f"zstd: {exc}") from None
        self.left -= n

    def close(self) -> None:
        if self.left:
            raise _bad("compressed data ends early")
        if self.whole is not None:
            return
        try:
            extra = self.reader.read(1)
        except _zstd().ZstdError as exc:
            raise _bad(f"zstd: {exc}") from None
        if extra:
            raise _bad("compressed data longer than declared")
        self.sub.drain()


# --- records ---------------------------------------------------------------------------


@dataclass
class _Record:
    kind: int
    skel_pos: int
    hole: Hole  # key, dtype and shape of the target tensor; offset/file unused
    bits: int = 0
    block: int = 0
    rank: int = 0  # LOWRANK: the factors' rank (bits 0: no remainder)


def _write_record_head(out: BinaryIO, r: _Record) -> None:
    k = r.hole.key.encode()
    out.write(struct.pack("<BQH", r.kind, r.skel_pos, len(k)) + k)
    out.write(
        struct.pack(f"<BB{len(r.hole.shape)}Q", r.hole.dtype, len(r.hole.shape), *r.hole.shape)
    )
    out.write(struct.pack("<Q", r.hole.nbytes))
    if r.kind == QUANT:
        out.write(struct.pack("<BQ", r.bits, r.block))
    if r.kind == LOWRANK:
        out.write(struct.pack("<BQI", r.bits, r.block, r.rank))


def _read_record_head(rd: _In, kind: int) -> _Record:
    if kind not in KIND_NAMES:
        raise _bad(f"unknown record kind {kind}")
    (skel_pos,) = rd.unpack("<Q")
    key = rd.string()
    dtype, ndim = rd.unpack("<BB")
    if dtype not in quant.ITEMSIZE or ndim > MAX_NDIM:
        raise _bad(f"tensor {key!r}: bad dtype {dtype} or rank {ndim}")
    shape = tuple(rd.unpack(f"<{ndim}Q")) if ndim else ()
    (nbytes,) = rd.unpack("<Q")
    if any(d >= 1 << 48 for d in shape) or element_count(shape) * quant.ITEMSIZE[dtype] != nbytes:
        raise _bad(f"tensor {key!r}: shape and size disagree")
    if dtype == quant.OPAQUE and shape != (nbytes,):
        raise _bad(f"tensor {key!r}: opaque bytes with a shape")
    r = _Record(kind, skel_pos, Hole(key, dtype, shape, 0, 0, nbytes))
    if kind == QUANT:
        r.bits, r.block = rd.unpack("<BQ")
        width = r.bits & ~quant.UNPACKED
        if (
            width not in quant.BITS
            or (r.bits & quant.UNPACKED and width == 8)
            or r.block < 1
            or dtype not in quant.FLOATS
        ):
            raise _bad(f"tensor {key!r}: bad quantisation header")
    if kind == LOWRANK:
        r.bits, r.block, r.rank = rd.unpack("<BQI")
        width = r.bits & ~quant.UNPACKED
        mn = lowrank_mod.matrix(shape)
        if (
            dtype != quant.F32
            or mn is None
            or mn[0] * mn[1] > lowrank_mod.MAX_ELEMENTS
            or not 1 <= r.rank <= min(*mn, lowrank_mod.MAX_RANK)
            or (r.bits and (width not in quant.BITS or r.block < 1))
            or (r.bits & quant.UNPACKED and width == 8)
            or (not r.bits and r.block)
        ):
            raise _bad(f"tensor {key!r}: bad low-rank header")
    return r


# --- the shared fill code (publisher and device) ---------------------------------------

Chunk = bytes | memoryview | np.ndarray[Any, Any]
Sink = Callable[[Chunk], None]


# --- encode ----------------------------------------------------------------------------


@dataclass
class PatchInfo:
    """What ``encode_patch`` made: digests, the model format, statistics, fidelity."""

    base_digest: str
    target_digest: str
    format: str
    stats: dict[str, Any]
    fidelity: dict[str, Any] | None = None


class _Maps:
    """Read-only memory maps of a layout's files, released range by range."""

    def __init__(self, layout: Layout) -> None:
        self.maps: list[mmap.mmap | None] = []
        for p, size in zip(layout.paths, layout.sizes, strict=True):
            if size == 0:
                self.maps.append(None)
                continue
            with open(p, "rb") as f:
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def reader(self, h: Hole) -> Callable[[int, int], memoryview]:
        """Chunk reader for one base tensor; each call drops the pages of the chunk
        before (they were read, they need not stay mapped: RSS stays near one chunk)."""
        mm = self.maps[h.file]
        prev = [0, 0]

        def read(off: int, n: int) -> memoryview:
            if mm is None or off + n > h.nbytes or h.offset + off + n > len(mm):
                raise ResidualError(f"base tensor {h.key!r} is shorter than needed")
            if prev[1]:
                self._drop(mm, h.offset + prev[0], prev[1])
            prev[:] = [off, n]
            return memoryview(mm)[h.offset + off : h.offset + off + n]

        return read

    @staticmethod
    def _drop(mm: mmap.mmap, start: int, n: int) -> None:
        """MADV_DONTNEED on the whole pages inside [start, start + n)."""
        a = -(-start // PAGE) * PAGE
        b = (start + n) // PAGE * PAGE
        if b > a:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def release(self, h: Hole) -> None:
        """Drop the tensor's pages from this process (keeps RSS near one chunk)."""
        mm = self.maps[h.file]
        if mm is None or h.nbytes < PAGE:
            return
        start = h.offset - h.offset % PAGE
        with contextlib.suppress(OSError, ValueError, AttributeError):
            mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), h.offset + h.nbytes) - start)

    def close(self) -> None:
        for mm in self.maps:
            if mm is not None:
                with contextlib.suppress(BufferError):
                    mm.close()


def _compress(data: bytes | memoryview) -> bytes:
    out: bytes = plan_mod.zstd_compressor().compress(data)
    return out


@dataclass(frozen=True)
class Choice:
    """How the publisher sends one float tensor: ``bits`` 0 means full (exact) bytes."""

    bits: int
    block: int = 0
    # error-compensated codes (flat) and their scales, made by the search
    scales: Any = field(default=None, compare=False, repr=False)
    codes: Any = field(default=None, compare=False, repr=False)
    # low-rank factors sent first (bits 0: and nothing else), made by the search
    lowrank: Any = field(default=None, compare=False, repr=False)


def _equal(
    ra: Callable[[int, int], memoryview], rb: Callable[[int, int], memoryview], n: int
) -> bool:
    """Byte equality of two tensors, chunk by chunk (memcmp speed, pages dropped)."""
    for o in range(0, n, IO_CHUNK):
        k = min(IO_CHUNK, n - o)
        if not np.array_equal(np.frombuffer(ra(o, k), np.uint8), np.frombuffer(rb(o, k), np.uint8)):
            return False
    return True


def encode_patch(
    base: Path,
    target: Path,
    out: BinaryIO,
    *,
    bits: int = 8,
    group_size: int = 128,
    max_rel_err: float | None = None,
    samples: Path | None = None,
    reconstruct: Path | None = None,
    allow_lossy: bool = False,
    fidelity_target: Any = None,
    output_kind: str | None = None,
    max_patch_ratio: float = 1.0,
    choices: dict[str, Choice] | None = None,
) -> PatchInfo:
    """Write a patch that turns ``base`` into B' ≈ ``target`` to ``out``.

    Args:
        bits: Δ width tried first (1–8; 8 per row, 3/4 per group, others per row).
            1 and 2 are refused unless ``allow_lossy`` (they can move outputs a lot).
        group_size: elements per 3/4-bit scale (128 or 64).
        max_rel_err: a tensor whose ||B'−B||₂/||B||₂ exceeds this goes at the next
            wider width (1→2→4→8), then as full bytes.
        samples: directory of ``*.npz`` inputs; B and B' are run on them and compared.
        reconstruct: also write B' (exactly what the device will produce) to this path
            (external data files next to it); used by tests and the fidelity report.
        fidelity_target: a :class:`search.Target`: choose per tensor width, block or
            exact bytes for the smallest patch whose B' meets it on ``samples``
            (search.py); ``bits``/``max_rel_err`` are then ignored.
        output_kind: classification, embedding, dense or None (auto) for the metrics.
        max_patch_ratio: with a target, refuse when meeting it needs a patch of at
            least this share of the target's bytes.
        choices: a per-key allocation (what the search hands back); others use ``bits``.

    Returns the digests (target = digest of B'), the format and statistics.
    """
    if bits not in quant.BITS:
        raise ResidualError(f"bits must be 1 … 8, not {bits}", code="residual-option")
    if bits <= 2 and not allow_lossy and fidelity_target is None and choices is None:
        raise ResidualError(
            f"--bits {bits} can change outputs far beyond fine-tune noise; give a fidelity "
            "target (--target-cosine …) or --allow-lossy",
            code="residual-lossy",
        )
    if group_size < 1 or group_size > 1 << 20:
        raise ResidualError(f"group size {group_size} out of range", code="residual-option")
    if max_rel_err is not None and not max_rel_err >= 0:
        raise ResidualError("max_rel_err must be ≥ 0", code="residual-option")
    base, target = Path(base), Path(target)
    if fidelity_target is not None:
        from . import search

        if samples is None:
            raise ResidualError(
                "a fidelity target needs sample inputs (--samples DIR)", code="residual-samples"
            )
        found = search.search(
            base,
            target,
            Path(samples),
            fidelity_target,
            output_kind=output_kind,
            max_patch_ratio=max_patch_ratio,
        )
        info = encode_patch(
            base,
            target,
            out,
            group_size=group_size,
            samples=samples,
            reconstruct=reconstruct,
            output_kind=output_kind,
            choices=found.choices,
        )
        info.stats["search"] = found.report
        if info.fidelity is not None:
            info.fidelity["target"] = fidelity_target.describe()
            info.fidelity["allocation"] = found.report["allocation"]
            info.fidelity["met"] = fidelity_target.met(info.fidelity)
            if not info.fidelity["met"]:  # verified on the search's runs; never expected
                raise ResidualError(
                    f"patch made for {fidelity_target.describe()} measured "
                    f"{search.summary(info.fidelity)}",
                    code="residual-target",
                )
        return info
    if samples is not None and reconstruct is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edgeward-residual-") as tmp:
            return encode_patch(
                base,
                target,
                out,
                bits=bits,
                group_size=group_size,
                max_rel_err=max_rel_err,
                samples=samples,
                reconstruct=Path(tmp) / target.name,
                allow_lossy=True,
                output_kind=output_kind,
                choices=choices,
            )
    bl, tl = scan(base), scan(target)
    if bl.format != tl.format:
        raise ResidualError(
            f"base is {bl.format} but target is {tl.format}", code="residual-unsupported"
        )
    base_digest = _layout_digest(bl)
    base_by_key = bl.by_key()
    if len(tl.paths) > MAX_FILES:
        raise ResidualError("too many external data files", code="residual-unsupported")
    ladder = sorted({bits, *(b for b in quant.LADDER if b > bits)})
    stats: dict[str, Any] = {
        "tensors": len(tl.holes),
        "skip": 0,
        "full": 0,
        "idelta": 0,
        **{f"q{b}": 0 for b in quant.BITS},
        "unpacked_codes": 0,
        "fallbacks": 0,
        "lowrank": 0,
        "bytes": {
            k: 0 for k in ("skeleton", "skip", "full", "idelta", "quant", "lowrank", "header")
        },
        "bytes_per_width": {f"q{b}": 0 for b in quant.BITS},
        "max_rel_err": 0.0,
        "target_bytes": sum(tl.sizes),
        "bits": bits if choices is None else "search",
        "group_size": group_size,
    }
    wrote = 0

    def put(data: bytes, what: str) -> None:
        nonlocal wrote
        out.write(data)
        wrote += len(data)
        stats["bytes"][what] += len(data)

    def put_frame(pieces: list[bytes], what: str) -> int:
        n = sum(len(p) for p in pieces)
        put(struct.pack("<Q", n), what)
        for p in pieces:
            put(p, what)
        return n + 8

    dig = _Digest(tl.format)
    recon: list[BinaryIO] = []
    recon_paths: list[tuple[Path, Path]] = []
    bmaps, tmaps = _Maps(bl), _Maps(tl)
    try:
        if reconstruct is not None:
            for i, name in enumerate(tl.names):
                final = Path(reconstruct) if i == 0 else Path(reconstruct).parent / name
                part = final.with_name(f".{final.name}.{secrets.token_hex(4)}.part")
                recon_paths.append((part, final))
                recon.append(open(part, "wb"))  # noqa: SIM115 - closed below
        head = MAGIC + struct.pack("<BBH", VERSION, FORMATS[tl.format], 0)
        head += bytes.fromhex(base_digest.split(":", 1)[1])
        head += struct.pack("<H", len(tl.paths))
        for i, name in enumerate(tl.names):
            raw_name = name.encode()
            head += struct.pack("<H", len(raw_name)) + raw_name
            head += struct.pack("<QQ", tl.sizes[i], tl.skeleton_size(i))
        put(head, "header")
        for i in range(len(tl.paths)):
            tmm = tmaps.maps[i]
            tview = memoryview(tmm) if tmm is not None else memoryview(b"")
            skel = b"".join(bytes(tview[o : o + n]) for hh, o, n in _segments(tl, i) if hh is None)
            dig.file(tl.names[i], len(skel), hashlib.sha256(skel).digest())
            put_frame([_compress(skel)], "skeleton")
            del skel
            skel_pos = 0
            for hole, off, n in _segments(tl, i):
                if hole is None:
                    if recon:
                        recon[i].write(tview[off : off + n])
                    skel_pos += n
                    continue
                h = hole
                rt = tmaps.reader(h)
                sha = hashlib.sha256()

                def sink(c: Any, sha: Any = sha, i: int = i) -> None:
                    sha.update(c)
                    if recon:
                        recon[i].write(c)

                bh = base_by_key.get(h.key)
                ra = bmaps.reader(bh) if bh is not None else None
                same = bh is not None and bh.dtype == h.dtype and bh.shape == h.shape
                choice = (choices or {}).get(h.key)
                pieces: list[bytes] | None = None
                extra: list[bytes] | None = None  # a low-rank record's remainder frame
                if same and ra is not None and _equal(ra, rt, h.nbytes):
                    rec = _Record(SKIP, skel_pos, h)
                    stats["skip"] += 1
                    for o in range(0, h.nbytes, IO_CHUNK):
                        sink(rt(o, min(IO_CHUNK, h.nbytes - o)))
                elif same and ra is not None and choice is not None and choice.lowrank is not None:
                    rec, pieces, extra = _lowrank_record(ra, rt, h, choice, stats, sink)
                elif (
                    same
                    and ra is not None
                    and h.dtype in quant.FLOATS
                    and (choice is None or choice.bits)
                ):
                    rec, pieces = _quant_record(
                        ra, rt, h, ladder, choice, group_size, max_rel_err, stats, sink
                    )
                elif (
                    bh is not None
                    and ra is not None
                    and bh.dtype == h.dtype
                    and bh.nbytes == h.nbytes
                    and h.dtype not in quant.FLOATS
                    and h.dtype != quant.F64
                ):
                    rec = _Record(IDELTA, skel_pos, h)
                    wrap = quant.WRAP[quant.ITEMSIZE[h.dtype]]

                    def deltas(
                        ra: Any = ra, rt: Any = rt, h: Hole = h, wrap: Any = wrap
                    ) -> Iterator[bytes]:
                        for o in range(0, h.nbytes, IO_CHUNK):
                            k = min(IO_CHUNK, h.nbytes - o)
                            t = rt(o, k)
                            sink(t)
                            yield (np.frombuffer(t, wrap) - np.frombuffer(ra(o, k), wrap)).tobytes()

                    pieces = plan_mod.compress_stream(h.nbytes, deltas())
                    stats["idelta"] += 1
                else:
                    rec = _Record(FULL, skel_pos, h)
                    pieces = _full_pieces(rt, h, sink)
                    stats["full"] += 1
                if rec.kind == FULL and pieces is None:
                    pieces = _full_pieces(rt, h, sink)
                rec.skel_pos = skel_pos
                hb = io.BytesIO()
                _write_record_head(hb, rec)
                put(hb.getvalue(), "header")
                if pieces is not None:
                    what = "quant" if rec.kind == QUANT else KIND_NAMES[rec.kind]
                    n_frame = put_frame(pieces, what)
                    if rec.kind == QUANT:
                        stats["bytes_per_width"][f"q{rec.bits & 0x7F}"] += n_frame
                    if extra:
                        put_frame(extra, what)
                dig.tensor(h, sha.digest(), i, rec.skel_pos)
                if bh is not None:
                    bmaps.release(bh)
                tmaps.release(h)
            put(struct.pack("<B", END_FILE), "header")
        target_digest = dig.value()
        put(TRAILER + bytes.fromhex(target_digest.split(":", 1)[1]), "header")
        for f in recon:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for part, final in recon_paths:
            atomic_replace(part, final)
        recon_paths = []
    finally:
        bmaps.close()
        tmaps.close()
        for f in recon:
            f.close()
        for part, _ in recon_paths:
            with contextlib.suppress(OSError):
                part.unlink()
    stats["patch_bytes"] = wrote
    stats["ratio"] = wrote / max(1, stats["target_bytes"])
    info = PatchInfo(base_digest, target_digest, tl.format, stats)
    if samples is not None and tl.format != "raw":
        from .fidelity import compare

        assert reconstruct is not None
        info.fidelity = compare(
            target, Path(reconstruct), Path(samples), tl.format, kind=output_kind
        )
    logger.info(
        "residual patch %s → %s: %d bytes (%.1f%% of target)",
        base_digest[:19],
        target_digest[:19],
        wrote,
        100 * stats["ratio"],
    )
    return info


def _full_pieces(rt: Callable[[int, int], memoryview], h: Hole, sink: Sink) -> list[bytes]:
    def body() -> Iterator[memoryview]:
        for o in range(0, h.nbytes, IO_CHUNK):
            t = rt(o, min(IO_CHUNK, h.nbytes - o))
            sink(t)
            yield t

    return plan_mod.compress_stream(h.nbytes, body())


def _lowrank_record(  # noqa: PLR0917 - one call site, all context
    ra: Callable[[int, int], memoryview],
    rt: Callable[[int, int], memoryview],
    h: Hole,
    choice: Choice,
    stats: dict[str, Any],
    sink: Sink,
) -> tuple[_Record, list[bytes], list[bytes]]:
    """A low-rank record: its factor frame, then the remainder's frame (none when the
    factors alone were chosen)."""
    f = choice.lowrank
    cand = plan_mod.Candidate(
        choice.bits, choice.block, choice.scales, 0.0, 0.0, True, codes=choice.codes, lowrank=f
    )
    if choice.bits and choice.scales is None:
        cand.scales = plan_mod.choose_scales(
            plan_mod.lowrank_base(ra, h, f), rt, h, choice.bits, choice.block
        )
    bits_byte, rest = plan_mod.emit(ra, rt, h, cand, sink)
    stats["lowrank"] += 1
    stats["unpacked_codes"] += 1 if bits_byte & quant.UNPACKED else 0
    rec = _Record(LOWRANK, 0, h, bits_byte, choice.block if choice.bits else 0, f.rank)
    return rec, plan_mod.factor_pieces(f), rest


def _quant_record(  # noqa: PLR0917 - one call site, all context
    ra: Callable[[int, int], memoryview],
    rt: Callable[[int, int], memoryview],
    h: Hole,
    ladder: list[int],
    choice: Choice | None,
    group_size: int,
    max_rel_err: float | None,
    stats: dict[str, Any],
    sink: Sink,
) -> tuple[_Record, list[bytes] | None]:
    """A quant record at the allocated width, or the narrowest ladder width within
    ``max_rel_err`` (keeping values finite and positive tensors positive) whose payload
    beats full bytes; else a full record (pieces None: the caller sends it)."""
    n = element_count(h.shape)
    rejected = 0
    tries = (
        [(choice.bits, choice.block)]
        if choice is not None
        else [(b, quant.block_length(b, h.shape, group_size)) for b in ladder]
    )
    for b, block in tries:
        given = (choice.scales, choice.codes) if choice is not None else (None, None)
        cand = plan_mod.plan(
            ra, rt, h, b, block, measure_size=False, scales=given[0], codes=given[1]
        )
        if cand.raw_payload(n) >= h.nbytes:
            break
        err = cand.rel_err
        if not cand.ok or (max_rel_err is not None and err > max_rel_err):
            rejected = 1
            continue
        bits_byte, pieces = plan_mod.emit(ra, rt, h, cand, sink)
        stats[f"q{b}"] += 1
        stats["unpacked_codes"] += 1 if bits_byte & quant.UNPACKED else 0
        stats["fallbacks"] += rejected
        stats["max_rel_err"] = max(stats["max_rel_err"], err)
        return _Record(QUANT, 0, h, bits_byte, block), pieces
    stats["full"] += 1
    stats["fallbacks"] += rejected
    return _Record(FULL, 0, h), None


# --- apply -----------------------------------------------------------------------------


@dataclass
class _Header:
    format: str
    base_digest: str
    names: list[str]
    sizes: list[int]
    skeleton_sizes: list[int]


def _read_header(rd: _In) -> _Header:
    if rd.exact(4) != MAGIC:
        raise _bad("not a residual patch (bad magic)")
    version, fmt, flags = rd.unpack("<BBH")
    if version != VERSION:
        raise FormatError(
            f"residual patch version {version} is not supported", code="residual-version"
        )
    names = {v: k for k, v in FORMATS.items()}
    if fmt not in names or flags:
        raise _bad("unknown format or flags")
    base_digest = "sha256:" + rd.exact(32).hex()
    (nfiles,) = rd.unpack("<H")
    if not 1 <= nfiles <= MAX_FILES:
        raise _bad("file count")
    hdr = _Header(names[fmt], base_digest, [], [], [])
    from .layout import safe_location

    for i in range(nfiles):
        name = rd.string()
        if (i == 0) != (name == ""):
            raise _bad("file names")
        if i:
            try:
                safe_location(name)
            except ResidualError:
                raise _bad(f"unsafe external file name {name!r}") from None
            if name in hdr.names:
                raise _bad("duplicate file name")
        size, skel = rd.unpack("<QQ")
        if skel > size:
            raise _bad("skeleton larger than file")
        hdr.names.append(name)
        hdr.sizes.append(size)
        hdr.skeleton_sizes.append(skel)
    return hdr


def apply_patch(
    base: Path,
    patch: BinaryIO,
    out: Path,
    *,
    expected_base_digest: str | None,
    expected_target_digest: str | None,
    verify_base: bool = False,
) -> str:
    """Rebuild the target at ``out`` from ``base`` and a patch stream; return its digest.

    Raises BaseMismatchError (base untouched, nothing written) when the base is not the
    one the patch (or the caller) names, TargetDigestError when the result does not
    check out, FormatError-type errors for corrupt patches. Output goes to temp files
    next to ``out``, renamed into place after the digest check.

    The base is not hashed when the result checks out: the target digest covers every
    output byte, so a base that passes produced exactly the target. Only when something
    fails is the base digest computed, to tell a wrong base from a bad patch.
    ``verify_base=True`` also hashes the base on success (on a helper thread) and
    refuses a base that differs in bytes the output does not depend on (RESIDUAL.md).
    """
    base, out = Path(base), Path(out)
    rd = _In(patch)
    hdr = _read_header(rd)
    try:
        bl = scan(base)
    except (FormatError, ResidualError) as exc:
        raise BaseMismatchError(
            f"patch needs base {hdr.base_digest}, {base} is not a usable model ({exc})",
            code="base-mismatch",
        ) from None
    finals = [out if i == 0 else out.parent / n for i, n in enumerate(hdr.names)]
    inputs = {os.path.realpath(p) for p in bl.paths}
    if any(os.path.realpath(f) in inputs for f in finals):
        raise ResidualError(
            f"output {out} would overwrite the base model or its data files",
            code="residual-output",
        )
    base_check = _BaseCheck(bl, base, (hdr.base_digest, expected_base_digest))
    if expected_base_digest not in (None, hdr.base_digest) or bl.format != hdr.format:
        base_check.check()  # refused before anything is written
        raise BaseMismatchError(f"patch is for {hdr.format}, base is {bl.format}")
    if verify_base:
        base_check.start()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmps = [f.with_name(f".{f.name}.{secrets.token_hex(4)}.part") for f in finals]
    fds: list[int] = []
    maps = _Maps(bl)
    writer = _Writer()
    ok = False
    try:
        try:
            for t in tmps:
                fds.append(os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            digest = _apply_stream(rd, hdr, bl, maps, fds, writer=writer)
            tail = rd.exact(4 + 32)
            if tail[:4] != TRAILER:
                raise _bad("missing trailer")
            if patch.read(1):
                raise _bad("bytes after the trailer")
            named = "sha256:" + tail[4:].hex()
            for want in (named, expected_target_digest):
                if want is not None and want != digest:
                    raise TargetDigestError(
                        f"patched model digest {digest} is not the expected {want}",
                        code="target-digest",
                    )
        except Exception as exc:
            # Something failed: a wrong base is what gets reported, also when it made
            # the patch fail in another way (the base is hashed only now). A failing
            # disk or memory is not the base's doing.
            writer.stop()
            if not isinstance(exc, OSError | MemoryError):
                base_check.check()
            raise
        if verify_base:
            base_check.check()
        for fd in fds:
            os.fsync(fd)
        for t, f2 in zip(tmps, finals, strict=True):
            atomic_replace(t, f2)
        ok = True
        return digest
    except EdgewardError:
        raise
    except (OSError, ValueError, OverflowError, MemoryError, struct.error) as exc:
        raise ResidualError(f"cannot apply residual patch: {exc}", code="residual-io") from exc
    finally:
        writer.stop()
        base_check.join()
        maps.close()
        for fd in fds:
            os.close(fd)
        if not ok:
            for t in tmps:
                with contextlib.suppress(OSError):
                    t.unlink()


DEV_CHUNK = 1 << 18  # elements per device dequantisation step: 1 MiB of float32 (in L2)
POOL = 6  # output buffers of DEV_CHUNK float32 in flight between writing and hashing


class _Writer:
    """The apply's :class:`~agent.durable.WriteHashPipeline` plus a pool of output
    buffers: a pooled buffer returns to the pool once its chunk is written and hashed;
    other chunks are never modified after they are queued."""

    def __init__(self) -> None:
        self.pipe = WriteHashPipeline(2 * POOL, name="residual")
        self.free: queue.SimpleQueue[np.ndarray[Any, Any]] = queue.SimpleQueue()
        for _ in range(POOL):
            self.free.put(_take_buffer())
        self.qbuf = _take_buffer()  # packed q of one chunk, used on the calling thread
        self.returned = False

    def check(self) -> None:
        self.pipe.check()

    def buffer(self) -> np.ndarray[Any, Any]:
        """A free uint8 buffer of 4·DEV_CHUNK bytes (waits for the hasher if need be)."""
        self.pipe.check()
        return self.free.get()

    def release(self, buf: np.ndarray[Any, Any]) -> None:
        self.free.put(buf)

    def write(self, fd: int, data: Chunk, sha: Any, pooled: Any = None) -> None:
        done = None if pooled is None else functools.partial(self.free.put, pooled)
        self.pipe.write(fd, data, sha, done)

    def call(self, fn: Callable[[], None]) -> None:
        self.pipe.call(fn)

    def finish(self) -> None:
        """Wait for every queued chunk; re-raise a write or hashing error."""
        self.pipe.finish()

    def stop(self) -> None:
        """Drop what is queued (error path), wait for the threads, return the buffers."""
        self.pipe.stop()
        if self.returned:
            return
        self.returned = True
        bufs = [self.qbuf]
        while not self.free.empty():
            bufs.append(self.free.get())
        with _SPARE_LOCK:
            _SPARE.extend(bufs[: 2 * POOL - len(_SPARE)])


_SPARE: list[np.ndarray[Any, Any]] = []  # buffers kept between applies (no page faults)
_SPARE_LOCK = threading.Lock()


def _take_buffer() -> np.ndarray[Any, Any]:
    with _SPARE_LOCK:
        if _SPARE:
            return _SPARE.pop()
    return np.empty(4 * DEV_CHUNK, np.uint8)


class _BaseCheck:
    """The base digest, compared with what is required: computed only on the error
    path (or on a helper thread with ``verify_base``)."""

    def __init__(self, layout: Layout, path: Path, wants: tuple[str | None, ...]) -> None:
        self.layout, self.path, self.wants = layout, path, wants
        self.found: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="residual-base", daemon=True)

    def _run(self) -> None:
        try:
            self.found = _layout_digest(self.layout)
        except BaseException as exc:  # re-raised by check()
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        if self.thread.is_alive():
            self.thread.join()

    def check(self) -> None:
        if self.thread.ident is None:
            self._run()
        self.join()
        if self.error is not None:
            raise self.error
        for want in self.wants:
            if want is not None and want != self.found:
                raise BaseMismatchError(
                    f"patch needs base {want}, {self.path} has {self.found}", code="base-mismatch"
                )


class _OutFile:
    """One output file: skeleton bytes and hole bytes written in order, size-capped."""

    def __init__(
        self, fd: int, size: int, skeleton: _Frame, skeleton_size: int, writer: _Writer
    ) -> None:
        self.fd, self.size, self.written, self.writer = fd, size, 0, writer
        self.skeleton, self.skeleton_size, self.skeleton_done = skeleton, skeleton_size, 0
        self.skeleton_sha = hashlib.sha256()
        self.dctx = _zstd().ZstdDecompressor()  # one per file: frames are read in turn

    def write(self, data: Chunk, sha: Any, pooled: Any = None) -> None:
        self.written += memoryview(cast(Any, data)).nbytes
        if self.written > self.size:
            if pooled is not None:
                self.writer.release(pooled)
            raise _bad("output longer than declared")
        self.writer.write(self.fd, data, sha, pooled)

    def copy_skeleton(self, upto: int) -> None:
        if upto < self.skeleton_done or upto > self.skeleton_size:
            raise _bad("record position out of order")
        while self.skeleton_done < upto:
            n = min(IO_CHUNK, upto - self.skeleton_done)
            self.write(self.skeleton.read(n), self.skeleton_sha)
            self.skeleton_done += n


def _apply_stream(
    rd: _In, hdr: _Header, bl: Layout, maps: _Maps, fds: list[int], *, writer: _Writer
) -> str:
    base_by_key = bl.by_key()
    dig = _Digest(hdr.format)
    seen: set[str] = set()
    for i, fd in enumerate(fds):
        (comp_len,) = rd.unpack("<Q")
        if comp_len > MAX_SKELETON:
            raise _bad("skeleton too large")
        comp = rd.exact(comp_len)
        frame = _Frame(
            cast(BinaryIO, io.BytesIO(struct.pack("<Q", comp_len) + comp)), hdr.skeleton_sizes[i]
        )
        of = _OutFile(fd, hdr.sizes[i], frame, hdr.skeleton_sizes[i], writer)
        while True:
            (kind,) = rd.unpack("<B")
            if kind == END_FILE:
                break
            rec = _read_record_head(rd, kind)
            if rec.hole.key in seen:
                raise _bad(f"tensor {rec.hole.key!r} twice")
            seen.add(rec.hole.key)
            of.copy_skeleton(rec.skel_pos)
            sha = _apply_record(rd, rec, base_by_key, maps, of)
            # digests are read on the hashing thread, once the chunks before are hashed
            writer.call(functools.partial(_tensor_done, dig, rec.hole, sha, i, rec.skel_pos))
        of.copy_skeleton(hdr.skeleton_sizes[i])
        frame.close()
        if of.written != hdr.sizes[i]:
            raise _bad("output size differs from the declared size")
        writer.call(
            functools.partial(_file_done, dig, hdr.names[i], hdr.skeleton_sizes[i], of.skeleton_sha)
        )
    writer.finish()
    return dig.value()


def _tensor_done(dig: _Digest, hole: Hole, sha: Any, i: int, pos: int) -> None:
    dig.tensor(hole, sha.digest(), i, pos)


def _file_done(dig: _Digest, name: str, skeleton_size: int, sha: Any) -> None:
    dig.file(name, skeleton_size, sha.digest())


def _apply_record(
    rd: _In, rec: _Record, base_by_key: dict[str, Hole], maps: _Maps, of: _OutFile
) -> Any:
    """Write one tensor's bytes; returns the sha256 object the hasher feeds."""
    h = rec.hole
    sha = hashlib.sha256()
    bh = base_by_key.get(h.key)
    if rec.kind == FULL:
        frame = _Frame(rd.f, h.nbytes, of.dctx)
        step = 4 * DEV_CHUNK
        for o in range(0, h.nbytes, step):
            buf = of.writer.buffer()
            try:
                frame.readinto(buf[: min(step, h.nbytes - o)])
            except BaseException:
                of.writer.release(buf)
                raise
            of.write(buf[: min(step, h.nbytes - o)], sha, buf)
        frame.close()
        return sha
    if bh is None or bh.dtype != h.dtype or bh.nbytes != h.nbytes:
        raise BaseMismatchError(
            f"base has no tensor {h.key!r} of the patched type and size", code="base-mismatch"
        )
    base = maps.reader(bh)
    if rec.kind == SKIP:
        for o in range(0, h.nbytes, IO_CHUNK):
            of.write(base(o, min(IO_CHUNK, h.nbytes - o)), sha)
    else:
        size = h.nbytes
        if rec.kind == LOWRANK:
            _apply_lowrank(rd, base, rec, of, sha)
            maps.release(bh)
            return sha
        if rec.kind == QUANT:
            n = element_count(h.shape)
            size = 4 * (-(-n // rec.block)) + quant.code_size(n, rec.bits)
            if size >= h.nbytes:  # the publisher sends such tensors full
                raise _bad(f"tensor {h.key!r}: quantised record not smaller than the tensor")
        frame = _Frame(rd.f, size, of.dctx)
        if rec.kind == IDELTA:
            _apply_idelta(base, rec, frame, of, sha)
        else:
            _apply_quant(base, rec, frame, of, sha)
        frame.close()
    maps.release(bh)
    return sha


def _apply_quant(
    base: Callable[[int, int], memoryview], rec: _Record, frame: _Frame, of: _OutFile, sha: Any
) -> None:
    """Device side of ``plan.emit``: the same arithmetic (``quant.dequant_add``)
    into pooled buffers of DEV_CHUNK elements that stay in cache while they are
    written and hashed."""
    h = rec.hole
    n = element_count(h.shape)
    isz = quant.ITEMSIZE[h.dtype]
    nscales = -(-n // rec.block)
    scales = np.frombuffer(frame.read(4 * nscales), dtype="<f4").astype(np.float32)
    for e0 in range(0, n, DEV_CHUNK):
        k = min(DEV_CHUNK, n - e0)
        packed = of.writer.qbuf[: quant.code_size(k, rec.bits)]
        frame.readinto(packed)
        q = quant.unpack(packed, rec.bits, k)
        a = quant.to_f32(base(e0 * isz, k * isz), h.dtype)
        buf = of.writer.buffer()
        d = buf.view(np.float32)[:k]
        try:
            quant.dequant_add(a, q, scales, rec.block, e0, out=d)
        except BaseException:
            of.writer.release(buf)
            raise
        if h.dtype == quant.F32:
            of.write(d, sha, buf)
        else:
            data = quant.from_f32(d, h.dtype)
            of.writer.release(buf)
            of.write(data, sha)


def _apply_lowrank(
    rd: _In, base: Callable[[int, int], memoryview], rec: _Record, of: _OutFile, sha: Any
) -> None:
    """Device side of a low-rank record: the factor frame, then B' = A + L·R (+ the
    remainder, as ``_apply_quant`` adds it) with lowrank.delta_piece's arithmetic, the
    publisher's own, in pooled buffers."""
    h = rec.hole
    n = element_count(h.shape)
    mn = lowrank_mod.matrix(h.shape)
    assert mn is not None  # checked with the header
    m, cols = mn
    fsize = lowrank_mod.payload_size(m, cols, rec.rank)
    rsize = 4 * (-(-n // rec.block)) + quant.code_size(n, rec.bits) if rec.bits else 0
    if fsize + rsize >= h.nbytes:
        raise _bad(f"tensor {h.key!r}: low-rank record not smaller than the tensor")
    frame = _Frame(rd.f, fsize, of.dctx)
    try:
        f = lowrank_mod.read(frame.read(fsize), m, cols, rec.rank)
    except ValueError as exc:
        raise _bad(f"tensor {h.key!r}: {exc}") from None
    frame.close()
    floats = f.floats()
    rframe = _Frame(rd.f, rsize, of.dctx) if rec.bits else None
    scales = (
        np.frombuffer(rframe.read(4 * (-(-n // rec.block))), dtype="<f4").astype(np.float32)
        if rframe is not None
        else None
    )
    for e0 in range(0, n, DEV_CHUNK):
        k = min(DEV_CHUNK, n - e0)
        a = quant.to_f32(base(e0 * 4, k * 4), h.dtype)
        buf = of.writer.buffer()
        d = buf.view(np.float32)[:k]
        try:
            np.add(a, lowrank_mod.delta_piece(f, floats, e0, k), out=d, dtype=np.float32)
            if rframe is not None and scales is not None:
                packed = of.writer.qbuf[: quant.code_size(k, rec.bits)]
                rframe.readinto(packed)
                q = quant.unpack(packed, rec.bits, k)
                quant.dequant_add(d.copy(), q, scales, rec.block, e0, out=d)
        except BaseException:
            of.writer.release(buf)
            raise
        of.write(d, sha, buf)
    if rframe is not None:
        rframe.close()


def _apply_idelta(
    base: Callable[[int, int], memoryview], rec: _Record, frame: _Frame, of: _OutFile, sha: Any
) -> None:
    """Exact integer Δ: ``b = a + Δ`` modulo 2**(8·itemsize), little-endian, in pooled
    buffers."""
    h = rec.hole
    wrap = quant.WRAP[quant.ITEMSIZE[h.dtype]]
    step = 4 * DEV_CHUNK
    for o in range(0, h.nbytes, step):
        k = min(step, h.nbytes - o)
        a = np.frombuffer(base(o, k), dtype=wrap)
        buf = of.writer.buffer()
        d = buf[:k].view(wrap)
        try:
            frame.readinto(d)
            np.add(d, a, out=d)
        except BaseException:
            of.writer.release(buf)
            raise
        of.write(d, sha, buf)
