"""Run script of the example package: PP-OCR text detection with real pre/post-processing.

Interface (docs/RUNTIME.md): ``Model(model_dir, backend, config)``, ``predict``,
``metadata``. Input ``image``: either the bytes of an encoded image as a 1-D uint8 array
(PNG always; JPEG and others when Pillow is installed) or a raw ``HxWx3`` uint8 RGB
array. Output ``boxes`` ``[N, 4]`` int32 (x0, y0, x1, y1 in input pixels, inclusive) and
``scores`` ``[N]`` float32 (mean text probability inside each box), top to bottom.

Pipeline: decode → resize so the longer side is at most ``limit_side_len`` and both sides
are multiples of 32 → RGB→BGR (PaddleOCR trains on OpenCV's BGR) → ``(x/255 - mean) / std``
→ NCHW → DB detector → probability map > ``thresh`` → connected components → boxes whose
mean probability ≥ ``box_thresh``, expanded by the DB "unclip" distance → input pixels.
Tuning values come from technicalinfo ``runtime_config.postprocessing`` and
``converter_config.preprocessing``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ppocr_png import decode_png  # helper module next to this script

from agent.errors import InvalidInputError
from runtime.preprocess import normalize, resize

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Model:
    thread_safe = True  # no state changes in predict; the ORT backend is thread-safe

    def __init__(self, model_dir: Path, backend: Any, config: dict[str, Any]) -> None:
        self.backend = backend
        rc = config.get("runtime_config", {}) or {}
        post = rc.get("postprocessing", {}) or {}
        pre = (config.get("converter_config", {}) or {}).get("preprocessing", {}) or {}
        self.limit_side_len = int(post.get("limit_side_len", 960))
        self.thresh = float(post.get("thresh", 0.3))
        self.box_thresh = float(post.get("box_thresh", 0.5))
        self.unclip_ratio = float(post.get("unclip_ratio", 1.5))
        self.max_candidates = int(post.get("max_candidates", 1000))
        self.min_size = int(post.get("min_size", 3))
        self.mean = tuple(pre.get("mean", MEAN))
        self.std = tuple(pre.get("std", STD))
        self.scale = float(pre.get("scale", 1.0 / 255.0))
        self.input_name = backend.inputs[0].name
        self.output_name = backend.outputs[0].name

    def metadata(self) -> dict[str, Any]:
        return {
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1]}],
            "outputs": [
                {"name": "boxes", "datatype": "INT32", "shape": [-1, 4]},
                {"name": "scores", "datatype": "FP32", "shape": [-1]},
            ],
        }

    # --- pipeline ---------------------------------------------------------------------

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = decode(inputs["image"])
        h, w = image.shape[:2]
        rh, rw = self.target_size(h, w)
        x = normalize(resize(image, rh, rw)[..., ::-1], self.mean, self.std, self.scale)
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
        prob = self.backend.predict({self.input_name: x})[self.output_name][0, 0]
        boxes, scores = self.boxes(prob, h, w)
        return {"boxes": boxes, "scores": scores}

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        ratio = min(1.0, self.limit_side_len / max(h, w))
        rh = max(32, round(h * ratio / 32) * 32)
        rw = max(32, round(w * ratio / 32) * 32)
        return rh, rw

    def boxes(self, prob: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        mask = prob > self.thresh
        labels, n = label_components(mask)
        if n == 0:
            return np.zeros((0, 4), np.int32), np.zeros((0,), np.float32)
        ph, pw = prob.shape
        flat = labels.ravel()
        idx = np.flatnonzero(flat)
        lab = flat[idx] - 1
        ys, xs = np.divmod(idx, pw)
        count = np.bincount(lab, minlength=n)
        score = np.bincount(lab, weights=prob.ravel()[idx], minlength=n) / np.maximum(count, 1)
        y0 = np.full(n, ph, np.int64)
        x0 = np.full(n, pw, np.int64)
        y1 = np.zeros(n, np.int64)
        x1 = np.zeros(n, np.int64)
        np.minimum.at(y0, lab, ys)
        np.minimum.at(x0, lab, xs)
        np.maximum.at(y1, lab, ys)
        np.maximum.at(x1, lab, xs)
        bw = (x1 - x0 + 1).astype(np.float64)
        bh = (y1 - y0 + 1).astype(np.float64)
        keep = (score >= self.box_thresh) & (np.minimum(bw, bh) >= self.min_size)
        order = np.argsort(-score[keep], kind="stable")[: self.max_candidates]
        sel = np.flatnonzero(keep)[order]
        # DB shrinks text regions when training; "unclip" grows them back by
        # area * ratio / perimeter.
        d = bw[sel] * bh[sel] * self.unclip_ratio / (2 * (bw[sel] + bh[sel]))
        sx, sy = w / pw, h / ph
        bx0 = np.clip(np.floor((x0[sel] - d) * sx), 0, w - 1)
        by0 = np.clip(np.floor((y0[sel] - d) * sy), 0, h - 1)
        bx1 = np.clip(np.ceil((x1[sel] + 1 + d) * sx) - 1, 0, w - 1)
        by1 = np.clip(np.ceil((y1[sel] + 1 + d) * sy) - 1, 0, h - 1)
        boxes = np.stack([bx0, by0, bx1, by1], axis=1).astype(np.int32)
        scores = score[sel].astype(np.float32)
        reading = np.lexsort((boxes[:, 0], boxes[:, 1]))
        return boxes[reading], scores[reading]


def decode(value: np.ndarray) -> np.ndarray:
    """Encoded bytes (1-D uint8) or raw HxWx3 uint8 → HxWx3 uint8 RGB."""
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"input 'image' must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 4:
        return arr[..., :3]
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 1:
        raise InvalidInputError(
            f"input 'image' must be encoded bytes [n] or an HxWx3 array, got {list(arr.shape)}"
        )
    data = arr.tobytes()
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        import io

        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise InvalidInputError(f"input 'image' cannot be decoded: {exc}") from None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        try:
            return decode_png(data)
        except ValueError as exc:
            raise InvalidInputError(f"input 'image' is not a readable PNG: {exc}") from None
    raise InvalidInputError(
        "input 'image': only PNG can be decoded on this device (Pillow is not installed); "
        "send PNG bytes or a raw HxWx3 uint8 array"
    )


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean map (labels 1..n; 0 = background).

    Works on horizontal runs: runs are found per row with numpy, runs that overlap a run
    in the row above are merged with union-find, so the Python loop is over runs (a few
    per text line), not pixels.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    rows_s, cols_s = np.nonzero(diff == 1)
    _, cols_e = np.nonzero(diff == -1)  # same order: row-major, one end per start
    n = len(rows_s)
    labels = np.zeros((h, w), np.int32)
    if n == 0:
        return labels, 0
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(rows_s, np.arange(h + 1))
    for r in range(1, h):
        a0, a1 = row_start[r - 1], row_start[r]
        b0, b1 = row_start[r], row_start[r + 1]
        i, j = a0, b0
        while i < a1 and j < b1:
            if cols_s[i] < cols_e[j] and cols_s[j] < cols_e[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if cols_e[i] < cols_e[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    _, comp = np.unique(roots, return_inverse=True)
    for k in range(n):
        labels[rows_s[k], cols_s[k] : cols_e[k]] = comp[k] + 1
    return labels, int(comp.max()) + 1
