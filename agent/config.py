"""Typed daemon configuration, loaded from TOML and validated at load time.

Every section is a frozen dataclass with defaults that match the packaged unit
(``systemd/edgeward.service``) and ``configs/edgeward.toml``. Unknown keys are errors,
not silently ignored: a typo in a socket mode must not leave the socket world-writable.
Messages name the key (``inference.mode``) and what would have been accepted.

``[runtime]``, ``[inference.limits]`` and ``[package_limits]`` are built at load into the
typed objects their consumers use (``runtime.config.RuntimeConfig``,
``agent.http.HTTPLimits``, ``agent.limits.Limits``), each validated by its own class,
so a misspelled key fails before anything starts rather than at the first package.

Environment overrides: ``EDGEWARD_<SECTION>_<KEY>=value`` replaces ``[section] key`` of
the file (``EDGEWARD_DAEMON_LOG_LEVEL=debug``); the value is read as a TOML value when
it parses as one (``60``, ``true``, ``"x"``) and as a plain string otherwise
(``0660``, ``/run/x.sock``). Nested tables are set in the file only.
"""

from __future__ import annotations

import dataclasses
import grp
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.http import HTTPLimits
from agent.limits import Limits
from runtime.config import RuntimeConfig

__all__ = [
    "Config",
    "ControlConfig",
    "DaemonConfig",
    "InferenceConfig",
    "MetricsConfig",
    "PathsConfig",
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
    # its requests itself (no relay through the daemon; runtime/direct.py).
    lend_connections: bool = True
    # Microseconds a worker thread polls for a connection's next request after a short
    # answer before it sleeps (adaptive; 0 = always sleep). See runtime/direct.py.
    lend_spin_us: int = 200
    # Seconds one prediction may take; past it the request gets 504 and the model's
    # worker is killed and restarted (a run script that hangs or spins). Per model:
    # request_timeouts = { det = 120.0 }.
    request_timeout_s: float = 60.0
    request_timeouts: dict[str, Any] = field(default_factory=dict)
    # [inference.limits], built into agent.http.HTTPLimits (keys as it names them).
    limits: HTTPLimits = field(default_factory=HTTPLimits)

    def request_timeout(self, model: str) -> float:
        """Seconds a prediction of ``model`` may take."""
        return float(self.request_timeouts.get(model, self.request_timeout_s))


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
class Config:
    """The whole daemon configuration."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # [runtime], built by runtime.config.RuntimeConfig.from_dict.
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # [package_limits], built into agent.limits.Limits (caps on untrusted packages).
    package_limits: Limits = field(default_factory=Limits)
    source: Path | None = None


_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")

# Sections that are plain dataclasses of scalars; each is parsed by _section. A new
# section is one entry here plus its dataclass (and a [section] in the sample config).
SECTIONS: dict[str, type[Any]] = {
    "paths": PathsConfig,
    "inference": InferenceConfig,
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
        else:
            kwargs[key] = _convert(full, str(fields[key].type), value)
    return cls(**kwargs)


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
        else:
            allowed = ", ".join(sorted([*SECTIONS, "runtime", "package_limits"]))
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
    for model, seconds in cfg.inference.request_timeouts.items():
        key = f"inference.request_timeouts.{model}"
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ConfigError(
                f"{key}: expected a number of seconds, got {seconds!r}", code="config-type"
            )
        _positive(key, seconds)
    _positive("daemon.worker_start_timeout", d.worker_start_timeout)
    if d.worker_memory_limit_mb is not None:
        _positive("daemon.worker_memory_limit_mb", d.worker_memory_limit_mb)
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
    socks = {"inference.socket": cfg.inference.socket, "control.socket": cfg.control.socket}
    socks["metrics.socket"] = metrics_socket(cfg)
    seen: dict[Path, str] = {}
    for key, path in socks.items():
        if path in seen:
            raise ConfigError(f"{key}: must differ from {seen[path]}", code="config-value")
        seen[path] = key


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
