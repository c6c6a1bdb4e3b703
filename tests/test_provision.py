"""``edgeward provision``: a device key the service user can read (and nobody else),
publisher keys in the trust directory; the daemon's own key loader accepts the result."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from agent.cli import main
from agent.keys import load_keyring

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="provision sets owners: run as root")


def test_provision_creates_a_readable_device_key_and_trusts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = pwd.getpwnam("nobody")
    assert main(["keygen", "--kind", "signing", "--out", str(tmp_path / "pub")]) == 0
    signing_pub = next((tmp_path / "pub").glob("*.pub"))
    cfg = tmp_path / "edgeward.toml"
    cfg.write_text(
        f'[paths]\nkeys_dir = "{tmp_path / "keys"}"\ntrust_dir = "{tmp_path / "trust"}"\n'
    )
    capsys.readouterr()
    args = ["provision", "--config", str(cfg), "--user", "nobody", "--json"]
    assert main([*args, "--trust", str(signing_pub)]) == 0
    doc = json.loads(capsys.readouterr().out)
    key = Path(doc["device_key"])
    assert doc["created"] is True and doc["device_key_id"].startswith("x25519:")
    st = key.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (user.pw_uid, user.pw_gid, 0o600)
    kd = (tmp_path / "keys").stat()
    assert (kd.st_uid, kd.st_mode & 0o777) == (user.pw_uid, 0o700)
    assert Path(doc["device_public_key"]).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "trust" / signing_pub.name).read_bytes() == signing_pub.read_bytes()
    assert len(doc["trusted"]) == 1 and doc["trusted"][0].startswith("ed25519:")
    assert load_keyring([tmp_path / "keys"])  # the daemon's loader takes it
    # again: the key is kept, not replaced
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["created"] is False and again["device_key_id"] == doc["device_key_id"]


def test_provision_names_a_missing_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "edgeward.toml"
    cfg.write_text(f'[paths]\nkeys_dir = "{tmp_path / "keys"}"\n')
    assert main(["provision", "--config", str(cfg), "--user", "no-such-user-ew"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("edgeward: error [provision-user]") and err.count("\n") == 1
