"""Caps on untrusted input, in a module of their own so that the daemon's config
(``[package_limits]``, ``[inference.limits]``, validated at load) can build them without
importing the package reader and its crypto stack (about 9 MiB of the idle daemon's
memory) or the serving wing (the config sits below it, see the contract in setup.cfg)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import ConfigError

__all__ = ["HTTPLimits", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Caps applied to untrusted packages (all sizes in bytes)."""

    max_package_bytes: int = 64 << 30  # the whole .emp file (64 GiB)
    max_total_bytes: int = 64 << 30  # sum of all member sizes (64 GiB)
    max_entries: int = 10_000  # tar members, files and directories
    max_manifest_bytes: int = 4 << 20  # manifest.json (4 MiB)
    max_signature_bytes: int = 64 << 10  # manifest.sig (64 KiB)
    max_meta_bytes: int = 16 << 20  # one Meta-info/*.json (16 MiB)
    max_models: int = 64  # models per package
    max_decoded_bytes: int = 64 << 30  # one model after decrypt + decompress (64 GiB)


@dataclass(frozen=True)
class HTTPLimits:
    """Per-server limits; every one protects the daemon from a misbehaving local client."""

    max_body_bytes: int = 64 * 1024 * 1024  # bytes; larger Content-Length → 413
    max_header_bytes: int = 16 * 1024  # bytes of request line + headers → 431
    max_headers: int = 100  # header lines → 431
    header_timeout_s: float = 10.0  # seconds from a request's first byte to its blank line
    body_timeout_s: float = 60.0  # seconds to receive a whole body once headers are in
    keepalive_timeout_s: float = 75.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 512  # concurrent connections; more → 503 and close
    # Bytes of request bodies held in memory at once, over all connections (a body's
    # buffer grows with the bytes received and is charged here); over it → 503.
    max_inflight_body_bytes: int = 256 * 1024 * 1024
    # Connections one process (SO_PEERCRED pid) may hold; None = max_connections // 2.
    max_connections_per_pid: int | None = None
    # Slots one uid can never take (kept for other users); None = max_connections // 16.
    reserved_connections: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_header_bytes",
            "max_headers",
            "max_connections",
            "max_inflight_body_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"inference.limits.{name}: expected a positive integer, got {value!r}",
                    code="config-limits",
                )
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ConfigError(
                f"inference.limits.max_inflight_body_bytes ({self.max_inflight_body_bytes}) "
                f"must be at least max_body_bytes ({self.max_body_bytes}): otherwise a body "
                "of the allowed size could never be received",
                code="config-limits",
            )
        per_pid = self.max_connections_per_pid
        if per_pid is not None and (
            not isinstance(per_pid, int) or isinstance(per_pid, bool) or per_pid <= 0
        ):
            raise ConfigError(
                "inference.limits.max_connections_per_pid: expected a positive integer, "
                f"got {per_pid!r}",
                code="config-limits",
            )
        res = self.reserved_connections
        if res is not None and (
            not isinstance(res, int) or isinstance(res, bool) or not 0 <= res < self.max_connections
        ):
            raise ConfigError(
                "inference.limits.reserved_connections: expected an integer from 0 to "
                f"max_connections - 1 ({self.max_connections - 1}), got {res!r}",
                code="config-limits",
            )
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(
                    f"inference.limits.{name}: expected a positive number of seconds, "
                    f"got {value!r}",
                    code="config-limits",
                )

    @property
    def pid_cap(self) -> int:
        """Connections one process may hold."""
        cap = self.max_connections_per_pid
        return cap if cap is not None else max(1, self.max_connections // 2)

    @property
    def uid_cap(self) -> int:
        """Connections one user may hold: all but the reserve for other users."""
        res = self.reserved_connections
        if res is None:
            res = self.max_connections // 16
        return max(1, self.max_connections - res)
