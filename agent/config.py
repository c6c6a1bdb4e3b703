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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

__all__ = [
    "Config",
    "ControlConfig",
    "DaemonConfig",
    "InferenceConfig",
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
    # "127.0.0.1:8000": also serve the inference protocol over TCP (for containers that
    # cannot mount the socket). Off by default; loopback only unless the next key says
    # otherwise (TCP has no peer credentials or file permissions: anyone who can reach
    # the port can call the models).
    tcp_listen: str = ""
    tcp_allow_non_loopback: bool = False


@dataclass(frozen=True)
class GrpcConfig:
    """KServe v2 gRPC on its own Unix socket (the ``edgeward[grpc]`` extra), served by a
    gateway process over the inference socket's data plane, with that socket's mode,
    group and limits."""

    enabled: bool = False
    socket: Path = Path("/run/edgeward/grpc.sock")
    threads: int = 8  # gateway threads (concurrent RPCs in progress)


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
class Config:
    """The whole daemon configuration."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    # Passed to runtime.config.RuntimeConfig.from_dict.
    runtime: dict[str, Any] = field(default_factory=dict)
    # Passed to agent.package.Limits (keys as that dataclass names them).
    package_limits: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None


_LOG_LEVELS = ("debug", "info", "warning", "error")


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
        "grpc": GrpcConfig,
        "control": ControlConfig,
        "updates": UpdatesConfig,
        "daemon": DaemonConfig,
    }
    passthrough = {"runtime", "package_limits"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            special: dict[str, Any] = {}
            if key in ("inference", "control"):
                special["mode"] = _mode
            kwargs[key] = _section(sections[key], key, value, special)
        elif key in passthrough:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table, got {value!r}", code="config-type")
            kwargs[key] = dict(value)
        else:
            allowed = ", ".join(sorted([*sections, *passthrough]))
            raise ConfigError(f"unknown section [{key}]; allowed: {allowed}", code="config-key")
    cfg = Config(source=source, **kwargs)
    _validate(cfg)
    return cfg


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
    if cfg.grpc.socket in (cfg.inference.socket, cfg.control.socket):
        raise ConfigError(
            "grpc.socket: must differ from inference.socket and control.socket",
            code="config-value",
        )
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
