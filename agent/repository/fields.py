"""The Edgeward fields of a TUF target: the one contract between publisher and device.

Every package in the repository is a TUF target whose ``custom`` object carries::

    "edgeward": {
      "model": "ocr-det",            # package name (manifest "name")
      "version": "4",                # package version (manifest "version", decimal string)
      "channels": ["stable"],        # channels that offer it (e.g. stable, canary)
      "kind": "full" | "residual",
      "base_version": "3",           # residual only: the version it applies to
      "base_digests": {              # residual only: weights digest each base model must
        "det.onnx": "sha256:<hex>"   #   have (manifest models[].base_digest), by file name
      }
    }

The target *path* is ``<model>/<version>/<model>-<version>.emp`` for a full package and
``<model>/<version>/<model>-<version>-from-<base_version>.emp`` for a residual one; with
TUF consistent snapshots the file is served as ``targets/<model>/<version>/<sha256>.<file>``
(content-addressed: a CDN never serves a stale package under a fresh name).

Parsing is bounded and total: anything malformed raises :class:`RepositoryError` with code
``repo-target-fields`` and the caller skips that one target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agent.errors import RepositoryError

__all__ = ["FIELDS_KEY", "KINDS", "TargetFields", "target_path"]

#: Key of the Edgeward object inside a target's ``custom``.
FIELDS_KEY = "edgeward"
KINDS = ("full", "residual")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^[0-9]{1,19}$")
_CHANNEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_MAX_CHANNELS = 16
_MAX_MODELS = 64


def _fail(msg: str) -> RepositoryError:
    return RepositoryError(msg, code="repo-target-fields")


@dataclass(frozen=True)
class TargetFields:
    """What a device needs to know about a package before downloading it."""

    model: str
    version: str
    channels: tuple[str, ...] = ("stable",)
    kind: str = "full"
    base_version: str | None = None
    base_digests: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.model):
            raise _fail(f"model name {self.model!r} is not a valid package name")
        if not _VERSION_RE.match(self.version):
            raise _fail(f"version {self.version!r} is not a decimal integer")
        if not self.channels or len(self.channels) > _MAX_CHANNELS:
            raise _fail(f"channels: 1 to {_MAX_CHANNELS} names expected")
        for ch in self.channels:
            if not isinstance(ch, str) or not _CHANNEL_RE.match(ch):
                raise _fail(f"channel {ch!r} is not a valid channel name")
        if self.kind not in KINDS:
            raise _fail(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "residual":
            if self.base_version is None or not _VERSION_RE.match(self.base_version):
                raise _fail("a residual target needs a decimal base_version")
            if int(self.base_version) >= int(self.version):
                raise _fail("base_version must be older than version")
            if not self.base_digests or len(self.base_digests) > _MAX_MODELS:
                raise _fail(f"a residual target needs 1 to {_MAX_MODELS} base_digests")
            for k, v in self.base_digests.items():
                if not isinstance(k, str) or not _NAME_RE.match(k):
                    raise _fail(f"base_digests: {k!r} is not a valid model file name")
                if not isinstance(v, str) or not _DIGEST_RE.match(v):
                    raise _fail(f"base_digests[{k}]: not a sha256:<hex> digest")
        elif self.base_version is not None or self.base_digests:
            raise _fail("a full target has no base_version or base_digests")

    @property
    def version_int(self) -> int:
        return int(self.version)

    def to_custom(self) -> dict[str, Any]:
        """The ``custom`` object to store in the TUF target."""
        d: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "channels": list(self.channels),
            "kind": self.kind,
        }
        if self.kind == "residual":
            d["base_version"] = self.base_version
            d["base_digests"] = dict(sorted(self.base_digests.items()))
        return {FIELDS_KEY: d}

    @classmethod
    def from_custom(cls, custom: Any) -> TargetFields:
        """Parse a target's ``custom`` object (untrusted shape, trusted signature)."""
        if not isinstance(custom, dict) or not isinstance(custom.get(FIELDS_KEY), dict):
            raise _fail(f"target has no {FIELDS_KEY!r} object in custom")
        d = custom[FIELDS_KEY]
        allowed = {"model", "version", "channels", "kind", "base_version", "base_digests"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise _fail(f"unknown field(s) {', '.join(map(repr, extra[:4]))}")
        for key in ("model", "version", "kind"):
            if not isinstance(d.get(key), str):
                raise _fail(f"{key!r} must be a string")
        channels = d.get("channels", ["stable"])
        if not isinstance(channels, list):
            raise _fail("'channels' must be a list of strings")
        base_version = d.get("base_version")
        if base_version is not None and not isinstance(base_version, str):
            raise _fail("'base_version' must be a string")
        digests = d.get("base_digests", {})
        if not isinstance(digests, dict):
            raise _fail("'base_digests' must be an object")
        return cls(
            model=d["model"],
            version=d["version"],
            channels=tuple(channels),
            kind=d["kind"],
            base_version=base_version,
            base_digests=dict(digests),
        )


def target_path(fields: TargetFields) -> str:
    """The TUF target path of a package (see the module docstring)."""
    stem = f"{fields.model}-{fields.version}"
    if fields.kind == "residual":
        stem += f"-from-{fields.base_version}"
    return f"{fields.model}/{fields.version}/{stem}.emp"
