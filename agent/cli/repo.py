"""``edgeward repo``: build and maintain a static TUF repository of packages.

``init`` (root keys, offline) → ``add`` (stage ``.emp`` files) → ``publish`` (online
keys) → ``refresh`` (cron: re-sign what is about to expire) → ``rotate`` (replace a key,
cross-signed root) → ``status``. See docs/REPOSITORY.md. Keys are
``edgeward keygen --kind signing`` files: ``.key`` where the command signs, ``.key`` or
``.pub`` where it only names a key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

_EXPIRY_ROLES = ("root", "targets", "snapshot", "timestamp")
_DEFAULTS = {"root": "365d", "targets": "90d", "snapshot": "7d", "timestamp": "1d"}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``repo`` and its sub-commands to the top-level parser."""
    repo = sub.add_parser(
        "repo",
        help="build and maintain a static TUF repository of packages",
        description="Build and maintain a static TUF repository of .emp packages "
        "(docs/REPOSITORY.md). Serve DIR/metadata and DIR/targets from any web server.",
    )
    rsub = repo.add_subparsers(dest="repo_command", required=True, metavar="SUBCOMMAND")

    p = rsub.add_parser(
        "init",
        help="create a repository: root v1 signed by the root keys",
        description="Create DIR with root metadata v1 (consistent snapshots). Root keys "
        "sign (.key); online keys are only named (.pub or .key). The first publish writes "
        "targets, snapshot and timestamp.",
    )
    _dir(p)
    p.add_argument(
        "--root-key",
        action="append",
        required=True,
        type=Path,
        metavar="K",
        help="root signing key .key (repeatable; every one signs root v1)",
    )
    p.add_argument(
        "--root-threshold",
        type=int,
        default=1,
        metavar="N",
        help="root signatures a device requires (default 1; at most the number of root keys)",
    )
    for role in ("targets", "snapshot", "timestamp"):
        p.add_argument(
            f"--{role}-key",
            required=True,
            type=Path,
            metavar="K",
            help=f"the online {role} key (.pub or .key)",
        )
    _expiry_options(p)
    _json(p)
    p.set_defaults(func=_init)

    p = rsub.add_parser(
        "add",
        help="stage .emp packages (content-addressed copies under DIR/targets)",
        description="Copy packages into DIR/targets/<model>/<version>/<sha256>.<file> and "
        "stage them with their model, version, channels and kind (full or residual); "
        "the next publish makes them visible. A residual needs its full package next to it.",
    )
    _dir(p)
    p.add_argument("packages", nargs="+", type=Path, metavar="PKG", help=".emp package(s)")
    p.add_argument(
        "--channel",
        action="append",
        default=None,
        metavar="NAME",
        help="channel offering the package (repeatable; default stable)",
    )
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="publisher .pub (or directory): verify each package in full before adding",
    )
    _json(p)
    p.set_defaults(func=_add)

    p = rsub.add_parser(
        "publish",
        help="sign new targets, snapshot and timestamp versions (online keys only)",
        description="Publish what is staged: new targets, snapshot and timestamp versions, "
        "written atomically (timestamp.json last). Root keys are not needed.",
    )
    _dir(p)
    _online_keys(p, required=True)
    _expiry_options(p, store=True)
    _json(p)
    p.set_defaults(func=_publish)

    p = rsub.add_parser(
        "refresh",
        help="re-sign the metadata that expires soon (run it from cron)",
        description="Re-sign every role whose metadata expires within --within (and the "
        "roles above it). Staged packages stay staged. A root about to expire needs "
        "--root-key; without it the command fails after refreshing the online roles. "
        "Cron: '0 * * * * edgeward repo refresh DIR --targets-key T --snapshot-key S "
        "--timestamp-key TS'.",
    )
    _dir(p)
    _online_keys(p, required=False)
    p.add_argument(
        "--within",
        default="12h",
        metavar="DURATION",
        help="re-sign what expires within this time (default 12h; e.g. 30m, 2d)",
    )
    p.add_argument(
        "--root-key",
        action="append",
        default=[],
        type=Path,
        metavar="K",
        help="root .key (repeatable) to re-sign a root that expires within --within",
    )
    _expiry_options(p, store=True)
    _json(p)
    p.set_defaults(func=_refresh)

    p = rsub.add_parser(
        "rotate",
        help="replace a role's key in a new, cross-signed root version",
        description="Write root v+1 with --old-key replaced by --new-key for --role, signed "
        "by a threshold of the current and of the new root keys, so devices that missed "
        "rotations walk the root chain. Rotating an online role re-signs it with --new-key "
        "(and the roles above it, with their keys).",
    )
    _dir(p)
    p.add_argument(
        "--role",
        required=True,
        choices=_EXPIRY_ROLES,
        help="the role whose key changes",
    )
    p.add_argument(
        "--old-key",
        required=True,
        type=Path,
        metavar="K",
        help="the key to remove (.pub or .key; a root .key also cross-signs)",
    )
    p.add_argument(
        "--new-key",
        required=True,
        type=Path,
        metavar="K",
        help="the key to add (.key: it signs the new root or re-signs its online role)",
    )
    p.add_argument(
        "--root-key",
        action="append",
        default=[],
        type=Path,
        metavar="K",
        help="current root .key (repeatable) to reach the root threshold",
    )
    _online_keys(p, required=False)
    _json(p)
    p.set_defaults(func=_rotate)

    p = rsub.add_parser(
        "status",
        help="versions, expiries, keys and targets by model, channel and kind",
        description="Show role versions and expiries, keys, staged and published targets.",
    )
    _dir(p)
    _json(p)
    p.set_defaults(func=_status)


def _dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="repository directory")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _online_keys(p: argparse.ArgumentParser, *, required: bool) -> None:
    for role in ("targets", "snapshot", "timestamp"):
        p.add_argument(
            f"--{role}-key",
            required=required,
            type=Path,
            metavar="K",
            help=f"the online {role} .key"
            + ("" if required else " (needed when the command re-signs it)"),
        )


def _expiry_options(p: argparse.ArgumentParser, *, store: bool = False) -> None:
    for role in _EXPIRY_ROLES:
        what = "change and remember" if store else "default " + _DEFAULTS[role]
        p.add_argument(
            f"--{role}-expiry",
            default=None,
            metavar="DURATION",
            help=f"lifetime of {role} metadata, e.g. 12h, 7d, 2w ({what})",
        )


def _expiries(args: argparse.Namespace) -> dict[str, Any]:
    from agent.repository.publisher import parse_duration

    out = {}
    for role in _EXPIRY_ROLES:
        value = getattr(args, f"{role}_expiry", None)
        if value is not None:
            out[role] = parse_duration(value)
    return out


def _signers(args: argparse.Namespace) -> dict[str, Any]:
    from agent.repository.publisher import load_signer

    out: dict[str, Any] = {}
    for role in ("targets", "snapshot", "timestamp"):
        path = getattr(args, f"{role}_key", None)
        out[role] = load_signer(path) if path is not None else None
    return out


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> int:
    print(json.dumps(doc, sort_keys=True) if args.json else text)
    return 0


def _versions(versions: dict[str, int]) -> str:
    return ", ".join(f"{r} v{v}" for r, v in versions.items()) or "nothing"


def _init(args: argparse.Namespace) -> int:
    from agent.repository.publisher import Repository, load_signer, public_key

    repo = Repository.init(
        args.dir,
        root_signers=[load_signer(k) for k in args.root_key],
        root_threshold=args.root_threshold,
        online_keys={r: public_key(getattr(args, f"{r}_key")) for r in _EXPIRY_ROLES[1:]},
        expiry=_expiries(args),
    )
    doc = repo.status()
    roles = doc["roles"]
    text = (
        f"initialised {repo.path}: root v1, {roles['root']['threshold']} of "
        f"{len(roles['root']['keys'])} root key(s); next: edgeward repo add, then publish"
    )
    return _print(args, doc, text)


def _add(args: argparse.Namespace) -> int:
    from agent.keys import TrustStore
    from agent.repository.publisher import Repository

    trust = TrustStore.from_paths(args.trust) if args.trust else None
    added = Repository(args.dir).add(args.packages, args.channel or ["stable"], trust)
    from agent.repository.fields import target_path

    items = [{"path": target_path(f), **f.to_custom()["edgeward"]} for f in added]
    lines = [
        f"staged {d['model']} {d['version']} ({d['kind']}"
        + (f" from {d['base_version']}" if d["kind"] == "residual" else "")
        + f") for {', '.join(d['channels'])}: {d['path']}"
        for d in items
    ]
    if trust is None:
        lines.append("package signatures not checked (no --trust)")
    lines.append("run edgeward repo publish to make them visible")
    return _print(args, {"staged": items, "verified": trust is not None}, "\n".join(lines))


def _publish(args: argparse.Namespace) -> int:
    from agent.repository.publisher import Repository

    ch = Repository(args.dir).publish(_signers(args), expiry=_expiries(args))
    text = f"published {_versions(ch.versions)} with {len(ch.added)} new target(s)"
    return _print(args, ch.to_dict(), text)


def _refresh(args: argparse.Namespace) -> int:
    from agent.repository.publisher import Repository, load_signer, parse_duration

    ch = Repository(args.dir).refresh(
        _signers(args),
        within=parse_duration(args.within),
        root_signers=[load_signer(k) for k in args.root_key],
        expiry=_expiries(args),
    )
    return _print(args, ch.to_dict(), f"refreshed: {_versions(ch.versions)}")


def _rotate(args: argparse.Namespace) -> int:
    from agent.repository.publisher import Repository, load_signer, public_key

    root_signers = [load_signer(k) for k in args.root_key]
    if args.role == "root" and args.old_key.suffix != ".pub":
        root_signers.append(load_signer(args.old_key))  # the old root key cross-signs
    ch = Repository(args.dir).rotate(
        args.role,
        old_key=public_key(args.old_key),
        new_key=load_signer(args.new_key),
        root_signers=root_signers,
        signers=_signers(args),
    )
    return _print(args, ch.to_dict(), f"rotated the {args.role} key: {_versions(ch.versions)}")


def _status(args: argparse.Namespace) -> int:
    from agent.repository.publisher import Repository

    doc = Repository(args.dir).status()
    lines = [f"repository {doc['path']}" + ("" if doc["published"] else " (not published yet)")]
    for role, r in doc["roles"].items():
        when = "-" if r["version"] is None else f"v{r['version']}, expires {r['expires']}"
        if r["expires_in_s"] is not None and r["expires_in_s"] <= 0:
            when += " (EXPIRED)"
        keys = ", ".join(r["keys"])
        lines.append(f"  {role:<9} {when}; {r['threshold']} of [{keys}]")
    for model, chans in sorted(doc["models"].items()):
        for ch, kinds in sorted(chans.items()):
            lines.append(
                f"  {model} [{ch}]: full {', '.join(kinds['full']) or '-'}; "
                f"residual {', '.join(kinds['residual']) or '-'}"
            )
    if doc["staged"]:
        lines.append(f"  staged (not yet published): {', '.join(d['path'] for d in doc['staged'])}")
    return _print(args, doc, "\n".join(lines))
