"""``edgeward repo``: init / add / publish / refresh / rotate / status, checked by a real
``tuf.ngclient.Updater`` reading the published repository over HTTPS from a real nginx."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent.cli import main
from agent.errors import RepositoryError
from agent.keys import TrustStore, generate_key, load_private, load_public
from agent.package import PackSpec, pack, verify
from agent.repository import TargetFields
from agent.repository.publisher import (
    LOCK_FILE,
    Repository,
    load_signer,
    parse_duration,
    public_key,
)
from tests.nginx_util import Nginx, needs_nginx

ROLES = ("targets", "snapshot", "timestamp")


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Key files as ``edgeward keygen`` writes them: name → .key path."""
    d = tmp_path_factory.mktemp("keys")
    names = [
        "root",
        "root2",
        "root3",
        "root4",
        "targets",
        "targets2",
        "snapshot",
        "snapshot2",
        "timestamp",
        "timestamp2",
        "publisher",
        "stranger",
    ]
    return {n: generate_key("signing", d / n).private for n in names}


def _onnx(path: Path, w: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> dict[str, Path]:
    """ocr v1, v2, v3 full; v2 residual on v1 and v3 residual on v2 (int8)."""
    d = tmp_path_factory.mktemp("pkgs")
    sk = load_private(keys["publisher"])
    rng = np.random.default_rng(12)
    w = rng.normal(0, 1, (128, 64)).astype(np.float32)
    out: dict[str, Path] = {}
    for v in (1, 2, 3):
        m = _onnx(
            d / f"m{v}" / "det.onnx", w + v * 0.01 * rng.normal(0, 1, w.shape).astype(np.float32)
        )
        out[f"v{v}"] = d / f"ocr-{v}.emp"
        pack(PackSpec(models=[m], name="ocr", version=v, signing_keys=[sk]), out[f"v{v}"])
        if v > 1:
            out[f"r{v}"] = d / f"ocr-{v}-from-{v - 1}.emp"
            spec = PackSpec(
                models=[m], name="ocr", version=v, signing_keys=[sk], base=out[f"v{v - 1}"]
            )
            pack(spec, out[f"r{v}"])
        if v == 2:  # residuals a repository cannot offer: on a bare file, on another package
            out["bare2"] = d / "ocr-2-from-file.emp"
            spec = PackSpec(
                models=[m], name="ocr", version=2, signing_keys=[sk], base=d / "m1" / "det.onnx"
            )
            pack(spec, out["bare2"])
            out["other2"] = d / "other-2.emp"
            spec = PackSpec(models=[m], name="other", version=2, signing_keys=[sk], base=out["v1"])
            pack(spec, out["other2"])
    return out


def _signers(keys: dict[str, Path], **over: str) -> dict[str, object]:
    return {r: load_signer(keys[over.get(r, r)]) for r in ROLES}


def _init(path: Path, keys: dict[str, Path], *, now: datetime | None = None) -> Repository:
    return Repository.init(
        path,
        root_signers=[load_signer(keys["root"])],
        online_keys={r: public_key(keys[r]) for r in ROLES},
        now=now,
    )


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


class _Fetcher(FetcherInterface):
    """ngclient over ``requests`` with our CA (the device's production fetcher lives in
    the device code; this one only has to be a faithful HTTPS client)."""

    def __init__(self, ca: Path) -> None:
        self.session = requests.Session()
        self.ca = str(ca)

    def _fetch(self, url: str) -> Iterator[bytes]:
        # verify= per request: a Session.verify loses to REQUESTS_CA_BUNDLE in the env
        r = self.session.get(url, stream=True, timeout=(10, 30), verify=self.ca)
        if r.status_code != 200:
            r.close()
            raise tuf_errors.DownloadHTTPError(f"HTTP {r.status_code} for {url}", r.status_code)
        return self._chunks(r)

    @staticmethod
    def _chunks(r: requests.Response) -> Iterator[bytes]:
        with r:
            yield from r.iter_content(1 << 16)


def _device(tmp: Path, web: Nginx, root_json: bytes) -> Updater:
    """A device that trusts ``root_json`` (provisioned with the box)."""
    meta = tmp / "meta"
    dl = tmp / "dl"
    meta.mkdir(parents=True, exist_ok=True)
    dl.mkdir(parents=True, exist_ok=True)
    if not (meta / "root.json").exists():
        (meta / "root.json").write_bytes(root_json)
    return Updater(
        metadata_dir=str(meta),
        metadata_base_url=f"{web.url}/metadata/",
        target_dir=str(dl),
        target_base_url=f"{web.url}/targets/",
        fetcher=_Fetcher(web.ca_bundle),
        bootstrap=None,
    )


def _trust(keys: dict[str, Path]) -> TrustStore:
    t = TrustStore()
    t.add(load_public(keys["publisher"].with_suffix(".pub")))
    return t


# --- round trips ----------------------------------------------------------------------


def test_cli_init_add_publish_status(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    online = [a for r in ROLES for a in (f"--{r}-key", str(keys[r]))]
    rc, out, err = _cli(
        [
            "repo",
            "init",
            str(repo),
            "--root-key",
            str(keys["root"]),
            "--root-key",
            str(keys["root2"]),
            "--root-threshold",
            "2",
            "--timestamp-expiry",
            "6h",
            "--json",
            *[a.replace(".key", ".pub") for a in online],
        ],
        capsys,
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["published"] is False and doc["roles"]["root"]["version"] == 1
    assert doc["roles"]["root"]["threshold"] == 2 and len(doc["roles"]["root"]["keys"]) == 2
    assert doc["expiry"] == {"root": "365d", "targets": "90d", "snapshot": "7d", "timestamp": "6h"}
    # the key names are the ones edgeward keygen prints and puts in the file names
    assert keys["targets"].stem.replace("-", ":", 1) in doc["roles"]["targets"]["keys"]
    assert sorted(os.listdir(repo / "metadata")) == ["1.root.json", "root.json"]

    pub = str(keys["publisher"].with_suffix(".pub"))
    rc, out, err = _cli(
        [
            "repo",
            "add",
            str(repo),
            str(pkgs["v1"]),
            str(pkgs["v2"]),
            str(pkgs["r2"]),
            "--trust",
            pub,
            "--channel",
            "stable",
            "--channel",
            "canary",
            "--json",
        ],
        capsys,
    )
    assert rc == 0, err
    staged = json.loads(out)
    assert staged["verified"] is True
    assert [(d["path"], d["kind"]) for d in staged["staged"]] == [
        ("ocr/1/ocr-1.emp", "full"),
        ("ocr/2/ocr-2.emp", "full"),
        ("ocr/2/ocr-2-from-1.emp", "residual"),
    ]
    res = staged["staged"][2]
    assert res["base_version"] == "1" and list(res["base_digests"]) == ["det.onnx"]
    assert res["base_digests"]["det.onnx"].startswith("sha256:")
    assert res["channels"] == ["stable", "canary"]
    assert not (repo / "metadata" / "timestamp.json").exists()  # staged, not visible

    rc, out, err = _cli(["repo", "publish", str(repo), *online, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["versions"] == {"targets": 1, "snapshot": 1, "timestamp": 1}
    assert sorted(os.listdir(repo / "metadata")) == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "root.json",
        "timestamp.json",
    ]
    # content-addressed file names: targets/<model>/<version>/<sha256>.<file>
    targets = Metadata.from_file(str(repo / "metadata" / "1.targets.json")).signed.targets
    for path, tf in targets.items():
        d, name = path.rsplit("/", 1)
        served = repo / "targets" / d / f"{tf.hashes['sha256']}.{name}"
        assert served.stat().st_size == tf.length
    assert not [p for p in (repo / "targets").rglob(".incoming-*")]
    timestamp = (repo / "metadata" / "timestamp.json").read_bytes()
    assert len(timestamp) < 1024  # what an idle device fetches per poll

    rc, out, err = _cli(["repo", "status", str(repo), "--json"], capsys)
    doc = json.loads(out)
    assert doc["published"] and doc["staged"] == []
    assert doc["models"]["ocr"]["canary"] == {"full": ["1", "2"], "residual": ["2<-1"]}
    assert 0 < doc["roles"]["timestamp"]["expires_in_s"] <= 6 * 3600
    rc, out, err = _cli(["repo", "status", str(repo)], capsys)
    assert rc == 0 and "ocr [stable]: full 1, 2; residual 2<-1" in out
    assert "timestamp v1, expires" in out


@needs_nginx
@pytest.mark.e2e
def test_ngclient_reads_the_repository_over_https(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path]
) -> None:
    repo = _init(tmp_path / "repo", keys)
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys))
    root_v1 = (repo.metadata_dir / "1.root.json").read_bytes()
    with Nginx(tmp_path / "nginx", repo.path) as web:
        dev = _device(tmp_path / "dev", web, root_v1)
        dev.refresh()
        assert dev.get_targetinfo("ocr/2/ocr-2.emp") is None
        # the publisher adds v2 full + residual; the same device sees them on its next check
        added = repo.add([pkgs["v2"], pkgs["r2"]], channels=["canary"])
        assert [f.kind for f in added] == ["full", "residual"]
        repo.publish(_signers(keys))
        dev = _device(tmp_path / "dev", web, root_v1)
        web.clear_log()
        dev.refresh()
        info = dev.get_targetinfo("ocr/2/ocr-2-from-1.emp")
        assert info is not None
        fields = TargetFields.from_custom(info.custom)
        assert (fields.model, fields.version, fields.kind, fields.base_version) == (
            "ocr",
            "2",
            "residual",
            "1",
        )
        assert fields.channels == ("canary",) and set(fields.base_digests) == {"det.onnx"}
        path = dev.download_target(info)
        assert Path(path).read_bytes() == pkgs["r2"].read_bytes()
        verify(Path(path), _trust(keys))  # the package signature still holds on the device
        full = dev.get_targetinfo("ocr/2/ocr-2.emp")
        assert full is not None and TargetFields.from_custom(full.custom).kind == "full"
        served = [(e.path, e.status) for e in web.wait_log(5)]
        digest = info.hashes["sha256"]
        assert served == [
            ("/metadata/2.root.json", 404),
            ("/metadata/timestamp.json", 200),
            ("/metadata/2.snapshot.json", 200),
            ("/metadata/2.targets.json", 200),
            (f"/targets/ocr/2/{digest}.ocr-2-from-1.emp", 200),
        ]


@needs_nginx
@pytest.mark.e2e
def test_device_walks_a_chain_of_rotations(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path]
) -> None:
    """A device provisioned with root v1 reaches root v4 after three rotations it missed
    (root key twice, the timestamp and targets keys in between)."""
    repo = _init(tmp_path / "repo", keys)
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys))
    root_v1 = (repo.metadata_dir / "root.json").read_bytes()
    r = repo.rotate(
        "root",
        old_key=public_key(keys["root"]),
        new_key=load_signer(keys["root2"]),
        root_signers=[load_signer(keys["root"])],
    )
    assert r.versions == {"root": 2}
    r = repo.rotate(
        "timestamp",
        old_key=public_key(keys["timestamp"]),
        new_key=load_signer(keys["timestamp2"]),
        root_signers=[load_signer(keys["root2"])],
    )
    assert r.versions == {"root": 3, "timestamp": 2}
    r = repo.rotate(
        "targets",
        old_key=public_key(keys["targets"]),
        new_key=load_signer(keys["targets2"]),
        root_signers=[load_signer(keys["root2"])],
        signers={
            "snapshot": load_signer(keys["snapshot"]),
            "timestamp": load_signer(keys["timestamp2"]),
        },
    )
    assert r.versions == {"root": 4, "targets": 2, "snapshot": 2, "timestamp": 3}
    # the old targets key is no longer accepted for a publish
    with pytest.raises(RepositoryError) as info:
        repo.publish(_signers(keys, timestamp="timestamp2"))
    assert info.value.code == "repo-wrong-key" and "targets" in info.value.message
    repo.add([pkgs["v2"]])
    repo.publish(_signers(keys, targets="targets2", timestamp="timestamp2"))
    with Nginx(tmp_path / "nginx", repo.path) as web:
        dev = _device(tmp_path / "dev", web, root_v1)
        dev.refresh()
        assert dev.get_targetinfo("ocr/2/ocr-2.emp") is not None
        trusted = Metadata.from_file(str(tmp_path / "dev" / "meta" / "root.json"))
        assert trusted.signed.version == 4
        fetched = [e.path for e in web.wait_log(7) if "root" in e.path]
        assert fetched == [f"/metadata/{v}.root.json" for v in (2, 3, 4, 5)]


def test_root_threshold_is_enforced_when_rotating(tmp_path: Path, keys: dict[str, Path]) -> None:
    repo = Repository.init(
        tmp_path / "repo",
        root_signers=[load_signer(keys["root"]), load_signer(keys["root2"])],
        root_threshold=2,
        online_keys={r: public_key(keys[r]) for r in ROLES},
    )
    kw = {"old_key": public_key(keys["root2"]), "new_key": load_signer(keys["root3"])}
    with pytest.raises(RepositoryError) as info:  # 1 of 2 old keys: not enough
        repo.rotate("root", root_signers=[load_signer(keys["root"])], **kw)  # type: ignore[arg-type]
    assert info.value.code == "repo-threshold" and "current root keys, got 1" in info.value.message
    with pytest.raises(RepositoryError) as info:
        repo.rotate("root", root_signers=[load_signer(keys["stranger"])], **kw)  # type: ignore[arg-type]
    assert info.value.code == "repo-wrong-key"
    assert not (repo.metadata_dir / "2.root.json").exists()
    # the old key that leaves cross-signs: root + root2 (old threshold), root + root3 (new)
    repo.rotate(
        "root",
        root_signers=[load_signer(keys["root"]), load_signer(keys["root2"])],
        **kw,  # type: ignore[arg-type]
    )
    v1 = Metadata.from_file(str(repo.metadata_dir / "1.root.json"))
    v2 = Metadata.from_file(str(repo.metadata_dir / "2.root.json"))
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)
    assert v2.signed.roles["root"].threshold == 2 and len(v2.signatures) == 3


@needs_nginx
@pytest.mark.e2e
def test_expired_metadata_is_refused_until_refreshed(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path]
) -> None:
    repo = _init(tmp_path / "repo", keys)
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys), now=datetime.now(UTC) - timedelta(days=2))  # a frozen repo
    root_v1 = (repo.metadata_dir / "root.json").read_bytes()
    with Nginx(tmp_path / "nginx", repo.path) as web:
        with pytest.raises(tuf_errors.ExpiredMetadataError):
            _device(tmp_path / "dev", web, root_v1).refresh()
        assert repo.status()["roles"]["timestamp"]["expires_in_s"] < 0
        changes = repo.refresh(_signers(keys))
        assert changes.versions == {"timestamp": 2}  # snapshot (7 d) still has 5 days
        dev = _device(tmp_path / "dev", web, root_v1)
        dev.refresh()
        assert dev.get_targetinfo("ocr/1/ocr-1.emp") is not None


@needs_nginx
@pytest.mark.e2e
def test_tampered_or_endless_target_is_refused(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path]
) -> None:
    repo = _init(tmp_path / "repo", keys)
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys))
    root_v1 = (repo.metadata_dir / "root.json").read_bytes()
    (served,) = (repo.targets_dir / "ocr" / "1").iterdir()
    good = served.read_bytes()
    with Nginx(tmp_path / "nginx", repo.path) as web:
        dev = _device(tmp_path / "dev", web, root_v1)
        dev.refresh()
        info = dev.get_targetinfo("ocr/1/ocr-1.emp")
        assert info is not None
        served.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same length, one bit off
        with pytest.raises(tuf_errors.LengthOrHashMismatchError):
            dev.download_target(info)
        served.write_bytes(good + b"\0" * 100_000)  # longer than the signed length
        with pytest.raises(tuf_errors.DownloadLengthMismatchError):
            dev.download_target(info)
        assert not list((tmp_path / "dev" / "dl").iterdir())
        served.write_bytes(good)
        assert Path(dev.download_target(info)).read_bytes() == good


# --- refresh, rotation details ----------------------------------------------------------


def test_refresh_re_signs_what_expires_within_the_window(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = datetime.now(UTC) - timedelta(days=400)
    repo = _init(tmp_path / "repo", keys, now=t0)
    repo.add([pkgs["v1"]])
    assert repo.publish(_signers(keys), now=t0).versions == {
        "targets": 1,
        "snapshot": 1,
        "timestamp": 1,
    }
    repo.add([pkgs["v2"]])  # staged stays staged across refreshes
    sig = _signers(keys)
    assert repo.refresh(sig, now=t0 + timedelta(hours=1)).versions == {}
    assert repo.refresh(sig, now=t0 + timedelta(hours=13)).versions == {"timestamp": 2}
    assert repo.refresh(sig, now=t0 + timedelta(days=6, hours=13)).versions == {
        "snapshot": 2,
        "timestamp": 3,
    }
    ch = repo.refresh(sig, within=timedelta(days=2), now=t0 + timedelta(days=89))
    assert ch.versions == {"targets": 2, "snapshot": 3, "timestamp": 4}
    st = repo.status(now=t0 + timedelta(days=89))
    assert [d["path"] for d in st["staged"]] == ["ocr/2/ocr-2.emp"]
    assert [d["path"] for d in st["targets"]] == ["ocr/1/ocr-1.emp"]
    # a root about to expire: online roles refreshed, then one loud error for cron
    with pytest.raises(RepositoryError) as info:
        repo.refresh(sig, within=timedelta(days=30), now=t0 + timedelta(days=360))
    assert info.value.code == "repo-root-expiring"
    assert repo.status()["roles"]["timestamp"]["version"] == 5
    # the CLI with the offline root key renews it too (real now: everything is expired)
    online = [a for r in ROLES for a in (f"--{r}-key", str(keys[r]))]
    rc, out, err = _cli(
        [
            "repo",
            "refresh",
            str(repo.path),
            *online,
            "--root-key",
            str(keys["root"]),
            "--within",
            "1d",
            "--json",
        ],
        capsys,
    )
    assert rc == 0, err
    assert json.loads(out)["versions"] == {"root": 2, "snapshot": 5, "timestamp": 6}
    st = repo.status()
    assert all(st["roles"][r]["expires_in_s"] > 0 for r in st["roles"])
    rc, out, err = _cli(["repo", "refresh", str(repo.path), *online], capsys)
    assert rc == 0 and out.strip() == "refreshed: nothing"


def test_rotate_online_key_needs_the_chain_keys_and_writes_nothing_without(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _init(tmp_path / "repo", keys)
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys))
    before = sorted(os.listdir(repo.metadata_dir))
    argv = [
        "repo",
        "rotate",
        str(repo.path),
        "--role",
        "snapshot",
        "--old-key",
        str(keys["snapshot"].with_suffix(".pub")),
        "--new-key",
        str(keys["snapshot2"]),
        "--root-key",
        str(keys["root"]),
    ]
    rc, out, err = _cli(argv, capsys)
    assert rc != 0 and err.count("\n") == 1
    assert err.startswith("edgeward: error [repo-usage]:") and "--timestamp-key" in err
    assert sorted(os.listdir(repo.metadata_dir)) == before
    rc, out, err = _cli([*argv, "--timestamp-key", str(keys["timestamp"]), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["versions"] == {"root": 2, "snapshot": 2, "timestamp": 2}
    st = repo.status()
    assert st["roles"]["snapshot"]["keys"] == [keys["snapshot2"].stem.replace("-", ":", 1)]
    repo.publish(_signers(keys, snapshot="snapshot2"))


# --- bad input: one clear line ----------------------------------------------------------


def _one_line_error(rc: int, err: str, code: str) -> str:
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith(f"edgeward: error [{code}]:"), err
    return err


def test_bad_inputs_give_one_clear_line(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    rc, _, err = _cli(["repo", "status", str(repo)], capsys)
    assert "repo init" in _one_line_error(rc, err, "repo-missing")
    rc, _, err = _cli(["repo", "add", str(tmp_path), str(pkgs["v1"])], capsys)
    _one_line_error(rc, err, "repo-missing")
    assert not (tmp_path / LOCK_FILE).exists()
    online = [a for r in ROLES for a in (f"--{r}-key", str(keys[r]))]
    init = ["repo", "init", str(repo), "--root-key", str(keys["root"]), *online]
    rc, _, err = _cli([*init, "--root-threshold", "2"], capsys)
    _one_line_error(rc, err, "repo-usage")
    rc, _, err = _cli([*init, "--timestamp-expiry", "soon"], capsys)
    assert "12h" in _one_line_error(rc, err, "repo-usage")
    rc, _, err = _cli(
        ["repo", "init", str(repo), "--root-key", str(keys["root"].with_suffix(".pub")), *online],
        capsys,
    )
    _one_line_error(rc, err, "repo-private-key")  # a root key signs: the .key
    assert _cli(init, capsys)[0] == 0
    rc, _, err = _cli(init, capsys)
    _one_line_error(rc, err, "repo-exists")

    junk = tmp_path / "junk.emp"
    junk.write_bytes(os.urandom(4096))
    rc, _, err = _cli(["repo", "add", str(repo), str(junk)], capsys)
    assert "junk.emp" in _one_line_error(rc, err, "tar-format")
    rc, _, err = _cli(["repo", "add", str(repo), str(pkgs["r2"])], capsys)
    assert "full ocr 2" in _one_line_error(rc, err, "repo-no-full")
    rc, _, err = _cli(["repo", "add", str(repo), str(pkgs["bare2"])], capsys)
    assert "--base BASE.emp" in _one_line_error(rc, err, "repo-residual-base")
    rc, _, err = _cli(["repo", "add", str(repo), str(pkgs["other2"])], capsys)
    assert "'ocr'" in _one_line_error(rc, err, "repo-residual-base")
    stranger = str(keys["stranger"].with_suffix(".pub"))
    rc, _, err = _cli(["repo", "add", str(repo), str(pkgs["v1"]), "--trust", stranger], capsys)
    _one_line_error(rc, err, "unknown-signer")
    rc, _, err = _cli(["repo", "add", str(repo), str(pkgs["v1"]), "--channel", "Bad Name"], capsys)
    _one_line_error(rc, err, "repo-target-fields")
    # nothing of the refused packages stays behind
    assert not [p for p in (repo / "targets").rglob("*") if p.is_file()]
    assert _cli(["repo", "add", str(repo), str(pkgs["v1"])], capsys)[0] == 0
    rc, _, err = _cli(["repo", "add", str(repo), str(pkgs["v1"])], capsys)
    assert "already staged" in _one_line_error(rc, err, "repo-duplicate")
    bad = [a.replace(str(keys["snapshot"]), str(keys["stranger"])) for a in online]
    rc, _, err = _cli(["repo", "publish", str(repo), *bad], capsys)
    assert "--snapshot-key" in _one_line_error(rc, err, "repo-wrong-key")
    assert not (repo / "metadata" / "timestamp.json").exists()
    assert _cli(["repo", "publish", str(repo), *online], capsys)[0] == 0
    rc, _, err = _cli(["repo", "add", str(repo), str(pkgs["v1"])], capsys)
    assert "already published" in _one_line_error(rc, err, "repo-duplicate")
    rc, _, err = _cli(
        [
            "repo",
            "rotate",
            str(repo),
            "--role",
            "targets",
            "--old-key",
            str(keys["snapshot"]),
            "--new-key",
            str(keys["targets2"]),
            "--root-key",
            str(keys["root"]),
        ],
        capsys,
    )
    _one_line_error(rc, err, "repo-wrong-key")
    # a second publisher while one holds the lock
    fd = os.open(repo / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rc, _, err = _cli(["repo", "publish", str(repo), *online], capsys)
        _one_line_error(rc, err, "repo-busy")
    finally:
        os.close(fd)


def test_parse_duration() -> None:
    assert parse_duration("90d") == timedelta(days=90)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("3600") == timedelta(hours=1)
    for bad in ("", "0", "-1d", "1y", "1.5h"):
        with pytest.raises(RepositoryError):
            parse_duration(bad)


# --- crash safety -------------------------------------------------------------------------


def test_an_interrupted_publish_leaves_the_old_repository_and_no_reused_version(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that dies before timestamp.json (the file that makes a version visible)
    serves the old version; the retry neither loses the staged package nor reuses the
    orphaned version numbers a CDN may have cached."""
    import agent.repository.publisher as publisher

    repo = _init(tmp_path / "repo", keys)
    with pytest.raises(RepositoryError) as info:
        repo.refresh(_signers(keys))
    assert info.value.code == "repo-unpublished"
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys))
    repo.add([pkgs["v2"]])
    real = publisher.atomic_write_bytes

    def dies_at(name: str):  # type: ignore[no-untyped-def]
        def write(path: Path, data: bytes, mode: int = 0o644) -> None:
            if path.name == name:
                raise OSError(28, "No space left on device")
            real(path, data, mode)

        return write

    monkeypatch.setattr(publisher, "atomic_write_bytes", dies_at("timestamp.json"))
    with pytest.raises(OSError):
        repo.publish(_signers(keys))
    st = repo.status()
    assert {r: st["roles"][r]["version"] for r in ROLES} == dict.fromkeys(ROLES, 1)
    assert [d["path"] for d in st["staged"]] == ["ocr/2/ocr-2.emp"]
    assert (repo.metadata_dir / "2.targets.json").exists()  # orphan, never referenced
    monkeypatch.setattr(publisher, "atomic_write_bytes", real)
    ch = repo.publish(_signers(keys))
    assert ch.versions == {"targets": 3, "snapshot": 3, "timestamp": 2}
    assert ch.added == ("ocr/2/ocr-2.emp",)

    # a rotation that dies between <v>.root.json and root.json: devices already see
    # 2.root.json, so the next command takes it as the root in force and repairs root.json
    monkeypatch.setattr(publisher, "atomic_write_bytes", dies_at("root.json"))
    with pytest.raises(OSError):
        repo.rotate(
            "root",
            old_key=public_key(keys["root"]),
            new_key=load_signer(keys["root2"]),
            root_signers=[load_signer(keys["root"])],
        )
    monkeypatch.setattr(publisher, "atomic_write_bytes", real)
    assert Metadata.from_file(str(repo.metadata_dir / "root.json")).signed.version == 1
    assert repo.status()["roles"]["root"]["version"] == 2
    repo.publish(_signers(keys))
    assert Metadata.from_file(str(repo.metadata_dir / "root.json")).signed.version == 2


@needs_nginx
@pytest.mark.e2e
def test_the_documented_nginx_locations_cache_and_hide_the_right_files(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path]
) -> None:
    """docs/REPOSITORY.md's nginx example: timestamp.json is revalidated, the versioned
    files are immutable, the publisher's own files are not served."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "REPOSITORY.md").read_text()
    block = doc.split("```nginx", 1)[1].split("```", 1)[0]
    locations = "\n".join(ln for ln in block.splitlines() if ln.strip().startswith("location"))
    assert locations.count("location") == 5
    repo = _init(tmp_path / "repo", keys)
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys))
    (served,) = (repo.targets_dir / "ocr" / "1").iterdir()
    with Nginx(tmp_path / "nginx", repo.path, extra_server=locations) as web:

        def get(path: str) -> requests.Response:
            return requests.get(f"{web.url}{path}", verify=str(web.ca_bundle), timeout=10)

        assert get("/metadata/timestamp.json").headers["Cache-Control"] == "no-cache"
        assert get("/metadata/root.json").headers["Cache-Control"] == "no-cache"
        for path in ("/metadata/1.snapshot.json", f"/targets/ocr/1/{served.name}"):
            r = get(path)
            assert r.status_code == 200 and "immutable" in r.headers["Cache-Control"]
        assert get("/publisher.json").status_code == 404
        assert get("/.publisher.lock").status_code == 404
        r = requests.get(
            f"{web.url}/targets/ocr/1/{served.name}",
            headers={"Range": "bytes=10-"},
            verify=str(web.ca_bundle),
            timeout=10,
        )
        assert r.status_code == 206 and r.content == served.read_bytes()[10:]


@needs_nginx
@pytest.mark.e2e
def test_rollback_and_a_revoked_key_are_refused(
    tmp_path: Path, keys: dict[str, Path], pkgs: dict[str, Path]
) -> None:
    """A device that saw timestamp v2 refuses v1 served again (rollback); after the
    timestamp key is rotated, a timestamp signed by the old key is refused too."""
    repo = _init(tmp_path / "repo", keys)
    repo.add([pkgs["v1"]])
    repo.publish(_signers(keys))
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.add([pkgs["v2"]])
    repo.publish(_signers(keys))
    root_v1 = (repo.metadata_dir / "1.root.json").read_bytes()
    ts = repo.metadata_dir / "timestamp.json"
    with Nginx(tmp_path / "nginx", repo.path) as web:
        _device(tmp_path / "dev", web, root_v1).refresh()
        new_timestamp = ts.read_bytes()
        ts.write_bytes(old_timestamp)
        with pytest.raises(tuf_errors.BadVersionNumberError):
            _device(tmp_path / "dev", web, root_v1).refresh()
        ts.write_bytes(new_timestamp)
        repo.rotate(
            "timestamp",
            old_key=public_key(keys["timestamp"]),
            new_key=load_signer(keys["timestamp2"]),
            root_signers=[load_signer(keys["root"])],
        )
        dev = _device(tmp_path / "dev", web, root_v1)
        dev.refresh()  # walks to root v2, takes timestamp v3 signed by the new key
        # the attacker holding the old timestamp key signs a "newer" timestamp
        forged = Metadata.from_bytes(ts.read_bytes())
        forged.signed.version += 10
        forged.sign(load_signer(keys["timestamp"]))
        ts.write_bytes(forged.to_bytes())
        with pytest.raises(tuf_errors.UnsignedMetadataError):
            _device(tmp_path / "dev", web, root_v1).refresh()
