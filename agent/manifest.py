"""The package manifest (``manifest.json``) and its signature (``manifest.sig``).

The manifest is the one signed document of a package: it names the package, lists
every other tar entry with its exact size and SHA-256, describes each model (format,
encoding, digest of the decoded data, residual base/target digests) and carries the
encryption parameters with the wrapped data keys. A device verifies the signature over
the *exact bytes* of ``manifest.json`` before it trusts anything else, then checks each
entry against the manifest while streaming it.

The publisher writes canonical JSON (sorted keys, no spaces, UTF-8) so the same
manifest always has the same bytes. The parser is strict: unknown keys, wrong types,
unsafe paths and duplicate entries are refused with a ``ManifestError`` whose ``code``
says which rule failed. ``docs/PACKAGE.md`` documents every field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import boundedjson
from agent.errors import (
    LimitError,
    ManifestError,
    SignatureError,
    UnsupportedVersionError,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
ROOTS = ("Model", "Program", "Meta-info")
MAX_PATH_LENGTH = 255  # characters of a member path (ustar: prefix 155 + name 100)
MAX_MANIFEST_BYTES = 4 << 20  # 4 MiB
MAX_FILES = 10_000
MAX_MODELS = 64

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DIGEST_RE = re.compile(r"^[a-z0-9-]+:[0-9a-f]{16,128}$")
KEY_ID_RE = re.compile(r"^[a-z0-9]+:[A-Za-z0-9._-]{1,64}$")
MODEL_FORMATS = ("onnx", "tflite", "raw")
ENCODINGS = ("residual", "zstd", "aes-256-gcm", "sm4-gcm", "chacha20-poly1305")
MAX_U32 = 0xFFFFFFFF
MAX_SIZE = 1 << 50  # no single member or model above 1 PiB; keeps arithmetic sane


def canonical_json(doc: Any) -> bytes:
    """Canonical JSON: sorted keys, separators ``,`` and ``:``, UTF-8, no NaN."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def check_path(path: object, *, where: str = "path") -> str:
    """Validate a package member path; returns it.

    Rules: a non-empty relative POSIX path of printable characters, at most
    ``MAX_PATH_LENGTH`` long, no empty, ``.`` or ``..`` component, under one of
    :data:`ROOTS`. Used by the manifest parser and by the tar reader (with the
    ``UnsafeEntryError`` codes there).
    """
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where} must be a non-empty string", code="manifest-path")
    if len(path) > MAX_PATH_LENGTH or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise ManifestError(
            f"{where} {path!r} is too long or has control characters", code="manifest-path"
        )
    if path.startswith("/"):
        raise ManifestError(f"{where} {path!r} is absolute", code="manifest-path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise ManifestError(
            f"{where} {path!r} has an empty, '.' or '..' component", code="manifest-path"
        )
    if parts[0] not in ROOTS or len(parts) < 2:
        raise ManifestError(
            f"{where} {path!r} is not under {', '.join(ROOTS)}", code="manifest-path"
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    """One tar member other than the manifest and its signature."""

    path: str
    size: int  # bytes
    sha256: str  # lowercase hex
    mode: int = 0o644  # 0o644 or 0o755 (executable scripts)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.mode != 0o644:
            d["mode"] = self.mode
        return d


@dataclass(frozen=True)
class ModelInfo:
    """One model inside a container. ``size``/``sha256`` are of the decoded data (for a
    residual model: of the patch stream; the result is pinned by ``target_digest``)."""

    id: int
    name: str
    format: str
    container: str
    encoding: tuple[str, ...]
    size: int
    sha256: str
    base_digest: str | None = None
    target_digest: str | None = None
    fidelity: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None

    @property
    def residual(self) -> bool:
        return "residual" in self.encoding

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "format": self.format,
            "container": self.container,
            "encoding": list(self.encoding),
            "size": self.size,
            "sha256": self.sha256,
        }
        for key in ("base_digest", "target_digest", "fidelity", "stats"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return d


@dataclass(frozen=True)
class EncryptionInfo:
    alg: str
    chunk_size: int  # plaintext bytes per STREAM chunk
    recipients: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alg": self.alg,
            "chunk_size": self.chunk_size,
            "recipients": [dict(r) for r in self.recipients],
        }


@dataclass(frozen=True)
class BaseRef:
    """The package a residual package patches (``version`` None: a bare model file)."""

    name: str
    version: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. ``raw`` keeps the exact signed bytes."""

    name: str
    version: int
    files: tuple[FileEntry, ...]
    models: tuple[ModelInfo, ...]
    label: str = ""
    created: str = ""
    signers: tuple[str, ...] = ()
    encryption: EncryptionInfo | None = None
    base: BaseRef | None = None
    format: int = FORMAT_VERSION
    raw: bytes = field(default=b"", compare=False, repr=False)

    @property
    def package_id(self) -> str:
        """``name@version``: what key envelopes name."""
        return f"{self.name}@{self.version}"

    def file(self, path: str) -> FileEntry | None:
        for f in self.files:
            if f.path == path:
                return f
        return None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "label": self.label,
            "created": self.created,
            "files": [f.to_dict() for f in self.files],
            "models": [m.to_dict() for m in self.models],
            "signers": list(self.signers),
        }
        if self.encryption is not None:
            d["encryption"] = self.encryption.to_dict()
        if self.base is not None:
            d["base"] = self.base.to_dict()
        return d

    def to_bytes(self) -> bytes:
        """The canonical bytes that get signed (and stored as ``manifest.json``)."""
        return canonical_json(self.to_dict())


# --- parsing --------------------------------------------------------------------------


def _fail(msg: str, code: str = "manifest-field") -> ManifestError:
    return ManifestError(f"manifest: {msg}", code=code)


def _obj(
    v: object, where: str, required: Sequence[str], optional: Sequence[str] = ()
) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise _fail(f"{where} must be an object")
    missing = [k for k in required if k not in v]
    if missing:
        raise _fail(f"{where} lacks {', '.join(missing)}", code="manifest-missing-field")
    unknown = sorted(set(v) - set(required) - set(optional))
    if unknown:
        raise _fail(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}",
            code="manifest-unknown-key",
        )
    return v


def _int(v: object, where: str, lo: int = 0, hi: int = MAX_SIZE) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(f"{where} must be an integer in {lo}..{hi}, got {v!r:.40}")
    return v


def _str(v: object, where: str, pattern: re.Pattern[str] | None = None, max_len: int = 1024) -> str:
    if not isinstance(v, str) or len(v) > max_len:
        raise _fail(f"{where} must be a string of at most {max_len} characters")
    if pattern is not None and not pattern.match(v):
        raise _fail(f"{where} {v!r:.80} is not of the form {pattern.pattern}")
    return v


def _list(v: object, where: str, max_len: int) -> list[Any]:
    if not isinstance(v, list) or len(v) > max_len:
        raise _fail(f"{where} must be a list of at most {max_len} items")
    return v


def parse_manifest(
    data: bytes,
    *,
    max_files: int = MAX_FILES,
    max_models: int = MAX_MODELS,
    max_bytes: int = MAX_MANIFEST_BYTES,
) -> Manifest:
    """Parse and validate manifest bytes (untrusted input: only ``EdgewardError``s escape).

    Raises:
        ManifestError: ``manifest-json``, ``manifest-field``, ``manifest-missing-field``,
            ``manifest-unknown-key``, ``manifest-path``, ``manifest-duplicate``,
            ``manifest-too-large``.
        UnsupportedVersionError: ``manifest-version`` for a format other than 1.
    """
    if len(data) > max_bytes:
        raise _fail(f"{len(data)} bytes exceed the limit of {max_bytes}", "manifest-too-large")
    doc = boundedjson.loads(
        data, what="manifest.json", error=ManifestError, code="manifest-json", max_bytes=max_bytes
    )
    if not isinstance(doc, dict):
        raise _fail("must be a JSON object", "manifest-json")
    fmt = doc.get("format")
    if fmt != FORMAT_VERSION:
        if isinstance(fmt, int) and not isinstance(fmt, bool):
            raise UnsupportedVersionError(
                f"manifest format version {fmt} is not supported (this agent reads "
                f"{FORMAT_VERSION})",
                code="manifest-version",
            )
        raise _fail(f"format must be the integer {FORMAT_VERSION}", "manifest-version")
    _obj(
        doc,
        "manifest",
        ("format", "name", "version", "files", "models", "signers"),
        ("label", "created", "encryption", "base"),
    )
    name = _str(doc["name"], "name", NAME_RE)
    version = _int(doc["version"], "version", 0, (1 << 63) - 1)
    label = _str(doc.get("label", ""), "label", max_len=256)
    created = _str(doc.get("created", ""), "created", max_len=64)
    signers = tuple(
        _str(s, f"signers[{i}]", KEY_ID_RE)
        for i, s in enumerate(_list(doc["signers"], "signers", 16))
    )

    files: list[FileEntry] = []
    seen: set[str] = set()
    if isinstance(doc["files"], list) and len(doc["files"]) > max_files:
        raise LimitError(
            f"manifest lists {len(doc['files'])} files, above the limit of {max_files}",
            code="limit-entries",
        )
    for i, raw in enumerate(_list(doc["files"], "files", max_files)):
        where = f"files[{i}]"
        f = _obj(raw, where, ("path", "size", "sha256"), ("mode",))
        path = check_path(f["path"], where=f"{where}.path")
        if path in seen:
            raise _fail(f"{where}.path {path!r} is listed twice", "manifest-duplicate")
        seen.add(path)
        mode = _int(f.get("mode", 0o644), f"{where}.mode", 0, 0o777)
        if mode not in (0o644, 0o755):
            raise _fail(f"{where}.mode must be 0o644 or 0o755")
        files.append(
            FileEntry(
                path,
                _int(f["size"], f"{where}.size"),
                _str(f["sha256"], f"{where}.sha256", SHA256_RE),
                mode,
            )
        )
    _check_prefixes(seen)

    models: list[ModelInfo] = []
    ids: set[tuple[str, int]] = set()
    names: set[str] = set()
    for i, raw in enumerate(_list(doc["models"], "models", max_models)):
        models.append(_parse_model(raw, i, seen, ids, names))
    if not models:
        raise _fail("models must list at least one model", "manifest-missing-field")

    encryption = None
    if "encryption" in doc:
        e = _obj(doc["encryption"], "encryption", ("alg", "chunk_size", "recipients"))
        alg = _str(e["alg"], "encryption.alg")
        if alg not in ENCODINGS[2:]:
            raise _fail(f"encryption.alg {alg!r:.40} is not one of {', '.join(ENCODINGS[2:])}")
        recips = _list(e["recipients"], "encryption.recipients", 1024)
        for j, r in enumerate(recips):
            if not isinstance(r, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) <= 256 for k, v in r.items()
            ):
                raise _fail(f"encryption.recipients[{j}] must be an object of strings")
        encryption = EncryptionInfo(
            alg,
            _int(e["chunk_size"], "encryption.chunk_size", 1, 64 << 20),
            tuple(dict(r) for r in recips),
        )
    for m in models:
        enc_algs = [x for x in m.encoding if x in ENCODINGS[2:]]
        want = [encryption.alg] if encryption is not None else []
        if enc_algs != want:
            raise _fail(
                f"model {m.name!r} encoding {list(m.encoding)} disagrees with the "
                "package encryption",
                "manifest-encoding",
            )

    base = None
    if "base" in doc:
        b = _obj(doc["base"], "base", ("name", "version"))
        bver = b["version"]
        base = BaseRef(
            _str(b["name"], "base.name", NAME_RE),
            None if bver is None else _int(bver, "base.version", 0, (1 << 63) - 1),
        )
    if any(m.residual for m in models) and base is None:
        raise _fail("a residual model needs the package 'base'", "manifest-missing-field")

    return Manifest(
        name=name,
        version=version,
        files=tuple(files),
        models=tuple(models),
        label=label,
        created=created,
        signers=signers,
        encryption=encryption,
        base=base,
        format=FORMAT_VERSION,
        raw=bytes(data),
    )


def _check_prefixes(paths: set[str]) -> None:
    """A path may not also be the parent directory of another path."""
    for p in paths:
        parts = p.split("/")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in paths:
                raise _fail(
                    f"files: {p!r} lies under the file {'/'.join(parts[:k])!r}",
                    "manifest-duplicate",
                )


def _parse_model(
    raw: object, i: int, files: set[str], ids: set[tuple[str, int]], names: set[str]
) -> ModelInfo:
    where = f"models[{i}]"
    m = _obj(
        raw,
        where,
        ("id", "name", "format", "container", "encoding", "size", "sha256"),
        ("base_digest", "target_digest", "fidelity", "stats"),
    )
    name = _str(m["name"], f"{where}.name", MODEL_NAME_RE)
    if name in names:
        raise _fail(f"{where}.name {name!r} is used twice", "manifest-duplicate")
    names.add(name)
    fmt = _str(m["format"], f"{where}.format")
    if fmt not in MODEL_FORMATS:
        raise _fail(f"{where}.format {fmt!r:.40} is not one of {', '.join(MODEL_FORMATS)}")
    container = check_path(m["container"], where=f"{where}.container")
    if container not in files or not container.startswith("Model/"):
        raise _fail(
            f"{where}.container {container!r} is not a listed Model/ file", "manifest-container"
        )
    mid = _int(m["id"], f"{where}.id", 0, MAX_U32)
    if (container, mid) in ids:
        raise _fail(f"{where}.id {mid} repeats in {container}", "manifest-duplicate")
    ids.add((container, mid))
    encoding = tuple(
        _str(e, f"{where}.encoding") for e in _list(m["encoding"], f"{where}.encoding", 3)
    )
    algs = [e for e in encoding if e in ENCODINGS[2:]]
    canon = [e for e in ("residual", "zstd") if e in encoding] + algs
    if any(e not in ENCODINGS for e in encoding) or len(algs) > 1 or list(encoding) != canon:
        raise _fail(
            f"{where}.encoding {list(encoding)} is not an ordered subset of residual, zstd, <alg>"
        )
    digests: dict[str, str | None] = {}
    for key in ("base_digest", "target_digest"):
        v = m.get(key)
        digests[key] = None if v is None else _str(v, f"{where}.{key}", DIGEST_RE)
    extra: dict[str, dict[str, Any] | None] = {}
    for key in ("fidelity", "stats"):
        v = m.get(key)
        if v is not None and not isinstance(v, dict):
            raise _fail(f"{where}.{key} must be an object")
        extra[key] = v
    if "residual" in encoding and (
        digests["base_digest"] is None or digests["target_digest"] is None
    ):
        raise _fail(
            f"{where}: a residual model needs base_digest and target_digest",
            "manifest-missing-field",
        )
    return ModelInfo(
        id=mid,
        name=name,
        format=fmt,
        container=container,
        encoding=encoding,
        size=_int(m["size"], f"{where}.size"),
        sha256=_str(m["sha256"], f"{where}.sha256", SHA256_RE),
        base_digest=digests["base_digest"],
        target_digest=digests["target_digest"],
        fidelity=extra["fidelity"],
        stats=extra["stats"],
    )


# --- signatures -----------------------------------------------------------------------


def sign_manifest(data: bytes, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The ``manifest.sig`` document: one Ed25519 signature per key over ``data``."""
    from agent.keys import encode_signatures, sign

    if not keys:
        raise ManifestError("a package needs at least one signing key", code="no-signing-key")
    return encode_signatures(sign(data, k) for k in keys)


def signature_key_ids(sig: bytes) -> list[str]:
    """Key ids named in a ``manifest.sig`` document (unverified; for ``inspect``)."""
    try:
        doc = boundedjson.loads(
            sig, what="manifest.sig", error=SignatureError, code="signature-malformed",
            max_bytes=64 << 10,
        )  # fmt: skip
        return [str(e["key_id"])[:64] for e in doc["signatures"][:16] if isinstance(e, dict)]
    except (SignatureError, KeyError, TypeError):
        return []


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ROOTS",
    "SIGNATURE_NAME",
    "BaseRef",
    "EncryptionInfo",
    "FileEntry",
    "Manifest",
    "ModelInfo",
    "canonical_json",
    "check_path",
    "parse_manifest",
    "sign_manifest",
    "signature_key_ids",
]
