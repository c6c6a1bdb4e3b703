"""The control socket: status, models, check now, rollback, reload and metrics.

HTTP/JSON over the same Unix-socket HTTP server as inference (``agent.http``), on its
own socket (``/run/edgeward/control.sock``, mode 0600 or 0660 with an admin group).
File permissions are the first gate; the second is ``SO_PEERCRED``: only root, the
daemon's own user, and members of the configured admin group get an answer, whatever
the file mode says (a socket file's mode is easy to get wrong by hand).

Endpoints::

    GET  /status               daemon state, uptime, models, last check
    GET  /models               per model: version, state, since, pid, worker RSS, ...
    POST /check                run the update check now; returns what it did
    POST /rollback/{name}      serve the previous version of a model
    POST /reload               re-read the config file, then check
    GET  /metrics              Prometheus text format
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.errors import EdgewardError, InferenceError
from agent.http import PeerCred, Request, Response
from agent.registry import LATENCY_BUCKETS

if TYPE_CHECKING:
    from agent.daemon import Daemon

logger = logging.getLogger(__name__)

__all__ = ["ControlApp", "PeerCred", "peer_allowed", "peer_credentials", "render_metrics"]


class PermissionDeniedError(EdgewardError):
    """The peer on the control socket is not an administrator."""

    code = "forbidden"
    status = 403


class MethodNotAllowedError(InferenceError):
    code = "method-not-allowed"
    status = 405


class NotFoundError(InferenceError):
    code = "not-found"
    status = 404


def peer_credentials(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED of a connected Unix socket (struct ucred: pid, uid, gid)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def _peer_groups(pid: int) -> set[int]:
    """Supplementary groups of the peer process (from /proc, the kernel's view)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def peer_allowed(cred: PeerCred, admin_group: str | None) -> bool:
    """Root, the daemon's own uid, or a member of ``admin_group``."""
    if cred.uid in (0, os.geteuid()):
        return True
    if not admin_group:
        return False
    try:
        gr = grp.getgrnam(admin_group)
    except KeyError:
        return False
    if cred.gid == gr.gr_gid or gr.gr_gid in _peer_groups(cred.pid):
        return True
    try:
        user = pwd.getpwuid(cred.uid).pw_name
    except KeyError:
        return False
    return user in gr.gr_mem


# --- metrics ---------------------------------------------------------------------------


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(daemon: Daemon) -> str:
    """Prometheus text exposition format 0.0.4."""
    from agent.updater import STATES

    lines: list[str] = []

    def head(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    reg = daemon.registry
    stats = reg.stats()
    head("edgeward_requests_total", "counter", "Inference requests that reached a model.")
    for name, s in sorted(stats.items()):
        lines.append(f'edgeward_requests_total{{model="{_esc(name)}"}} {s.requests}')
    head("edgeward_request_errors_total", "counter", "Inference requests a model failed.")
    for name, s in sorted(stats.items()):
        lines.append(f'edgeward_request_errors_total{{model="{_esc(name)}"}} {s.errors}')
    head("edgeward_request_duration_seconds", "histogram", "Model call latency.")
    for name, s in sorted(stats.items()):
        m = _esc(name)
        cum = 0
        for bound, count in zip(LATENCY_BUCKETS, s.buckets, strict=True):
            cum += count
            lines.append(
                f'edgeward_request_duration_seconds_bucket{{model="{m}",le="{bound}"}} {cum}'
            )
        lines.append(
            f'edgeward_request_duration_seconds_bucket{{model="{m}",le="+Inf"}} {s.requests}'
        )
        lines.append(f'edgeward_request_duration_seconds_sum{{model="{m}"}} {s.latency_sum:.6f}')
        lines.append(f'edgeward_request_duration_seconds_count{{model="{m}"}} {s.requests}')
    head("edgeward_model_swaps_total", "counter", "Hot swaps of a model's serving version.")
    for name, s in sorted(stats.items()):
        lines.append(f'edgeward_model_swaps_total{{model="{_esc(name)}"}} {s.swaps}')
    models = [m.describe() for m in reg.models()]
    head("edgeward_worker_rss_bytes", "gauge", "Resident memory of each model worker.")
    for d in models:
        lines.append(
            f'edgeward_worker_rss_bytes{{model="{_esc(d["name"])}",'
            f'version="{_esc(str(d["version"]))}"}} {d["rss_bytes"]}'
        )
    head("edgeward_worker_restarts_total", "counter", "Worker process restarts after a crash.")
    for d in models:
        lines.append(
            f'edgeward_worker_restarts_total{{model="{_esc(d["name"])}",'
            f'version="{_esc(str(d["version"]))}"}} {d["restarts"]}'
        )
    head("edgeward_model_ready", "gauge", "1 when the model's serving worker is ready.")
    for wm in reg.models():
        lines.append(f'edgeward_model_ready{{model="{_esc(wm.name)}"}} {int(wm.ready)}')
    up = daemon.updater
    head("edgeward_update_state", "gauge", "Current update state per model (1 = in state).")
    for name, mach in sorted(up.machines.items()):
        for st in STATES:
            v = int(mach.state == st)
            lines.append(f'edgeward_update_state{{model="{_esc(name)}",state="{st}"}} {v}')
    head("edgeward_update_transitions_total", "counter", "Update state transitions by target.")
    for st in STATES:
        lines.append(f'edgeward_update_transitions_total{{state="{st}"}} {up.transitions[st]}')
    head("edgeward_update_checks_total", "counter", "Update checks run.")
    lines.append(f"edgeward_update_checks_total {up.checks}")
    head("edgeward_update_failures_total", "counter", "Update checks or installs that failed.")
    lines.append(f"edgeward_update_failures_total {up.check_failures}")
    if daemon.mqtt is not None:
        _mqtt_metrics(daemon.mqtt.stats, head, lines)
    head("edgeward_daemon_rss_bytes", "gauge", "Resident memory of the daemon process.")
    lines.append(f"edgeward_daemon_rss_bytes {daemon.rss_bytes()}")
    head("edgeward_daemon_start_time_seconds", "gauge", "Unix time the daemon started.")
    lines.append(f"edgeward_daemon_start_time_seconds {daemon.started:.3f}")
    return "\n".join(lines) + "\n"


def _mqtt_metrics(st: Any, head: Callable[[str, str, str], None], lines: list[str]) -> None:
    """The MQTT link (agent.mqtt.MqttStats): connection, reconnects, commands, rate limit."""
    head("edgeward_mqtt_connected", "gauge", "1 while connected to an MQTT broker.")
    lines.append(f"edgeward_mqtt_connected {int(st.connected)}")
    head("edgeward_mqtt_reconnects_total", "counter", "Successful MQTT reconnections.")
    lines.append(f"edgeward_mqtt_reconnects_total {st.reconnects}")
    head("edgeward_mqtt_commands_total", "counter", "MQTT commands by kind and outcome.")
    for (kind, outcome), n in sorted(st.commands.items()):
        lines.append(
            f'edgeward_mqtt_commands_total{{kind="{_esc(kind)}",outcome="{_esc(outcome)}"}} {n}'
        )
    head(
        "edgeward_mqtt_triggers_rate_limited_total",
        "counter",
        "Check triggers that coalesced into a running or pending check (rate limit).",
    )
    lines.append(f"edgeward_mqtt_triggers_rate_limited_total {st.rate_limited}")
    head("edgeward_mqtt_dropped_total", "counter", "MQTT messages dropped: the loop was behind.")
    lines.append(f"edgeward_mqtt_dropped_total {st.handoff_dropped}")


# --- the app ---------------------------------------------------------------------------

Reply = tuple[int, str, bytes]  # status, content type, body


def _json(status: int, obj: Any) -> Reply:
    return status, "application/json", json.dumps(obj, sort_keys=True).encode()


class ControlApp:
    """Transport-free control plane: ``dispatch(method, path, peer)`` → reply.

    ``__call__`` adapts it to ``agent.http`` requests; tests may call ``dispatch``.
    """

    async def __call__(self, request: Request) -> Response:
        status, ctype, body = await self.dispatch(request.method, request.path, request.peer_cred)
        return Response(status, {"content-type": ctype}, body)

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._routes: dict[tuple[str, str], Callable[[str], Awaitable[Reply]]] = {
            ("GET", "/status"): self._status,
            ("GET", "/models"): self._models,
            ("POST", "/check"): self._check,
            ("POST", "/reload"): self._reload,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/rollback"): self._rollback,
        }

    async def dispatch(self, method: str, path: str, peer: PeerCred | None) -> Reply:
        """Route one request; every error becomes a JSON body with a stable code."""
        try:
            if peer is None or not peer_allowed(peer, self.daemon.cfg.control.admin_group):
                who = f"uid {peer.uid}" if peer is not None else "an unknown peer"
                logger.warning("control socket: refused %s %s from %s", method, path, who)
                raise PermissionDeniedError(
                    "the control socket is for administrators (root, the daemon user, "
                    "or the admin group)"
                )
            path = path.split("?", 1)[0].rstrip("/") or "/"
            arg = ""
            key = path
            if path.startswith("/rollback/"):
                key, arg = "/rollback", path[len("/rollback/") :]
            route = self._routes.get((method, key))
            if route is None:
                if any(k[1] == key for k in self._routes):
                    raise MethodNotAllowedError(f"{method} is not allowed on {path}")
                raise NotFoundError(f"no control endpoint {path}")
            return await route(arg)
        except EdgewardError as exc:
            return _json(exc.status, exc.to_dict())
        except Exception as exc:  # never let a bug close the admin's connection silently
            logger.exception("control %s %s failed", method, path)
            return _json(
                500, {"error": f"internal error: {type(exc).__name__}", "code": "internal"}
            )

    async def _status(self, _arg: str) -> Reply:
        return _json(200, self.daemon.status())

    async def _models(self, _arg: str) -> Reply:
        return _json(200, {"models": self.daemon.models_status()})

    async def _check(self, _arg: str) -> Reply:
        res = await self.daemon.updater.check()
        return _json(200, res.to_dict())

    async def _reload(self, _arg: str) -> Reply:
        changed = await self.daemon.reload()
        return _json(200, {"reloaded": True, "changed": changed})

    async def _rollback(self, name: str) -> Reply:
        if not name or "/" in name:
            raise NotFoundError("use POST /rollback/{model name}")
        return _json(200, await self.daemon.updater.rollback(name))

    async def _metrics(self, _arg: str) -> Reply:
        return 200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(self.daemon).encode()
