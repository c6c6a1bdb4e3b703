"""Key files, key ids, signatures, the trust store and the device keyring.

Key files (DESIGN §6, ``docs/FORMAT.md`` "Keys"):

- ``<id>.key`` — private key, PEM PKCS#8, unencrypted, mode 0600;
- ``<id>.pub`` — public key, PEM SubjectPublicKeyInfo;
- ``<name>.psk`` — pre-shared fleet key: 32 random bytes, hex, one line, mode 0600.

A key id names a public key without revealing anything secret:
``"ed25519:" | "x25519:"`` + the first 16 hex digits of SHA-256 over the raw 32-byte
public key; a fleet key's id is ``"psk:<name>"``. Private key files that group or
others may read are refused, as ssh does, because a leaked device key decrypts every
package made for that device.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent import boundedjson
from agent.durable import atomic_replace, fsync_dir, write_all
from agent.errors import KeyFileError, SignatureError

logger = logging.getLogger(__name__)

KINDS = ("signing", "device", "fleet")
PSK_SIZE = 32
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_SIGNATURES = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

PrivateKey = Ed25519PrivateKey | X25519PrivateKey
PublicKey = Ed25519PublicKey | X25519PublicKey


@dataclass(frozen=True)
class KeyPaths:
    """What ``generate_key`` wrote. ``public`` is None for a fleet PSK."""

    kind: str
    key_id: str
    private: Path
    public: Path | None


def key_id(pub: PublicKey) -> str:
    """Stable public id: ``<type>:`` + 16 hex digits of SHA-256(raw public key)."""
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    prefix = "ed25519" if isinstance(pub, Ed25519PublicKey) else "x25519"
    return f"{prefix}:{hashlib.sha256(raw).hexdigest()[:16]}"


def psk_key_id(name: str) -> str:
    """Key id of the fleet key called ``name``."""
    return f"psk:{name}"


def _write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Create ``path`` with mode 0600 from the start (never briefly world-readable).

    With ``overwrite`` the key is written beside ``path`` and renamed over it, so an
    existing key is replaced whole or not at all.
    """
    target = path.with_name(f".{path.name}.{os.getpid()}.new") if overwrite else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"{path} already exists; not overwriting a key (use --force)", code="key-exists"
        ) from exc
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if overwrite:
        atomic_replace(target, path)
    else:
        fsync_dir(path.parent)


def generate_key(
    kind: str, out_dir: Path, name: str | None = None, *, overwrite: bool = False
) -> KeyPaths:
    """Create a new key of ``kind`` (signing, device or fleet) in ``out_dir``.

    Args:
        kind: ``signing`` (Ed25519, signs manifests), ``device`` (X25519, receives
            wrapped data keys) or ``fleet`` (a named 32-byte pre-shared key).
        out_dir: created if missing.
        name: required for ``fleet`` (file ``<name>.psk``); ignored otherwise.
        overwrite: replace an existing fleet key of that name (``--force``).
    """
    if kind not in KINDS:
        raise KeyFileError(f"unknown key kind {kind!r} (use {', '.join(KINDS)})", code="key-kind")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "fleet":
        if not name or not _NAME_RE.match(name):
            raise KeyFileError(
                "a fleet key needs --name of letters, digits, '.', '_' or '-' (max 64)",
                code="key-name",
            )
        path = out_dir / f"{name}.psk"
        _write_private(
            path, os.urandom(PSK_SIZE).hex().encode("ascii") + b"\n", overwrite=overwrite
        )
        logger.info("wrote fleet key %s", psk_key_id(name))
        return KeyPaths(kind, psk_key_id(name), path, None)
    priv: PrivateKey = (
        Ed25519PrivateKey.generate() if kind == "signing" else X25519PrivateKey.generate()
    )
    pub = priv.public_key()
    kid = key_id(pub)
    stem = kid.replace(":", "-")  # ':' is awkward in file names on some systems
    key_path, pub_path = out_dir / f"{stem}.key", out_dir / f"{stem}.pub"
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, pem)
    pub_pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub_pem)
    logger.info("wrote %s key %s", kind, kid)
    return KeyPaths(kind, kid, key_path, pub_path)


def _read_key_file(path: Path, private: bool) -> bytes:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist", code="key-missing") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}", code="key-read") from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file", code="key-read")
    if private and st.st_mode & 0o077:
        raise KeyFileError(
            f"private key file {path} is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
            code="key-permissions",
        )
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is too large to be a key", code="key-malformed")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}", code="key-read") from exc


def load_private(path: Path) -> PrivateKey:
    """Load an Ed25519 or X25519 private key (PEM PKCS#8) after checking its mode."""
    data = _read_key_file(path, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # Never include the file contents: they are a secret.
        raise KeyFileError(
            f"{path} is not an unencrypted PEM PKCS#8 private key", code="key-malformed"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey | X25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 or X25519 key", code="key-type")
    return key


def load_public(path: Path) -> PublicKey:
    """Load an Ed25519 or X25519 public key (PEM SubjectPublicKeyInfo)."""
    data = _read_key_file(path, private=False)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key", code="key-malformed") from exc
    if not isinstance(key, Ed25519PublicKey | X25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 or X25519 key", code="key-type")
    return key


def load_psk(path: Path) -> tuple[str, bytes]:
    """Load a fleet key file; returns ``(key_id, secret)``."""
    path = Path(path)
    data = _read_key_file(path, private=True)
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a hex-encoded fleet key", code="key-malformed") from exc
    if len(secret) != PSK_SIZE:
        raise KeyFileError(f"{path} must hold {PSK_SIZE} bytes", code="key-malformed")
    return psk_key_id(path.stem), secret


def _expand(paths: Iterable[Path], suffixes: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix in suffixes and q.is_file()))
        else:
            out.append(p)
    return out


# --- signatures -----------------------------------------------------------------------


def sign(data: bytes, signing_key: Ed25519PrivateKey) -> dict[str, str]:
    """Ed25519-sign ``data``; returns ``{"key_id", "alg": "ed25519", "sig": b64}``."""
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise KeyFileError("a signing key must be Ed25519", code="key-type")
    sig = signing_key.sign(data)
    return {
        "key_id": key_id(signing_key.public_key()),
        "alg": "ed25519",
        "sig": base64.b64encode(sig).decode("ascii"),
    }


def encode_signatures(entries: Iterable[Mapping[str, str]]) -> bytes:
    """The ``manifest.sig`` document: ``{"format": 1, "signatures": [entry, ...]}``."""
    doc = {"format": 1, "signatures": [dict(e) for e in entries]}
    return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _parse_signatures(signature: bytes | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if isinstance(signature, Mapping):
        return [signature]
    if len(signature) > MAX_KEY_FILE_BYTES:
        raise SignatureError("signature document too large", code="signature-malformed")
    doc = boundedjson.loads(
        signature,
        what="signature document",
        error=SignatureError,
        code="signature-malformed",
        max_bytes=MAX_KEY_FILE_BYTES,
    )
    if not isinstance(doc, dict) or set(doc) != {"format", "signatures"} or doc["format"] != 1:
        raise SignatureError(
            'signature document must be {"format": 1, "signatures": [...]}',
            code="signature-malformed",
        )
    entries = doc["signatures"]
    if not isinstance(entries, list) or not entries or len(entries) > MAX_SIGNATURES:
        raise SignatureError(
            f"signature document needs 1..{MAX_SIGNATURES} entries in 'signatures'",
            code="signature-malformed",
        )
    for e in entries:
        if not isinstance(e, dict) or set(e) != {"key_id", "alg", "sig"}:
            raise SignatureError(
                "signature entry must have exactly key_id, alg and sig",
                code="signature-malformed",
            )
    return entries


@dataclass
class TrustStore:
    """Trusted publisher public keys by key id. Pure: verification never touches disk."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> TrustStore:
        """Load ``*.pub`` files, or every ``*.pub`` in the given directories."""
        store = cls()
        for p in _expand(paths, (".pub",)):
            store.add(load_public(p), source=p)
        return store

    def add(self, pub: PublicKey, source: Path | None = None) -> str:
        """Trust ``pub``; returns its key id."""
        if not isinstance(pub, Ed25519PublicKey):
            where = f" ({source})" if source else ""
            raise KeyFileError(f"trusted keys must be Ed25519 signing keys{where}", code="key-type")
        kid = key_id(pub)
        self.keys[kid] = pub
        return kid

    def get(self, kid: str) -> Ed25519PublicKey:
        try:
            return self.keys[kid]
        except KeyError:
            raise SignatureError(f"signer {kid} is not trusted", code="unknown-signer") from None

    def __len__(self) -> int:
        return len(self.keys)

    def verify(self, data: bytes, signature: bytes | Mapping[str, Any]) -> str:
        """Check ``data`` against a ``manifest.sig`` document (or one signature entry).

        Succeeds if any entry by a trusted key verifies; returns that key id.

        Raises:
            SignatureError: ``signature-malformed``, ``unknown-signer`` (no entry is by a
                trusted key; names the signers) or ``bad-signature``.
        """
        entries = _parse_signatures(signature)
        signers: list[str] = []
        bad: str | None = None
        for e in entries:
            kid, alg, sig_b64 = e.get("key_id"), e.get("alg"), e.get("sig")
            if not isinstance(kid, str) or alg != "ed25519" or not isinstance(sig_b64, str):
                raise SignatureError(
                    "signature entry needs key_id, alg 'ed25519' and sig",
                    code="signature-malformed",
                )
            signers.append(kid)
            pub = self.keys.get(kid)
            if pub is None:
                continue
            try:
                sig = base64.b64decode(sig_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise SignatureError("signature is not base64", code="signature-malformed") from exc
            if base64.b64encode(sig).decode("ascii") != sig_b64:  # one encoding per signature
                raise SignatureError(
                    "signature is not canonical base64", code="signature-malformed"
                )
            try:
                pub.verify(sig, data)
            except InvalidSignature:
                bad = kid
                continue
            return kid
        if bad is not None:
            raise SignatureError(f"signature by {bad} does not verify", code="bad-signature")
        trusted = ", ".join(sorted(self.keys)) or "none"
        raise SignatureError(
            f"signed by {', '.join(signers)}, none of which is trusted (trusted: {trusted})",
            code="unknown-signer",
        )


def load_trusted(paths: Iterable[Path]) -> TrustStore:
    """Alias of :meth:`TrustStore.from_paths` (the name INTERFACES.md uses)."""
    return TrustStore.from_paths(paths)


@dataclass(repr=False)
class Keyring:
    """Private keys a publisher or device holds. ``repr`` shows key ids only."""

    signing: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    devices: dict[str, X25519PrivateKey] = field(default_factory=dict)
    psks: dict[str, bytes] = field(default_factory=dict)
    trust: TrustStore = field(default_factory=TrustStore)

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> Keyring:
        """Load ``*.key``, ``*.psk`` and ``*.pub`` files (or directories of them)."""
        ring = cls()
        for p in _expand(paths, (".key", ".psk", ".pub")):
            ring.load(p)
        return ring

    def load(self, path: Path) -> str:
        """Add one key file by its suffix; returns its key id."""
        path = Path(path)
        if path.suffix == ".psk":
            kid, secret = load_psk(path)
            self.psks[kid] = secret
            return kid
        if path.suffix == ".pub":
            pub = load_public(path)
            if isinstance(pub, X25519PublicKey):
                return key_id(pub)  # the public half of a device key: nothing to trust
            return self.trust.add(pub, source=path)
        return self.add(load_private(path))

    def add(self, priv: PrivateKey) -> str:
        kid = key_id(priv.public_key())
        if isinstance(priv, Ed25519PrivateKey):
            self.signing[kid] = priv
        else:
            self.devices[kid] = priv
        return kid

    def add_psk(self, name: str, secret: bytes) -> str:
        kid = psk_key_id(name)
        self.psks[kid] = bytes(secret)
        return kid

    def __repr__(self) -> str:
        return (
            f"Keyring(signing={sorted(self.signing)}, devices={sorted(self.devices)}, "
            f"psks={sorted(self.psks)}, trusted={sorted(self.trust.keys)})"
        )

    __str__ = __repr__


def load_keyring(paths: Iterable[Path]) -> Keyring:
    """Alias of :meth:`Keyring.from_paths` (the daemon's updater calls this name)."""
    return Keyring.from_paths(paths)


__all__ = [
    "KINDS",
    "KeyPaths",
    "Keyring",
    "TrustStore",
    "encode_signatures",
    "generate_key",
    "key_id",
    "load_keyring",
    "load_private",
    "load_psk",
    "load_public",
    "load_trusted",
    "psk_key_id",
    "sign",
]
