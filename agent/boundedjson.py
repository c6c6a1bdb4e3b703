"""JSON from an untrusted source, bounded in size and nesting before it is parsed.

Python's C decoder recurses once per ``[``/``{``: 64 KiB of ``[`` ends in
``RecursionError`` (not an ``EdgewardError``), and whatever walks the result later
(schema validation, ``to_dict``) recurses too. Every JSON document the package reader
meets before or around the signature (``manifest.json``, ``manifest.sig``, key
envelopes, ``Meta-info``) is read through :func:`loads`, which checks size and depth
first and turns every way parsing can fail into the caller's ``EdgewardError``.

The depth scan is cheap: documents with fewer brackets than the bound are not scanned,
and a deep document is refused as soon as the bound is crossed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.errors import EdgewardError

__all__ = ["MAX_DEPTH", "depth_exceeds", "loads"]

#: Deeper than any document Edgeward reads legitimately (manifests nest ~5 levels).
MAX_DEPTH = 64

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def depth_exceeds(raw: bytes, max_depth: int) -> bool:
    """Whether ``[``/``{`` nest deeper than ``max_depth`` outside JSON strings."""
    brackets = raw.translate(None, _NOT_BRACKETS)
    if len(brackets) <= max_depth:
        return False
    if b'"' in raw:
        brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = 0
    for c in brackets:
        if c in _OPEN:
            depth += 1
            if depth > max_depth:
                return True
        elif c in _CLOSE:
            depth -= 1
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(
    data: bytes,
    *,
    what: str,
    error: type[EdgewardError],
    code: str,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse ``data`` (UTF-8 JSON) or raise ``error(code=code)`` naming ``what``.

    Refused: more than ``max_bytes`` bytes, nesting deeper than ``max_depth``, invalid
    UTF-8 or JSON, ``NaN``/``Infinity`` and integers beyond Python's digit limit. Only
    ``error`` escapes.
    """
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes, above the limit of {max_bytes}", code=code)
    if depth_exceeds(data, max_depth):
        raise error(f"{what} nests deeper than {max_depth} levels", code=code)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, MemoryError) as exc:
        raise error(f"{what} is not valid UTF-8 JSON ({type(exc).__name__})", code=code) from None
