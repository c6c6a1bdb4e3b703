"""Test helpers for the device side of the TUF repository.

:class:`TufRepo` writes a static repository with ``tuf.api.metadata`` directly (the way
``edgeward repo`` lays it out: ``metadata/`` and ``targets/``, consistent snapshots,
content-addressed target files) and keeps every published version, so tests can stage
attacks (rollback, freeze, mix-and-match, bad signatures). ``tests.nginx_util.Nginx``
serves it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.repository.fields import TargetFields, target_path
from tests.nginx_util import Nginx

ROLES = ("root", "targets", "snapshot", "timestamp")


def _future(days: float) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


@dataclass
class TufRepo:
    """A TUF repository on disk with one key per role (threshold 1 unless set)."""

    root_dir: Path
    signers: dict[str, list[CryptoSigner]] = field(default_factory=dict)
    md: dict[str, Metadata[Any]] = field(default_factory=dict)
    history: dict[str, dict[int, bytes]] = field(default_factory=dict)

    @classmethod
    def create(cls, root_dir: Path) -> TufRepo:
        repo = cls(root_dir)
        (root_dir / "metadata").mkdir(parents=True, exist_ok=True)
        (root_dir / "targets").mkdir(parents=True, exist_ok=True)
        root = Root(expires=_future(365), consistent_snapshot=True)
        for role in ROLES:
            s = CryptoSigner.generate_ed25519()
            repo.signers[role] = [s]
            root.add_key(s.public_key, role)
        repo.md["root"] = Metadata(root)
        repo.md["targets"] = Metadata(Targets(expires=_future(90)))
        repo.md["snapshot"] = Metadata(Snapshot(expires=_future(7)))
        repo.md["timestamp"] = Metadata(Timestamp(expires=_future(1)))
        repo._write("root")
        repo.publish()
        return repo

    @property
    def root_json(self) -> Path:
        return self.root_dir / "metadata" / "1.root.json"

    def _sign(self, role: str) -> bytes:
        md = self.md[role]
        md.signatures.clear()
        for s in self.signers[role]:
            md.sign(s, append=True)
        return md.to_bytes(JSONSerializer(compact=True))

    def _write(self, role: str, data: bytes | None = None) -> bytes:
        data = self._sign(role) if data is None else data
        ver = self.md[role].signed.version
        self.history.setdefault(role, {})[ver] = data
        meta = self.root_dir / "metadata"
        if role != "timestamp":
            (meta / f"{ver}.{role}.json").write_bytes(data)
        if role in ("timestamp", "root"):
            (meta / f"{role}.json").write_bytes(data)
        return data

    def add(self, pkg: Path, fields: TargetFields, *, length: int | None = None) -> TargetFile:
        """Copy ``pkg`` in as a content-addressed target with ``fields`` (not published)."""
        data = pkg.read_bytes()
        path = target_path(fields)
        digest = hashlib.sha256(data).hexdigest()
        d, _, base = path.rpartition("/")
        dest = self.root_dir / "targets" / d / f"{digest}.{base}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        tf = TargetFile(
            length if length is not None else len(data),
            {"sha256": digest},
            path,
            unrecognized_fields={"custom": fields.to_custom()},
        )
        self.md["targets"].signed.targets[path] = tf
        return tf

    def remove(self, path: str) -> None:
        """Drop a target from the targets role (publish() to take effect)."""
        self.md["targets"].signed.targets.pop(path, None)

    def new_root(self) -> None:
        """Sign and write the next root version (after changes to ``md["root"]``) with
        the keys of the current root and the new one, as a rotation does."""
        old = list(self.signers["root"])
        self.md["root"].signed.version += 1
        md = self.md["root"]
        md.signatures.clear()
        for s in old:
            md.sign(s, append=True)
        self._write("root", md.to_bytes(JSONSerializer(compact=True)))

    def served_file(self, tf: TargetFile) -> Path:
        d, _, base = tf.path.rpartition("/")
        return self.root_dir / "targets" / d / f"{tf.hashes['sha256']}.{base}"

    def publish(self, *, bump: tuple[str, ...] = ("targets", "snapshot", "timestamp")) -> None:
        """New versions of targets → snapshot → timestamp, signed and written."""
        if "targets" in bump:
            self.md["targets"].signed.version += 1
            self._write("targets")
        if "snapshot" in bump:
            snap = self.md["snapshot"].signed
            snap.meta["targets.json"] = MetaFile(version=self.md["targets"].signed.version)
            snap.version += 1
            self._write("snapshot")
        if "timestamp" in bump:
            ts = self.md["timestamp"].signed
            ts.snapshot_meta = MetaFile(version=self.md["snapshot"].signed.version)
            ts.version += 1
            self._write("timestamp")

    def put_raw(self, role: str, data: bytes, version: int | None = None) -> None:
        """Serve ``data`` as ``role`` (an attack: old bytes, foreign signatures...)."""
        meta = self.root_dir / "metadata"
        if role == "timestamp":
            (meta / "timestamp.json").write_bytes(data)
        else:
            assert version is not None
            (meta / f"{version}.{role}.json").write_bytes(data)

    def sign_with(self, role: str, signers: list[CryptoSigner], **changes: Any) -> bytes:
        """Bytes of ``role`` with ``changes`` applied and signed by ``signers`` only
        (the repository's own state is left as it was)."""
        md = Metadata.from_bytes(self.md[role].to_bytes())
        for k, v in changes.items():
            setattr(md.signed, k, v)
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        return md.to_bytes(JSONSerializer(compact=True))


# --- serving it ----------------------------------------------------------------------


def bytes_for(nginx: Nginx, suffix: str, *, settle: float = 0.3) -> int:
    """Body bytes nginx sent for paths ending with ``suffix`` (its log line is written
    after the response, so give it a moment)."""
    time.sleep(settle)
    return sum(e.body_bytes for e in nginx.log() if e.path.endswith(suffix))


def write_repo_config(
    work: Path, nginx: Nginx, repo: TufRepo, *, channel: str = "stable", **extra: Any
) -> str:
    """The ``[repository]`` table for tests (appended to the daemon config)."""
    lines = [
        "[repository]",
        f'urls = ["{nginx.url}/"]',
        f'channel = "{channel}"',
        f'root = "{repo.root_json}"',
        f'ca_bundle = "{nginx.ca_bundle}"',
    ]
    defaults = {"connect_timeout": 5.0, "read_timeout": 10.0, "backoff_s": 0.1, "retries": 2}
    defaults.update(extra)
    for k, v in defaults.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def part_files(state: Path) -> list[str]:
    d = state / "staging"
    return sorted(os.listdir(d)) if d.is_dir() else []


def rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fields_of(pkg: Path, channels: tuple[str, ...] = ("stable",)) -> TargetFields:
    """The target fields of a package, read from its manifest (as ``edgeward repo add``)."""
    from agent.package import read_manifest

    man = read_manifest(pkg)
    if man.base is None:
        return TargetFields(str(man.name), str(man.version), channels)
    digests = {m.name: str(m.base_digest) for m in man.models if m.base_digest}
    return TargetFields(
        str(man.name),
        str(man.version),
        channels,
        kind="residual",
        base_version=str(man.base.version),
        base_digests=digests,
    )


def make_residual(
    work: Path, key: Path, name: str, version: str, base: Path, *, scale: float
) -> Path:
    """A signed residual ``.emp`` of the tiny model against the package ``base``."""
    from tests.daemon_util import edgeward, tiny_model_dir

    src = tiny_model_dir(work / "src-res", name, version, scale=scale)
    out = work / "pkgs" / f"{name}-{version}-from-base.emp"
    out.parent.mkdir(parents=True, exist_ok=True)
    edgeward(
        "pack",
        "--model",
        str(src / "Model" / "tiny.onnx"),
        "--name",
        name,
        "--version",
        version,
        "--signing-key",
        str(key),
        "--samples",
        str(src / "Meta-info" / "samples"),
        "--base",
        str(base),
        "-o",
        str(out),
    )
    return out


def big_onnx(path: Path, *, mib: int, seed: int = 0, zeros: bool = False) -> Path:
    """``y = max(x @ W, axis=1)`` with a random (incompressible) ``W`` of about ``mib`` MiB:
    a package large enough to cut a download half-way. ``zeros``: W is all zeros, so
    the package is tiny on the wire and ``mib`` MiB once unpacked."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = mib * (1 << 20) // 16
    if zeros:
        w = np.zeros((4, k), dtype=np.float32)
    else:
        w = np.random.default_rng(seed).standard_normal((4, k)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("ReduceMax", ["z"], ["y"], keepdims=1, axes=[1]),
    ]
    graph = helper.make_graph(nodes, "big", [x], [y], initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def big_package(
    work: Path,
    key: Path,
    name: str,
    version: str,
    *,
    mib: int,
    seed: int,
    zeros: bool = False,
    program: Path | None = None,
) -> Path:
    """A signed ``.emp`` around :func:`big_onnx` (no self-test samples); ``program``: a
    ``Program/`` directory to bundle (run scripts, a package converter)."""
    from tests.daemon_util import edgeward

    model = big_onnx(work / f"big-{version}" / "big.onnx", mib=mib, seed=seed, zeros=zeros)
    out = work / "pkgs" / f"{name}-{version}.emp"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["pack", "--model", str(model), "--name", name, "--version", version]
    args += ["--signing-key", str(key), "-o", str(out)]
    if program is not None:
        args += ["--program", str(program)]
    edgeward(*args)
    return out


@dataclass
class PubRepo:
    """A repository built by the publisher CLI (``edgeward repo``), one key per role."""

    root_dir: Path
    keys: dict[str, Path]  # role -> private key
    trust: Path  # package signers' public key, for ``repo add --trust``

    @classmethod
    def create(cls, work: Path, trust: Path) -> PubRepo:
        from tests.daemon_util import edgeward

        keys: dict[str, Path] = {}
        for role in ROLES:
            kdir = work / "tuf-keys" / role
            edgeward("keygen", "--kind", "signing", "--out", str(kdir))
            keys[role] = next(kdir.glob("*.key"))
        root = work / "pubrepo"
        edgeward(
            "repo",
            "init",
            str(root),
            "--root-key",
            str(keys["root"]),
            *(
                a
                for r in ("targets", "snapshot", "timestamp")
                for a in (f"--{r}-key", str(keys[r].with_suffix(".pub")))
            ),
        )
        return cls(root, keys, next(trust.glob("*.pub")))

    @property
    def root_json(self) -> Path:
        return self.root_dir / "metadata" / "1.root.json"

    def add(self, *pkgs: Path) -> None:
        from tests.daemon_util import edgeward

        edgeward("repo", "add", str(self.root_dir), *map(str, pkgs), "--trust", str(self.trust))

    def publish(self) -> None:
        from tests.daemon_util import edgeward

        edgeward(
            "repo",
            "publish",
            str(self.root_dir),
            *(
                a
                for r in ("targets", "snapshot", "timestamp")
                for a in (f"--{r}-key", str(self.keys[r]))
            ),
        )
