"""The control socket: status, models, check now, rollback, reload and metrics.

HTTP/JSON over the same Unix-socket HTTP server as inference (``agent.serving.http``), on its
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
    GET  /metrics              Prometheus text format (agent/metrics.py; also on the
                               metrics socket, for scrapers that are not administrators)
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

from agent.errors import (
    EdgewardError,
    MethodNotAllowedError,
    NotFoundError,
    PermissionDeniedError,
)
from agent.metrics import CONTENT_TYPE, render_metrics
from agent.serving.h1 import error_response, internal_error
from agent.serving.http import PeerCred, Request, Response

if TYPE_CHECKING:
    from agent.daemon import Daemon

logger = logging.getLogger(__name__)

__all__ = ["ControlApp", "PeerCred", "peer_allowed", "peer_credentials", "render_metrics"]


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


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _cgroup(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def from_own_worker(pid: int) -> bool:
    """True for a process the daemon started (a model worker, what its run script
    forked or spawned): it runs third-party code as the daemon's uid under systemd, and
    must not drive the control plane (docs/DAEMON.md, "Trust boundaries"). A descendant
    of this process; under systemd also any other process of the daemon's own service
    cgroup (a double fork leaves the ancestry, never the cgroup)."""
    me = os.getpid()
    if pid == me:
        return False
    p = pid
    for _ in range(64):
        p = _ppid(p)
        if p == me:
            return True
        if p <= 1:
            break
    own = _cgroup(me)
    return own.endswith(".service") and _cgroup(pid) == own


def peer_allowed(cred: PeerCred, admin_group: str | None) -> bool:
    """Root, the daemon's own uid, or a member of ``admin_group``; never a process of
    one of the daemon's model workers."""
    if from_own_worker(cred.pid):
        return False
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


# --- the app ---------------------------------------------------------------------------

Reply = tuple[int, str, bytes]  # status, content type, body


def _json(status: int, obj: Any) -> Reply:
    return status, "application/json", json.dumps(obj, sort_keys=True).encode()


def _error(resp: Response) -> Reply:
    """An error as the one ``error_response`` renders it (its body is one buffer)."""
    body = resp.body
    assert isinstance(body, bytes)
    return resp.status, "application/json", body


class ControlApp:
    """Transport-free control plane: ``dispatch(method, path, peer)`` → reply.

    ``__call__`` adapts it to ``agent.serving.http`` requests; tests may call ``dispatch``.
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
            ("POST", "/verify"): self._verify,
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
                allowed = sorted(m for m, k in self._routes if k == key)
                if allowed:
                    exc = MethodNotAllowedError(f"{method} is not allowed on {path}")
                    exc.allow = ", ".join(allowed)
                    raise exc
                raise NotFoundError(f"no control endpoint {path}")
            return await route(arg)
        except EdgewardError as exc:
            return _error(error_response(exc))
        except Exception as exc:  # never let a bug close the admin's connection silently
            logger.exception("control %s %s failed", method, path)
            return _error(internal_error(f"internal error: {type(exc).__name__}"))

    async def _status(self, _arg: str) -> Reply:
        return _json(200, self.daemon.status())

    async def _models(self, _arg: str) -> Reply:
        return _json(200, {"models": self.daemon.models_status()})

    async def _check(self, _arg: str) -> Reply:
        res = await self.daemon.updater.check(retry_deferred=True)
        return _json(200, res.to_dict())

    async def _reload(self, _arg: str) -> Reply:
        changed = await self.daemon.reload()
        return _json(200, {"reloaded": True, "changed": changed})

    async def _verify(self, _arg: str) -> Reply:
        return _json(200, await self.daemon.verify_installed())

    async def _rollback(self, name: str) -> Reply:
        if not name or "/" in name:
            raise NotFoundError("use POST /rollback/{model name}")
        return _json(200, await self.daemon.updater.rollback(name))

    async def _metrics(self, _arg: str) -> Reply:
        return 200, CONTENT_TYPE, render_metrics(self.daemon)
