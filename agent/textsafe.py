"""Untrusted text made safe for a log line or a terminal: the one escaping helper.

Inbox file names, manifest labels and names, error messages that quote them: anyone
who can write the inbox chooses them. A newline would forge a log line (journald
splits on it), an escape sequence would rewrite the operator's terminal, a bidi
override would reorder what they read. :func:`printable` escapes every character
Python does not consider printable (C0/C1 controls, DEL, format characters such as
U+202E, separators other than the space) and bounds the length. Every log record is
escaped by the one log formatter (:class:`agent.logs.JournalAwareFormatter`), and the
CLI passes what it prints from a package or the daemon through :func:`printable`.
"""

from __future__ import annotations

__all__ = ["printable"]

#: longest text shown for one untrusted value (the rest is cut, marked with "...")
MAX_SHOWN = 400


def _escape(ch: str) -> str:
    n = ord(ch)
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(value: object, limit: int = MAX_SHOWN) -> str:
    """``str(value)`` with every non-printable character escaped (``\\x1b``, ``\\n``,
    ``\\u202e``), cut to ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
