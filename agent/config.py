"""Typed daemon configuration, loaded from TOML and validated at load time.

Every section is a frozen dataclass with defaults that match the packaged unit
(``systemd/edgeward.service``) and ``configs/edgeward.toml``. Unknown keys are errors,
not silently ignored: a typo in a socket mode must not leave the socket world-writable.
Messages name the key (``inference.mode``) and what would have been accepted.

The ``[runtime]`` table is passed through untouched to ``runtime.config.RuntimeConfig``
(the runtime validates its own keys); ``[inference.limits]`` and ``[packages.limits]``
likewise go to the HTTP server and the package reader.
"""

from __future__ import annotations

import dataclasses
import grp
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

__all__ = [
    "BrokerAddress",
    "Config",
    "ControlConfig",
    "DaemonConfig",
    "InferenceConfig",
    "MqttConfig",
    "PathsConfig",
    "UpdatesConfig",
    "check_groups",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True)
class PathsConfig:
    """Where state lives. ``state_dir`` matches systemd's ``StateDirectory=edgeward``."""

    state_dir: Path = Path("/var/lib/edgeward")
    # Sideloaded .emp files are picked up from here ("check now" scans it).
    inbox_dir: Path = Path("/var/lib/edgeward/inbox")
    # Trusted publisher public keys (*.pub); packages signed by anyone else are refused.
    trust_dir: Path = Path("/etc/edgeward/trust")
    # Device private keys / fleet keys for encrypted packages; empty = none.
    keys_dir: Path | None = None
    # Converter cache for the runtime; default <state_dir>/cache.
    cache_dir: Path | None = None

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.state_dir / "cache"


@dataclass(frozen=True)
class InferenceConfig:
    """The KServe v2 socket for local programs."""

    socket: Path = Path("/run/edgeward/infer.sock")
    mode: int = 0o660
    # Group owning the socket; members may call models. None = the daemon's own group.
    group: str | None = "edgeward"
    # Requests running at once per model; more wait in a bounded queue, beyond it 503.
    max_concurrent_per_model: int = 8
    max_queue_per_model: int = 64
    # Hand a kept-alive inference connection to the model's worker, which then answers
    # its requests itself (no relay through the daemon; runtime/direct.py).
    lend_connections: bool = True
    # Microseconds a worker thread polls for a connection's next request after a short
    # answer before it sleeps (adaptive; 0 = always sleep). See runtime/direct.py.
    lend_spin_us: int = 200
    # Passed to agent.http.HTTPLimits (keys as that dataclass names them).
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlConfig:
    """The admin socket: status, models, check, rollback, reload, metrics."""

    socket: Path = Path("/run/edgeward/control.sock")
    mode: int = 0o600
    # Members of this group may use the control socket (the socket is then 0660).
    admin_group: str | None = None


@dataclass(frozen=True)
class UpdatesConfig:
    """When to look for new versions."""

    check_interval: float = 3600.0  # seconds; 0 disables the timer
    jitter: float = 0.1  # fraction of the interval, spread so a fleet does not stampede
    check_on_start: bool = True
    keep_failed: bool = True  # leave refused packages in the inbox (renamed *.rejected)


@dataclass(frozen=True)
class DaemonConfig:
    """Lifecycle timings."""

    drain_timeout: float = 10.0  # seconds granted to in-flight requests on SIGTERM / swap
    worker_start_timeout: float = 120.0  # seconds for spawn + convert + load + warm-up
    worker_memory_limit_mb: int | None = None  # per worker; None = no cap
    log_level: str = "info"


@dataclass(frozen=True)
class BrokerAddress:
    """One MQTT broker: ``mqtt://host[:1883]``, ``mqtts://host[:8883]`` or ``unix:///path``."""

    scheme: str  # "mqtt" | "mqtts" | "unix"
    host: str  # host name or address; the socket path for "unix"
    port: int = 0  # 0 for "unix"

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class MqttConfig:
    """Remote "check now" triggers and fleet status over MQTT (docs/FLEET.md).

    The section is off when absent. A trigger carries no authority: it can only make the
    agent check the repository it already trusts, so the broker is not trusted either.
    """

    # Tried in turn on every reconnect; all must share one scheme (one client, one transport).
    brokers: tuple[BrokerAddress, ...] = ()
    ca_file: Path | None = None  # CA bundle for mqtts://; None = the system's
    cert_file: Path | None = None  # client certificate (PEM) for mutual TLS
    key_file: Path | None = None  # its private key (PEM)
    username: str | None = None
    password_file: Path | None = None  # the password is read at start, never logged
    keepalive: int = 60  # seconds between pings when idle
    # Topic and client id of this device; None = derived from the device key id in
    # paths.keys_dir, else the host name.
    device_id: str | None = None
    groups: tuple[str, ...] = ()  # fleet groups: edgeward/fleet/<group>/cmd
    fleet_jitter_s: float = 30.0  # a fleet command waits uniform(0, this) before acting
    min_check_interval_s: float = 60.0  # at most one triggered check per this many seconds
    protocol: str = "auto"  # "auto" (MQTT 5, 3.1.1 if the broker refuses 5) | "5" | "3.1.1"
    reconnect_min_s: float = 1.0  # first reconnect delay; doubles per failure (with jitter)
    reconnect_max_s: float = 120.0  # cap of the reconnect delay


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    # Passed to runtime.config.RuntimeConfig.from_dict.
    runtime: dict[str, Any] = field(default_factory=dict)
    # Passed to agent.package.Limits (keys as that dataclass names them).
    package_limits: dict[str, Any] = field(default_factory=dict)
    # None = no [mqtt] section: no broker connection, paho is never imported.
    mqtt: MqttConfig | None = None
    source: Path | None = None


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _type_name(tp: object) -> str:
    return {
        "Path": "a path string",
        "Path | None": "a path string",
        "MqttConfig | None": "a table",
        "int": "an integer",
        "int | None": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "a string",
        "str | None": "a string",
    }.get(str(tp), str(tp))


def _convert(key: str, tp: str, value: Any) -> Any:
    """Coerce one TOML value to the dataclass field type ``tp`` (a string annotation)."""
    optional = tp.endswith("| None")
    if optional and value == "":
        return None
    base = tp.replace(" | None", "")
    if base == "Path":
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{key}: expected {_type_name(tp)}, got {value!r}", code="config-type"
            )
        return Path(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}", code="config-type")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", code="config-type")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}", code="config-type")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", code="config-type")
        return value
    if base.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}", code="config-type")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {tp}", code="config-type")  # pragma: no cover


def _mode(key: str, value: Any) -> int:
    """Socket modes are written as octal strings ("0660") so TOML cannot misread them."""
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            mode = -1
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(
            f'{key}: expected an octal mode string such as "0660", got {value!r}',
            code="config-mode",
        )
    if mode & 0o007:
        raise ConfigError(
            f"{key}: socket must not be accessible to others (mode {mode:04o}); "
            'allowed: owner and group bits only, e.g. "0600" or "0660"',
            code="config-mode",
        )
    return mode


def _section(cls: type[Any], name: str, table: Any, special: dict[str, Any]) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, got {table!r}", code="config-type")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{name}.{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {full}; allowed: {allowed}", code="config-key")
        if key in special:
            kwargs[key] = special[key](full, value)
        else:
            kwargs[key] = _convert(full, str(fields[key].type), value)
    return cls(**kwargs)


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}", code="config-range")


def parse_config(data: dict[str, Any], *, source: Path | None = None) -> Config:
    """Build a :class:`Config` from a parsed TOML document, validating every key."""
    sections: dict[str, type[Any]] = {
        "paths": PathsConfig,
        "inference": InferenceConfig,
        "control": ControlConfig,
        "updates": UpdatesConfig,
        "daemon": DaemonConfig,
    }
    passthrough = {"runtime", "package_limits"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "mqtt":
            kwargs[key] = _mqtt_section(value)
        elif key in sections:
            special: dict[str, Any] = {}
            if key in ("inference", "control"):
                special["mode"] = _mode
            kwargs[key] = _section(sections[key], key, value, special)
        elif key in passthrough:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table, got {value!r}", code="config-type")
            kwargs[key] = dict(value)
        else:
            allowed = ", ".join(sorted([*sections, *passthrough, "mqtt"]))
            raise ConfigError(f"unknown section [{key}]; allowed: {allowed}", code="config-key")
    cfg = Config(source=source, **kwargs)
    _validate(cfg)
    return cfg


#: Device ids and group names become one MQTT topic level: no wildcards, no separators.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MQTT_PROTOCOLS = ("auto", "5", "3.1.1")


def topic_name(key: str, value: Any) -> str:
    """A device id or group: 1-64 of ``A-Z a-z 0-9 . _ -``, starting alphanumeric."""
    if not isinstance(value, str) or not _TOPIC_NAME.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not a valid name; allowed: 1-64 characters of "
            "A-Z a-z 0-9 . _ - starting with a letter or digit",
            code="config-value",
        )
    if value == "fleet":  # edgeward/fleet/... is the group topic tree
        raise ConfigError(f"{key}: 'fleet' is reserved (group topics)", code="config-value")
    return value


def broker_address(key: str, value: Any) -> BrokerAddress:
    """Parse ``mqtt://host[:port]``, ``mqtts://host[:port]`` or ``unix:///abs/path``."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a broker URL string, got {value!r}", code="config-type")
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r}: {exc}", code="config-value") from None
    if u.username is not None or u.password is not None:
        raise ConfigError(
            f"{key}: credentials do not belong in the URL; use mqtt.username and "
            "mqtt.password_file",
            code="config-value",
        )
    if u.query or u.fragment:
        raise ConfigError(
            f"{key}: {value!r} must not have a query or fragment", code="config-value"
        )
    if u.scheme == "unix":
        path = u.netloc + u.path if u.netloc else u.path
        if not path.startswith("/") or u.netloc:
            raise ConfigError(
                f"{key}: expected unix:///absolute/path/to/socket, got {value!r}",
                code="config-value",
            )
        return BrokerAddress("unix", path)
    if u.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"{key}: scheme {u.scheme or '(none)'!r} not supported; allowed: mqtt://, "
            "mqtts://, unix://",
            code="config-value",
        )
    if not u.hostname or u.path not in ("", "/"):
        raise ConfigError(
            f"{key}: expected {u.scheme}://host[:port], got {value!r}", code="config-value"
        )
    return BrokerAddress(u.scheme, u.hostname, port or (8883 if u.scheme == "mqtts" else 1883))


def _str_list(key: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(
            f"{key}: expected a string or a list of strings, got {value!r}", code="config-type"
        )
    return value


def _mqtt_section(table: Any) -> MqttConfig:
    special = {
        "brokers": lambda k, v: tuple(
            broker_address(f"{k}[{i}]", x) for i, x in enumerate(_str_list(k, v))
        ),
        "groups": lambda k, v: tuple(
            topic_name(f"{k}[{i}]", x) for i, x in enumerate(_str_list(k, v))
        ),
        "device_id": lambda k, v: None if v == "" else topic_name(k, v),
        "username": lambda k, v: None if v == "" else _convert(k, "str", v),
    }
    m: MqttConfig = _section(MqttConfig, "mqtt", table, special)
    if not m.brokers:
        raise ConfigError(
            "mqtt.brokers: at least one broker URL is needed (remove [mqtt] to turn MQTT off)",
            code="config-value",
        )
    if len({b.scheme for b in m.brokers}) > 1:
        raise ConfigError(
            "mqtt.brokers: all brokers must use the same scheme (one client, one transport)",
            code="config-value",
        )
    tls = m.brokers[0].tls
    for name in ("ca_file", "cert_file", "key_file"):
        if getattr(m, name) is not None and not tls:
            raise ConfigError(f"mqtt.{name}: only used with mqtts:// brokers", code="config-value")
    if (m.cert_file is None) != (m.key_file is None):
        raise ConfigError(
            "mqtt.cert_file and mqtt.key_file: give both or neither", code="config-value"
        )
    if m.password_file is not None and m.username is None:
        raise ConfigError("mqtt.password_file: needs mqtt.username", code="config-value")
    if not 5 <= m.keepalive <= 65535:
        raise ConfigError(
            f"mqtt.keepalive: must be between 5 and 65535 seconds, got {m.keepalive}",
            code="config-range",
        )
    _positive("mqtt.fleet_jitter_s", m.fleet_jitter_s, allow_zero=True)
    _positive("mqtt.min_check_interval_s", m.min_check_interval_s, allow_zero=True)
    _positive("mqtt.reconnect_min_s", m.reconnect_min_s)
    if m.reconnect_max_s < m.reconnect_min_s:
        raise ConfigError(
            f"mqtt.reconnect_max_s: must be >= mqtt.reconnect_min_s, got {m.reconnect_max_s}",
            code="config-range",
        )
    if m.protocol not in _MQTT_PROTOCOLS:
        raise ConfigError(
            f"mqtt.protocol: got {m.protocol!r}; allowed: {', '.join(_MQTT_PROTOCOLS)}",
            code="config-value",
        )
    return m


def _validate(cfg: Config) -> None:
    u, d = cfg.updates, cfg.daemon
    _positive("updates.check_interval", u.check_interval, allow_zero=True)
    if not 0 <= u.jitter <= 1:
        raise ConfigError(
            f"updates.jitter: must be a fraction between 0 and 1, got {u.jitter}",
            code="config-range",
        )
    _positive("daemon.drain_timeout", d.drain_timeout, allow_zero=True)
    _positive("inference.max_concurrent_per_model", cfg.inference.max_concurrent_per_model)
    _positive("inference.max_queue_per_model", cfg.inference.max_queue_per_model, allow_zero=True)
    _positive("inference.lend_spin_us", cfg.inference.lend_spin_us, allow_zero=True)
    _positive("daemon.worker_start_timeout", d.worker_start_timeout)
    if d.worker_memory_limit_mb is not None:
        _positive("daemon.worker_memory_limit_mb", d.worker_memory_limit_mb)
    if d.log_level not in _LOG_LEVELS:
        raise ConfigError(
            f"daemon.log_level: got {d.log_level!r}; allowed: {', '.join(_LOG_LEVELS)}",
            code="config-value",
        )
    if cfg.inference.socket == cfg.control.socket:
        raise ConfigError("control.socket: must differ from inference.socket", code="config-value")


def check_groups(cfg: Config) -> None:
    """Fail early, naming the key, when a configured socket group does not exist.

    Called by the daemon at startup rather than at parse time, so configs can be
    validated on a machine (a build host, CI) that lacks the device's groups.
    """
    for key, group in (
        ("inference.group", cfg.inference.group),
        ("control.admin_group", cfg.control.admin_group),
    ):
        if group:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigError(
                    f"{key}: group {group!r} does not exist on this system "
                    '(create it, or set "" for the daemon\'s own group)',
                    code="config-group",
                ) from None


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file; a syntax error names the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}", code="config-io") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", code="config-syntax") from exc
    return parse_config(data, source=path)
