"""The installed-model store under the state directory (``/var/lib/edgeward``).

Layout::

    models/<name>/versions/<version>/   an unpacked, verified package (read-only after install)
    models/<name>/current -> versions/<version>
    models/<name>/previous -> versions/<version>
    staging/                            work in progress (unpack targets); wiped at start
                                        except resumable downloads (<name>-<version>.part)
    cache/                              runtime converter cache
    journal.json                        per-model update state, written atomically

Crash safety (DESIGN §4): a version directory appears in ``versions/`` only by a
``rename`` from ``staging/`` once complete, and a link changes only by ``os.replace`` of
a freshly made temporary symlink, followed by an fsync of the directory. So after a
``kill -9`` at any instant ``current`` names either the old or the new complete
version, never a mix; whatever was half-done lies in ``staging/`` or as a ``.tmp-*``
entry and is removed by :meth:`Store.open`. The primitives and the argument why they
suffice are in :mod:`agent.durable`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.durable import (
    atomic_replace,
    atomic_write_bytes,
    discard_tree,
    failpoint,
    fsync_dir,
    fsync_tree,
    symlink_atomic,
    unlink_durable,
)
from agent.errors import StoreError, UpdateError

logger = logging.getLogger(__name__)

__all__ = ["Store", "reject_file"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def reject_file(path: Path, reason: str, *, keep: bool = True) -> None:
    """Move a refused inbox entry aside (``<name>.rejected`` + ``.rejected.reason``), or
    delete it (``keep=False``), so the next check does not retry it forever.

    The inbox is writable by others: nothing here follows a link. ``rename`` and
    ``unlink`` act on the entry itself (a symlink, FIFO or directory is moved as such,
    never opened) and the reason is written by :func:`atomic_write_bytes` (a planted symlink
    at the ``.reason`` name is replaced, not written through). Failures are logged.
    """
    try:
        os.lstat(path)
    except OSError:
        return
    try:
        if keep:
            atomic_replace(path, path.with_name(path.name + ".rejected"))
            text = reason.encode("utf-8", "backslashreplace")  # names need not be UTF-8
            atomic_write_bytes(path.with_name(path.name + ".rejected.reason"), text + b"\n")
        elif path.is_dir() and not path.is_symlink():
            atomic_replace(path, path.with_name(path.name + ".rejected"))  # not ours to delete
        else:
            path.unlink()
    except OSError as exc:
        logger.warning("cannot move refused package %r aside: %s", path.name, exc)


def check_name(kind: str, value: str) -> str:
    """Model names and versions become path components: allow a safe alphabet only."""
    if not _NAME_RE.match(value) or value in (".", ".."):
        raise StoreError(
            f"invalid model {kind} {value!r}: use letters, digits, '.', '_' and '-'",
            code="store-name",
        )
    return value


@dataclass(frozen=True)
class InstalledModel:
    """One model name in the store and its two links."""

    name: str
    current: str | None
    previous: str | None
    versions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "current": self.current,
            "previous": self.previous,
            "versions": list(self.versions),
        }


def version_key(version: str) -> tuple[int, int | str]:
    """Order versions: integers numerically (the manifest's monotonic version), others after."""
    return (0, int(version)) if version.isdigit() else (1, version)


class Store:
    """The directory tree of installed versions, with atomic link switches."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models_dir = root / "models"
        self.staging_dir = root / "staging"
        self.journal_path = root / "journal.json"

    # --- lifecycle -----------------------------------------------------------------

    def lock(self) -> int:
        """Take the state directory for this process alone (``flock`` on ``.lock``).

        Called before anything is loaded or cleaned: a second daemon on the same state
        directory would wipe the first one's staging. The lock lives as long as the
        returned descriptor (close it, or exit, to release it; a ``kill -9`` releases
        it too). The file holds the owner's pid, for the message a second daemon gets.

        Raises:
            StoreError: ``store-locked`` when another process holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror}", code="store-lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise StoreError(
                f"another edgeward daemon (pid {owner}) is using the state directory "
                f"{self.root}; stop it first, or give this one its own paths.state_dir",
                code="store-locked",
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {exc.strerror}", code="store-lock") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def open(self) -> Store:
        """Create the layout if missing and remove what a crash left half-done."""
        for d in (self.root, self.models_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        removed = 0
        for entry in list(self.staging_dir.iterdir()):
            if _resumable(entry):
                continue
            _remove(entry)
            removed += 1
        for model_dir in self._model_dirs():
            for entry in list(model_dir.iterdir()):
                if entry.name.startswith(".tmp-"):
                    _remove(entry)
                    removed += 1
            vdir = model_dir / "versions"
            if vdir.is_dir():
                for entry in list(vdir.iterdir()):
                    # unpackers write "<out>.tmp*" / ".<out>*" next to the target
                    if entry.name.startswith(".") or ".tmp" in entry.name:
                        _remove(entry)
                        removed += 1
            for link in ("current", "previous"):
                p = model_dir / link
                if p.is_symlink() and not p.exists():
                    logger.warning("store: dangling %s link of %s removed", link, model_dir.name)
                    p.unlink()
        if removed:
            logger.info("store: removed %d half-done entries after an interrupted run", removed)
        return self

    def _model_dirs(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p for p in self.models_dir.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    # --- queries -------------------------------------------------------------------

    def names(self) -> list[str]:
        """Model names that have a ``current`` version."""
        return [p.name for p in self._model_dirs() if self.current(p.name) is not None]

    def _link(self, name: str, link: str) -> str | None:
        p = self.models_dir / name / link
        try:
            target = os.readlink(p)
        except (FileNotFoundError, OSError):
            return None
        version = Path(target).name
        if not (self.models_dir / name / "versions" / version).is_dir():
            return None
        return version

    def current(self, name: str) -> str | None:
        """The version ``current`` points to, or None."""
        return self._link(name, "current")

    def previous(self, name: str) -> str | None:
        """The version ``previous`` points to, or None."""
        return self._link(name, "previous")

    def version_dir(self, name: str, version: str) -> Path:
        """Directory of an installed version (it may not exist)."""
        return (
            self.models_dir / check_name("name", name) / "versions" / check_name("version", version)
        )

    def versions(self, name: str) -> list[str]:
        vdir = self.models_dir / name / "versions"
        if not vdir.is_dir():
            return []
        found = [p.name for p in vdir.iterdir() if p.is_dir() and _NAME_RE.match(p.name)]
        return sorted(found, key=version_key)

    def info(self, name: str) -> InstalledModel:
        return InstalledModel(
            name=name,
            current=self.current(name),
            previous=self.previous(name),
            versions=tuple(self.versions(name)),
        )

    def has(self, name: str, version: str) -> bool:
        return self.version_dir(name, version).is_dir()

    # --- installation --------------------------------------------------------------

    def staging(self, prefix: str = "stage-") -> Path:
        """A fresh private directory under ``staging/`` (same filesystem as the store)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.staging_dir))

    def install(self, name: str, version: str, src: Path) -> Path:
        """Move a complete unpacked directory ``src`` (under staging) into ``versions/``.

        The rename is atomic; the version becomes visible only complete. Installing a
        version that exists is refused (versions are immutable once installed).
        """
        dest = self.version_dir(name, version)
        if dest.exists():
            raise StoreError(f"{name} version {version} is already installed", code="store-exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fsync_tree(src)
        atomic_replace(src, dest)
        if (dest / "manifest.sig").is_file():
            # remembered outside the version: removing its manifest and signature must
            # not turn a signed version into one that cannot be checked
            atomic_write_bytes(self._signed_marker(name, version), b"")
        logger.debug("store: installed %s %s", name, version)
        return dest

    def _signed_marker(self, name: str, version: str) -> Path:
        return (
            self.models_dir / check_name("name", name) / f".signed-{check_name('version', version)}"
        )

    def signed(self, name: str, version: str) -> bool:
        """Whether ``version`` was installed from a signed package (its kept manifest
        and signature must then be there)."""
        return self._signed_marker(name, version).exists()

    def activate(self, name: str, version: str) -> str | None:
        """Make ``version`` current; the old current becomes ``previous``. Returns the old.

        ``previous`` is switched first: a crash between the two steps leaves
        current = old (still serving the old version) and previous = old, harmless.
        """
        if not self.has(name, version):
            raise StoreError(f"{name} version {version} is not installed", code="store-missing")
        model_dir = self.models_dir / name
        old = self.current(name)
        if old == version:
            return old
        if old is not None:
            symlink_atomic(model_dir / "previous", f"versions/{old}")
        symlink_atomic(model_dir / "current", f"versions/{version}")
        logger.info("store: %s current %s (previous %s)", name, version, old)
        return old

    def rollback(self, name: str) -> tuple[str, str]:
        """Swap ``current`` and ``previous``; returns (new current, new previous)."""
        cur, prev = self.current(name), self.previous(name)
        if cur is None or prev is None or cur == prev:
            raise UpdateError(
                f"{name}: no previous version to roll back to", code="no-previous", status=409
            )
        model_dir = self.models_dir / name
        symlink_atomic(model_dir / "current", f"versions/{prev}")
        symlink_atomic(model_dir / "previous", f"versions/{cur}")
        logger.info("store: %s rolled back to %s (previous %s)", name, prev, cur)
        return prev, cur

    def fall_back(self, name: str, version: str) -> None:
        """Serve ``version`` again and forget ``previous`` (a health rollback: the version
        that was current is refused, so no link may name it any more).

        ``current`` is switched first: a crash between the two steps leaves current =
        previous = ``version``, which names nothing refused and which
        :meth:`drop_previous` finishes at the next start.
        """
        if not self.has(name, version):
            raise StoreError(f"{name} version {version} is not installed", code="store-missing")
        symlink_atomic(self.models_dir / name / "current", f"versions/{version}")
        failpoint("store-fall-back-switched")
        self.drop_previous(name)
        logger.info("store: %s fell back to %s (no previous)", name, version)

    def drop_previous(self, name: str) -> None:
        """Remove the ``previous`` link (durably)."""
        unlink_durable(self.models_dir / name / "previous")

    def gc(self, name: str) -> list[str]:
        """Delete versions that are neither current nor previous; returns their names."""
        keep = {self.current(name), self.previous(name)}
        removed = []
        for version in self.versions(name):
            if version not in keep:
                _discard(self.version_dir(name, version))
                _remove(self._signed_marker(name, version))
                removed.append(version)
        if removed:
            fsync_dir(self.models_dir / name / "versions")
            logger.info("store: %s removed old versions %s", name, ", ".join(removed))
        return removed

    def remove_version(self, name: str, version: str) -> None:
        """Delete one version that is not linked (a failed activation)."""
        if version in (self.current(name), self.previous(name)):
            raise StoreError(f"{name} {version} is in use", code="store-in-use")
        _discard(self.version_dir(name, version))
        _remove(self._signed_marker(name, version))

    # --- journal -------------------------------------------------------------------

    def read_journal(self) -> dict[str, Any]:
        """The journal, or an empty one when missing or unreadable (logged)."""
        try:
            data = json.loads(self.journal_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("store: journal unreadable (%s); starting a fresh one", exc)
            return {}
        return data if isinstance(data, dict) else {}

    def write_journal(self, data: dict[str, Any]) -> None:
        """Replace the journal atomically (temp + fsync + rename + fsync dir)."""
        atomic_write_bytes(self.journal_path, json.dumps(data, indent=1, sort_keys=True).encode())


def _resumable(entry: Path) -> bool:
    """A partial download and its record (``<name>-<version>.part`` + ``.part.json``)
    survive a restart so the download resumes; either alone is debris."""
    if not entry.is_file() or entry.is_symlink():
        return False
    if entry.name.endswith(".part"):
        return entry.with_name(entry.name + ".json").is_file()
    if entry.name.endswith(".part.json"):
        return entry.with_name(entry.name[: -len(".json")]).is_file()
    return False


def _discard(vdir: Path) -> None:
    """Delete a version directory so a crash never leaves it half-deleted under its own
    name: renamed to a ``.tmp-`` name first (:meth:`Store.open` removes such entries)."""
    if not vdir.is_dir():
        return
    discard_tree(vdir, vdir.parent / f".tmp-del-{vdir.name}-{os.getpid()}-{time.monotonic_ns()}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
