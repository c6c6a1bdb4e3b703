"""``edgeward config check FILE``: validate a daemon config without starting anything.

Loads the file exactly as ``edgeward agent`` would (environment overrides included,
every section built into its typed form, socket groups looked up on this machine) and
prints ``OK`` or the one error line naming the key. Exit status 0 or 2.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from agent.cli.common import add_json


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``config check``."""
    p = sub.add_parser("config", help="work with daemon configuration files")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser(
        "check",
        help="validate a config file as the daemon would, without starting it",
        description="Exit 0 when FILE is valid; otherwise print one line naming the key.",
    )
    c.add_argument("file", type=Path, metavar="FILE", help="TOML config file")
    c.add_argument(
        "--no-groups",
        action="store_true",
        help="skip looking up socket groups (checking a device config on a build host)",
    )
    add_json(p=c, what="the effective configuration")
    c.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from agent.config import check_groups, config_to_dict, load_config
    from runtime.providers import check_provider_names

    cfg = load_config(args.file, environ=os.environ)
    if not args.no_groups:
        check_groups(cfg)
    check_provider_names(cfg.runtime.onnx)
    if args.json:
        print(json.dumps({"ok": True, "config": config_to_dict(cfg)}, indent=2, sort_keys=True))
    else:
        print(f"OK: {args.file}")
    return 0
