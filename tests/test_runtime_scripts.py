"""Run-script host and the example ppocr-det package (real pre/post-processing)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import InvalidInputError, RunScriptError
from runtime import RuntimeConfig, open_model, self_test
from tests.helpers import EXAMPLE_PROGRAM, make_package


def _png_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "ppocr_png_test", EXAMPLE_PROGRAM / "Scripts" / "ppocr_png.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _draw_word(
    img: np.ndarray, y: int, x: int, n: int, rng: np.random.Generator
) -> tuple[int, ...]:
    """Dark glyph-like strokes (a 'word' of n characters) on white; returns its box."""
    ch, cw, gap = 20, 14, 5
    for i in range(n):
        xx = x + i * (cw + gap)
        img[y : y + ch, xx : xx + 3] = 0
        img[y : y + 3, xx : xx + cw] = 0
        img[y + ch // 2 : y + ch // 2 + 3, xx : xx + cw] = 0
        img[y + ch - 3 : y + ch, xx + int(rng.integers(0, cw - 3)) : xx + cw] = 0
    return (x, y, x + n * (cw + gap) - gap - 1, y + ch - 1)


def _example_package(tmp: Path, det: Path) -> Path:
    pkg = make_package(
        tmp / "ppocr-det",
        det,
        name="ppocr-det",
        entry="det.onnx",
        runtime_config={"backend": "onnxruntime", "postprocessing": {"box_thresh": 0.6}},
        converter_config={
            "batch": "dynamic",
            "preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        },
    )
    shutil.copytree(EXAMPLE_PROGRAM, pkg / "Program")
    return pkg


def test_example_ppocr_det_finds_words(tmp_path: Path, ppocr_det: Path) -> None:
    pkg = _example_package(tmp_path, ppocr_det)
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "cache")
    assert s.script is not None
    assert "package-converter" in s.converted.info["stages"]
    meta = s.metadata()
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["boxes", "scores"]

    rng = np.random.default_rng(0)
    img = np.full((240, 360, 3), 255, np.uint8)
    words = [
        _draw_word(img, 30, 20, 8, rng),
        _draw_word(img, 110, 70, 6, rng),
        _draw_word(img, 190, 200, 5, rng),
    ]
    out = s.predict({"image": img})
    boxes, scores = out["boxes"], out["scores"]
    assert boxes.dtype == np.int32 and boxes.shape == (3, 4)
    assert scores.dtype == np.float32 and np.all(scores > 0.6)
    for (x0, y0, x1, y1), b in zip(words, boxes, strict=True):  # sorted top to bottom
        # Each box covers its word and does not stray more than a few pixels.
        assert b[0] <= x0 + 2 and b[1] <= y0 + 2 and b[2] >= x1 - 2 and b[3] >= y1 - 2
        assert b[0] >= x0 - 8 and b[1] >= y0 - 8 and b[2] <= x1 + 8 and b[3] <= y1 + 8

    # The same image as PNG bytes (decoded without Pillow by the package's helper).
    png = _png_module().encode_png(img)
    out2 = s.predict({"image": np.frombuffer(png, np.uint8)})
    np.testing.assert_array_equal(out2["boxes"], boxes)

    # A blank page has no text.
    blank = s.predict({"image": np.full((64, 96, 3), 255, np.uint8)})
    assert blank["boxes"].shape == (0, 4) and blank["scores"].shape == (0,)

    # Script-level self-test vectors work too.
    sd = pkg / "Meta-info" / "samples"
    sd.mkdir()
    np.savez(sd / "page.npz", **{"input:image": img, "output:boxes": boxes})
    assert self_test(s) == 1

    with pytest.raises(InvalidInputError, match="'image'"):
        s.predict({"image": np.frombuffer(b"GIF89a not supported", np.uint8)})
    with pytest.raises(InvalidInputError, match="unknown input 'x'"):
        s.predict({"x": img})
    with pytest.raises(InvalidInputError, match=r"'image'.*FP32"):
        s.predict({"image": img.astype(np.float32)})


def test_png_decoder_all_filters() -> None:
    import struct
    import zlib

    png = _png_module()
    rng = np.random.default_rng(9)
    img = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    # Encode every row with another filter type to exercise all five.
    bpp, rows, prev = 3, [], np.zeros(15, np.int32)
    for y in range(7):
        f = y % 5
        cur = img[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if f == 0:
            enc = cur
        elif f == 1:
            enc = cur - left
        elif f == 2:
            enc = cur - prev
        elif f == 3:
            enc = cur - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
            enc = cur - pred
        rows.append(bytes([f]) + (enc & 0xFF).astype(np.uint8).tobytes())
        prev = cur

    def chunk(t: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body))

    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 7, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )
    np.testing.assert_array_equal(png.decode_png(data), img)
    with pytest.raises(ValueError, match="signature"):
        png.decode_png(b"nope")


SCRIPTS = {
    "syntax": ("class Model(:\n    pass\n", ["failed to import", "SyntaxError"]),
    "import-raises": (
        "import numpy\nraise ImportError('needs torch')\n",
        ["ImportError: needs torch"],
    ),
    "no-model": ("x = 1\n", ["defines no class Model"]),
    "bad-metadata": (
        """
        class Model:
            def __init__(self, model_dir, backend, config):
                pass
            def metadata(self):
                return {"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}
            def predict(self, inputs):
                return {}
        """,
        ["metadata() is not v2 metadata", "FLOAT"],
    ),
    "init-raises": (
        """
        class Model:
            def __init__(self, model_dir, backend, config):
                raise RuntimeError("cannot find labels.txt")
            def predict(self, inputs):
                return {}
        """,
        ["Model() failed", "RuntimeError: cannot find labels.txt"],
    ),
}


@pytest.mark.parametrize("case", sorted(SCRIPTS))
def test_broken_run_script_at_load(tmp_path: Path, ppocr_cls: Path, case: str) -> None:
    script, words = SCRIPTS[case]
    pkg = make_package(tmp_path / "pkg", ppocr_cls, run_script=script)
    with pytest.raises(RunScriptError) as ei:
        open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    assert ei.value.code == "run-script"
    assert "Program/Scripts/run.py" in ei.value.message
    for w in words:
        assert w in ei.value.message


GOOD_SCRIPT = """
import numpy as np
from agent.errors import InvalidInputError

class Model:
    def __init__(self, model_dir, backend, config):
        self.backend = backend
        self.threshold = config["runtime_config"]["threshold"]

    def metadata(self):
        return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 48, 192]}],
                "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}

    def predict(self, inputs):
        x = inputs["x"]
        if x.shape[0] == 0:
            raise InvalidInputError("empty batch for 'x'")
        if x.shape[0] == 7:
            raise ValueError("boom on seven")
        if x.shape[0] == 5:
            return [1, 2]
        p = self.backend.predict({"x": x})["save_infer_model/scale_0.tmp_1"]
        return {"label": (p[:, 1] > self.threshold).astype(np.int64)}
"""


def test_run_script_errors_in_predict(tmp_path: Path, ppocr_cls: Path) -> None:
    pkg = make_package(
        tmp_path / "pkg",
        ppocr_cls,
        run_script=GOOD_SCRIPT,
        runtime_config={"threshold": 0.5},
    )
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    x = np.random.default_rng(1).random((2, 3, 48, 192), dtype=np.float32)
    out = s.predict({"x": x})
    assert out["label"].dtype == np.int64 and out["label"].shape == (2,)
    assert s.metadata()["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]}]
    with pytest.raises(RunScriptError) as ei:
        s.predict({"x": np.zeros((7, 3, 48, 192), np.float32)})
    assert "predict failed" in ei.value.message and "ValueError: boom on seven" in ei.value.message
    assert "run.py" in ei.value.message
    with pytest.raises(RunScriptError, match="must return dict"):
        s.predict({"x": np.zeros((5, 3, 48, 192), np.float32)})
    # Deliberate InvalidInputError from the script passes through as a 400.
    with pytest.raises(InvalidInputError, match="empty batch"):
        s.predict({"x": np.zeros((0, 3, 48, 192), np.float32)})
    # Names and datatypes are checked against the script's declared inputs.
    with pytest.raises(InvalidInputError, match="missing input 'x'"):
        s.predict({})
    with pytest.raises(InvalidInputError, match=r"'x'.*INT64"):
        s.predict({"x": np.zeros((1, 3, 48, 192), np.int64)})
    s.close()


RACY_SCRIPT = """
import threading, time
import numpy as np

class Model:
    {flag}
    def __init__(self, model_dir, backend, config):
        self.inside = 0
        self.max_inside = 0
        self.lock = threading.Lock()

    def predict(self, inputs):
        with self.lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
        time.sleep(0.1)
        with self.lock:
            self.inside -= 1
        return {{"max_inside": np.array([self.max_inside])}}
"""


@pytest.mark.parametrize(("flag", "serial"), [("", True), ("thread_safe = True", False)])
def test_script_serialised_unless_thread_safe(
    tmp_path: Path, ppocr_cls: Path, flag: str, serial: bool
) -> None:
    import threading

    pkg = make_package(tmp_path / "pkg", ppocr_cls, run_script=RACY_SCRIPT.format(flag=flag))
    s = open_model(pkg, RuntimeConfig(), cache_dir=tmp_path / "c")
    barrier = threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        s.predict({})

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = int(s.predict({})["max_inside"][0])
    assert (seen == 1) is serial
