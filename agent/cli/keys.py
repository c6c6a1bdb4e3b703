"""``edgeward keygen``: create signing, device and fleet keys; ``edgeward provision``.

``--kind signing`` makes an Ed25519 pair (publishers sign manifests with it, devices
trust its ``.pub``), ``--kind device`` an X25519 pair (packages are encrypted for its
``.pub``; the ``.key`` stays on the device), ``--kind fleet --name N`` a pre-shared
fleet key ``N.psk``. Private files are created with mode 0600; secrets are never printed.

``provision`` sets up a device the way the daemon needs it (docs/INSTALL.md): a device key
in ``paths.keys_dir`` owned by the service user with mode 0600 (the daemon refuses a key
readable by others and cannot read a root-owned one), and publisher keys in
``paths.trust_dir``.
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

    p = sub.add_parser(
        "provision",
        help="set up this device: a device key the daemon can read, trusted publishers",
        description="Create the device key in keys_dir (owner USER, mode 0600) unless one "
        "exists, and install publisher keys into trust_dir. Run as root.",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/edgeward/edgeward.toml"),
        metavar="FILE",
        help="daemon config whose keys_dir and trust_dir are used "
        "(default /etc/edgeward/edgeward.toml)",
    )
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="publisher signing .pub to trust (repeatable)",
    )
    p.add_argument(
        "--user", default="edgeward", help="the service user that must read the key (edgeward)"
    )
    add_json(p, "the device key id and files")
    p.set_defaults(func=_provision)


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


def _provision(args: argparse.Namespace) -> int:
    import os
    import pwd
    import shutil

    from agent.config import load_config
    from agent.errors import ConfigError, KeyFileError
    from agent.keys import generate_key, key_id, load_private, load_public

    cfg = load_config(args.config, environ=os.environ)
    keys_dir, trust_dir = cfg.paths.keys_dir, cfg.paths.trust_dir
    if keys_dir is None:
        raise ConfigError("paths.keys_dir is empty; set it to provision a device key")
    try:
        pw = pwd.getpwnam(args.user)
    except KeyError:
        raise KeyFileError(
            f"user {args.user!r} does not exist (install the package, or run systemd-sysusers)",
            code="provision-user",
        ) from None
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chown(keys_dir, pw.pw_uid, pw.pw_gid)
    os.chmod(keys_dir, 0o700)
    existing = sorted(keys_dir.glob("x25519-*.key"))
    if existing:
        key_path, created = existing[0], False
        pub = load_private(key_path).public_key()
        kid = key_id(pub)
        pub_path: Path | None = key_path.with_suffix(".pub")
    else:
        paths = generate_key("device", keys_dir)
        key_path, pub_path, kid, created = paths.private, paths.public, paths.key_id, True
    for f, mode in ((key_path, 0o600), (pub_path, 0o644)):
        if f is not None and f.exists():
            os.chown(f, pw.pw_uid, pw.pw_gid)
            os.chmod(f, mode)
    trust_dir.mkdir(parents=True, exist_ok=True)
    trusted = []
    for src in args.trust:
        trusted.append(key_id(load_public(src)))  # refuses a file that is not a key
        dst = trust_dir / src.name
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
    doc = {
        "device_key_id": kid,
        "device_key": str(key_path),
        "device_public_key": str(pub_path),
        "created": created,
        "trusted": trusted,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"device key {kid} ({'created' if created else 'kept'}): {key_path}")
        print(f"  give publishers {pub_path} (edgeward pack --encrypt-for)")
        for t in trusted:
            print(f"trusting publisher {t}")
    return 0
