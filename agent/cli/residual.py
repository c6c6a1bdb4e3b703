"""Residual patch commands: ``diff``, ``patch``, ``digest`` (docs/RESIDUAL.md).

``diff`` makes a raw patch between two model files, ``patch`` applies one, ``digest``
prints the canonical weights digest both sides check. Packages carry the same patches
via ``pack --base`` / ``unpack --base``; these commands are for inspecting and testing
them by hand. Heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli.common import add_force, add_json, refuse_overwrite
from agent.durable import atomic_file
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
    add_patch_options(p)
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


def add_patch_options(p: argparse.ArgumentParser) -> None:
    """Patch-making options shared by ``diff`` and ``pack --base``."""
    p.add_argument(
        "--bits",
        type=int,
        choices=range(1, 9),
        default=8,
        metavar="{1..8}",
        help="Δ width tried first (default 8; 1 and 2 need --allow-lossy or a target)",
    )
    p.add_argument("--group-size", type=int, choices=(128, 64), default=128, help="3/4-bit group")
    p.add_argument(
        "--max-rel-err",
        type=float,
        default=None,
        metavar="X",
        help="widen a tensor (then send it whole) when ||B'-B||/||B|| exceeds X",
    )
    p.add_argument("--allow-lossy", action="store_true", help="permit --bits 1 or 2")
    g = p.add_argument_group(
        "fidelity target (needs --samples): the smallest patch whose B' meets every bound"
    )
    g.add_argument("--target-cosine", type=float, metavar="C", help="min per-sample cosine")
    g.add_argument("--target-top1", type=float, metavar="A", help="min top-1 agreement")
    g.add_argument("--target-max-abs", type=float, metavar="E", help="max abs output diff")
    g.add_argument(
        "--output-kind",
        choices=("classification", "embedding", "dense"),
        help="which metrics the report uses (default: from Meta-info, else auto)",
    )
    g.add_argument(
        "--max-patch-ratio",
        type=float,
        default=1.0,
        metavar="R",
        help="refuse when meeting the target needs a patch >= R x the model (default 1)",
    )


def patch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """encode_patch keyword arguments from :func:`add_patch_options`' options."""
    kw: dict[str, Any] = {
        "bits": args.bits,
        "group_size": args.group_size,
        "max_rel_err": args.max_rel_err,
        "allow_lossy": args.allow_lossy,
        "output_kind": args.output_kind,
        "max_patch_ratio": args.max_patch_ratio,
    }
    if (args.target_cosine, args.target_top1, args.target_max_abs) != (None, None, None):
        from agent.residual.search import Target

        kw["fidelity_target"] = Target(
            cosine=args.target_cosine, top1=args.target_top1, max_abs=args.target_max_abs
        )
    return kw


def _diff(args: argparse.Namespace) -> int:
    from agent.residual import encode_patch

    out: Path = args.output
    refuse_overwrite(out, args.force)
    with atomic_file(out, prefix=f".{out.name}.", suffix=".part") as f:
        info = encode_patch(args.base, args.target, f, samples=args.samples, **patch_kwargs(args))
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
    widths = ", ".join(f"q{b} {s[f'q{b}']}" for b in range(8, 0, -1) if s[f"q{b}"])
    print(
        f"tensors {s['tensors']}: skip {s['skip']}, full {s['full']}, int-delta {s['idelta']}"
        f"{', ' + widths if widths else ''}; one-byte codes {s['unpacked_codes']}; "
        f"fallbacks {s['fallbacks']}; max rel err {s['max_rel_err']:.3g}"
    )
    if "search" in s:
        r = s["search"]
        print(
            f"search  {r['tensors_searched']} tensors: {r['allocation']}; "
            f"{r['sensitivity_runs']} + {r['verify_runs']} runs in {r['seconds']:.1f} s"
        )
    if info.fidelity:
        print(
            "fidelity "
            + ", ".join(
                f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in info.fidelity.items()
                if k != "allocation"
            )
        )
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
