"""Encapsulated model packages (``.emp``, GB/T 42382.2 §8.2 / §8.3): pack, verify,
unpack, inspect.

Layout (``docs/PACKAGE.md``): a POSIX ustar archive whose first two members are
``manifest.json`` and ``manifest.sig``, followed by ``Meta-info/``, ``Program/`` and
``Model/`` members; ``Model/models.empc`` is the §8.2.2 model container
(``agent.container``). Everything streams: packing reads each model once through
[residual →] zstd → STREAM AEAD into the container, unpacking hashes, decrypts,
decompresses and writes in one pass with memory bounded by a few chunks, whatever the
model size.

The reader trusts nothing before the signature: it reads the manifest and its
signature first (both size-capped), verifies the signature, then checks every tar
member against the signed manifest while streaming it — type, path, size, digest,
no extras, nothing missing, no duplicates — and never calls ``extractall``. ``unpack``
writes into a fresh temporary directory next to the output and renames it into place
only after everything verified; on any error the temporary directory is removed, so
nothing half-written remains and nothing is ever written outside the output
directory.

Rooms: :mod:`.reader` (the trust-first reader on bytes and streams, no disk access),
:mod:`.paths` (opening untrusted files, verify / inspect / read_manifest of a file),
:mod:`.installer` (unpack), :mod:`.packer` (pack) and :mod:`.envelopes` (data keys and
key envelopes).
"""

from __future__ import annotations

from agent.limits import Limits
from agent.package.envelopes import data_key, make_envelope
from agent.package.installer import external_data_files, unpack
from agent.package.packer import DEFAULT_ZSTD_LEVEL, PackSpec, pack
from agent.package.paths import inspect, open_regular, read_capped, read_manifest, verify
from agent.package.reader import CONTAINER_PATH, trusted_manifest, verify_stream

__all__ = [
    "CONTAINER_PATH",
    "DEFAULT_ZSTD_LEVEL",
    "Limits",
    "PackSpec",
    "data_key",
    "external_data_files",
    "inspect",
    "make_envelope",
    "open_regular",
    "pack",
    "read_capped",
    "read_manifest",
    "trusted_manifest",
    "unpack",
    "verify",
    "verify_stream",
]
