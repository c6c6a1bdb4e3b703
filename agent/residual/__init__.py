"""Residual (incremental) model updates: quantised weight patches B' = A + Q(B − A).

The publisher encodes a patch from the installed version A to the new version B; the
device rebuilds B' from A and the patch, bit for bit what the publisher computed, and
checks its digest. See docs/RESIDUAL.md and docs/FORMAT.md ("Residual patch stream").
"""

from __future__ import annotations

from .stream import PatchInfo, apply_patch, encode_patch, weights_digest

__all__ = ["PatchInfo", "apply_patch", "encode_patch", "weights_digest"]
