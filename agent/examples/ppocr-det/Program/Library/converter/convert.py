"""Example package converter (GB/T 42382.2 §8.2.3 Library/converter).

Contract (docs/RUNTIME.md): ``convert --input PKG_DIR --output OUT_DIR --backend
onnxruntime|litert --device-info JSON``; read the package, write the converted entry
model to ``OUT_DIR/<entry_model>``, exit 0. Runs in an empty temp cwd with a minimal
environment and a timeout; the runtime validates the output against the original.

This one fixes the batch dimension of the PP-OCR detector to 1 (the run script always
sends one image), which lets ORT specialise shapes, and records what it did on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert")
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--backend", required=True, choices=["onnxruntime", "litert"])
    p.add_argument("--device-info", required=True)
    args = p.parse_args(argv)
    device = json.loads(args.device_info)
    if args.backend != "onnxruntime":
        print(f"this converter only targets onnxruntime, not {args.backend}", file=sys.stderr)
        return 2
    tech = json.loads((args.input / "Meta-info" / "technicalinfo.json").read_text())
    entry = tech.get("runtime_config", {}).get("entry_model")
    if not entry:
        entry = sorted(p.name for p in (args.input / "Model").iterdir() if p.is_file())[0]

    import onnx

    model = onnx.load(str(args.input / "Model" / entry))
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    del model.graph.value_info[:]
    args.output.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.output / entry))
    print(
        f"fixed batch=1 for {entry} on {device.get('machine')} "
        f"(onnxruntime {device.get('onnxruntime')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
