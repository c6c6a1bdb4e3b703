"""Key envelopes: the data key of an encrypted package, unwrapped from the signed
manifest's recipients or from detached, signed envelopes (bytes; no disk access), and
new envelopes that give more recipients access to a package without re-signing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent import crypto
from agent.errors import PackageError
from agent.keys import Keyring, TrustStore, key_id
from agent.manifest import Manifest
from agent.package.paths import read_manifest


def data_key(
    manifest: Manifest,
    keyring: Keyring | None,
    trust: TrustStore,
    envelopes: Sequence[bytes] = (),
) -> bytes | None:
    """The package's data key (None when it is not encrypted). ``envelopes`` are the
    bytes of detached key envelopes, each verified against ``trust`` and bound to this
    package before its entries are tried."""
    enc = manifest.encryption
    if enc is None:
        return None
    entries: list[dict[str, Any]] = [dict(r) for r in enc.recipients]
    for data in envelopes:
        entries += crypto.read_envelope(data, trust, package_id=manifest.package_id)
    ctx = crypto.package_context(manifest.name, manifest.version, enc.alg, enc.chunk_size)
    return crypto.unwrap_any(entries, keyring or Keyring(), ctx)


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
