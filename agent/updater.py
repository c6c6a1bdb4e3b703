"""The update lifecycle: a transition table (data) and the "check now" job.

Everything that decides which update state may follow which lives in
:data:`TRANSITIONS` (h11 style); :class:`UpdateMachine` only applies it, and every
transition is journaled, logged and counted for ``/metrics``.

The check job (:class:`Updater`) scans the configured inbox of sideloaded ``.emp``
packages (the network repository is a later stage that plugs in before ``verifying``
as ``downloading``), picks per model name the newest version above the current one, and
runs it through verify → unpack (into ``staging/``, residual packages against the
current version) → install (rename into the store) → start + warm up + self-test a
worker ("converting": the runtime converts while it starts) → switch routing and the
``current`` link → gc. Any failure is one clear log line and the old version keeps
serving.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import EdgewardError, PreflightError, UpdateError, local_fault
from agent.registry import ModelRegistry
from agent.store import Store, check_name, reject_file, version_key

logger = logging.getLogger(__name__)

__all__ = [
    "STATES",
    "TRANSITIONS",
    "CheckResult",
    "TransitionError",
    "UpdateMachine",
    "Updater",
]

#: Every update state, in pipeline order.
STATES: tuple[str, ...] = (
    "idle",
    "checking",
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
    "checking": frozenset({"idle", "active", "verifying", "failed"}),  # idle/active: nothing new
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
    {"checking", "verifying", "unpacking", "converting", "staged", "activating"}
)


class TransitionError(UpdateError):
    """A transition the table does not allow (a bug, never user input)."""

    code = "bad-transition"


@dataclass
class UpdateMachine:
    """The update state of one model name."""

    name: str
    state: str = "idle"
    since: float = field(default_factory=time.time)
    version: str | None = None  # the version serving
    target: str | None = None  # the version being installed
    error: str | None = None
    on_change: Callable[[UpdateMachine, str], None] | None = None
    #: version -> why it is refused for good (rolled back, self-test failed...): never
    #: installed again; a newer version is still tried (mark-bad, as RAUC and Mender).
    bad: dict[str, str] = field(default_factory=dict)
    #: a local fault (disk, keys, config) defers this model's next attempt until then.
    retry_at: float = 0.0
    retries: int = 0  # consecutive local faults (the backoff doubles with each)
    fix: str | None = None  # what the operator should fix, while a local fault lasts

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
            "bad": dict(self.bad),
            "retry_at": self.retry_at,
            "retries": self.retries,
            "fix": self.fix,
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


@dataclass(frozen=True)
class _Candidate:
    path: Path
    name: str
    version: str
    stamp: tuple[int, int]  # (size, mtime_ns): re-verify only when the file changes


class Updater:
    """The "check now" job and rollback, serialised per daemon."""

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
        self._scan_cache: dict[Path, tuple[tuple[int, int], _Candidate | str]] = {}
        self.machines: dict[str, UpdateMachine] = {}
        self.transitions: dict[str, int] = dict.fromkeys(STATES, 0)
        # (model, state) -> transitions into state, for per-model metrics.
        self.model_transitions: dict[tuple[str, str], int] = {}
        # Called after every transition (the daemon keeps systemd's STATUS= current).
        self.observers: list[Callable[[UpdateMachine], object]] = []
        self.checks = 0
        self.check_failures = 0
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
            )
            m.on_change = self._changed
            self.machines[name] = m
            if state in IN_FLIGHT:
                logger.warning(
                    "update of %s to %s was interrupted in state %s; the store serves %s",
                    name,
                    m.target,
                    state,
                    self.store.current(name),
                )
                m.advance("failed", error=f"interrupted in state {state}")

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
        m = self.machine(name)
        m.bad[version] = reason
        if len(m.bad) > self.MAX_BAD:
            for old in sorted(m.bad, key=version_key)[: len(m.bad) - self.MAX_BAD]:
                del m.bad[old]
        self._write_journal()
        logger.warning("%s version %s is refused from now on: %s", name, version, reason)

    def is_bad(self, name: str, version: str) -> bool:
        """Whether ``version`` of ``name`` was refused for good (see :meth:`mark_bad`)."""
        m = self.machines.get(name)
        return m is not None and version in m.bad

    def defer(self, name: str, reason: str, fix: str) -> float:
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
            "update of %s deferred (local fault, the package is kept): %s; to fix: %s; "
            "next attempt in %.0f s",
            name,
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

    # --- scanning ------------------------------------------------------------------

    def _scan(self, trust: Any, limits: Any) -> tuple[list[_Candidate], dict[str, str]]:
        """Verify every inbox package (cached by size + mtime); return candidates."""
        inbox = self.cfg.paths.inbox_dir
        out: list[_Candidate] = []
        bad: dict[str, str] = {}
        if not inbox.is_dir():
            return out, bad
        package = importlib.import_module("agent.package")
        seen: set[Path] = set()
        for path in sorted(inbox.glob("*.emp")):
            seen.add(path)
            try:
                st = path.lstat()  # a link is refused as such, never followed
            except OSError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            cached = self._scan_cache.get(path)
            if cached is not None and cached[0] == stamp:
                result = cached[1]
            else:
                try:
                    kwargs = {"limits": limits} if limits is not None else {}
                    self._go_on()
                    manifest = package.verify(
                        path, trust, nofollow=True, progress=self._go_on, **kwargs
                    )
                    name = check_name("name", str(manifest.name))
                    version = check_name("version", str(manifest.version))
                    result = _Candidate(path, name, version, stamp)
                except UpdateError as exc:
                    if exc.code == "stopping":
                        raise  # not this file's fault: leave it for the next start
                    result = f"[{exc.code}] {exc.message}"
                    self._reject(path, result)
                except Exception as exc:  # whatever one file does costs that file only
                    if isinstance(exc, EdgewardError):
                        result = f"[{exc.code}] {exc.message}"
                    else:
                        result = f"[internal] {type(exc).__name__}: {exc}"
                        logger.debug("inbox package %s", path.name, exc_info=True)
                    logger.error("inbox package %s refused: %s", path.name, result)
                    self._reject(path, result)
                self._scan_cache[path] = (stamp, result)
            if isinstance(result, str):
                bad[path.name] = result
            else:
                out.append(result)
        for gone in set(self._scan_cache) - seen:
            del self._scan_cache[gone]
        return out, bad

    # --- the job -------------------------------------------------------------------

    async def check(self, *, retry_deferred: bool = False) -> CheckResult:
        """Install the newest inbox version of every model that has a newer one.

        Concurrent calls wait for the running check and then run their own (cheap:
        verification results are cached per file). ``retry_deferred``: an operator
        asked (``edgeward check``, a reload), so models waiting out a local fault's
        backoff are tried now.
        """
        async with self._lock:
            if retry_deferred:
                for m in self.machines.values():
                    m.retry_at = 0.0
            return await self._check()

    async def _check(self) -> CheckResult:
        res = CheckResult(started=time.time())
        self.checks += 1
        loop = asyncio.get_running_loop()
        inbox = self.cfg.paths.inbox_dir
        if not inbox.is_dir() or not any(inbox.glob("*.emp")):
            logger.debug("update check: no packages in %s", inbox)
            res.finished = time.time()
            self.last_check = res
            return res
        try:
            trust = self._trust()
            limits = self._limits()
            candidates, bad = await loop.run_in_executor(None, self._scan, trust, limits)
        except EdgewardError as exc:
            self.check_failures += 1
            logger.error("update check failed: %s", exc.message)
            res.failed["*"] = exc.message
            res.finished = time.time()
            self.last_check = res
            return res
        res.failed.update(bad)
        best: dict[str, _Candidate] = {}
        for c in candidates:
            if c.name not in best or version_key(c.version) > version_key(best[c.name].version):
                best[c.name] = c
        for name, cand in sorted(best.items()):
            # one model's candidate never blocks another's: whatever goes wrong here
            # is that model's failure only
            try:
                outcome = await self._consider(name, cand, trust, limits)
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

    async def _consider(self, name: str, cand: _Candidate, trust: Any, limits: Any) -> str:
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
        await self._install(cand, trust, limits)
        return "installed"

    async def _install(self, cand: _Candidate, trust: Any, limits: Any) -> None:
        name, version = cand.name, cand.version
        m = self.machine(name)
        m.advance("checking", target=version)
        loop = asyncio.get_running_loop()
        package = importlib.import_module("agent.package")
        staging: Path | None = None
        installed = False
        current = self.store.current(name)
        try:
            m.advance("verifying")
            kwargs = {"limits": limits} if limits is not None else {}
            await loop.run_in_executor(
                None,
                lambda: package.verify(
                    cand.path, trust, nofollow=True, progress=self._go_on, **kwargs
                ),
            )
            m.advance("unpacking")
            self._preflight(cand.path)
            staging = self.store.staging(prefix=f"{name}-{version}-")
            out = staging / "pkg"
            base_dir = self.store.version_dir(name, current) if current else None
            keyring = self._keyring()
            self._extend_timeout(300)
            manifest = await loop.run_in_executor(
                None,
                lambda: package.unpack(
                    cand.path,
                    out,
                    trust=trust,
                    keyring=keyring,
                    base_dir=base_dir,
                    nofollow=True,
                    progress=self._go_on,
                    **kwargs,
                ),
            )
            if str(manifest.name) != name or str(manifest.version) != version:
                raise UpdateError(
                    f"{cand.path.name}: package changed while installing", code="changed"
                )
            vdir = self.store.install(name, version, out)
            installed = True
            m.advance("converting")
            self._extend_timeout(self.cfg.daemon.worker_start_timeout + 30)
            async with self.registry.lock(name):
                model = await self.registry.prepare(name, version, vdir)
                m.advance("staged")
                m.advance("activating")
                self.store.activate(name, version)
                await self.registry.activate(model, self.cfg.daemon.drain_timeout)
            m.version = version
            m.advance("active")
            self.store.gc(name)
            logger.info("updated %s to version %s (from %s)", name, version, cand.path.name)
        except Exception as exc:  # a bug or an OSError must not kill the daemon either
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
                pass  # neither the package's fault nor this device's: next start retries
            elif fix is not None:
                self.defer(name, reason, fix)  # the package stays where it is
            elif isinstance(exc, EdgewardError):
                self._clear_fault(name)
                self._reject(cand.path, reason)
            if isinstance(exc, EdgewardError):
                raise
            raise UpdateError(reason, code="internal") from exc
        else:
            self._clear_fault(name)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _preflight(self, pkg: Path) -> None:
        """Refuse early, with the numbers, when the disk cannot hold the unpacked version.

        Unpacking needs about the package size again (decrypted, decompressed models are
        usually larger: count twice) plus the converter's output; a half-written
        version on a full disk is exactly what must not happen.
        """
        need = 3 * pkg.stat().st_size + 16 * 1024 * 1024
        free = shutil.disk_usage(self.store.root).free
        if free < need:
            raise PreflightError(
                f"not enough disk space in {self.store.root}: {free // 2**20} MiB free, "
                f"{need // 2**20} MiB needed to unpack {pkg.name}",
                code="disk-space",
            )

    def _reject(self, path: Path, reason: str) -> None:
        """Move a refused package aside so the next check does not retry it forever."""
        reject_file(path, reason, keep=self.cfg.updates.keep_failed)

    def _extend_timeout(self, seconds: float) -> None:
        if self._extend is not None:
            self._extend(seconds)

    # --- rollback ------------------------------------------------------------------

    async def rollback(self, name: str) -> dict[str, str]:
        """Serve the previous version again (it becomes current; current becomes previous)."""
        async with self._lock, self.registry.lock(name):
            cur, prev = self.store.current(name), self.store.previous(name)
            if cur is None:
                raise UpdateError(f"model {name!r} is not installed", code="not-installed")
            if prev is None or prev == cur:
                raise UpdateError(
                    f"{name}: no previous version to roll back to", code="no-previous", status=409
                )
            model = await self.registry.prepare(name, prev, self.store.version_dir(name, prev))
            self.store.rollback(name)
            await self.registry.activate(model, self.cfg.daemon.drain_timeout)
            m = self.machine(name)
            m.version = prev
            m.advance("rolled-back")
            logger.info("rolled back %s from version %s to %s", name, cur, prev)
            self.mark_bad(name, cur, "rolled back")
            return {"name": name, "current": prev, "previous": cur}


def _str_dict(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
