"""Caps on untrusted packages, in a module of their own so that the daemon's config
(``[package_limits]``, validated at load) can build them without importing the package
reader and its crypto stack (about 9 MiB of the idle daemon's memory)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """Caps applied to untrusted packages (all sizes in bytes)."""

    max_package_bytes: int = 64 << 30  # the whole .emp file (64 GiB)
    max_total_bytes: int = 64 << 30  # sum of all member sizes (64 GiB)
    max_entries: int = 10_000  # tar members, files and directories
    max_manifest_bytes: int = 4 << 20  # manifest.json (4 MiB)
    max_signature_bytes: int = 64 << 10  # manifest.sig (64 KiB)
    max_meta_bytes: int = 16 << 20  # one Meta-info/*.json (16 MiB)
    max_models: int = 64  # models per package
    max_decoded_bytes: int = 64 << 30  # one model after decrypt + decompress (64 GiB)
