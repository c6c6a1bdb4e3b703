"""TUF and transport attacks against a real daemon following a real nginx.

Each attack is refused with a logged reason, the old model keeps serving, and
``edgeward status`` shows the error; then the repository is repaired and the next
check is clean again (so the attacks run one after the other against one box).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import MetaFile

from tests.daemon_util import (
    DaemonProc,
    infer_json,
    make_package,
    needs_worker,
    signing_key,
    start_daemon,
    write_config,
)
from tests.nginx_util import Nginx, needs_nginx, new_ca
from tests.repo_util import (
    TufRepo,
    fields_of,
    part_files,
    write_repo_config,
)

pytestmark = [
    pytest.mark.e2e,
    needs_worker,
    needs_nginx,
]


@dataclass
class Box:
    repo: TufRepo
    nginx: Nginx
    d: DaemonProc
    pkgs: dict[str, Path]
    work: Path

    def check(self) -> dict[str, object]:
        r = self.d.cli("check", "--json", timeout=180)
        out: dict[str, object] = json.loads(r.stdout)
        return out

    def status(self) -> dict[str, object]:
        out: dict[str, object] = json.loads(self.d.cli("status", "--json").stdout)
        return out

    def serves_v1(self) -> None:
        status, body = infer_json(self.d.infer_sock, "tiny", [[1.0, 1.0, 1.0, 1.0]])
        assert status == 200 and body["outputs"][0]["data"][0] == 2.0

    def refused(self, code: str, words: str) -> str:
        """A check fails with ``code``; v1 serves; status and log name the reason."""
        res = self.check()
        failed = res["failed"]
        assert isinstance(failed, dict) and failed, res
        reason = " ".join(str(v) for v in failed.values())
        assert f"[{code}]" in reason and words in reason, reason
        self.serves_v1()
        st = self.status()
        assert st["models"] == {"tiny": "1"}
        assert words in json.dumps(st)  # the repository's last error or the model's
        assert words in self.d.log()
        assert [p for p in part_files(self.d.state_dir) if not p.endswith((".part", ".json"))] == []
        return reason

    def clean(self) -> None:
        res = self.check()
        assert res["failed"] == {} and res["installed"] == {}, res
        self.serves_v1()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    work = tmp_path_factory.mktemp("attacks")
    key, trust = signing_key(work)
    pkgs = {
        "1": make_package(work, key, "tiny", "1", scale=2.0),
        "2": make_package(work, key, "tiny", "2", scale=3.0),
    }
    repo = TufRepo.create(work / "repo")
    repo.add(pkgs["1"], fields_of(pkgs["1"]))
    repo.publish()
    nginx = Nginx(work / "nginx", work / "repo")
    rtable = write_repo_config(work, nginx, repo, read_timeout=3.0, retries=1, backoff_s=0.1)
    cfg = write_config(work / "d", trust_dir=trust, extra=rtable, check_on_start=True)
    d = start_daemon(work / "d", config=cfg)
    b = Box(repo, nginx, d, pkgs, work)
    try:
        deadline = time.monotonic() + 120
        while b.status()["models"] != {"tiny": "1"}:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.2)
        yield b
    finally:
        d.stop()
        nginx.stop()


# --- metadata -----------------------------------------------------------------------


def test_timestamp_rollback(box: Box) -> None:
    old = box.repo.history["timestamp"][box.repo.md["timestamp"].signed.version]
    box.repo.publish()
    box.clean()
    box.repo.put_raw("timestamp", old)
    box.refused("repo-metadata", "must be >=")
    box.repo.publish()
    box.clean()


def test_snapshot_rollback(box: Box) -> None:
    box.repo.publish()
    box.clean()
    ts = box.repo.md["timestamp"].signed
    good = ts.snapshot_meta
    ts.snapshot_meta = MetaFile(version=good.version - 1)
    ts.version += 1
    box.repo._write("timestamp")
    box.refused("repo-metadata", "snapshot")
    box.repo.publish()
    box.clean()


def test_targets_rollback(box: Box) -> None:
    box.repo.publish()
    box.clean()
    snap = box.repo.md["snapshot"].signed
    tv = box.repo.md["targets"].signed.version
    snap.meta["targets.json"] = MetaFile(version=tv - 1)
    snap.version += 1
    box.repo._write("snapshot")
    box.repo.publish(bump=("timestamp",))
    box.refused("repo-metadata", "targets")
    box.repo.publish()
    box.clean()


def test_freeze_expired_timestamp(box: Box) -> None:
    ts = box.repo.md["timestamp"].signed
    ts.expires = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    ts.version += 1
    box.repo._write("timestamp")
    box.refused("repo-metadata", "expired")
    ts.expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    box.repo.publish()
    box.clean()


def test_mix_and_match(box: Box) -> None:
    """The snapshot names targets version N; the file served as N is version N-1."""
    box.repo.publish()
    box.clean()
    older = box.repo.history["targets"][box.repo.md["targets"].signed.version]
    box.repo.publish()
    box.repo.put_raw("targets", older, version=box.repo.md["targets"].signed.version)
    box.refused("repo-metadata", "targets")
    box.repo.publish()
    box.clean()


def test_untrusted_key(box: Box) -> None:
    rogue = CryptoSigner.generate_ed25519()
    ts = box.repo.md["timestamp"].signed
    data = box.repo.sign_with("timestamp", [rogue], version=ts.version + 1)
    box.repo.put_raw("timestamp", data)
    box.refused("repo-metadata", "UnsignedMetadataError")
    box.repo.publish()
    box.clean()


def test_signatures_below_threshold(box: Box) -> None:
    """Root v2 asks two targets signatures; a targets file with one is refused."""
    second = CryptoSigner.generate_ed25519()
    root = box.repo.md["root"].signed
    root.add_key(second.public_key, "targets")
    root.roles["targets"].threshold = 2
    box.repo.signers["targets"].append(second)
    box.repo.new_root()
    box.repo.publish()
    box.clean()  # the box follows the root chain to v2
    box.repo.signers["targets"].pop()
    box.repo.publish()
    box.refused("repo-metadata", "UnsignedMetadataError")
    box.repo.signers["targets"].append(second)
    box.repo.publish()
    box.clean()


# --- packages -----------------------------------------------------------------------


def _offer_v2(box: Box, *, length: int | None = None) -> Callable[[], None]:
    tf = box.repo.add(box.pkgs["2"], fields_of(box.pkgs["2"]), length=length)
    box.repo.publish()

    def undo() -> None:
        box.repo.remove(tf.path)
        box.repo.publish()
        box.clean()

    return undo


def test_package_longer_than_declared(box: Box) -> None:
    undo = _offer_v2(box, length=box.pkgs["2"].stat().st_size - 512)
    box.refused("repo-length", "endless data")
    undo()


def test_package_with_wrong_hash(box: Box) -> None:
    undo = _offer_v2(box)
    tf = box.repo.md["targets"].signed.targets["tiny/2/tiny-2.emp"]
    served = box.repo.served_file(tf)
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data))
    box.refused("repo-hash", "does not match the signed target")
    assert not any(p.endswith(".part") for p in part_files(box.d.state_dir))
    undo()


# --- transport ----------------------------------------------------------------------


def test_stalled_server_is_cut(box: Box) -> None:
    undo = _offer_v2(box)
    box.nginx.reconfigure(extra_server="location /targets/ { limit_rate 16; }")
    try:
        box.refused("repo-download", "slow-retrieval")
    finally:
        box.nginx.reconfigure(extra_server="")
    undo()


def test_redirect_to_another_host(box: Box) -> None:
    undo = _offer_v2(box)
    port = box.nginx.port
    box.nginx.reconfigure(redirects={"/targets/": f"https://localhost:{port}"})
    try:
        box.refused("repo-redirect", "another origin")
    finally:
        box.nginx.reconfigure(extra_server="")
    undo()


@pytest.mark.parametrize("kind", ["expired", "wrong-host", "unknown-ca"])
def test_bad_tls_certificate(box: Box, kind: str) -> None:
    why = {"expired": "has expired", "wrong-host": "mismatch", "unknown-ca": "issuer"}[kind]
    if kind == "unknown-ca":  # the same port, a certificate from a CA the box never saw
        box.nginx.stop()
        other = Nginx(box.work / "nginx-other", box.repo.root_dir, port=box.nginx.port, ca=new_ca())
    else:
        box.nginx.reconfigure(cert=kind)
    try:
        reason = box.refused("repo-download", "TLS verification failed")
        assert why in reason, reason
    finally:
        if kind == "unknown-ca":
            other.stop()
            box.nginx.start()
        else:
            box.nginx.reconfigure(cert="good")
    box.clean()
