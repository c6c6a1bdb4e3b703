"""Check an installed version against the signed manifest kept with it.

A version directory is immutable once installed, but a disk can flip a bit and anyone
with write access to the store can edit ``run.py`` or a weight; the sample self-test
at start tolerates small numeric changes and does not look at scripts at all. So at
start (and on ``edgeward verify --installed``) every file of ``current`` and
``previous`` is hashed and compared with what the package's signed manifest says:

- ``manifest.json`` against ``manifest.sig`` (kept by ``unpack``) with the trusted
  publisher keys; a version installed before signatures were kept is checked against
  its manifest's digests alone (reported as such);
- every package file (``Program/``, ``Meta-info/``...) by size and SHA-256;
- every decoded model by the manifest's ``models[].size``/``sha256`` (a residual model
  by ``target_digest``, the weights digest of the patched result);
- nothing missing, nothing extra, no links.

Hashing streams each file with a fixed buffer on a small thread pool (``hashlib``
releases the GIL), so a multi-GiB model costs one sequential read and a few MiB.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import EdgewardError

logger = logging.getLogger(__name__)

__all__ = ["VersionCheck", "check_version"]

_CHUNK = 1 << 20
_KEPT = ("manifest.json", "manifest.sig")
MAX_MANIFEST = 4 << 20


@dataclass
class VersionCheck:
    """What checking one installed version found. ``ok``: nothing is wrong."""

    name: str
    version: str
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    signed: str | None = None  # signer key id; None: no signature kept (older install)
    checked: bool = True  # False: no package manifest at all (nothing to check against)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ok": self.ok,
            "problems": self.problems,
            "files": self.files,
            "bytes": self.bytes,
            "signed_by": self.signed,
            "checked": self.checked,
        }


def _digest(path: Path, size: int) -> tuple[str, int] | str:
    """(sha256 hex, bytes) of a regular file, or what is wrong with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size != size:
            return f"{st.st_size} bytes, the manifest says {size}"
        h = hashlib.sha256()
        done = 0
        while piece := os.read(fd, _CHUNK):
            h.update(piece)
            done += len(piece)
        return h.hexdigest(), done
    finally:
        os.close(fd)


def _weights(path: Path) -> tuple[str, int] | str:
    from agent.residual import weights_digest

    try:
        return weights_digest(path), path.stat().st_size
    except (OSError, EdgewardError) as exc:
        return f"unreadable ({exc})"


def check_version(
    name: str, version: str, vdir: Path, trust: Any | None, *, threads: int = 4
) -> VersionCheck:
    """Hash every file of ``vdir`` against its kept manifest; never raises for what it
    finds (problems are listed in the result)."""
    from agent.manifest import parse_manifest
    from agent.package import external_data_files, read_capped

    res = VersionCheck(name, version)
    mpath, spath = vdir / "manifest.json", vdir / "manifest.sig"
    try:
        raw = read_capped(mpath, MAX_MANIFEST, "manifest", nofollow=True)
    except EdgewardError as exc:
        if not os.path.lexists(spath):
            res.checked = False  # not installed from a package (a hand-made store)
            return res
        res.problems.append(f"manifest.json: {exc.message}")
        return res
    sig: bytes | None = None
    if os.path.lexists(spath):
        try:
            sig = read_capped(spath, 64 << 10, "manifest.sig", nofollow=True)
        except EdgewardError as exc:
            res.problems.append(f"manifest.sig: {exc.message}")
            return res
    try:
        manifest = parse_manifest(raw)
    except EdgewardError as exc:
        if sig is None:
            res.checked = False
            return res
        res.problems.append(f"manifest.json: {exc.message}")
        return res
    if sig is not None and trust is not None:
        try:
            res.signed = trust.verify(raw, sig)
        except EdgewardError as exc:
            if exc.code != "unknown-signer":  # a rotated key is not a modified file
                res.problems.append(f"manifest.json: {exc.message}")
                return res
            logger.warning("%s %s: %s", name, version, exc.message)
    containers = {m.container for m in manifest.models}
    expected: dict[str, tuple[int, str, bool]] = {}  # rel -> (size, digest, weights?)
    for fe in manifest.files:
        if fe.path not in containers:
            expected[fe.path] = (fe.size, fe.sha256, False)
    allowed: set[str] = set(_KEPT)
    for mi in manifest.models:
        rel = f"Model/{mi.name}"
        if mi.residual:
            if mi.target_digest:
                expected[rel] = (-1, mi.target_digest, True)
            else:
                allowed.add(rel)
            allowed.update(str(p) for p in external_data_files(mi))
        else:
            expected[rel] = (mi.size, mi.sha256, False)
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(vdir):
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                rel = os.path.relpath(os.path.join(dirpath, d), vdir)
                res.problems.append(f"{rel}: a link, not a directory of the package")
                dirnames.remove(d)
        for fn in filenames:
            found.add(os.path.relpath(os.path.join(dirpath, fn), vdir))
    for rel in sorted(found - set(expected) - allowed):
        res.problems.append(f"{rel}: not in the signed manifest (extra file)")

    def one(item: tuple[str, tuple[int, str, bool]]) -> tuple[str, tuple[str, int] | str, str]:
        rel, (size, want, weights) = item
        got = _weights(vdir / rel) if weights else _digest(vdir / rel, size)
        return rel, got, want

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="verify-installed") as pool:
        for rel, got, want in pool.map(one, sorted(expected.items())):
            if isinstance(got, str):
                res.problems.append(f"{rel}: {got}")
                continue
            digest, n = got
            res.files += 1
            res.bytes += n
            if want not in (digest, f"sha256:{digest}"):
                res.problems.append(f"{rel}: SHA-256 does not match the signed manifest")
    return res
