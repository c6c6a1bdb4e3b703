"""Minimal PNG decoder (numpy + zlib) for devices without Pillow.

Supports 8-bit greyscale, RGB, grey+alpha and RGBA, non-interlaced, all five filters.
Filters Sub/Up are vectorised; Average/Paeth loop over pixels (slow for big images, but
correct — install Pillow for speed).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
_MAX_PIXELS = 64 * 1024 * 1024


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → HxWx3 uint8 RGB. Raises ValueError for anything unsupported."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG signature")
    pos = 8
    header = None
    idat = []
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ValueError("truncated chunk")
        pos += 12 + length
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if header is None:
        raise ValueError("no IHDR chunk")
    w, h, depth, color, _, _, interlace = header
    if depth != 8 or color not in _CHANNELS or interlace:
        raise ValueError(
            f"unsupported PNG (bit depth {depth}, colour type {color}, interlace {interlace})"
        )
    if w * h > _MAX_PIXELS or w == 0 or h == 0:
        raise ValueError(f"image size {w}x{h} out of range")
    bpp = _CHANNELS[color]
    stride = w * bpp
    d = zlib.decompressobj()
    raw = d.decompress(b"".join(idat), h * (stride + 1) + 1)
    if len(raw) < h * (stride + 1):
        raise ValueError("image data too short")
    rows = np.frombuffer(raw[: h * (stride + 1)], np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        f, line = rows[y, 0], rows[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:
            cur = line.reshape(w, bpp).astype(np.uint32).cumsum(axis=0).astype(np.uint8).ravel()
        elif f == 2:
            cur = line + prev
        elif f in (3, 4):
            cur = _slow(line, prev, bpp, int(f))
        else:
            raise ValueError(f"bad filter type {f}")
        out[y] = cur
        prev = cur
    img = out.reshape(h, w, bpp)
    if bpp == 1:
        return np.repeat(img, 3, axis=2)
    if bpp == 2:
        return np.repeat(img[..., :1], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _slow(line: np.ndarray, prev: np.ndarray, bpp: int, f: int) -> np.ndarray:
    cur = np.zeros(len(line), np.int32)
    lin = line.astype(np.int32)
    up = prev.astype(np.int32)
    for i in range(len(line)):
        a = int(cur[i - bpp]) if i >= bpp else 0
        b = int(up[i])
        if f == 3:
            cur[i] = (lin[i] + (a + b) // 2) & 0xFF
        else:
            c = int(up[i - bpp]) if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (lin[i] + pred) & 0xFF
    return cur.astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """HxWx3 uint8 → PNG bytes (filter 0). For tests and demos."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(t: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + t
            + body
            + struct.pack(">I", zlib.crc32(t + body) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
