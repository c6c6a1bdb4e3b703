"""Quantised-Δ candidates for one tensor, computed in chunks from memory maps.

A candidate is (width, block); planning it reads A and B chunk by chunk (twice, three
times with clipping search) and yields the scales, the squared error of exactly the B'
the device will build, whether B' stays finite and positive where B is, and optionally
the compressed payload size for packed and unpacked codes. Emitting it re-derives the
codes chunk by chunk and returns the compressed frame (the smaller coding) while handing
each B' chunk to a sink. Nothing holds more than a few chunks of the tensor: memory
stays flat whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import lowrank as lowrank_mod
from . import quant
from .layout import Hole, element_count

CHUNK = 1 << 20  # elements per step (multiple of 8: packed chunks are whole bytes)
ZSTD_LEVEL = 9

Reader = Callable[[int, int], memoryview]
Sink = Callable[[Any], None]


def zstd_compressor() -> Any:
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)


@dataclass
class Candidate:
    """One way to send a float tensor as quantised Δ (``bits`` 1–8, ``block`` elements
    per scale) and what it costs and changes."""

    bits: int
    block: int
    scales: quant.F32Array
    err_sq: float  # Σ (B' − B)² in float64
    norm_sq: float  # Σ B²
    ok: bool  # B' finite where B is, positive where B is strictly positive
    size_packed: int = 0  # compressed payload bytes (0: not measured)
    size_unpacked: int = 0  # the same with one byte per code (0: not measured / 8 bits)
    codes: quant.I8Array | None = None  # given codes (error-compensated rounding), flat
    out_err: float | None = None  # layer-output error tr(Eᵀ H E), when calibrated
    label: str = ""  # how it was made, for reports ("" plain rounding)
    #: low-rank factors sent first (lowrank.py); then ``bits`` 0 means no remainder,
    #: else the remainder B − (A + L·R) quantised as above
    lowrank: lowrank_mod.Factors | None = None
    size_factors: int = 0  # compressed factor frame bytes, with its u64 length

    @property
    def rel_err(self) -> float:
        if self.norm_sq == 0:
            return 0.0 if self.err_sq == 0 else float("inf")
        return float(np.sqrt(self.err_sq / self.norm_sq))

    @property
    def size(self) -> int:
        """Frame bytes (with its u64 length) of the smaller coding (plus the factor
        frame of a low-rank candidate)."""
        sizes = [s for s in (self.size_packed, self.size_unpacked) if s]
        if self.lowrank is not None:
            return self.size_factors + (8 + min(sizes) if sizes else 0)
        return 8 + min(sizes) if sizes else 0

    def raw_payload(self, n: int, unpacked: bool = False) -> int:
        return 4 * len(self.scales) + (n if unpacked else quant.packed_size(n, self.bits))


def _chunks(ra: Reader, rb: Reader, h: Hole) -> Iterator[tuple[int, Any, Any]]:
    """(e0, a float32, b float32) per CHUNK elements."""
    n = element_count(h.shape)
    isz = quant.ITEMSIZE[h.dtype]
    for e0 in range(0, n, CHUNK):
        k = min(CHUNK, n - e0)
        a = quant.to_f32(ra(e0 * isz, k * isz), h.dtype)
        b = quant.to_f32(rb(e0 * isz, k * isz), h.dtype)
        yield e0, a, b


def _delta(a: Any, b: Any) -> npt.NDArray[np.float64]:
    d: npt.NDArray[np.float64] = b.astype(np.float64) - a.astype(np.float64)
    return d


def choose_scales(ra: Reader, rb: Reader, h: Hole, bits: int, block: int) -> quant.F32Array:
    """Per-block scales: 1 bit mean |Δ| (least squares for signs); wider ``absmax ·
    ratio / qmax`` with the ratio of least squared error (CLIP_RATIOS)."""
    n = element_count(h.shape)
    nb = -(-n // block)
    if bits == 1:
        sums = np.zeros(nb, np.float64)
        for e0, a, b in _chunks(ra, rb, h):
            quant.reduce_blocks(np.abs(_delta(a, b)), e0, block, np.add, sums)
        cnt = np.full(nb, block, np.float64)
        if n % block:
            cnt[-1] = n % block
        out: quant.F32Array = (sums / cnt).astype(np.float32)
        return out
    absmax = np.zeros(nb, np.float64)
    for e0, a, b in _chunks(ra, rb, h):
        quant.reduce_blocks(np.abs(_delta(a, b)), e0, block, np.maximum, absmax)
    qmax = quant.QMAX[bits]
    ratios = quant.CLIP_RATIOS.get(bits, (1.0,))
    cands = [(absmax * r / qmax).astype(np.float32) for r in ratios]
    if len(ratios) == 1:
        return cands[0]
    errs = [np.zeros(nb, np.float64) for _ in ratios]
    for e0, a, b in _chunks(ra, rb, h):
        d = _delta(a, b)
        for s, err in zip(cands, errs, strict=True):
            q = quant.codes(d, s, bits, block, e0)
            e = (q * quant.element_scales(s, block, e0, len(d)) - d) ** 2
            quant.reduce_blocks(e, e0, block, np.add, err)
    best, best_e = cands[0].copy(), errs[0].copy()
    for s, err in zip(cands[1:], errs[1:], strict=True):
        better = err < best_e
        best = np.where(better, s, best)
        best_e = np.minimum(err, best_e)
    out2: quant.F32Array = best.astype(np.float32)
    return out2


def absmax_scales(  # noqa: PLR0917
    ra: Reader, rb: Reader, h: Hole, bits: int, block: int, ratio: float
) -> quant.F32Array:
    """``absmax · ratio / qmax`` per block (the error-compensated candidates' scales)."""
    n = element_count(h.shape)
    absmax = np.zeros(-(-n // block), np.float64)
    for e0, a, b in _chunks(ra, rb, h):
        quant.reduce_blocks(np.abs(_delta(a, b)), e0, block, np.maximum, absmax)
    out: quant.F32Array = (absmax * ratio / quant.QMAX[bits]).astype(np.float32)
    return out


def _walk(  # noqa: PLR0917
    ra: Reader,
    rb: Reader,
    h: Hole,
    bits: int,
    block: int,
    scales: quant.F32Array,
    given: quant.I8Array | None = None,
) -> Iterator[tuple[quant.I8Array, quant.F32Array, Any]]:
    """(q, B' float32, B float32) per chunk: B' is ``quant.dequant_add``, the device's
    own arithmetic; q rounds Δ unless the codes are ``given``."""
    for e0, a, b in _chunks(ra, rb, h):
        if given is None:
            q = quant.codes(_delta(a, b), scales, bits, block, e0)
        else:
            q = given[e0 : e0 + len(a)]
        yield q, quant.dequant_add(a, q, scales, block, e0), b


def plan(
    ra: Reader,
    rb: Reader,
    h: Hole,
    bits: int,
    block: int,
    *,
    measure_size: bool,
    scales: quant.F32Array | None = None,
    codes: quant.I8Array | None = None,
) -> Candidate:
    """Scales, error and validity (and with ``measure_size`` both coded sizes); the
    scales and codes are chosen here unless given."""
    n = element_count(h.shape)
    if scales is None:
        scales = choose_scales(ra, rb, h, bits, block)
    err = norm = 0.0
    bmin, gotmin = float("inf"), float("inf")
    finite = True
    comps: list[Any] = []
    sizes = [0, 0]
    if measure_size:
        head = scales.astype("<f4").tobytes()
        codings = [False]
        if bits < 8 and 4 * len(scales) + n < h.nbytes:
            codings.append(True)
        for unpacked in codings:
            total = 4 * len(scales) + (n if unpacked else quant.packed_size(n, bits))
            c = zstd_compressor().compressobj(size=total)
            sizes[unpacked] += len(c.compress(head))
            comps.append((unpacked, c))
    for q, got, b in _walk(ra, rb, h, bits, block, scales, codes):
        got_t = quant.to_f32(quant.from_f32(got, h.dtype), h.dtype)  # as stored
        fin = np.isfinite(b)
        if not np.all(np.isfinite(got_t[fin])):
            finite = False
        diff = got_t.astype(np.float64) - b
        err += float(np.dot(diff[fin], diff[fin])) if finite else 0.0
        b64 = b.astype(np.float64)[fin]
        norm += float(np.dot(b64, b64))
        if b.size:
            bmin = min(bmin, float(np.min(b)))
            gotmin = min(gotmin, float(np.min(got_t)))
        for unpacked, c in comps:
            sizes[unpacked] += len(c.compress(q.tobytes() if unpacked else quant.pack(q, bits)))
    for unpacked, c in comps:
        sizes[unpacked] += len(c.flush())
    ok = finite and not (bmin > 0 and gotmin <= 0)
    return Candidate(
        bits,
        block,
        scales,
        err if ok else float("inf"),
        norm,
        ok,
        size_packed=sizes[0],
        size_unpacked=sizes[1],
        codes=codes,
    )


def lowrank_base(ra: Reader, h: Hole, f: lowrank_mod.Factors) -> Reader:
    """A reader of A + L·R (float32 bytes): the base the remainder is quantised against,
    computed as the device computes it (lowrank.delta_piece, then one float32 add)."""
    n = element_count(h.shape)
    a = quant.to_f32(ra(0, 4 * n), quant.F32)
    ap = np.add(a, lowrank_mod.delta_piece(f, f.floats(), 0, n), dtype=np.float32)
    view = memoryview(ap.view(np.uint8))
    return lambda o, k: view[o : o + k]


def plan_lowrank(
    rap: Reader, rb: Reader, h: Hole, f: lowrank_mod.Factors, *, bits: int, block: int
) -> Candidate:
    """A low-rank candidate: the factors, then (``bits`` > 0) the remainder quantised
    at ``bits`` per ``block``; sizes measured, error of exactly the device's B'.
    ``rap``: :func:`lowrank_base` of the factors (made once for all remainder widths)."""
    if bits:
        c = plan(rap, rb, h, bits, block, measure_size=True)
    else:  # the factors alone: B' = A + L·R
        err, norm, ok = _lowrank_only_error(rap, rb, h)
        c = Candidate(0, 0, np.zeros(0, np.float32), err, norm, ok)
    c.lowrank = f
    c.size_factors = 8 + len(zstd_compressor().compress(f.payload()))
    return c


def _lowrank_only_error(rap: Reader, rb: Reader, h: Hole) -> tuple[float, float, bool]:
    """(Σ (B' − B)², Σ B², valid) for B' = A + L·R, with plan()'s validity rules."""
    n = element_count(h.shape)
    got = quant.to_f32(rap(0, 4 * n), quant.F32)
    b = quant.to_f32(rb(0, 4 * n), quant.F32)
    fin = np.isfinite(b)
    b64 = b.astype(np.float64)[fin]
    norm = float(np.dot(b64, b64))
    if not np.all(np.isfinite(got[fin])) or (
        b.size and float(np.min(b)) > 0 and float(np.min(got)) <= 0
    ):
        return float("inf"), norm, False
    diff = got.astype(np.float64)[fin] - b64
    return float(np.dot(diff, diff)), norm, True


def emit(
    ra: Reader, rb: Reader, h: Hole, cand: Candidate, sink: Sink | None, *, compress: bool = True
) -> tuple[int, list[bytes]]:
    """Feed B' chunks (storage bytes) to ``sink``; return (bits byte, compressed frame
    pieces) of the smaller coding (packed unless one code per byte compresses smaller;
    8 bits is always one byte per code). A low-rank candidate's remainder is coded
    against A + L·R (its factor frame is :func:`factor_pieces`); without a remainder
    the bits byte is 0 and there are no pieces."""
    if cand.lowrank is not None:
        rap = lowrank_base(ra, h, cand.lowrank)
        if cand.bits == 0:
            if sink is not None:
                for o in range(0, h.nbytes, 4 * CHUNK):
                    sink(rap(o, min(4 * CHUNK, h.nbytes - o)))
            return 0, []
        inner = Candidate(
            cand.bits,
            cand.block,
            cand.scales,
            cand.err_sq,
            cand.norm_sq,
            cand.ok,
            codes=cand.codes,
        )
        return emit(rap, rb, h, inner, sink, compress=compress)
    n = element_count(h.shape)
    head = cand.scales.astype("<f4").tobytes()
    comps: list[tuple[bool, Any, list[bytes]]] = []
    if compress:
        codings = [False]
        if cand.bits < 8 and cand.raw_payload(n, True) < h.nbytes:
            codings.append(True)  # the device refuses payloads not smaller than the tensor
        for unpacked in codings:
            c = zstd_compressor().compressobj(size=cand.raw_payload(n, unpacked))
            comps.append((unpacked, c, [c.compress(head)]))
    for q, got, _ in _walk(ra, rb, h, cand.bits, cand.block, cand.scales, cand.codes):
        if sink is not None:
            sink(quant.from_f32(got, h.dtype))
        for unpacked, c, pieces in comps:
            pieces.append(c.compress(q.tobytes() if unpacked else quant.pack(q, cand.bits)))
    if not compress:
        return cand.bits, []
    best: tuple[int, bool, list[bytes]] | None = None
    for unpacked, c, pieces in comps:
        pieces.append(c.flush())
        total = sum(len(p) for p in pieces)
        if best is None or total < best[0]:
            best = (total, unpacked, pieces)
    assert best is not None
    _, unpacked, pieces = best
    return cand.bits | (quant.UNPACKED if unpacked else 0), [p for p in pieces if p]


def factor_pieces(f: lowrank_mod.Factors) -> list[bytes]:
    """The factor frame of a low-rank record."""
    return compress_stream(lowrank_mod.payload_size(f.m, f.n, f.rank), iter([f.payload()]))


def compress_stream(
    total: int, pieces: Iterator[bytes | memoryview | npt.NDArray[Any]]
) -> list[bytes]:
    """One checksummed zstd frame of ``total`` bytes fed piece by piece."""
    c = zstd_compressor().compressobj(size=total)
    out = [c.compress(p) for p in pieces]
    out.append(c.flush())
    return [p for p in out if p]
