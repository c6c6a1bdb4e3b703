"""Start a real nginx on 127.0.0.1 serving a directory over HTTPS (tests and benchmarks).

Usage::

    from tests.nginx_util import Nginx
    with Nginx(work, root=repo_dir) as web:          # HTTPS, trustme certificate
        requests.get(web.url + "/metadata/timestamp.json", verify=str(web.ca_bundle))
        web.log()            # [AccessEntry(path, status, bytes_sent, ...), ...]
        web.stop(); web.start()                      # same port, same certificate
        web.reconfigure(limit_rate=4096)             # restart with a new config

Each instance writes its own ``nginx.conf`` under ``work`` and runs
``/usr/sbin/nginx -p WORK -c nginx.conf -g 'daemon off;'`` in its own process group;
it is stopped by that PID (SIGTERM, then SIGKILL of the group after a bounded wait).
Options that shape the server, all changeable with :meth:`Nginx.reconfigure`:

- ``limit_rate`` (bytes/s, per connection) and ``limit_rate_after`` (bytes sent at full
  speed first): a slow or stalled link.
- ``redirects``: ``{"/prefix/": "https://other:port"}`` answers every request under the
  prefix with a 302 to the other base URL plus the request URI.
- ``cert``: ``"good"`` (127.0.0.1 and localhost), ``"expired"`` (right host, validity
  over) or ``"wrong-host"`` (valid, for another name). ``tls=False`` serves plain HTTP.
- ``extra_server``: nginx directives pasted into the ``server`` block (for instance
  ``location = /metadata/timestamp.json { return 503; }``).

Two servers that must trust the same CA (a redirect target) share it: pass ``ca=``.
The access log has one tab-separated line per request, parsed by :meth:`Nginx.log`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import pytest

NGINX = "/usr/sbin/nginx"
CERT_KINDS = ("good", "expired", "wrong-host")
#: Seconds to wait for nginx to accept connections, and for it to exit.
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
_LOG_FORMAT = "\\t".join(
    ("$request_method", "$request_uri", "$status", "$bytes_sent", "$body_bytes_sent", "$http_range")
)


def nginx_available() -> bool:
    return os.access(NGINX, os.X_OK)


#: Tests that need nginx. CI installs nginx-light, and a skip there is a failure.
needs_nginx = pytest.mark.skipif(not nginx_available(), reason=f"{NGINX} is not installed")


class AccessEntry(NamedTuple):
    """One request from the access log. ``bytes_sent`` counts headers and body;
    ``body_bytes`` the body only (a cut connection logs what actually went out)."""

    path: str
    status: int
    bytes_sent: int
    body_bytes: int
    method: str
    range: str  # the request's Range header, "" when absent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def new_ca() -> object:
    """A fresh trustme CA (typed ``object`` so callers need not import trustme)."""
    import trustme

    return trustme.CA()


@dataclass
class _Config:
    limit_rate: int | None
    limit_rate_after: int | None
    redirects: dict[str, str]
    cert: str
    tls: bool
    extra_server: str


class Nginx:
    """A real nginx serving ``root`` on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        work: Path,
        root: Path,
        *,
        port: int | None = None,
        limit_rate: int | None = None,
        limit_rate_after: int | None = None,
        redirects: Mapping[str, str] | None = None,
        cert: str = "good",
        tls: bool = True,
        extra_server: str = "",
        ca: object | None = None,
        start: bool = True,
    ) -> None:
        if not nginx_available():
            pytest.skip(f"{NGINX} is not installed")
        import trustme

        self.work = Path(work)
        self.root = Path(root).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        (self.work / "tmp").mkdir(exist_ok=True)
        self.port = port or free_port()
        self.ca: trustme.CA = ca if isinstance(ca, trustme.CA) else trustme.CA()
        #: PEM bundle a client passes as ``verify=`` / ``--cacert``.
        self.ca_bundle = self.work / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_bundle))
        self.access_log = self.work / "logs" / "access.log"
        self.error_log = self.work / "logs" / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._cfg = _Config(
            limit_rate, limit_rate_after, dict(redirects or {}), cert, tls, extra_server
        )
        self._check(self._cfg)
        if start:
            self.start()

    # -- configuration ----------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self._cfg.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @staticmethod
    def _check(cfg: _Config) -> None:
        if cfg.cert not in CERT_KINDS:
            raise ValueError(f"cert must be one of {CERT_KINDS}, not {cfg.cert!r}")
        for prefix, target in cfg.redirects.items():
            if not prefix.startswith("/") or any(c in prefix + target for c in " ;{}\n"):
                raise ValueError(f"bad redirect {prefix!r} -> {target!r}")

    def _write_cert(self) -> Path:
        now = dt.datetime.now(dt.UTC)
        if self._cfg.cert == "expired":
            leaf = self.ca.issue_cert(
                "127.0.0.1",
                "localhost",
                not_before=now - dt.timedelta(days=30),
                not_after=now - dt.timedelta(days=1),
            )
        elif self._cfg.cert == "wrong-host":
            leaf = self.ca.issue_cert("wrong-host.invalid")
        else:
            leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        path = self.work / f"server-{self._cfg.cert}.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
        return path

    def _write_conf(self) -> Path:
        cfg = self._cfg
        user = ""
        if os.geteuid() == 0:
            # as root, workers would drop to "nobody", which cannot read a 0700 tmp dir
            user = f"user {pwd.getpwuid(os.getuid()).pw_name};"
        listen = f"127.0.0.1:{self.port}"
        tls = ""
        if cfg.tls:
            pem = self._write_cert()
            listen += " ssl"
            tls = f"ssl_certificate {pem};\n    ssl_certificate_key {pem};"
        rate = ""
        if cfg.limit_rate is not None:
            rate += f"limit_rate {int(cfg.limit_rate)};\n    "
        if cfg.limit_rate_after is not None:
            rate += f"limit_rate_after {int(cfg.limit_rate_after)};"
        redirects = "\n    ".join(
            f"location ^~ {prefix} {{ return 302 {target}$request_uri; }}"
            for prefix, target in cfg.redirects.items()
        )
        tmp = self.work / "tmp"
        conf = f"""\
{user}
worker_processes 1;
pid {self.work / "nginx.pid"};
error_log {self.error_log} warn;
events {{ worker_connections 256; }}
http {{
  types {{ application/json json; }}
  default_type application/octet-stream;
  sendfile on;
  keepalive_timeout 30s;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  log_format edgeward "{_LOG_FORMAT}";
  access_log {self.access_log} edgeward;
  server {{
    listen {listen};
    server_name 127.0.0.1 localhost;
    {tls}
    root {self.root};
    {rate}
    {redirects}
    {cfg.extra_server}
  }}
}}
"""
        path = self.work / "nginx.conf"
        path.write_text(conf)
        return path

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start on ``self.port``; return once it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("nginx is already running")
        conf = self._write_conf()
        stderr = open(self.work / "logs" / "stderr.log", "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.work), "-c", str(conf), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            stderr.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self._tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on {self.port} within {START_TIMEOUT_S}s")

    def stop(self) -> None:
        """Fast shutdown (SIGTERM: open connections are cut), by PID; bounded."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: master + workers
            proc.wait(timeout=STOP_TIMEOUT_S)

    def reconfigure(self, **changes: Any) -> None:
        """Restart on the same port with some options changed (the constructor's
        keywords ``limit_rate``, ``limit_rate_after``, ``redirects``, ``cert``, ``tls``,
        ``extra_server``); the CA and the access log stay."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(_Config)})
        if unknown:
            raise TypeError(f"unknown nginx option(s): {', '.join(unknown)}")
        if "redirects" in changes:
            changes["redirects"] = dict(changes["redirects"] or {})
        cfg = dataclasses.replace(self._cfg, **changes)
        self._check(cfg)
        self.stop()
        self._cfg = cfg
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Nginx:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- access log -------------------------------------------------------------------

    def log(self) -> list[AccessEntry]:
        """Every request logged so far, oldest first (query strings dropped)."""
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) != 6:
                continue
            method, uri, status, sent, body, rng = parts
            out.append(
                AccessEntry(
                    path=uri.split("?", 1)[0],
                    status=int(status),
                    bytes_sent=int(sent),
                    body_bytes=int(body),
                    method=method,
                    range="" if rng == "-" else rng,
                )
            )
        return out

    def wait_log(self, count: int, timeout: float = 10.0) -> list[AccessEntry]:
        """The log once it holds ``count`` requests (nginx writes a line after the
        response, which a fast client may have read already); bounded."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.log()
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)

    def clear_log(self) -> None:
        """Forget what was logged (nginx keeps appending to the same open file)."""
        if self.access_log.exists():
            with open(self.access_log, "r+b") as f:
                f.truncate(0)

    def _tail(self) -> str:
        text = ""
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                text += (self.work / "logs" / name).read_text()
        return text.strip().splitlines()[-1] if text.strip() else "(no output)"
