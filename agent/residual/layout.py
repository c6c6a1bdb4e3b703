"""Where a model's tensor payloads sit in its files (the "holes").

A model is one main file plus, for ONNX, external data files. Every tensor payload the
scanners recognise is a hole (file index, offset, length); every other byte is
skeleton. Scanners read a memory map and never build the model object, so a model of
any size costs only its metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.errors import FormatError, ResidualError

from . import quant


@dataclass(frozen=True)
class Hole:
    """One tensor payload: ``nbytes`` at ``offset`` of file ``file``."""

    key: str
    dtype: int
    shape: tuple[int, ...]
    file: int
    offset: int
    nbytes: int


@dataclass
class Layout:
    """Files (index 0 = the model file itself) and the tensor holes in them."""

    format: str
    paths: list[Path]
    names: list[str]  # "" for the model file, the relative location for external data
    sizes: list[int]
    holes: list[Hole] = field(default_factory=list)

    def by_key(self) -> dict[str, Hole]:
        return {h.key: h for h in self.holes}

    def file_holes(self, i: int) -> list[Hole]:
        return sorted((h for h in self.holes if h.file == i), key=lambda h: h.offset)

    def skeleton_size(self, i: int) -> int:
        return self.sizes[i] - sum(h.nbytes for h in self.holes if h.file == i)


def element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def typed_or_opaque(
    key: str, dtype: int, shape: tuple[int, ...], *, file: int, offset: int, nbytes: int
) -> Hole:
    """A hole whose declared dtype/shape disagree with its length becomes opaque bytes."""
    if dtype != quant.OPAQUE and (
        any(d < 0 for d in shape) or element_count(shape) * quant.ITEMSIZE[dtype] != nbytes
    ):
        dtype, shape = quant.OPAQUE, (nbytes,)
    if dtype == quant.OPAQUE:
        shape = (nbytes,)
    return Hole(key, dtype, shape, file, offset, nbytes)


def unique_key(name: str, seen: set[str]) -> str:
    key, n = name, 1
    while key in seen:
        n += 1
        key = f"{name}#{n}"
    seen.add(key)
    return key


def safe_location(location: str) -> str:
    """External data locations are plain file names next to the model (no directories:
    a patch must never write outside the output's directory)."""
    p = PurePosixPath(location)
    if (
        not location
        or "\\" in location
        or "\x00" in location
        or p.is_absolute()
        or len(p.parts) != 1
        or p.name in (".", "..")
    ):
        raise ResidualError(
            f"external data location {location!r} is not a plain file name",
            code="residual-unsupported",
        )
    return location


def check_holes(layout: Layout) -> None:
    """Holes lie inside their file and do not overlap."""
    for i in range(len(layout.paths)):
        end = 0
        for h in layout.file_holes(i):
            if h.offset < end or h.offset + h.nbytes > layout.sizes[i]:
                raise FormatError(
                    f"{layout.paths[i]}: tensor {h.key!r} lies outside the file or overlaps "
                    "another tensor",
                    code="residual-format",
                )
            end = h.offset + h.nbytes


def raw_layout(path: Path, size: int) -> Layout:
    """Any other file: one opaque payload (exact integer delta or full bytes)."""
    layout = Layout("raw", [path], [""], [size])
    if size:
        layout.holes.append(Hole("data", quant.OPAQUE, (size,), 0, 0, size))
    return layout


def scan(path: Path) -> Layout:
    """Layout of a model: TFLite by its ``TFL3`` identifier, ONNX by its ``.onnx`` suffix
    (or, for other names, if it parses as ONNX with weights), anything else raw."""
    from . import onnx_io, tflite_io

    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ResidualError(f"cannot read model {path}: {exc}", code="residual-io") from None
    if size >= 8 and head[4:8] == b"TFL3":
        layout = tflite_io.scan(path)
    elif path.suffix.lower() in (".tflite", ".lite"):
        raise FormatError(f"{path} is not a TFLite flatbuffer", code="residual-format")
    elif path.suffix.lower() == ".onnx":
        layout = onnx_io.scan(path)
    else:
        try:
            layout = onnx_io.scan(path)
        except (FormatError, ResidualError):
            layout = raw_layout(path, size)
        else:
            if not layout.holes:
                layout = raw_layout(path, size)
    check_holes(layout)
    return layout
