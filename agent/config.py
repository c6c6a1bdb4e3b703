"""Typed daemon configuration, loaded from TOML and validated at load time.

Every section is a frozen dataclass with defaults that match the packaged unit
(``systemd/edgeward.service``) and ``configs/edgeward.toml``. Unknown keys are errors,
not silently ignored: a typo in a socket mode must not leave the socket world-writable.
Messages name the key (``inference.mode``) and what would have been accepted.

``[runtime]``, ``[inference.limits]`` and ``[package_limits]`` are built at load into the
typed objects their consumers use (``runtime.config.RuntimeConfig``,
``agent.limits.HTTPLimits``, ``agent.limits.Limits``), each validated by its own class,
so a misspelled key fails before anything starts rather than at the first package.

Environment overrides: ``EDGEWARD_<SECTION>_<KEY>=value`` replaces ``[section] key`` of
the file (``EDGEWARD_DAEMON_LOG_LEVEL=debug``); the value is read as a TOML value when
it parses as one (``60``, ``true``, ``"x"``) and as a plain string otherwise
(``0660``, ``/run/x.sock``). Nested tables are set in the file only.
"""

from __future__ import annotations

import dataclasses
import grp
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.limits import HTTPLimits, Limits
from runtime.config import RuntimeConfig

__all__ = [
    "BrokerAddress",
    "Config",
    "ControlConfig",
    "DaemonConfig",
    "InferenceConfig",
    "MetricsConfig",
    "MqttConfig",
    "PathsConfig",
    "RepositoryConfig",
    "UpdatesConfig",
    "apply_environment",
    "check_groups",
    "config_to_dict",
    "load_config",
    "metrics_socket",
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
    # Device private keys / fleet keys for encrypted packages (owner edgeward, mode 0600;
    # see docs/INSTALL.md). A missing or empty directory means no keys.
    keys_dir: Path | None = Path("/etc/edgeward/keys")
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
    # its requests itself (no relay through the daemon; agent/serving/direct.py).
    lend_connections: bool = True
    # At most this many microseconds a worker thread polls for a connection's next
    # request after a short answer before it sleeps (adaptive: 1.5x the connection's
    # usual gap; 0 = always sleep). See agent/serving/direct.py.
    lend_spin_us: int = 1000
    # Seconds one prediction may take; past it the request gets 504 and the model's
    # worker is killed and restarted (a run script that hangs or spins). Per model:
    # request_timeouts = { det = 120.0 }.
    request_timeout_s: float = 60.0
    request_timeouts: dict[str, float] = field(default_factory=dict)
    # [inference.limits], built into agent.limits.HTTPLimits (keys as it names them).
    limits: HTTPLimits = field(default_factory=HTTPLimits)
    # "127.0.0.1:8000": also serve the inference protocol over TCP (for containers that
    # cannot mount the socket). Off by default; loopback only unless the next key says
    # otherwise (TCP has no peer credentials or file permissions: anyone who can reach
    # the port can call the models).
    tcp_listen: str = ""
    tcp_allow_non_loopback: bool = False

    def request_timeout(self, model: str) -> float:
        """Seconds a prediction of ``model`` may take."""
        return self.request_timeouts.get(model, self.request_timeout_s)


@dataclass(frozen=True)
class GrpcConfig:
    """KServe v2 gRPC on its own Unix socket (the ``edgeward[grpc]`` extra), served by a
    gateway process over the inference socket's data plane, with that socket's mode,
    group and limits."""

    enabled: bool = False
    socket: Path = Path("/run/edgeward/grpc.sock")
    # gateway threads for calls that overlap on one connection (each connection has a
    # thread of its own, which answers the one-at-a-time call itself)
    threads: int = 8


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
    # A local fault (disk full, unreadable device key, bad config) is retried after this
    # many seconds, doubling per consecutive fault up to retry_backoff_max.
    retry_backoff: float = 60.0
    retry_backoff_max: float = 3600.0
    # Seconds after an activation during which a crash of the new worker or an error
    # rate above health_max_error_rate rolls back on its own and marks the version bad.
    health_window_s: float = 60.0  # 0 = no health window
    health_max_error_rate: float = 0.5  # fraction of requests failed
    health_min_requests: int = 4  # the rate counts only after this many requests


@dataclass(frozen=True)
class RepositoryConfig:
    """The TUF repository the daemon follows (absent section = inbox only).

    The repository is a static tree: ``<url>/metadata/*.json`` and ``<url>/targets/``.
    """

    # Mirrors, tried in order for metadata and packages; https:// only.
    urls: tuple[str, ...] = ()
    channel: str = "stable"
    # The root.json provisioned with the box: the anchor of all trust in the repository.
    root: Path = Path("/etc/edgeward/repository-root.json")
    ca_bundle: Path | None = None  # PEM CAs for the server certificate; None = system CAs
    client_cert: Path | None = None  # PEM client certificate (mTLS); key in client_key
    client_key: Path | None = None
    connect_timeout: float = 10.0  # seconds
    read_timeout: float = 30.0  # seconds without a byte before a download is cut
    max_metadata_bytes: int = 1 << 20  # cap for each of timestamp/snapshot/targets/root
    max_download_bytes: int = 16 << 30  # cap for one package, whatever metadata declares
    retries: int = 4  # attempts per download after the first, exponential backoff
    backoff_s: float = 1.0  # first retry delay; doubles, with +-50 % jitter
    backoff_max_s: float = 60.0


@dataclass(frozen=True)
class DaemonConfig:
    """Lifecycle timings."""

    drain_timeout: float = 10.0  # seconds granted to in-flight requests on SIGTERM / swap
    worker_start_timeout: float = 120.0  # seconds for spawn + convert + load + warm-up
    worker_memory_limit_mb: int | None = None  # per worker; None = no cap
    log_level: str = "info"
    # hash every installed file of current and previous against the signed manifest at
    # start (a modified version is not served); agent/installed.py
    verify_installed: bool = True
    # "text": one line per record (with journald priority prefixes when stderr is the
    # journal); "json": one JSON object per line. Worker lines use the same format.
    log_format: str = "text"
    # Model workers run third-party code (run scripts, converters); docs/DAEMON.md, "Trust
    # boundaries". As root the daemon runs them as this user: "auto" = edgeward-worker if
    # it exists, else nobody; "" = as the daemon itself. Ignored when not root.
    worker_user: str = "auto"
    # "landlock": workers cannot open the key directory, the config file, the state
    # directory (store, inbox) but their own model and the converter cache (Linux 5.13+;
    # where the kernel has no Landlock the worker says so and runs without). "off": no fence.
    worker_sandbox: str = "landlock"
    # Variables of the daemon's environment workers inherit beyond the fixed allow-list
    # (PATH, LANG, TZ, LD_LIBRARY_PATH, OMP_*, ORT_*, ...): names, or prefixes ending in *.
    worker_env: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics for a scraper that should not get the control socket."""

    # None = metrics.sock beside the control socket (/run/edgeward/metrics.sock).
    socket: Path | None = None
    mode: int = 0o660
    # Group that may read the metrics socket; None = the daemon's own group (edgeward
    # under the packaged unit), so a scraper in that group needs no other setting.
    group: str | None = None
    # Also serve GET /metrics on 127.0.0.1:<port>; 0 = off (the default).
    port: int = 0


def metrics_socket(cfg: Config) -> Path:
    """Where the metrics socket is: ``[metrics] socket`` or beside the control socket."""
    if cfg.metrics.socket is not None:
        return cfg.metrics.socket
    return cfg.control.socket.with_name("metrics.sock")


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
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # [runtime], built by runtime.config.RuntimeConfig.from_dict.
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # [package_limits], built into agent.limits.Limits (caps on untrusted packages).
    package_limits: Limits = field(default_factory=Limits)
    # None = no [mqtt] section: no broker connection, paho is never imported.
    mqtt: MqttConfig | None = None
    # None = no [repository] section: updates come from the inbox only.
    repository: RepositoryConfig | None = None
    source: Path | None = None


_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")
_WORKER_SANDBOXES = ("landlock", "off")

# Sections that are plain dataclasses of scalars; each is parsed by _section. A new
# section is one entry here plus its dataclass (and a [section] in the sample config).
SECTIONS: dict[str, type[Any]] = {
    "paths": PathsConfig,
    "inference": InferenceConfig,
    "grpc": GrpcConfig,
    "control": ControlConfig,
    "updates": UpdatesConfig,
    "daemon": DaemonConfig,
    "metrics": MetricsConfig,
}
# Keys parsed as octal socket modes.
_MODE_KEYS = {("inference", "mode"), ("control", "mode"), ("metrics", "mode")}


def _type_name(tp: object) -> str:
    return {
        "Path": "a path string",
        "Path | None": "a path string",
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
    if base.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f"{key}: expected a list of strings, got {value!r}", code="config-type"
            )
        return tuple(value)
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


def _section(cls: type[Any], name: str, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, got {table!r}", code="config-type")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{name}.{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {full}; allowed: {allowed}", code="config-key")
        if (name, key) in _MODE_KEYS:
            kwargs[key] = _mode(full, value)
        elif (name, key) == ("inference", "limits"):
            kwargs[key] = _limits(full, HTTPLimits, value)
        elif (name, key) == ("inference", "request_timeouts"):
            kwargs[key] = _seconds_per_model(full, value)
        else:
            kwargs[key] = _convert(full, str(fields[key].type), value)
    return cls(**kwargs)


def _seconds_per_model(key: str, table: Any) -> dict[str, float]:
    """``{model name: seconds > 0}``, as floats."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table, got {table!r}", code="config-type")
    out: dict[str, float] = {}
    for model, seconds in table.items():
        full = f"{key}.{model}"
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ConfigError(
                f"{full}: expected a number of seconds, got {seconds!r}", code="config-type"
            )
        _positive(full, seconds)
        out[model] = float(seconds)
    return out


def _limits(key: str, cls: type[Any], table: Any) -> Any:
    """Build a limits dataclass from a table: known keys, integers or numbers only.

    A class with its own ``__post_init__`` checks (HTTPLimits) judges ranges itself;
    for the others every cap must be > 0.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] must be a table, got {table!r}", code="config-type")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own_checks = hasattr(cls, "__post_init__")
    kwargs: dict[str, Any] = {}
    for k, v in table.items():
        if k not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {key}.{k}; allowed: {allowed}", code="config-key")
        kwargs[k] = _convert(f"{key}.{k}", str(fields[k].type), v)
        if not own_checks and kwargs[k] is not None and kwargs[k] <= 0:
            raise ConfigError(f"{key}.{k}: must be > 0, got {v!r}", code="config-range")
    return cls(**kwargs)


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}", code="config-range")


def parse_config(data: Mapping[str, Any], *, source: Path | None = None) -> Config:
    """Build a :class:`Config` from a parsed TOML document, validating every key."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            kwargs[key] = _section(SECTIONS[key], key, value)
        elif key == "runtime":
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table, got {value!r}", code="config-type")
            kwargs[key] = RuntimeConfig.from_dict(value)
        elif key == "package_limits":
            kwargs[key] = _limits(key, Limits, value)
        elif key == "mqtt":
            kwargs[key] = _mqtt_section(value)
        elif key == "repository":
            kwargs[key] = _section(RepositoryConfig, key, value)
        else:
            allowed = ", ".join(
                sorted([*SECTIONS, "runtime", "package_limits", "mqtt", "repository"])
            )
            raise ConfigError(f"unknown section [{key}]; allowed: {allowed}", code="config-key")
    cfg = Config(source=source, **kwargs)
    _validate(cfg)
    return cfg


def apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``EDGEWARD_<SECTION>_<KEY>`` variables on a parsed document (a copy).

    Only variables whose name starts with a known section are read, so unrelated
    ``EDGEWARD_*`` variables (``EDGEWARD_CONTROL_SOCKET`` for the CLI is also
    ``[control] socket``, consistently) pass by. An unknown key is an error naming the
    variable.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    names = sorted([*SECTIONS, "package_limits"], key=len, reverse=True)
    for var, raw in sorted(environ.items()):
        if not var.startswith("EDGEWARD_"):
            continue
        rest = var[len("EDGEWARD_") :].lower()
        section = next((s for s in names if rest.startswith(s + "_")), None)
        if section is None:
            continue
        key = rest[len(section) + 1 :]
        known = (
            {f.name for f in dataclasses.fields(SECTIONS[section])}
            if section in SECTIONS
            else set(Limits.__dataclass_fields__)
        )
        if key not in known:
            raise ConfigError(
                f"environment {var}: no key {section}.{key}; allowed: {', '.join(sorted(known))}",
                code="config-key",
            )
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table", code="config-type")
        table[key] = value
    return out


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
    special: dict[str, Callable[[str, Any], Any]] = {
        "brokers": lambda k, v: tuple(
            broker_address(f"{k}[{i}]", x) for i, x in enumerate(_str_list(k, v))
        ),
        "groups": lambda k, v: tuple(
            topic_name(f"{k}[{i}]", x) for i, x in enumerate(_str_list(k, v))
        ),
        "device_id": lambda k, v: None if v == "" else topic_name(k, v),
        "username": lambda k, v: None if v == "" else _convert(k, "str", v),
    }
    if not isinstance(table, dict):
        raise ConfigError(f"[mqtt] must be a table, got {table!r}", code="config-type")
    fields = {f.name: f for f in dataclasses.fields(MqttConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"mqtt.{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {full}; allowed: {allowed}", code="config-key")
        conv = special.get(key)
        kwargs[key] = conv(full, value) if conv else _convert(full, str(fields[key].type), value)
    m = MqttConfig(**kwargs)
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
    _positive("updates.retry_backoff", u.retry_backoff, allow_zero=True)
    _positive("updates.retry_backoff_max", u.retry_backoff_max, allow_zero=True)
    if not 0 <= u.jitter <= 1:
        raise ConfigError(
            f"updates.jitter: must be a fraction between 0 and 1, got {u.jitter}",
            code="config-range",
        )
    _positive("daemon.drain_timeout", d.drain_timeout, allow_zero=True)
    _positive("inference.max_concurrent_per_model", cfg.inference.max_concurrent_per_model)
    _positive("inference.max_queue_per_model", cfg.inference.max_queue_per_model, allow_zero=True)
    _positive("inference.lend_spin_us", cfg.inference.lend_spin_us, allow_zero=True)
    _positive("inference.request_timeout_s", cfg.inference.request_timeout_s)
    _positive("daemon.worker_start_timeout", d.worker_start_timeout)
    if d.worker_memory_limit_mb is not None:
        _positive("daemon.worker_memory_limit_mb", d.worker_memory_limit_mb)
    if d.worker_sandbox not in _WORKER_SANDBOXES:
        raise ConfigError(
            f"daemon.worker_sandbox: expected one of {', '.join(_WORKER_SANDBOXES)}, "
            f"got {d.worker_sandbox!r}",
            code="config-value",
        )
    for name in d.worker_env:
        if not name or "=" in name or "*" in name[:-1]:
            raise ConfigError(
                f"daemon.worker_env: {name!r} is not a variable name or a PREFIX*",
                code="config-value",
            )
    _positive("metrics.port", cfg.metrics.port, allow_zero=True)
    if cfg.metrics.port > 65535:
        raise ConfigError(
            f"metrics.port: must be <= 65535, got {cfg.metrics.port}", code="config-range"
        )
    if d.log_format not in _LOG_FORMATS:
        raise ConfigError(
            f"daemon.log_format: got {d.log_format!r}; allowed: {', '.join(_LOG_FORMATS)}",
            code="config-value",
        )
    if d.log_level not in _LOG_LEVELS:
        raise ConfigError(
            f"daemon.log_level: got {d.log_level!r}; allowed: {', '.join(_LOG_LEVELS)}",
            code="config-value",
        )
    _positive("updates.health_window_s", u.health_window_s, allow_zero=True)
    if not 0 < u.health_max_error_rate <= 1:
        raise ConfigError(
            f"updates.health_max_error_rate: must be a fraction in (0, 1], "
            f"got {u.health_max_error_rate}",
            code="config-range",
        )
    _positive("updates.health_min_requests", u.health_min_requests)
    if cfg.repository is not None:
        _validate_repository(cfg.repository)
    socks = {"inference.socket": cfg.inference.socket, "control.socket": cfg.control.socket}
    socks["metrics.socket"] = metrics_socket(cfg)
    socks["grpc.socket"] = cfg.grpc.socket
    seen: dict[Path, str] = {}
    for key, path in socks.items():
        if path in seen:
            raise ConfigError(f"{key}: must differ from {seen[path]}", code="config-value")
        seen[path] = key
    _positive("grpc.threads", cfg.grpc.threads)
    if cfg.inference.tcp_listen:
        tcp_address(cfg.inference)


def tcp_address(inf: InferenceConfig) -> tuple[str, int]:
    """``inference.tcp_listen`` as (host, port); loopback only unless
    ``inference.tcp_allow_non_loopback``."""
    import ipaddress

    host, sep, port_s = inf.tcp_listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(
            f"inference.tcp_listen: expected HOST:PORT such as \"127.0.0.1:8000\", "
            f"got {inf.tcp_listen!r}",
            code="config-value",
        )
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ConfigError(
            f"inference.tcp_listen: {host!r} is not an IP address (or localhost)",
            code="config-value",
        ) from None
    if not loopback and not inf.tcp_allow_non_loopback:
        raise ConfigError(
            f"inference.tcp_listen: {host} is not a loopback address; TCP has no peer "
            "credentials, so anyone who reaches the port can call the models. Set "
            "inference.tcp_allow_non_loopback = true to allow it",
            code="config-value",
        )
    return host, int(port_s)


_CHANNEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _validate_repository(r: RepositoryConfig) -> None:
    from urllib.parse import urlsplit

    if not r.urls:
        raise ConfigError(
            "repository.urls: at least one https:// URL is needed (or drop [repository])",
            code="config-value",
        )
    for url in r.urls:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(
                f"repository.urls: {url!r} is not an https:// URL without query or fragment",
                code="config-value",
            )
    if not _CHANNEL_RE.match(r.channel):
        raise ConfigError(
            f"repository.channel: {r.channel!r}; allowed: lower-case letters, digits, '.', "
            "'_' and '-' (e.g. stable, canary)",
            code="config-value",
        )
    if (r.client_cert is None) != (r.client_key is None):
        raise ConfigError(
            "repository.client_cert and repository.client_key: set both or neither",
            code="config-value",
        )
    for key in ("connect_timeout", "read_timeout", "backoff_s", "backoff_max_s"):
        _positive(f"repository.{key}", getattr(r, key))
    for key in ("max_metadata_bytes", "max_download_bytes"):
        _positive(f"repository.{key}", getattr(r, key))
    _positive("repository.retries", r.retries, allow_zero=True)


def check_groups(cfg: Config) -> None:
    """Fail early, naming the key, when a configured socket group does not exist.

    Called by the daemon at startup rather than at parse time, so configs can be
    validated on a machine (a build host, CI) that lacks the device's groups.
    """
    for key, group in (
        ("inference.group", cfg.inference.group),
        ("control.admin_group", cfg.control.admin_group),
        ("metrics.group", cfg.metrics.group),
    ):
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(
                    f"{key}: group {group!r} does not exist on this system "
                    '(create it, or set "" for the daemon\'s own group)',
                    code="config-group",
                ) from None
            problem = unmapped_group(gid, group, key)
            if problem is not None:
                raise ConfigError(problem, code="config-group")


def unmapped_group(gid: int, group: str, key: str, gid_map: str | None = None) -> str | None:
    """Why ``gid`` cannot be given to a socket here, or None when it can.

    In a user namespace (systemd's ``PrivateUsers=yes``) only the daemon's own user and
    group (and root/nobody) are mapped; ``chown`` to any other group fails with an
    opaque ``EINVAL``. ``gid_map``: the text of ``/proc/self/gid_map`` (read when None).
    """
    if gid_map is None:
        try:
            with open("/proc/self/gid_map", encoding="ascii") as fh:
                gid_map = fh.read()
        except OSError:
            return None  # no /proc: nothing to tell in advance
    for line in gid_map.splitlines():
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            inside, _outside, count = (int(p) for p in parts)
            if inside <= gid < inside + count:
                return None
    return (
        f"{key}: group {group!r} (gid {gid}) is not mapped in the daemon's user namespace "
        "(PrivateUsers=yes maps only the daemon's own user and group); use the daemon's "
        f'own group ({key} = "" or the unit\'s Group=), or set PrivateUsers=no in the unit'
    )


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file; a syntax error names the line.

    ``environ`` (normally ``os.environ``) supplies ``EDGEWARD_<SECTION>_<KEY>``
    overrides; None reads the file alone.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}", code="config-io") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", code="config-syntax") from exc
    if environ is not None:
        data = apply_environment(data, environ)
    return parse_config(data, source=path)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective configuration as JSON-able data (paths as strings, modes octal)."""

    def plain(obj: Any, key: str = "") -> Any:
        if isinstance(obj, BrokerAddress):
            return str(obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name), f.name) for f in dataclasses.fields(obj)}
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, frozenset):
            return sorted(obj)
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        if key == "mode" and isinstance(obj, int):
            return f"{obj:04o}"
        return obj

    out = plain(cfg)
    out.pop("source", None)
    out["runtime"] = cfg.runtime.to_dict()
    return dict(out)
