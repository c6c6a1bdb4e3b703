"""``edgeward keygen``: create signing, device and fleet keys.

``--kind signing`` makes an Ed25519 pair (publishers sign manifests with it, devices
trust its ``.pub``), ``--kind device`` an X25519 pair (packages are encrypted for its
``.pub``; the ``.key`` stays on the device), ``--kind fleet --name N`` a pre-shared
fleet key ``N.psk``. Private files are created with mode 0600; secrets are never printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli.common import add_force, add_json


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``keygen`` to the top-level parser."""
    p = sub.add_parser(
        "keygen",
        help="create a signing, device or fleet key",
        description="Create a key: DIR/<id>.key (0600) + DIR/<id>.pub, or DIR/NAME.psk.",
    )
    p.add_argument(
        "--kind",
        required=True,
        choices=("signing", "device", "fleet"),
        help="signing (Ed25519, publishers), device (X25519, receives packages) or fleet "
        "(a named pre-shared key)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--name", help="name of a fleet key (required with --kind fleet)")
    add_force(p)
    add_json(p, "the key id and file names")
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    from agent.keys import generate_key

    paths = generate_key(args.kind, args.out, name=args.name, overwrite=args.force)
    if args.json:
        doc = {
            "kind": paths.kind,
            "key_id": paths.key_id,
            "private": str(paths.private),
            "public": str(paths.public) if paths.public else None,
        }
        print(json.dumps(doc))
    else:
        print(f"{paths.kind} key {paths.key_id}")
        print(f"  private: {paths.private}")
        if paths.public is not None:
            print(f"  public:  {paths.public}")
    return 0
