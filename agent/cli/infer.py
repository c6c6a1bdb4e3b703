"""``edgeward infer``: call a served model through the inference socket.

    edgeward infer ppocr-det --input x=img.npy [--version V] [--socket PATH]
                   [--json] [--output-dir DIR]

Inputs are ``.npy`` files (``numpy.save``; never pickled objects). Outputs are printed
as name, shape, dtype and a short preview, or as one JSON document with ``--json``
(full data), and saved as ``DIR/<output>.npy`` with ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.errors import CLIInputError, EdgewardError

DEFAULT_SOCKET = "/run/edgeward/infer.sock"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``infer`` to the top-level parser."""
    p = sub.add_parser(
        "infer",
        help="run a served model on .npy inputs via the inference socket",
        description="Run a model served by the local daemon (KServe v2 over a Unix socket).",
    )
    p.add_argument("model", help="model name")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="an input tensor (repeat for several inputs)",
    )
    p.add_argument("--version", help="a specific served version (default: whatever is served)")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"inference socket ({DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="print the outputs as JSON (full data)")
    p.add_argument("--output-dir", type=Path, help="save every output as DIR/<name>.npy")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (120)")
    p.set_defaults(func=_run)


def _load_inputs(specs: list[str]) -> dict[str, Any]:
    import numpy as np

    if not specs:
        raise CLIInputError("give at least one --input NAME=FILE.npy")
    inputs: dict[str, Any] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise CLIInputError(f"--input {spec!r}: expected NAME=FILE.npy")
        if name in inputs:
            raise CLIInputError(f"--input {name!r} given twice")
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except FileNotFoundError:
            raise CLIInputError(f"--input {name}: no such file {file}") from None
        except (ValueError, OSError) as exc:
            raise CLIInputError(f"--input {name}: {file} is not a .npy array: {exc}") from None
    return inputs


def _preview(arr: Any) -> str:
    import numpy as np

    with np.printoptions(threshold=8, edgeitems=3, precision=5, linewidth=100):
        text = np.array2string(arr.reshape(-1) if arr.ndim > 1 else arr, separator=", ")
    return text.replace("\n", " ")


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from agent.client import Client

    inputs = _load_inputs(args.input)
    client = Client(args.socket, timeout=args.timeout)
    try:
        doc, outputs = client.infer_full(args.model, inputs, version=args.version)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise EdgewardError(
            f"cannot reach the inference socket {args.socket}: {exc.strerror or exc}; "
            "is the daemon (edgeward agent) running?",
            code="no-daemon",
        ) from None
    except PermissionError:
        raise EdgewardError(
            f"no permission to use {args.socket}; join the socket's group (edgeward)",
            code="socket-permission",
        ) from None
    finally:
        client.close()
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        for name, arr in outputs.items():
            safe = name.replace("/", "_").replace("\\", "_") or "output"
            np.save(args.output_dir / f"{safe}.npy", arr, allow_pickle=False)
    if args.json:
        out = {
            "model_name": doc.get("model_name"),
            "model_version": doc.get("model_version"),
            "outputs": {
                name: {
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "data": [
                        v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                        for v in arr.reshape(-1).tolist()
                    ],
                }
                for name, arr in outputs.items()
            },
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{doc.get('model_name')} version {doc.get('model_version')}")
    for name, arr in outputs.items():
        print(f"  {name}: shape {list(arr.shape)} {arr.dtype}  {_preview(arr)}")
    if args.output_dir is not None:
        print(f"saved {len(outputs)} outputs to {args.output_dir}")
    return 0
