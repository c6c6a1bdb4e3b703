"""Model pairs for the rate–distortion benchmark (issue 19), built here, cached.

Transformer pair: a 4-layer byte-level encoder (d 384, 6 heads, 7.2 M parameters)
pre-trained to tell which of eight standard-library modules a 64-byte snippet of Python
source comes from (the text ships with Python), then fine-tuned — every weight moving,
AdamW with weight decay — on eight *other* modules with the same 8-way head. Both are
exported to ONNX (ir_version 10). Samples: 64 fine-tune-task snippets for the search,
another 64 held out for the independent check.

TFLite pair: a float32 MLP (784→512→512→10 FULLY_CONNECTED) trained on synthetic
digit-like patterns, then fine-tuned on a shifted task, written as TFLite flatbuffers
by hand (LiteRT ships no converter); 0.67 M parameters.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

TRANSFORMER_VERSION = "tfm-v1"  # bump when the recipe changes
TFLITE_VERSION = "mlp-tfl-v1"
SEQ = 64
D, HEADS, LAYERS, CLASSES = 384, 6, 4, 8
THREADS = 2
MODULES_A = ("argparse", "typing", "asyncio/base_events", "email/message", "json/decoder",
             "logging/__init__", "pathlib", "subprocess")
MODULES_B = ("tarfile", "zipfile/__init__", "http/client", "unittest/case", "dataclasses",
             "inspect", "collections/__init__", "urllib/parse")


def _source(mod: str) -> bytes:
    lib = Path(sysconfig.get_paths()["stdlib"])
    p = lib / f"{mod}.py"
    if not p.exists():  # zipfile/__init__ and friends moved between versions
        p = lib / f"{mod.split('/')[0]}.py"
    return p.read_bytes()


def _snippets(mods: tuple[str, ...], seed: int, n: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    texts = [np.frombuffer(_source(m), np.uint8) for m in mods]
    label = rng.integers(0, len(mods), n)
    x = np.empty((n, SEQ), np.int64)
    for i, k in enumerate(label):
        t = texts[k]
        o = int(rng.integers(0, len(t) - SEQ))
        x[i] = t[o : o + SEQ]
    return x, label.astype(np.int64)


def _encoder() -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.ff1, self.ff2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, x: Any) -> Any:
            n, s, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(n, s, 3, HEADS, D // HEADS).permute(
                2, 0, 3, 1, 4
            )
            att = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(n, s, D))
            return x + self.ff2(torch.nn.functional.gelu(self.ff1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(256, D)
            self.pos = nn.Parameter(torch.randn(1, SEQ, D) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(LAYERS)])
            self.ln = nn.LayerNorm(D)
            self.head = nn.Linear(D, CLASSES)

        def forward(self, tokens: Any) -> Any:
            h = self.blocks(self.tok(tokens) + self.pos)
            return self.head(self.ln(h).mean(1))

    return Encoder()


def _train(model: Any, mods: tuple[str, ...], seed: int, steps: int, lr: float) -> float:
    import torch

    x, y = _snippets(mods, seed, 16384)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(seed + 1)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(y), 32))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def _accuracy(model: Any, mods: tuple[str, ...], seed: int) -> float:
    import torch

    x, y = _snippets(mods, seed, 1024)
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _export(model: Any, example: Any, path: Path, in_name: str, out_name: str) -> None:
    import onnx
    import torch

    model.eval()
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
        dynamo=False,
        opset_version=17,
        input_names=[in_name],
        output_names=[out_name],
        dynamic_axes={in_name: {0: "n"}, out_name: {0: "n"}},
    )
    m = onnx.load(str(tmp))
    m.ir_version = 10
    onnx.save(m, str(path))
    tmp.unlink()


def _save_samples(d: Path, name: str, x: Any) -> None:
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "samples.npz", **{f"input:{name}": x})


def transformer_pair(cache: Path) -> dict[str, Any]:
    """A.onnx, B.onnx, samples/ (search) and heldout/ under ``cache``; returns info."""
    info_path = cache / "pair.json"
    if info_path.exists():
        info: dict[str, Any] = json.loads(info_path.read_text())
        return info
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cache.mkdir(parents=True, exist_ok=True)
    model = _encoder()
    params = sum(p.numel() for p in model.parameters())
    ta = _train(model, MODULES_A, seed=1, steps=300, lr=1e-3)
    acc_a = _accuracy(model, MODULES_A, seed=100)
    _export(model, torch.zeros(1, SEQ, dtype=torch.int64), cache / "A.onnx", "tokens", "logits")
    tb = _train(model, MODULES_B, seed=2, steps=250, lr=3e-4)
    acc_b = _accuracy(model, MODULES_B, seed=101)
    _export(model, torch.zeros(1, SEQ, dtype=torch.int64), cache / "B.onnx", "tokens", "logits")
    _save_samples(cache / "samples", "tokens", _snippets(MODULES_B, 200, 64)[0])
    _save_samples(cache / "heldout", "tokens", _snippets(MODULES_B, 300, 64)[0])
    info = {
        "params": params,
        "train_s": ta + tb,
        "acc_a": acc_a,
        "acc_b": acc_b,
        "python": sys.version.split()[0],
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    print(transformer_pair(Path(sys.argv[1])))
