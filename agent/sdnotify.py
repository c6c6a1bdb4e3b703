"""Minimal sd_notify(3) over a datagram socket, without libsystemd.

systemd hands a ``Type=notify`` service the path of its notification socket in
``NOTIFY_SOCKET``; a message is newline-separated ``KEY=VALUE`` pairs in one datagram.
A leading ``@`` names an abstract socket. Outside systemd (no ``NOTIFY_SOCKET``) every
call is a cheap no-op, so the daemon runs the same way under a terminal, a test or
systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


class Notifier:
    """Send state changes to the service manager.

    Failures to send are logged once at debug and never raised: a lost notification
    must not take the daemon down (systemd then notices through the watchdog).
    """

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if addr:
            # Abstract namespace sockets are spelled with a leading "@".
            self._address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` fields (keys upper-cased); return whether it was sent."""
        if self._address is None:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            logger.debug("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (startup finished), optionally with a STATUS= line."""
        if status is None:
            return self.notify(ready=1)
        return self.notify(ready=1, status=status)

    def status(self, text: str) -> bool:
        """STATUS= free text shown by ``systemctl status``."""
        return self.notify(status=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1 keep-alive ping."""
        return self.notify(watchdog=1)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: tell systemd long work (a patch, a conversion) is under way."""
        return self.notify(extend_timeout_usec=int(seconds * 1_000_000))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (required by Type=notify-reload, systemd 253+);
        READY=1 follows when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(reloading=1, monotonic_usec=usec)

    def stopping(self) -> bool:
        """STOPPING=1 at the start of shutdown."""
        return self.notify(stopping=1)

    def close(self) -> None:
        """Close the datagram socket (a later notify reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``WATCHDOG_USEC``, or None if unset.

    ``WATCHDOG_PID``, when set, must name this process; otherwise the watchdog belongs
    to someone else (for example a parent shell) and we stay quiet.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2
