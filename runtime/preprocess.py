"""Built-in image pre-processing (technicalinfo ``converter_config.preprocessing``, table 66).

When a package declares preprocessing and the model has an image input, the runtime
accepts raw ``uint8`` images (``HxWxC`` or ``NxHxWxC``) for that input and turns them
into the model's tensor: resize (bilinear) to ``resize_height`` x ``resize_width``,
multiply by ``scale`` (default 1/255), subtract ``mean``, divide by ``std``, reorder to
``layout`` (``NCHW`` default, or ``NHWC``), cast to the model dtype. Inputs that already
have the model's dtype pass through untouched. Run scripts may call :func:`resize` and
:func:`normalize` directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import InvalidInputError, MetaInfoError

LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class Preprocessing:
    resize_height: int | None = None
    resize_width: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Raises MetaInfoError naming ``converter_config.preprocessing.<key>``."""
        where = "converter_config.preprocessing"
        allowed = {"resize_height", "resize_width", "mean", "std", "scale", "layout"}
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k not in allowed:
                # Unknown keys are tolerated (the standard's list is open-ended) but unused.
                continue
            if k in ("resize_height", "resize_width"):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise MetaInfoError(f"{where}.{k} must be a positive integer, got {v!r}")
                kw[k] = v
            elif k in ("mean", "std"):
                vals = [v] if isinstance(v, int | float) else v
                if (
                    not isinstance(vals, list)
                    or not vals
                    or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vals)
                ):
                    raise MetaInfoError(f"{where}.{k} must be a number or a list of numbers")
                if k == "std" and any(x == 0 for x in vals):
                    raise MetaInfoError(f"{where}.std must not contain 0")
                kw[k] = tuple(float(x) for x in vals)
            elif k == "scale":
                if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                    raise MetaInfoError(f"{where}.scale must be a positive number")
                kw[k] = float(v)
            elif k == "layout":
                if v not in LAYOUTS:
                    raise MetaInfoError(f"{where}.layout must be one of {', '.join(LAYOUTS)}")
                kw[k] = v
        return cls(**kw)

    def apply(self, image: np.ndarray, dtype: Any = np.float32, name: str = "image") -> np.ndarray:
        """uint8 ``HxWxC`` / ``NxHxWxC`` → normalised batch tensor in ``layout``."""
        if image.dtype != np.uint8 or image.ndim not in (3, 4):
            raise InvalidInputError(
                f"input {name!r}: expected a uint8 image HxWxC or NxHxWxC, got "
                f"{image.dtype} {list(image.shape)}"
            )
        batch = image[None] if image.ndim == 3 else image
        if self.resize_height and self.resize_width:
            batch = np.stack([resize(im, self.resize_height, self.resize_width) for im in batch])
        x = normalize(batch, self.mean, self.std, self.scale)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=dtype)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an ``HxWxC`` (or ``HxW``) array with numpy only.

    Returns float32 (callers normalise next; no rounding back to uint8).
    """
    if image.shape[0] == height and image.shape[1] == width:
        return image.astype(np.float32)
    h, w = image.shape[:2]
    ys = (np.arange(height, dtype=np.float32) + 0.5) * (h / height) - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) * (w / width) - 0.5
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(np.intp)
    x0 = np.floor(xs).astype(np.intp)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0).reshape(-1, 1)
    wx = (xs - x0).reshape(1, -1)
    img = image.astype(np.float32)
    if img.ndim == 3:
        wy = wy[..., None]
        wx = wx[..., None]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    out: np.ndarray = top * (1 - wy) + bot * wy
    return out


def normalize(
    x: np.ndarray,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    scale: float = 1.0 / 255.0,
) -> np.ndarray:
    """``(x * scale - mean) / std`` over the last (channel) axis, float32."""
    y = x.astype(np.float32) * np.float32(scale)
    if mean is not None:
        y -= np.asarray(mean, dtype=np.float32)
    if std is not None:
        y /= np.asarray(std, dtype=np.float32)
    return y
