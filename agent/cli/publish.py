"""Publisher commands: ``pack``, ``inspect``, ``verify``, ``unpack`` (DESIGN §6).

Each command prints a short human summary (or ``--json`` for scripts) on stdout and,
on failure, raises an ``agent.errors`` exception that ``edgeward`` prints as one line
on stderr with a non-zero exit code. Long work shows a progress bar on stderr whenever
stderr is a terminal; outputs are replaced only with ``--force`` (``agent.cli.common``).
Heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import Progress, add_force, add_json, refuse_overwrite, replace_dir
from agent.cli.residual import add_patch_options, patch_kwargs
from agent.textsafe import printable


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add pack, inspect, verify and unpack."""
    p = sub.add_parser(
        "pack",
        help="build a signed (and encrypted) .emp package",
        description="Build a GB/T 42382.2 encapsulated model package (.emp).",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        type=Path,
        metavar="FILE",
        help="model file (repeatable; several models share one container)",
    )
    p.add_argument("--name", required=True, help="package name ([A-Za-z0-9._-])")
    p.add_argument("--version", required=True, type=int, help="monotonic integer version")
    p.add_argument("--label", default="", help="human version label, e.g. 2.1.0-rc1")
    p.add_argument(
        "--signing-key",
        action="append",
        required=True,
        type=Path,
        metavar="K",
        help="Ed25519 .key (repeatable)",
    )
    p.add_argument(
        "--encrypt-for",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="device X25519 .pub file or directory of them (repeatable)",
    )
    p.add_argument(
        "--psk",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="fleet pre-shared key NAME.psk (repeatable)",
    )
    p.add_argument(
        "--no-encrypt",
        action="store_true",
        help="store models unencrypted (the default without recipients)",
    )
    p.add_argument(
        "--alg",
        default="aes-256-gcm",
        choices=("aes-256-gcm", "sm4-gcm", "chacha20-poly1305"),
        help="AEAD for the model data (default aes-256-gcm; chacha20-poly1305 for ARM "
        "cores without AES instructions)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="plaintext bytes per AEAD chunk (default 1 MiB)",
    )
    p.add_argument("--zstd-level", type=int, default=3, help="1..19 (default 3); 0 = none")
    p.add_argument(
        "--meta",
        type=Path,
        metavar="DIR",
        help="Meta-info directory (managementinfo.json, technicalinfo.json, ...); "
        "generated from the model when missing",
    )
    p.add_argument("--program", type=Path, metavar="DIR", help="Program directory")
    p.add_argument(
        "--samples",
        type=Path,
        metavar="DIR",
        help="self-test vectors *.npz (keys input:<name>, output:<name>)",
    )
    p.add_argument(
        "--base",
        type=Path,
        metavar="BASE",
        help="residual update against BASE (.emp, unpacked dir or model file)",
    )
    add_patch_options(p)
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="publisher keys to verify a BASE .emp (default: the signing keys)",
    )
    p.add_argument(
        "--device-key",
        action="append",
        default=[],
        type=Path,
        metavar="K",
        help="device key(s) to decrypt a BASE .emp",
    )
    p.add_argument(
        "-o", "--output", required=True, type=Path, metavar="OUT.emp", help="package to write"
    )
    add_force(p)
    add_json(p, "the manifest")
    p.set_defaults(func=_pack)

    p = sub.add_parser("inspect", help="show a package's manifest (no keys needed)")
    p.add_argument("package", type=Path, metavar="PKG", help="the .emp package")
    add_json(p, "the manifest summary")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "verify",
        help="verify signature, sizes and digests of a package, or (--installed) of "
        "every installed version the daemon keeps",
    )
    p.add_argument("package", type=Path, metavar="PKG", nargs="?", help="the .emp package")
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="trusted publisher .pub file or directory (repeatable; needed for PKG)",
    )
    p.add_argument(
        "--installed",
        action="store_true",
        help="ask the daemon to check current and previous of every model against "
        "their signed manifests (a modified current is rolled back or not served)",
    )
    p.add_argument(
        "--control-socket", metavar="PATH", default=None, help="control socket (--installed)"
    )
    add_json(p, "the verification result")
    p.set_defaults(func=_verify)

    p = sub.add_parser("unpack", help="verify, decrypt and unpack a package into a directory")
    p.add_argument("package", type=Path, metavar="PKG", help="the .emp package")
    p.add_argument(
        "--trust",
        action="append",
        required=True,
        type=Path,
        metavar="PUB",
        help="trusted publisher .pub file or directory (repeatable)",
    )
    p.add_argument(
        "--device-key",
        action="append",
        default=[],
        type=Path,
        metavar="K",
        help="device .key / fleet .psk file or directory (repeatable)",
    )
    p.add_argument(
        "--envelope",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="detached key envelope adding recipients",
    )
    p.add_argument("--base", type=Path, metavar="DIR", help="unpacked base for residual updates")
    p.add_argument(
        "--verify-decoded",
        action="store_true",
        help="also hash each decoded model against models[].sha256 (the container's signed "
        "hash, AEAD tags and zstd checksums already pin it)",
    )
    p.add_argument(
        "-o", "--output", required=True, type=Path, metavar="DIR", help="directory to create"
    )
    add_force(p)
    add_json(p, "what was unpacked")
    p.set_defaults(func=_unpack)

    p = sub.add_parser("envelope", help="detached key envelopes (add recipients later)")
    esub = p.add_subparsers(dest="envelope_command", required=True, metavar="ACTION")
    e = esub.add_parser(
        "add",
        help="give more devices access to an encrypted package without re-signing it",
    )
    e.add_argument("package", type=Path, metavar="PKG", help="the encrypted .emp package")
    e.add_argument(
        "--signing-key",
        required=True,
        type=Path,
        metavar="K",
        help="the publisher key that signed the package (signs the envelope)",
    )
    e.add_argument(
        "--key",
        action="append",
        required=True,
        type=Path,
        metavar="K",
        help="a device .key / fleet .psk the package is already encrypted for",
    )
    e.add_argument(
        "--encrypt-for",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="device public key (or directory of them) to add as a recipient (repeatable)",
    )
    e.add_argument(
        "--psk",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="fleet pre-shared key file to add as a recipient (repeatable)",
    )
    e.add_argument(
        "-o", "--output", required=True, type=Path, metavar="FILE", help="envelope file to write"
    )
    add_force(e)
    e.set_defaults(func=_envelope_add)


def _patch_spec(args: argparse.Namespace) -> dict[str, Any]:
    """PackSpec fields for ``--base`` updates (same names as encode_patch's options)."""
    return patch_kwargs(args)


def _pubs(paths: list[Path]) -> list[Any]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from agent.errors import KeyFileError
    from agent.keys import load_public

    out: list[Any] = []
    for p in paths:
        files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
        for f in files:
            pub = load_public(f)
            if not isinstance(pub, X25519PublicKey):
                raise KeyFileError(f"{f} is not a device (X25519) public key", code="key-type")
            out.append(pub)
    return out


def _pack(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.errors import KeyFileError, PackageError
    from agent.keys import Keyring, TrustStore, load_private, load_psk
    from agent.package import PackSpec, pack

    refuse_overwrite(args.output, args.force)
    keys = []
    for k in args.signing_key:
        priv = load_private(k)
        if not isinstance(priv, Ed25519PrivateKey):
            raise KeyFileError(f"{k} is not an Ed25519 signing key", code="key-type")
        keys.append(priv)
    if args.no_encrypt and (args.encrypt_for or args.psk):
        raise PackageError("--no-encrypt conflicts with --encrypt-for/--psk", code="usage")
    spec = PackSpec(
        models=list(args.model),
        name=args.name,
        version=args.version,
        label=args.label,
        signing_keys=keys,
        meta_dir=args.meta,
        program_dir=args.program,
        samples_dir=args.samples,
        encrypt_for=_pubs(args.encrypt_for),
        psks=[load_psk(p) for p in args.psk],
        alg=args.alg,
        chunk_size=args.chunk_size,
        zstd_level=args.zstd_level or None,
        base=args.base,
        **_patch_spec(args),
        base_trust=TrustStore.from_paths(args.trust) if args.trust else None,
        base_keyring=Keyring.from_paths(args.device_key) if args.device_key else None,
    )
    total = sum(p.stat().st_size for p in args.model if p.is_file())
    progress = Progress("packing", total)
    spec.progress = progress
    try:
        manifest = pack(spec, args.output)
    except BaseException:
        progress.close(done=False)
        raise
    progress.close()
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    else:
        enc = manifest.encryption
        how = (
            f"encrypted {enc.alg} for {len(enc.recipients)} recipient(s)" if enc else "unencrypted"
        )
        print(
            f"packed {manifest.name} version {manifest.version} -> {args.output} "
            f"({args.output.stat().st_size:,} bytes, {len(manifest.models)} model(s), {how})"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from agent.package import inspect

    doc = inspect(args.package)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0

    def show(line: str) -> None:  # unverified, chosen by whoever made the file
        print(printable(line, limit=2000))

    show(
        f"package   {doc['name']} version {doc['version']}"
        + (f" ({doc['label']})" if doc.get("label") else "")
    )
    show(f"created   {doc.get('created', '')}   size {doc['package_size']:,} bytes")
    show(f"signed by {', '.join(doc['signature_key_ids']) or 'nobody'} (not verified)")
    enc = doc.get("encryption")
    if enc:
        show(
            f"encrypted {enc['alg']}, {enc['chunk_size']} B chunks, for "
            f"{', '.join(str(r) for r in enc['recipients'])}"
        )
    else:
        show("encrypted no")
    if doc.get("base"):
        show(f"base      {doc['base']['name']} version {doc['base']['version']}")
    for m in doc["models"]:
        show(
            f"model {m['id']}   {m['name']} [{m['format']}] {'+'.join(m['encoding']) or 'plain'}"
            f" {m['size']:,} bytes"
        )
    for f in doc["files"]:
        show(f"file      {f['path']} {f['size']:,} bytes")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from agent.errors import PackageError
    from agent.keys import TrustStore
    from agent.package import verify

    if args.installed:
        return _verify_installed(args)
    if args.package is None or not args.trust:
        raise PackageError("verify needs PKG and --trust (or --installed)", code="usage")

    manifest = verify(args.package, TrustStore.from_paths(args.trust))
    if args.json:
        print(
            json.dumps(
                {
                    "verified": True,
                    "name": manifest.name,
                    "version": manifest.version,
                    "signers": list(manifest.signers),
                }
            )
        )
    else:
        print(
            printable(
                f"OK: {manifest.name} version {manifest.version}, signature and "
                f"{len(manifest.files)} file digests verified"
            )
        )
    return 0


def _verify_installed(args: argparse.Namespace) -> int:
    from agent.cli.daemon import call_control

    data = call_control(args, "/verify", "POST")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for v in data.get("versions", []):
            what = f"{v['name']} version {v['version']}"
            if not v.get("checked", True):
                print(f"{what}: not installed from a package, nothing to check against")
            elif v["ok"]:
                signer = f", signed by {v['signed_by']}" if v.get("signed_by") else ""
                print(f"OK: {what}: {v['files']} files, {v['bytes']:,} bytes{signer}")
            else:
                for problem in v["problems"]:
                    print(printable(f"MODIFIED: {what}: {problem}"), file=sys.stderr)
        for action in data.get("actions", []):
            print(printable(action), file=sys.stderr)
    return 0 if data.get("ok", False) else 1


def _unpack(args: argparse.Namespace) -> int:
    from agent.keys import Keyring, TrustStore
    from agent.package import unpack

    out: Path = args.output
    refuse_overwrite(out, args.force)
    # With --force an existing output is replaced only once the new one is complete.
    target = out if not os.path.lexists(out) else out.with_name(f".{out.name}.new-{os.getpid()}")
    keyring = Keyring.from_paths(args.device_key) if args.device_key else None
    progress = Progress("unpacking", args.package.stat().st_size if args.package.is_file() else 0)
    try:
        manifest = unpack(
            args.package,
            target,
            trust=TrustStore.from_paths(args.trust),
            keyring=keyring,
            base_dir=args.base,
            envelopes=args.envelope,
            progress=progress,
            verify_decoded=args.verify_decoded,
        )
    except BaseException:
        progress.close(done=False)
        raise
    progress.close()
    if target != out:
        replace_dir(target, out)
    if args.json:
        print(
            json.dumps(
                {
                    "name": manifest.name,
                    "version": manifest.version,
                    "output": str(args.output),
                    "models": [m.name for m in manifest.models],
                }
            )
        )
    else:
        print(f"unpacked {manifest.name} version {manifest.version} into {args.output}")
    return 0


def _envelope_add(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.errors import KeyFileError
    from agent.keys import Keyring, load_private, load_psk
    from agent.package import make_envelope

    sk = load_private(args.signing_key)
    if not isinstance(sk, Ed25519PrivateKey):
        raise KeyFileError(f"{args.signing_key} is not an Ed25519 signing key", code="key-type")
    data = make_envelope(
        args.package,
        signing_key=sk,
        keyring=Keyring.from_paths(args.key),
        encrypt_for=_pubs(args.encrypt_for),
        psks=[load_psk(p) for p in args.psk],
    )
    refuse_overwrite(args.output, args.force)
    args.output.write_bytes(data)
    print(f"wrote key envelope {args.output}")
    return 0
