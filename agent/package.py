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
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent import crypto, meta
from agent.container import (
    ContainerLimits,
    ContainerReader,
    ContainerWriter,
    Encryption,
    ModelFormat,
)
from agent.durable import (
    HashThread,
    WriteHashPipeline,
    atomic_replace,
    fsync_dir,
    fsync_file,
    write_all,
)
from agent.errors import (
    BaseMismatchError,
    IntegrityError,
    LimitError,
    ManifestError,
    MetaInfoError,
    PackageError,
    ResidualError,
    SignatureError,
    UnsafeEntryError,
)
from agent.keys import Keyring, TrustStore, key_id
from agent.limits import Limits
from agent.manifest import (
    MANIFEST_NAME,
    NAME_RE,
    SIGNATURE_NAME,
    BaseRef,
    EncryptionInfo,
    FileEntry,
    Manifest,
    ModelInfo,
    check_path,
    parse_manifest,
    sign_manifest,
    signature_key_ids,
)
from agent.tario import MemberReader, TarReader, TarWriter

if TYPE_CHECKING:
    from agent.residual import PatchInfo

logger = logging.getLogger(__name__)

CONTAINER_PATH = "Model/models.empc"
DEFAULT_ZSTD_LEVEL = 3
_COPY = 4 << 20  # bytes per read when streaming
Progress = Callable[[int], None]


@dataclass
class PackSpec:
    """What to pack. ``models`` are files; names default to the file names."""

    models: list[Path]
    name: str
    version: int
    signing_keys: list[Ed25519PrivateKey]
    label: str = ""
    model_names: list[str] | None = None
    meta_dir: Path | None = None
    program_dir: Path | None = None
    samples_dir: Path | None = None
    encrypt_for: list[X25519PublicKey] = field(default_factory=list)
    psks: list[tuple[str, bytes]] = field(default_factory=list)  # (key id, secret)
    alg: str = crypto.DEFAULT_ALG
    chunk_size: int = crypto.DEFAULT_CHUNK_SIZE  # plaintext bytes per AEAD chunk
    zstd_level: int | None = DEFAULT_ZSTD_LEVEL  # None: no compression
    base: Path | None = None  # residual base: .emp, unpacked package dir or model file
    base_trust: TrustStore | None = None  # to verify a base .emp (default: signers)
    base_keyring: Keyring | None = None  # to decrypt a base .emp
    bits: int = 8
    group_size: int = 128
    max_rel_err: float | None = None
    allow_lossy: bool = False  # permit 1- and 2-bit Δ without a fidelity target
    fidelity_target: Any = None  # agent.residual.search.Target: smallest patch meeting it
    output_kind: str | None = None  # fidelity metrics; default from Meta-info task
    max_patch_ratio: float = 1.0
    progress: Progress | None = None

    def __repr__(self) -> str:  # never show key material
        return f"PackSpec(name={self.name!r}, version={self.version}, models={self.models})"


# --- helpers --------------------------------------------------------------------------


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(_COPY):
            h.update(piece)
            size += len(piece)
    return h.hexdigest(), size


def _model_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".tflite", ".lite"):
        return "tflite"
    with open(path, "rb") as f:
        head = f.read(8)
    return "tflite" if head[4:8] == b"TFL3" else "raw"


def _jsonable(d: Any) -> dict[str, Any] | None:
    """A plain-JSON copy of a report dict (numpy scalars become numbers, NaN None)."""
    if not d:
        return None

    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        if hasattr(o, "item") and not isinstance(o, str | bytes):
            o = o.item()
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if o is None or isinstance(o, bool | int | str):
            return o
        return str(o)

    out: dict[str, Any] = clean(dict(d))
    return out


def _encode_patch(base: Path, target: Path, out: BinaryIO, spec: PackSpec) -> PatchInfo:
    """``agent.residual.encode_patch`` with the pack options."""
    # imported here: numpy and the model readers load only when a patch is made
    from agent.residual import encode_patch
    from agent.residual.fidelity import kind_from_meta

    return encode_patch(
        base,
        target,
        out,
        bits=spec.bits,
        group_size=spec.group_size,
        max_rel_err=spec.max_rel_err,
        samples=spec.samples_dir,
        allow_lossy=spec.allow_lossy,
        fidelity_target=spec.fidelity_target,
        output_kind=spec.output_kind or kind_from_meta(spec.meta_dir),
        max_patch_ratio=spec.max_patch_ratio,
    )


def _walk_source(root: Path, prefix: str) -> list[tuple[str, Path, int]]:
    """Regular files under ``root`` as (member path, file, mode); refuses links."""
    if not root.is_dir():
        raise PackageError(f"{root} is not a directory", code="source-missing")
    out: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".pyc"):
                continue
            p = Path(dirpath) / name
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise PackageError(
                    f"{p} is not a regular file (links and devices are not packed)",
                    code="source-unsafe",
                )
            rel = p.relative_to(root).as_posix()
            mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
            out.append((check_path(f"{prefix}/{rel}"), p, mode))
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise PackageError(f"{Path(dirpath) / d} is a symbolic link", code="source-unsafe")
    return out


# --- pack -----------------------------------------------------------------------------


@dataclass
class _Source:
    path: str
    data: bytes | None = None
    file: Path | None = None
    mode: int = 0o644


def _meta_sources(spec: PackSpec, models: list[tuple[str, Path, str]]) -> list[_Source]:
    sources: dict[str, _Source] = {}
    docs: dict[str, dict[str, Any]] = {}
    if spec.meta_dir is not None:
        for member, p, mode in _walk_source(spec.meta_dir, "Meta-info"):
            rel = member.split("/", 1)[1]
            if rel in (meta.MANAGEMENT, meta.TECHNICAL):
                docs[rel] = meta.parse(rel, p.read_bytes())
            elif rel.startswith("samples/"):
                meta.check_sample(p)
            sources[member] = _Source(member, file=p, mode=mode)
    if len(docs) < 2:
        mgmt, tech = meta.generate(spec.name, spec.version, spec.label, models)
        for rel, doc in ((meta.MANAGEMENT, mgmt), (meta.TECHNICAL, tech)):
            if rel not in docs:
                docs[rel] = doc
                data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
                sources[f"Meta-info/{rel}"] = _Source(f"Meta-info/{rel}", data=data)
    meta.check_entry_model(docs[meta.TECHNICAL], [n for n, _, _ in models])
    if spec.samples_dir is not None:
        if not spec.samples_dir.is_dir():
            raise PackageError(f"{spec.samples_dir} is not a directory", code="source-missing")
        for p in sorted(spec.samples_dir.glob("*.npz")):
            meta.check_sample(p)
            member = check_path(f"Meta-info/samples/{p.name}")
            if member in sources:
                raise PackageError(
                    f"{member} comes from both --meta and --samples", code="source-duplicate"
                )
            sources[member] = _Source(member, file=p)
    return [sources[k] for k in sorted(sources)]


def _resolve_base(spec: PackSpec, work: Path) -> tuple[BaseRef, dict[str, Path]]:
    """The residual base as (reference, {model name: file})."""
    assert spec.base is not None
    base = Path(spec.base)
    if base.is_file() and not _is_package(base):
        return BaseRef(spec.name, None), {base.name: base}
    if base.is_file():
        trust = spec.base_trust
        if trust is None:  # a publisher patches against its own packages
            trust = TrustStore()
            for k in spec.signing_keys:
                trust.add(k.public_key())
        unpack(base, work / "base", trust=trust, keyring=spec.base_keyring)
        base = work / "base"
    if not (base / MANIFEST_NAME).is_file():
        raise ResidualError(
            f"base {spec.base} is neither a package, an unpacked package "
            "directory nor a model file",
            code="base-invalid",
        )
    bm = parse_manifest((base / MANIFEST_NAME).read_bytes())
    return BaseRef(bm.name, bm.version), {m.name: base / "Model" / m.name for m in bm.models}


def _carried_external_data(
    models: list[tuple[str, Path, str]], base_models: dict[str, Path]
) -> dict[str, str]:
    """{external data model name: the ONNX model whose residual patch writes it}.

    An ONNX model with external data is packed as the .onnx file plus its data files.
    In a residual update the ONNX patch already carries every tensor of those files
    (quantised, like inline weights) and ``apply_patch`` writes them next to the model,
    so sending the data files again as exact byte deltas would only cost size. They are
    left out of the residual package; the target digest of the .onnx covers them.
    """
    if not base_models:
        return {}
    from agent.residual.layout import scan  # numpy: only for a residual pack

    by_file = {path.resolve(): name for name, path, _fmt in models}
    carried: dict[str, str] = {}
    for name, path, fmt in models:
        if fmt != "onnx" or name not in base_models:
            continue
        layout = scan(path)
        for rel, ext_path in zip(layout.names[1:], layout.paths[1:], strict=True):
            ext = by_file.get(Path(ext_path).resolve())
            if ext is not None and ext == rel and ext != name:
                carried[ext] = name
    return carried


def _is_package(path: Path) -> bool:
    with open(path, "rb") as f:
        block = f.read(512)
    return len(block) == 512 and block[257:263] == b"ustar\0" and block[:13] == b"manifest.json"


def pack(spec: PackSpec, out: Path) -> Manifest:
    """Build a signed package at ``out`` (written to a temp file, then renamed).

    Raises:
        PackageError / MetaInfoError / ResidualError / KeyFileError with specific codes.
    """
    out = Path(out)
    if not NAME_RE.match(spec.name):
        raise ManifestError(
            f"package name {spec.name!r} must match {NAME_RE.pattern}", code="manifest-field"
        )
    if isinstance(spec.version, bool) or not isinstance(spec.version, int) or spec.version < 0:
        raise ManifestError(
            f"version must be a non-negative integer, got {spec.version!r}", code="manifest-field"
        )
    if not spec.models:
        raise PackageError("a package needs at least one --model", code="no-model")
    if not spec.signing_keys:
        raise ManifestError("a package needs at least one signing key", code="no-signing-key")
    for m in spec.models:
        if not Path(m).is_file():
            raise PackageError(f"model file {m} does not exist", code="source-missing")
    crypto.check_alg(spec.alg)
    crypto.check_chunk_size(spec.chunk_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".work", dir=out.parent))
    try:
        return _pack(spec, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pack(spec: PackSpec, out: Path, work: Path) -> Manifest:
    names = spec.model_names or [Path(m).name for m in spec.models]
    if len(names) != len(spec.models):
        raise PackageError("one name per model", code="model-name")
    base_ref: BaseRef | None = None
    base_models: dict[str, Path] = {}
    if spec.base is not None:
        base_ref, base_models = _resolve_base(spec, work)
        if len(spec.models) == 1 and len(base_models) == 1 and spec.model_names is None:
            names = list(base_models)  # an update keeps the Model/ file name stable
    models = [(n, Path(p), _model_format(Path(p))) for n, p in zip(names, spec.models, strict=True)]
    if len(set(names)) != len(names):
        raise PackageError(f"model names repeat: {names}", code="model-name")

    meta_sources = _meta_sources(spec, models)
    carried = _carried_external_data(models, base_models)
    models = [m for m in models if m[0] not in carried]
    program_sources = (
        []
        if spec.program_dir is None
        else [
            _Source(m, file=p, mode=mode)
            for m, p, mode in _walk_source(spec.program_dir, "Program")
        ]
    )

    encryption: Encryption | None = None
    enc_info: EncryptionInfo | None = None
    if spec.encrypt_for or spec.psks:
        data_key = crypto.new_data_key()
        ctx = crypto.package_context(spec.name, spec.version, spec.alg, spec.chunk_size)
        recips = [
            crypto.wrap_for_device(data_key, pub, key_id(pub), ctx) for pub in spec.encrypt_for
        ]
        recips += [crypto.wrap_with_psk(data_key, secret, kid, ctx) for kid, secret in spec.psks]
        encryption = Encryption(data_key, spec.alg, spec.chunk_size)
        enc_info = EncryptionInfo(spec.alg, spec.chunk_size, tuple(recips))

    container = work / "models.empc"
    infos: list[ModelInfo] = []
    with open(container, "w+b") as f:
        writer = ContainerWriter(cast(BinaryIO, f))
        for i, (name, path, fmt) in enumerate(models):
            extra: dict[str, Any] = {}
            src, residual = path, False
            if name in base_models:
                residual = True
                src = work / f"patch-{i}"
                with open(src, "wb") as pf:
                    info = _encode_patch(base_models[name], path, pf, spec)
                stats = _jsonable(info.stats) or {}
                ext = sorted(k for k, v in carried.items() if v == name)
                if ext:
                    stats["external_data"] = ext  # written by this model's patch
                extra = {
                    "base_digest": info.base_digest,
                    "target_digest": info.target_digest,
                    "fidelity": _jsonable(info.fidelity),
                    "stats": stats or None,
                }
            writer.begin_model(
                i,
                ModelFormat.from_name(fmt),
                residual=residual,
                zstd_level=None if residual else spec.zstd_level,
                encryption=encryption,
            )
            h = hashlib.sha256()
            size = 0
            with open(src, "rb") as fh:
                while piece := fh.read(_COPY):
                    h.update(piece)
                    writer.write(piece)
                    size += len(piece)
                    if spec.progress is not None:
                        spec.progress(len(piece))
            header = writer.end_model()
            infos.append(
                ModelInfo(
                    id=i,
                    name=name,
                    format=fmt,
                    container=CONTAINER_PATH,
                    encoding=tuple(header.encoding()),
                    size=size,
                    sha256=h.hexdigest(),
                    **extra,
                )
            )
        writer.close()
        f.flush()
    sources = [*meta_sources, *program_sources, _Source(CONTAINER_PATH, file=container)]
    files: list[FileEntry] = []
    for s in sources:
        if s.data is not None:
            files.append(FileEntry(s.path, len(s.data), hashlib.sha256(s.data).hexdigest(), s.mode))
        else:
            assert s.file is not None
            digest, size = _sha256_file(s.file)
            files.append(FileEntry(s.path, size, digest, s.mode))

    now = datetime.now(UTC).replace(microsecond=0)
    manifest = Manifest(
        name=spec.name,
        version=spec.version,
        label=spec.label,
        created=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        files=tuple(files),
        models=tuple(infos),
        signers=tuple(key_id(k.public_key()) for k in spec.signing_keys),
        encryption=enc_info,
        base=base_ref,
    )
    raw = manifest.to_bytes()
    manifest = parse_manifest(raw)  # what we write must be what a device accepts
    sig = sign_manifest(raw, spec.signing_keys)

    tmp_out = work / "package.emp"
    with open(tmp_out, "wb") as f:
        tw = TarWriter(cast(BinaryIO, f), mtime=int(now.timestamp()))
        tw.add_bytes(MANIFEST_NAME, raw)
        tw.add_bytes(SIGNATURE_NAME, sig)
        for s, fe in zip(sources, files, strict=True):
            if s.data is not None:
                tw.add_bytes(fe.path, s.data, fe.mode)
            else:
                assert s.file is not None
                tw.add_file(fe.path, s.file, fe.size, fe.mode)
        tw.close()
        f.flush()
        os.fsync(f.fileno())
    atomic_replace(tmp_out, out)
    logger.info(
        "packed %s version %d: %d model(s), %d files, %s",
        spec.name,
        spec.version,
        len(infos),
        len(files),
        out,
    )
    return manifest


# --- reading --------------------------------------------------------------------------


@dataclass
class _Opened:
    tar: TarReader
    manifest: Manifest
    signature: bytes
    signer: str | None


def open_regular(path: Path, *, nofollow: bool = False) -> BinaryIO:
    """Open an untrusted file for reading only if it is a regular file.

    ``O_NONBLOCK`` so a FIFO (or a device behind a link) cannot block the open, then
    ``fstat`` on the descriptor (no race with a swap of the name): anything but a
    regular file is refused before a byte is read. ``nofollow``: a symlink is refused
    too (the daemon's inbox, which others can write).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise PackageError(
                f"{path.name} is a symbolic link; packages must be regular files",
                code="package-not-regular",
            ) from None
        if exc.errno == errno.ENXIO:  # what open() says of a Unix socket
            raise PackageError(
                f"{path.name} is not a regular file (a socket)", code="package-not-regular"
            ) from None
        raise PackageError(f"cannot open {path}: {exc.strerror}", code="package-read") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(
                f"{path.name} is not a regular file ({_file_kind(st.st_mode)})",
                code="package-not-regular",
            )
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: Path, cap: int, what: str, *, nofollow: bool = False) -> bytes:
    """All of a small untrusted file (a regular file of at most ``cap`` bytes)."""
    with open_regular(path, nofollow=nofollow) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(cap + 1) if size <= cap else b""
    if size > cap or len(data) > cap:
        raise LimitError(f"{what} {path.name} is larger than {cap} bytes", code="limit-member-size")
    return data


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def _open(
    pkg: Path, limits: Limits, trust: TrustStore | None, *, nofollow: bool = False
) -> Iterator[_Opened]:
    pkg = Path(pkg)
    f = open_regular(pkg, nofollow=nofollow)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_package_bytes:
            raise LimitError(
                f"{pkg.name} is {size} bytes, above the limit of {limits.max_package_bytes}",
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
        signer = trust.verify(raw, sig) if trust is not None else None
        manifest = parse_manifest(
            raw,
            max_files=limits.max_entries,
            max_models=limits.max_models,
            max_bytes=limits.max_manifest_bytes,
        )
        yield _Opened(tar, manifest, sig, signer)


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
_WRITE_DEPTH = 4  # decoded pieces (each <= _COPY bytes) queued for the writer thread


class _Sha256Inline:
    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


FileHandler = Callable[[FileEntry, MemberReader], None]


def _walk(opened: _Opened, on_file: FileHandler, progress: Progress | None = None) -> None:
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
            while reader.read(_COPY):
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


def _container_limits(limits: Limits) -> ContainerLimits:
    return ContainerLimits(max_models=limits.max_models, max_decoded_bytes=limits.max_decoded_bytes)


def _models_of(manifest: Manifest, container: str) -> dict[int, ModelInfo]:
    return {m.id: m for m in manifest.models if m.container == container}


def _check_header(mi: ModelInfo | None, header: Any, container: str) -> ModelInfo:
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


def _meta_check(fe: FileEntry, reader: MemberReader, limits: Limits) -> bytes | None:
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


def verify(
    pkg: Path,
    trust: TrustStore,
    limits: Limits | None = None,
    *,
    nofollow: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Verify a package without writing anything: signature, then every member's size
    and SHA-256, the container headers against the manifest, and the Meta-info schemas.
    ``progress`` is called with the byte count of every piece read (it may raise to
    abandon the verification, as the daemon does when it is stopped).

    Raises:
        PackageError subclasses with specific codes (see docs/PACKAGE.md).
    """
    limits = limits or Limits()
    with _open(pkg, limits, trust, nofollow=nofollow) as opened:
        manifest = opened.manifest

        def on_file(fe: FileEntry, reader: MemberReader) -> None:
            if fe.path.startswith("Meta-info/"):
                _meta_check(fe, reader, limits)
                return
            models = _models_of(manifest, fe.path)
            if not models:
                return
            cr = ContainerReader(
                cast(BinaryIO, reader), _container_limits(limits), total_size=fe.size
            )
            found = {_check_header(models.get(e.header.model_id), e.header, fe.path).id for e in cr}
            _check_all_models(models, found, fe.path)

        _walk(opened, on_file, progress)
    logger.info(
        "verified %s version %d (signed by %s)", manifest.name, manifest.version, opened.signer
    )
    return manifest


def _check_all_models(models: dict[int, ModelInfo], found: set[int], container: str) -> None:
    missing = sorted(set(models) - found)
    if missing:
        raise ManifestError(
            f"{container}: model id(s) {missing} listed in the manifest are "
            "missing from the container",
            code="model-missing",
        )


def _data_key(
    manifest: Manifest, keyring: Keyring | None, trust: TrustStore, envelopes: Sequence[Path]
) -> bytes | None:
    enc = manifest.encryption
    if enc is None:
        return None
    entries: list[dict[str, Any]] = [dict(r) for r in enc.recipients]
    for env in envelopes:
        data = read_capped(Path(env), crypto.MAX_ENVELOPE_BYTES, "key envelope")
        entries += crypto.read_envelope(data, trust, package_id=manifest.package_id)
    ctx = crypto.package_context(manifest.name, manifest.version, enc.alg, enc.chunk_size)
    return crypto.unwrap_any(entries, keyring or Keyring(), ctx)


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
) -> Manifest:
    """Verify, decrypt, decompress (and patch) a package into ``out_dir``.

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
) -> Manifest:
    out = _Out(tmp)
    patches: list[tuple[ModelInfo, Path]] = []
    with _open(pkg, limits, trust, nofollow=nofollow) as opened:
        manifest = opened.manifest
        signature = opened.signature
        residual = [m for m in manifest.models if m.residual]
        base_manifest = _check_base(manifest, base_dir) if residual else None
        key = _data_key(manifest, keyring, trust, envelopes)
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
            data = _meta_check(fe, reader, limits) if fe.path.startswith("Meta-info/") else None
            fd = out.create(fe.path, fe.mode)
            try:
                if data is not None:
                    write_all(fd, data)
                while piece := reader.read(_COPY):
                    write_all(fd, piece)
                os.fsync(fd)
            finally:
                os.close(fd)

        _walk(opened, on_file, progress)
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
    models = _models_of(manifest, fe.path)
    cr = ContainerReader(cast(BinaryIO, reader), _container_limits(limits), total_size=fe.size)
    found: set[int] = set()
    for entry in cr:
        mi = _check_header(models.get(entry.header.model_id), entry.header, fe.path)
        found.add(mi.id)
        rel = f".patches/{mi.id}" if mi.residual else f"Model/{mi.name}"
        fd = out.create(rel)
        sink = WriteHashPipeline(_WRITE_DEPTH, name="unpack")
        sha = hashlib.sha256() if verify else None
        size = 0
        try:
            for piece in entry.decoded(key, read_size=_COPY):
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
    _check_all_models(models, found, fe.path)


def _check_base(manifest: Manifest, base_dir: Path | None) -> Manifest:
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
        for written in (target, *_external_written(mi)):
            if not (target.parent / written.name).is_file():
                raise IntegrityError(
                    f"model {mi.name!r}: the patch did not produce {written.name!r}, "
                    "which the manifest says it carries",
                    code="external-data-missing",
                )
            fsync_file(target.parent / written.name)
    shutil.rmtree(out.root / ".patches", ignore_errors=True)
    out.dirs.discard(out.root / ".patches")


def _external_written(mi: ModelInfo) -> list[Path]:
    """External data files the model's patch wrote next to it (see pack)."""
    names = (mi.stats or {}).get("external_data") or []
    return [Path(check_path(f"Model/{n}")) for n in names if isinstance(n, str)]


def inspect(pkg: Path, limits: Limits | None = None) -> dict[str, Any]:
    """Describe a package without keys: the (unverified) manifest and the signer ids."""
    limits = limits or Limits()
    pkg = Path(pkg)
    with _open(pkg, limits, None) as opened:
        m = opened.manifest
        doc = m.to_dict()
        doc["package_size"] = pkg.stat().st_size
        doc["signature_key_ids"] = signature_key_ids(opened.signature)
        doc["verified"] = False
        if m.encryption is not None:
            doc["encryption"] = {
                "alg": m.encryption.alg,
                "chunk_size": m.encryption.chunk_size,
                "recipients": [r.get("key_id") for r in m.encryption.recipients],
            }
    return doc


def read_manifest(
    pkg: Path,
    trust: TrustStore | None = None,
    limits: Limits | None = None,
    *,
    nofollow: bool = False,
) -> Manifest:
    """The package's manifest; its signature is verified when ``trust`` is given."""
    with _open(pkg, limits or Limits(), trust, nofollow=nofollow) as opened:
        return opened.manifest


def make_envelope(
    pkg: Path,
    *,
    signing_key: Ed25519PrivateKey,
    keyring: Keyring,
    encrypt_for: Sequence[X25519PublicKey] = (),
    psks: Sequence[tuple[str, bytes]] = (),
) -> bytes:
    """A signed key envelope giving new recipients access to an existing package.

    The data key is unwrapped with a key from ``keyring`` (one of the package's existing
    recipients) and wrapped for each new device / fleet key with the package context,
    so the package itself is not touched or re-signed.
    """
    trust = TrustStore()
    trust.add(signing_key.public_key())
    manifest = read_manifest(pkg, trust)
    enc = manifest.encryption
    if enc is None:
        raise PackageError(
            f"{manifest.package_id} is not encrypted; it needs no envelope", code="not-encrypted"
        )
    if not encrypt_for and not psks:
        raise PackageError("an envelope needs at least one new recipient", code="usage")
    ctx = crypto.package_context(manifest.name, manifest.version, enc.alg, enc.chunk_size)
    data_key = crypto.unwrap_any(list(enc.recipients), keyring, ctx)
    entries = [crypto.wrap_for_device(data_key, pub, key_id(pub), ctx) for pub in encrypt_for]
    entries += [crypto.wrap_with_psk(data_key, secret, kid, ctx) for kid, secret in psks]
    return crypto.make_envelope(entries, manifest.package_id, signing_key)


__all__ = [
    "CONTAINER_PATH",
    "Limits",
    "PackSpec",
    "inspect",
    "make_envelope",
    "open_regular",
    "pack",
    "read_capped",
    "read_manifest",
    "unpack",
    "verify",
]
