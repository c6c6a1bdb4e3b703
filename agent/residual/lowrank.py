"""Low-rank Δ (Delta-CoMe style): Δ ≈ Σₜ lₜ·rₜᵀ with int8 factors, optionally plus a
quantised remainder (issue 19).

A fine-tune moves a weight matrix along few directions: on the TFLite MLP pair the
256×3072 layer's Δ holds 90 % of its energy in 5 components and 99 % in 34, and B' = A +
the rank-34 part alone already gives output cosine 0.9999 on held-out inputs. Sending
(m + n) numbers per component instead of m·n quantised values is what brings such a pair
under 1/16 of the full package; the search (search.py) decides per tensor, by measured
size and output error, whether a rank (and which remainder width) beats plain
quantisation.

The factors are per-component int8 codes with one float32 scale each (one for lₜ, one
for rₜ), so each component is quantised at its own magnitude. Decoding is the same
arithmetic on publisher and device, element-wise in float32 and in a fixed component
order: ``L = float32(lq) * sl``, ``R = float32(rq) * sr`` (one numpy multiply per
factor), then ``acc += outer(Lₜ, Rₜ)`` for t = 0, 1, … (a float32 multiply and a float32
add per element and component; numpy never fuses them, and each IEEE operation rounds the
same on every CPU). No BLAS, no reduction whose order could differ between machines, so
B' is the same bytes everywhere, chunk by chunk.

Float32 tensors of at least two dimensions are eligible; the matrix is (first dimension,
product of the others), the rows quant.row_length uses (a conv kernel: out × in·kh·kw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import quant
from .layout import element_count

RANKS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128)  # ranks tried
MAX_ELEMENTS = 1 << 24  # larger tensors are not factorised (SVD time and memory)
MAX_SHARE = 0.6  # a rank whose factors exceed this share of the tensor's elements is skipped
#: the largest rank a record may carry: decoding costs rank × elements multiply-adds, so
#: with MAX_ELEMENTS this bounds what one record can make a device compute
MAX_RANK = 256


def matrix(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(m, n) of the matrix view of a tensor of ``shape``, or None when not eligible."""
    if len(shape) < 2:
        return None
    n = quant.row_length(shape)
    count = element_count(shape)
    if n < 2 or count // n < 2:
        return None
    return count // n, n


def payload_size(m: int, n: int, rank: int) -> int:
    """Bytes of the factor frame: two float32 scales and m + n int8 codes per component."""
    return rank * (8 + m + n)


@dataclass(frozen=True, eq=False)
class Factors:
    """Rank-``rank`` factors of an (m, n) Δ: ``lq`` (rank, m) and ``rq`` (rank, n) int8,
    ``sl``/``sr`` (rank,) float32."""

    m: int
    n: int
    rank: int
    sl: Any
    sr: Any
    lq: Any
    rq: Any

    def payload(self) -> bytes:
        return b"".join(
            (
                self.sl.astype("<f4").tobytes(),
                self.sr.astype("<f4").tobytes(),
                self.lq.tobytes(),
                self.rq.tobytes(),
            )
        )

    def floats(self) -> tuple[Any, Any]:
        """(L, R) in float32: each code times its component's scale (one multiply)."""
        lf = self.lq.astype(np.float32)
        lf *= self.sl[:, None]
        rf = self.rq.astype(np.float32)
        rf *= self.sr[:, None]
        return lf, rf


def read(data: bytes | memoryview, m: int, n: int, rank: int) -> Factors:
    """Factors from a frame of :func:`payload_size` bytes (checked by the caller)."""
    buf = memoryview(data)
    o = 0

    def take(count: int, dtype: str) -> Any:
        nonlocal o
        size = count * np.dtype(dtype).itemsize
        arr = np.frombuffer(buf[o : o + size], dtype=dtype)
        o += size
        return arr

    sl = take(rank, "<f4").astype(np.float32)
    sr = take(rank, "<f4").astype(np.float32)
    lq = take(rank * m, "i1").reshape(rank, m)
    rq = take(rank * n, "i1").reshape(rank, n)
    if not (np.all(np.isfinite(sl)) and np.all(np.isfinite(sr))):
        raise ValueError("non-finite factor scale")
    return Factors(m, n, rank, sl, sr, lq, rq)


def _quantise(x: Any) -> tuple[Any, Any]:
    """Per-component (row) int8 codes of ``x`` (float64) and their float32 scales."""
    scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float64)
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return scale, q


def factorise(delta: Any, ranks: tuple[int, ...] = RANKS) -> list[Factors]:
    """Factors of ``delta`` ((m, n) float64) at each rank of ``ranks`` that is worth
    trying: at most min(m, n), factors under MAX_SHARE of the elements, and adding a
    component that carries energy. One SVD (LAPACK, deterministic for a given build)."""
    m, n = delta.shape
    if m * n > MAX_ELEMENTS or not np.all(np.isfinite(delta)):
        return []
    u, s, _ = np.linalg.svd(delta, full_matrices=False)
    out: list[Factors] = []
    for k in sorted({min(r, len(s)) for r in ranks}):
        if s[k - 1] <= 0 or k * (m + n) > MAX_SHARE * m * n:
            break
        # L (√s each side) is quantised first, then R is refitted by least squares to
        # Δ given the quantised L and quantised in turn: R multiplies the inputs, whose
        # energy sits in Δ's top directions, so its rounding is what the outputs feel
        # (on the TFLite pair, rank 34: output cosine 0.9978 without the refit, 0.9994
        # with it; unquantised factors 0.9999)
        root = np.sqrt(s[:k])
        sl, lq = _quantise((u[:, :k] * root).T)
        lf = lq.astype(np.float64) * sl.astype(np.float64)[:, None]  # (k, m)
        sr, rq = _quantise(np.linalg.pinv(lf.T) @ delta)
        out.append(Factors(m, n, k, sl, sr, lq, rq))
    return out


def delta_piece(f: Factors, floats: tuple[Any, Any], e0: int, count: int) -> Any:
    """The float32 low-rank Δ of flat elements ``e0 … e0+count`` (row-major (m, n))."""
    lf, rf = floats
    n = f.n
    i0, i1 = e0 // n, (e0 + count - 1) // n + 1
    if i1 - i0 == 1:  # inside one row: only the columns asked for
        c0 = e0 - i0 * n
        acc = np.zeros(count, np.float32)
        for t in range(f.rank):
            acc += lf[t, i0] * rf[t, c0 : c0 + count]
        return acc
    acc2 = np.zeros((i1 - i0, n), np.float32)
    for t in range(f.rank):
        acc2 += np.multiply.outer(lf[t, i0:i1], rf[t])
    start = e0 - i0 * n
    return acc2.reshape(-1)[start : start + count]
