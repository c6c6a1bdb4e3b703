"""STREAM chunked AEAD, key wrapping and key envelopes (agent/crypto.py)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import crypto
from agent.errors import CryptoError, EdgewardError, FormatError, IntegrityError, SignatureError
from agent.keys import Keyring, TrustStore, encode_signatures, key_id, sign
from tests.emulation import scaled

CS = 64  # small chunks so every boundary case is cheap
SEALED = CS + crypto.TAG_SIZE
KEY = bytes(range(32))
AAD = b"header-aad"


def _decrypt_in_pieces(sealed: bytes, prefix: bytes, alg: str, piece: int, **kw: object) -> bytes:
    dec = crypto.StreamDecryptor(
        kw.get("key", KEY),  # type: ignore[arg-type]
        alg,
        kw.get("aad", AAD),  # type: ignore[arg-type]
        CS,
        prefix,
    )
    out = [dec.update(sealed[i : i + piece]) for i in range(0, len(sealed), piece)]
    out.append(dec.finalize())
    return b"".join(out)


def _seal(data: bytes, alg: str = "aes-256-gcm") -> tuple[bytes, bytes]:
    return crypto.encrypt_bytes(KEY, data, alg=alg, aad=AAD, chunk_size=CS)


def _chunks(sealed: bytes) -> list[bytes]:
    return [sealed[i : i + SEALED] for i in range(0, len(sealed), SEALED)]


# --- SM4-GCM against the published vector --------------------------------------------


def test_sm4_gcm_matches_rfc8998_a1() -> None:
    """RFC 8998 appendix A.1: the SM4-GCM implementation we rely on is the real one."""
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    iv = bytes.fromhex("00001234567800000000ABCD")
    aad = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
    pt = bytes.fromhex(
        "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
        "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
    )
    ct = bytes.fromhex(
        "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
        "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
    )
    tag = bytes.fromhex("83DE3541E4C2B58177E065A9BF7B62EC")
    aead = crypto._Sm4Gcm(key)
    assert aead.encrypt(iv, pt, aad) == ct + tag
    assert aead.decrypt(iv, ct + tag, aad) == pt
    with pytest.raises(crypto.InvalidTag):
        aead.decrypt(iv, ct + bytes(16), aad)


def test_sm4_key_is_hkdf_of_data_key() -> None:
    """The 16-byte SM4 key is HKDF-SHA256(data key, info "edgeward sm4-gcm key")."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    k16 = HKDF(hashes.SHA256(), 16, None, b"edgeward sm4-gcm key").derive(KEY)
    prefix, sealed = crypto.encrypt_bytes(KEY, b"abc", alg="sm4-gcm", aad=AAD, chunk_size=CS)
    nonce = prefix + b"\x00\x00\x00\x00\x01"
    aad = AAD + (0).to_bytes(8, "big") + b"\x01"
    assert crypto._Sm4Gcm(k16).decrypt(nonce, sealed, aad) == b"abc"


# --- round trips ----------------------------------------------------------------------


SIZES = [0, 1, CS - 1, CS, CS + 1, 2 * CS, 3 * CS + 5]


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_across_chunk_boundaries(alg: str, size: int) -> None:
    data = os.urandom(size)
    prefix, sealed = _seal(data, alg)
    assert len(sealed) == crypto.ciphertext_size(size, CS)
    assert len(sealed) == size + crypto.TAG_SIZE * max(1, -(-size // CS))
    for piece in (1, 7, SEALED - 1, SEALED, SEALED + 1, 1000):
        assert _decrypt_in_pieces(sealed, prefix, alg, piece) == data


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_encryptor_output_independent_of_piece_sizes(alg: str) -> None:
    data = os.urandom(5 * CS + 3)
    prefix, whole = _seal(data, alg)
    for piece in (1, 3, CS - 1, CS, CS + 1, 4 * CS):
        enc = crypto.StreamEncryptor(KEY, alg, AAD, CS, prefix)
        out = [enc.update(data[i : i + piece]) for i in range(0, len(data), piece)]
        out.append(enc.finalize())
        assert b"".join(out) == whole


def test_every_aead_call_is_at_most_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single large update must still be sealed chunk by chunk (AESGCM caps a call)."""
    sizes: list[int] = []
    real = crypto.AESGCM.encrypt

    def spy(self: crypto.AESGCM, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        sizes.append(len(data))
        return real(self, nonce, data, aad)

    monkeypatch.setattr(crypto.AESGCM, "encrypt", spy)
    enc = crypto.StreamEncryptor(KEY, "aes-256-gcm", AAD, CS)
    enc.update(os.urandom(10 * CS + 1))
    enc.finalize()
    assert sizes == [CS] * 10 + [1]


def test_default_chunk_size_stream() -> None:
    data = os.urandom(crypto.DEFAULT_CHUNK_SIZE + 10)
    prefix, sealed = crypto.encrypt_bytes(KEY, data)
    assert len(sealed) == len(data) + 2 * crypto.TAG_SIZE
    assert crypto.decrypt_bytes(KEY, sealed, nonce_prefix=prefix) == data


def test_nonce_prefix_is_random_and_sized() -> None:
    a = crypto.StreamEncryptor(KEY).nonce_prefix
    b = crypto.StreamEncryptor(KEY).nonce_prefix
    assert len(a) == crypto.NONCE_PREFIX_SIZE and a != b


def test_nonce_layout_prefix_counter_lastflag() -> None:
    """Chunk i is sealed under prefix ‖ u32be i ‖ last and AAD ‖ u64be i ‖ last."""
    data = os.urandom(CS + 5)
    prefix, sealed = _seal(data)
    c0, c1 = _chunks(sealed)
    aead = crypto.AESGCM(KEY)
    assert aead.decrypt(prefix + b"\0\0\0\0\0", c0, AAD + bytes(8) + b"\0") == data[:CS]
    last_aad = AAD + (1).to_bytes(8, "big") + b"\x01"
    assert aead.decrypt(prefix + b"\0\0\0\x01\x01", c1, last_aad) == data[CS:]


# --- tampering ------------------------------------------------------------------------


def _tamper_cases() -> list[tuple[str, object, str]]:
    def flip(i: int):  # type: ignore[no-untyped-def]
        def f(s: bytes) -> bytes:
            b = bytearray(s)
            b[i] ^= 0x01
            return bytes(b)

        return f

    def swap(s: bytes) -> bytes:
        c = _chunks(s)
        c[0], c[1] = c[1], c[0]
        return b"".join(c)

    def dup(s: bytes) -> bytes:
        c = _chunks(s)
        return b"".join([c[0], c[0], *c[1:]])

    def drop_last(s: bytes) -> bytes:
        return b"".join(_chunks(s)[:-1])

    def drop_middle(s: bytes) -> bytes:
        c = _chunks(s)
        return b"".join([c[0], *c[2:]])

    return [
        ("flip-first-byte", flip(0), "chunk-auth"),
        ("flip-in-second-chunk", flip(SEALED + 3), "chunk-auth"),
        ("flip-in-tag", flip(SEALED - 1), "chunk-auth"),
        ("flip-in-last-tag", flip(-1), "chunk-auth"),
        ("swap-chunks", swap, "chunk-auth"),
        ("duplicate-chunk", dup, "chunk-auth"),
        ("drop-middle-chunk", drop_middle, "chunk-auth"),
        ("drop-last-chunk", drop_last, "stream-truncated"),
        ("cut-inside-last-chunk", lambda s: s[:-5], "chunk-auth"),
        ("cut-to-nothing", lambda s: b"", "stream-truncated"),
        ("cut-to-less-than-tag", lambda s: s[:10], "stream-truncated"),
        ("append-chunk", lambda s: s + _chunks(s)[0], "chunk-auth"),
        # A partial last chunk merged with appended bytes is just a bad chunk; only
        # after a full last chunk can extension be told apart (see the next test).
        ("append-bytes", lambda s: s + b"x", "chunk-auth"),
    ]


@pytest.mark.parametrize(
    ("name", "mutate", "code"), _tamper_cases(), ids=[c[0] for c in _tamper_cases()]
)
@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_tampering_is_detected(alg: str, name: str, mutate: object, code: str) -> None:
    data = os.urandom(3 * CS + 7)
    prefix, sealed = _seal(data, alg)
    bad = mutate(sealed)  # type: ignore[operator]
    assert bad != sealed
    for piece in (5, len(bad) or 1):
        with pytest.raises(IntegrityError) as ei:
            _decrypt_in_pieces(bad, prefix, alg, piece)
        assert ei.value.code == code, name


@pytest.mark.parametrize("extra", [b"x", b"y" * SEALED, b"z" * (SEALED + 3)])
def test_extension_after_full_last_chunk(extra: bytes) -> None:
    data = os.urandom(2 * CS)
    prefix, sealed = _seal(data)
    for piece in (1, 11, 10_000):
        with pytest.raises(IntegrityError) as ei:
            _decrypt_in_pieces(sealed + extra, prefix, "aes-256-gcm", piece)
        assert ei.value.code == "stream-trailing"


def test_truncation_exactly_at_full_last_chunk_boundary() -> None:
    """Data of exactly k chunks: dropping the final full chunk is a truncation."""
    data = os.urandom(3 * CS)
    prefix, sealed = _seal(data)
    with pytest.raises(IntegrityError) as ei:
        _decrypt_in_pieces(sealed[:-SEALED], prefix, "aes-256-gcm", 9)
    assert ei.value.code == "stream-truncated"


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"aad": AAD + b"x"}, "aad"),
        ({"aad": b""}, "empty aad"),
        ({"key": bytes(32)}, "key"),
    ],
)
def test_wrong_aad_or_key_fails(kw: dict[str, object], what: str) -> None:
    prefix, sealed = _seal(os.urandom(2 * CS))
    with pytest.raises(IntegrityError) as ei:
        _decrypt_in_pieces(sealed, prefix, "aes-256-gcm", 13, **kw)
    assert ei.value.code == "chunk-auth", what


def test_wrong_nonce_prefix_and_wrong_alg_fail() -> None:
    prefix, sealed = _seal(os.urandom(CS))
    other = bytes(b ^ 1 for b in prefix)
    with pytest.raises(IntegrityError):
        _decrypt_in_pieces(sealed, other, "aes-256-gcm", 100)
    with pytest.raises(IntegrityError):
        _decrypt_in_pieces(sealed, prefix, "chacha20-poly1305", 100)


def test_decryptor_state_errors() -> None:
    prefix, sealed = _seal(b"abc")
    dec = crypto.StreamDecryptor(KEY, "aes-256-gcm", AAD, CS, prefix)
    assert dec.update(sealed) == b""  # last chunk is held until finalize
    assert dec.finalize() == b"abc"
    with pytest.raises(IntegrityError) as ei:
        dec.update(b"more")
    assert ei.value.code == "stream-trailing"
    enc = crypto.StreamEncryptor(KEY)
    enc.finalize()
    with pytest.raises(CryptoError):
        enc.update(b"x")


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"alg": "aes-128-cbc"}, "alg-unsupported"),
        ({"chunk_size": 0}, "chunk-size"),
        ({"chunk_size": crypto.MAX_CHUNK_SIZE + 1}, "chunk-size"),
        ({"key": b"short"}, "key-size"),
        ({"nonce_prefix": b"123"}, "nonce"),
    ],
)
def test_bad_parameters(kwargs: dict[str, object], code: str) -> None:
    args: dict[str, object] = {"key": KEY, "alg": "aes-256-gcm", "aad": b"", "chunk_size": CS}
    args.update(kwargs)
    with pytest.raises(CryptoError) as ei:
        crypto.StreamEncryptor(**args)  # type: ignore[arg-type]
    assert ei.value.code == code
    assert KEY.hex() not in str(ei.value)


# --- key wrapping ---------------------------------------------------------------------


CONTEXT = b'{"name":"m","version":3}'


def _device() -> tuple[X25519PrivateKey, str]:
    priv = X25519PrivateKey.generate()
    return priv, key_id(priv.public_key())


def test_wrap_unwrap_device_key() -> None:
    priv, kid = _device()
    dk = crypto.new_data_key()
    entry = crypto.wrap_for_device(dk, priv.public_key(), kid, CONTEXT)
    assert set(entry) == {"type", "key_id", "ephemeral", "nonce", "wrapped"}
    assert entry["type"] == "x25519" and entry["key_id"] == kid
    json.dumps(entry)  # JSON-able
    ring = Keyring()
    ring.add(priv)
    assert crypto.unwrap(entry, ring, CONTEXT) == dk
    # a second wrap of the same key uses a fresh ephemeral key
    again = crypto.wrap_for_device(dk, priv.public_key(), kid, CONTEXT)
    assert again["ephemeral"] != entry["ephemeral"]


def test_wrap_unwrap_psk() -> None:
    psk = os.urandom(32)
    dk = crypto.new_data_key()
    entry = crypto.wrap_with_psk(dk, psk, "psk:fleet-a", CONTEXT)
    assert entry["type"] == "psk"
    ring = Keyring()
    ring.add_psk("fleet-a", psk)
    assert crypto.unwrap(entry, ring, CONTEXT) == dk


def test_unwrap_without_the_key_names_the_recipients() -> None:
    priv, kid = _device()
    other, _ = _device()
    entry = crypto.wrap_for_device(crypto.new_data_key(), priv.public_key(), kid, CONTEXT)
    ring = Keyring()
    ring.add(other)
    with pytest.raises(CryptoError) as ei:
        crypto.unwrap(entry, ring, CONTEXT)
    assert ei.value.code == "no-recipient-key"
    assert kid in ei.value.message
    with pytest.raises(CryptoError) as ei:
        crypto.unwrap_any([entry], ring, CONTEXT)
    assert ei.value.code == "no-recipient-key" and kid in ei.value.message


def test_unwrap_with_wrong_secret_or_moved_entry_fails() -> None:
    psk = os.urandom(32)
    dk = crypto.new_data_key()
    entry = crypto.wrap_with_psk(dk, psk, "psk:f", CONTEXT)
    wrong = Keyring()
    wrong.add_psk("f", os.urandom(32))
    with pytest.raises(CryptoError) as ei:
        crypto.unwrap(entry, wrong, CONTEXT)
    assert ei.value.code == "unwrap-failed"
    assert psk.hex() not in str(ei.value) and dk.hex() not in str(ei.value)
    right = Keyring()
    right.add_psk("f", psk)
    with pytest.raises(CryptoError) as ei:  # the entry cannot move to another package
        crypto.unwrap(entry, right, CONTEXT + b"x")
    assert ei.value.code == "unwrap-failed"
    priv, kid = _device()
    dev_entry = crypto.wrap_for_device(dk, priv.public_key(), kid, CONTEXT)
    ring = Keyring()
    ring.add(priv)
    with pytest.raises(CryptoError) as ei:
        crypto.unwrap(dev_entry, ring, b"other package")
    assert ei.value.code == "unwrap-failed"
    tampered = dict(dev_entry)
    eph = bytearray(base64.b64decode(dev_entry["ephemeral"]))
    eph[0] ^= 1
    tampered["ephemeral"] = base64.b64encode(bytes(eph)).decode()
    with pytest.raises(CryptoError) as ei:
        crypto.unwrap(tampered, ring, CONTEXT)
    assert ei.value.code == "unwrap-failed"


def test_unwrap_any_picks_the_held_key() -> None:
    a, a_id = _device()
    b, b_id = _device()
    dk = crypto.new_data_key()
    entries = [
        crypto.wrap_for_device(dk, a.public_key(), a_id, CONTEXT),
        crypto.wrap_with_psk(dk, os.urandom(32), "psk:x", CONTEXT),
        crypto.wrap_for_device(dk, b.public_key(), b_id, CONTEXT),
    ]
    ring = Keyring()
    ring.add(b)
    assert crypto.unwrap_any(entries, ring, CONTEXT) == dk


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: {**e, "type": "rsa"},
        lambda e: {k: v for k, v in e.items() if k != "nonce"},
        lambda e: {**e, "wrapped": "not base64!"},
        lambda e: {**e, "nonce": base64.b64encode(b"123").decode()},
        lambda e: {**e, "key_id": 5},
        lambda e: [e],
    ],
)
def test_malformed_recipient_entries(mutate: object) -> None:
    priv, kid = _device()
    entry = crypto.wrap_for_device(crypto.new_data_key(), priv.public_key(), kid, CONTEXT)
    ring = Keyring()
    ring.add(priv)
    with pytest.raises(CryptoError) as ei:
        crypto.unwrap(mutate(entry), ring, CONTEXT)  # type: ignore[operator]
    assert ei.value.code == "recipient-malformed"


def test_low_order_recipient_point_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    zero = X25519PublicKey.from_public_bytes(bytes(32))
    with pytest.raises(CryptoError) as ei:
        crypto.wrap_for_device(crypto.new_data_key(), zero, "x25519:0", CONTEXT)
    assert ei.value.code == "bad-key"


# --- envelopes ------------------------------------------------------------------------


def _envelope_setup() -> tuple[Ed25519PrivateKey, TrustStore, list[dict[str, str]], bytes]:
    signer = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(signer.public_key())
    priv, kid = _device()
    dk = crypto.new_data_key()
    entries = [crypto.wrap_for_device(dk, priv.public_key(), kid, CONTEXT)]
    return signer, trust, entries, dk


def test_envelope_round_trip_adds_a_recipient() -> None:
    signer, trust, entries, _ = _envelope_setup()
    env = crypto.make_envelope(entries, "pkg-m-3", signer)
    assert crypto.read_envelope(env, trust) == entries
    assert crypto.read_envelope(env, trust, package_id="pkg-m-3") == entries
    with pytest.raises(CryptoError) as ei:
        crypto.read_envelope(env, trust, package_id="pkg-m-4")
    assert ei.value.code == "envelope-package"


def test_envelope_untrusted_or_tampered() -> None:
    signer, trust, entries, _ = _envelope_setup()
    env = crypto.make_envelope(entries, "p", signer)
    with pytest.raises(SignatureError) as ei:
        crypto.read_envelope(env, TrustStore())
    assert ei.value.code == "unknown-signer"
    doc = json.loads(env)
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["package"] = "other"
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(SignatureError) as ei:
        crypto.read_envelope(json.dumps(doc).encode(), trust)
    assert ei.value.code == "bad-signature"


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"{}", b'{"payload": 1, "signatures": []}', b"x" * (2 << 20)]
)
def test_envelope_malformed(data: bytes) -> None:
    _, trust, _, _ = _envelope_setup()
    with pytest.raises(EdgewardError) as ei:
        crypto.read_envelope(data, trust)
    assert isinstance(ei.value, FormatError | SignatureError)


def test_envelope_signature_is_not_a_manifest_signature() -> None:
    """Domain separation: the envelope's signature does not verify its bare payload."""
    signer, trust, entries, _ = _envelope_setup()
    doc = json.loads(crypto.make_envelope(entries, "p", signer))
    payload = base64.b64decode(doc["payload"])
    with pytest.raises(SignatureError) as ei:
        trust.verify(payload, encode_signatures(doc["signatures"]))
    assert ei.value.code == "bad-signature"
    # and a manifest-style signature over the payload is not accepted as an envelope
    doc["signatures"] = [sign(payload, signer)]
    with pytest.raises(SignatureError):
        crypto.read_envelope(json.dumps(doc).encode(), trust)


def test_no_secret_in_keyring_repr(tmp_path: Path) -> None:
    priv, _ = _device()
    ring = Keyring()
    ring.add(priv)
    ring.add_psk("f", b"\xaa" * 32)
    text = repr(ring) + str(ring)
    assert "aa" * 16 not in text and "psk:f" in text


def test_package_context_is_canonical_and_distinct() -> None:
    ctx = crypto.package_context("det", 3, "aes-256-gcm", 1 << 20)
    assert ctx == (
        b'edgeward package context v1\n{"alg":"aes-256-gcm","chunk_size":1048576,'
        b'"name":"det","version":3}'
    )
    others = {
        crypto.package_context("det", 4, "aes-256-gcm", 1 << 20),
        crypto.package_context("det2", 3, "aes-256-gcm", 1 << 20),
        crypto.package_context("det", 3, "sm4-gcm", 1 << 20),
        crypto.package_context("det", 3, "aes-256-gcm", 1 << 19),
    }
    assert ctx not in others and len(others) == 4
    psk = os.urandom(32)
    entry = crypto.wrap_with_psk(KEY, psk, "psk:f", ctx)
    ring = Keyring()
    ring.add_psk("f", psk)
    for other in others:
        with pytest.raises(CryptoError):
            crypto.unwrap(entry, ring, other)
    assert crypto.unwrap(entry, ring, ctx) == KEY


@settings(max_examples=300, deadline=scaled(2000))
@given(st.binary(max_size=600))
def test_envelope_parser_arbitrary_bytes(data: bytes) -> None:
    _, trust, _, _ = _ENV
    with pytest.raises(EdgewardError):
        crypto.read_envelope(data, trust)


@settings(max_examples=200, deadline=scaled(2000))
@given(
    st.dictionaries(
        st.sampled_from(["type", "key_id", "ephemeral", "nonce", "wrapped", "salt"]),
        st.none()
        | st.integers()
        | st.text(max_size=60)
        | st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()),
    )
)
def test_unwrap_arbitrary_entries(entry: dict[str, object]) -> None:
    ring = Keyring()
    ring.add_psk("x", bytes(32))
    with pytest.raises(CryptoError):
        crypto.unwrap(entry, ring, CONTEXT)
    with pytest.raises(CryptoError):
        crypto.unwrap_any([entry], ring, CONTEXT)


_ENV = _envelope_setup()


def test_no_secrets_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from agent.keys import generate_key, load_private, load_psk

    caplog.set_level(logging.DEBUG)
    dev = generate_key("device", tmp_path)
    fleet = generate_key("fleet", tmp_path, name="f")
    priv = load_private(dev.private)
    assert isinstance(priv, X25519PrivateKey)
    _, psk = load_psk(fleet.private)
    dk = crypto.new_data_key()
    ring = Keyring.from_paths([tmp_path])
    for entry in (
        crypto.wrap_for_device(dk, priv.public_key(), dev.key_id, CONTEXT),
        crypto.wrap_with_psk(dk, psk, fleet.key_id, CONTEXT),
    ):
        assert crypto.unwrap_any([entry], ring, CONTEXT) == dk
    from cryptography.hazmat.primitives import serialization

    raw_priv = priv.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    secrets = [dk, psk, raw_priv]
    text = caplog.text + repr(ring)
    assert caplog.records  # something was logged, so the check below means something
    for secret in secrets:
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text


# --- OpenSSL without SM4-GCM ------------------------------------------------------------


def _no_sm4_gcm(monkeypatch: pytest.MonkeyPatch) -> None:
    """What OpenSSL 1.1.1 answers for SM4 in GCM mode (``cryptography`` raises this)."""

    def missing(self: object, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        raise crypto.UnsupportedAlgorithm("no SM4-GCM")

    monkeypatch.setattr(crypto._Sm4Gcm, "encrypt", missing)


def test_sm4_refused_when_openssl_lacks_gcm(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pure-Python fallback: both directions refuse with alg-unsupported, one line."""
    data = os.urandom(2 * CS + 1)
    prefix, sealed = _seal(data, "sm4-gcm")
    aes_prefix, aes_sealed = _seal(data)
    _no_sm4_gcm(monkeypatch)
    with pytest.raises(CryptoError) as ei:
        crypto.StreamEncryptor(KEY, "sm4-gcm", AAD, CS, prefix)
    assert ei.value.code == "alg-unsupported"
    assert ei.value.message == "sm4-gcm is not available in this OpenSSL build"
    with pytest.raises(CryptoError) as ei:
        _decrypt_in_pieces(sealed, prefix, "sm4-gcm", 9)
    assert ei.value.code == "alg-unsupported"
    assert not hasattr(crypto, "_Sm4GcmFallback")
    # the other algorithms are unaffected
    assert _decrypt_in_pieces(aes_sealed, aes_prefix, "aes-256-gcm", 9) == data
