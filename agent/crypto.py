"""Chunked AEAD encryption and data-key wrapping for packages (GB/T 42382.2 §8.2.5).

Model data is encrypted with a random per-package *data key* in fixed-size chunks using
the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): every chunk is
sealed on its own, so a device decrypts a multi-gigabyte model with bounded memory,
and the nonce and the AAD both carry the chunk counter and a last-chunk flag, so a
reordered, duplicated, dropped, truncated or extended chunk sequence fails
authentication instead of decrypting to something else.

Layout of one chunk (``docs/FORMAT.md`` "Encryption")::

    nonce  = nonce_prefix (7 random bytes) ‖ u32be counter ‖ u8 last   (12 bytes)
    aad    = header_aad ‖ u64be counter ‖ u8 last
    sealed = AEAD(key, nonce, plaintext[≤ chunk_size], aad) = ciphertext ‖ tag(16)

The data key is then wrapped once per recipient: for a device key pair with X25519 +
HKDF-SHA256 + AES-256-GCM (an ECIES/HPKE-style "base mode" with an ephemeral sender
key), or for a named pre-shared fleet key with HKDF-SHA256 + AES-256-GCM. The wrap's
AAD is the package identity (``context``), so a wrapped key cannot be moved to another
package. Detached, signed *key envelopes* carry extra recipient entries, so a device
can be added after the package was signed without touching the package.

No function here logs or puts key material into an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent import boundedjson
from agent.errors import CryptoError, FormatError, IntegrityError
from agent.keys import Keyring, TrustStore, sign

logger = logging.getLogger(__name__)

ALGORITHMS = ("aes-256-gcm", "sm4-gcm", "chacha20-poly1305")
DEFAULT_ALG = "aes-256-gcm"
DEFAULT_CHUNK_SIZE = 1 << 20  # plaintext bytes per chunk (1 MiB)
MIN_CHUNK_SIZE = 1  # tests use tiny chunks; packages use DEFAULT_CHUNK_SIZE
MAX_CHUNK_SIZE = 64 << 20  # a device buffers one chunk; AESGCM caps one call at 2^31-1
KEY_SIZE = 32  # data key bytes (SM4 derives its 16-byte key from it, see _sm4_key)
TAG_SIZE = 16
NONCE_SIZE = 12
NONCE_PREFIX_SIZE = 7
MAX_CHUNKS = 1 << 32  # the u32 counter in the nonce must never wrap

SM4_KEY_INFO = b"edgeward sm4-gcm key"
WRAP_INFO = b"edgeward key wrap v1"
PSK_WRAP_INFO = b"edgeward psk wrap v1"
ENVELOPE_SIG_PREFIX = b"edgeward key envelope v1\n"
ENVELOPE_FORMAT = 1
MAX_ENVELOPE_BYTES = 1 << 20
MAX_ENVELOPE_RECIPIENTS = 1024

_Data = bytes | bytearray | memoryview

_B64_FIELDS = {"x25519": ("ephemeral", "nonce", "wrapped"), "psk": ("salt", "nonce", "wrapped")}


# --- AEAD primitives ------------------------------------------------------------------


def check_alg(alg: str) -> str:
    """Return ``alg`` if it is one of :data:`ALGORITHMS`, else raise CryptoError."""
    if alg not in ALGORITHMS:
        raise CryptoError(
            f"unsupported encryption algorithm {alg!r} (supported: {', '.join(ALGORITHMS)})",
            code="alg-unsupported",
        )
    return alg


def check_chunk_size(chunk_size: int) -> int:
    """Validate a chunk size (it arrives from untrusted headers too)."""
    if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise CryptoError(
            f"chunk size {chunk_size!r} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}",
            code="chunk-size",
        )
    return chunk_size


def _sm4_key(key: bytes) -> bytes:
    """SM4 takes a 128-bit key: derive it from the 32-byte data key with HKDF-SHA256.

    Deriving (rather than truncating) keeps the package format's single 32-byte data key
    for every algorithm and keeps the SM4 key independent of any other use of the key.
    """
    return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=SM4_KEY_INFO).derive(key)


class _Sm4Gcm:
    """SM4-GCM with the AESGCM-like interface (``cryptography`` ``Cipher`` API).

    ``cryptography`` (OpenSSL 3) implements SM4 in GCM mode natively; the test suite
    checks it against RFC 8998 appendix A.1. An OpenSSL without it is refused.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: _Data, aad: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        out = enc.update(data) + enc.finalize()
        return out + enc.tag

    def decrypt(self, nonce: bytes, data: _Data, aad: bytes) -> bytes:
        if len(data) < TAG_SIZE:
            raise InvalidTag
        body, tag = data[:-TAG_SIZE], bytes(data[-TAG_SIZE:])
        dec = Cipher(algorithms.SM4(self._key), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(aad)
        return dec.update(body) + dec.finalize()


_Aead = AESGCM | ChaCha20Poly1305 | _Sm4Gcm


def _make_aead(key: bytes, alg: str) -> _Aead:
    check_alg(alg)
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise CryptoError(f"data key must be {KEY_SIZE} bytes", code="key-size")
    try:
        if alg == "aes-256-gcm":
            return AESGCM(bytes(key))
        if alg == "chacha20-poly1305":
            return ChaCha20Poly1305(bytes(key))
        return _sm4_aead(_sm4_key(bytes(key)))
    except UnsupportedAlgorithm as exc:
        raise CryptoError(
            f"{alg} is not available in this OpenSSL build", code="alg-unsupported"
        ) from exc


def _sm4_aead(key16: bytes) -> _Sm4Gcm:
    """SM4-GCM from OpenSSL, probed with one empty seal: an OpenSSL without it raises
    ``UnsupportedAlgorithm``, which :func:`_make_aead` turns into ``alg-unsupported``.
    There is deliberately no pure-Python GCM to fall back on (a table-driven GHASH makes
    secret-dependent memory lookups): such a device is refused SM4 packages, whole."""
    native = _Sm4Gcm(key16)
    native.encrypt(bytes(NONCE_SIZE), b"", b"")
    return native


def new_data_key() -> bytes:
    """A fresh random 32-byte data key (one per package)."""
    return os.urandom(KEY_SIZE)


def ciphertext_size(plaintext_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Bytes the STREAM output has for ``plaintext_size`` input (tags included)."""
    chunks = max(1, -(-plaintext_size // chunk_size))
    return plaintext_size + chunks * TAG_SIZE


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


def _chunk_aad(aad: bytes, counter: int, last: bool) -> bytes:
    return aad + struct.pack(">QB", counter, 1 if last else 0)


class StreamEncryptor:
    """Seal a byte stream into STREAM chunks of ``chunk_size`` plaintext bytes.

    ``update`` returns the sealed chunks that are complete so far; ``finalize`` seals
    the rest as the last chunk (an empty input still yields one empty last chunk, so
    "nothing" is authenticated too). A chunk is sealed only when more data follows it,
    because only then is it known not to be the last one.
    """

    def __init__(
        self,
        key: bytes,
        alg: str = DEFAULT_ALG,
        aad: bytes = b"",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        nonce_prefix: bytes | None = None,
    ) -> None:
        self._aead = _make_aead(key, alg)
        self.alg = alg
        self.chunk_size = check_chunk_size(chunk_size)
        if nonce_prefix is None:
            nonce_prefix = os.urandom(NONCE_PREFIX_SIZE)
        if len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise CryptoError(f"nonce prefix must be {NONCE_PREFIX_SIZE} bytes", code="nonce")
        self.nonce_prefix = bytes(nonce_prefix)
        self._aad = bytes(aad)
        self._buf = bytearray()
        self._counter = 0
        self._done = False
        self.plaintext_bytes = 0

    def _seal(self, data: bytes | bytearray | memoryview, last: bool) -> bytes:
        if self._counter >= MAX_CHUNKS:
            raise CryptoError("stream exceeds 2^32 chunks", code="stream-too-long")
        out = self._aead.encrypt(
            _nonce(self.nonce_prefix, self._counter, last),
            data,
            _chunk_aad(self._aad, self._counter, last),
        )
        self._counter += 1
        return out

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add plaintext; return the chunks that are now known to be non-final."""
        if self._done:
            raise CryptoError("encryptor already finalized", code="stream-state")
        view = memoryview(data).cast("B")
        self.plaintext_bytes += len(view)
        cs = self.chunk_size
        out: list[bytes] = []
        # Top up the pending partial chunk first; seal it only if data remains after it.
        if self._buf:
            need = cs - len(self._buf)
            take = min(need, len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == cs and len(view) > 0:
                out.append(self._seal(self._buf, last=False))
                self._buf = bytearray()
        # Whole chunks straight from the input (no copying through the buffer).
        pos = 0
        while len(view) - pos > cs:
            out.append(self._seal(view[pos : pos + cs], last=False))
            pos += cs
        if not self._buf:
            self._buf = bytearray(view[pos:])
        return b"".join(out)

    def finalize(self) -> bytes:
        """Seal what remains as the last chunk."""
        if self._done:
            raise CryptoError("encryptor already finalized", code="stream-state")
        self._done = True
        out = self._seal(self._buf, last=True)
        self._buf = bytearray()
        return out


class StreamDecryptor:
    """Open STREAM chunks fed in pieces of any size.

    Plaintext of a chunk is released only after that chunk authenticated; the caller
    must still discard everything if ``update`` or ``finalize`` later raises (the package
    reader writes into a temporary directory for this reason). Memory is bounded by
    one sealed chunk plus the piece being fed.
    """

    def __init__(
        self,
        key: bytes,
        alg: str,
        aad: bytes,
        chunk_size: int,
        nonce_prefix: bytes,
    ) -> None:
        self._aead = _make_aead(key, alg)
        self.alg = alg
        self.chunk_size = check_chunk_size(chunk_size)
        if len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise CryptoError(f"nonce prefix must be {NONCE_PREFIX_SIZE} bytes", code="nonce")
        self.nonce_prefix = bytes(nonce_prefix)
        self._aad = bytes(aad)
        self._sealed = chunk_size + TAG_SIZE
        self._buf = bytearray()
        self._counter = 0
        self._done = False

    def _try_open(self, data: _Data, last: bool) -> bytes | None:
        try:
            return self._aead.decrypt(
                _nonce(self.nonce_prefix, self._counter, last),
                data,
                _chunk_aad(self._aad, self._counter, last),
            )
        except InvalidTag:
            return None

    def _open(self, data: _Data, last: bool) -> bytes:
        if self._counter >= MAX_CHUNKS:
            raise IntegrityError("encrypted stream exceeds 2^32 chunks", code="stream-trailing")
        plain = self._try_open(data, last)
        if plain is None:
            # Tell the failures apart: a non-final chunk that opens as final means data
            # was appended after the real end; a final chunk that opens as non-final
            # means the real end was cut off.
            if self._try_open(data, not last) is not None:
                if last:
                    raise IntegrityError(
                        f"encrypted stream truncated after chunk {self._counter}",
                        code="stream-truncated",
                    )
                raise IntegrityError(
                    f"data after the final encrypted chunk {self._counter}",
                    code="stream-trailing",
                )
            raise IntegrityError(
                f"encrypted chunk {self._counter} failed authentication", code="chunk-auth"
            )
        self._counter += 1
        return plain

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed ciphertext; return the plaintext of the chunks that authenticated."""
        if self._done:
            raise IntegrityError("data after the final encrypted chunk", code="stream-trailing")
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        n = self._sealed
        if self._buf:
            take = min(n - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == n and len(view) > 0:
                out.append(self._open(self._buf, last=False))
                self._buf = bytearray()
        pos = 0
        while len(view) - pos > n:
            out.append(self._open(view[pos : pos + n], last=False))
            pos += n
        if not self._buf:
            self._buf = bytearray(view[pos:])
        return b"".join(out)

    def finalize(self) -> bytes:
        """Open the last chunk; raises if the stream ended early."""
        if self._done:
            raise IntegrityError("decryptor already finalized", code="stream-state")
        self._done = True
        if len(self._buf) < TAG_SIZE:
            raise IntegrityError(
                f"encrypted stream truncated in chunk {self._counter}", code="stream-truncated"
            )
        out = self._open(self._buf, last=True)
        self._buf = bytearray()
        return out


def encrypt_bytes(
    key: bytes,
    data: bytes,
    *,
    alg: str = DEFAULT_ALG,
    aad: bytes = b"",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    nonce_prefix: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Encrypt a whole buffer; returns ``(nonce_prefix, sealed chunks)``. For small data."""
    enc = StreamEncryptor(key, alg, aad, chunk_size, nonce_prefix)
    return enc.nonce_prefix, enc.update(data) + enc.finalize()


def decrypt_bytes(
    key: bytes,
    sealed: bytes,
    *,
    nonce_prefix: bytes,
    alg: str = DEFAULT_ALG,
    aad: bytes = b"",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """Inverse of :func:`encrypt_bytes`."""
    dec = StreamDecryptor(key, alg, aad, chunk_size, nonce_prefix)
    return dec.update(sealed) + dec.finalize()


# --- key wrapping ---------------------------------------------------------------------


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(entry: Mapping[str, Any], field: str, size: int | None) -> bytes:
    value = entry.get(field)
    if not isinstance(value, str):
        raise CryptoError(f"recipient entry lacks field {field!r}", code="recipient-malformed")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CryptoError(
            f"recipient entry field {field!r} is not base64", code="recipient-malformed"
        ) from exc
    if size is not None and len(raw) != size:
        raise CryptoError(
            f"recipient entry field {field!r} has {len(raw)} bytes, expected {size}",
            code="recipient-malformed",
        )
    return raw


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def _raw_x25519(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


CONTEXT_PREFIX = b"edgeward package context v1\n"


def package_context(name: str, version: int | str, alg: str, chunk_size: int) -> bytes:
    """The ``context`` that binds wrapped keys to one package.

    ``b"edgeward package context v1\\n"`` followed by canonical JSON (sorted keys, no
    spaces, UTF-8) of ``{"alg", "chunk_size", "name", "version"}``. Unwrapping with a
    different package's context fails, so a recipient entry or key envelope cannot be
    replayed onto another package or version, nor onto other encryption parameters.
    """
    doc = {"alg": check_alg(alg), "chunk_size": chunk_size, "name": name, "version": version}
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return CONTEXT_PREFIX + canon.encode("utf-8")


def wrap_for_device(
    data_key: bytes, recipient: X25519PublicKey, key_id: str, context: bytes
) -> dict[str, str]:
    """Wrap ``data_key`` for one device key pair.

    X25519 between a fresh ephemeral key and the device's public key; HKDF-SHA256 with
    salt = ephemeral ‖ recipient public key and info = "edgeward key wrap v1" ‖ context;
    AES-256-GCM over the data key with AAD = context. The ephemeral private key is
    dropped at once, so only the device can unwrap.
    """
    if len(data_key) != KEY_SIZE:
        raise CryptoError(f"data key must be {KEY_SIZE} bytes", code="key-size")
    eph = X25519PrivateKey.generate()
    eph_pub = _raw_x25519(eph.public_key())
    try:
        shared = eph.exchange(recipient)
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise CryptoError(
            f"device key {key_id} is not a usable X25519 key", code="bad-key"
        ) from exc
    kek = _hkdf(shared, eph_pub + _raw_x25519(recipient), WRAP_INFO + context)
    nonce = os.urandom(NONCE_SIZE)
    wrapped = AESGCM(kek).encrypt(nonce, bytes(data_key), context)
    return {
        "type": "x25519",
        "key_id": key_id,
        "ephemeral": _b64e(eph_pub),
        "nonce": _b64e(nonce),
        "wrapped": _b64e(wrapped),
    }


def wrap_with_psk(data_key: bytes, psk: bytes, key_id: str, context: bytes) -> dict[str, str]:
    """Wrap ``data_key`` under a named pre-shared fleet key.

    HKDF-SHA256 (fresh 16-byte random salt, info = "edgeward psk wrap v1" ‖ context)
    turns the PSK into a one-off key-encryption key; AES-256-GCM with AAD = context.
    """
    if len(data_key) != KEY_SIZE:
        raise CryptoError(f"data key must be {KEY_SIZE} bytes", code="key-size")
    if len(psk) < 16:
        raise CryptoError(f"fleet key {key_id} is shorter than 16 bytes", code="bad-key")
    salt = os.urandom(16)
    kek = _hkdf(psk, salt, PSK_WRAP_INFO + context)
    nonce = os.urandom(NONCE_SIZE)
    wrapped = AESGCM(kek).encrypt(nonce, bytes(data_key), context)
    return {
        "type": "psk",
        "key_id": key_id,
        "salt": _b64e(salt),
        "nonce": _b64e(nonce),
        "wrapped": _b64e(wrapped),
    }


def _entry_type(entry: Mapping[str, Any]) -> tuple[str, str]:
    if not isinstance(entry, Mapping):
        raise CryptoError("recipient entry is not an object", code="recipient-malformed")
    kind, kid = entry.get("type"), entry.get("key_id")
    if kind not in _B64_FIELDS or not isinstance(kid, str) or not kid:
        raise CryptoError(
            "recipient entry needs type 'x25519' or 'psk' and a key_id",
            code="recipient-malformed",
        )
    return str(kind), kid


def unwrap(entry: Mapping[str, Any], keyring: Keyring, context: bytes) -> bytes:
    """Recover the data key from one recipient entry with a key from ``keyring``.

    Raises:
        CryptoError: ``no-recipient-key`` if the keyring lacks the entry's key,
            ``unwrap-failed`` if the key is wrong or the entry/context was altered,
            ``recipient-malformed`` for a structurally bad entry.
    """
    kind, kid = _entry_type(entry)
    nonce = _b64d(entry, "nonce", NONCE_SIZE)
    wrapped = _b64d(entry, "wrapped", KEY_SIZE + TAG_SIZE)
    if kind == "x25519":
        eph_pub = _b64d(entry, "ephemeral", 32)
        priv = keyring.devices.get(kid)
        if priv is None:
            raise CryptoError(
                f"no device key for recipient {kid}; keyring has {_ids(keyring.devices)}",
                code="no-recipient-key",
            )
        try:
            shared = priv.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        except ValueError as exc:
            raise CryptoError(f"unwrapping for {kid} failed", code="unwrap-failed") from exc
        kek = _hkdf(shared, eph_pub + _raw_x25519(priv.public_key()), WRAP_INFO + context)
    else:
        salt = _b64d(entry, "salt", 16)
        psk = keyring.psks.get(kid)
        if psk is None:
            raise CryptoError(
                f"no fleet key for recipient {kid}; keyring has {_ids(keyring.psks)}",
                code="no-recipient-key",
            )
        kek = _hkdf(psk, salt, PSK_WRAP_INFO + context)
    try:
        data_key = AESGCM(kek).decrypt(nonce, wrapped, context)
    except InvalidTag as exc:
        raise CryptoError(
            f"unwrapping the data key for {kid} failed (wrong key, or the entry belongs "
            "to another package)",
            code="unwrap-failed",
        ) from exc
    logger.debug("unwrapped the data key with %s", kid)
    return data_key


def _ids(keys: Mapping[str, object]) -> str:
    return ", ".join(sorted(keys)) or "none"


def unwrap_any(entries: Sequence[Mapping[str, Any]], keyring: Keyring, context: bytes) -> bytes:
    """Unwrap the data key from the first entry whose key the keyring holds.

    Raises:
        CryptoError: ``no-recipient-key`` naming the key ids the package is encrypted
            for, or ``unwrap-failed`` if every held key failed.
    """
    wanted: list[str] = []
    failure: CryptoError | None = None
    for entry in entries:
        kind, kid = _entry_type(entry)
        wanted.append(kid)
        held = keyring.devices if kind == "x25519" else keyring.psks
        if kid not in held:
            continue
        try:
            return unwrap(entry, keyring, context)
        except CryptoError as exc:
            if exc.code != "unwrap-failed":
                raise
            failure = exc
    if failure is not None:
        raise failure
    raise CryptoError(
        f"package is encrypted for {', '.join(wanted) or 'nobody'}; none of these keys is "
        "available (pass --device-key)",
        code="no-recipient-key",
    )


# --- detached key envelopes -----------------------------------------------------------


def make_envelope(
    entries: Iterable[Mapping[str, Any]], package_id: str, signing_key: Ed25519PrivateKey
) -> bytes:
    """Build a signed key envelope adding recipients to an already signed package.

    File format (JSON): ``{"payload": b64(P), "signatures": [{key_id, alg, sig}]}``
    where P is the canonical JSON ``{"format": 1, "package": package_id,
    "recipients": [...]}`` and each signature is Ed25519 over
    ``b"edgeward key envelope v1\\n" ‖ P`` (the prefix keeps an envelope signature from
    ever being valid as a manifest signature and vice versa).
    """
    recipients = [dict(e) for e in entries]
    for e in recipients:
        _entry_type(e)
    payload = json.dumps(
        {"format": ENVELOPE_FORMAT, "package": package_id, "recipients": recipients},
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")
    sig = sign(ENVELOPE_SIG_PREFIX + payload, signing_key)
    doc = {"payload": _b64e(payload), "signatures": [sig]}
    return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def read_envelope(
    data: bytes, trust: TrustStore, *, package_id: str | None = None
) -> list[dict[str, Any]]:
    """Verify a key envelope and return its recipient entries.

    Raises:
        FormatError: ``envelope-malformed`` (not the documented JSON, or too large).
        SignatureError: ``unknown-signer`` / ``bad-signature`` from the trust store.
        CryptoError: ``envelope-package`` if it was made for another package.
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise FormatError("key envelope larger than 1 MiB", code="envelope-malformed")
    doc = boundedjson.loads(
        data,
        what="key envelope",
        error=FormatError,
        code="envelope-malformed",
        max_bytes=MAX_ENVELOPE_BYTES,
    )
    try:
        payload = base64.b64decode(doc["payload"], validate=True)
        sigs = doc["signatures"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(
            "key envelope is not valid JSON of the documented form", code="envelope-malformed"
        ) from exc
    if not isinstance(sigs, list):
        raise FormatError("key envelope 'signatures' is not a list", code="envelope-malformed")
    trust.verify(
        ENVELOPE_SIG_PREFIX + payload, json.dumps({"format": 1, "signatures": sigs}).encode()
    )
    body = boundedjson.loads(
        payload,
        what="key envelope payload",
        error=FormatError,
        code="envelope-malformed",
        max_bytes=MAX_ENVELOPE_BYTES,
    )
    try:
        fmt, pkg, recipients = body["format"], body["package"], body["recipients"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError("key envelope payload is malformed", code="envelope-malformed") from exc
    if fmt != ENVELOPE_FORMAT:
        raise FormatError(f"key envelope format {fmt!r} unsupported", code="envelope-malformed")
    if not isinstance(recipients, list) or len(recipients) > MAX_ENVELOPE_RECIPIENTS:
        raise FormatError("key envelope recipients malformed", code="envelope-malformed")
    if package_id is not None and pkg != package_id:
        raise CryptoError(
            f"key envelope is for package {pkg!r}, not {package_id!r}", code="envelope-package"
        )
    for e in recipients:
        _entry_type(e)
    return [dict(e) for e in recipients]


__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALG",
    "DEFAULT_CHUNK_SIZE",
    "KEY_SIZE",
    "NONCE_PREFIX_SIZE",
    "TAG_SIZE",
    "StreamDecryptor",
    "StreamEncryptor",
    "check_alg",
    "check_chunk_size",
    "ciphertext_size",
    "decrypt_bytes",
    "encrypt_bytes",
    "make_envelope",
    "new_data_key",
    "package_context",
    "read_envelope",
    "unwrap",
    "unwrap_any",
    "wrap_for_device",
    "wrap_with_psk",
]
