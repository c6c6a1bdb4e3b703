"""Meta-info (GB/T 42382.2 §8.2.4, tables 62–67): schemas, validation, generation.

``managementinfo.json`` (table 62) and ``technicalinfo.json`` (tables 63–67) are
validated against the JSON Schemas shipped in ``agent/schemas/``; the first error is
reported as one line naming the file and the field path, e.g.
``Meta-info/technicalinfo.json: runtime_config.backend: 'foo' is not one of
['onnxruntime', 'litert']``. ``generate`` builds sensible Meta-info from the model
files themselves (inputs and outputs read with onnx / the TFLite interpreter) for
publishers who do not write their own.
"""

from __future__ import annotations

import functools
import json
import logging
import zipfile
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from agent import boundedjson
from agent.errors import MetaInfoError

logger = logging.getLogger(__name__)

MANAGEMENT = "managementinfo.json"
TECHNICAL = "technicalinfo.json"
SCHEMAS = {MANAGEMENT: "managementinfo.schema.json", TECHNICAL: "technicalinfo.schema.json"}
MAX_META_BYTES = 16 << 20  # one Meta-info JSON file, bytes
MAX_SAMPLE_BYTES = 256 << 20  # one samples/*.npz, bytes
SAMPLE_PREFIXES = ("input:", "output:")


@functools.cache
def schema(file_name: str) -> dict[str, Any]:
    """The JSON Schema for ``managementinfo.json`` or ``technicalinfo.json``."""
    text = resources.files("agent").joinpath("schemas", SCHEMAS[file_name]).read_text("utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validate(file_name: str, doc: Any) -> None:
    """Validate one Meta-info document; raises ``MetaInfoError(meta-invalid)``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema(file_name))
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = _path(error.absolute_path)
        field = f"{where}: " if where else ""
        raise MetaInfoError(f"Meta-info/{file_name}: {field}{error.message}", code="meta-invalid")


def parse(file_name: str, data: bytes) -> dict[str, Any]:
    """Parse and validate Meta-info JSON bytes."""
    if len(data) > MAX_META_BYTES:
        raise MetaInfoError(
            f"Meta-info/{file_name} is larger than {MAX_META_BYTES} bytes", code="meta-too-large"
        )
    doc = boundedjson.loads(
        data,
        what=f"Meta-info/{file_name}",
        error=MetaInfoError,
        code="meta-json",
        max_bytes=MAX_META_BYTES,
    )
    validate(file_name, doc)
    if not isinstance(doc, dict):  # the schemas require an object; keeps mypy informed
        raise MetaInfoError(f"Meta-info/{file_name} must be an object", code="meta-invalid")
    return doc


def check_entry_model(tech: dict[str, Any], model_names: list[str]) -> None:
    """``runtime_config.entry_model`` must name one of the package's models."""
    entry = (tech.get("runtime_config") or {}).get("entry_model")
    if entry is not None and entry not in model_names:
        raise MetaInfoError(
            f"Meta-info/{TECHNICAL}: runtime_config.entry_model: {entry!r} is not one of "
            f"{model_names}",
            code="meta-invalid",
        )


# --- generation -----------------------------------------------------------------------


def _onnx_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def desc(vi: Any) -> dict[str, Any]:
        tt = vi.type.tensor_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        except (KeyError, ValueError, TypeError):
            dtype = "unknown"
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return {"name": vi.name, "data_type": dtype, "shape": shape}

    ins = [desc(v) for v in model.graph.input if v.name not in inits]
    outs = [desc(v) for v in model.graph.output]
    return ins, outs


def _tflite_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - vendor images ship only tflite_runtime
        from tflite_runtime.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))

    def desc(d: dict[str, Any]) -> dict[str, Any]:
        sig = d.get("shape_signature")
        shape = sig if sig is not None and len(sig) else d["shape"]
        return {
            "name": str(d["name"]),
            "data_type": d["dtype"].__name__,
            "shape": [int(x) for x in shape],
        }

    return (
        [desc(d) for d in interp.get_input_details()],
        [desc(d) for d in interp.get_output_details()],
    )


def describe_model(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of a model file as Meta-info tensor descriptions."""
    try:
        ins, outs = _onnx_io(path) if fmt == "onnx" else _tflite_io(path)
    except MetaInfoError:
        raise
    except Exception as exc:  # any parser failure means "cannot describe"
        raise MetaInfoError(
            f"cannot read inputs/outputs of {path.name} as {fmt}: {exc}", code="meta-generate"
        ) from None
    for d in ins:
        if len(d.get("shape", [])) == 4:
            d["modality"] = "image"
    return ins, outs


def generate(
    name: str, version: int, label: str, models: list[tuple[str, Path, str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Meta-info for models that come without: ``(managementinfo, technicalinfo)``.

    ``models`` are ``(package model name, file, format)``; the first runnable one is the
    entry model. Fields the model cannot tell (author, license, metrics) are left out
    rather than invented.
    """
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    mgmt: dict[str, Any] = {"name": name, "version": version, "created": now}
    if label:
        mgmt["label"] = label
    runnable = [(n, p, f) for n, p, f in models if f in ("onnx", "tflite")]
    rc: dict[str, Any] = {}
    if runnable:
        n, p, f = runnable[0]
        ins, outs = describe_model(p, f)
        rc = {
            "backend": "onnxruntime" if f == "onnx" else "litert",
            "entry_model": n,
            "inputs": ins,
            "outputs": outs,
        }
    tech: dict[str, Any] = {
        "runtime_config": rc,
        "converter_config": {"batch": "dynamic", "weight_compression": "none"},
        "software_environment": "edgeward: onnxruntime>=1.18 | ai-edge-litert>=1.0",
    }
    validate(MANAGEMENT, mgmt)
    validate(TECHNICAL, tech)
    return mgmt, tech


# --- samples --------------------------------------------------------------------------


def check_sample(path: Path) -> None:
    """A self-test vector: an ``.npz`` (no pickles) with ``input:``/``output:`` keys."""
    import numpy as np

    if path.suffix != ".npz":
        raise MetaInfoError(
            f"sample {path.name}: samples must be .npz files", code="sample-invalid"
        )
    if path.stat().st_size > MAX_SAMPLE_BYTES:
        raise MetaInfoError(
            f"sample {path.name} is larger than {MAX_SAMPLE_BYTES} bytes", code="sample-invalid"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            for k in keys:
                npz[k]  # decodes each array: refuses object arrays (pickles)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise MetaInfoError(
            f"sample {path.name} is not a readable .npz: {exc}", code="sample-invalid"
        ) from None
    bad = [k for k in keys if not k.startswith(SAMPLE_PREFIXES)]
    if bad or not any(k.startswith("input:") for k in keys):
        raise MetaInfoError(
            f"sample {path.name}: keys must be 'input:<name>' / 'output:<name>' with at least "
            f"one input (found {keys[:8]})",
            code="sample-invalid",
        )


__all__ = [
    "MANAGEMENT",
    "TECHNICAL",
    "check_entry_model",
    "check_sample",
    "describe_model",
    "generate",
    "parse",
    "schema",
    "validate",
]
