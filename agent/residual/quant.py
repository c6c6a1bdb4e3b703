"""Quantised Δ and the exact dequantisation shared by publisher and device.

Both sides run :func:`dequant_add` on the same integers and scales, so B' is the same
bytes everywhere: ``d = float32(q) * scale`` (one numpy multiply, rounded to float32),
then ``b = a_f32 + d`` (a separate numpy add, rounded to float32; numpy never fuses
them), then round-to-nearest-even into the storage dtype. Chunking does not change the
result because every step is element-wise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# Internal dtype codes (FORMAT.md "Residual patch stream", dtype table).
OPAQUE, F32, F16, BF16, F64 = 0, 1, 2, 3, 4
I8, U8, I16, U16, I32, U32, I64, U64, BOOL = 10, 11, 12, 13, 14, 15, 16, 17, 18

FLOATS = frozenset({F32, F16, BF16})  # dtypes that take a quantised Δ
ITEMSIZE = {
    OPAQUE: 1,
    F32: 4,
    F16: 2,
    BF16: 2,
    F64: 8,
    I8: 1,
    U8: 1,
    I16: 2,
    U16: 2,
    I32: 4,
    U32: 4,
    I64: 8,
    U64: 8,
    BOOL: 1,
}
# Unsigned integer of the same width: integer deltas wrap modulo 2**bits.
WRAP: dict[int, np.dtype[Any]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}
BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # every width a quant record may carry
LADDER = (1, 2, 4, 8)  # widths ``max_rel_err`` widens through (the requested one first)
# Largest |q| the quantiser emits: symmetric, 2^(b-1) - 1 (1 bit: ±1).
QMAX = {b: max(1, (1 << (b - 1)) - 1) for b in BITS}
UNPACKED = 0x80  # flag in a record's bits byte: q stored one int8 per element

F32Array = npt.NDArray[np.float32]
I8Array = npt.NDArray[np.int8]
U8Array = npt.NDArray[np.uint8]


def to_f32(raw: U8Array | memoryview | bytes, dtype: int) -> F32Array:
    """Little-endian storage bytes → float32 (exact for f16 and bf16)."""
    if dtype == F32:
        return np.frombuffer(raw, dtype="<f4").view(np.float32)  # read-only view, no copy
    if dtype == F16:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == BF16:
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
        np.left_shift(bits, 16, out=bits)
        return bits.view(np.float32)
    raise ValueError(f"dtype {dtype} has no float32 view")


def bf16_rne(x: F32Array) -> npt.NDArray[np.uint16]:
    """float32 → bfloat16 bits, round to nearest even on the float32 bit pattern.

    ``u + 0x7FFF + ((u >> 16) & 1)`` then ``>> 16``; NaN keeps its sign and becomes the
    quiet NaN ``0x7FC0`` (| sign) so no NaN rounds to infinity.
    """
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = ((u[nan] >> 16) & 0x8000).astype(np.uint16) | np.uint16(0x7FC0)
    return r


def from_f32(x: F32Array, dtype: int) -> U8Array:
    """float32 → little-endian storage bytes (RNE), as a uint8 array (no copy)."""
    if dtype == F32:
        return x.astype("<f4", copy=False).view(np.uint8)
    if dtype == F16:
        return x.astype("<f2").view(np.uint8)
    if dtype == BF16:
        return bf16_rne(x).astype("<u2", copy=False).view(np.uint8)
    raise ValueError(f"dtype {dtype} is not a float storage type")


def mul_scales(q: I8Array, scales: F32Array, block: int, e0: int, out: F32Array) -> None:
    """``out[i] = float32(q[i]) * scales[(e0 + i) // block]``: the int8 → float32 cast is
    exact and the multiply runs in float32 (ufunc loop ``ff->f``)."""
    n = len(q)
    i = 0
    off = e0 % block
    if off:
        k = min(block - off, n)
        np.multiply(q[:k], scales[e0 // block], out=out[:k], dtype=np.float32)
        i = k
    m = (n - i) // block
    if m:
        b0 = (e0 + i) // block
        v = out[i : i + m * block].reshape(m, block)
        qv = q[i : i + m * block].reshape(m, block)
        np.multiply(qv, scales[b0 : b0 + m, None], out=v, dtype=np.float32)
        i += m * block
    if i < n:
        np.multiply(q[i:], scales[(e0 + i) // block], out=out[i:], dtype=np.float32)


def dequant_add(
    a: F32Array, q: I8Array, scales: F32Array, block: int, e0: int, *, out: F32Array | None = None
) -> F32Array:
    """B' (float32) for elements ``e0 .. e0+len(q)``: ``a + float32(q) * scale``, into
    ``out`` if given (the device reuses buffers; the bytes are the same)."""
    d = np.empty(len(q), np.float32) if out is None else out
    mul_scales(q, scales, block, e0, d)
    np.add(a, d, out=d)
    return d


def pack(q: I8Array, bits: int) -> bytes:
    """Dense little-endian packing: element i occupies bits ``i * bits`` and up of the
    stream, least significant first; values of 2..7 bits are stored as
    ``q + 2**(bits-1)``, 8-bit values as two's-complement int8, 1-bit values as
    ``q > 0``. Chunks of a multiple of 8 elements pack to whole bytes, so packing chunk
    by chunk equals packing the whole."""
    if bits == 8:
        return q.astype(np.int8, copy=False).tobytes()
    if bits == 1:
        return np.packbits(q > 0, bitorder="little").tobytes()
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-len(u)) % per
        if pad:
            u = np.concatenate([u, np.zeros(pad, np.uint8)])
        u = u.reshape(-1, per)
        out = np.zeros(len(u), np.uint8)
        for j in range(per):
            out |= u[:, j] << np.uint8(j * bits)
        return out.tobytes()
    # 3, 5, 6, 7 bits straddle bytes: through a bit matrix (bits columns per element)
    bitmat = np.unpackbits(u[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def packed_size(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def code_size(n: int, bits: int) -> int:
    """Bytes of ``n`` codes: packed, or one byte each with the UNPACKED flag."""
    return n if bits & UNPACKED else packed_size(n, bits)


def unpack(data: bytes | memoryview | U8Array, bits: int, n: int) -> I8Array:
    """Inverse of :func:`pack` for the first ``n`` elements (``bits`` may carry the
    UNPACKED flag: then the bytes are the int8 codes themselves)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits & UNPACKED or bits == 8:
        return raw[:n].view(np.int8)
    if bits == 1:
        u = np.unpackbits(raw, count=n, bitorder="little").view(np.int8)
        q: I8Array = u * np.int8(2) - np.int8(1)
        return q
    if 8 % bits:
        bitmat = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
        vals = np.packbits(bitmat, axis=1, bitorder="little").reshape(n)
        res0: I8Array = vals.view(np.int8) - np.int8(1 << (bits - 1))
        return res0
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((len(raw), per), np.uint8)
    for j in range(per):
        np.bitwise_and(raw >> np.uint8(j * bits), mask, out=out[:, j])
    res: I8Array = out.reshape(-1)[:n].view(np.int8) - np.int8(1 << (bits - 1))
    return res


def block_length(bits: int, shape: tuple[int, ...], group_size: int) -> int:
    """Elements per scale on the ``--bits`` path: a group for 3/4 bits, a row (first
    axis) otherwise."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if bits in (3, 4):
        return max(1, min(group_size, n))
    return row_length(shape)


def row_length(shape: tuple[int, ...]) -> int:
    """Elements of one row (first axis); the whole tensor for 0-/1-D."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(shape) >= 2 and shape[0] > 0:
        return max(1, n // shape[0])
    return max(1, n)


# Clipping ratios tried per block (least squared error wins; earlier on ties): low
# widths lose less to rounding than to the range a few outliers would take.
CLIP_RATIOS: dict[int, tuple[float, ...]] = {
    2: (1.0, 0.8, 0.65, 0.5, 0.4),
    3: (1.0, 0.9, 0.8, 0.7, 0.6),
}


def reduce_blocks(
    x: npt.NDArray[Any], e0: int, block: int, ufunc: np.ufunc, acc: npt.NDArray[Any]
) -> None:
    """Fold ``x`` (elements ``e0 …``) into the per-block accumulator ``acc`` with
    ``ufunc`` (max or add): chunks need not align with blocks."""
    n = len(x)
    if not n:
        return
    b0, b1 = e0 // block, (e0 + n - 1) // block
    starts = np.arange(b0, b1 + 1, dtype=np.int64) * block - e0
    starts[0] = 0
    red = ufunc.reduceat(x, starts)
    acc[b0 : b1 + 1] = ufunc(acc[b0 : b1 + 1], red)


def element_scales(scales: F32Array, block: int, e0: int, n: int) -> npt.NDArray[np.float64]:
    """The float32 scale of each element ``e0 … e0+n`` as float64."""
    idx = (np.arange(e0, e0 + n, dtype=np.int64)) // block
    out: npt.NDArray[np.float64] = scales[idx].astype(np.float64)
    return out


def codes(d: npt.NDArray[np.float64], scales: F32Array, bits: int, block: int, e0: int) -> I8Array:
    """q for Δ elements ``e0 …`` given the chosen scales (1 bit: the sign)."""
    if bits == 1:
        return np.where(d >= 0, 1, -1).astype(np.int8)
    s = element_scales(scales, block, e0, len(d))
    qmax = QMAX[bits]
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint(d / safe), -qmax, qmax).astype(np.int8)
    q[s == 0] = 0
    return q
