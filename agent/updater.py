"""The update lifecycle: a transition table (data) and the "check now" orchestrator.

Everything that decides which update state may follow which lives in
:data:`TRANSITIONS` (h11 style); :class:`UpdateMachine` only applies it, and every
transition is journaled, logged and counted for ``/metrics``.

The orchestrator (:class:`Updater`) asks every source (:mod:`agent.sources`: the inbox of
sideloaded ``.emp`` files, and the TUF repository when ``[repository]`` is configured)
for candidates, picks per model name the newest version above the current one (not
marked bad), and runs it through download (repository only: resumable, checked against
the signed target length and hashes) → verify (the package manifest's signature, and
that it is the version offered) → unpack (the one full read of the package, every
member verified as it streams; into ``staging/``, residual packages against the current
version) → install (rename into the store) → start + warm up + self-test a worker
("converting": the runtime converts while it starts) → switch routing and the
``current`` link → gc → health window. Any failure is one clear log line and the old
version keeps serving; a package that is itself bad (signature, integrity, self-test,
an unhealthy start) is marked bad and never retried, a failure of the link or the disk
is retried on the next check (a partial download resumes).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from agent.config import Config
from agent.durable import atomic_write_bytes, failpoint
from agent.errors import (
    EdgewardError,
    PreflightError,
    TransitionError,
    UpdateError,
    causes,
    disk_full,
    human_bytes,
    local_fault,
)
from agent.sources import (
    Candidate,
    InboxSource,
    RepositorySource,
    Source,
    disk_free,
    disk_need,
)
from agent.store import Store, version_key

if TYPE_CHECKING:  # the daemon hands the registry in: updates and serving are siblings
    from agent.manifest import Manifest
    from agent.serving.registry import ModelRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "OUTCOMES",
    "STATES",
    "TRANSITIONS",
    "CheckResult",
    "UpdateMachine",
    "Updater",
]

#: Every update state, in pipeline order.
STATES: tuple[str, ...] = (
    "idle",
    "checking",
    "downloading",
    "verifying",
    "unpacking",
    "converting",
    "staged",
    "activating",
    "active",
    "failed",
    "rolled-back",
)

#: state -> states that may follow it. The only place that decides the lifecycle.
TRANSITIONS: dict[str, frozenset[str]] = {
    "idle": frozenset({"checking", "active"}),  # active: a version found installed at start
    # idle/active: nothing new; downloading: from the repository, verifying: a local file
    "checking": frozenset({"idle", "active", "downloading", "verifying", "failed"}),
    "downloading": frozenset({"verifying", "failed"}),
    "verifying": frozenset({"unpacking", "failed"}),
    "unpacking": frozenset({"converting", "failed"}),
    "converting": frozenset({"staged", "failed"}),
    "staged": frozenset({"activating", "failed"}),
    "activating": frozenset({"active", "failed"}),
    "active": frozenset({"checking", "rolled-back"}),
    "failed": frozenset({"checking", "active", "rolled-back"}),
    "rolled-back": frozenset({"checking", "rolled-back", "active"}),
}

#: States in which a crash leaves work half-done; at start they become "failed".
IN_FLIGHT: frozenset[str] = frozenset(
    {"checking", "downloading", "verifying", "unpacking", "converting", "staged", "activating"}
)


#: What a check can come to (counted for /metrics, one check may count in several).
OUTCOMES: tuple[str, ...] = ("installed", "failed", "unchanged", "nothing")


@dataclass
class UpdateMachine:
    """The update state of one model name."""

    name: str
    state: str = "idle"
    since: float = field(default_factory=time.time)
    version: str | None = None  # the version serving
    target: str | None = None  # the version being installed
    error: str | None = None
    kind: str | None = None  # full | residual: what is being installed
    why: str | None = None  # why that package was chosen
    on_change: Callable[[UpdateMachine, str], None] | None = None
    #: version -> why it is refused for good (rolled back, self-test failed...): never
    #: installed again; a newer version is still tried (mark-bad, as RAUC and Mender).
    bad: dict[str, str] = field(default_factory=dict)
    #: a local fault (disk, keys, config) defers this model's next attempt until then.
    retry_at: float = 0.0
    retries: int = 0  # consecutive local faults (the backoff doubles with each)
    fix: str | None = None  # what the operator should fix, while a local fault lasts
    #: a rollback under way: {"from", "to", "keep_previous"}. Journaled with the bad mark
    #: before any link moves; a restart finishes it (Updater._finish_rollback).
    rollback: dict[str, Any] | None = None

    def advance(self, new: str, *, error: str | None = None, target: str | None = None) -> None:
        """Move to ``new`` if the table allows it; notify the observer."""
        if new not in TRANSITIONS.get(self.state, frozenset()):
            raise TransitionError(f"{self.name}: update state {self.state} cannot go to {new}")
        old = self.state
        self.state = new
        self.since = time.time()
        self.error = error
        if target is not None:
            self.target = target
        if new in ("active", "idle", "rolled-back"):
            self.target = None
        logger.debug("update %s: %s -> %s", self.name, old, new)
        if self.on_change is not None:
            self.on_change(self, old)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since,
            "version": self.version,
            "target": self.target,
            "error": self.error,
            "kind": self.kind,
            "why": self.why,
            "bad": dict(self.bad),
            "retry_at": self.retry_at,
            "retries": self.retries,
            "fix": self.fix,
            "rollback": self.rollback,
        }


@dataclass
class CheckResult:
    """What one check did (returned by POST /check)."""

    installed: dict[str, str] = field(default_factory=dict)  # name -> version
    failed: dict[str, str] = field(default_factory=dict)  # name or file -> reason
    deferred: dict[str, str] = field(default_factory=dict)  # name -> local fault, what to fix
    unchanged: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "installed": self.installed,
            "failed": self.failed,
            "deferred": self.deferred,
            "unchanged": self.unchanged,
            "started": self.started,
            "finished": self.finished,
        }


class Updater:
    """The orchestrator: asks every source, picks per model, runs the one pipeline."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        registry: ModelRegistry,
        *,
        extend_timeout: Callable[[float], object] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self._extend = extend_timeout
        self._lock = asyncio.Lock()
        self._stopping = threading.Event()  # set by stop(): reads in flight give up
        self._inbox: InboxSource | None = None
        self._repo: RepositorySource | None = None
        self._repo_cfg: Any = None
        self._digests: dict[tuple[str, str], dict[str, str]] = {}
        self._watch: asyncio.Task[None] | None = None
        self.machines: dict[str, UpdateMachine] = {}
        self.transitions: dict[str, int] = dict.fromkeys(STATES, 0)
        # (model, state) -> transitions into state, for per-model metrics.
        self.model_transitions: dict[tuple[str, str], int] = {}
        # Called after every transition (the daemon keeps systemd's STATUS= current).
        self.observers: list[Callable[[UpdateMachine], object]] = []
        self.checks = 0
        self.check_failures = 0
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.last_check: CheckResult | None = None
        self._load_journal()

    # --- journal -------------------------------------------------------------------

    def _load_journal(self) -> None:
        data = self.store.read_journal().get("models", {})
        for name, rec in data.items() if isinstance(data, dict) else ():
            if not isinstance(rec, dict):
                continue
            state = rec.get("state", "idle")
            if state not in TRANSITIONS:
                state = "idle"
            m = UpdateMachine(
                name,
                state=state,
                since=float(rec.get("since") or time.time()),
                version=rec.get("version"),
                target=rec.get("target"),
                error=rec.get("error"),
                bad=_str_dict(rec.get("bad")),
                retry_at=_number(rec.get("retry_at")),
                retries=int(_number(rec.get("retries"))),
                fix=rec.get("fix") if isinstance(rec.get("fix"), str) else None,
                rollback=_rollback_intent(rec.get("rollback")),
            )
            m.on_change = self._changed
            self.machines[name] = m
        # Only once every record is loaded: a transition writes the journal, which must
        # not lose the models not read yet (their bad marks).
        for m in self.machines.values():
            if m.state in IN_FLIGHT:
                logger.warning(
                    "update of %s to %s was interrupted in state %s; the store serves %s",
                    m.name,
                    m.target,
                    m.state,
                    self.store.current(m.name),
                )
                m.advance("failed", error=f"interrupted in state {m.state}")
            if m.rollback is not None:
                logger.warning(
                    "rollback of %s from version %s to %s was interrupted; finishing it",
                    m.name,
                    m.rollback["from"],
                    m.rollback["to"],
                )
                try:
                    self._finish_rollback(m)
                except (OSError, EdgewardError) as exc:
                    logger.error("cannot finish the rollback of %s: %s", m.name, exc)

    def _changed(self, machine: UpdateMachine, old: str) -> None:
        self.transitions[machine.state] = self.transitions.get(machine.state, 0) + 1
        key = (machine.name, machine.state)
        self.model_transitions[key] = self.model_transitions.get(key, 0) + 1
        self._write_journal()
        for observer in self.observers:
            observer(machine)

    def _write_journal(self) -> None:
        try:
            self.store.write_journal(
                {"models": {n: m.to_dict() for n, m in sorted(self.machines.items())}}
            )
        except OSError as exc:
            logger.error("cannot write update journal: %s", exc)

    def machine(self, name: str) -> UpdateMachine:
        m = self.machines.get(name)
        if m is None:
            m = self.machines[name] = UpdateMachine(name, on_change=self._changed)
        return m

    def mark_serving(self, name: str, version: str) -> None:
        """Record that ``version`` serves (called by the daemon at startup)."""
        m = self.machine(name)
        m.version = version
        if m.state != "active":
            m.advance("active")

    # --- refused versions and local faults (the journal keeps both) -----------------

    #: at most this many refused versions are remembered per model (the newest ones)
    MAX_BAD = 32

    def mark_bad(self, name: str, version: str, reason: str) -> None:
        """Never install ``version`` of ``name`` again; a newer version is still tried."""
        self._refuse(self.machine(name), version, reason)
        self._write_journal()

    def _refuse(self, m: UpdateMachine, version: str, reason: str) -> None:
        m.bad[version] = reason
        if len(m.bad) > self.MAX_BAD:
            for old in sorted(m.bad, key=version_key)[: len(m.bad) - self.MAX_BAD]:
                del m.bad[old]
        logger.warning("%s version %s is refused from now on: %s", m.name, version, reason)

    def is_bad(self, name: str, version: str) -> bool:
        """Whether ``version`` of ``name`` was refused for good (see :meth:`mark_bad`)."""
        m = self.machines.get(name)
        return m is not None and version in m.bad

    def defer(self, name: str, reason: str, fix: str, *, kept: bool = True) -> float:
        """A local fault stopped ``name``'s update: retry after a backoff that doubles
        with each consecutive fault (``updates.retry_backoff`` up to
        ``updates.retry_backoff_max`` seconds). Returns the time of the next attempt."""
        m = self.machine(name)
        u = self.cfg.updates
        delay = min(u.retry_backoff * 2.0 ** min(m.retries, 30), u.retry_backoff_max)
        m.retries += 1
        m.retry_at = time.time() + delay
        m.fix = fix
        m.error = f"{reason}; to fix: {fix}; retrying in {delay:.0f} s"
        self._write_journal()
        logger.error(
            "update of %s deferred (local fault, %s): %s; to fix: %s; next attempt in %.0f s",
            name,
            "the package is kept" if kept else "the partial download is reclaimed",
            reason,
            fix,
            delay,
        )
        return m.retry_at

    def deferred(self, name: str, now: float | None = None) -> float:
        """Seconds until ``name`` may be tried again after a local fault (0: now)."""
        m = self.machines.get(name)
        if m is None or not m.retry_at:
            return 0.0
        return max(0.0, m.retry_at - (time.time() if now is None else now))

    def _clear_fault(self, name: str) -> None:
        m = self.machine(name)
        if m.retries or m.retry_at or m.fix:
            m.retries, m.retry_at, m.fix = 0, 0.0, None
            self._write_journal()

    # --- what sources may ask (StoreView) ------------------------------------------

    def current(self, name: str) -> str | None:
        return self.store.current(name)

    def weights_digests(self, name: str, version: str) -> dict[str, str]:
        """Weights digest of each model of an installed version (computed once, cached).

        A version installed from a residual package carries them in its manifest
        (``target_digest``); others are hashed once (canonical weights digest, the
        one residual packages name as their base).
        """
        key = (name, version)
        if key in self._digests:
            return self._digests[key]
        vdir = self.store.version_dir(name, version)
        cache = self.store.models_dir / name / f".digests-{version}.json"
        out: dict[str, str] = {}
        try:
            out = {str(k): str(v) for k, v in json.loads(cache.read_bytes()).items()}
        except (OSError, ValueError, AttributeError):
            out = self._compute_digests(vdir)
            if out:
                try:
                    atomic_write_bytes(cache, json.dumps(out, sort_keys=True).encode())
                except OSError as exc:
                    logger.warning("cannot cache weights digests of %s %s: %s", name, version, exc)
        self._digests[key] = out
        return out

    @staticmethod
    def _compute_digests(vdir: Path) -> dict[str, str]:
        from agent.manifest import parse_manifest
        from agent.residual import weights_digest

        try:
            man = parse_manifest((vdir / "manifest.json").read_bytes())
        except (OSError, EdgewardError):
            return {}
        out: dict[str, str] = {}
        for mi in man.models:
            if mi.target_digest:
                out[mi.name] = mi.target_digest
                continue
            try:
                out[mi.name] = weights_digest(vdir / "Model" / mi.name)
            except (OSError, EdgewardError) as exc:
                logger.warning("weights digest of %s: %s", vdir / "Model" / mi.name, exc)
                return {}
        return out

    # --- stopping ------------------------------------------------------------------

    def stop(self) -> None:
        """The daemon is stopping: a verification or unpack in flight gives up at its
        next piece (a few MiB), so SIGTERM is not held up by a big package; nothing is
        refused or marked for it and the next start tries again."""
        self._stopping.set()

    def _go_on(self, _nbytes: int = 0) -> None:
        """The ``progress`` hook of every package read the updater starts."""
        if self._stopping.is_set():
            raise UpdateError("the daemon is stopping; the update will be retried", code="stopping")

    # --- trust ---------------------------------------------------------------------

    def _trust(self) -> Any:
        from agent.keys import load_trusted

        tdir = self.cfg.paths.trust_dir
        pubs = sorted(tdir.glob("*.pub")) if tdir.is_dir() else []
        if not pubs:
            raise UpdateError(
                f"no trusted publisher keys (*.pub) in {tdir}; refusing every package",
                code="no-trust",
            )
        return load_trusted(pubs)

    def _keyring(self) -> Any:
        kdir = self.cfg.paths.keys_dir
        if kdir is None or not kdir.is_dir() or not any(kdir.iterdir()):
            return None
        from agent.keys import load_keyring

        return load_keyring([kdir])

    def _limits(self) -> Any:
        return self.cfg.package_limits  # typed and validated at config load

    # --- sources -------------------------------------------------------------------

    @property
    def repository(self) -> RepositorySource | None:
        """The repository source (None without ``[repository]``); rebuilt on reload."""
        rcfg = self.cfg.repository
        if rcfg is None:
            if self._repo is not None:
                self._repo.client.close()
            self._repo = None
        elif self._repo is None or self._repo_cfg != rcfg:
            from agent.repository.client import RepositoryClient

            old = self._repo
            client = RepositoryClient(rcfg, self.store.root)
            if old is not None:
                client.stats = old.client.stats
                client.fetcher.stats = old.client.stats
                old.client.close()
            self._repo = RepositorySource(self.cfg, client, self.store.staging_dir)
            if old is not None:
                self._repo.state = old.state
            self._repo_cfg = rcfg
        if self._repo is not None:
            self._repo.cfg = self.cfg
        return self._repo

    def _sources(self, trust: Any, limits: Any) -> list[Source]:
        if self._inbox is None or self._inbox.cfg is not self.cfg:
            cache = self._inbox._cache if self._inbox is not None else {}
            self._inbox = InboxSource(self.cfg, trust, limits)
            self._inbox._cache = cache
        self._inbox.trust, self._inbox.limits = trust, limits
        out: list[Source] = [self._inbox]
        repo = self.repository
        if repo is not None:
            out.append(repo)
        return out

    # --- the job -------------------------------------------------------------------

    async def check(self, *, retry_deferred: bool = False) -> CheckResult:
        """Install the newest offered version of every model that has a newer one.

        Concurrent calls wait for the running check and then run their own (cheap:
        inbox manifests are cached per file, an unchanged repository costs its
        timestamp). ``retry_deferred``: an operator asked (``edgeward check``, a reload),
        so models waiting out a local fault's backoff are tried now.
        """
        async with self._lock:
            if retry_deferred:
                for m in self.machines.values():
                    m.retry_at = 0.0
            res = await self._check()
        for key in ("installed", "failed", "unchanged"):
            if getattr(res, key):
                self.outcomes[key] += 1
        if not (res.installed or res.failed or res.unchanged or res.deferred):
            self.outcomes["nothing"] += 1
        return res

    async def _check(self) -> CheckResult:
        res = CheckResult(started=time.time())
        self.checks += 1
        loop = asyncio.get_running_loop()
        inbox_dir = self.cfg.paths.inbox_dir
        if self.cfg.repository is None and not (
            inbox_dir.is_dir() and any(inbox_dir.glob("*.emp"))
        ):
            logger.debug("update check: no packages in %s", inbox_dir)
            res.finished = time.time()
            self.last_check = res
            return res
        try:
            trust = self._trust()
            limits = self._limits()
        except EdgewardError as exc:
            self.check_failures += 1
            logger.error("update check failed: %s", exc.message)
            res.failed["*"] = exc.message
            res.finished = time.time()
            self.last_check = res
            return res
        offered: list[tuple[Candidate, Source]] = []
        up_to_date: set[str] = set()
        for src in self._sources(trust, limits):
            if isinstance(src, InboxSource) and not src.has_packages():
                continue
            try:
                self._go_on()
                cands, bad = await loop.run_in_executor(None, src.scan, self)
            except EdgewardError as exc:
                if exc.code == "stopping":
                    raise
                self.check_failures += 1
                res.failed[src.label] = f"[{exc.code}] {exc.message}"
                continue
            res.failed.update(bad)
            offered.extend((c, src) for c in cands)
            up_to_date.update(src.up_to_date)
        best: dict[str, tuple[Candidate, Source]] = {}
        for c, src in offered:  # sources in order: on a tie the inbox (local) wins
            if c.name not in best or version_key(c.version) > version_key(best[c.name][0].version):
                best[c.name] = (c, src)
        res.unchanged.extend(sorted(up_to_date - set(best)))
        for name, (cand, src) in sorted(best.items()):
            # one model's candidate never blocks another's: whatever goes wrong here
            # is that model's failure only
            try:
                outcome = await self._consider(name, cand, src, trust, limits)
                if outcome == "installed":
                    res.installed[name] = cand.version
                elif outcome == "deferred":
                    res.deferred[name] = self.machine(name).error or "deferred"
                else:
                    res.unchanged.append(name)
            except EdgewardError as exc:
                self.check_failures += 1
                res.failed[name] = f"[{exc.code}] {exc.message}"
            except Exception as exc:  # a bug must cost this model's update only
                self.check_failures += 1
                logger.exception("update check of %s failed", name)
                res.failed[name] = f"[internal] {type(exc).__name__}: {exc}"
        res.finished = time.time()
        self.last_check = res
        return res

    async def _consider(
        self, name: str, cand: Candidate, src: Source, trust: Any, limits: Any
    ) -> str:
        """Install ``cand`` unless it is not newer, refused for good or deferred after a
        local fault. Returns "installed", "unchanged" or "deferred"."""
        current = self.store.current(name)
        if current is not None and version_key(cand.version) <= version_key(current):
            return "unchanged"
        if self.is_bad(name, cand.version):
            logger.debug("%s version %s was refused before; skipped", name, cand.version)
            return "unchanged"
        wait = self.deferred(name)
        if wait > 0:
            logger.debug("%s: next attempt after a local fault in %.0f s", name, wait)
            return "deferred"
        if self.store.has(name, cand.version) and cand.version not in (
            current,
            self.store.previous(name),
        ):
            # left by an install that did not finish activating: replace it
            self.store.remove_version(name, cand.version)
        await self._install(cand, src, trust, limits)
        return "installed"

    async def _install(self, cand: Candidate, src: Source, trust: Any, limits: Any) -> None:
        name, version = cand.name, cand.version
        m = self.machine(name)
        m.advance("checking", target=version)
        m.kind, m.why = cand.kind, cand.why
        took: dict[str, float] = {}
        mark = time.monotonic()

        def step(state: str) -> None:  # advance, and time the stage that ends
            nonlocal mark
            now = time.monotonic()
            took[m.state] = took.get(m.state, 0.0) + now - mark
            mark = now
            m.advance(state)

        loop = asyncio.get_running_loop()
        from agent import package  # the packaging stack loads at the first install

        staging: Path | None = None
        installed = False
        inside: dict[str, float] = {}
        current = self.store.current(name)
        base_dir = self.store.version_dir(name, current) if current else None
        kwargs = {"limits": limits} if limits is not None else {}
        early: Any = None  # the new version's worker, its process started early
        try:
            self._preflight_disk(cand, src, base_dir)
            # Its interpreter and imports overlap the download and unpack.
            early = self._launch(name, version)
            path = cand.path
            keyring = self._keyring()
            streamed: Any = None  # the manifest of a package unpacked while it downloaded
            if src.downloads:
                step("downloading")
                self._extend_timeout(max(300.0, cand.size / 1e5))
                if isinstance(src, RepositorySource):
                    staging = self.store.staging(prefix=f"{name}-{version}-")
                    path, streamed = await self._fetch_unpacking(
                        cand,
                        src,
                        staging / "pkg",
                        trust=trust,
                        keyring=keyring,
                        base_dir=base_dir,
                        kwargs=kwargs,
                    )
                else:
                    path = await loop.run_in_executor(None, src.fetch, cand)
            assert path is not None
            step("verifying")
            manifest = (
                streamed
                if streamed is not None
                else await loop.run_in_executor(
                    None, lambda: package.read_manifest(path, trust, limits, nofollow=True)
                )
            )
            if str(manifest.name) != name or str(manifest.version) != version:
                raise UpdateError(
                    f"{path.name} holds {manifest.name} version {manifest.version}, "
                    f"expected {name} version {version}",
                    code="changed",
                )
            step("unpacking")
            if staging is None:
                staging = self.store.staging(prefix=f"{name}-{version}-")
            out = staging / "pkg"
            self._extend_timeout(300)
            if streamed is None:
                await loop.run_in_executor(
                    None,
                    lambda: package.unpack(
                        path,
                        out,
                        trust=trust,
                        keyring=keyring,
                        base_dir=base_dir,
                        nofollow=cand.source == "inbox",
                        progress=self._go_on,
                        on_manifest=functools.partial(
                            self._preflight_declared, cand, src, base_dir
                        ),
                        **kwargs,
                    ),
                )
            self._preflight_memory(out)
            vdir = self.store.install(name, version, out)
            installed = True
            step("converting")
            self._extend_timeout(self.cfg.daemon.worker_start_timeout + 30)
            async with self.registry.lock(name):
                worker, early = early, None
                model = await self.registry.prepare(name, version, vdir, worker=worker)
                inside = dict(model.start_phases)
                step("staged")
                step("activating")
                await self._switch_or_discard(model, self.store.activate, name, version)
                await self.registry.activate(model, self.cfg.daemon.drain_timeout)
            m.version = version
            step("active")
            self.store.gc(name)
            src.settle(cand, None, final=True)
            logger.info(
                "updated %s to version %s (%s, %s); %s%s",
                name,
                version,
                cand.source,
                cand.why,
                ", ".join(f"{k} {v:.2f}s" for k, v in took.items()),
                # what "converting" was made of: the worker's start phases
                f" (converting: {', '.join(f'{k} {v:.2f}s' for k, v in inside.items())})"
                if inside
                else "",
            )
            self._start_health_window(name, version, current)
        except Exception as exc:  # a bug or an OSError must not kill the daemon either
            stage = m.state
            if stage == "downloading" and isinstance(src, RepositorySource):
                stage = "downloading and unpacking"  # one pass (_fetch_unpacking)
            if disk_full(exc):
                # reclaim first (the partial download and the half-unpacked version
                # go), then say how much there is: the numbers after cleanup
                src.settle(cand, "disk full", final=True)
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                if installed and version not in (
                    self.store.current(name),
                    self.store.previous(name),
                ):
                    self.store.remove_version(name, version)
                    installed = False
                exc = UpdateError(
                    f"disk full in {self.store.root} while {stage} {name} version {version} "
                    f"({human_bytes(cand.size)} package): "
                    f"{human_bytes(disk_free(self.store.root))} free after cleanup",
                    code="disk-full",
                )
                exc.__cause__ = OSError(errno.ENOSPC, "No space left on device")
            if isinstance(exc, EdgewardError):
                reason = f"[{exc.code}] {exc.message}"
            else:
                reason = f"[internal] {type(exc).__name__}: {exc}"
            logger.error(
                "update of %s to version %s failed, still serving %s: %s",
                name,
                version,
                current or "nothing",
                reason,
                exc_info=not isinstance(exc, EdgewardError | OSError),
            )
            m.advance("failed", error=reason)
            if installed and version not in (self.store.current(name), self.store.previous(name)):
                self.store.remove_version(name, version)
            fix = local_fault(exc)
            if isinstance(exc, EdgewardError) and exc.code == "stopping":
                src.settle(cand, reason, final=False)  # the next start resumes
            elif fix is not None:
                src.settle(cand, reason, final=False)  # kept: a partial download resumes
                self.defer(name, reason, fix, kept=not disk_full(exc))
            elif isinstance(exc, EdgewardError):
                # the package's own fault: never this version again
                self._clear_fault(name)
                src.settle(cand, reason, final=True)
                if cand.source != "inbox":
                    self.mark_bad(name, version, reason)
            else:
                src.settle(cand, reason, final=False)
            if isinstance(exc, EdgewardError):
                raise exc
            raise UpdateError(reason, code="internal") from exc
        else:
            self._clear_fault(name)
        finally:
            if early is not None:  # the update stopped before it was used
                await loop.run_in_executor(None, early.stop, 0.0)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    async def _fetch_unpacking(
        self,
        cand: Candidate,
        src: RepositorySource,
        out: Path,
        *,
        trust: Any,
        keyring: Any,
        base_dir: Path | None,
        kwargs: dict[str, Any],
    ) -> tuple[Path, Any]:
        """Download ``cand`` and unpack it into ``out`` in one pass: the unpacker reads the
        ``.part`` file behind the downloader (:class:`agent.repository.client.Tail`), so
        hashing, decrypting, decompressing and writing overlap the transfer instead of
        following it. The unpacker sees the end of the package only once the download
        matched the target's length and hashes; nothing leaves ``staging/`` before both
        are done. The download stays what it was (``.part``, resume, caps, retries).

        Returns (the verified download, the unpacked package's manifest), or (the
        download, None) when the unpack in the stream failed while the download succeeded
        (a download that started over, a bad package): the caller then unpacks the file
        as it would have, which gives the authoritative outcome. A failed download raises
        its own error (the unpacker's half-done directory goes with ``staging``).

        A full disk is different: unpacking again cannot succeed, so the unpack's error
        is raised as it is, and the download is told to stop at its next piece
        (:meth:`Tail.abandon`) instead of filling the disk further for nothing.
        """
        from agent import package
        from agent.repository.client import Tail

        loop = asyncio.get_running_loop()
        tail = Tail(src.part_path(cand), stopping=self._stopping.is_set)
        unpacking = loop.run_in_executor(
            None,
            lambda: package.unpack(
                tail.part,
                out,
                trust=trust,
                keyring=keyring,
                base_dir=base_dir,
                progress=self._go_on,
                stream=cast(BinaryIO, tail),
                size=cand.size,
                on_manifest=functools.partial(self._preflight_declared, cand, src, base_dir),
                **kwargs,
            ),
        )

        def unpack_ended(fut: asyncio.Future[Any]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None and _final(exc):
                tail.abandon(exc.message if isinstance(exc, EdgewardError) else "the disk is full")

        unpacking.add_done_callback(unpack_ended)
        try:
            try:
                path = await loop.run_in_executor(None, src.fetch, cand, tail)
            except BaseException as broke:
                tail.finish("the download failed")  # fetch may fail before downloading
                failed = await _failure(unpacking)
                if failed is not None and _final(failed) and not _final(broke):
                    # the download only stopped (Tail.abandon): the unpack's is the cause
                    raise _final_cause(failed) from None
                raise
            try:
                return path, await unpacking
            except EdgewardError as exc:
                if exc.code == "stopping" or _final(exc):
                    raise
                why = f"[{exc.code}] {exc.message}"
            except Exception as exc:  # an OSError: the file's own unpack decides
                if _final(exc):
                    raise
                why = f"{type(exc).__name__}: {exc}"
            logger.info(
                "%s: unpacking while downloading failed (%s); unpacking the download",
                path.name,
                why,
            )
            shutil.rmtree(out, ignore_errors=True)
            return path, None
        finally:
            tail.close()

    def _launch(self, name: str, version: str) -> Any:
        """The version's worker with its process already starting, or None (a name the
        store refuses fails later, where it always did)."""
        try:
            return self.registry.launch(name, version, self.store.version_dir(name, version))
        except Exception as exc:
            logger.debug("no early worker for %s %s: %s", name, version, exc)
            return None

    def _preflight_disk(self, cand: Candidate, src: Source, base_dir: Path | None) -> None:
        """Refuse early, with the numbers, when the disk cannot hold download + unpack +
        convert; a half-written version on a full disk is what must not happen."""
        part = src.part_path(cand) if isinstance(src, RepositorySource) else None
        need = disk_need(cand, part, base_dir)
        free = disk_free(self.store.root)
        if free < need:
            raise PreflightError(
                f"not enough disk space in {self.store.root}: {free // 2**20} MiB free, "
                f"{need // 2**20} MiB needed to download, unpack and convert {name_v(cand)} "
                f"({cand.size // 2**20} MiB package)",
                code="disk-space",
            )

    def _preflight_declared(
        self, cand: Candidate, src: Source, base_dir: Path | None, manifest: Manifest
    ) -> None:
        """The second preflight, once the signed manifest is read and before anything is
        decoded: its declared sizes replace the first one's estimate. A package small on
        the wire that decodes to far more (zeros compress well) is refused here instead
        of filling the disk other programs on the box need too."""
        need = declared_need(manifest, base_dir)
        if isinstance(src, RepositorySource):
            part = src.part_path(cand)
            need += max(0, cand.size - (part.stat().st_size if part.exists() else 0))
        free = disk_free(self.store.root)
        if free < need:
            raise PreflightError(
                f"not enough disk space in {self.store.root}: {human_bytes(free)} free, "
                f"{human_bytes(need)} needed to unpack and convert {name_v(cand)} (its signed "
                f"manifest declares {human_bytes(declared_need(manifest, base_dir, bare=True))} "
                "once unpacked)",
                code="disk-space",
            )

    def _preflight_memory(self, out: Path) -> None:
        """Refuse before a worker starts when technicalinfo asks for more memory than the
        box has available now (hardware_requirements.memory, e.g. "512M")."""
        import psutil

        try:
            tech = json.loads((out / "Meta-info" / "technicalinfo.json").read_bytes())
        except (OSError, ValueError):
            return
        hw = tech.get("hardware_requirements") if isinstance(tech, dict) else None
        want = _parse_bytes(hw.get("memory")) if isinstance(hw, dict) else None
        if want is None:
            return
        avail = int(psutil.virtual_memory().available)
        if avail < want:
            raise PreflightError(
                f"not enough memory: {avail // 2**20} MiB available, the package's "
                f"technicalinfo asks for {want // 2**20} MiB",
                code="memory",
            )

    def _extend_timeout(self, seconds: float) -> None:
        if self._extend is not None:
            self._extend(seconds)

    # --- health window -------------------------------------------------------------

    def _start_health_window(self, name: str, version: str, previous: str | None) -> None:
        window = self.cfg.updates.health_window_s
        if window <= 0 or previous is None:
            return
        self._watch = asyncio.get_running_loop().create_task(
            self._health_window(name, version, window)
        )

    async def _health_window(self, name: str, version: str, window: float) -> None:
        """Roll back and mark bad when the new version's worker crashes or fails too many
        requests within ``window`` seconds of activation."""
        u = self.cfg.updates
        st = self.registry.stats().get(name)
        req0, err0 = (st.requests, st.errors) if st is not None else (0, 0)
        deadline = time.monotonic() + window
        reason = None
        while time.monotonic() < deadline and reason is None:
            await asyncio.sleep(min(0.25, window))
            try:
                model = self.registry.get(name)
            except EdgewardError:
                return
            if model.version != version:
                return
            d = model.describe()
            if int(d.get("restarts", 0)) > 0 or d.get("state") in ("failed", "stopped"):
                reason = f"worker crashed within the health window (state {d.get('state')})"
                break
            if st is not None:
                n, e = st.requests - req0, st.errors - err0
                if n >= u.health_min_requests and e / n > u.health_max_error_rate:
                    reason = f"{e} of {n} requests failed within the health window"
        if reason is None:
            logger.info("%s version %s passed its %.0fs health window", name, version, window)
            return
        logger.error("%s version %s is unhealthy: %s; rolling back", name, version, reason)
        try:
            await self._health_rollback(name, version, reason)
        except (OSError, EdgewardError) as exc:
            logger.error("health rollback of %s failed: %s", name, exc)

    # --- rollback ------------------------------------------------------------------
    #
    # Both kinds journal the intent together with the bad mark before any link moves,
    # so a crash at any point leaves either nothing done (the journal write did not
    # happen) or an intent that the next start finishes (_load_journal runs before any
    # model loads). A bad mark is never lost and `previous` never names a refused
    # version after a health rollback.

    async def _health_rollback(self, name: str, bad: str, reason: str) -> None:
        """Serve the previous version again, refuse ``bad`` for good, forget it: after
        this `previous` is empty (nothing healthy to go back to) and ``bad``'s
        directory is gone."""
        async with self._lock, self.registry.lock(name):
            cur, prev = self.store.current(name), self.store.previous(name)
            why = f"[unhealthy] {reason}"
            if cur != bad or prev is None or prev == cur:
                self.mark_bad(name, bad, why)  # nothing to go back to: keep serving
                return
            # the previous version's worker answers before any link moves
            model = await self.registry.prepare(name, prev, self.store.version_dir(name, prev))
            m = self._begin_rollback(name, bad, prev, why, keep_previous=False)
            await self._switch_or_discard(model, self._switch_links, m)
            await self.registry.activate(model, self.cfg.daemon.drain_timeout)
            self._finish_rollback(m)
            m.error = f"version {bad} rolled back: {reason}"
            self._write_journal()
            logger.info("rolled back %s from unhealthy version %s to %s", name, bad, prev)

    async def rollback(self, name: str) -> dict[str, str]:
        """Serve the previous version again (it becomes current; current becomes previous
        and is refused from now on: a newer version is still installed)."""
        async with self._lock, self.registry.lock(name):
            cur, prev = self.store.current(name), self.store.previous(name)
            if cur is None:
                raise UpdateError(f"model {name!r} is not installed", code="not-installed")
            if prev is None or prev == cur:
                raise UpdateError(
                    f"{name}: no previous version to roll back to", code="no-previous", status=409
                )
            model = await self.registry.prepare(name, prev, self.store.version_dir(name, prev))
            m = self._begin_rollback(name, cur, prev, "rolled back", keep_previous=True)
            try:
                await self._switch_or_discard(model, self._switch_links, m)
            except BaseException:
                if self.store.current(name) == cur:  # nothing moved: nothing was done
                    m.rollback = None
                    m.bad.pop(cur, None)
                    self._write_journal()
                raise
            await self.registry.activate(model, self.cfg.daemon.drain_timeout)
            self._finish_rollback(m)
            logger.info("rolled back %s from version %s to %s", name, cur, prev)
            return {"name": name, "current": prev, "previous": cur}

    async def _switch_or_discard(self, model: Any, switch: Callable[..., Any], *args: Any) -> None:
        """Move the store's links; if that fails (a full disk refuses even a symlink),
        stop the worker prepared for the new links: it would serve nothing."""
        try:
            switch(*args)
        except BaseException:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _stop_quietly, model.worker)
            raise

    def _begin_rollback(
        self, name: str, bad: str, good: str, reason: str, *, keep_previous: bool
    ) -> UpdateMachine:
        """Journal the bad mark and the intent in one atomic write."""
        m = self.machine(name)
        self._refuse(m, bad, reason)
        m.rollback = {"from": bad, "to": good, "keep_previous": keep_previous}
        self._write_journal()
        failpoint("rollback-journaled")
        return m

    def _switch_links(self, m: UpdateMachine) -> None:
        """The store's half of a journaled rollback; a no-op when already done."""
        assert m.rollback is not None
        bad, good = m.rollback["from"], m.rollback["to"]
        if self.store.current(m.name) == bad and self.store.has(m.name, good):
            if m.rollback["keep_previous"]:
                self.store.rollback(m.name)  # swap: previous = bad, for the operator
            else:
                self.store.fall_back(m.name, good)
        elif not m.rollback["keep_previous"] and self.store.previous(m.name) in (
            bad,
            self.store.current(m.name),
        ):
            self.store.drop_previous(m.name)  # a crash fell between the two links
        failpoint("rollback-switched")

    def _finish_rollback(self, m: UpdateMachine) -> None:
        """Complete a journaled rollback (live, or at start after a crash): links, the
        refused version's directory (health rollback), then clear the intent."""
        assert m.rollback is not None
        self._switch_links(m)
        bad, good = m.rollback["from"], m.rollback["to"]
        name = m.name
        linked = (self.store.current(name), self.store.previous(name))
        if not m.rollback["keep_previous"] and self.store.has(name, bad) and bad not in linked:
            self.store.remove_version(name, bad)
        failpoint("rollback-discarded")
        m.rollback = None
        m.version = self.store.current(name) or good
        if m.state != "rolled-back":
            m.advance("rolled-back")  # writes the journal
        else:
            self._write_journal()

    def close(self) -> None:
        """Stop a running health window and the repository session (daemon shutdown)."""
        if self._watch is not None:
            self._watch.cancel()
        if self._repo is not None:
            self._repo.client.close()

    def status(self) -> dict[str, Any]:
        """The repository part of ``/status`` (None without a repository)."""
        repo = self._repo if self.cfg.repository is not None else None
        return repo.status() if repo is not None else {}


def _str_dict(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def declared_need(manifest: Manifest, base_dir: Path | None, *, bare: bool = False) -> int:
    """Bytes an install of ``manifest``'s package needs on disk: its decoded models and
    other files, plus the converter's output (about the models again) and 16 MiB of
    headroom; ``bare``: the unpacked bytes alone. A residual model decodes to about its
    base model's size."""
    containers = {m.container for m in manifest.models}
    files = sum(f.size for f in manifest.files if f.path not in containers)
    models = 0
    for m in manifest.models:
        base = base_dir / "Model" / m.name if base_dir is not None else None
        if m.residual and base is not None and base.is_file():
            models += max(m.size, base.stat().st_size)
        else:
            models += m.size
    return files + models if bare else files + 2 * models + (16 << 20)


def _stop_quietly(worker: Any) -> None:
    try:
        worker.stop(0.0)
    except Exception as exc:  # the error that got us here is the one to report
        logger.warning("stopping an unused worker: %s", exc)


def _final(exc: BaseException) -> bool:
    """A failed unpack that unpacking the file again cannot cure: the disk is full, or
    the declared sizes do not fit."""
    return disk_full(exc) or isinstance(exc, PreflightError)


def _final_cause(exc: BaseException) -> BaseException:
    """The exception in ``exc``'s chain that makes it final (the ENOSPC itself, the
    preflight refusal, a worker's ``disk-full``), to be raised on its own: raising a
    wrapper anew would replace the context that links it to its cause."""
    for e in causes(exc):
        if (
            isinstance(e, PreflightError)
            or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            or (isinstance(e, EdgewardError) and e.code == "disk-full")
        ):
            return e  # final by itself, whatever its context becomes
    return exc


async def _failure(fut: Awaitable[Any]) -> BaseException | None:
    """Wait for ``fut``; what it raised, or None."""
    try:
        await fut
    except BaseException as exc:
        return exc
    return None


def _rollback_intent(value: Any) -> dict[str, Any] | None:
    """A journaled rollback intent, or None when absent or malformed."""
    if not isinstance(value, dict):
        return None
    bad, good = value.get("from"), value.get("to")
    if not isinstance(bad, str) or not isinstance(good, str):
        return None
    return {"from": bad, "to": good, "keep_previous": bool(value.get("keep_previous"))}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def name_v(c: Candidate) -> str:
    return f"{c.name} version {c.version}"


def _parse_bytes(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    v = value.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(v[-1:], 1)
    num = v[:-1] if v[-1:] in "KMGT" else v
    try:
        return int(float(num) * mult)
    except ValueError:
        return None
