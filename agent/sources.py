"""Where update candidates come from: the inbox and the TUF repository.

A :class:`Source` offers candidates (:meth:`Source.scan`) and makes one a local file
(:meth:`Source.fetch`); the orchestrator (:class:`agent.updater.Updater`) picks among
every source's candidates and runs the one install pipeline. The inbox's files are
local already; the repository downloads (the ``downloading`` state).

Scanning reads only what picking needs: the inbox reads each package's manifest and
checks its signature (a few KiB, not the file), the repository refreshes TUF metadata.
The whole package is read once per install, by the unpacker, which verifies every
member against the signed manifest as it streams.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import EdgewardError
from agent.store import check_name, reject_file, version_key

if TYPE_CHECKING:
    from agent.config import Config
    from agent.repository.client import Listing, Offer, RepositoryClient, Tail

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "InboxSource", "RepositorySource", "Source", "StoreView", "choose"]


@dataclass(frozen=True)
class Candidate:
    """One installable version of one model, as a source offers it."""

    name: str
    version: str
    source: str  # "inbox" | "repository"
    kind: str = "full"  # "full" | "residual"
    path: Path | None = None  # the local package (None until fetched)
    offer: Offer | None = None
    why: str = ""  # why this package was chosen (logged and shown in the status)
    size: int = 0  # bytes of the package file

    @property
    def label(self) -> str:
        return self.path.name if self.source == "inbox" and self.path else self.name


class StoreView(Protocol):
    """What a source may ask about the installed state (the updater answers)."""

    def current(self, name: str) -> str | None: ...
    def is_bad(self, name: str, version: str) -> bool: ...
    def weights_digests(self, name: str, version: str) -> dict[str, str]: ...


class Source(Protocol):
    """A place candidates come from; methods block (the orchestrator runs them in a thread)."""

    label: str
    downloads: bool  # fetch() transfers the package ("downloading" state)
    up_to_date: list[str]  # after scan(): installed models it offers nothing newer for

    def scan(self, view: StoreView) -> tuple[list[Candidate], dict[str, str]]: ...
    def fetch(self, cand: Candidate) -> Path: ...
    def settle(self, cand: Candidate, reason: str | None, *, final: bool) -> None: ...


# --- the inbox -----------------------------------------------------------------------


class InboxSource:
    """Sideloaded ``.emp`` files in ``paths.inbox_dir``; refused ones are moved aside."""

    label = "inbox"
    downloads = False

    def __init__(self, cfg: Config, trust: Any, limits: Any) -> None:
        self.up_to_date: list[str] = []  # the inbox reports older files as candidates
        self.cfg = cfg
        self.trust = trust
        self.limits = limits
        self._cache: dict[Path, tuple[tuple[int, int], Candidate | str]] = {}

    def has_packages(self) -> bool:
        inbox = self.cfg.paths.inbox_dir
        return inbox.is_dir() and any(inbox.glob("*.emp"))

    def scan(self, view: StoreView) -> tuple[list[Candidate], dict[str, str]]:
        """Signature-checked manifests of the inbox packages (cached by size + mtime)."""
        from agent.package import read_manifest

        inbox = self.cfg.paths.inbox_dir
        out: list[Candidate] = []
        bad: dict[str, str] = {}
        if not inbox.is_dir():
            return out, bad
        seen: set[Path] = set()
        for path in sorted(inbox.glob("*.emp")):
            seen.add(path)
            try:
                st = path.lstat()  # a link is refused as such, never followed
            except OSError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == stamp:
                result = cached[1]
            else:
                try:
                    manifest = read_manifest(path, self.trust, self.limits, nofollow=True)
                    name = check_name("name", str(manifest.name))
                    version = check_name("version", str(manifest.version))
                    result = Candidate(
                        name,
                        version,
                        "inbox",
                        path=path,
                        size=st.st_size,
                        kind="residual" if manifest.base else "full",
                        why=f"inbox file {path.name}",
                    )
                except Exception as exc:  # whatever one file does costs that file only
                    if isinstance(exc, EdgewardError):
                        result = f"[{exc.code}] {exc.message}"
                    else:
                        result = f"[internal] {type(exc).__name__}: {exc}"
                        logger.debug("inbox package %s", path.name, exc_info=True)
                    logger.error("inbox package %s refused: %s", path.name, result)
                    self._reject(path, result)
                self._cache[path] = (stamp, result)
            if isinstance(result, str):
                bad[path.name] = result
            else:
                out.append(result)
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return out, bad

    def fetch(self, cand: Candidate) -> Path:
        assert cand.path is not None
        return cand.path

    def settle(self, cand: Candidate, reason: str | None, *, final: bool) -> None:
        if reason is not None and cand.path is not None and final:
            self._reject(cand.path, reason)

    def _reject(self, path: Path, reason: str) -> None:
        """Move a refused package aside so the next check does not retry it forever."""
        reject_file(path, reason, keep=self.cfg.updates.keep_failed)


# --- the repository ------------------------------------------------------------------


def choose(
    offers: list[Offer],
    *,
    name: str,
    channel: str,
    current: str | None,
    digests: Callable[[], dict[str, str]],
    is_bad: Callable[[str, str], bool],
) -> tuple[Offer | None, str]:
    """Pick the package to install for ``name`` (pure; the reason is logged).

    The newest version in ``channel`` above ``current`` that is not marked bad; of it,
    the residual package when its base is exactly what the box has (base version equal
    to ``current`` and base digests equal to the installed models' weights digests),
    else the full package. ``digests()`` (hashing the installed models, once) is called
    only when a residual package's base version matches.
    """
    mine = [o for o in offers if o.fields.model == name and channel in o.fields.channels]
    newer = sorted(
        {
            o.fields.version
            for o in mine
            if current is None or version_key(o.fields.version) > version_key(current)
        },
        key=version_key,
    )
    newer = [v for v in newer if not is_bad(name, v)]
    if not newer:
        return None, f"nothing newer than {current} in channel {channel}"
    version = newer[-1]
    at = [o for o in mine if o.fields.version == version]
    full = next((o for o in at if o.fields.kind == "full"), None)
    residuals = [o for o in at if o.fields.kind == "residual"]
    why_not = "no residual package"
    for r in residuals:
        if current is None or r.fields.base_version != current:
            why_not = f"residual needs base {r.fields.base_version}, the box has {current}"
            continue
        if r.fields.base_digests != digests():
            why_not = f"residual base digests differ from the installed version {current}'s"
            continue
        return r, f"residual from {current} ({r.length} bytes)"
    if full is None:
        return None, f"version {version}: no full package and {why_not}"
    return full, f"full package ({full.length} bytes): {why_not}"


@dataclass
class RepositoryState:
    """What the repository offered and what was chosen (for status and metrics)."""

    mirror: str | None = None
    offers: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    expires: dict[str, float] = field(default_factory=dict)
    last_error: str | None = None
    last_success: float | None = None
    outcomes: dict[str, int] = field(default_factory=dict)


class RepositorySource:
    """The TUF repository of ``[repository]``: packages download into ``staging/``."""

    label = "repository"
    downloads = True

    def __init__(self, cfg: Config, client: RepositoryClient, staging: Path) -> None:
        self.cfg = cfg
        self.client = client
        self.staging = staging
        self.state = RepositoryState()
        self.listing: Listing | None = None
        self.up_to_date: list[str] = []

    def part_path(self, cand: Candidate) -> Path:
        return self.staging / f"{cand.name}-{cand.version}.part"

    def scan(self, view: StoreView) -> tuple[list[Candidate], dict[str, str]]:
        import time

        assert self.cfg.repository is not None
        channel = self.cfg.repository.channel
        try:
            listing = self.client.refresh()
        except EdgewardError as exc:
            self.state.last_error = f"[{exc.code}] {exc.message}"
            logger.error("repository check refused: %s", self.state.last_error)
            raise
        self.listing = listing
        st = self.state
        st.mirror, st.expires, st.last_success = listing.mirror, listing.expires, time.time()
        st.last_error = None
        st.offers = [o.to_dict() for o in listing.offers]
        out: list[Candidate] = []
        wanted: set[str] = set()
        self.up_to_date = []
        for name in sorted({o.fields.model for o in listing.offers}):
            current = view.current(name)

            def digests(name: str = name, current: str | None = current) -> dict[str, str]:
                return view.weights_digests(name, current) if current else {}

            offer, why = choose(
                listing.offers,
                name=name,
                channel=channel,
                current=current,
                digests=digests,
                is_bad=view.is_bad,
            )
            if offer is None:
                logger.debug("repository: %s: %s", name, why)
                if current is not None:
                    self.up_to_date.append(name)
                continue
            f = offer.fields
            logger.info("repository: %s version %s chosen: %s", name, f.version, why)
            st.chosen[name] = {
                "version": f.version,
                "kind": f.kind,
                "why": why,
                "length": offer.length,
            }
            cand = Candidate(
                name, f.version, "repository", kind=f.kind, offer=offer, why=why, size=offer.length
            )
            wanted.add(self.part_path(cand).name)
            out.append(cand)
        self._drop_stale_parts(wanted)
        return out, {}

    def _drop_stale_parts(self, wanted: set[str]) -> None:
        """Remove partial downloads of versions no longer chosen."""
        if not self.staging.is_dir():
            return
        for p in self.staging.glob("*.part"):
            if p.name not in wanted:
                p.unlink(missing_ok=True)
                p.with_name(p.name + ".json").unlink(missing_ok=True)

    def fetch(self, cand: Candidate, tail: Tail | None = None) -> Path:
        """The verified download (``tail``: follows it as it is written)."""
        assert cand.offer is not None
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.client.download(cand.offer, self.part_path(cand), tail)

    def settle(self, cand: Candidate, reason: str | None, *, final: bool) -> None:
        """Installed or refused for good: the partial file goes; a transient failure keeps
        it so the next check resumes."""
        if reason is None or final:
            part = self.part_path(cand)
            part.unlink(missing_ok=True)
            part.with_name(part.name + ".json").unlink(missing_ok=True)
        self.client.stats.progress = {}

    def status(self) -> dict[str, Any]:
        st = self.state
        return {
            "urls": list(self.cfg.repository.urls) if self.cfg.repository else [],
            "channel": self.cfg.repository.channel if self.cfg.repository else None,
            "mirror": st.mirror,
            "offers": st.offers,
            "chosen": st.chosen,
            "expires": st.expires,
            "last_error": st.last_error,
            "last_success": st.last_success,
            "progress": dict(self.client.stats.progress),
            "bytes_downloaded": self.client.stats.bytes_downloaded,
            "metadata_bytes": self.client.stats.metadata_bytes,
            "resumes": self.client.stats.resumes,
        }


def disk_need(cand: Candidate, part: Path | None, base_dir: Path | None) -> int:
    """Bytes an install needs free before it starts: what is left to download, the
    unpacked version (a full package decodes to about twice its size; a residual one to
    about its base) and the converter's output (about the unpacked models again)."""
    have = part.stat().st_size if part is not None and part.exists() else 0
    left = max(0, cand.size - have) if cand.source == "repository" else 0
    if cand.kind == "residual" and base_dir is not None:
        unpacked = _tree_bytes(base_dir / "Model") + cand.size
    else:
        unpacked = 2 * cand.size
    return left + 2 * unpacked + (16 << 20)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, fn))
    return total


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
