"""The agent daemon: explicit startup → serve → shutdown (uvicorn style).

Startup: load config, open the store (cleaning what a crash left half-done), start a
worker for the current version of every installed model, bind the inference and control
sockets (modes and group set on purpose; stale socket files are replaced by the
server), then ``READY=1``. Serve: the event loop runs the two HTTP servers, the update
timer (interval ± jitter), the watchdog pinger (``WATCHDOG=1`` at half
``WATCHDOG_USEC``) and the signal handlers: SIGTERM/SIGINT stop, SIGHUP reloads the
config and triggers a check. Shutdown: ``STOPPING=1``, stop accepting, let in-flight
requests finish within ``daemon.drain_timeout``, stop the workers.

:func:`run` is what ``edgeward agent --config FILE`` calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from agent.config import Config, check_groups, load_config
from agent.control import ControlApp
from agent.errors import ConfigError, EdgewardError
from agent.registry import ModelRegistry, WorkerLike
from agent.sdnotify import Notifier, watchdog_interval
from agent.store import Store
from agent.updater import Updater

logger = logging.getLogger(__name__)

__all__ = ["Daemon", "run"]


def _rss_self() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Daemon:
    """One running agent. Use :meth:`serve` (or :func:`run`) to drive the lifecycle."""

    def __init__(self, cfg: Config, *, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier if notifier is not None else Notifier()
        self.store = Store(cfg.paths.state_dir)
        self.registry = ModelRegistry(
            self._make_worker, start_timeout=cfg.daemon.worker_start_timeout
        )
        self.updater: Updater = None  # type: ignore[assignment]  # set in startup()
        self.started = time.time()
        self.state = "starting"
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._servers: list[Any] = []
        self._grpc: Any = None  # agent.grpc_v2.supervisor.GatewayProcess when [grpc] is on
        self._runtime_config: Any = None
        self._check_task: asyncio.Task[Any] | None = None

    # --- workers -------------------------------------------------------------------

    def _make_worker(self, name: str, version: str, model_dir: Path) -> WorkerLike:
        from runtime.config import RuntimeConfig

        ModelWorker = importlib.import_module("runtime.worker").ModelWorker
        if self._runtime_config is None:
            self._runtime_config = RuntimeConfig.from_dict(self.cfg.runtime)
        limit = self.cfg.daemon.worker_memory_limit_mb
        worker: WorkerLike = ModelWorker(
            name,
            version,
            model_dir,
            self._runtime_config,
            cache_dir=self.cfg.paths.resolved_cache_dir,
            memory_limit_bytes=limit * 1024 * 1024 if limit else None,
            # Replies are read by the daemon's event loop (one wake-up per reply instead of
            # a reader thread that then wakes the loop); see docs/RUNTIME.md.
            loop=_running_loop(),
            lend=self._lend_settings(),
        )
        return worker

    def _lend_settings(self) -> dict[str, Any] | None:
        """What a worker needs to answer lent inference connections as this daemon would
        (HTTP limits, admission), or None when lending is off."""
        from agent.http import HTTPLimits
        from runtime.direct import limits_settings

        inf = self.cfg.inference
        if not inf.lend_connections:
            return None
        try:
            limits = HTTPLimits(**inf.limits)
        except (TypeError, EdgewardError):  # _bind reports bad limits
            return None
        gate = (inf.max_concurrent_per_model, inf.max_queue_per_model)
        return limits_settings(limits, gate, inf.lend_spin_us)

    # --- lifecycle -----------------------------------------------------------------

    async def startup(self) -> None:
        """Everything before READY=1. Raises EdgewardError on a fatal problem."""
        check_groups(self.cfg)
        from runtime.config import RuntimeConfig

        self._runtime_config = RuntimeConfig.from_dict(self.cfg.runtime)  # fail fast
        self.notifier.status("opening store")
        self.store.open()
        self.cfg.paths.resolved_cache_dir.mkdir(parents=True, exist_ok=True)
        self.updater = Updater(
            self.cfg, self.store, self.registry, extend_timeout=self.notifier.extend_timeout
        )
        names = self.store.names()
        for i, name in enumerate(names):
            self.notifier.status(f"loading model {name} ({i + 1}/{len(names)})")
            self.notifier.extend_timeout(self.cfg.daemon.worker_start_timeout + 30)
            await self._load_installed(name)
        self.notifier.status("binding sockets")
        await self._bind()
        self.state = "serving"
        served = ", ".join(f"{m.name}:{m.version}" for m in self.registry.models()) or "none"
        self.notifier.ready(status=f"serving {len(self.registry.models())} models: {served}")
        logger.info(
            "edgeward agent ready on %s (control %s); models: %s",
            self.cfg.inference.socket,
            self.cfg.control.socket,
            served,
        )

    async def _load_installed(self, name: str) -> None:
        """Serve ``current``; if it cannot start, fall back to ``previous`` (and say so)."""
        cur = self.store.current(name)
        if cur is None:
            return
        try:
            await self.registry.load(
                name, cur, self.store.version_dir(name, cur), self.cfg.daemon.drain_timeout
            )
            self.updater.mark_serving(name, cur)
            return
        except EdgewardError as exc:
            logger.error("model %s version %s does not start: %s", name, cur, exc.message)
        prev = self.store.previous(name)
        if prev is None or prev == cur:
            logger.error("model %s has no previous version; it is not served", name)
            return
        try:
            await self.registry.load(
                name, prev, self.store.version_dir(name, prev), self.cfg.daemon.drain_timeout
            )
        except EdgewardError as exc:
            logger.error("model %s previous version %s fails too: %s", name, prev, exc.message)
            return
        self.store.rollback(name)
        m = self.updater.machine(name)
        m.version = prev
        m.advance("rolled-back", error=f"version {cur} failed to start")
        logger.warning("model %s rolled back to version %s", name, prev)

    async def _bind(self) -> None:
        from agent.http import HTTPLimits, UnixHTTPServer
        from agent.kserve import InferenceApp

        inf = self.cfg.inference
        try:
            limits = HTTPLimits(**inf.limits)
        except TypeError as exc:
            allowed = ", ".join(HTTPLimits.__dataclass_fields__)
            raise ConfigError(
                f"inference.limits: {exc}; allowed: {allowed}", code="config-key"
            ) from None
        for sock_path in (inf.socket, self.cfg.control.socket):
            sock_path.parent.mkdir(parents=True, exist_ok=True)
        app = InferenceApp(
            self.registry,
            max_concurrent_per_model=inf.max_concurrent_per_model,
            max_queue_per_model=inf.max_queue_per_model,
        )
        infer_server = UnixHTTPServer(
            str(inf.socket),
            app,
            lender_for=app.lender_for if inf.lend_connections else None,
            limits=limits,
            mode=inf.mode,
            group=inf.group,
        )
        await infer_server.start()
        self._servers.append(infer_server)
        if inf.tcp_listen:
            from agent.config import tcp_address
            from agent.http import TCPHTTPServer

            host, port = tcp_address(inf)
            tcp_server = TCPHTTPServer(host, port, app, limits=limits)
            await tcp_server.start()
            self._servers.append(tcp_server)
        if self.cfg.grpc.enabled:
            from agent.grpc_v2.supervisor import GatewayProcess

            g = self.cfg.grpc
            g.socket.parent.mkdir(parents=True, exist_ok=True)
            self._grpc = GatewayProcess(
                g.socket,
                inf.socket,
                mode=inf.mode,
                group=inf.group,
                max_message_bytes=limits.max_body_bytes,
                max_concurrent=limits.max_connections,
                threads=g.threads,
                timeout=limits.body_timeout_s,
                grace=self.cfg.daemon.drain_timeout,
                log_level=self.cfg.daemon.log_level,
            )
            await self._grpc.start()
        ctl = self.cfg.control
        control_server = UnixHTTPServer(
            str(ctl.socket),
            ControlApp(self),
            limits=HTTPLimits(),
            mode=ctl.mode if not ctl.admin_group else (ctl.mode | 0o060),
            group=ctl.admin_group or None,
        )
        await control_server.start()
        self._servers.append(control_server)

    async def main_loop(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        interval = watchdog_interval()
        if interval is not None:
            self._tasks.append(loop.create_task(self._watchdog(interval)))
        self._tasks.append(loop.create_task(self._check_timer()))
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain in-flight requests (bounded), then stop workers and close sockets."""
        self.state = "stopping"
        self.notifier.stopping()
        self.notifier.status("draining")
        logger.info("shutting down: draining for up to %.1fs", self.cfg.daemon.drain_timeout)
        for t in self._tasks:
            t.cancel()
        if self._check_task is not None:
            self._check_task.cancel()
        grpc_stop = [self._grpc.stop()] if self._grpc is not None else []
        await asyncio.gather(
            *grpc_stop,
            *(s.close(self.cfg.daemon.drain_timeout) for s in self._servers),
            return_exceptions=True,
        )
        await self.registry.close(self.cfg.daemon.drain_timeout)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.notifier.close()
        logger.info("edgeward agent stopped")

    def stop(self) -> None:
        """Ask the main loop to return (signal handlers call this)."""
        self._stop.set()

    async def serve(self) -> None:
        """startup → main_loop → shutdown, with signal handlers installed and restored."""
        loop = asyncio.get_running_loop()
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            try:
                await self.startup()
            except BaseException:
                await self.shutdown()
                raise
            await self.main_loop()
            await self.shutdown()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    # --- timers and triggers -------------------------------------------------------

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _next_delay(self) -> float:
        u = self.cfg.updates
        return u.check_interval * (1 + random.uniform(-u.jitter, u.jitter))  # noqa: S311

    async def _safe_check(self) -> None:
        """A check from a timer or signal: failures are logged, never fatal."""
        try:
            await self.updater.check()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("update check failed")

    async def _check_timer(self) -> None:
        if self.cfg.updates.check_on_start:
            await self._safe_check()
        while True:
            if self.cfg.updates.check_interval <= 0:
                await asyncio.sleep(5)  # disabled; a SIGHUP reload may enable it
                continue
            await asyncio.sleep(self._next_delay())
            await self._safe_check()

    def trigger_check(self) -> None:
        """Start a check in the background (coalesced by the updater's lock)."""
        if self._check_task is not None and not self._check_task.done():
            return
        self._check_task = asyncio.get_running_loop().create_task(self._safe_check())

    def _on_sighup(self) -> None:
        logger.info("SIGHUP: reloading configuration")
        asyncio.get_running_loop().create_task(self._reload_and_check())

    async def _reload_and_check(self) -> None:
        try:
            await self.reload()
        except EdgewardError as exc:
            logger.error("reload failed, keeping the old configuration: %s", exc.message)
        self.trigger_check()

    async def reload(self) -> list[str]:
        """Re-read the config file; apply what can change live. Returns changed keys.

        Socket paths, modes and groups need a restart (the sockets are bound); a change
        there is reported in the log, not applied.
        """
        if self.cfg.source is None:
            return []
        new = load_config(self.cfg.source)
        check_groups(new)
        changed = [
            f.name
            for f in dataclasses.fields(new)
            if f.name != "source" and getattr(new, f.name) != getattr(self.cfg, f.name)
        ]
        restart = [k for k in ("inference", "control", "paths") if k in changed]
        if restart:
            logger.warning(
                "reload: changes to [%s] take effect after a restart", "], [".join(restart)
            )
        live = dataclasses.replace(
            new, inference=self.cfg.inference, control=self.cfg.control, paths=self.cfg.paths
        )
        if "runtime" in changed:
            from runtime.config import RuntimeConfig

            RuntimeConfig.from_dict(new.runtime)  # validate; used for workers started later
            self._runtime_config = None
        self.cfg = live
        self.updater.cfg = live
        logger.info("configuration reloaded (changed: %s)", ", ".join(changed) or "nothing")
        return changed

    # --- status --------------------------------------------------------------------

    def rss_bytes(self) -> int:
        return _rss_self()

    def models_status(self) -> list[dict[str, Any]]:
        out = []
        for m in self.registry.models():
            d = m.describe()
            info = self.store.info(m.name)
            d["previous"] = info.previous
            d["installed"] = list(info.versions)
            mach = self.updater.machines.get(m.name)
            d["update"] = mach.to_dict() if mach is not None else None
            out.append(d)
        served = {m.name for m in self.registry.models()}
        for name in self.store.names():
            if name not in served:
                info = self.store.info(name)
                mach = self.updater.machines.get(name)
                out.append(
                    {
                        "name": name,
                        "version": info.current,
                        "state": "not-loaded",
                        "previous": info.previous,
                        "installed": list(info.versions),
                        "update": mach.to_dict() if mach is not None else None,
                    }
                )
        return out

    def status(self) -> dict[str, Any]:
        last = self.updater.last_check
        return {
            "state": self.state,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": time.time() - self.started,
            "rss_bytes": self.rss_bytes(),
            "inference_socket": str(self.cfg.inference.socket),
            "control_socket": str(self.cfg.control.socket),
            "state_dir": str(self.cfg.paths.state_dir),
            "inbox_dir": str(self.cfg.paths.inbox_dir),
            "config": str(self.cfg.source) if self.cfg.source else None,
            "models": {m.name: m.version for m in self.registry.models()},
            "updates": {n: m.to_dict() for n, m in sorted(self.updater.machines.items())},
            "last_check": last.to_dict() if last is not None else None,
            "checks": self.updater.checks,
        }


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    lvl = getattr(logging, level.upper(), logging.INFO)
    # The CLI configures WARNING by default; the daemon logs its lifecycle at info.
    if root.level > lvl or root.level == logging.NOTSET:
        root.setLevel(lvl)
    if not root.handlers:
        logging.basicConfig(level=lvl, format="%(levelname)s %(name)s: %(message)s")


def run(config_path: Path) -> int:
    """Load the config and run the daemon until it is stopped. Returns the exit code."""
    cfg = load_config(config_path)
    _setup_logging(cfg.daemon.log_level)
    from agent.malloc import tune_malloc

    tune_malloc()

    async def _main() -> None:
        daemon = Daemon(cfg)
        await daemon.serve()

    asyncio.run(_main())
    return 0


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
