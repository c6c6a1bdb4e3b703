"""Installing a package on disk: verify, decrypt, decompress (and patch) into a fresh
temporary directory beside the output, renamed into place only once everything verified.

On any error the temporary directory is removed, so nothing half-written remains and
nothing is ever written outside the output directory; files are created only inside it
(``O_EXCL | O_NOFOLLOW``) and made durable as :mod:`agent.durable` describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, cast

from agent import crypto
from agent.container import ContainerReader
from agent.durable import WriteHashPipeline, atomic_replace, fsync_dir, fsync_file, write_all
from agent.errors import (
    BaseMismatchError,
    IntegrityError,
    ManifestError,
    PackageError,
    UnsafeEntryError,
)
from agent.keys import Keyring, TrustStore
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
from agent.package.envelopes import data_key
from agent.package.paths import open_package, read_capped
from agent.package.reader import (
    COPY,
    Opened,
    Progress,
    check_all_models,
    check_header,
    container_limits,
    meta_check,
    models_of,
    open_stream,
    walk,
)
from agent.tario import MemberReader

logger = logging.getLogger(__name__)

_WRITE_DEPTH = 4  # decoded pieces (each <= COPY bytes) queued for the writer thread


class _Out:
    """Creates files only inside a private temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs: set[Path] = {root}

    def _parent(self, rel: str) -> Path:
        parts = rel.split("/")
        d = self.root
        for p in parts[:-1]:
            d = d / p
            if d not in self.dirs:
                try:
                    os.mkdir(d, 0o755)
                except FileExistsError:
                    raise UnsafeEntryError(
                        f"{rel} needs {d.relative_to(self.root)} to be a directory, but it "
                        "is a file",
                        code="entry-duplicate",
                    ) from None
                self.dirs.add(d)
        return d / parts[-1]

    def create(self, rel: str, mode: int = 0o644) -> int:
        path = self._parent(rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags, mode)
        except FileExistsError:
            raise UnsafeEntryError(
                f"{rel} would be written twice", code="entry-duplicate"
            ) from None

    def sync_dirs(self) -> None:
        for d in sorted(self.dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)


def unpack(
    pkg: Path,
    out_dir: Path,
    *,
    trust: TrustStore,
    keyring: Keyring | None = None,
    base_dir: Path | None = None,
    limits: Limits | None = None,
    envelopes: Sequence[Path] = (),
    progress: Progress | None = None,
    verify_decoded: bool = False,
    nofollow: bool = False,
    stream: BinaryIO | None = None,
    size: int | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Verify, decrypt, decompress (and patch) a package into ``out_dir``.

    ``stream``: read the package from it (``size`` bytes when known) instead of opening
    ``pkg`` (its name is used in messages): the daemon unpacks a download while it
    arrives (agent/repository/client.py ``Tail``).

    ``on_manifest``: called with the verified manifest before anything is decoded (the
    daemon checks the declared sizes against the free disk there); what it raises ends
    the unpack.

    ``out_dir`` must not exist or be an empty directory. Layout: ``docs/INTERFACES.md``
    (``manifest.json``, ``Meta-info/``, ``Program/``, ``Model/<name>`` decoded).

    The decoded models are pinned without hashing them again: the container's bytes
    are checked against the signed manifest, every chunk against its AEAD tag and every
    zstd frame against its content checksum. ``verify_decoded`` also checks each
    decoded model against ``models[].sha256`` (SHA-256 over the output: about a quarter
    of the CPU an unpack costs), for audits and for packages from other tools.

    Raises:
        PackageError subclasses (codes in docs/PACKAGE.md); on any error nothing is left
        behind.
    """
    limits = limits or Limits()
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (
        out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    ):
        raise PackageError(
            f"output {out_dir} exists and is not an empty directory", code="output-exists"
        )
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    try:
        manifest = _unpack_into(
            pkg,
            tmp=tmp,
            trust=trust,
            keyring=keyring,
            base_dir=base_dir,
            limits=limits,
            envelopes=envelopes,
            progress=progress,
            verify_decoded=verify_decoded,
            nofollow=nofollow,
            stream=stream,
            size=size,
            on_manifest=on_manifest,
        )
        if out_dir.exists():
            out_dir.rmdir()
        atomic_replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("unpacked %s version %d into %s", manifest.name, manifest.version, out_dir)
    return manifest


def _unpack_into(
    pkg: Path,
    *,
    tmp: Path,
    trust: TrustStore,
    keyring: Keyring | None,
    base_dir: Path | None,
    limits: Limits,
    envelopes: Sequence[Path],
    progress: Progress | None,
    verify_decoded: bool,
    nofollow: bool = False,
    stream: BinaryIO | None = None,
    size: int | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> Manifest:
    out = _Out(tmp)
    patches: list[tuple[ModelInfo, Path]] = []
    with _opened(pkg, limits, trust, nofollow=nofollow, stream=stream, size=size) as opened:
        manifest = opened.manifest
        signature = opened.signature
        if on_manifest is not None:
            on_manifest(manifest)
        residual = [m for m in manifest.models if m.residual]
        base_manifest = check_base(manifest, base_dir) if residual else None
        envelope_bytes = [
            read_capped(Path(env), crypto.MAX_ENVELOPE_BYTES, "key envelope") for env in envelopes
        ]
        key = data_key(manifest, keyring, trust, envelope_bytes)
        containers = {m.container for m in manifest.models}
        model_names = {f"Model/{m.name}" for m in manifest.models}
        clash = model_names & {f.path for f in manifest.files if f.path not in containers}
        if clash:
            raise ManifestError(
                f"model name(s) collide with package files: {sorted(clash)}",
                code="manifest-duplicate",
            )

        def on_file(fe: FileEntry, reader: MemberReader) -> None:
            if fe.path in containers:
                _decode_container(
                    fe,
                    reader,
                    manifest=manifest,
                    key=key,
                    out=out,
                    limits=limits,
                    patches=patches,
                    verify=verify_decoded,
                )
                return
            data = meta_check(fe, reader, limits) if fe.path.startswith("Meta-info/") else None
            fd = out.create(fe.path, fe.mode)
            try:
                if data is not None:
                    write_all(fd, data)
                while piece := reader.read(COPY):
                    write_all(fd, piece)
                os.fsync(fd)
            finally:
                os.close(fd)

        walk(opened, on_file, progress)
    if patches:
        assert base_dir is not None and base_manifest is not None
        _apply_patches(patches, base_dir, base_manifest, out)
    # the signed manifest and its signature stay with the files: the daemon checks an
    # installed version against them at start (agent/installed.py)
    for rel, data in ((MANIFEST_NAME, manifest.raw), (SIGNATURE_NAME, signature)):
        fd = out.create(rel)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    out.sync_dirs()
    return manifest


@contextlib.contextmanager
def _opened(
    pkg: Path,
    limits: Limits,
    trust: TrustStore,
    *,
    nofollow: bool,
    stream: BinaryIO | None,
    size: int | None,
) -> Iterator[Opened]:
    if stream is None:
        with open_package(pkg, limits, trust, nofollow=nofollow) as opened:
            yield opened
    else:
        yield open_stream(stream, limits, trust, size=size, name=Path(pkg).name)


def _decode_container(
    fe: FileEntry,
    reader: MemberReader,
    *,
    manifest: Manifest,
    key: bytes | None,
    out: _Out,
    limits: Limits,
    patches: list[tuple[ModelInfo, Path]],
    verify: bool = False,
) -> None:
    models = models_of(manifest, fe.path)
    cr = ContainerReader(cast(BinaryIO, reader), container_limits(limits), total_size=fe.size)
    found: set[int] = set()
    for entry in cr:
        mi = check_header(models.get(entry.header.model_id), entry.header, fe.path)
        found.add(mi.id)
        rel = f".patches/{mi.id}" if mi.residual else f"Model/{mi.name}"
        fd = out.create(rel)
        sink = WriteHashPipeline(_WRITE_DEPTH, name="unpack")
        sha = hashlib.sha256() if verify else None
        size = 0
        try:
            for piece in entry.decoded(key, read_size=COPY):
                size += len(piece)
                if size > mi.size:
                    raise IntegrityError(
                        f"model {mi.name!r} decodes to more than the "
                        f"{mi.size} bytes the manifest declares",
                        code="model-size",
                    )
                sink.write(fd, piece, sha)
            sink.finish()
            digest = sha.hexdigest() if sha is not None else None
            os.fsync(fd)
        finally:
            sink.stop()
            os.close(fd)
        if size != mi.size:
            raise IntegrityError(
                f"model {mi.name!r} decodes to {size} bytes, the manifest declares {mi.size}",
                code="model-size",
            )
        if digest is not None and digest != mi.sha256:
            raise IntegrityError(
                f"model {mi.name!r}: decoded data does not match the manifest's SHA-256",
                code="model-digest",
            )
        if mi.residual:
            patches.append((mi, out.root / rel))
    check_all_models(models, found, fe.path)


def check_base(manifest: Manifest, base_dir: Path | None) -> Manifest:
    assert manifest.base is not None
    want = manifest.base
    if base_dir is None:
        raise BaseMismatchError(
            f"{manifest.name} version {manifest.version} is a residual update of "
            f"{want.name} version {want.version}; pass the unpacked base (--base DIR)",
            code="base-required",
        )
    try:
        base = parse_manifest((Path(base_dir) / MANIFEST_NAME).read_bytes())
    except OSError:
        raise BaseMismatchError(
            f"{base_dir} is not an unpacked package (no manifest.json)", code="base-invalid"
        ) from None
    if want.version is not None and (base.name, base.version) != (want.name, want.version):
        raise BaseMismatchError(
            f"the patch needs base {want.name} version {want.version}, {base_dir} holds "
            f"{base.name} version {base.version}",
            code="base-version",
        )
    return base


def _apply_patches(
    patches: list[tuple[ModelInfo, Path]], base_dir: Path, base: Manifest, out: _Out
) -> None:
    from agent.residual import apply_patch  # numpy: only for a residual update

    base_names = {m.name for m in base.models}
    for mi, patch in patches:
        if mi.name not in base_names:
            raise BaseMismatchError(
                f"the base package has no model {mi.name!r} to patch", code="base-model-missing"
            )
        target = out._parent(f"Model/{mi.name}")
        with open(patch, "rb") as pf:
            apply_patch(
                Path(base_dir) / "Model" / mi.name,
                pf,
                target,
                expected_base_digest=mi.base_digest,
                expected_target_digest=mi.target_digest,
            )
        patch.unlink()
        for written in (target, *external_data_files(mi)):
            if not (target.parent / written.name).is_file():
                raise IntegrityError(
                    f"model {mi.name!r}: the patch did not produce {written.name!r}, "
                    "which the manifest says it carries",
                    code="external-data-missing",
                )
            fsync_file(target.parent / written.name)
    shutil.rmtree(out.root / ".patches", ignore_errors=True)
    out.dirs.discard(out.root / ".patches")


def external_data_files(mi: ModelInfo) -> list[Path]:
    """External data files the model's patch wrote next to it (see pack)."""
    names = (mi.stats or {}).get("external_data") or []
    return [Path(check_path(f"Model/{n}")) for n in names if isinstance(n, str)]
