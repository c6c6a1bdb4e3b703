"""Device fingerprint: what a converted artefact depends on besides the model itself.

An ORT-optimised graph at level "all" uses layout and kernel choices specific to the CPU
and the ORT build; a TFLite delegate selection depends on the installed drivers. The
converter cache is keyed by this fingerprint plus the model's sha256, so a reboot reuses
the artefact while a new ORT version, another CPU or another provider list redoes it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from runtime.config import RuntimeConfig

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """Sorted CPU feature flags (x86 ``flags`` / Arm ``Features``) from /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return sorted(set(value.split()))
    return []


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "hardware", "cpu model"):
            return value.strip()
    return ""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: Path) -> str:
    """Digest of every regular file under ``root`` (names and contents)."""
    h = hashlib.sha256()
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                h.update(str(p.relative_to(root)).encode() + b"\0")
                h.update(file_sha256(p).encode() + b"\0")
    return h.hexdigest()


def device_info(config: RuntimeConfig | None = None) -> dict[str, Any]:
    """The device description handed to package converters (``--device-info``) and
    hashed into cache keys. JSON-able."""
    cfg = config or RuntimeConfig()
    try:
        import onnxruntime as ort

        ort_version = str(ort.__version__)
        available = list(ort.get_available_providers())
    except ImportError:  # pragma: no cover - onnxruntime is a hard dependency
        ort_version, available = "none", []
    from runtime.litert_backend import litert_version

    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "ort_available_providers": available,
        "ort_providers": list(cfg.onnx.providers),
        "litert": litert_version(),
        "litert_delegates": [d.path for d in cfg.litert.delegates],
    }


def digest(obj: Any) -> str:
    """sha256 over canonical JSON of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def device_fingerprint(config: RuntimeConfig | None = None) -> str:
    """Short stable id of this device's conversion-relevant properties."""
    return digest(device_info(config))[:16]
