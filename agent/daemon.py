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
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from agent.config import Config, check_groups, load_config, metrics_socket
from agent.control import ControlApp
from agent.errors import EdgewardError, local_fault
from agent.sdnotify import Notifier, watchdog_interval
from agent.serving.registry import ModelRegistry, WorkerLike
from agent.store import Store
from agent.updater import IN_FLIGHT, Updater

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
        self._check_task: asyncio.Task[Any] | None = None
        self._lock_fd: int | None = None
        # agent.mqtt.MqttService when [mqtt] is configured (imported only then: idle RSS).
        self.mqtt: Any = None

    # --- workers -------------------------------------------------------------------

    def _make_worker(self, name: str, version: str, model_dir: Path) -> WorkerLike:
        from agent.serving.worker import ModelWorker  # a daemon without models never loads it

        limit = self.cfg.daemon.worker_memory_limit_mb
        worker: WorkerLike = ModelWorker(
            name,
            version,
            model_dir,
            self.cfg.runtime,
            cache_dir=self.cfg.paths.resolved_cache_dir,
            memory_limit_bytes=limit * 1024 * 1024 if limit else None,
            # Replies are read by the daemon's event loop (one wake-up per reply instead of
            # a reader thread that then wakes the loop); see docs/RUNTIME.md.
            loop=_running_loop(),
            lend=self._lend_settings(name),
            request_timeout=self.cfg.inference.request_timeout(name),
            fence=self._fence(),
        )
        return worker

    def _fence(self) -> Any:
        """What a worker may not reach (agent/serving/sandbox.py; docs/DAEMON.md, "Trust
        boundaries"): the device keys, the config file and every secret file it names,
        the state directory (the store with every other model, the inbox). The worker
        opens its own model directory and the converter cache back for itself."""
        from agent.serving.sandbox import Fence

        cfg = self.cfg
        d = cfg.daemon
        deny: list[Path | None] = []
        if d.worker_sandbox == "landlock":
            deny = [cfg.paths.keys_dir, cfg.source, cfg.paths.state_dir, cfg.paths.inbox_dir]
            if cfg.mqtt is not None:
                deny.append(cfg.mqtt.password_file)
            if cfg.repository is not None:
                deny.append(cfg.repository.client_key)
        return Fence(
            deny=tuple(str(p) for p in deny if p is not None),
            user=d.worker_user,
            env=d.worker_env,
        )

    def _lend_settings(self, name: str) -> dict[str, Any] | None:
        """What a worker needs to answer lent inference connections as this daemon would
        (HTTP limits, admission), or None when lending is off."""
        from agent.serving.lending import limits_settings

        inf = self.cfg.inference
        if not inf.lend_connections:
            return None
        gate = (inf.max_concurrent_per_model, inf.max_queue_per_model)
        return limits_settings(inf.limits, gate, inf.lend_spin_us, inf.request_timeout(name))

    # --- lifecycle -----------------------------------------------------------------

    def claim(self) -> None:
        """Take the state directory and check groups and sockets: nothing is started
        yet, so a failure here (a second agent, a missing group) is one error line with
        no shutdown to log. Idempotent; :meth:`startup` calls it too."""
        if self._lock_fd is not None:
            return
        fd = self.store.lock()  # first: a second daemon must touch nothing
        try:
            check_groups(self.cfg)
            self._check_sockets_free()  # before minutes of model loading, not after
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    async def startup(self) -> None:
        """Everything before READY=1. Raises EdgewardError on a fatal problem."""
        self.claim()
        self.notifier.status("opening store")
        self.store.open()
        self.cfg.paths.resolved_cache_dir.mkdir(parents=True, exist_ok=True)
        self.updater = Updater(
            self.cfg, self.store, self.registry, extend_timeout=self.notifier.extend_timeout
        )
        self.updater.observers.append(lambda _machine: self._send_status())
        names = self.store.names()
        for i, name in enumerate(names):
            self.notifier.status(f"loading model {name} ({i + 1}/{len(names)})")
            self.notifier.extend_timeout(self.cfg.daemon.worker_start_timeout + 30)
            await self._load_installed(name)
        self.notifier.status("binding sockets")
        await self._bind()
        self.state = "serving"
        self._start_mqtt()
        served = ", ".join(f"{m.name}:{m.version}" for m in self.registry.models()) or "none"
        self.notifier.ready(status=self.status_line())
        logger.info(
            "edgeward agent ready on %s (control %s); models: %s",
            self.cfg.inference.socket,
            self.cfg.control.socket,
            served,
        )

    async def _load_installed(self, name: str) -> None:
        """Serve ``current``; if its files were modified or it cannot start, fall back to
        ``previous`` (checked too), loudly; if neither will do, the model is not served."""
        cur = self.store.current(name)
        if cur is None:
            return
        why: str | None = None
        local: str | None = None
        check = await self._check_installed(name, cur)
        if check.ok:
            try:
                await self.registry.load(
                    name, cur, self.store.version_dir(name, cur), self.cfg.daemon.drain_timeout
                )
                self.updater.mark_serving(name, cur)
                return
            except EdgewardError as exc:
                logger.error("model %s version %s does not start: %s", name, cur, exc.message)
                why, local = f"[{exc.code}] {exc.message}", local_fault(exc)
        else:
            why = "[installed-modified] " + "; ".join(check.problems[:5])
        prev = self.store.previous(name)
        if prev is None or prev == cur:
            logger.error("model %s has no previous version; it is not served", name)
            return
        if not (await self._check_installed(name, prev)).ok:
            logger.error("model %s: previous version %s is modified too; not served", name, prev)
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
        m.advance("rolled-back", error=f"version {cur}: {why}")
        if local is None:  # a fault of this device's is no reason to refuse the version
            self.updater.mark_bad(name, cur, f"rolled back at start: {why}")
        logger.warning("model %s rolled back to version %s", name, prev)

    def _trust_or_none(self) -> Any:
        """The trusted publisher keys, to re-check kept manifest signatures (None if
        there are none: the digests are still checked)."""
        from agent.keys import load_trusted

        tdir = self.cfg.paths.trust_dir
        pubs = sorted(tdir.glob("*.pub")) if tdir.is_dir() else []
        try:
            return load_trusted(pubs) if pubs else None
        except EdgewardError as exc:
            logger.warning("cannot load trusted keys from %s: %s", tdir, exc.message)
            return None

    async def _check_installed(self, name: str, version: str) -> Any:
        """Hash one installed version against its signed manifest (off the loop)."""
        from agent.installed import VersionCheck, check_version

        if not self.cfg.daemon.verify_installed:
            return VersionCheck(name, version, checked=False)
        vdir = self.store.version_dir(name, version)
        trust = self._trust_or_none()
        t0 = time.monotonic()
        res = await asyncio.get_running_loop().run_in_executor(
            None, lambda: check_version(name, version, vdir, trust)
        )
        if not res.checked and self.store.signed(name, version):
            res.problems.append("manifest.json/manifest.sig removed from a signed version")
        if not res.ok:
            logger.error(
                "MODIFIED: %s version %s does not match its signed manifest: %s",
                name,
                version,
                "; ".join(res.problems[:10]),
            )
        elif not res.checked:
            logger.warning(
                "%s version %s has no signed manifest (not installed from a package): "
                "its files cannot be checked",
                name,
                version,
            )
        else:
            logger.info(
                "%s version %s: %d files, %.1f MB match the signed manifest (%.2f s)",
                name,
                version,
                res.files,
                res.bytes / 1e6,
                time.monotonic() - t0,
            )
        return res

    async def verify_installed(self) -> dict[str, Any]:
        """``edgeward verify --installed``: check ``current`` and ``previous`` of every
        model; a modified ``current`` is replaced by a sound ``previous`` or stops being
        served. Returns the findings and what was done."""
        out: list[dict[str, Any]] = []
        actions: list[str] = []
        for name in self.store.names():
            cur, prev = self.store.current(name), self.store.previous(name)
            results = {}
            for v in dict.fromkeys(x for x in (cur, prev) if x is not None):
                results[v] = await self._check_installed(name, v)
                out.append(results[v].to_dict())
            if cur is None or results[cur].ok:
                continue
            if prev is not None and prev != cur and results[prev].ok:
                await self.updater.rollback(name)
                self.updater.mark_bad(name, cur, "installed files modified")
                actions.append(f"{name}: version {cur} modified, now serving {prev}")
            else:
                await self.registry.unload(name, self.cfg.daemon.drain_timeout)
                actions.append(f"{name}: version {cur} modified and no sound previous: not served")
            logger.error("verify --installed: %s", actions[-1])
        return {"versions": out, "ok": all(r["ok"] for r in out), "actions": actions}

    def _socket_paths(self) -> list[Path]:
        return [self.cfg.inference.socket, self.cfg.control.socket, metrics_socket(self.cfg)]

    def _check_sockets_free(self) -> None:
        """Refuse to start when another agent answers on one of our sockets."""
        from agent.serving.http import bind_path, clear_stale_socket

        for path in self._socket_paths():
            bind_path(path)  # a path too long to bind: say so now, not after loading
            clear_stale_socket(path)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what serves and which update is under way."""
        models = self.registry.models()
        served = ", ".join(f"{m.name} v{m.version}" for m in models) or "none"
        line = f"serving {len(models)} model{'s' if len(models) != 1 else ''}: {served}"
        updater = self.updater
        busy = (
            [f"{n} -> v{m.target} ({m.state})" for n, m in sorted(updater.machines.items())
             if m.state in IN_FLIGHT]
            if updater is not None else []
        )  # fmt: skip
        if busy:
            line += "; updating " + ", ".join(busy)
        if self.state == "reloading":
            line += "; reloading configuration"
        return line

    def _send_status(self) -> None:
        if self.state in ("serving", "reloading"):
            self.notifier.status(self.status_line())

    async def _bind(self) -> None:
        from agent.serving.http import HTTPLimits, UnixHTTPServer
        from agent.serving.kserve import InferenceApp

        inf = self.cfg.inference
        limits = inf.limits
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
            from agent.serving.http import TCPHTTPServer

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
                idle_timeout=limits.keepalive_timeout_s,
                header_timeout=limits.header_timeout_s,
                max_header_bytes=limits.max_header_bytes,
                max_headers=limits.max_headers,
                max_inflight_bytes=limits.max_inflight_body_bytes,
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
        await self._bind_metrics()

    async def _bind_metrics(self) -> None:
        from agent.metrics import MetricsApp
        from agent.serving.http import HTTPLimits, UnixHTTPServer

        m = self.cfg.metrics
        app = MetricsApp(self)
        server = UnixHTTPServer(
            str(metrics_socket(self.cfg)),
            app,
            limits=HTTPLimits(max_connections=16),
            mode=m.mode,
            group=m.group,
        )
        await server.start()
        self._servers.append(server)
        if m.port:
            self._servers.append(_LoopbackMetrics(self, m.port))

    def _start_mqtt(self) -> None:
        """Connect out to the broker in the background: a broker that is down does not
        delay READY or serving (agent/mqtt.py retries on its own thread)."""
        if self.cfg.mqtt is None:
            return
        from agent.mqtt import MqttService

        self.mqtt = MqttService(self)
        self.updater.observers.append(lambda _machine: self.mqtt.status_changed())
        self.mqtt.start()

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
        if self.updater is not None:
            self.updater.stop()  # a package read in flight gives up at its next piece
        for t in self._tasks:
            t.cancel()
        if self._check_task is not None:
            self._check_task.cancel()
        grpc_stop = [self._grpc.stop()] if self._grpc is not None else []
        if self.updater is not None:
            self.updater.close()
        if self.mqtt is not None:
            try:
                await self.mqtt.close()  # the retained status says "offline" (stopped)
            except Exception:
                logger.exception("mqtt: closing failed")
        await asyncio.gather(
            *grpc_stop,
            *(s.close(self.cfg.daemon.drain_timeout) for s in self._servers),
            return_exceptions=True,
        )
        await self.registry.close(self.cfg.daemon.drain_timeout)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the state directory
            self._lock_fd = None
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
            self.claim()
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

    async def _safe_check(self, *, retry_deferred: bool = False) -> None:
        """A check from a timer or signal: failures are logged, never fatal."""
        try:
            await self.updater.check(retry_deferred=retry_deferred)
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

    def trigger_check(self, *, retry_deferred: bool = False) -> asyncio.Task[Any]:
        """Start a check in the background, or return the one a trigger already started
        (coalesced; the updater's lock serialises it with timer checks)."""
        if self._check_task is not None and not self._check_task.done():
            return self._check_task
        self._check_task = asyncio.get_running_loop().create_task(
            self._safe_check(retry_deferred=retry_deferred)
        )
        return self._check_task

    def _on_sighup(self) -> None:
        logger.info("SIGHUP: reloading configuration")
        asyncio.get_running_loop().create_task(self._reload_and_check())

    async def _reload_and_check(self) -> None:
        previous, self.state = self.state, "reloading"
        self.notifier.reloading()
        self._send_status()
        try:
            await self.reload()
        except EdgewardError as exc:
            logger.error("reload failed, keeping the old configuration: %s", exc.message)
        finally:
            self.state = previous
            self.notifier.ready(status=self.status_line())
        self.trigger_check(retry_deferred=True)  # a reload may have fixed a local fault

    async def reload(self) -> list[str]:
        """Re-read the config file; apply what can change live. Returns changed keys.

        Socket paths, modes and groups need a restart (the sockets are bound); a change
        there is reported in the log, not applied.
        """
        if self.cfg.source is None:
            return []
        new = load_config(self.cfg.source, environ=os.environ)
        check_groups(new)
        changed = [
            f.name
            for f in dataclasses.fields(new)
            if f.name != "source" and getattr(new, f.name) != getattr(self.cfg, f.name)
        ]
        restart = [k for k in ("inference", "control", "paths", "metrics", "mqtt") if k in changed]
        if restart:
            logger.warning(
                "reload: changes to [%s] take effect after a restart", "], [".join(restart)
            )
        live = dataclasses.replace(
            new,
            inference=self.cfg.inference,
            control=self.cfg.control,
            paths=self.cfg.paths,
            metrics=self.cfg.metrics,
            mqtt=self.cfg.mqtt,  # the broker link keeps the settings it was started with
        )
        if new.daemon != self.cfg.daemon:
            apply_logging(new)
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
            "repository": self.updater.status() or None,
            "mqtt": self.mqtt.state() if self.mqtt is not None else None,
        }


class _LoopbackMetrics:
    """``GET /metrics`` on 127.0.0.1:<port> (``[metrics] port``; off by default), served
    by prometheus_client's own HTTP server thread. Loopback only: a remote Prometheus
    reaches it through an agent on the box."""

    def __init__(self, daemon: Daemon, port: int) -> None:
        from prometheus_client import start_http_server

        from agent.metrics import registry_for

        self._server, self._thread = start_http_server(
            port, addr="127.0.0.1", registry=registry_for(daemon)
        )

    async def close(self, _timeout: float) -> None:
        self._server.shutdown()
        self._server.server_close()


def apply_logging(cfg: Config) -> None:
    """Log as ``[daemon]`` says; workers started from now on log the same way."""
    from agent.logs import setup_logging

    setup_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    os.environ["EDGEWARD_WORKER_LOG"] = cfg.daemon.log_level
    os.environ["EDGEWARD_LOG_FORMAT"] = cfg.daemon.log_format


def preflight(cfg: Config) -> None:
    """Checks of this machine that need no state: fail before any lifecycle log line."""
    from runtime.providers import check_provider_names

    check_groups(cfg)
    check_provider_names(cfg.runtime.onnx)


def run(config_path: Path) -> int:
    """Load the config and run the daemon until it is stopped. Returns the exit code."""
    cfg = load_config(config_path, environ=os.environ)
    preflight(cfg)
    apply_logging(cfg)
    from agent.malloc import tune_malloc

    tune_malloc()
    raise_fd_limit()

    async def _main() -> None:
        daemon = Daemon(cfg)
        await daemon.serve()

    asyncio.run(_main())
    return 0


def raise_fd_limit(want: int = 65536) -> int:
    """Raise the soft limit on open files toward the hard one (at most ``want``); the new
    soft limit. Each model worker holds about a dozen descriptors in the daemon (its
    control socket, two per lane, the lending channel, its memfd) besides the clients'
    connections, and systemd starts services with a soft limit of 1024. The daemon waits
    with epoll and poll only, never select(), so descriptors past 1024 are safe."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
