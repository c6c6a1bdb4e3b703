"""Key files, key ids, trust store, keyring and ``edgeward keygen`` (agent/keys.py)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import keys
from agent.cli import main
from agent.errors import KeyFileError, SignatureError
from tests.emulation import scaled


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize(
    ("kind", "priv_t", "pub_t", "prefix"),
    [
        ("signing", Ed25519PrivateKey, Ed25519PublicKey, "ed25519:"),
        ("device", X25519PrivateKey, X25519PublicKey, "x25519:"),
    ],
)
def test_generate_and_load_key_pair(
    tmp_path: Path, kind: str, priv_t: type, pub_t: type, prefix: str
) -> None:
    kp = keys.generate_key(kind, tmp_path / "k")
    assert kp.public is not None
    assert _mode(kp.private) == 0o600
    assert kp.private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert kp.public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    priv = keys.load_private(kp.private)
    pub = keys.load_public(kp.public)
    assert isinstance(priv, priv_t) and isinstance(pub, pub_t)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert kp.key_id == prefix + hashlib.sha256(raw).hexdigest()[:16]
    assert keys.key_id(priv.public_key()) == kp.key_id
    assert kp.private.stem == kp.key_id.replace(":", "-") == kp.public.stem


def test_generate_fleet_key(tmp_path: Path) -> None:
    kp = keys.generate_key("fleet", tmp_path, name="plant-7")
    assert kp.private == tmp_path / "plant-7.psk" and kp.public is None
    assert kp.key_id == "psk:plant-7"
    assert _mode(kp.private) == 0o600
    lines = kp.private.read_text().splitlines()
    assert len(lines) == 1 and len(bytes.fromhex(lines[0])) == 32
    kid, secret = keys.load_psk(kp.private)
    assert kid == "psk:plant-7" and secret == bytes.fromhex(lines[0])


@pytest.mark.parametrize(
    ("kind", "name", "code"),
    [("fleet", None, "key-name"), ("fleet", "../x", "key-name"), ("rsa", None, "key-kind")],
)
def test_generate_bad_arguments(tmp_path: Path, kind: str, name: str | None, code: str) -> None:
    with pytest.raises(KeyFileError) as ei:
        keys.generate_key(kind, tmp_path, name=name)
    assert ei.value.code == code


def test_never_overwrites_a_key(tmp_path: Path) -> None:
    keys.generate_key("fleet", tmp_path, name="f")
    before = (tmp_path / "f.psk").read_bytes()
    with pytest.raises(KeyFileError) as ei:
        keys.generate_key("fleet", tmp_path, name="f")
    assert ei.value.code == "key-exists"
    assert (tmp_path / "f.psk").read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    kp = keys.generate_key("device", tmp_path)
    psk = keys.generate_key("fleet", tmp_path, name="f")
    for path, loader in ((kp.private, keys.load_private), (psk.private, keys.load_psk)):
        os.chmod(path, mode)
        with pytest.raises(KeyFileError) as ei:
            loader(path)
        assert ei.value.code == "key-permissions"
        assert "chmod 600" in ei.value.message and str(path) in ei.value.message
    with pytest.raises(KeyFileError):
        keys.Keyring.from_paths([tmp_path])
    os.chmod(kp.private, 0o400)  # owner read-only is fine
    keys.load_private(kp.private)


def test_malformed_key_files(tmp_path: Path) -> None:
    kp = keys.generate_key("signing", tmp_path)
    assert kp.public is not None
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError) as ei:
        keys.load_private(bad)
    assert ei.value.code == "key-malformed"
    assert "AAAA" not in ei.value.message
    with pytest.raises(KeyFileError) as ei:
        keys.load_public(kp.private)  # a private key where a public one belongs
    assert ei.value.code == "key-malformed"
    with pytest.raises(KeyFileError) as ei:
        keys.load_private(tmp_path / "missing.key")
    assert ei.value.code == "key-missing"
    psk = tmp_path / "p.psk"
    psk.write_text("zz\n")
    psk.chmod(0o600)
    with pytest.raises(KeyFileError) as ei:
        keys.load_psk(psk)
    assert ei.value.code == "key-malformed"


def test_private_key_content_never_in_errors(tmp_path: Path) -> None:
    kp = keys.generate_key("device", tmp_path)
    secret_pem = kp.private.read_text()
    body = "".join(secret_pem.splitlines()[1:-1])
    # A truncated key file: the message must not echo its contents.
    kp.private.write_text(secret_pem[: len(secret_pem) // 2])
    with pytest.raises(KeyFileError) as ei:
        keys.load_private(kp.private)
    assert body[:20] not in str(ei.value)


# --- signatures and trust -------------------------------------------------------------


def test_trust_store_verify(tmp_path: Path) -> None:
    a = keys.generate_key("signing", tmp_path / "a")
    b = keys.generate_key("signing", tmp_path / "b")
    trust = keys.TrustStore.from_paths([tmp_path / "a"])  # a directory of *.pub
    assert len(trust) == 1 and a.key_id in trust.keys
    key_a = keys.load_private(a.private)
    key_b = keys.load_private(b.private)
    assert isinstance(key_a, Ed25519PrivateKey) and isinstance(key_b, Ed25519PrivateKey)
    data = b'{"manifest": 1}'
    sig_a = keys.sign(data, key_a)
    assert sig_a["key_id"] == a.key_id and sig_a["alg"] == "ed25519"
    assert trust.verify(data, keys.encode_signatures([sig_a])) == a.key_id
    assert trust.verify(data, sig_a) == a.key_id
    # several signatures: one trusted one is enough
    both = keys.encode_signatures([keys.sign(data, key_b), sig_a])
    assert trust.verify(data, both) == a.key_id
    with pytest.raises(SignatureError) as ei:
        trust.verify(data, keys.encode_signatures([keys.sign(data, key_b)]))
    assert ei.value.code == "unknown-signer" and b.key_id in ei.value.message
    with pytest.raises(SignatureError) as ei:
        trust.verify(data + b" ", keys.encode_signatures([sig_a]))
    assert ei.value.code == "bad-signature"
    with pytest.raises(SignatureError) as ei:
        trust.get(b.key_id)
    assert ei.value.code == "unknown-signer"
    assert keys.load_trusted([a.public]).keys.keys() == trust.keys.keys()  # type: ignore[list-item]


@pytest.mark.parametrize(
    "sig",
    [
        b"",
        b"garbage",
        b"[]",
        b'{"format": 1, "signatures": []}',
        b'{"format": 1, "signatures": ["x"]}',
        b'{"format": 2, "signatures": [{"key_id": "k", "alg": "ed25519", "sig": "AA=="}]}',
        b'{"format": 1, "signatures": [{"key_id": "k", "alg": "rsa", "sig": "AA=="}]}',
        b'{"format": 1, "signatures": [{"key_id": "k", "sig": "AA=="}]}',
        b'{"format": 1, "signatures": [{"key_id": "k", "alg": "ed25519", "sig": "AA=="}], "x": 1}',
        json.dumps({"format": 1, "signatures": [{"key_id": "k"}] * 20}).encode(),
    ],
)
def test_malformed_signature_documents(tmp_path: Path, sig: bytes) -> None:
    trust = keys.TrustStore()
    with pytest.raises(SignatureError) as ei:
        trust.verify(b"data", sig)
    assert ei.value.code == "signature-malformed"


def test_signature_bit_flips_are_rejected(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    trust = keys.TrustStore()
    trust.add(key.public_key())
    data = b"manifest bytes"
    doc = keys.encode_signatures([keys.sign(data, key)])
    for i in range(len(doc)):
        for bit in (0, 5):
            bad = bytearray(doc)
            bad[i] ^= 1 << bit
            try:
                trust.verify(data, bytes(bad))
            except SignatureError:
                continue
            # The only harmless flips are in JSON whitespace (e.g. "\n" -> "\x0b" is not
            # JSON, so in practice nothing): any accepted document must mean the same.
            assert json.loads(bytes(bad)) == json.loads(doc)


def test_trust_store_refuses_x25519(tmp_path: Path) -> None:
    kp = keys.generate_key("device", tmp_path)
    assert kp.public is not None
    with pytest.raises(KeyFileError) as ei:
        keys.TrustStore.from_paths([kp.public])
    assert ei.value.code == "key-type"


def test_keyring_from_directory(tmp_path: Path) -> None:
    s = keys.generate_key("signing", tmp_path)
    d = keys.generate_key("device", tmp_path / "dev")
    f = keys.generate_key("fleet", tmp_path, name="f")
    d2 = keys.generate_key("device", tmp_path)  # its .pub sits next to the signing .pub
    ring = keys.Keyring.from_paths([tmp_path, d.private])
    assert set(ring.signing) == {s.key_id}
    assert set(ring.devices) == {d.key_id, d2.key_id}
    assert set(ring.trust.keys) == {s.key_id}
    assert set(ring.psks) == {f.key_id}
    assert s.key_id in ring.trust.keys
    assert set(keys.load_keyring([d.private]).devices) == {d.key_id}
    text = repr(ring)
    assert d.key_id in text and f.private.read_text().strip() not in text


# --- CLI ------------------------------------------------------------------------------


def test_cli_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--kind", "device", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "device" and out["key_id"].startswith("x25519:")
    assert Path(out["private"]).exists() and Path(out["public"]).exists()
    assert _mode(Path(out["private"])) == 0o600
    assert main(["keygen", "--kind", "signing", "--out", str(tmp_path)]) == 0
    assert "ed25519:" in capsys.readouterr().out
    assert main(["keygen", "--kind", "fleet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeward: error [key-name]") and err.count("\n") == 1
    assert main(["keygen", "--kind", "fleet", "--name", "f", "--out", str(tmp_path)]) == 0
    secret = (tmp_path / "f.psk").read_text().strip()
    assert secret not in capsys.readouterr().out


@settings(max_examples=300, deadline=scaled(2000))
@given(st.binary(max_size=600))
def test_signature_parser_arbitrary_bytes(data: bytes) -> None:
    trust = keys.TrustStore()
    trust.add(_KEY.public_key())
    with pytest.raises(SignatureError):
        trust.verify(b"data", data)


@settings(max_examples=200, deadline=scaled(2000))
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )
)
def test_signature_parser_arbitrary_json(doc: object) -> None:
    trust = keys.TrustStore()
    trust.add(_KEY.public_key())
    for wrapped in (doc, {"format": 1, "signatures": doc}, {"format": 1, "signatures": [doc]}):
        with pytest.raises(SignatureError):
            trust.verify(b"data", json.dumps(wrapped).encode())


_KEY = Ed25519PrivateKey.generate()
