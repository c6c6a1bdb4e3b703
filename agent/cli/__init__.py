"""The ``edgeward`` command line.

Each area registers its sub-commands from its own module (see ``COMMAND_MODULES``) so
that areas stay independent. Modules must import heavy dependencies (onnxruntime,
numpy, ...) inside their command functions: ``edgeward --help`` stays fast.
Every failure is one line on stderr and a non-zero exit code. A reader that stops
early (``edgeward inspect pkg | head -1``) ends the command quietly with status 141, as
a command killed by SIGPIPE would, instead of an error line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from agent.errors import EdgewardError
from agent.textsafe import printable

COMMAND_MODULES = (
    "agent.cli.keys",  # keygen
    "agent.cli.publish",  # pack, inspect, verify, unpack
    "agent.cli.residual",  # diff
    "agent.cli.repo",  # repo init|add|publish|refresh|rotate|status
    "agent.cli.daemon",  # agent, status, models, check, rollback
    "agent.cli.config",  # config check
    "agent.cli.serve",  # serve (development)
    "agent.cli.infer",  # infer
    "agent.cli.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeward",
        description="Edge runtime agent for GB/T 42382.2 encapsulated models.",
    )
    from agent import __version__

    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument(
        "--version", action="version", version=f"edgeward {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from agent.logs import setup_logging

    setup_logging(logging.WARNING - 10 * min(args.verbose, 2))
    from agent.malloc import tune_malloc

    tune_malloc()  # pack/unpack stream 4 MiB pieces: reuse heap pages (agent/malloc.py)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        return _stdout_gone()
    except EdgewardError as exc:
        print(f"edgeward: error [{exc.code}]: {printable(exc.message)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgeward: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"edgeward: error [os]: {printable(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line (the traceback with -v)
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        print(
            f"edgeward: error [internal]: {type(exc).__name__}: {printable(exc)}"
            " (run with -v for details)",
            file=sys.stderr,
        )
        return 1
    return int(rc or 0)


def _stdout_gone() -> int:
    """The reader of stdout went away: stop quietly, as SIGPIPE would have."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit must not fail
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + 13


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
