"""Small pieces every sub-command shares: refusing to overwrite, progress bars, JSON.

One home for these rules so that every command behaves alike: an existing output is
only replaced with ``--force``; progress goes to stderr as a tqdm bar whenever stderr
is a terminal (never into the stdout a script reads) and ends at 100 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from agent.durable import atomic_replace
from agent.errors import UsageError

__all__ = ["Progress", "add_force", "add_json", "print_json", "refuse_overwrite", "replace_dir"]


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON (for scripts)")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def refuse_overwrite(path: Path, force: bool) -> None:
    """Raise unless ``path`` is absent, an empty directory, or ``force`` is set."""
    if force or not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    raise UsageError(f"{path} exists; use --force to overwrite it", code="output-exists")


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished directory ``new`` to ``out``, removing what was there."""
    if os.path.lexists(out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        atomic_replace(new, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        atomic_replace(new, out)


class Progress:
    """A byte progress bar on stderr, shown only when stderr is a terminal.

    Callable with a byte count (the ``progress`` callback of pack/unpack). ``close``
    completes the bar: ``total`` is an estimate (an archive holds headers besides the
    payload), so a finished job is shown as finished.
    """

    def __init__(self, what: str, total: int) -> None:
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            try:
                cols, rows = os.get_terminal_size(sys.stderr.fileno())
            except OSError:
                cols, rows = 80, 24
            self._bar = tqdm(
                total=max(total, 1),
                desc=what,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=True,
                # a terminal that reports no size (0 x 0) would get no bar at all
                ncols=cols or 80,
                nrows=rows or 24,
            )

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(min(n, max(self._bar.total - self._bar.n, 0)))

    def close(self, *, done: bool = True) -> None:
        if self._bar is None:
            return
        if done:
            self._bar.update(self._bar.total - self._bar.n)
        self._bar.close()
        self._bar = None
