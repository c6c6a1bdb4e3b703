"""Bad input for ``agent.package.unpack``: one table row per attack, each with its own
expected error class and code. Every row also checks that nothing was written outside
the output directory and that no partial output remains (directory listing before ==
after)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import container as C
from agent.errors import (
    CryptoError,
    FormatError,
    IntegrityError,
    ManifestError,
    MetaInfoError,
    PackageError,
    SignatureError,
    UnsafeEntryError,
    UnsupportedVersionError,
)
from agent.keys import Keyring, TrustStore, encode_signatures, sign
from agent.manifest import canonical_json
from agent.package import CONTAINER_PATH, PackSpec, pack, unpack, verify
from agent.tario import TarReader

CHUNK = 256  # small AEAD chunks so the model spans several


@dataclass
class Env:
    root: Path
    pkg: bytes
    sk: Ed25519PrivateKey
    trust: TrustStore
    keyring: Keyring


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    model = root / "model.bin"
    model.write_bytes(rng.bytes(1500) + bytes(1000))
    prog = root / "Program" / "Scripts"
    prog.mkdir(parents=True)
    (prog / "run.py").write_text("print('hello')\n")
    sk = Ed25519PrivateKey.generate()
    dev = X25519PrivateKey.generate()
    out = root / "good.emp"
    pack(
        PackSpec(
            models=[model],
            name="bad-input",
            version=3,
            signing_keys=[sk],
            program_dir=root / "Program",
            encrypt_for=[dev.public_key()],
            chunk_size=CHUNK,
            zstd_level=None,
        ),
        out,
    )
    trust = TrustStore()
    trust.add(sk.public_key())
    ring = Keyring()
    ring.add(dev)
    return Env(root, out.read_bytes(), sk, trust, ring)


# --- tar surgery ---------------------------------------------------------------------


def members(data: bytes) -> list[tuple[str, bytes]]:
    import io

    tar = TarReader(io.BytesIO(data), max_entries=100, max_total=1 << 30)  # type: ignore[arg-type]
    out = []
    while (e := tar.next()) is not None:
        out.append((e.path, tar.read_all(1 << 30, e.path)))
    return out


def offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """path -> (header offset, data offset)."""
    pos, out = 0, {}
    for path, body in members(data):
        out[path] = (pos, pos + 512)
        pos += 512 + len(body) + (-len(body) % 512)
    return out


def header(path: str, size: int, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    info = tarfile.TarInfo(path)
    info.size, info.type, info.linkname, info.mode = size, kind, link, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def build(items: list[tuple[str, bytes]], extra: bytes = b"") -> bytes:
    out = b""
    for path, body in items:
        out += header(path, len(body)) + body + bytes(-len(body) % 512)
    return out + extra + bytes(1024)


def resign(
    env: Env,
    items: list[tuple[str, bytes]],
    edit: Callable[[dict], None] | None = None,
    key: Ed25519PrivateKey | None = None,
) -> bytes:
    """Recompute file sizes/digests in the manifest, apply ``edit`` and sign again."""
    doc = json.loads(items[0][1])
    bodies = dict(items[2:])
    for f in doc["files"]:
        if f["path"] in bodies:
            f["size"] = len(bodies[f["path"]])
            f["sha256"] = hashlib.sha256(bodies[f["path"]]).hexdigest()
    if edit is not None:
        edit(doc)
    raw = canonical_json(doc)
    sig = encode_signatures([sign(raw, key or env.sk)])
    return build([("manifest.json", raw), ("manifest.sig", sig), *items[2:]])


def replace_member(
    items: list[tuple[str, bytes]], path: str, body: bytes
) -> list[tuple[str, bytes]]:
    return [(p, body if p == path else b) for p, b in items]


def container(env: Env) -> bytes:
    return dict(members(env.pkg))[CONTAINER_PATH]


DATA0 = C.FILE_HEADER_SIZE + C.MODEL_HEADER_SIZE  # model 0 data offset in the container


def chunks(cont: bytes) -> tuple[bytes, list[bytes]]:
    head = cont[: DATA0 + C.PREAMBLE_SIZE]
    body = cont[DATA0 + C.PREAMBLE_SIZE :]
    step = CHUNK + 16
    return head, [body[i : i + step] for i in range(0, len(body), step)]


def with_chunks(head: bytes, parts: list[bytes]) -> bytes:
    length = C.PREAMBLE_SIZE + sum(map(len, parts))
    head = head[: DATA0 - 8] + struct.pack("<Q", length) + head[DATA0:]
    return head + b"".join(parts)


# --- mutations -------------------------------------------------------------------------


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def in_container(rel: int, bit: int = 0) -> Callable[[Env], bytes]:
    def f(env: Env) -> bytes:
        return flip(env.pkg, offsets(env.pkg)[CONTAINER_PATH][1] + rel, bit)

    return f


def at_member(path: str, rel: int = 0) -> Callable[[Env], bytes]:
    def f(env: Env) -> bytes:
        return flip(env.pkg, offsets(env.pkg)[path][1] + rel)

    return f


def truncate_at(path: str, where: str) -> Callable[[Env], bytes]:
    def f(env: Env) -> bytes:
        hdr, data = offsets(env.pkg)[path]
        cut = {"header": hdr + 100, "data": data, "mid": data + 40}[where]
        return env.pkg[:cut]

    return f


def flip_signature(env: Env) -> bytes:
    items = members(env.pkg)
    doc = json.loads(items[1][1])
    raw = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    raw[5] ^= 1
    doc["signatures"][0]["sig"] = base64.b64encode(raw).decode()
    return build([items[0], ("manifest.sig", encode_signatures(doc["signatures"])), *items[2:]])


def chunk_edit(fn: Callable[[list[bytes]], list[bytes]]) -> Callable[[Env], bytes]:
    def f(env: Env) -> bytes:
        head, parts = chunks(container(env))
        items = replace_member(members(env.pkg), CONTAINER_PATH, with_chunks(head, fn(parts)))
        return resign(env, items)

    return f


def tar_edit(
    fn: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]], extra: bytes = b""
) -> Callable[[Env], bytes]:
    return lambda env: build(fn(members(env.pkg)), extra)


def special(
    kind: bytes, path: str = "Program/link", link: str = "/etc/passwd"
) -> Callable[[Env], bytes]:
    def f(env: Env) -> bytes:
        items = members(env.pkg)
        return build(items, header(path, 0, kind, link))

    return f


def signed_edit(edit: Callable[[dict], None]) -> Callable[[Env], bytes]:
    return lambda env: resign(env, members(env.pkg), edit)


def other_signer(env: Env) -> bytes:
    return resign(env, members(env.pkg), key=Ed25519PrivateKey.generate())


def bad_meta(env: Env) -> bytes:
    tech = json.dumps({"runtime_config": {"backend": "foo"}}).encode()
    items = replace_member(members(env.pkg), "Meta-info/technicalinfo.json", tech)
    return resign(env, items)


def bad_recipient(env: Env) -> bytes:
    def edit(doc: dict) -> None:
        r = doc["encryption"]["recipients"][0]
        raw = bytearray(base64.b64decode(r["wrapped"]))
        raw[0] ^= 1
        r["wrapped"] = base64.b64encode(raw).decode()

    return resign(env, members(env.pkg), edit)


def format_v2(doc: dict) -> None:
    doc["format"] = 2


MODEL_HDR = C.FILE_HEADER_SIZE
CASES: list[tuple[str, Callable[[Env], bytes], type[Exception], str]] = [
    ("manifest bit flip", at_member("manifest.json", 30), SignatureError, "bad-signature"),
    ("signature bit flip", flip_signature, SignatureError, "bad-signature"),
    ("signature doc not JSON", at_member("manifest.sig", 0), SignatureError, "signature-malformed"),
    ("container magic", in_container(0), FormatError, "container-magic"),
    ("container version", in_container(4, 1), UnsupportedVersionError, "container-version"),
    ("container model count", in_container(8, 7), FormatError, "container-model-count"),
    ("container header size", in_container(12, 0), FormatError, "container-header-size"),
    ("model id", in_container(MODEL_HDR + 0), ManifestError, "model-unlisted"),
    ("model format", in_container(MODEL_HDR + 4, 0), ManifestError, "model-mismatch"),
    ("model flags reserved bit", in_container(MODEL_HDR + 8, 3), FormatError, "container-flags"),
    ("model flags zstd bit", in_container(MODEL_HDR + 8, 1), ManifestError, "model-mismatch"),
    (
        "model header size",
        in_container(MODEL_HDR + 12, 0),
        FormatError,
        "container-model-header-size",
    ),
    (
        "model data length",
        in_container(MODEL_HDR + 16 + 5, 7),
        FormatError,
        "container-data-length",
    ),
    ("preamble nonce prefix", in_container(DATA0 + 1), IntegrityError, "chunk-auth"),
    ("preamble chunk size", in_container(DATA0 + 9, 7), IntegrityError, "chunk-auth"),
    ("data chunk bit flip", in_container(DATA0 + 16 + 20), IntegrityError, "chunk-auth"),
    ("tag bit flip", in_container(DATA0 + 16 + CHUNK + 3), IntegrityError, "chunk-auth"),
    (
        "truncated in manifest header",
        truncate_at("manifest.json", "header"),
        FormatError,
        "tar-truncated",
    ),
    (
        "truncated before manifest data",
        truncate_at("manifest.json", "data"),
        FormatError,
        "tar-truncated",
    ),
    ("truncated in signature", truncate_at("manifest.sig", "mid"), FormatError, "tar-truncated"),
    (
        "truncated at Meta-info",
        truncate_at("Meta-info/managementinfo.json", "header"),
        FormatError,
        "tar-truncated",
    ),
    ("truncated in container", truncate_at(CONTAINER_PATH, "mid"), FormatError, "tar-truncated"),
    ("truncated before end marker", lambda env: env.pkg[:-1024], FormatError, "tar-truncated"),
    ("chunks reordered", chunk_edit(lambda p: [p[1], p[0], *p[2:]]), IntegrityError, "chunk-auth"),
    ("chunk duplicated", chunk_edit(lambda p: [p[0], p[0], *p[1:]]), IntegrityError, "chunk-auth"),
    ("last chunk dropped", chunk_edit(lambda p: p[:-1]), IntegrityError, "stream-truncated"),
    (
        "container cut mid-chunk",
        chunk_edit(lambda p: [*p[:-1], p[-1][:-3]]),
        IntegrityError,
        "chunk-auth",
    ),
    (
        "entry not in manifest",
        tar_edit(lambda m: [*m, ("Program/extra.py", b"x=1\n")]),
        ManifestError,
        "entry-unlisted",
    ),
    (
        "manifest entry missing",
        tar_edit(lambda m: [i for i in m if i[0] != "Program/Scripts/run.py"]),
        ManifestError,
        "entry-missing",
    ),
    (
        "member larger than declared",
        tar_edit(lambda m: replace_member(m, "Program/Scripts/run.py", b"print('hello')\n#more\n")),
        IntegrityError,
        "entry-size",
    ),
    (
        "member content changed",
        at_member("Program/Scripts/run.py", 2),
        IntegrityError,
        "entry-digest",
    ),
    ("duplicate entry", tar_edit(lambda m: [*m, m[2]]), UnsafeEntryError, "entry-duplicate"),
    (
        "manifest not first",
        tar_edit(lambda m: [m[1], m[0], *m[2:]]),
        ManifestError,
        "manifest-not-first",
    ),
    ("signature missing", tar_edit(lambda m: [m[0], *m[2:]]), SignatureError, "signature-missing"),
    (
        "../ path",
        tar_edit(lambda m: [*m, ("Program/../../evil.py", b"x")]),
        UnsafeEntryError,
        "path-traversal",
    ),
    (
        "absolute path",
        tar_edit(lambda m: [*m, ("/tmp/evil.py", b"x")]),
        UnsafeEntryError,
        "path-absolute",
    ),
    (
        "path outside roots",
        tar_edit(lambda m: [*m, ("etc/evil", b"x")]),
        UnsafeEntryError,
        "path-outside",
    ),
    ("symlink", special(tarfile.SYMTYPE), UnsafeEntryError, "tar-symlink"),
    (
        "hard link",
        special(tarfile.LNKTYPE, link="Program/Scripts/run.py"),
        UnsafeEntryError,
        "tar-hardlink",
    ),
    ("char device", special(tarfile.CHRTYPE, "Program/null"), UnsafeEntryError, "tar-device"),
    ("block device", special(tarfile.BLKTYPE, "Program/sda"), UnsafeEntryError, "tar-device"),
    ("fifo", special(tarfile.FIFOTYPE, "Program/fifo"), UnsafeEntryError, "tar-fifo"),
    ("pax extension header", special(tarfile.XHDTYPE, "Program/pax"), UnsafeEntryError, "tar-type"),
    ("header checksum", lambda env: flip(env.pkg, 150), FormatError, "tar-checksum"),
    (
        "non-zero tar padding",
        lambda env: flip(env.pkg, offsets(env.pkg)["manifest.sig"][0] - 1),
        FormatError,
        "tar-padding",
    ),
    (
        "data after end marker",
        lambda env: env.pkg + b"junk" + bytes(508),
        FormatError,
        "tar-trailing",
    ),
    ("unknown signer", other_signer, SignatureError, "unknown-signer"),
    (
        "unsupported manifest version",
        signed_edit(format_v2),
        UnsupportedVersionError,
        "manifest-version",
    ),
    (
        "manifest unknown key",
        signed_edit(lambda d: d.update(extra=1)),
        ManifestError,
        "manifest-unknown-key",
    ),
    ("invalid Meta-info", bad_meta, MetaInfoError, "meta-invalid"),
    ("tampered recipient entry", bad_recipient, CryptoError, "unwrap-failed"),
]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("name", "mutate", "exc", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    env: Env,
    tmp_path: Path,
    name: str,
    mutate: Callable[[Env], bytes],
    exc: type[Exception],
    code: str,
) -> None:
    pkg = tmp_path / "in" / "bad.emp"
    pkg.parent.mkdir()
    pkg.write_bytes(mutate(env))
    dest = tmp_path / "dest"
    dest.mkdir()
    before = listing(tmp_path)
    with pytest.raises(exc) as info:
        unpack(pkg, dest / "out", trust=env.trust, keyring=env.keyring)
    assert isinstance(info.value, PackageError)
    assert info.value.code == code, f"{name}: {info.value.code}: {info.value}"
    assert str(info.value) and "\n" not in str(info.value)
    assert listing(tmp_path) == before  # nothing written anywhere, no partial output


def test_good_package_unpacks(env: Env, tmp_path: Path) -> None:
    """The unmutated package passes, so every failure above comes from its mutation."""
    pkg = tmp_path / "good.emp"
    pkg.write_bytes(env.pkg)
    m = unpack(pkg, tmp_path / "out", trust=env.trust, keyring=env.keyring)
    assert (tmp_path / "out" / "Model" / "model.bin").read_bytes() == (
        env.root / "model.bin"
    ).read_bytes()
    assert verify(pkg, env.trust).name == m.name
    # the chunk helpers see what the test thinks they see
    head, parts = chunks(container(env))
    assert len(parts) > 3 and with_chunks(head, parts) == container(env)


def test_wrong_device_key(env: Env, tmp_path: Path) -> None:
    pkg = tmp_path / "good.emp"
    pkg.write_bytes(env.pkg)
    other = Keyring()
    other.add(X25519PrivateKey.generate())
    before = listing(tmp_path)
    with pytest.raises(CryptoError) as info:
        unpack(pkg, tmp_path / "out", trust=env.trust, keyring=other)
    assert info.value.code == "no-recipient-key"
    assert listing(tmp_path) == before
    with pytest.raises(CryptoError):
        unpack(pkg, tmp_path / "out", trust=env.trust)  # no keyring at all
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "name",
    [
        c[0]
        for c in CASES
        if c[3]
        in (
            "bad-signature",
            "unknown-signer",
            "entry-unlisted",
            "entry-missing",
            "entry-size",
            "entry-digest",
            "tar-symlink",
            "path-traversal",
            "container-magic",
            "model-unlisted",
        )
    ],
)
def test_verify_refuses_too(env: Env, tmp_path: Path, name: str) -> None:
    """``verify`` (no keys, no writes) refuses the same packages."""
    _, mutate, _exc, _code = next(c for c in CASES if c[0] == name)
    pkg = tmp_path / "bad.emp"
    pkg.write_bytes(mutate(env))
    with pytest.raises(PackageError):
        verify(pkg, env.trust)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_byte_flip_or_cut(
    env: Env, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """A flipped byte or a cut anywhere: our error (never another exception, never a hang),
    or — only where the byte is not significant — the identical output."""
    raw = bytearray(env.pkg)
    if data.draw(st.booleans()):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    tmp = tmp_path_factory.mktemp("flip")
    pkg = tmp / "x.emp"
    pkg.write_bytes(bytes(raw))
    try:
        unpack(pkg, tmp / "out", trust=env.trust, keyring=env.keyring)
    except PackageError:
        assert sorted(p.name for p in tmp.iterdir()) == ["x.emp"]
        return
    assert (tmp / "out" / "Model" / "model.bin").read_bytes() == (
        env.root / "model.bin"
    ).read_bytes()


def test_decoded_digest_checked_on_request(env: Env, tmp_path: Path) -> None:
    """The decoded model is pinned by the signed container hash and the AEAD tags;
    ``verify_decoded`` also holds it to ``models[].sha256`` (a publisher's manifest that
    disagrees with its own container is then refused)."""

    def wrong_sha(doc: dict) -> None:
        doc["models"][0]["sha256"] = "0" * 64

    bad = tmp_path / "bad.emp"
    bad.write_bytes(signed_edit(wrong_sha)(env))
    out = tmp_path / "strict"
    with pytest.raises(IntegrityError) as info:
        unpack(bad, out, trust=env.trust, keyring=env.keyring, verify_decoded=True)
    assert info.value.code == "model-digest" and not out.exists()
    unpack(bad, tmp_path / "default", trust=env.trust, keyring=env.keyring)
    model = (env.root / "model.bin").read_bytes()
    assert (tmp_path / "default" / "Model" / "model.bin").read_bytes() == model


def test_zstd_checksum_catches_altered_plaintext(env: Env, tmp_path: Path) -> None:
    """Unencrypted zstd: a byte changed inside a stored (raw) block still decodes, the
    container is re-signed, so only the frame's content checksum can notice — it does."""
    model = env.root / "model.bin"
    plain = tmp_path / "plain.emp"
    pack(PackSpec(models=[model], name="plain", version=1, signing_keys=[env.sk]), plain)
    items = members(plain.read_bytes())
    cont = bytearray(dict(items)[CONTAINER_PATH])
    cont[DATA0 + 100] ^= 0x01  # inside the first block: the random half is stored raw
    bad = tmp_path / "bad.emp"
    bad.write_bytes(resign(env, replace_member(items, CONTAINER_PATH, bytes(cont))))
    out = tmp_path / "out"
    with pytest.raises(FormatError) as info:
        unpack(bad, out, trust=env.trust)
    assert info.value.code == "zstd-corrupt" and not out.exists()
    assert "checksum" in info.value.message
