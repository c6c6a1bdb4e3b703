"""A real mosquitto broker and a paho client for tests and benchmarks.

``start_broker(work)`` runs ``/usr/sbin/mosquitto`` on 127.0.0.1 on a free port with a
config written under ``work`` (optionally TLS from ``trustme``, a password file and an
ACL) and returns a :class:`Broker` that can be stopped and started again on the same
port. :class:`Watcher` is a paho client that records every message on the topics it
subscribes to (retained ones included), for assertions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"

needs_mosquitto = pytest.mark.skipif(
    not os.path.exists(MOSQUITTO) and not os.environ.get("EDGEWARD_E2E_REQUIRED"),
    reason="mosquitto is not installed (apt-get install mosquitto)",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tls:
    """trustme CA + server certificate files (and client certs on request)."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    _ca: Any = None

    def client_cert(self, work: Path, name: str) -> tuple[Path, Path]:
        cert = self._ca.issue_cert(name)
        c, k = work / f"{name}.crt", work / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(c))
        cert.private_key_pem.write_to_path(str(k))
        return c, k


def make_tls(work: Path) -> Tls:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    work.mkdir(parents=True, exist_ok=True)
    tls = Tls(work / "ca.pem", work / "server.crt", work / "server.key", ca)
    ca.cert_pem.write_to_path(str(tls.ca_pem))
    server.cert_chain_pems[0].write_to_path(str(tls.cert_pem))
    server.private_key_pem.write_to_path(str(tls.key_pem))
    return tls


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed by mosquitto_passwd itself)."""
    path.write_text("")
    for user, pw in users.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), user, pw], check=True, timeout=30)
    path.chmod(0o600)
    return path


@dataclass
class Broker:
    """A mosquitto process; ``stop()`` and ``start()`` keep its port and config."""

    work: Path
    port: int
    config: Path
    log_path: Path
    tls: Tls | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Broker:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config)], stdout=logf, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited:\n{self.log(8000)}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto did not listen in {timeout}s:\n{self.log(8000)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self, tail: int | None = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
            return text[-tail:] if tail else text
        except OSError:
            return ""


def start_broker(
    work: Path,
    *,
    tls: Tls | None = None,
    passwords: dict[str, str] | None = None,
    acl: str | None = None,
    port: int | None = None,
    unix: Path | None = None,
) -> Broker:
    """Write a mosquitto config under ``work`` and start it on 127.0.0.1 (and, with
    ``unix``, on that Unix socket too)."""
    work.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        "persistence false",
        f"log_dest file {work / 'mosquitto.log'}",  # flushed per line (stdout is buffered)
        "log_type all",
        "connection_messages true",
        "max_keepalive 65535",
        "user root" if os.geteuid() == 0 else "",
    ]
    if tls is not None:
        lines += [
            f"cafile {tls.ca_pem}",
            f"certfile {tls.cert_pem}",
            f"keyfile {tls.key_pem}",
            "require_certificate false",
        ]
    if passwords is not None:
        lines += [f"password_file {password_file(work / 'passwd', passwords)}"]
        lines += ["allow_anonymous false"]
    else:
        lines += ["allow_anonymous true"]
    if acl is not None:
        (work / "acl").write_text(acl)
        lines += [f"acl_file {work / 'acl'}"]
    if unix is not None:
        lines.append(f"listener 0 {unix}")
    config = work / "mosquitto.conf"
    config.write_text("\n".join(x for x in lines if x) + "\n")
    broker = Broker(work, port, config, work / "mosquitto.log", tls)
    return broker.start()


@dataclass
class Watcher:
    """A paho client recording messages per topic (retained ones too)."""

    broker: Broker
    topics: list[str]
    username: str | None = None
    password: str | None = None
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: Any = None
    subscribed: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watcher:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"watcher-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if self.broker.tls is not None:
            c.tls_set(ca_certs=str(self.broker.tls.ca_pem))
        if self.username is not None:
            c.username_pw_set(self.username, self.password)

        def on_connect(client: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                for t in self.topics:
                    client.subscribe(t, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self.subscribed.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_message = on_message
        c.connect("127.0.0.1", self.broker.port, keepalive=30)
        c.loop_start()
        self.client = c
        assert self.subscribed.wait(20), "watcher did not subscribe"
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1) -> Any:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)
        return info

    def docs(self, topic: str) -> list[dict[str, Any]]:
        with self.lock:
            out = []
            for t, p, _r in self.messages:
                if t == topic:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(p))
            return out

    def wait_for(
        self, topic: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in reversed(self.docs(topic)):
                if pred(d):
                    return d
            time.sleep(0.05)
        raise TimeoutError(f"no message on {topic} matched in {timeout}s: {self.docs(topic)[-3:]}")


def retained(broker: Broker, topic: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
    """What a fresh subscriber gets on ``topic``: the retained message, or the first one
    published after it subscribed when there was none yet."""
    with Watcher(broker, [topic], **kw) as w:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with w.lock:
                got = [p for t, p, _r in w.messages if t == topic]
            if got:
                return dict(json.loads(got[-1]))
            time.sleep(0.05)
    raise TimeoutError(f"no message on {topic} in {timeout}s")


def mqtt_config(broker: Broker, **kw: Any) -> str:
    """An ``[mqtt]`` TOML section for ``tests.daemon_util.write_config(extra=...)``."""
    lines = ["[mqtt]", f'brokers = ["{broker.url}"]']
    for k, v in kw.items():
        if isinstance(v, str | Path):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, list | tuple):
            lines.append(f"{k} = {json.dumps([str(x) for x in v])}")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


def have_mosquitto() -> bool:
    return shutil.which(MOSQUITTO) is not None or os.path.exists(MOSQUITTO)
