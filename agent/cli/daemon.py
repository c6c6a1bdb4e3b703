"""``edgeward agent`` (the daemon) and its control-socket client commands.

``edgeward status | models | check | rollback NAME`` talk HTTP/JSON to the control
socket (default ``/run/edgeward/control.sock``, or ``$EDGEWARD_CONTROL_SOCKET``);
``--json`` prints the daemon's answer unchanged for scripts.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import ControlError
from agent.textsafe import printable

DEFAULT_CONTROL_SOCKET = "/run/edgeward/control.sock"




def control_request(
    path: str, method: str = "GET", *, sock_path: str | None = None, timeout: float = 600.0
) -> tuple[int, bytes, str]:
    """One request to the control socket → (status, body, content type).

    Raises:
        ControlError: the socket is missing, refuses us, or the daemon is not running.
    """
    from agent.serving.connection import UnixHTTPConnection

    sp = sock_path or os.environ.get("EDGEWARD_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET
    conn = UnixHTTPConnection(sp, timeout)
    try:
        status, headers, body = conn.request(method, path)
        return status, bytes(body), headers.get("content-type", "")
    except FileNotFoundError:
        raise ControlError(
            f"control socket {sp} does not exist (is the edgeward agent running?)",
            code="control-missing",
        ) from None
    except PermissionError:
        raise ControlError(
            f"permission denied on control socket {sp} "
            "(run as root, the daemon user, or a member of the admin group)",
            code="control-denied",
        ) from None
    except ConnectionRefusedError:
        raise ControlError(
            f"nothing listens on control socket {sp} (stale socket file?)",
            code="control-refused",
        ) from None
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise ControlError(f"permission denied on {sp}", code="control-denied") from None
        raise ControlError(f"control socket {sp}: {exc}", code="control-io") from None
    finally:
        conn.close()


def call_control(args: argparse.Namespace, path: str, method: str = "GET") -> Any:
    """One control-socket request (``args.control_socket``); the JSON answer or a
    ControlError with the daemon's code."""
    return _call(args, path, method)


def _call(args: argparse.Namespace, path: str, method: str = "GET") -> Any:
    status, body, _ctype = control_request(path, method, sock_path=args.control_socket)
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        raise ControlError(f"daemon answered {status} with non-JSON data") from None
    if status >= 400:
        msg = data.get("error", f"HTTP {status}") if isinstance(data, dict) else str(data)
        code = data.get("code", "control") if isinstance(data, dict) else "control"
        raise ControlError(str(msg), code=str(code), status=status)
    return data


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(0, int(time.time() - ts))
    if secs < 120:
        return f"{secs}s ago"
    if secs < 7200:
        return f"{secs // 60}m ago"
    return f"{secs // 3600}h ago"


def _mb(n: Any) -> str:
    return f"{int(n or 0) / 1e6:.1f} MB"


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_agent(args: argparse.Namespace) -> int:
    from agent.daemon import run

    return run(Path(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    data = _call(args, "/status")
    if args.json:
        _print_json(data)
        return 0
    print(f"state:    {data['state']} (pid {data['pid']}, up {int(data['uptime'])}s)")
    print(f"memory:   {_mb(data['rss_bytes'])} (daemon)")
    print(f"sockets:  {data['inference_socket']}  (control {data['control_socket']})")
    models = data.get("models") or {}
    print("models:   " + (", ".join(f"{k} v{v}" for k, v in sorted(models.items())) or "none"))
    mq = data.get("mqtt")
    if mq:
        conn = "connected" if mq.get("connected") else "disconnected"
        line = (
            f"mqtt:     {conn} {mq.get('broker')} (MQTT {mq.get('protocol')}) as {mq['device_id']}"
        )
        if mq.get("reconnects"):
            line += f", {mq['reconnects']} reconnects"
        if not mq.get("connected") and mq.get("last_error"):
            line += f"; last error: {mq['last_error']}"
        print(line)
    last = data.get("last_check")
    if last:
        line = f"last check {_ago(last.get('finished'))}"
        if last.get("installed"):
            line += ": installed " + ", ".join(f"{k} v{v}" for k, v in last["installed"].items())
        if last.get("failed"):
            line += "; failed " + ", ".join(sorted(last["failed"]))
        print(printable(line))  # failed inbox file names are chosen by others
    repo = data.get("repository")
    if repo:
        _print_repository(repo)
    return 0


def _print_repository(repo: dict[str, Any]) -> None:
    """The repository lines of ``edgeward status``: mirror, offers, choice, progress."""
    print(
        f"repository: {repo.get('mirror') or ', '.join(repo.get('urls') or [])} "
        f"(channel {repo.get('channel')}, last success {_ago(repo.get('last_success'))})"
    )
    offers = repo.get("offers") or []
    if offers:
        print(
            "  offers:  "
            + ", ".join(
                f"{o['model']} v{o['version']} {o['kind']} ({_mb(o['length'])})" for o in offers
            )
        )
    for name, c in sorted((repo.get("chosen") or {}).items()):
        print(printable(f"  chosen:  {name} v{c['version']} {c['kind']}: {c['why']}"))
    prog = repo.get("progress") or {}
    if prog.get("total"):
        pct = 100.0 * prog.get("done", 0) / prog["total"]
        print(
            f"  downloading {prog.get('model')} v{prog.get('version')} {prog.get('kind')}: "
            f"{_mb(prog.get('done'))} of {_mb(prog['total'])} ({pct:.0f}%)"
        )
    print(
        f"  downloaded {_mb(repo.get('bytes_downloaded'))}, {int(repo.get('resumes') or 0)} resumes"
    )
    if repo.get("last_error"):
        print(printable(f"  last error: {repo['last_error']}"))


def cmd_models(args: argparse.Namespace) -> int:
    data = _call(args, "/models")
    if args.json:
        _print_json(data)
        return 0
    rows = [("MODEL", "VERSION", "STATE", "SINCE", "PID", "RSS", "PREVIOUS", "UPDATE")]
    for m in data["models"]:
        upd = m.get("update") or {}
        rows.append(
            (
                str(m["name"]),
                str(m.get("version")),
                str(m.get("state")),
                _ago(m.get("since")),
                str(m.get("pid") or "-"),
                _mb(m.get("rss_bytes")) if m.get("rss_bytes") else "-",
                str(m.get("previous") or "-"),
                str(upd.get("state") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    data = _call(args, "/check", "POST")
    if args.json:
        _print_json(data)
    else:
        for name, version in sorted(data.get("installed", {}).items()):
            print(f"installed {name} version {version}")
        for name in data.get("unchanged", []):
            print(f"{name}: up to date")
        for name, why in sorted(data.get("failed", {}).items()):
            print(printable(f"{name}: failed: {why}"), file=sys.stderr)
        for name, why in sorted(data.get("deferred", {}).items()):
            print(printable(f"{name}: waiting: {why}"), file=sys.stderr)
        if not any(data.get(k) for k in ("installed", "unchanged", "failed", "deferred")):
            print("nothing offered (inbox empty, no repository offer)")
    return 1 if data.get("failed") or data.get("deferred") else 0


def cmd_rollback(args: argparse.Namespace) -> int:
    data = _call(args, f"/rollback/{args.name}", "POST")
    if args.json:
        _print_json(data)
    else:
        print(f"{data['name']}: now serving version {data['current']} (was {data['previous']})")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's sub-commands to the top-level parser."""
    p = sub.add_parser("agent", help="run the daemon (systemd runs this)")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    p.set_defaults(func=cmd_agent)

    def client(name: str, help_: str) -> argparse.ArgumentParser:
        cp: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        cp.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
        cp.add_argument(
            "--control-socket",
            metavar="PATH",
            default=None,
            help=f"control socket (default $EDGEWARD_CONTROL_SOCKET or {DEFAULT_CONTROL_SOCKET})",
        )
        return cp

    client("status", "show the daemon's state").set_defaults(func=cmd_status)
    client("models", "list served models, versions and workers").set_defaults(func=cmd_models)
    client("check", "look for new model versions now").set_defaults(func=cmd_check)
    rp = client("rollback", "serve a model's previous version again")
    rp.add_argument("name", help="model name")
    rp.set_defaults(func=cmd_rollback)
