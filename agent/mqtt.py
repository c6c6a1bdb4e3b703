"""Remote "check now" triggers and fleet status over MQTT (docs/FLEET.md).

Edge boxes sit behind NAT: the publisher cannot call them, so they connect out to a broker
and listen on two command topics::

    edgeward/<device-id>/cmd          this device; a check starts at once
    edgeward/fleet/<group>/cmd        a fleet group; waits uniform(0, fleet_jitter_s) first

and publish::

    edgeward/<device-id>/status       retained JSON, republished when it changes; the Last
                                      Will (retained, "online": false) replaces it when the
                                      connection dies without a goodbye
    edgeward/<device-id>/events       what a command led to, with the command ids

A command carries no authority. ``{"cmd": "check"}`` only makes the agent run the check it
would run on its timer, against the repository and keys it already trusts, at most once per
``min_check_interval_s``; ``{"cmd": "status"}`` only republishes the status. Neither can
name a URL, a package or a version, so a forged command costs at worst one rate-limited
check. Commands are parsed sans-I/O (:func:`parse_command`) under a size, depth and
schema bound before anything acts on them.

Threads: paho runs its network loop on its own thread (``loop_start``) and reconnects
there; its callbacks only hand events to the asyncio loop through a bounded queue and
``call_soon_threadsafe``. The loop only enqueues publishes (paho's ``publish`` does not
touch the socket while its thread runs). Switching brokers or falling back from MQTT 5 to
3.1.1 stops and restarts that thread from an executor thread. So nothing waits on the
network from the serving loop, and a broker that is down at start or goes away later only
changes the ``connected`` gauge: inference and local updates never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import Config, MqttConfig, topic_name
from agent.errors import CommandError, ConfigError, EdgewardError

if TYPE_CHECKING:
    import paho.mqtt.client as paho

logger = logging.getLogger(__name__)

__all__ = [
    "Backoff",
    "CheckScheduler",
    "Command",
    "CommandLimits",
    "MqttHost",
    "MqttService",
    "Topics",
    "device_id_for",
    "parse_command",
    "printable",
    "read_password",
    "status_document",
]

#: The command kinds a device understands; anything else is "unknown".
COMMAND_KINDS: tuple[str, ...] = ("check", "status")
#: Seconds the status loop waits for a change notice before it looks anyway (last check
#: time, disk free): an idle device wakes for MQTT this rarely, besides keepalive pings.
STATUS_POLL_S = 30.0
#: Seconds a change notice waits so a burst of update transitions becomes one message.
STATUS_COALESCE_S = 0.25
#: Events handed from paho's thread to the loop that may wait at once; beyond, dropped.
HANDOFF_QUEUE = 1024
#: Command ids one result event lists (a flood of coalesced triggers is counted, not listed).
MAX_IDS_PER_EVENT = 64
#: Consecutive failed connection attempts before the next broker URL is tried.
FAILURES_PER_BROKER = 2
#: MQTT 5 "Maximum Packet Size" the agent announces: the broker drops anything larger
#: instead of sending it (commands are ~100 bytes; 3.1.1 brokers: set their own limit).
MAX_PACKET_BYTES = 64 * 1024
#: Bytes of a password file read at most.
MAX_PASSWORD_BYTES = 4096


def printable(text: str | bytes, limit: int = 120) -> str:
    """Untrusted text for a log line: printable ASCII, escaped, cut to ``limit``."""
    if isinstance(text, bytes):
        text = text[: limit * 4].decode("utf-8", errors="replace")
    out = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)
    return out + ("..." if len(text) > limit else "")


# --- commands (sans-I/O) ---------------------------------------------------------------


@dataclass(frozen=True)
class CommandLimits:
    """Bounds on a command message, checked before it is parsed as JSON."""

    max_bytes: int = 1024  # a command is ~60 bytes; nothing legitimate comes close
    max_depth: int = 2  # commands are flat objects; nesting beyond this is refused unparsed
    max_id_chars: int = 128


@dataclass(frozen=True)
class Command:
    """One accepted command. ``fleet`` says it came on a group topic."""

    kind: str  # "check" | "status"
    id: str
    model: str | None = None
    fleet: bool = False


_ALLOWED_KEYS: dict[str, frozenset[str]] = {
    "check": frozenset({"cmd", "id", "model"}),
    "status": frozenset({"cmd", "id"}),
}


def _depth(payload: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (JSON's recursion, counted flat)."""
    depth = deepest = 0
    in_str = esc = False
    for b in payload:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_command(
    payload: bytes, *, fleet: bool = False, limits: CommandLimits = CommandLimits()
) -> Command:
    """Bound, parse and check one command message; raises :class:`CommandError`.

    The error ``code`` says why: ``mqtt-oversized``, ``mqtt-malformed`` (not JSON, too
    deep, wrong types, extra keys) or ``mqtt-unknown`` (a ``cmd`` this agent lacks).
    """
    if len(payload) > limits.max_bytes:
        raise CommandError(
            f"command of {len(payload)} bytes (limit {limits.max_bytes})", code="mqtt-oversized"
        )
    if _depth(payload) > limits.max_depth:
        raise CommandError("command nests too deeply", code="mqtt-malformed")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CommandError("command is not UTF-8 JSON", code="mqtt-malformed") from None
    if not isinstance(doc, dict):
        raise CommandError("command is not a JSON object", code="mqtt-malformed")
    kind = doc.get("cmd")
    if not isinstance(kind, str):
        raise CommandError('command has no string "cmd"', code="mqtt-malformed")
    if kind not in _ALLOWED_KEYS:
        raise CommandError(f"unknown command {printable(kind, 40)!r}", code="mqtt-unknown")
    extra = set(doc) - _ALLOWED_KEYS[kind]
    if extra:
        raise CommandError(
            f"{kind} command has unexpected keys: {printable(', '.join(sorted(extra)), 80)}",
            code="mqtt-malformed",
        )
    cid = doc.get("id")
    if (
        not isinstance(cid, str)
        or not 0 < len(cid) <= limits.max_id_chars
        or not cid.isprintable()
        or not cid.isascii()
    ):
        raise CommandError(
            f'command needs an "id" of 1-{limits.max_id_chars} printable ASCII characters',
            code="mqtt-malformed",
        )
    model = doc.get("model")
    if model is not None:
        try:
            topic_name("model", model)
        except ConfigError:
            raise CommandError("command names an invalid model", code="mqtt-malformed") from None
    return Command(kind, cid, model, fleet)


@dataclass(frozen=True)
class Topics:
    """The topic layout of one device (docs/FLEET.md)."""

    device_id: str
    groups: tuple[str, ...] = ()
    prefix: str = "edgeward"

    @property
    def cmd(self) -> str:
        return f"{self.prefix}/{self.device_id}/cmd"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device_id}/status"

    @property
    def events(self) -> str:
        return f"{self.prefix}/{self.device_id}/events"

    def fleet_cmd(self, group: str) -> str:
        return f"{self.prefix}/fleet/{group}/cmd"

    def subscriptions(self) -> list[str]:
        return [self.cmd, *(self.fleet_cmd(g) for g in self.groups)]

    def is_fleet(self, topic: str) -> bool | None:
        """True for a group command topic, False for ours, None for anything else."""
        if topic == self.cmd:
            return False
        if any(topic == self.fleet_cmd(g) for g in self.groups):
            return True
        return None


def device_id_for(cfg: Config) -> str:
    """The configured device id, else the device key's id, else the host name.

    The key id (``x25519:<16 hex>``) becomes ``x25519-<16 hex>`` (one topic level, the
    same stem ``edgeward keygen`` gives the key file).
    """
    m = cfg.mqtt
    if m is not None and m.device_id:
        return m.device_id
    kdir = cfg.paths.keys_dir
    if kdir is not None and kdir.is_dir():
        from agent.keys import key_id, load_private

        for path in sorted(kdir.glob("*.key")):
            try:
                priv = load_private(path)
            except EdgewardError:
                continue
            kid = key_id(priv.public_key())
            if kid.startswith("x25519:"):
                return kid.replace(":", "-")
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return topic_name("device id (from the host name)", host.strip("-.")[:64] or "edgeward")


# --- policy: backoff and rate limit ----------------------------------------------------


class Backoff:
    """Exponential reconnect delays with jitter: the n-th failure waits in
    ``[d/2, d]`` with ``d = min(cap, base * 2**n)``, so a fleet that lost its broker
    together does not reconnect in the same second."""

    def __init__(
        self, base: float, cap: float, rng: Callable[[float, float], float] = random.uniform
    ) -> None:
        self.base, self.cap, self.failures = base, cap, 0
        self._rng = rng

    def next_delay(self) -> float:
        d = min(self.cap, self.base * (1 << min(self.failures, 30)))
        self.failures += 1
        return d / 2 + float(self._rng(0.0, d / 2))

    def reset(self) -> None:
        self.failures = 0


class CheckScheduler:
    """At most one triggered check per ``min_interval``; extra triggers coalesce.

    A trigger while nothing runs or waits starts a check as soon as the interval since
    the last triggered start allows; a trigger while a check waits joins it; a trigger
    while a check runs makes exactly one more check after it (the running one may have
    started before what the trigger announces was published). So a burst lasting ``T``
    seconds causes at most ``ceil(T / min_interval) + 1`` checks.
    """

    def __init__(
        self,
        run_check: Callable[[], asyncio.Future[Any]],
        min_interval: float,
        on_done: Callable[[list[str], int, BaseException | None], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run_check = run_check
        self.min_interval = min_interval
        self._on_done = on_done
        self._clock = clock
        self._wake = asyncio.Event()
        self._ids: list[str] = []
        self._count = 0
        self._last_start: float | None = None
        self.running = False
        self.started = 0  # checks started by triggers
        self.coalesced = 0  # triggers that did not start a check of their own
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def request(self, cid: str | None, count: int = 1) -> bool:
        """Ask for a check on behalf of ``count`` triggers (``cid`` is listed in the
        result event while there is room); returns False when it joined a waiting one."""
        joined = self._count > 0
        self._count += count
        if cid is not None and len(self._ids) < MAX_IDS_PER_EVENT:
            self._ids.append(cid)
        self.coalesced += count if joined else count - 1
        self._wake.set()
        return not joined

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._last_start is not None:
                wait = self._last_start + self.min_interval - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._wake.clear()
            ids, count = self._ids, self._count
            self._ids, self._count = [], 0
            self._last_start = self._clock()
            self.started += 1
            self.running = True
            error: BaseException | None = None
            try:
                await self._run_check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the daemon's own check logs its failures
                error = exc
            finally:
                self.running = False
            self._on_done(ids, count, error)


# --- the status document ---------------------------------------------------------------


class MqttHost(Protocol):
    """What the MQTT service needs from the daemon (agent.daemon.Daemon)."""

    cfg: Config

    def status(self) -> dict[str, Any]: ...

    def trigger_check(self) -> asyncio.Future[Any]: ...


#: Fields that change by themselves; they do not count as a change of the status.
_VOLATILE = frozenset({"uptime_s", "disk_free_bytes", "published"})


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeward")
    except PackageNotFoundError:
        return "unknown"


def status_document(
    host_status: dict[str, Any], device_id: str, agent_version: str, state_dir: Path
) -> dict[str, Any]:
    """The retained status: what serves, how updates went, how much disk is left."""
    last = host_status.get("last_check") or None
    outcome = None
    if last is not None:
        if last.get("failed"):
            outcome = "failed"
        elif last.get("installed"):
            outcome = "installed"
        else:
            outcome = "unchanged"
    updates = host_status.get("updates") or {}
    errors = [
        (u.get("since") or 0.0, f"{name}: {u['error']}")
        for name, u in updates.items()
        if u.get("error")
    ]
    if last is not None:
        errors.extend(
            (last.get("finished") or 0.0, f"{k}: {v}")
            for k, v in (last.get("failed") or {}).items()
        )
    try:
        free = shutil.disk_usage(state_dir).free
    except OSError:
        free = None
    return {
        "device_id": device_id,
        "agent_version": agent_version,
        "online": True,
        "state": host_status.get("state"),
        "started": host_status.get("started"),
        "uptime_s": round(float(host_status.get("uptime") or 0.0), 1),
        "models": host_status.get("models") or {},
        "updates": {
            n: {k: u.get(k) for k in ("state", "version", "target", "error")}
            for n, u in sorted(updates.items())
        },
        "last_check": None
        if last is None
        else {
            "finished": last.get("finished"),
            "outcome": outcome,
            "installed": last.get("installed") or {},
        },
        "last_error": max(errors)[1] if errors else None,
        "disk_free_bytes": free,
        "published": round(time.time(), 3),
    }


def offline_document(device_id: str, agent_version: str, reason: str) -> dict[str, Any]:
    """What the status topic says when the device is gone (Last Will or clean stop)."""
    return {
        "device_id": device_id,
        "agent_version": agent_version,
        "online": False,
        "reason": reason,
    }


# --- the paho side ---------------------------------------------------------------------


def read_password(path: Path, key: str = "mqtt.password_file") -> str:
    """The password in ``path`` (first line, size-capped); never logged."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}", code="config-io") from None
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ConfigError(f"{key}: {path} is too large", code="config-value")
    return raw.decode("utf-8", errors="strict").rstrip("\r\n")


@dataclass
class MqttStats:
    """Counters for ``/metrics`` and ``edgeward status`` (loop thread only)."""

    connected: bool = False
    broker: str | None = None
    protocol: str | None = None
    connects: int = 0
    reconnects: int = 0
    last_error: str | None = None
    since: float = field(default_factory=time.time)
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    rate_limited: int = 0  # triggers coalesced by the rate limit
    handoff_dropped: int = 0  # messages dropped because the loop was behind

    def to_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "broker": self.broker,
            "protocol": self.protocol,
            "since": self.since,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "commands": {f"{k}/{o}": n for (k, o), n in sorted(self.commands.items())},
            "triggers_rate_limited": self.rate_limited,
        }


class _Link:
    """One paho client on its network thread, for one broker and protocol version.

    Everything here runs on paho's thread or an executor thread; what the loop must know
    arrives through ``post(kind, *args)`` (thread-safe).
    """

    def __init__(
        self,
        mcfg: MqttConfig,
        *,
        broker_index: int,
        protocol: str,
        client_id: str,
        will: tuple[str, bytes],
        password: str | None,
        post: Callable[..., None],
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.broker = mcfg.brokers[broker_index]
        self.protocol = protocol
        self._post = post
        self._backoff = Backoff(mcfg.reconnect_min_s, mcfg.reconnect_max_s)
        self._subscriptions: list[str] = []
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
            transport="unix" if self.broker.scheme == "unix" else "tcp",
            reconnect_on_failure=True,
        )
        if self.broker.tls:
            import ssl

            ctx = ssl.create_default_context(
                cafile=str(mcfg.ca_file) if mcfg.ca_file is not None else None
            )
            if mcfg.cert_file is not None and mcfg.key_file is not None:
                ctx.load_cert_chain(str(mcfg.cert_file), str(mcfg.key_file))
            c.tls_set_context(ctx)
        if mcfg.username is not None:
            c.username_pw_set(mcfg.username, password)
        c.will_set(will[0], will[1], qos=1, retain=True)
        c.max_queued_messages_set(64)  # statuses are republished whole; old ones may go
        d = self._backoff.next_delay()
        c.reconnect_delay_set(max(1, round(d)), max(1, round(d)))
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        self._keepalive = mcfg.keepalive

    def set_subscriptions(self, topics: list[str]) -> None:
        self._subscriptions = list(topics)

    def start(self) -> None:
        """Non-blocking: the connect itself happens on paho's thread."""
        port = self.broker.port if self.broker.scheme != "unix" else 1
        props = None
        if self.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.MaximumPacketSize = MAX_PACKET_BYTES
        self.client.connect_async(
            self.broker.host, port, keepalive=self._keepalive, properties=props
        )
        self.client.loop_start()

    def stop(self, goodbye: tuple[str, bytes] | None = None, timeout: float = 2.0) -> None:
        """Blocking (run it in an executor): say goodbye if connected, then stop the thread."""
        c = self.client
        if goodbye is not None and c.is_connected():
            try:
                info = c.publish(goodbye[0], goodbye[1], qos=1, retain=True)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError, OSError):
                pass
        c.disconnect()
        c.loop_stop()

    def _retry_later(self) -> None:
        """Give paho's reconnect the next jittered exponential delay (whole seconds)."""
        d = max(1, round(self._backoff.next_delay()))
        self.client.reconnect_delay_set(d, d)

    # paho callbacks (paho's thread) ---------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._retry_later()
            unsupported = rc.value in (1, 132)  # 3.1.1 "unacceptable version" / 5 0x84
            self._post("refused", self, str(rc), unsupported)
            return
        self._backoff.reset()
        for t in self._subscriptions:
            client.subscribe(t, qos=1)
        self._post("connected", self)

    def _on_connect_fail(self, _client: paho.Client, _u: Any) -> None:
        self._retry_later()
        self._post("connect-failed", self)

    def _on_disconnect(self, _client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._retry_later()
        self._post("disconnected", self, str(rc))

    def _on_subscribe(
        self, _client: paho.Client, _u: Any, _mid: int, rcs: list[Any], _p: Any
    ) -> None:
        denied = [str(rc) for rc in rcs if rc.is_failure]
        if denied:
            self._post("subscribe-denied", self, denied)

    def _on_message(self, _client: paho.Client, _u: Any, msg: Any) -> None:
        # Copy out of paho's objects here; size is judged on the loop (parse_command).
        self._post(
            "message",
            self,
            str(msg.topic),
            bytes(msg.payload[:MAX_PACKET_BYTES]),
            len(msg.payload),
        )


class MqttService:
    """The daemon's MQTT side: one link at a time, commands, status and events.

    Lifecycle: :meth:`start` (non-blocking; the broker may be down) → :meth:`close`
    (publishes the offline status if connected). Runs on the daemon's event loop.
    """

    def __init__(self, host: MqttHost, *, limits: CommandLimits = CommandLimits()) -> None:
        mcfg = host.cfg.mqtt
        assert mcfg is not None
        self.host = host
        self.mcfg = mcfg
        self.limits = limits
        self.device_id = device_id_for(host.cfg)
        self.topics = Topics(self.device_id, mcfg.groups)
        self.version = _agent_version()
        self.stats = MqttStats()
        self._password = (
            read_password(mcfg.password_file) if mcfg.password_file is not None else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._broker_index = 0
        self._protocol = "3.1.1" if mcfg.protocol == "3.1.1" else "5"
        self._failures = 0
        self._ever_connected = False
        self._switching = False
        self._closing = False
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._inbox_lock = threading.Lock()
        self._drain_scheduled = False
        self._last_published: dict[str, Any] | None = None
        self._status_wanted = asyncio.Event()
        self._status_ids: list[str] = []
        self._fleet_ids: list[str] = []  # the first MAX_IDS_PER_EVENT waiting fleet triggers
        self._fleet_count = 0
        self._fleet_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.scheduler = CheckScheduler(
            self._run_check, mcfg.min_check_interval_s, self._check_done
        )

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread and the status loop; returns at once."""
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()
        self._tasks.append(self._loop.create_task(self._status_loop()))
        logger.info(
            "mqtt: device %s, brokers %s, groups %s",
            self.device_id,
            ", ".join(str(b) for b in self.mcfg.brokers),
            ", ".join(self.mcfg.groups) or "none",
        )
        self._new_link()

    async def close(self) -> None:
        """Publish the offline status (if connected), disconnect, stop the thread."""
        self._closing = True
        if self._fleet_timer is not None:
            self._fleet_timer.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scheduler.close()
        link = self._link
        if link is not None:
            bye = self._encode(offline_document(self.device_id, self.version, "stopped"))
            await asyncio.get_running_loop().run_in_executor(
                None, link.stop, (self.topics.status, bye)
            )
        self.stats.connected = False

    def status_changed(self) -> None:
        """Something in the status may have changed (the daemon calls this on every
        update transition); the status loop coalesces and publishes."""
        self._status_wanted.set()

    def state(self) -> dict[str, Any]:
        """For ``edgeward status``: connection state, device id, counters."""
        return {"device_id": self.device_id, **self.stats.to_dict()}

    # --- links -------------------------------------------------------------------------

    def _new_link(self) -> None:
        will = self._encode(offline_document(self.device_id, self.version, "connection lost"))
        link = _Link(
            self.mcfg,
            broker_index=self._broker_index,
            protocol=self._protocol,
            client_id=self.device_id,
            will=(self.topics.status, will),
            password=self._password,
            post=self._post,
        )
        link.set_subscriptions(self.topics.subscriptions())
        self._link = link
        self.stats.broker = str(link.broker)
        self.stats.protocol = link.protocol
        link.start()

    def _switch(self, *, next_broker: bool, protocol: str) -> None:
        """Replace the link (other broker or protocol); the old one stops off the loop."""
        if self._switching or self._closing or self._link is None:
            return
        self._switching = True
        old = self._link
        if next_broker:
            self._broker_index = (self._broker_index + 1) % len(self.mcfg.brokers)
        self._protocol = protocol
        self._failures = 0
        assert self._loop is not None
        fut = self._loop.run_in_executor(None, old.stop)

        def _started(_f: asyncio.Future[None]) -> None:
            self._switching = False
            if not self._closing:
                self._new_link()

        fut.add_done_callback(_started)

    def _post(self, *event: Any) -> None:
        """From paho's thread: queue one event for the loop (bounded; never blocks)."""
        loop = self._loop
        if loop is None:
            return
        with self._inbox_lock:
            if len(self._inbox) >= HANDOFF_QUEUE:
                self.stats.handoff_dropped += 1
                return
            self._inbox.append(event)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        # RuntimeError: the loop closed while the thread was still winding down.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._inbox_lock:
            events = list(self._inbox)
            self._inbox.clear()
            self._drain_scheduled = False
        for ev in events:
            try:
                self._handle(*ev)
            except Exception:  # one bad event must not stop the others
                logger.exception("mqtt: handling %s failed", ev[0])

    def _handle(self, kind: str, link: _Link, *args: Any) -> None:
        if link is not self._link or self._closing:
            return  # a stopped link's last words
        if kind == "message":
            self._on_message(*args)
        elif kind == "connected":
            self._failures = 0
            self.stats.connects += 1
            if self._ever_connected:
                self.stats.reconnects += 1
            self._ever_connected = True
            self.stats.connected = True
            self.stats.since = time.time()
            logger.info(
                "mqtt: connected to %s (MQTT %s) as %s", link.broker, link.protocol, self.device_id
            )
            self._last_published = None  # the broker may have the Last Will now: republish
            self._status_wanted.set()
        elif kind == "subscribe-denied":
            self.stats.commands[("subscribe", "denied")] += 1
            logger.error("mqtt: the broker refused a subscription: %s", ", ".join(args[0]))
        else:  # refused, connect-failed, disconnected
            was = self.stats.connected
            self.stats.connected = False
            self.stats.since = time.time() if was else self.stats.since
            reason = args[0] if args else "unreachable"
            self.stats.last_error = f"{kind}: {reason}"
            if was:
                logger.warning("mqtt: lost %s (%s); reconnecting", link.broker, reason)
            elif self._failures == 0:
                logger.warning("mqtt: cannot connect to %s (%s); retrying", link.broker, reason)
            self._failures += 1
            if kind == "refused" and args[1] and self.mcfg.protocol == "auto":
                other = "3.1.1" if link.protocol == "5" else "5"
                logger.warning(
                    "mqtt: %s refuses MQTT %s; trying %s", link.broker, link.protocol, other
                )
                self._switch(next_broker=False, protocol=other)
            elif len(self.mcfg.brokers) > 1 and self._failures >= FAILURES_PER_BROKER:
                self._switch(next_broker=True, protocol=self._protocol)

    # --- commands ----------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, size: int) -> None:
        fleet = self.topics.is_fleet(topic)
        if fleet is None:
            self.stats.commands[("unknown", "refused")] += 1
            logger.warning("mqtt: message on unexpected topic %s ignored", printable(topic))
            return
        try:
            if size > len(payload) or size > self.limits.max_bytes:
                raise CommandError(
                    f"command of {size} bytes (limit {self.limits.max_bytes})",
                    code="mqtt-oversized",
                )
            cmd = parse_command(payload, fleet=fleet, limits=self.limits)
        except CommandError as exc:
            outcome = exc.code.removeprefix("mqtt-")
            self.stats.commands[("invalid", outcome)] += 1
            logger.warning(
                "mqtt: refused command on %s: [%s] %s", printable(topic), exc.code, exc.message
            )
            return
        logger.info(
            "mqtt: %s command %s on %s",
            cmd.kind,
            printable(cmd.id, 64),
            "fleet" if fleet else "device",
        )
        if cmd.kind == "status":
            self.stats.commands[("status", "accepted")] += 1
            if len(self._status_ids) < MAX_IDS_PER_EVENT:
                self._status_ids.append(cmd.id)
            self._last_published = None
            self._status_wanted.set()
            return
        if cmd.model is not None and cmd.model not in (self.host.status().get("models") or {}):
            self.stats.commands[("check", "unknown-model")] += 1
            self._event(
                {
                    "cmd": "check",
                    "ids": [cmd.id],
                    "result": "refused",
                    "error": "model is not served here",
                }
            )
            return
        if cmd.fleet and self.mcfg.fleet_jitter_s > 0:
            if len(self._fleet_ids) < MAX_IDS_PER_EVENT:
                self._fleet_ids.append(cmd.id)
            self._fleet_count += 1
            if self._fleet_timer is None:
                assert self._loop is not None
                delay = random.uniform(0.0, self.mcfg.fleet_jitter_s)  # noqa: S311
                self._fleet_timer = self._loop.call_later(delay, self._fleet_due)
                self.stats.commands[("check", "accepted")] += 1
            else:
                self._coalesced()
            return
        self._request(cmd.id)

    def _fleet_due(self) -> None:
        """The fleet jitter passed: the waiting triggers ask for one check (all but the
        first were counted as coalesced when they arrived)."""
        self._fleet_timer = None
        ids, count = self._fleet_ids, self._fleet_count
        self._fleet_ids, self._fleet_count = [], 0
        if count == 0:
            return
        if not self.scheduler.request(ids[0], count - len(ids) + 1):
            self.stats.rate_limited += 1
        for cid in ids[1:]:
            self.scheduler.request(cid)

    def _request(self, cid: str) -> None:
        if self.scheduler.request(cid):
            self.stats.commands[("check", "accepted")] += 1
        else:
            self._coalesced()

    def _coalesced(self) -> None:
        self.stats.commands[("check", "coalesced")] += 1
        self.stats.rate_limited += 1

    def _run_check(self) -> asyncio.Future[Any]:
        return self.host.trigger_check()

    def _check_done(self, ids: list[str], count: int, error: BaseException | None) -> None:
        last = self.host.status().get("last_check") or {}
        ev: dict[str, Any] = {
            "cmd": "check",
            "ids": ids,
            "triggers": count,
            "result": "error" if error is not None else "done",
            "check_started": last.get("started"),
            "installed": last.get("installed") or {},
            "unchanged": last.get("unchanged") or [],
            "failed": last.get("failed") or {},
        }
        if error is not None:
            ev["error"] = str(error)
        self._event(ev)
        self._status_wanted.set()

    # --- publishing --------------------------------------------------------------------

    @staticmethod
    def _encode(doc: dict[str, Any]) -> bytes:
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def _publish(self, topic: str, doc: dict[str, Any], *, retain: bool) -> bool:
        link = self._link
        if link is None or not self.stats.connected:
            return False
        info = link.client.publish(topic, self._encode(doc), qos=1, retain=retain)
        return bool(info.rc == 0)

    def _event(self, doc: dict[str, Any]) -> None:
        doc = {"device_id": self.device_id, "time": round(time.time(), 3), **doc}
        if not self._publish(self.topics.events, doc, retain=False):
            logger.info("mqtt: not connected; event for %s not sent", doc.get("ids"))

    async def _status_loop(self) -> None:
        """Publish the status when it changed: after a change notice (update transition,
        connect, status command, check finished; waiting STATUS_COALESCE_S so a burst
        becomes one message) or at the latest every STATUS_POLL_S."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_wanted.wait(), STATUS_POLL_S)
                await asyncio.sleep(STATUS_COALESCE_S)
            self._status_wanted.clear()
            if not self.stats.connected:
                continue
            hs = self.host.status()
            hs.pop("mqtt", None)
            doc = status_document(hs, self.device_id, self.version, self.host.cfg.paths.state_dir)
            stable = {k: v for k, v in doc.items() if k not in _VOLATILE}
            if stable == self._last_published:
                continue
            if self._publish(self.topics.status, doc, retain=True):
                self._last_published = stable
                if self._status_ids:
                    ids, self._status_ids = self._status_ids, []
                    self._event({"cmd": "status", "ids": ids, "result": "done", "status": doc})
