"""`edgeward demo`: the whole path on an embedded default, end to end.

Publisher half: keys → a signed, encrypted package of a real model (the PP-OCR text
detector from its PyPI wheel, with the example run script) → verify. Device half: the
daemon on a local inbox repository → an inference over the Unix socket → a residual
(int8) update packed against v1 → hot swap to v2 → inference again → shutdown.

Every step runs the real CLI in a subprocess, so the demo is also a transcript of how
the tool is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.errors import EdgewardError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "configs" / "packages" / "ppocr-det"
DEFAULT_MODEL = REPO_ROOT / ".cache" / "assets" / "ppocr_det.onnx"
MODEL_NAME = "ppocr-det"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the whole path end to end on an embedded default")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX text detector")
    p.add_argument(
        "--workdir",
        type=Path,
        default=REPO_ROOT / ".cache" / "demo",
        help="where keys, packages and the daemon's state go (default .cache/demo)",
    )
    p.add_argument("--keep", action="store_true", help="leave the daemon's files behind")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds one inference may take (a slow board's first run; default 120)",
    )
    p.set_defaults(func=run)


class _Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.exe = [sys.executable, "-m", "agent"]
        self.run = _run_dir(work)

    def step(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def cli(self, *args: str | Path, capture: bool = False) -> str:
        argv = [*self.exe, *map(str, args)]
        print("$ edgeward " + shlex.join(argv[3:]), flush=True)
        proc = subprocess.run(argv, text=True, capture_output=True, check=False)
        if proc.returncode != 0:
            raise EdgewardError(
                f"demo step failed: edgeward {args[0]}: {proc.stderr.strip()}", code="demo"
            )
        if not capture and proc.stdout.strip():
            print(proc.stdout.rstrip())
        return proc.stdout


def _run_dir(work: Path) -> Path:
    """``work/run``, or a short directory in /tmp when that path is too long for
    AF_UNIX socket names (108 bytes)."""
    run = work / "run"
    if len(os.fsencode(run)) <= 64:  # room for the daemon's ".infer.sock.<pid>.tmp"
        return run
    digest = hashlib.sha256(os.fsencode(work)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"edgeward-demo-{digest}"


def _keypair(work: Path, kind: str) -> tuple[Path, Path]:
    d = work / "keys" / kind
    key = next(d.glob("*.key"))
    return key, key.with_suffix(".pub")


def _finetune(model: Path, out: Path) -> None:
    """A stand-in for a fine-tune: small, deterministic changes to every float weight.

    PP-OCR keeps its weights in ``Constant`` nodes rather than initializers; both count.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model))
    rng = np.random.default_rng(42)

    def nudge(t: onnx.TensorProto) -> None:
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float32 and arr.size > 16:
            scale = float(np.abs(arr).mean()) * 0.01
            arr = arr + rng.normal(0, scale, arr.shape).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    for init in m.graph.initializer:
        nudge(init)
    for node in m.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    nudge(attr.t)
    m.ir_version = min(m.ir_version, 10)
    onnx.save(m, str(out))


# 5×7 glyphs for the demo page: PP-OCR finds text lines, not arbitrary bars.
_FONT = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "D": ("11110", "10001", "10001", "10001", "10001", "10001", "11110"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "G": ("01110", "10001", "10000", "10111", "10001", "10001", "01111"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "U": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    "W": ("10001", "10001", "10001", "10101", "10101", "11011", "10001"),
    " ": ("00000",) * 7,
}
_LINES = ((48, 40, "EDGEWARD"), (148, 40, "MODEL UPDATE"), (248, 40, "DEMO"))


def _text_image() -> Any:
    """A white page with three printed lines of text for the detector to find."""
    import numpy as np

    img = np.full((352, 480, 3), 255, np.uint8)
    px = 4  # pixels per glyph dot
    for y, x, text in _LINES:
        for i, ch in enumerate(text):
            for r, row in enumerate(_FONT[ch]):
                for c, bit in enumerate(row):
                    if bit == "1":
                        y0, x0 = y + r * px, x + (i * 6 + c) * px
                        img[y0 : y0 + px, x0 : x0 + px] = 0
    return img


def _write_config(work: Path, run_dir: Path, timeout: float) -> Path:
    """A daemon config whose paths all live under the demo's work dir."""
    cfg = work / "edgeward.toml"
    run_dir.mkdir(exist_ok=True)
    cfg.write_text(
        f"""# written by `edgeward demo`; keys as in configs/edgeward.toml
[paths]
state_dir = "{work / "state"}"
inbox_dir = "{work / "inbox"}"
trust_dir = "{work / "keys" / "signing"}"
keys_dir = "{work / "keys" / "device"}"

[inference]
socket = "{run_dir / "infer.sock"}"
mode = "0660"
group = ""
request_timeout_s = {timeout}

[control]
socket = "{run_dir / "control.sock"}"
mode = "0600"

[updates]
check_interval = 0.0
check_on_start = true

[runtime]
onnx = {{ intra_op_threads = 2 }}
"""
    )
    return cfg


def run(args: argparse.Namespace) -> int:
    work: Path = args.workdir.resolve()
    model: Path = args.model.resolve()
    if not model.is_file():
        raise EdgewardError(
            f"demo model not found: {model} (run `make assets`, or pass --model)", code="demo"
        )
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "inbox").mkdir()
    d = _Demo(work)

    d.step("1. keys: a publisher signing key and this device's X25519 key")
    d.cli("keygen", "--kind", "signing", "--out", work / "keys" / "signing")
    d.cli("keygen", "--kind", "device", "--out", work / "keys" / "device")
    sk, spub = _keypair(work, "signing")
    _dk, dpub = _keypair(work, "device")

    d.step("2. publish v1: PP-OCR detector + run script, signed, encrypted for the device")
    v1 = work / f"{MODEL_NAME}-1.emp"
    common: list[str | Path] = ["--name", MODEL_NAME, "--signing-key", sk, "--encrypt-for", dpub]
    common += ["--program", EXAMPLE / "Program", "--meta", EXAMPLE / "Meta-info"]
    d.cli("pack", "--model", model, "--version", "1", *common, "-o", v1)
    d.cli("verify", v1, "--trust", spub)
    d.cli("inspect", v1)

    d.step("3. the daemon, on a local inbox repository")
    cfg = _write_config(work, d.run, args.timeout)
    log = (work / "agent.log").open("w")
    daemon = subprocess.Popen(
        [*d.exe, "agent", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        return _device_half(d, daemon, model=model, v1=v1, common=common, timeout=args.timeout)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        log.close()
        print(f"\n(daemon log: {work / 'agent.log'})")
        if not args.keep:
            shutil.rmtree(work / "state", ignore_errors=True)
            if d.run != work / "run":
                shutil.rmtree(d.run, ignore_errors=True)


def _control(d: _Demo) -> Path:
    return d.run / "control.sock"


def _check_alive(d: _Demo, daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is not None:
        raise EdgewardError(
            f"the daemon exited with {daemon.returncode}; see {d.work / 'agent.log'}",
            code="demo",
        )


def _wait_ready(d: _Demo, daemon: subprocess.Popen[bytes]) -> None:
    """Until the control socket answers (systemd would wait for READY=1 instead)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _check_alive(d, daemon)
        probe = subprocess.run(
            [*d.exe, "status", "--json", "--control-socket", str(_control(d))],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise EdgewardError("the daemon did not come up in 60 s", code="demo")


def _wait_version(d: _Demo, version: str, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        _check_alive(d, daemon)
        try:
            out = subprocess.run(
                [*d.exe, "models", "--json", "--control-socket", str(_control(d))],
                text=True,
                capture_output=True,
                check=False,
                timeout=10,
            )
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0:
            for m in json.loads(out.stdout).get("models", []):
                if (
                    m.get("name") == MODEL_NAME
                    and str(m.get("version")) == version
                    and (m.get("state") in ("ready", "active", "serving"))
                ):
                    return
        time.sleep(0.3)
    raise EdgewardError(f"{MODEL_NAME} v{version} did not become ready in 180 s", code="demo")


def _png(img: Any) -> Any:
    """Encode an RGB uint8 array as PNG bytes (zlib only: the demo needs no Pillow)."""
    import struct
    import zlib

    import numpy as np

    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    png += chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b"")
    return np.frombuffer(png, np.uint8)


def _infer(sock: Path, timeout: float) -> dict[str, Any]:
    """One inference over the socket with the Python client; prints what came back.
    The client waits a little longer than the daemon's own request timeout, so a slow
    inference ends with the daemon's 504 rather than a bare socket timeout."""
    from agent.client import Client

    t0 = time.perf_counter()
    out: dict[str, Any] = Client(str(sock), timeout=timeout + 10).infer(
        MODEL_NAME, {"image": _png(_text_image())}
    )
    ms = (time.perf_counter() - t0) * 1e3
    for name, arr in out.items():
        print(f"  {name}: {arr.dtype} {list(arr.shape)}")
    if "boxes" in out:
        for box in out["boxes"].tolist():
            print(f"    box {box}")
    print(f"  ({ms:.1f} ms over the socket)")
    return out


def _device_half(
    d: _Demo,
    daemon: subprocess.Popen[bytes],
    *,
    model: Path,
    v1: Path,
    common: list[str | Path],
    timeout: float,
) -> int:
    sock = d.run / "infer.sock"
    _wait_ready(d, daemon)
    shutil.copy(v1, d.work / "inbox" / v1.name)
    d.cli("check", "--control-socket", _control(d))
    _wait_version(d, "1", daemon)
    d.cli("models", "--control-socket", _control(d))

    d.step("4. inference over the Unix socket (KServe v2, binary tensors)")
    out1 = _infer(sock, timeout)
    print(
        f"$ curl --unix-socket {sock} http://localhost/v2/models/{MODEL_NAME}",
        flush=True,
    )
    if shutil.which("curl"):
        subprocess.run(
            ["curl", "-s", "--unix-socket", str(sock), f"http://localhost/v2/models/{MODEL_NAME}"],
            check=False,
        )
        print()

    d.step("5. publish v2 as an int8 residual patch against v1, then hot swap")
    tuned = d.work / "ppocr_det_v2.onnx"
    _finetune(model, tuned)
    v2 = d.work / f"{MODEL_NAME}-2.emp"
    full = d.work / f"{MODEL_NAME}-2-full.emp"
    d.cli("pack", "--model", tuned, "--version", "2", *common, "-o", full)
    d.cli("pack", "--model", tuned, "--version", "2", *common, "--base", v1, "--bits", "8",
          "--device-key", d.work / "keys" / "device", "-o", v2)  # fmt: skip
    ratio = v2.stat().st_size / full.stat().st_size
    print(
        f"  residual package {v2.stat().st_size:,} B vs full {full.stat().st_size:,} B "
        f"({ratio:.2f} of full)"
    )
    shutil.copy(v2, d.work / "inbox" / v2.name)
    d.cli("check", "--control-socket", _control(d))
    _wait_version(d, "2", daemon)
    d.cli("models", "--control-socket", _control(d))
    out2 = _infer(sock, timeout)
    same = out1["boxes"].tolist() == out2["boxes"].tolist()
    print(f"  v2 finds the same text boxes as v1: {same}")

    d.step("6. status, then SIGTERM: drain and stop")
    d.cli("status", "--control-socket", _control(d))
    daemon.send_signal(signal.SIGTERM)
    rc = daemon.wait(60)
    print(f"  daemon exited with {rc}")
    if rc != 0:
        raise EdgewardError(f"daemon exited with {rc}", code="demo")
    print("\ndemo complete: pack → verify → install → serve → residual update → hot swap")
    return 0
