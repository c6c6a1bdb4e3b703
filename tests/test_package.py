"""Pack / verify / unpack / inspect round trips, including the real PP-OCR ONNX and
mediapipe TFLite models run after unpacking."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import crypto
from agent.errors import (
    BaseMismatchError,
    CryptoError,
    LimitError,
    MetaInfoError,
    PackageError,
    SignatureError,
)
from agent.keys import Keyring, TrustStore, key_id
from agent.package import Limits, PackSpec, inspect, pack, reader, unpack, verify
from agent.tario import TarReader


@pytest.fixture(scope="module")
def keys() -> tuple[Ed25519PrivateKey, TrustStore, X25519PrivateKey, Keyring]:
    sk = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(sk.public_key())
    dev = X25519PrivateKey.generate()
    ring = Keyring()
    ring.add(dev)
    return sk, trust, dev, ring


def _model(tmp: Path, size: int = 50_000, name: str = "m.bin") -> Path:
    p = tmp / name
    rng = np.random.default_rng(size)
    p.write_bytes(rng.bytes(size // 2) + np.linspace(0, 1, size // 8, dtype=np.float32).tobytes())
    return p


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_round_trip_each_alg(tmp_path: Path, keys, alg: str) -> None:  # type: ignore[no-untyped-def]
    sk, trust, dev, ring = keys
    a, b = _model(tmp_path, 40_000, "a.bin"), _model(tmp_path, 3_000, "b.bin")
    out = tmp_path / "p.emp"
    m = pack(
        PackSpec(
            models=[a, b],
            name="rt",
            version=7,
            label="7.0",
            signing_keys=[sk],
            encrypt_for=[dev.public_key()],
            alg=alg,
            chunk_size=4096,
        ),
        out,
    )
    assert [x.encoding for x in m.models] == [("zstd", alg)] * 2
    assert verify(out, trust) == m
    m2 = unpack(out, tmp_path / "u", trust=trust, keyring=ring)
    assert m2 == m
    for src in (a, b):
        assert (tmp_path / "u" / "Model" / src.name).read_bytes() == src.read_bytes()
    assert json.loads((tmp_path / "u" / "manifest.json").read_bytes())["version"] == 7
    # no temp leftovers next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "p.emp", "u"]


def test_sm4_package_refused_without_openssl_sm4_gcm(  # type: ignore[no-untyped-def]
    tmp_path: Path, keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device whose OpenSSL lacks SM4-GCM refuses an SM4 package with alg-unsupported
    and writes nothing (there is no pure-Python fallback)."""
    sk, trust, dev, ring = keys
    out = tmp_path / "p.emp"
    spec = PackSpec(
        models=[_model(tmp_path, 20_000)],
        name="sm4",
        version=1,
        signing_keys=[sk],
        encrypt_for=[dev.public_key()],
        alg="sm4-gcm",
        chunk_size=4096,
    )
    pack(spec, out)

    def missing(self: object, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        raise crypto.UnsupportedAlgorithm("no SM4-GCM")  # what OpenSSL 1.1.1 answers

    monkeypatch.setattr(crypto._Sm4Gcm, "encrypt", missing)
    with pytest.raises(CryptoError) as ei:
        unpack(out, tmp_path / "u", trust=trust, keyring=ring)
    assert ei.value.code == "alg-unsupported"
    assert not (tmp_path / "u").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(CryptoError) as ei:
        pack(spec, tmp_path / "again.emp")
    assert ei.value.code == "alg-unsupported"
    assert not (tmp_path / "again.emp").exists()


def test_trust_check_on_bytes_alone(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    """The reader decides trust from bytes and streams, without a file: the signed
    manifest from its two byte strings, a whole package from an in-memory stream."""
    sk, trust, _, _ = keys
    out = tmp_path / "p.emp"
    spec = PackSpec(models=[_model(tmp_path, 5_000)], name="b", version=1, signing_keys=[sk])
    m = pack(spec, out)
    data = out.read_bytes()
    opened = reader.verify_stream(io.BytesIO(data), trust)
    assert opened.manifest == m and opened.signer == key_id(sk.public_key())
    raw, sig = opened.manifest.raw, opened.signature
    manifest, signer = reader.trusted_manifest(raw, sig, trust, Limits())
    assert manifest == m and signer == opened.signer
    stranger = TrustStore()
    stranger.add(Ed25519PrivateKey.generate().public_key())
    for bad_raw, bad_trust in ((raw, stranger), (raw.replace(b'"b"', b'"c"'), trust)):
        with pytest.raises(SignatureError):
            reader.trusted_manifest(bad_raw, sig, bad_trust, Limits())
    with pytest.raises(LimitError):  # the size cap is checked before a byte is read
        reader.open_stream(io.BytesIO(data), Limits(max_package_bytes=100), trust, size=len(data))
    cut = data[: len(data) // 2]
    with pytest.raises(PackageError):  # a truncated stream never verifies
        reader.verify_stream(io.BytesIO(cut), trust)


def test_tar_layout_first_entries(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    sk, trust, _, _ = keys
    prog = tmp_path / "Program" / "Scripts"
    prog.mkdir(parents=True)
    (prog / "run.py").write_text("x = 1\n")
    (prog / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(prog / "tool.sh", 0o755)
    out = tmp_path / "p.emp"
    pack(
        PackSpec(
            models=[_model(tmp_path)],
            name="lay",
            version=1,
            signing_keys=[sk],
            program_dir=tmp_path / "Program",
        ),
        out,
    )
    with open(out, "rb") as f:
        tar = TarReader(f, max_entries=100, max_total=1 << 30)
        paths = []
        while (e := tar.next()) is not None:
            paths.append(e.path)
    assert paths[:2] == ["manifest.json", "manifest.sig"]
    assert paths[2:] == [
        "Meta-info/managementinfo.json",
        "Meta-info/technicalinfo.json",
        "Program/Scripts/run.py",
        "Program/Scripts/tool.sh",
        "Model/models.empc",
    ]
    u = tmp_path / "u"
    unpack(out, u, trust=trust)
    assert stat.S_IMODE((u / "Program/Scripts/tool.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((u / "Program/Scripts/run.py").stat().st_mode) == 0o644
    doc = inspect(out)
    assert doc["name"] == "lay" and doc["verified"] is False
    assert doc["signature_key_ids"] == [key_id(sk.public_key())]


def test_psk_recipient_and_envelope(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    sk, trust, dev, _ = keys
    psk = os.urandom(32)
    out = tmp_path / "p.emp"
    src = _model(tmp_path)
    m = pack(
        PackSpec(
            models=[src], name="fleet", version=2, signing_keys=[sk], psks=[("psk:fleet", psk)]
        ),
        out,
    )
    ring = Keyring()
    ring.add_psk("fleet", psk)
    unpack(out, tmp_path / "u", trust=trust, keyring=ring)
    assert (tmp_path / "u/Model/m.bin").read_bytes() == src.read_bytes()
    # a device added later through a detached envelope
    assert m.encryption is not None
    ctx = crypto.package_context(m.name, m.version, m.encryption.alg, m.encryption.chunk_size)
    data_key = crypto.unwrap_any(list(m.encryption.recipients), ring, ctx)
    env = tmp_path / "dev.envelope"
    entry = crypto.wrap_for_device(data_key, dev.public_key(), key_id(dev.public_key()), ctx)
    env.write_bytes(crypto.make_envelope([entry], m.package_id, sk))
    devring = Keyring()
    devring.add(dev)
    with pytest.raises(CryptoError):
        unpack(out, tmp_path / "u2", trust=trust, keyring=devring)
    unpack(out, tmp_path / "u2", trust=trust, keyring=devring, envelopes=[env])
    assert (tmp_path / "u2/Model/m.bin").read_bytes() == src.read_bytes()


def test_output_must_be_new_or_empty(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    sk, trust, _, _ = keys
    out = tmp_path / "p.emp"
    pack(PackSpec(models=[_model(tmp_path)], name="o", version=1, signing_keys=[sk]), out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    with pytest.raises(PackageError) as info:
        unpack(out, busy, trust=trust)
    assert info.value.code == "output-exists"
    assert (busy / "keep.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    unpack(out, empty, trust=trust)
    assert (empty / "Model" / "m.bin").is_file()


def test_limits(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    sk, trust, _, _ = keys
    out = tmp_path / "p.emp"
    pack(
        PackSpec(models=[_model(tmp_path, 200_000)], name="lim", version=1, signing_keys=[sk]), out
    )
    cases = [
        (Limits(max_package_bytes=10_000), "limit-package-size"),
        (Limits(max_total_bytes=10_000), "limit-total-size"),
        (Limits(max_entries=2), "limit-entries"),
        (Limits(max_manifest_bytes=100), "limit-member-size"),
        (Limits(max_decoded_bytes=1000), "decoded-size"),
    ]
    for limits, code in cases:
        with pytest.raises(LimitError) as info:
            unpack(out, tmp_path / "u", trust=trust, limits=limits)
        assert info.value.code == code
        assert not (tmp_path / "u").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "p.emp"]


def test_meta_dir_validated_at_pack(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    sk, _, _, _ = keys
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "technicalinfo.json").write_text(
        json.dumps({"runtime_config": {"backend": "tensorflow"}})
    )
    with pytest.raises(MetaInfoError) as info:
        pack(
            PackSpec(
                models=[_model(tmp_path)], name="x", version=1, signing_keys=[sk], meta_dir=meta
            ),
            tmp_path / "p.emp",
        )
    assert info.value.code == "meta-invalid"
    assert "runtime_config.backend" in str(info.value)
    (meta / "technicalinfo.json").write_text(
        json.dumps({"runtime_config": {"entry_model": "nope.onnx"}})
    )
    with pytest.raises(MetaInfoError, match="entry_model"):
        pack(
            PackSpec(
                models=[_model(tmp_path)], name="x", version=1, signing_keys=[sk], meta_dir=meta
            ),
            tmp_path / "p.emp",
        )
    assert not (tmp_path / "p.emp").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_base_mismatch_errors(tmp_path: Path) -> None:
    from agent.manifest import BaseRef, Manifest, ModelInfo
    from agent.package.installer import check_base

    m = Manifest(
        name="a",
        version=2,
        files=(),
        models=(
            ModelInfo(
                0,
                "x.onnx",
                "onnx",
                "Model/models.empc",
                ("residual",),
                1,
                "0" * 64,
                "sha256:" + "0" * 64,
                "sha256:" + "1" * 64,
            ),
        ),
        base=BaseRef("a", 1),
    )
    with pytest.raises(BaseMismatchError) as info:
        check_base(m, None)
    assert info.value.code == "base-required"
    with pytest.raises(BaseMismatchError) as info:
        check_base(m, tmp_path)
    assert info.value.code == "base-invalid"


def _run_onnx(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(sess.run(None, {sess.get_inputs()[0].name: x}))


def _run_tflite(path: Path) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(0).random(d["shape"], dtype=np.float32).astype(d["dtype"])
    it.set_tensor(d["index"], x)
    it.invoke()
    return [it.get_tensor(o["index"]).copy() for o in it.get_output_details()]


def test_real_models_round_trip(tmp_path: Path, keys, ppocr_det: Path, hand_tflite: Path) -> None:  # type: ignore[no-untyped-def]
    sk, trust, dev, ring = keys
    out = tmp_path / "real.emp"
    m = pack(
        PackSpec(
            models=[ppocr_det, hand_tflite],
            name="real",
            version=1,
            signing_keys=[sk],
            encrypt_for=[dev.public_key()],
        ),
        out,
    )
    assert [x.format for x in m.models] == ["onnx", "tflite"]
    u = tmp_path / "u"
    unpack(out, u, trust=trust, keyring=ring)
    det, hand = u / "Model" / ppocr_det.name, u / "Model" / hand_tflite.name
    assert det.read_bytes() == ppocr_det.read_bytes()
    assert hand.read_bytes() == hand_tflite.read_bytes()
    tech = json.loads((u / "Meta-info" / "technicalinfo.json").read_text())
    assert tech["runtime_config"]["backend"] == "onnxruntime"
    assert tech["runtime_config"]["inputs"][0]["name"] == "x"
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    for a, b in zip(_run_onnx(ppocr_det, x), _run_onnx(det, x), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_run_tflite(hand_tflite), _run_tflite(hand), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tflite_meta_generated(tmp_path: Path, keys, hand_tflite: Path) -> None:  # type: ignore[no-untyped-def]
    sk, trust, _, _ = keys
    out = tmp_path / "h.emp"
    pack(PackSpec(models=[hand_tflite], name="hand", version=1, signing_keys=[sk]), out)
    unpack(out, tmp_path / "u", trust=trust)
    tech = json.loads((tmp_path / "u/Meta-info/technicalinfo.json").read_text())
    rc = tech["runtime_config"]
    assert rc["backend"] == "litert" and rc["entry_model"] == hand_tflite.name
    assert rc["inputs"][0]["shape"][-1] == 3 and len(rc["outputs"]) >= 2


def _tiny_onnx(path: Path, w: np.ndarray, b: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))


def test_residual_chain(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    """v1 full → v2 residual on v1 (base given as .emp) → v3 residual on v2 (as a dir)."""
    import onnxruntime as ort

    sk, trust, dev, ring = keys
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (256, 128)).astype(np.float32)
    b = rng.normal(0, 1, (128,)).astype(np.float32)
    files = []
    for i in range(3):
        p = tmp_path / f"m{i}.onnx"
        _tiny_onnx(p, w + i * 0.01 * rng.normal(0, 1, w.shape).astype(np.float32), b)
        files.append(p)
    common = {"signing_keys": [sk], "encrypt_for": [dev.public_key()], "name": "chain"}
    pack(PackSpec(models=[files[0]], version=1, **common), tmp_path / "v1.emp")
    unpack(tmp_path / "v1.emp", tmp_path / "u1", trust=trust, keyring=ring)
    m2 = pack(
        PackSpec(
            models=[files[1]], version=2, base=tmp_path / "v1.emp", base_keyring=ring, **common
        ),
        tmp_path / "v2.emp",
    )
    assert m2.base is not None and (m2.base.name, m2.base.version) == ("chain", 1)
    assert m2.models[0].residual and m2.models[0].name == "m0.onnx"
    assert m2.models[0].base_digest and m2.models[0].target_digest
    with pytest.raises(BaseMismatchError):
        unpack(tmp_path / "v2.emp", tmp_path / "u2", trust=trust, keyring=ring)
    assert not (tmp_path / "u2").exists()
    unpack(
        tmp_path / "v2.emp", tmp_path / "u2", trust=trust, keyring=ring, base_dir=tmp_path / "u1"
    )
    m3 = pack(
        PackSpec(models=[files[2]], version=3, base=tmp_path / "u2", **common), tmp_path / "v3.emp"
    )
    with pytest.raises(BaseMismatchError) as info:  # v3 patches v2, not v1
        unpack(
            tmp_path / "v3.emp",
            tmp_path / "u3",
            trust=trust,
            keyring=ring,
            base_dir=tmp_path / "u1",
        )
    assert info.value.code == "base-version"
    unpack(
        tmp_path / "v3.emp", tmp_path / "u3", trust=trust, keyring=ring, base_dir=tmp_path / "u2"
    )
    assert m3.base is not None and m3.base.version == 2
    x = rng.normal(0, 1, (1, 256)).astype(np.float32)
    want = ort.InferenceSession(str(files[2])).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "u3" / "Model" / "m0.onnx")).run(None, {"x": x})[0]
    cos = float(np.dot(want.ravel(), got.ravel()) / np.linalg.norm(want) / np.linalg.norm(got))
    assert cos > 0.999
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_residual_wiring(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    """The pack's patch report lands in the manifest as plain JSON; a base whose bytes
    are not the ones the patch was made against is refused and nothing is left."""
    sk, trust, dev, ring = keys
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (64, 32)).astype(np.float32)
    b = rng.normal(0, 1, (32,)).astype(np.float32)
    v1m, v2m = tmp_path / "v1.onnx", tmp_path / "v2.onnx"
    _tiny_onnx(v1m, w, b)
    _tiny_onnx(v2m, w + 0.01 * rng.normal(0, 1, w.shape).astype(np.float32), b)
    common = {"signing_keys": [sk], "encrypt_for": [dev.public_key()], "name": "wire"}
    pack(PackSpec(models=[v1m], version=1, **common), tmp_path / "v1.emp")
    m2 = pack(
        PackSpec(models=[v2m], version=2, base=tmp_path / "v1.emp", base_keyring=ring, **common),
        tmp_path / "v2.emp",
    )
    mi = m2.models[0]
    assert mi.encoding == ("residual", "aes-256-gcm") and mi.name == "v1.onnx"
    doc = json.loads(m2.raw)["models"][0]
    assert doc["stats"]["tensors"] == mi.stats["tensors"] == 2  # numpy counts became ints
    unpack(tmp_path / "v1.emp", tmp_path / "u1", trust=trust, keyring=ring)
    unpack(
        tmp_path / "v2.emp", tmp_path / "u2", trust=trust, keyring=ring, base_dir=tmp_path / "u1"
    )
    assert not (tmp_path / "u2" / ".patches").exists()
    # a base that is not the one the patch was made against: refused, nothing left
    _tiny_onnx(tmp_path / "u1" / "Model" / "v1.onnx", w + 1.0, b)
    with pytest.raises(BaseMismatchError):
        unpack(
            tmp_path / "v2.emp",
            tmp_path / "u3",
            trust=trust,
            keyring=ring,
            base_dir=tmp_path / "u1",
        )
    assert not (tmp_path / "u3").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _external_onnx(d: Path, w: np.ndarray) -> list[Path]:
    """A MatMul model whose weight lives in an external data file next to it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(
        model, str(d / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
        size_threshold=0,
    )  # fmt: skip
    return [d / "m.onnx", d / "m.onnx.data"]


def test_residual_onnx_external_data(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    """An ONNX model packed with its external data file: the residual package carries the
    data file's tensors inside the .onnx patch (quantised), not as a second full delta."""
    import onnxruntime as ort

    sk, trust, _, _ = keys
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (512, 512)).astype(np.float32)
    versions = [w, w + 0.01 * rng.normal(0, 1, w.shape).astype(np.float32)]
    versions.append(versions[1] + 0.01 * rng.normal(0, 1, w.shape).astype(np.float32))
    src = [_external_onnx(tmp_path / f"src{i}", v) for i, v in enumerate(versions)]
    common = {"signing_keys": [sk], "name": "ext"}
    pack(PackSpec(models=src[0], version=1, **common), tmp_path / "v1.emp")
    unpack(tmp_path / "v1.emp", tmp_path / "u1", trust=trust)
    m2 = pack(
        PackSpec(models=src[1], version=2, base=tmp_path / "u1", **common), tmp_path / "v2.emp"
    )
    assert [m.name for m in m2.models] == ["m.onnx"]
    assert m2.models[0].stats is not None
    assert m2.models[0].stats["external_data"] == ["m.onnx.data"]
    assert (tmp_path / "v2.emp").stat().st_size < 0.4 * (tmp_path / "v1.emp").stat().st_size
    unpack(tmp_path / "v2.emp", tmp_path / "u2", trust=trust, base_dir=tmp_path / "u1")
    pack(PackSpec(models=src[2], version=3, base=tmp_path / "u2", **common), tmp_path / "v3.emp")
    unpack(tmp_path / "v3.emp", tmp_path / "u3", trust=trust, base_dir=tmp_path / "u2")
    assert sorted(p.name for p in (tmp_path / "u3" / "Model").iterdir()) == [
        "m.onnx",
        "m.onnx.data",
    ]
    x = rng.normal(0, 1, (1, 512)).astype(np.float32)
    want = ort.InferenceSession(str(src[2][0])).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "u3" / "Model" / "m.onnx")).run(None, {"x": x})[0]
    cos = float(np.dot(want.ravel(), got.ravel()) / np.linalg.norm(want) / np.linalg.norm(got))
    assert cos > 0.9999
    # the base's files are untouched by both updates
    assert (tmp_path / "u1" / "Model" / "m.onnx.data").read_bytes() == src[0][1].read_bytes()
