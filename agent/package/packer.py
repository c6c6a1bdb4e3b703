"""Publisher packing: models (or residual patches against a base) streamed through
zstd and STREAM AEAD into the container, Meta-info and Program files, the manifest
signed, all written as one ustar archive renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent import crypto, meta
from agent.container import ContainerWriter, Encryption, ModelFormat
from agent.durable import atomic_replace
from agent.errors import ManifestError, PackageError, ResidualError
from agent.keys import Keyring, TrustStore, key_id
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
)
from agent.package.installer import unpack
from agent.package.reader import CONTAINER_PATH, COPY, Progress
from agent.tario import TarWriter

if TYPE_CHECKING:
    from agent.residual import PatchInfo

logger = logging.getLogger(__name__)

DEFAULT_ZSTD_LEVEL = 3


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
        while piece := f.read(COPY):
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
                while piece := fh.read(COPY):
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
