"""The ``edgeward`` command line.

Each area registers its sub-commands from its own module (see ``COMMAND_MODULES``) so
that areas stay independent. Modules must import heavy dependencies (onnxruntime,
numpy, ...) inside their command functions: ``edgeward --help`` stays fast.
Every failure is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent.errors import EdgewardError

COMMAND_MODULES = (
    "agent.cli.keys",  # keygen
    "agent.cli.publish",  # pack, inspect, verify, unpack
    "agent.cli.residual",  # diff
    "agent.cli.daemon",  # agent, status, models, check, rollback
    "agent.cli.infer",  # infer
    "agent.cli.demo",  # demo
    "agent.cli.fleet",  # fleet status, fleet check (through the MQTT broker)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeward",
        description="Edge runtime agent for GB/T 42382.2 encapsulated models.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.malloc import tune_malloc

    tune_malloc()  # pack/unpack stream 4 MiB pieces: reuse heap pages (agent/malloc.py)
    try:
        rc = args.func(args)
    except EdgewardError as exc:
        print(f"edgeward: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgeward: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"edgeward: error [os]: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
