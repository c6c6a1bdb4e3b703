"""TFLite: a minimal flatbuffer reader for buffer payloads.

Reads Model.buffers (field 4: Buffer.data field 0, or Buffer.offset/size fields 1/2
for payloads stored after the flatbuffer in models over 2 GB) and Model.subgraphs
(field 2) → SubGraph.tensors (field 0) → Tensor shape (0), type (1), buffer (2),
name (3) to give each buffer a stable key, dtype and shape: the name of the first
tensor that uses it (subgraph order, tensor order), else ``buffer:<index>``.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from agent.errors import FormatError

from . import quant
from .layout import Layout, typed_or_opaque, unique_key

TFLITE_DTYPES = {
    0: quant.F32,
    1: quant.F16,
    2: quant.I32,
    3: quant.U8,
    4: quant.I64,
    6: quant.BOOL,
    7: quant.I16,
    9: quant.I8,
    10: quant.F64,
    12: quant.U64,
    15: quant.U32,
    16: quant.U16,
}


class _FB:
    """Bounds-checked flatbuffer access over a memory map."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.size = buf, path, len(buf)

    def bad(self, what: str) -> FormatError:
        return FormatError(
            f"{self.path} is not a valid TFLite flatbuffer ({what})", code="residual-format"
        )

    def _u(self, fmt: str, pos: int) -> int:
        n = struct.calcsize(fmt)
        if pos < 0 or pos + n > self.size:
            raise self.bad("offset out of range")
        v: int = struct.unpack_from(fmt, self.buf, pos)[0]
        return v

    def table(self, pos: int) -> tuple[int, int, int]:
        vt = pos - self._u("<i", pos)
        vlen = self._u("<H", vt)
        if vlen < 4:
            raise self.bad("short vtable")
        return pos, vt, vlen

    def field(self, t: tuple[int, int, int], idx: int) -> int | None:
        pos, vt, vlen = t
        o = 4 + 2 * idx
        if o + 2 > vlen:
            return None
        off = self._u("<H", vt + o)
        return pos + off if off else None

    def deref(self, p: int) -> int:
        return p + self._u("<I", p)

    def vector(self, p: int | None) -> tuple[int, int]:
        if p is None:
            return 0, 0
        vp = self.deref(p)
        n = self._u("<I", vp)
        return vp + 4, n

    def scalar(self, t: tuple[int, int, int], idx: int, fmt: str, default: int) -> int:
        p = self.field(t, idx)
        return default if p is None else self._u(fmt, p)


def scan(path: Path) -> Layout:
    path = Path(path)
    size = os.path.getsize(path)
    layout = Layout("tflite", [path], [""], [size])
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        fb = _FB(buf, path)
        model = fb.table(fb.deref(0))
        # buffer index → (name, dtype, shape) of its first tensor
        owner: dict[int, tuple[str, int, tuple[int, ...]]] = {}
        sgs, nsg = fb.vector(fb.field(model, 2))
        for s in range(nsg):
            sg = fb.table(fb.deref(sgs + 4 * s))
            ts, nt = fb.vector(fb.field(sg, 0))
            if ts + 4 * nt > size:
                raise fb.bad("tensor vector")
            for i in range(nt):
                t = fb.table(fb.deref(ts + 4 * i))
                b = fb.scalar(t, 2, "<I", 0)
                if b == 0 or b in owner:
                    continue
                sp, ns = fb.vector(fb.field(t, 0))
                if sp + 4 * ns > size:
                    raise fb.bad("shape vector")
                shape = tuple(struct.unpack_from(f"<{ns}i", buf, sp)) if ns else ()
                ttype = fb.scalar(t, 1, "<b", 0)
                np_ = fb.field(t, 3)
                name = f"buffer:{b}"
                if np_ is not None:
                    sp2, sl = fb.vector(np_)
                    if sp2 + sl > size:
                        raise fb.bad("tensor name")
                    name = bytes(buf[sp2 : sp2 + sl]).decode("utf-8", "replace") or name
                owner[b] = (name, TFLITE_DTYPES.get(ttype, quant.OPAQUE), shape)
        seen: set[str] = set()
        bufs, nb = fb.vector(fb.field(model, 4))
        if bufs + 4 * nb > size:
            raise fb.bad("buffer vector")
        for b in range(nb):
            bt = fb.table(fb.deref(bufs + 4 * b))
            dp, dn = fb.vector(fb.field(bt, 0))
            off = fb.scalar(bt, 1, "<Q", 0)
            n = dn
            if dn == 0 and off > 1:
                dp, n = off, fb.scalar(bt, 2, "<Q", 0)
            if n == 0:
                continue
            if dp + n > size:
                raise fb.bad(f"buffer {b} past the end")
            name, dtype, shape = owner.get(b, (f"buffer:{b}", quant.OPAQUE, (n,)))
            layout.holes.append(
                typed_or_opaque(unique_key(name, seen), dtype, shape, file=0, offset=dp, nbytes=n)
            )
    return layout


__all__ = ["TFLITE_DTYPES", "scan"]
