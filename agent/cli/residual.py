"""Residual patch commands: ``diff``, ``patch``, ``digest`` (docs/RESIDUAL.md).

``diff`` makes a raw patch between two model files, ``patch`` applies one, ``digest``
prints the canonical weights digest both sides check. Packages carry the same patches
via ``pack --base`` / ``unpack --base``; these commands are for inspecting and testing
them by hand. Heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path
from typing import Any

from agent.cli.common import add_force, add_json, refuse_overwrite
from agent.errors import ResidualError


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add diff, patch and digest."""
    p = sub.add_parser(
        "diff",
        help="make a residual patch from BASE_MODEL to TARGET_MODEL",
        description="Encode TARGET_MODEL as a quantised residual patch on BASE_MODEL.",
    )
    p.add_argument("base", type=Path, metavar="BASE_MODEL", help="the model the device has")
    p.add_argument("target", type=Path, metavar="TARGET_MODEL", help="the model to send")
    p.add_argument(
        "-o", "--output", required=True, type=Path, metavar="PATCH", help="patch file to write"
    )
    add_force(p)
    p.add_argument("--bits", type=int, choices=(8, 4, 2, 1), default=8, help="Δ width tried first")
    p.add_argument("--group-size", type=int, choices=(128, 64), default=128, help="int4 group")
    p.add_argument(
        "--max-rel-err",
        type=float,
        default=None,
        metavar="X",
        help="widen a tensor (then send it whole) when ||B'-B||/||B|| exceeds X",
    )
    p.add_argument("--samples", type=Path, metavar="DIR", help="*.npz inputs for fidelity")
    add_json(p, "the digests and statistics")
    p.set_defaults(func=_diff)

    p = sub.add_parser(
        "patch",
        help="apply a residual patch to BASE_MODEL",
        description="Rebuild the target model from BASE_MODEL and a raw residual patch.",
    )
    p.add_argument("base", type=Path, metavar="BASE_MODEL", help="the model the patch is for")
    p.add_argument("patch", type=Path, metavar="PATCH", help="patch file from `edgeward diff`")
    p.add_argument(
        "-o", "--output", required=True, type=Path, metavar="OUT", help="model file to write"
    )
    add_force(p)
    p.add_argument("--expect-base", metavar="D", help="required base digest (sha256:…)")
    p.add_argument("--expect-target", metavar="D", help="required target digest (sha256:…)")
    p.add_argument(
        "--verify-base",
        action="store_true",
        help="hash the whole base first and refuse any difference (default: the base is "
        "checked through the output's digest, and hashed only when that fails)",
    )
    add_json(p, "the output and its digest")
    p.set_defaults(func=_patch)

    p = sub.add_parser(
        "digest",
        help="print a model's canonical weights digest",
        description="Print the sha256 digest residual patches name for a model.",
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="ONNX or TFLite model file")
    add_json(p, "the model and its digest")
    p.set_defaults(func=_digest)


def _diff(args: argparse.Namespace) -> int:
    from agent.residual import encode_patch

    out: Path = args.output
    refuse_overwrite(out, args.force)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "wb") as f:
            info = encode_patch(
                args.base,
                args.target,
                f,
                bits=args.bits,
                group_size=args.group_size,
                max_rel_err=args.max_rel_err,
                samples=args.samples,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    target_size = int(info.stats["target_bytes"])
    ratio = size / max(1, target_size)
    doc: dict[str, Any] = {
        "base_digest": info.base_digest,
        "target_digest": info.target_digest,
        "format": info.format,
        "patch": str(out),
        "patch_bytes": size,
        "target_bytes": target_size,
        "ratio": ratio,
        "stats": info.stats,
        "fidelity": info.fidelity,
    }
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    s = info.stats
    print(f"base    {info.base_digest}")
    print(f"target  {info.target_digest}  (B', what the device will produce)")
    print(f"patch   {out}  {size} bytes = {100 * ratio:.1f}% of {target_size} bytes")
    print(
        "tensors {t}: skip {skip}, full {full}, int-delta {idelta}, q8 {q8}, q4 {q4}, "
        "q2 {q2}, q1 {q1}; fallbacks {fallbacks}; max rel err {e:.3g}".format(
            t=s["tensors"], e=s["max_rel_err"], **{k: s[k] for k in s if k != "tensors"}
        )
    )
    if info.fidelity:
        print("fidelity " + ", ".join(f"{k} {v:.6g}" for k, v in info.fidelity.items()))
    return 0


def _patch(args: argparse.Namespace) -> int:
    from agent.residual import apply_patch

    refuse_overwrite(args.output, args.force)
    try:
        f = open(args.patch, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ResidualError(f"cannot read patch {args.patch}: {exc}", code="residual-io") from None
    with f:
        digest = apply_patch(
            args.base,
            f,
            args.output,
            expected_base_digest=args.expect_base,
            expected_target_digest=args.expect_target,
            verify_base=args.verify_base,
        )
    if args.json:
        print(json.dumps({"output": str(args.output), "target_digest": digest}))
    else:
        print(f"{args.output}  {digest}")
    return 0


def _digest(args: argparse.Namespace) -> int:
    from agent.residual import weights_digest

    digest = weights_digest(args.model)
    if args.json:
        print(json.dumps({"model": str(args.model), "digest": digest}))
    else:
        print(digest)
    return 0
