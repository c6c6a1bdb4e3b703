"""The residual format's promise across platforms: a patch packed on one machine rebuilds
the same B' bytes on another.

``.ci/arm64.sh`` packs the vectors on the x86-64 host (:mod:`tests.arm64_vectors`) and
points ``EDGEWARD_PARITY_VECTORS`` at them inside the arm64 root; there this test applies
each patch and compares the SHA-256 of the result with the host's reconstruction. On the
host (no variable) it packs and applies in one place, which keeps the test honest on
every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import pytest

from agent.residual import apply_patch, weights_digest
from tests import arm64_vectors

VECTORS = os.environ.get("EDGEWARD_PARITY_VECTORS")


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    if VECTORS:
        d = Path(VECTORS)
        return d, json.loads((d / "index.json").read_text())
    if os.environ.get("EDGEWARD_ARM64") == "1":
        pytest.fail("EDGEWARD_PARITY_VECTORS is not set: .ci/arm64.sh packs them on the host")
    d = tmp_path_factory.mktemp("parity")
    return d, arm64_vectors.write(d)


@pytest.mark.parametrize("case", sorted(arm64_vectors.CASES))
def test_patch_rebuilds_the_hosts_bytes(
    case: str, vectors: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    d, index = vectors
    if os.environ.get("EDGEWARD_ARM64") == "1":
        assert platform.machine() == "aarch64", "the arm64 run is not on an aarch64 interpreter"
    v = index[case]
    out = tmp_path / f"out{v['suffix']}"
    with (d / v["patch"]).open("rb") as f:
        got = apply_patch(
            d / v["base"],
            f,
            out,
            expected_base_digest=v["base_digest"],
            expected_target_digest=v["target_digest"],
            verify_base=True,
        )
    assert got == v["target_digest"] == weights_digest(out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == v["recon_sha256"], (
        f"{case}: B' on {platform.machine()} differs from the publisher's reconstruction"
    )



def test_litert_xnnpack_agrees_with_builtin_kernels(hand_tflite: Path) -> None:
    """XNNPACK (the default on a real box) and LiteRT's builtin kernels give the same
    landmarks. The emulated root runs the rest of the suite on the builtin kernels
    (.ci/arm64_sitecustomize.py), so this one invoke is where arm64 XNNPACK is checked."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    x = np.random.default_rng(7).random((1, 224, 224, 3), dtype=np.float32)
    outs = []
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
        it = Interpreter(
            model_path=str(hand_tflite), num_threads=1, experimental_op_resolver_type=resolver
        )
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append([it.get_tensor(d["index"]).copy() for d in it.get_output_details()])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
