"""One log format for the daemon, its workers and the CLI.

Under systemd, stderr is a stream into journald, which timestamps every line itself and
reads a ``<N>`` prefix as the syslog priority (sd-daemon(3)); so when ``JOURNAL_STREAM``
names the device and inode of our stderr, lines are ``<3>agent.updater[812]: ...`` with
no timestamp of our own. Elsewhere they are ``2026-12-02T15:36:58.981Z ERROR
agent.updater[812]: ...``. ``log_format = "json"`` writes one JSON object per line (with
the priority prefix under journald as well). Model workers are started with
``EDGEWARD_LOG_FORMAT`` / ``EDGEWARD_WORKER_LOG`` set and call :func:`setup_logging`
too, so their lines look like the daemon's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

from agent.textsafe import printable

__all__ = ["PRIORITIES", "JournalAwareFormatter", "journal_stream", "setup_logging"]

# syslog priorities by logging level (sd-daemon(3) "<N>" prefixes).
PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip


def journal_stream(stream: TextIO) -> bool:
    """True when ``stream`` is the journald stream systemd announced in JOURNAL_STREAM."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def _priority(levelno: int) -> int:
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


class JournalAwareFormatter(logging.Formatter):
    """Text or JSON lines; a journald priority prefix instead of a timestamp under journald."""

    def __init__(self, fmt: str = "text", *, journal: bool = False) -> None:
        super().__init__()
        self.fmt = fmt
        self.journal = journal

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        # Inbox file names and manifest labels are chosen by others: one escaped line.
        message = printable(record.getMessage(), limit=4000)
        exc = self.formatException(record.exc_info) if record.exc_info else ""
        if self.fmt == "json":
            doc: dict[str, object] = {
                "level": record.levelname.lower(),
                "logger": record.name,
                "pid": record.process,
                "message": message,
            }
            if not self.journal:
                doc = {"time": self.formatTime(record), **doc}
            if exc:
                doc["exception"] = exc
            line = json.dumps(doc, ensure_ascii=False)
        else:
            line = f"{record.name}[{record.process}]: {message}"
            if exc:
                line += "\n" + exc
            if not self.journal:
                line = f"{self.formatTime(record)} {record.levelname} {line}"
        if self.journal:
            prefix = f"<{_priority(record.levelno)}>"
            # journald reads one entry per line: every line carries the priority.
            line = "\n".join(prefix + part for part in line.split("\n"))
        return line


def setup_logging(level: str | int, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Install the one stderr handler on the root logger (replacing any other)."""
    stream = stream if stream is not None else sys.stderr
    lvl = LEVELS.get(level, logging.INFO) if isinstance(level, str) else level
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalAwareFormatter(fmt, journal=journal_stream(stream)))
    root.addHandler(handler)
    root.setLevel(lvl)
