"""A small, strict POSIX ustar reader and writer for packages.

Python's ``tarfile`` follows links, understands GNU and pax extensions and has had
extraction-filter bypasses; a package never needs any of that. The reader here parses
512-byte ustar headers itself and accepts only what the package format allows: regular
files and directories with plain ustar names. Links, devices, FIFOs and every extension
header are refused at the header, before a byte of their data is read, and a member's
data can never be read past its declared size. The writer produces exactly the subset
the reader accepts (deterministic headers: uid/gid 0, fixed mtime).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from agent.errors import FormatError, LimitError, UnsafeEntryError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_COPY = 4 << 20  # bytes per read/write when streaming member data
#: zero bytes accepted after the end-of-archive marker (tar pads to 10 KiB records;
#: anything longer is refused without reading it all: a sparse file of zeros is cheap
#: to make and slow to read)
MAX_TRAILING = 1 << 20

_REFUSED_TYPES = {
    b"1": ("a hard link", "tar-hardlink"),
    b"2": ("a symbolic link", "tar-symlink"),
    b"3": ("a character device", "tar-device"),
    b"4": ("a block device", "tar-device"),
    b"6": ("a FIFO", "tar-fifo"),
}


@dataclass(frozen=True)
class TarEntry:
    """One member header. ``kind`` is ``"file"`` or ``"dir"``; ``size`` in bytes."""

    path: str
    kind: str
    size: int
    mode: int
    index: int


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        raise FormatError(f"tar header: base-256 {what} is not ustar", code="tar-format")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if any(c not in b"01234567" for c in text):
        raise FormatError(f"tar header: {what} field is not octal", code="tar-format")
    return int(text, 8)


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def parse_header(block: bytes, index: int) -> TarEntry:
    """Parse one 512-byte ustar header (not an end-of-archive block)."""
    stored = _octal(block[148:156], "checksum")
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != computed:
        raise FormatError(f"tar entry {index}: header checksum mismatch", code="tar-checksum")
    if block[257:263] != b"ustar\0" or block[263:265] != b"00":
        raise FormatError(f"tar entry {index}: not a POSIX ustar header", code="tar-format")
    try:
        name = _cstr(block[0:100]).decode("utf-8")
        prefix = _cstr(block[345:500]).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"tar entry {index}: name is not UTF-8", code="tar-name") from None
    path = f"{prefix}/{name}" if prefix else name
    flag = block[156:157]
    if flag in _REFUSED_TYPES:
        what, code = _REFUSED_TYPES[flag]
        raise UnsafeEntryError(
            f"tar entry {path!r} is {what}; packages hold only regular files and directories",
            code=code,
        )
    if flag in (b"0", b"\0"):
        kind = "file"
    elif flag == b"5":
        kind = "dir"
        path = path.rstrip("/")
    else:
        raise UnsafeEntryError(
            f"tar entry {path!r} has unsupported type {flag!r} (extension headers are not allowed)",
            code="tar-type",
        )
    size = _octal(block[124:136], "size")
    if kind == "dir" and size:
        raise FormatError(f"tar directory {path!r} has a size", code="tar-format")
    mode = _octal(block[100:108], "mode")
    return TarEntry(path, kind, size, mode, index)


class TarReader:
    """Sequential reader: ``next()`` returns the next header, ``read()`` its data.

    Unread data of the current member is skipped by the next ``next()``. After the
    end-of-archive marker only zero bytes may follow (``tar-trailing``).
    """

    def __init__(self, src: BinaryIO, *, max_entries: int, max_total: int) -> None:
        self._src = src
        self._max_entries = max_entries
        self._max_total = max_total
        self._total = 0
        self._count = 0
        self._remaining = 0
        self._pad = 0
        self.current: TarEntry | None = None
        self.done = False
        self.position = 0  # bytes of src consumed

    def _read_exact(self, n: int, what: str) -> bytes:
        buf = self._src.read(n)
        while len(buf) < n:
            more = self._src.read(n - len(buf))
            if not more:
                raise FormatError(f"package truncated in {what}", code="tar-truncated")
            buf += more
        self.position += n
        return buf

    def _skip(self, n: int, what: str) -> None:
        while n:
            step = min(n, _COPY)
            self._read_exact(step, what)
            n -= step

    def next(self, *, end_ok: bool = True) -> TarEntry | None:
        """The next member header, or None at the end of the archive.

        ``end_ok=False``: an end-of-archive marker here is an error already (the
        manifest must come first), so the bytes after it are not read at all.
        """
        if self.done:
            return None
        if self.current is not None:
            self._skip(self._remaining, f"the data of {self.current.path!r}")
            if self._pad:
                pad = self._read_exact(self._pad, f"the padding of {self.current.path!r}")
                if pad.count(0) != len(pad):
                    raise FormatError(
                        f"non-zero padding after {self.current.path!r}", code="tar-padding"
                    )
            self._remaining = self._pad = 0
            self.current = None
        block = self._read_exact(BLOCK, "a tar header")
        if block == _ZERO_BLOCK:
            self.done = True
            if not end_ok:
                return None
            self._read_exact(BLOCK, "the end-of-archive marker")
            left = MAX_TRAILING
            while rest := self._src.read(min(_COPY, left + 1)):
                left -= len(rest)
                if rest.count(0) != len(rest) or left < 0:
                    raise FormatError("data after the end of the tar archive", code="tar-trailing")
            return None
        entry = parse_header(block, self._count)
        self._count += 1
        if self._count > self._max_entries:
            raise LimitError(
                f"package has more than {self._max_entries} entries", code="limit-entries"
            )
        self._total += entry.size
        if self._total > self._max_total:
            raise LimitError(
                f"package members exceed {self._max_total} bytes in total", code="limit-total-size"
            )
        self.current = entry
        self._remaining = entry.size
        self._pad = -entry.size % BLOCK
        return entry

    @property
    def remaining(self) -> int:
        """Unread data bytes of the current member."""
        return self._remaining

    def read(self, n: int = _COPY) -> bytes:
        """Up to ``n`` bytes of the current member; b"" at its declared end."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._src.read(n)
        if not data:
            assert self.current is not None
            raise FormatError(
                f"package truncated in the data of {self.current.path!r}", code="tar-truncated"
            )
        self._remaining -= len(data)
        self.position += len(data)
        return data

    def read_all(self, cap: int, what: str) -> bytes:
        """The whole current member, refusing one larger than ``cap`` bytes."""
        if self._remaining > cap:
            raise LimitError(
                f"{what} is {self._remaining} bytes, above the limit of {cap}",
                code="limit-member-size",
            )
        parts = []
        while piece := self.read(self._remaining):
            parts.append(piece)
        return b"".join(parts)


class MemberReader:
    """File-like view of the current member of a :class:`TarReader` (``read`` only),
    calling ``on_data`` with every piece (hashing in the same pass)."""

    def __init__(self, tar: TarReader, on_data: Callable[[bytes], None] | None = None) -> None:
        self._tar = tar
        self._on_data = on_data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self._tar.remaining
        data = self._tar.read(n)
        if data and self._on_data is not None:
            self._on_data(data)
        return data


class TarWriter:
    """Write ustar members; ``close`` writes the end-of-archive marker."""

    def __init__(self, dst: BinaryIO, mtime: int = 0) -> None:
        self._dst = dst
        self._mtime = mtime

    def _header(self, path: str, size: int, mode: int, kind: bytes) -> bytes:
        info = tarfile.TarInfo(path)
        info.size = size
        info.mode = mode
        info.mtime = self._mtime
        info.type = kind
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        try:
            return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
        except ValueError as exc:
            raise FormatError(
                f"cannot store {path!r} in a ustar header: {exc}", code="tar-name"
            ) from None

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._dst.write(self._header(path, len(data), mode, tarfile.REGTYPE))
        self._dst.write(data)
        self._dst.write(bytes(-len(data) % BLOCK))

    def add_file(
        self,
        path: str,
        src: str | os.PathLike[str],
        size: int,
        mode: int = 0o644,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a file in; it must still have ``size`` bytes."""
        self._dst.write(self._header(path, size, mode, tarfile.REGTYPE))
        left = size
        with open(src, "rb") as f:
            while left:
                piece = f.read(min(left, _COPY))
                if not piece:
                    raise FormatError(f"{src} shrank while packing", code="source-changed")
                self._dst.write(piece)
                left -= len(piece)
                if progress is not None:
                    progress(len(piece))
            if f.read(1):
                raise FormatError(f"{src} grew while packing", code="source-changed")
        self._dst.write(bytes(-size % BLOCK))

    def add_dir(self, path: str) -> None:
        self._dst.write(self._header(path, 0, 0o755, tarfile.DIRTYPE))

    def close(self) -> None:
        self._dst.write(bytes(2 * BLOCK))


__all__ = [
    "BLOCK",
    "MAX_TRAILING",
    "MemberReader",
    "TarEntry",
    "TarReader",
    "TarWriter",
    "parse_header",
]
