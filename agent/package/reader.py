"""The trust-first package reader: bytes and streams in, verified facts out.

Nothing here touches the disk (as python-tuf's ``TrustedMetadataSet``: "the remaining
steps are related to filesystem and network IO, which are not handled here"), so the
trust decisions can be tested on bytes alone: :func:`trusted_manifest` takes the
manifest and signature bytes, :func:`open_stream` and :func:`verify_stream` any
readable stream (a file, ``io.BytesIO``). Opening an untrusted file safely is
:mod:`agent.package.paths`; writing what was verified is :mod:`agent.package.installer`.

Order of trust: the manifest and its signature are the first two members and both are
size-capped; the signature is verified before the manifest is parsed; every later member
is checked against the signed manifest while it streams — type, path, size, digest, no
extras, nothing missing, no duplicates.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from agent import meta
from agent.container import ContainerLimits, ContainerReader
from agent.durable import HashThread
from agent.errors import (
    IntegrityError,
    LimitError,
    ManifestError,
    MetaInfoError,
    SignatureError,
    UnsafeEntryError,
)
from agent.keys import TrustStore
from agent.limits import Limits
from agent.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    ModelInfo,
    check_path,
    parse_manifest,
)
from agent.tario import MemberReader, TarReader

logger = logging.getLogger(__name__)

CONTAINER_PATH = "Model/models.empc"
COPY = 4 << 20  # bytes per read when streaming
Progress = Callable[[int], None]
FileHandler = Callable[[FileEntry, MemberReader], None]


@dataclass
class Opened:
    """A package stream past its verified manifest and signature."""

    tar: TarReader
    manifest: Manifest
    signature: bytes
    signer: str | None


def trusted_manifest(
    raw: bytes, signature: bytes, trust: TrustStore | None, limits: Limits
) -> tuple[Manifest, str | None]:
    """The manifest in ``raw`` once ``signature`` verifies against ``trust`` (the signer's
    key id), parsed within ``limits``. ``trust=None`` parses without verifying (inspect)."""
    signer = trust.verify(raw, signature) if trust is not None else None
    manifest = parse_manifest(
        raw,
        max_files=limits.max_entries,
        max_models=limits.max_models,
        max_bytes=limits.max_manifest_bytes,
    )
    return manifest, signer


def open_stream(
    f: BinaryIO,
    limits: Limits,
    trust: TrustStore | None,
    *,
    size: int | None = None,
    name: str = "package",
) -> Opened:
    """Read and verify the manifest and signature at the start of a package stream; the
    returned tar reader stands at the first member after them. ``size``: the stream's
    length when known (checked against ``limits.max_package_bytes`` first)."""
    if size is not None and size > limits.max_package_bytes:
        raise LimitError(
            f"{name} is {size} bytes, above the limit of {limits.max_package_bytes}",
            code="limit-package-size",
        )
    tar = TarReader(f, max_entries=limits.max_entries, max_total=limits.max_total_bytes)
    first = tar.next(end_ok=False)
    if first is None or first.path != MANIFEST_NAME or first.kind != "file":
        raise ManifestError(
            "the first package entry must be manifest.json", code="manifest-not-first"
        )
    raw = tar.read_all(limits.max_manifest_bytes, MANIFEST_NAME)
    second = tar.next(end_ok=False)
    if second is None or second.path != SIGNATURE_NAME or second.kind != "file":
        raise SignatureError(
            "the second package entry must be manifest.sig", code="signature-missing"
        )
    sig = tar.read_all(limits.max_signature_bytes, SIGNATURE_NAME)
    manifest, signer = trusted_manifest(raw, sig, trust, limits)
    return Opened(tar, manifest, sig, signer)


def _check_member_path(path: str, kind: str) -> None:
    if path.startswith("/"):
        raise UnsafeEntryError(f"tar entry {path!r} has an absolute path", code="path-absolute")
    if ".." in path.split("/"):
        raise UnsafeEntryError(f"tar entry {path!r} contains '..'", code="path-traversal")
    if kind == "dir" and path in ("Model", "Program", "Meta-info"):
        return
    try:
        check_path(path)
    except ManifestError:
        raise UnsafeEntryError(
            f"tar entry {path!r} is not a plain path under Model/, Program/ or Meta-info/",
            code="path-outside",
        ) from None


_THREAD_MIN = 16 << 20  # members at least this large are hashed on a second thread


class _Sha256Inline:
    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def walk(opened: Opened, on_file: FileHandler, progress: Progress | None = None) -> None:
    """Check every member after the signature against the manifest; hash while reading."""
    tar, manifest = opened.tar, opened.manifest
    expected = {f.path: f for f in manifest.files}
    seen: set[str] = set()
    dirs: set[str] = set()
    while (entry := tar.next()) is not None:
        _check_member_path(entry.path, entry.kind)
        if entry.kind == "dir":
            if entry.path in dirs or entry.path in expected:
                raise UnsafeEntryError(
                    f"directory entry {entry.path!r} repeats or shadows a file",
                    code="entry-duplicate",
                )
            dirs.add(entry.path)
            continue
        fe = expected.get(entry.path)
        if entry.path in seen:
            raise UnsafeEntryError(
                f"tar entry {entry.path!r} appears twice", code="entry-duplicate"
            )
        if fe is None:
            raise ManifestError(
                f"tar entry {entry.path!r} is not listed in the manifest", code="entry-unlisted"
            )
        if entry.size != fe.size:
            raise IntegrityError(
                f"{entry.path}: {entry.size} bytes in the archive, the manifest says {fe.size}",
                code="entry-size",
            )
        seen.add(entry.path)
        h = HashThread(name="unpack-hash") if fe.size >= _THREAD_MIN else _Sha256Inline()

        def update(data: bytes, _h: _Sha256Inline | HashThread = h) -> None:
            _h.update(data)
            if progress is not None:
                progress(len(data))

        reader = MemberReader(tar, update)
        try:
            on_file(fe, reader)
            while reader.read(COPY):
                pass
        finally:
            digest = h.hexdigest()
        if digest != fe.sha256:
            raise IntegrityError(
                f"{entry.path}: SHA-256 does not match the manifest", code="entry-digest"
            )
    missing = sorted(set(expected) - seen)
    if missing:
        raise ManifestError(
            f"manifest lists {len(missing)} entr{'y' if len(missing) == 1 else 'ies'}"
            f" missing from the archive: {', '.join(missing[:5])}",
            code="entry-missing",
        )


def container_limits(limits: Limits) -> ContainerLimits:
    return ContainerLimits(max_models=limits.max_models, max_decoded_bytes=limits.max_decoded_bytes)


def models_of(manifest: Manifest, container: str) -> dict[int, ModelInfo]:
    return {m.id: m for m in manifest.models if m.container == container}


def check_header(mi: ModelInfo | None, header: Any, container: str) -> ModelInfo:
    if mi is None:
        raise ManifestError(
            f"{container}: model id {header.model_id} is not in the manifest", code="model-unlisted"
        )
    if header.format_name != mi.format or header.encoding() != list(mi.encoding):
        raise ManifestError(
            f"{container}: model {mi.name!r} header says {header.format_name} "
            f"{header.encoding()}, the manifest {mi.format} {list(mi.encoding)}",
            code="model-mismatch",
        )
    return mi


def meta_check(fe: FileEntry, reader: MemberReader, limits: Limits) -> bytes | None:
    rel = fe.path.removeprefix("Meta-info/")
    if rel not in (meta.MANAGEMENT, meta.TECHNICAL):
        return None
    if fe.size > limits.max_meta_bytes:
        raise MetaInfoError(
            f"Meta-info/{rel} is larger than {limits.max_meta_bytes} bytes", code="meta-too-large"
        )
    data = reader.read(fe.size)
    while len(data) < fe.size:
        data += reader.read(fe.size - len(data))
    meta.parse(rel, data)
    return data


def verify_stream(
    f: BinaryIO,
    trust: TrustStore,
    limits: Limits | None = None,
    *,
    size: int | None = None,
    name: str = "package",
    progress: Progress | None = None,
) -> Opened:
    """Verify a whole package stream: signature, then every member's size and SHA-256,
    the container headers against the manifest, and the Meta-info schemas. ``progress``
    is called with the byte count of every piece read (it may raise to abandon).

    Raises:
        PackageError subclasses with specific codes (see docs/PACKAGE.md).
    """
    limits = limits or Limits()
    opened = open_stream(f, limits, trust, size=size, name=name)
    manifest = opened.manifest

    def on_file(fe: FileEntry, reader: MemberReader) -> None:
        if fe.path.startswith("Meta-info/"):
            meta_check(fe, reader, limits)
            return
        models = models_of(manifest, fe.path)
        if not models:
            return
        cr = ContainerReader(cast(BinaryIO, reader), container_limits(limits), total_size=fe.size)
        found = {check_header(models.get(e.header.model_id), e.header, fe.path).id for e in cr}
        check_all_models(models, found, fe.path)

    walk(opened, on_file, progress)
    return opened


def check_all_models(models: dict[int, ModelInfo], found: set[int], container: str) -> None:
    missing = sorted(set(models) - found)
    if missing:
        raise ManifestError(
            f"{container}: model id(s) {missing} listed in the manifest are "
            "missing from the container",
            code="model-missing",
        )
