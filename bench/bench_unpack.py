"""Unpack benchmark (issue 2): verify + decrypt + decompress of a >= 1 GiB package.

Anchor, measured in the same run on the same bytes: one pass of ``hashlib.sha256`` over
the package plus ``cryptography`` AES-256-GCM decryption of the container's real
ciphertext chunks (the minimum cryptographic work any unpacker must do). Unpack runs in
a fresh child process (``bench.rss.peak_rss_mb``) so its peak RSS is its own.

Figures: ``unpack_throughput_ratio`` = unpack MB/s / anchor MB/s (goal >= 0.5) and
``unpack_peak_rss_mb`` (goal <= 200). ``EDGEWARD_BENCH_QUICK=1`` shrinks the model to
64 MiB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

from bench.rss import peak_rss_mb

PIECE = 4 << 20  # bytes per generated piece of the model


def _make_model(path: Path, size: int) -> None:
    """Mostly incompressible bytes (like trained weights) with some compressible floats,
    written streaming."""
    import numpy as np

    rng = np.random.default_rng(42)
    done = 0
    with open(path, "wb") as f:
        i = 0
        while done < size:
            n = min(PIECE, size - done)
            if i % 4 == 3:  # a quarter: smooth float32 data that zstd compresses
                piece = np.round(np.linspace(i, i + 1, n // 4, dtype=np.float32), 2).tobytes()
                piece += bytes(n - len(piece))
            else:
                piece = rng.bytes(n)
            f.write(piece)
            done += n
            i += 1


def _unpack_child(pkg: str, out: str, trust: str, device: str) -> float:
    from agent.keys import Keyring, TrustStore
    from agent.malloc import tune_malloc
    from agent.package import unpack

    tune_malloc()  # as in the daemon (whose updater unpacks) and the edgeward CLI

    t0 = time.perf_counter()
    unpack(
        Path(pkg),
        Path(out),
        trust=TrustStore.from_paths([Path(trust)]),
        keyring=Keyring.from_paths([Path(device)]),
    )
    return time.perf_counter() - t0


def _anchor(pkg: Path, device: Path) -> float:
    """Seconds for SHA-256 over the package + AES-GCM decryption of every chunk."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from agent import container as C
    from agent import crypto
    from agent.keys import Keyring
    from agent.package import inspect
    from agent.tario import TarReader

    doc = inspect(pkg)
    m = doc["models"][0]
    ring = Keyring.from_paths([device])
    from agent.manifest import parse_manifest

    with open(pkg, "rb") as f:
        tar = TarReader(f, max_entries=100, max_total=1 << 40)
        tar.next()
        manifest = parse_manifest(tar.read_all(1 << 22, "manifest"))
    enc = manifest.encryption
    assert enc is not None and m["container"] == "Model/models.empc"
    ctx = crypto.package_context(manifest.name, manifest.version, enc.alg, enc.chunk_size)
    key = crypto.unwrap_any(list(enc.recipients), ring, ctx)
    aead = AESGCM(key)
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(pkg, "rb") as f:
        tar = TarReader(f, max_entries=100, max_total=1 << 40)
        while (e := tar.next()) is not None:
            if e.path != "Model/models.empc":
                h.update(tar.read_all(1 << 30, e.path))
                continue
            head = tar.read(C.FILE_HEADER_SIZE + C.MODEL_HEADER_SIZE + C.PREAMBLE_SIZE)
            h.update(head)
            header = C.parse_model_header(head[C.FILE_HEADER_SIZE :])
            preamble = head[-C.PREAMBLE_SIZE :]
            prefix, chunk = C.parse_preamble(preamble)
            base_aad = C.chunk_aad(header, preamble)
            step = chunk + crypto.TAG_SIZE
            i = 0
            while piece := tar.read(step):
                h.update(piece)
                last = tar.remaining == 0
                aead.decrypt(
                    prefix + struct.pack(">IB", i, last),
                    piece,
                    base_aad + struct.pack(">QB", i, last),
                )
                i += 1
    return time.perf_counter() - t0


def run(work: Path) -> dict[str, float]:
    from agent.keys import generate_key, load_private, load_public
    from agent.package import PackSpec, pack

    quick = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"
    # The model is sized so that the package itself is >= 1 GiB (a quarter compresses).
    size = (64 << 20) if quick else (1400 << 20)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sk = generate_key("signing", work / "keys")
    dev = generate_key("device", work / "device")
    model = work / "model.bin"
    _make_model(model, size)
    pkg = work / "big.emp"
    t0 = time.perf_counter()
    assert dev.public is not None
    pack(
        PackSpec(
            models=[model],
            name="bench",
            version=1,
            signing_keys=[load_private(sk.private)],  # type: ignore[list-item]
            encrypt_for=[load_public(dev.public)],
        ),  # type: ignore[list-item]
        pkg,
    )
    pack_s = time.perf_counter() - t0
    model.unlink()  # only the package stays: unpack reads what a device would get
    os.sync()  # the package's writeback would otherwise compete with what is measured
    pkg_mb = pkg.stat().st_size / 1e6
    print(f"package {pkg_mb:.0f} MB (model {size / 1e6:.0f} MB), packed in {pack_s:.1f} s")

    anchor_s = min(_anchor(pkg, work / "device") for _ in range(2))
    anchor = pkg_mb / anchor_s
    print(f"anchor  sha256 + AES-256-GCM decrypt: {anchor:.0f} MB/s")

    # The output goes to tmpfs when there is one, so the figure is the unpack pipeline's
    # and not this VM's disk (whose fsync rate is printed separately below).
    shm = Path("/dev/shm")
    out_root = Path(tempfile.mkdtemp(prefix="edgeward-bench-", dir=shm)) if shm.is_dir() else work
    best = float("inf")
    peak = 0.0
    try:
        for i in range(2):
            out = out_root / f"out{i}"
            secs, rss = peak_rss_mb(
                _unpack_child, str(pkg), str(out), str(work / "keys"), str(work / "device")
            )
            best = min(best, secs)
            peak = max(peak, rss)
            shutil.rmtree(out)
    finally:
        if out_root != work:
            shutil.rmtree(out_root, ignore_errors=True)
    if out_root != work:
        disk_s, _ = peak_rss_mb(
            _unpack_child, str(pkg), str(work / "disk"), str(work / "keys"), str(work / "device")
        )
        print(
            f"unpack  onto the disk with fsync: {pkg_mb / disk_s:.0f} MB/s (disk-bound, "
            "for information)"
        )
    thr = pkg_mb / best
    ratio = thr / anchor
    print(
        f"unpack  verify + decrypt + decompress + write: {thr:.0f} MB/s = {ratio:.2f} x anchor "
        "(goal >= 0.5)"
    )
    print(f"unpack  peak RSS {peak:.0f} MB (goal <= 200)")
    shutil.rmtree(work, ignore_errors=True)
    return {"unpack_throughput_ratio": ratio, "unpack_peak_rss_mb": peak}


if __name__ == "__main__":
    import sys

    print(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/work/unpack")))
