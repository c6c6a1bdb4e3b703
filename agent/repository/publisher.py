"""The publisher side of the model repository: a static TUF repository of ``.emp`` files.

A repository is a directory of plain files that any web server, object store or CDN can
host (``docs/REPOSITORY.md``)::

    DIR/metadata/1.root.json … N.root.json, root.json    root chain (offline keys)
    DIR/metadata/<v>.targets.json, <v>.snapshot.json      consistent snapshots
    DIR/metadata/timestamp.json                           rewritten by every publish
    DIR/targets/<model>/<version>/<sha256>.<file>.emp     content-addressed packages
    DIR/publisher.json                                    expiries and staged targets (not served)

Roles and keys are TUF's (python-tuf ``tuf.api.metadata``, Ed25519 keys from
``edgeward keygen --kind signing``, signed through securesystemslib's ``CryptoSigner``):
root (threshold of offline keys) delegates to one online key each for targets, snapshot
and timestamp. ``publish`` and ``refresh`` need only online keys; ``init`` and
``rotate`` need root keys. Every target carries the Edgeward fields of
:mod:`agent.repository.fields`.

Crash safety: every file is written to a temporary name in its directory, fsynced and
renamed (:func:`agent.durable.atomic_write_bytes`). New versioned files are written before the
files that point at them (targets → snapshot → root → timestamp), so a client or a CDN
reading during a publish sees the old consistent set or the new one. A lock file keeps a
cron ``refresh`` and a manual ``publish`` from interleaving.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Key,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.durable import atomic_replace, atomic_write_bytes
from agent.errors import EdgewardError, PackageError, RepositoryError
from agent.keys import key_id as edgeward_key_id
from agent.keys import load_private, load_public
from agent.manifest import Manifest
from agent.repository.fields import FIELDS_KEY, TargetFields, target_path

logger = logging.getLogger(__name__)

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
ROLES = ("root", *ONLINE_ROLES)
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
STATE_FILE = "publisher.json"
LOCK_FILE = ".publisher.lock"
MAX_METADATA_BYTES = 16 << 20  # our own files, still read with a cap
_COPY = 4 << 20  # bytes per read when copying a package
_DURATION_RE = re.compile(r"^([0-9]{1,9})([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Re-signing pushes each role after the one re-signed: a new targets needs a new
#: snapshot, a new snapshot a new timestamp.
_CHAIN = {"targets": ("targets", "snapshot", "timestamp"), "snapshot": ("snapshot", "timestamp")}
_SERIALIZER = JSONSerializer(compact=True)


def _fail(msg: str, code: str) -> RepositoryError:
    return RepositoryError(msg, code=code)


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``, ``3600s`` or plain seconds."""
    m = _DURATION_RE.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise _fail(
            f"duration {text!r}: expected a positive number with s, m, h, d or w (e.g. 12h)",
            "repo-usage",
        )
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def format_duration(td: timedelta) -> str:
    s = int(td.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


# --- keys -----------------------------------------------------------------------------


def _ed25519_public(path: Path) -> Ed25519PublicKey:
    """The public half of a ``.pub`` or ``.key`` file (signing keys only)."""
    pub = load_public(path) if Path(path).suffix == ".pub" else load_private(path).public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise _fail(f"{path} is not an Ed25519 signing key", "repo-key-type")
    return pub


def tuf_key(pub: Ed25519PublicKey) -> SSlibKey:
    """The TUF key of an Edgeward signing key (its keyid is TUF's: SHA-256 of the
    canonical key object)."""
    return SSlibKey.from_crypto(pub)


def public_key(path: Path) -> SSlibKey:
    """The TUF public key in a ``.pub`` file (or the public half of a ``.key``)."""
    return tuf_key(_ed25519_public(path))


def load_signer(path: Path) -> CryptoSigner:
    """A securesystemslib signer over an ``edgeward keygen --kind signing`` key file.

    ``CryptoSigner`` takes the ``cryptography`` Ed25519 key :func:`agent.keys.load_private`
    returns (file mode checked there), so no adapter class is needed.
    """
    if Path(path).suffix == ".pub":
        raise _fail(f"{path} is a public key; signing needs the private .key", "repo-private-key")
    priv = load_private(path)
    if not isinstance(priv, Ed25519PrivateKey):
        raise _fail(f"{path} is not an Ed25519 signing key", "repo-key-type")
    return CryptoSigner(priv, tuf_key(priv.public_key()))


def key_name(key: Key) -> str:
    """The ``edgeward keygen`` id (``ed25519:…``, as in the key's file name) of a TUF key."""
    raw = key.keyval.get("public") if isinstance(key.keyval, dict) else None
    if key.keytype != "ed25519" or not isinstance(raw, str):
        return key.keyid[:16]
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw))
    except ValueError:
        return key.keyid[:16]
    return edgeward_key_id(pub)


def _signer_name(signer: Signer) -> str:
    return key_name(signer.public_key)


# --- on-disk state ----------------------------------------------------------------------


@dataclass
class _State:
    """What is on disk: the newest root, the published online roles, the settings."""

    root: Metadata[Root]
    targets: Metadata[Targets] | None
    snapshot: Metadata[Snapshot] | None
    timestamp: Metadata[Timestamp] | None
    expiry: dict[str, timedelta]
    staged: dict[str, TargetFile] = field(default_factory=dict)


@dataclass(frozen=True)
class Changes:
    """What a command wrote: new versions by role and target paths added."""

    versions: dict[str, int]
    added: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"versions": dict(self.versions), "added": list(self.added)}


def _read_capped(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise _fail(f"{path} is larger than {MAX_METADATA_BYTES} bytes", "repo-corrupt")
    return data


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class Repository:
    """A publisher's working copy of a repository directory (see the module docstring).

    Methods that change the repository take the lock, load the state, write new files
    atomically and return :class:`Changes`. ``now`` exists for tests that need metadata
    made at another time (expired, about to expire).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metadata_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"

    # -- creating -------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        root_signers: Sequence[Signer],
        root_threshold: int = 1,
        online_keys: Mapping[str, Key],
        expiry: Mapping[str, timedelta] | None = None,
        now: datetime | None = None,
    ) -> Repository:
        """Create ``path`` with root v1 (signed by every root key). Online roles are
        published by the first :meth:`publish`, so this needs no online private key."""
        repo = cls(path)
        if (repo.metadata_dir / "root.json").exists():
            raise _fail(f"{path} already holds a repository (metadata/root.json)", "repo-exists")
        if not root_signers:
            raise _fail("init needs at least one --root-key", "repo-usage")
        keyids = {s.public_key.keyid for s in root_signers}
        if len(keyids) != len(root_signers):
            raise _fail("the same root key was given twice", "repo-usage")
        if not 1 <= root_threshold <= len(root_signers):
            raise _fail(
                f"--root-threshold {root_threshold} must be between 1 and the "
                f"{len(root_signers)} root key(s) given",
                "repo-usage",
            )
        missing = [r for r in ONLINE_ROLES if r not in online_keys]
        if missing:
            raise _fail(f"init needs a key for {', '.join(missing)}", "repo-usage")
        online = {online_keys[r].keyid for r in ONLINE_ROLES}
        if online & keyids:
            raise _fail(
                "a root key must not also be an online (targets/snapshot/timestamp) key",
                "repo-usage",
            )
        exp = repo._expiry_with(dict(DEFAULT_EXPIRY), expiry)
        t = _now(now)
        root = Root(expires=t + exp["root"], consistent_snapshot=True)
        for s in root_signers:
            root.add_key(s.public_key, "root")
        root.roles["root"].threshold = root_threshold
        for r in ONLINE_ROLES:
            root.add_key(online_keys[r], r)
        md = Metadata(root)
        for s in root_signers:
            md.sign(s, append=True)
        repo.path.mkdir(parents=True, exist_ok=True)
        with repo._locked(creating=True):
            repo.metadata_dir.mkdir(exist_ok=True)
            repo.targets_dir.mkdir(exist_ok=True)
            repo._save_settings(exp, {})
            repo._write_root(md)
        logger.info("initialised repository %s (root threshold %d)", path, root_threshold)
        return repo

    # -- loading --------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, creating: bool = False) -> Iterator[None]:
        if not creating and not (self.metadata_dir / "root.json").is_file():
            raise self._not_a_repo()  # and leave no lock file in a directory that is not ours
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _fail(
                    f"another edgeward repo command is working on {self.path}", "repo-busy"
                ) from None
            yield
        finally:
            os.close(fd)

    def _not_a_repo(self) -> RepositoryError:
        return _fail(
            f"{self.path} is not a repository (no metadata/root.json); "
            "create one with: edgeward repo init",
            "repo-missing",
        )

    def _load_md(self, name: str) -> Metadata[Any]:
        path = self.metadata_dir / name
        try:
            data = _read_capped(path)
        except FileNotFoundError:
            raise _fail(f"{path} is missing", "repo-corrupt") from None
        try:
            return Metadata.from_bytes(data)
        except Exception as exc:  # python-tuf raises several kinds on malformed input
            raise _fail(f"{path} is not valid TUF metadata: {exc}", "repo-corrupt") from exc

    def _versions_on_disk(self, role: str) -> list[int]:
        """Versions of ``<v>.<role>.json`` present, ascending."""
        pattern = re.compile(rf"^([0-9]{{1,19}})\.{role}\.json$")
        found = (pattern.match(p.name) for p in self.metadata_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _next_version(self, role: str, current: int | None) -> int:
        """Never reuse a version number, even one an interrupted command left unreferenced
        (a CDN may have cached it under that immutable name)."""
        return max([current or 0, *self._versions_on_disk(role)]) + 1

    def _load(self, *, repair: bool = True) -> _State:
        if not (self.metadata_dir / "root.json").is_file():
            raise self._not_a_repo()
        # Devices walk <v>.root.json, so the newest of those is the root in force; a
        # rotation interrupted before it replaced root.json is completed here.
        roots = self._versions_on_disk("root")
        root: Metadata[Root] = self._load_md(f"{roots[-1]}.root.json" if roots else "root.json")
        if repair and roots and self._load_md("root.json").signed.version != root.signed.version:
            logger.warning("root.json lags %d.root.json: repairing", root.signed.version)
            self._write_root(root)
        targets: Metadata[Targets] | None = None
        snapshot: Metadata[Snapshot] | None = None
        timestamp: Metadata[Timestamp] | None = None
        if (self.metadata_dir / "timestamp.json").exists():
            timestamp = self._load_md("timestamp.json")
            sv = timestamp.signed.snapshot_meta.version
            snapshot = self._load_md(f"{sv}.snapshot.json")
            if "targets.json" not in snapshot.signed.meta:
                raise _fail(f"{sv}.snapshot.json does not list targets.json", "repo-corrupt")
            tv = snapshot.signed.meta["targets.json"].version
            targets = self._load_md(f"{tv}.targets.json")
        expiry, staged = self._load_settings()
        return _State(root, targets, snapshot, timestamp, expiry, staged)

    def _load_settings(self) -> tuple[dict[str, timedelta], dict[str, TargetFile]]:
        path = self.path / STATE_FILE
        try:
            doc = json.loads(_read_capped(path))
            expiry = {r: timedelta(seconds=int(doc["expiry_s"][r])) for r in ROLES}
            staged = {p: TargetFile.from_dict(dict(d), p) for p, d in doc["staged"].items()}
        except FileNotFoundError:
            return dict(DEFAULT_EXPIRY), {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _fail(f"{path} is malformed: {exc}", "repo-corrupt") from exc
        return expiry, staged

    def _save_settings(
        self, expiry: Mapping[str, timedelta], staged: Mapping[str, TargetFile]
    ) -> None:
        doc = {
            "format": 1,
            "expiry_s": {r: int(expiry[r].total_seconds()) for r in ROLES},
            "staged": {p: tf.to_dict() for p, tf in sorted(staged.items())},
        }
        atomic_write_bytes(self.path / STATE_FILE, json.dumps(doc, indent=1).encode() + b"\n")

    @staticmethod
    def _expiry_with(
        base: dict[str, timedelta], changes: Mapping[str, timedelta] | None
    ) -> dict[str, timedelta]:
        for role, td in (changes or {}).items():
            if role not in ROLES:
                raise _fail(f"unknown role {role!r} (use {', '.join(ROLES)})", "repo-usage")
            if td <= timedelta(0):
                raise _fail(f"{role} expiry must be positive", "repo-usage")
            base[role] = td
        return base

    # -- writing --------------------------------------------------------------------

    def _write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(_SERIALIZER)
        atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.root.json", data)
        atomic_write_bytes(self.metadata_dir / "root.json", data)

    def _write(self, name: str, md: Metadata[Any]) -> None:
        atomic_write_bytes(self.metadata_dir / name, md.to_bytes(_SERIALIZER))

    @staticmethod
    def _check_signer(root: Root, role: str, signer: Signer | None, option: str) -> Signer:
        if signer is None:
            raise _fail(f"re-signing {role} needs --{option}", "repo-usage")
        keyids = root.roles[role].keyids
        if signer.public_key.keyid not in keyids:
            expected = ", ".join(sorted(key_name(root.keys[k]) for k in keyids))
            raise _fail(
                f"--{option} {_signer_name(signer)} is not the {role} key of root "
                f"v{root.version} (expected {expected})",
                "repo-wrong-key",
            )
        return signer

    def _resign(
        self,
        st: _State,
        roles: set[str],
        signers: Mapping[str, Signer | None],
        now: datetime,
        *,
        add: Mapping[str, TargetFile] | None = None,
        before_timestamp: Callable[[], None] | None = None,
    ) -> dict[str, int]:
        """New versions of ``roles`` (and of every role after them in the chain),
        signed with ``signers`` and written targets → snapshot → [``before_timestamp``,
        a rotation's new root] → timestamp. Every key is checked before anything is
        written. The chain always ends with the timestamp."""
        todo: set[str] = set()
        for r in roles:
            todo.update(_CHAIN.get(r, (r,)))
        if st.timestamp is None:  # never published: the first publish writes all three
            todo.update(ONLINE_ROLES)
        root = st.root.signed
        checked = {r: self._check_signer(root, r, signers.get(r), f"{r}-key") for r in todo}
        versions: dict[str, int] = {}
        if "targets" in todo:
            old = st.targets.signed if st.targets else None
            entries = dict(old.targets) if old else {}
            entries.update(add or {})
            targets = Metadata(
                Targets(
                    version=self._next_version("targets", old.version if old else None),
                    expires=now + st.expiry["targets"],
                    targets=entries,
                )
            )
            targets.sign(checked["targets"])
            self._write(f"{targets.signed.version}.targets.json", targets)
            st.targets = targets
            versions["targets"] = targets.signed.version
        assert st.targets is not None
        if "snapshot" in todo:
            old_s = st.snapshot.signed if st.snapshot else None
            snapshot = Metadata(
                Snapshot(
                    version=self._next_version("snapshot", old_s.version if old_s else None),
                    expires=now + st.expiry["snapshot"],
                    meta={"targets.json": MetaFile(version=st.targets.signed.version)},
                )
            )
            snapshot.sign(checked["snapshot"])
            self._write(f"{snapshot.signed.version}.snapshot.json", snapshot)
            st.snapshot = snapshot
            versions["snapshot"] = snapshot.signed.version
        assert st.snapshot is not None
        if before_timestamp is not None:
            before_timestamp()
        if "timestamp" in todo:
            old_t = st.timestamp.signed if st.timestamp else None
            timestamp = Metadata(
                Timestamp(
                    version=(old_t.version + 1) if old_t else 1,
                    expires=now + st.expiry["timestamp"],
                    snapshot_meta=MetaFile(version=st.snapshot.signed.version),
                )
            )
            timestamp.sign(checked["timestamp"])
            self._write("timestamp.json", timestamp)  # last: it makes the rest visible
            st.timestamp = timestamp
            versions["timestamp"] = timestamp.signed.version
        return versions

    def _new_root(
        self,
        st: _State,
        root_signers: Sequence[Signer],
        now: datetime,
        edit: Any = None,
    ) -> Metadata[Root]:
        """Root v+1 (edited by ``edit(root)``), signed by every given key that the old
        or the new root trusts for root, checked against both thresholds."""
        old = st.root
        new: Metadata[Root] = Metadata.from_bytes(old.to_bytes(_SERIALIZER))
        new.signed.version += 1
        new.signed.expires = now + st.expiry["root"]
        if edit is not None:
            edit(new.signed)
        new.signatures.clear()
        trusted = set(old.signed.roles["root"].keyids) | set(new.signed.roles["root"].keyids)
        seen: set[str] = set()
        for s in root_signers:
            kid = s.public_key.keyid
            if kid not in trusted:
                raise _fail(
                    f"--root-key {_signer_name(s)} is not a root key of root v{old.signed.version}"
                    f" or v{new.signed.version}",
                    "repo-wrong-key",
                )
            if kid not in seen:
                seen.add(kid)
                new.sign(s, append=True)
        for which, ref in (("current", old.signed), ("new", new.signed)):
            try:
                ref.verify_delegate("root", new.signed_bytes, new.signatures)
            except UnsignedMetadataError:
                have = len(seen & set(ref.roles["root"].keyids))
                raise _fail(
                    f"root v{new.signed.version} needs {ref.roles['root'].threshold} "
                    f"signature(s) by the {which} root keys, got {have}: pass more --root-key",
                    "repo-threshold",
                ) from None
        return new

    # -- commands -------------------------------------------------------------------

    def add(
        self,
        packages: Sequence[Path],
        channels: Sequence[str] = ("stable",),
        trust: Any = None,
    ) -> list[TargetFields]:
        """Copy packages into ``targets/`` (content-addressed) and stage them.

        ``trust`` (an :class:`agent.keys.TrustStore`) verifies each package in full;
        without it only the manifest is read. A residual package needs its full package
        (same model and version) in the repository or in the same call.
        """
        from agent.package import Limits, read_manifest
        from agent.package import verify as verify_package

        if not packages:
            raise _fail("add needs at least one package", "repo-usage")
        with self._locked():
            st = self._load()
            published = dict(st.targets.signed.targets) if st.targets else {}
            batch: dict[str, TargetFile] = {}
            created: list[Path] = []
            out: list[TargetFields] = []
            limit = Limits().max_package_bytes
            try:
                for pkg in map(Path, packages):
                    if not pkg.is_file():
                        raise _fail(f"{pkg} is not a file", "repo-usage")
                    if pkg.stat().st_size > limit:
                        raise _fail(f"{pkg} is larger than {limit} bytes", "repo-too-large")
                    tmp, length, digest = self._copy_in(pkg)
                    try:
                        try:
                            manifest = (
                                verify_package(tmp, trust)
                                if trust is not None
                                else read_manifest(tmp)
                            )
                        except PackageError as exc:
                            raise type(exc)(f"{pkg.name}: {exc.message}", code=exc.code) from None
                        tf_fields = _fields_of(manifest, pkg, channels)
                        path = target_path(tf_fields)
                        where = (
                            "published"
                            if path in published
                            else "staged"
                            if path in st.staged or path in batch
                            else None
                        )
                        if where:
                            raise _fail(
                                f"{pkg.name}: {tf_fields.model} {tf_fields.version} "
                                f"({tf_fields.kind}) is already {where}; a version is "
                                "immutable, publish a new one",
                                "repo-duplicate",
                            )
                        dest = self.targets_dir / os.path.dirname(path)
                        dest.mkdir(parents=True, exist_ok=True)
                        final = dest / f"{digest}.{os.path.basename(path)}"
                        atomic_replace(tmp, final)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                        raise
                    created.append(final)
                    batch[path] = TargetFile(
                        length=length,
                        hashes={"sha256": digest},
                        path=path,
                        unrecognized_fields={"custom": tf_fields.to_custom()},
                    )
                    out.append(tf_fields)
                self._check_residuals(batch, {**published, **st.staged, **batch})
            except BaseException:
                for p in created:
                    with contextlib.suppress(OSError):
                        p.unlink()
                raise
            self._save_settings(st.expiry, {**st.staged, **batch})
        for f in out:
            logger.info(
                "staged %s %s (%s) for %s", f.model, f.version, f.kind, ",".join(f.channels)
            )
        return out

    def _copy_in(self, src: Path) -> tuple[Path, int, str]:
        """Copy ``src`` to a temporary file under ``targets/`` hashing it on the way, so
        what is verified and hashed is the copy that will be served."""
        self.targets_dir.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".emp", dir=self.targets_dir)
        h = hashlib.sha256()
        n = 0
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while piece := fin.read(_COPY):
                    h.update(piece)
                    fout.write(piece)
                    n += len(piece)
                fout.flush()
                os.fsync(fout.fileno())
            os.chmod(tmp, 0o644)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return Path(tmp), n, h.hexdigest()

    @staticmethod
    def _check_residuals(
        batch: Mapping[str, TargetFile], everything: Mapping[str, TargetFile]
    ) -> None:
        fulls = set()
        for tf in everything.values():
            f = _parse_fields(tf)
            if f is not None and f.kind == "full":
                fulls.add((f.model, f.version))
        for tf in batch.values():
            f = _parse_fields(tf)
            if f is not None and f.kind == "residual" and (f.model, f.version) not in fulls:
                raise _fail(
                    f"residual {f.model} {f.version} (from {f.base_version}) is published next "
                    f"to its full package: add the full {f.model} {f.version} too",
                    "repo-no-full",
                )

    def publish(
        self,
        signers: Mapping[str, Signer | None],
        *,
        expiry: Mapping[str, timedelta] | None = None,
        now: datetime | None = None,
    ) -> Changes:
        """New targets (with the staged targets), snapshot and timestamp versions."""
        with self._locked():
            st = self._load()
            st.expiry = self._expiry_with(st.expiry, expiry)
            added = dict(st.staged)
            versions = self._resign(st, set(ONLINE_ROLES), signers, _now(now), add=added)
            self._save_settings(st.expiry, {})
        logger.info("published %s with %d new target(s)", versions, len(added))
        return Changes(versions, tuple(sorted(added)))

    def refresh(
        self,
        signers: Mapping[str, Signer | None],
        *,
        within: timedelta = timedelta(hours=12),
        root_signers: Sequence[Signer] = (),
        expiry: Mapping[str, timedelta] | None = None,
        now: datetime | None = None,
    ) -> Changes:
        """Re-sign every role that expires within ``within`` (cron-able). Staged targets
        stay staged. A root about to expire is re-signed only with ``root_signers``;
        without them the online roles are refreshed and then ``repo-root-expiring`` is
        raised so that the cron job fails loudly."""
        t = _now(now)
        with self._locked():
            st = self._load()
            if st.timestamp is None:
                raise _fail(
                    f"{self.path} has not been published yet: run edgeward repo publish",
                    "repo-unpublished",
                )
            st.expiry = self._expiry_with(st.expiry, expiry)
            horizon = t + within
            versions: dict[str, int] = {}
            root_due = st.root.signed.expires <= horizon
            if root_due and root_signers:
                new_root = self._new_root(st, root_signers, t)
                self._write_root(new_root)
                st.root = new_root
                versions["root"] = new_root.signed.version
            due = {
                r
                for r in ONLINE_ROLES
                if (md := getattr(st, r)) is None or md.signed.expires <= horizon
            }
            if due:
                versions.update(self._resign(st, due, signers, t))
            self._save_settings(st.expiry, st.staged)
        logger.info(
            "refresh within %s: re-signed %s", format_duration(within), versions or "nothing"
        )
        if root_due and not root_signers:
            raise _fail(
                f"root v{st.root.signed.version} expires {_iso(st.root.signed.expires)}, within "
                f"{format_duration(within)}: run refresh with the offline --root-key(s)",
                "repo-root-expiring",
            )
        return Changes(versions)

    def rotate(
        self,
        role: str,
        *,
        old_key: Key,
        new_key: Signer,
        root_signers: Sequence[Signer],
        signers: Mapping[str, Signer | None] | None = None,
        now: datetime | None = None,
    ) -> Changes:
        """Replace ``old_key`` by ``new_key`` for ``role`` in a new root version.

        The new root is signed by a threshold of the current root keys and a threshold
        of the new ones (for a root rotation ``new_key`` signs too; pass the old root key
        among ``root_signers`` to cross-sign), so a device holding any older root walks
        the chain. Rotating an online role re-signs that role with ``new_key`` (and the
        roles after it, with ``signers``) so the repository stays consistent.
        """
        if role not in ROLES:
            raise _fail(f"--role must be one of {', '.join(ROLES)}", "repo-usage")
        t = _now(now)
        with self._locked():
            st = self._load()
            root = st.root.signed
            if old_key.keyid not in root.roles[role].keyids:
                expected = ", ".join(
                    sorted(key_name(root.keys[k]) for k in root.roles[role].keyids)
                )
                raise _fail(
                    f"--old-key {key_name(old_key)} is not a {role} key of root "
                    f"v{root.version} ({role} keys: {expected})",
                    "repo-wrong-key",
                )
            new_pub = new_key.public_key
            if new_pub.keyid in root.keys:
                raise _fail(
                    f"--new-key {key_name(new_pub)} is already a key of this repository",
                    "repo-usage",
                )

            def edit(r: Root) -> None:
                r.revoke_key(old_key.keyid, role)
                r.add_key(new_pub, role)

            sign_with = list(root_signers) + ([new_key] if role == "root" else [])
            new_root = self._new_root(st, sign_with, t, edit)
            st.root = new_root  # the re-signed roles are checked against the new root
            versions = {"root": new_root.signed.version}
            if role in ONLINE_ROLES and st.timestamp is not None:
                online: dict[str, Signer | None] = {**(signers or {}), role: new_key}
                resigned = self._resign(
                    st, {role}, online, t, before_timestamp=lambda: self._write_root(new_root)
                )
                versions.update(resigned)
            else:
                self._write_root(new_root)
            self._save_settings(st.expiry, st.staged)
        logger.info("rotated the %s key: %s -> %s", role, key_name(old_key), key_name(new_pub))
        return Changes(versions)

    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """Versions, expiries, keys and targets by model, channel and kind."""
        t = _now(now)
        st = self._load(repair=False)
        root = st.root.signed
        roles: dict[str, Any] = {}
        for r in ROLES:
            md = st.root if r == "root" else getattr(st, r)
            keyids = root.roles[r].keyids
            entry: dict[str, Any] = {
                "keys": sorted(key_name(root.keys[k]) for k in keyids),
                "threshold": root.roles[r].threshold,
                "version": None,
                "expires": None,
                "expires_in_s": None,
            }
            if md is not None:
                entry["version"] = md.signed.version
                entry["expires"] = _iso(md.signed.expires)
                entry["expires_in_s"] = int((md.signed.expires - t).total_seconds())
            roles[r] = entry
        targets = [
            _describe(tf) for tf in (st.targets.signed.targets.values() if st.targets else ())
        ]
        models: dict[str, dict[str, dict[str, list[str]]]] = {}
        for d in targets:
            if d.get("model") is None:
                continue
            for ch in d["channels"]:
                kinds = models.setdefault(d["model"], {}).setdefault(
                    ch, {"full": [], "residual": []}
                )
                label = (
                    d["version"] if d["kind"] == "full" else f"{d['version']}<-{d['base_version']}"
                )
                kinds[d["kind"]].append(label)
        for chans in models.values():
            for kinds in chans.values():
                for k in kinds:
                    kinds[k].sort(key=lambda v: [int(x) for x in v.split("<-")])
        return {
            "path": str(self.path),
            "published": st.timestamp is not None,
            "consistent_snapshot": bool(root.consistent_snapshot),
            "roles": roles,
            "expiry": {r: format_duration(st.expiry[r]) for r in ROLES},
            "targets": sorted(targets, key=lambda d: d["path"]),
            "models": models,
            "staged": sorted((_describe(tf) for tf in st.staged.values()), key=lambda d: d["path"]),
        }


def _parse_fields(tf: TargetFile) -> TargetFields | None:
    try:
        return TargetFields.from_custom(tf.custom)
    except EdgewardError:
        return None


def _describe(tf: TargetFile) -> dict[str, Any]:
    d: dict[str, Any] = {"path": tf.path, "length": tf.length, "sha256": tf.hashes.get("sha256")}
    f = _parse_fields(tf)
    if f is None:
        d["model"] = None
        return d
    custom = tf.custom[FIELDS_KEY] if isinstance(tf.custom, dict) else {}
    d.update(custom)
    d.setdefault("base_version", None)
    return d


def _fields_of(manifest: Manifest, pkg: Path, channels: Sequence[str]) -> TargetFields:
    """The target fields of a package, from its (read or verified) manifest."""
    base_version: str | None = None
    digests: dict[str, str] = {}
    kind = "full"
    if manifest.base is not None:
        kind = "residual"
        if manifest.base.version is None:
            raise _fail(
                f"{pkg.name}: a residual against a bare model file (no base version) cannot "
                "be offered; pack it with --base BASE.emp",
                "repo-residual-base",
            )
        if manifest.base.name != manifest.name:
            raise _fail(
                f"{pkg.name}: {manifest.name} {manifest.version} patches package "
                f"{manifest.base.name!r}; a repository offers residuals on the same model only",
                "repo-residual-base",
            )
        base_version = str(manifest.base.version)
        digests = {m.name: m.base_digest for m in manifest.models if m.residual and m.base_digest}
    try:
        return TargetFields(
            model=manifest.name,
            version=str(manifest.version),
            channels=tuple(dict.fromkeys(channels)),
            kind=kind,
            base_version=base_version,
            base_digests=digests,
        )
    except RepositoryError as exc:
        raise _fail(f"{pkg.name}: {exc.message}", exc.code) from None


__all__ = [
    "DEFAULT_EXPIRY",
    "ONLINE_ROLES",
    "ROLES",
    "Changes",
    "Repository",
    "format_duration",
    "key_name",
    "load_signer",
    "parse_duration",
    "public_key",
    "tuf_key",
]
