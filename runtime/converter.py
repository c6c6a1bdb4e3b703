"""Converters: unified representation → what this device runs (GB/T 42382.2 §8.2.3, §8.3.2).

Pipeline for one unpacked package (each stage optional):

1. **Package converter** ``Program/Library/converter/convert`` (executable) or
   ``convert.py`` (run with this Python) in a subprocess, fixed contract::

       convert --input PKG_DIR --output OUT_DIR --backend onnxruntime|litert \
               --device-info JSON

   ``PKG_DIR`` is the unpacked package (read it, never write it); the converter writes
   the converted entry model to ``OUT_DIR/<entry_model>`` (same file name). cwd is an
   empty temp dir, the environment is minimal (PATH, LANG, HOME/TMPDIR = the temp dir),
   stdout and stderr are captured (the last lines go into the error), the whole process
   group is killed after ``converter_timeout_s``. Exit 0 = success.
2. **converter_config** (technicalinfo, table 66): ``batch: static`` fixes the batch
   dimension of every input/output to ``batch_size`` (ONNX shape rewrite);
   ``weight_compression: fp16`` converts weights with ``onnxconverter_common`` when that
   package is installed (otherwise a clear ``unsupported-compression`` error).
3. **ORT optimisation** (ONNX): ORT optimises the graph at the configured level while
   it loads the session that will serve, saving the optimised graph into the cache on
   the way (``SessionOptions.optimized_model_filepath``); later starts load that copy
   with online optimisation disabled. A model of ``ONLINE_OPTIMISE_BYTES`` or more whose
   only conversion is this one keeps no copy and is optimised at each load. If the
   optimised graph fails validation, the unoptimised one serves (warning).
   **Delegate selection** (LiteRT): each configured delegate is loaded and validated;
   failing optional delegates are dropped.

Every artefact that differs from the package's model is validated against the
unconverted model before it may serve: same output names and shapes, values within
``validate_rtol``/``validate_atol`` (at least 1e-2 for fp16) on ``Meta-info/samples/*.npz``
whose inputs are the model's inputs; without such samples, on seeded random inputs
built from the model's signature (free dims: batch → ``batch_size`` or 1, others → 32).
For ONNX the validated session is the one that serves (``Converted.session``), and the
unconverted reference loads on a thread meanwhile.

Results are cached in ``cache_dir/<key>/`` where the key hashes the device fingerprint,
the model's sha256 (the signed manifest's, when unpack kept it), the converter
directory, converter_config and ORT options; a conversion is built in a temp dir and
renamed into place, so the cache never holds a half-written artefact, and the
artefact's sha256 plus ``golden.npz`` (the validated graph's answers) are checked at
every reuse, so a torn or differently-reloading artefact is rebuilt, never served.
``info.json`` counts reuses (``hits``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.durable import atomic_write_bytes, discard_tree, fsync_dir
from agent.errors import (
    ConverterError,
    EdgewardError,
    InvalidInputError,
    MetaInfoError,
    RuntimeBackendError,
    disk_full,
    human_bytes,
)
from runtime.backend import Backend, TensorSpec, make_backend
from runtime.config import DelegateSpec, RuntimeConfig
from runtime.fingerprint import device_info, digest, file_sha256, tree_sha256
from runtime.preprocess import Preprocessing

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CONVERTER_DIR = Path("Program/Library/converter")
CONVERTER_NAMES = ("convert", "convert.py")
_TAIL_LINES = 20
WEIGHT_COMPRESSIONS = ("none", "fp16")


@dataclass(frozen=True)
class ConverterConfig:
    """technicalinfo ``converter_config`` (table 66)."""

    batch: str = "dynamic"  # "static" | "dynamic"
    batch_size: int | None = None
    preprocessing: Preprocessing | None = None
    weight_compression: str = "none"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ConverterConfig:
        """Raises MetaInfoError naming ``converter_config.<key>``."""
        if not d:
            return cls()
        if not isinstance(d, Mapping):
            raise MetaInfoError("converter_config must be an object")
        batch = d.get("batch", "dynamic")
        aliases = {"static-batch": "static", "dynamic-batch": "dynamic"}
        batch = aliases.get(batch, batch)
        if batch not in ("static", "dynamic"):
            raise MetaInfoError(
                f"converter_config.batch must be static or dynamic, got {d.get('batch')!r}"
            )
        size = d.get("batch_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise MetaInfoError(f"converter_config.batch_size must be an integer >= 1: {size!r}")
        if batch == "static" and size is None:
            size = 1
        wc = d.get("weight_compression", "none") or "none"
        if wc not in WEIGHT_COMPRESSIONS:
            raise MetaInfoError(
                f"converter_config.weight_compression must be one of "
                f"{', '.join(WEIGHT_COMPRESSIONS)}, got {wc!r}"
            )
        pre = d.get("preprocessing")
        if pre is not None and not isinstance(pre, Mapping):
            raise MetaInfoError("converter_config.preprocessing must be an object")
        return cls(
            batch=batch,
            batch_size=size,
            preprocessing=Preprocessing.from_dict(pre) if pre else None,
            weight_compression=wc,
            raw=dict(d),
        )


@dataclass
class Converted:
    """What the loader serves: the artefact, how to load it, and the conversion record."""

    model_path: Path
    backend: str
    level: str | None = None  # ORT graph level to serve with (None: config's)
    delegates: list[DelegateSpec] | None = None  # LiteRT: the validated selection
    from_cache: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    # ONNX: the validated backend, loaded and ready to serve (the loader serves it
    # instead of loading ``model_path`` again); None: load ``model_path``.
    session: Backend | None = field(default=None, compare=False, repr=False)


# --- samples -----------------------------------------------------------------------


def load_samples(model_dir: Path) -> list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """``Meta-info/samples/*.npz`` as (file name, inputs, expected outputs), sorted.

    Raises:
        MetaInfoError: a sample file is not a pickle-free npz with input:/output: keys.
    """
    out = []
    sdir = model_dir / "Meta-info" / "samples"
    for p in sorted(sdir.glob("*.npz")) if sdir.is_dir() else []:
        try:
            with np.load(p, allow_pickle=False) as z:
                ins = {k[6:]: z[k] for k in z.files if k.startswith("input:")}
                outs = {k[7:]: z[k] for k in z.files if k.startswith("output:")}
        except Exception as exc:
            raise MetaInfoError(f"sample {p.name} is not a readable npz: {exc}") from None
        if not ins:
            raise MetaInfoError(f"sample {p.name} has no 'input:<name>' arrays")
        out.append((p.name, ins, outs))
    return out


def random_inputs(specs: list[TensorSpec], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs matching a signature (free dims: axis 0 → ``batch``, else 32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = tuple(
            (batch if i == 0 else 32) if d < 0 else d for i, d in enumerate(s.shape or (1,))
        )
        if s.dtype.kind == "f":
            out[s.name] = rng.random(shape, dtype=np.float32).astype(s.dtype)
        elif s.dtype.kind in ("i", "u"):
            out[s.name] = rng.integers(0, 10, shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            out[s.name] = rng.random(shape) > 0.5
        elif s.dtype.kind in "OUS":  # string tensors: short words, non-ASCII included
            words = np.array(["", "edge", "ward", "héllo", "模型", "a b"], dtype=object)
            out[s.name] = words[rng.integers(0, len(words), shape)]
        else:
            raise ConverterError(
                f"cannot generate a validation input for {s.name} ({s.dtype})",
                code="converter-validation",
            )
    return out


def compare_outputs(
    got: Mapping[str, np.ndarray],
    want: Mapping[str, np.ndarray],
    rtol: float,
    atol: float,
) -> str | None:
    """None if ``got`` matches ``want`` (names, shapes, values); else why not."""
    for name, w in want.items():
        if name not in got:
            return f"output {name!r} is missing"
        g = np.asarray(got[name])
        e = np.asarray(w)
        if g.shape != e.shape:
            return f"output {name!r} has shape {list(g.shape)}, expected {list(e.shape)}"
        if g.dtype.kind in "fc" or e.dtype.kind in "fc":
            gf, ef = g.astype(np.float64), e.astype(np.float64)
            if not np.allclose(gf, ef, rtol=rtol, atol=atol, equal_nan=True):
                diff = float(np.nanmax(np.abs(gf - ef))) if g.size else 0.0
                return (
                    f"output {name!r} differs (max abs diff {diff:.3g}, rtol {rtol}, atol {atol})"
                )
        elif not np.array_equal(g, e):
            return f"output {name!r} differs"
    return None


Arrays = dict[str, np.ndarray]
# (source "samples" | "random", [(input name, inputs, the reference's outputs or error)])
Answers = tuple[str, list[tuple[str, Arrays, "Arrays | EdgewardError"]]]


def reference_answers(
    reference: Backend,
    samples: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]],
    *,
    batch: int,
) -> Answers:
    """What the unconverted model answers on the validation inputs: the model-level
    samples, else seeded random inputs. Returns (source, [(name, inputs, outputs or the
    error)]); the converter computes it on the reference's own thread while the
    candidate still loads."""
    names = {s.name for s in reference.inputs}
    usable = [(n, ins) for n, ins, _ in samples if set(ins) == names]
    source = "samples"
    if not usable:
        usable = [("random", random_inputs(reference.inputs, batch=batch))]
        source = "random"
    out: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray] | EdgewardError]] = []
    for sample_name, ins in usable:
        try:
            out.append((sample_name, ins, reference.predict(ins)))
        except EdgewardError as exc:
            out.append((sample_name, ins, exc))
            break  # validation stops at the first input the original refuses
    return source, out


def validate_against(
    reference: Backend,
    candidate: Backend,
    samples: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]],
    *,
    rtol: float,
    atol: float,
    batch: int,
    what: str,
    record: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] | None = None,
    answers: Answers | None = None,
) -> dict[str, Any]:
    """Run both backends on the model-level samples (or random inputs) and compare.

    ``answers``: the reference's, computed before (:func:`reference_answers`).
    ``record`` receives each (inputs, candidate outputs) pair that matched: the
    converter keeps them with a cache entry to check the artefact when it is reused.

    Raises:
        ConverterError: outputs differ (code ``converter-validation``).
    """
    if answers is None:
        answers = reference_answers(reference, samples, batch=batch)
    source, cases = answers
    for sample_name, ins, want in cases:
        if isinstance(want, EdgewardError):
            if source == "random":
                logger.warning(
                    "cannot validate %s: the unconverted model refuses random inputs (%s)",
                    what,
                    want.message,
                )
                return {"validated": False, "source": source, "reason": want.message}
            raise ConverterError(
                f"cannot validate {what}: the unconverted model fails on {sample_name}: "
                f"{want.message}",
                code="converter-validation",
            ) from None
        try:
            got = candidate.predict(ins)
        except EdgewardError as exc:
            raise ConverterError(
                f"{what} fails on {sample_name}: {exc.message}", code="converter-validation"
            ) from None
        why = compare_outputs(got, want, rtol, atol)
        if why is None and set(got) != set(want):
            why = f"outputs {sorted(got)} differ from {sorted(want)}"
        if why is not None:
            raise ConverterError(
                f"{what} does not match the unconverted model on {sample_name}: {why}",
                code="converter-validation",
            )
        if record is not None:
            record.append((ins, got))
    return {"validated": True, "source": source, "checked": len(cases)}


# --- package converter ---------------------------------------------------------------


def find_package_converter(model_dir: Path) -> Path | None:
    cdir = model_dir / CONVERTER_DIR
    for name in CONVERTER_NAMES:
        p = cdir / name
        if p.is_file():
            return p
    return None


def run_package_converter(
    converter: Path,
    model_dir: Path,
    out_dir: Path,
    *,
    backend: str,
    device: Mapping[str, Any],
    timeout: float,
) -> str:
    """Run a package converter under the documented contract; returns its output tail.

    Raises:
        ConverterError: non-zero exit (``converter-failed``) or timeout
            (``converter-timeout``); the message holds the last output lines.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if converter.suffix == ".py":
        cmd = [sys.executable, "-I", str(converter.resolve())]
    else:
        if not os.access(converter, os.X_OK):
            raise ConverterError(
                f"package converter {converter} is not executable", code="converter-failed"
            )
        cmd = [str(converter.resolve())]
    cmd += [
        "--input",
        str(model_dir.resolve()),
        "--output",
        str(out_dir.resolve()),
        "--backend",
        backend,
        "--device-info",
        json.dumps(dict(device), sort_keys=True),
    ]
    with tempfile.TemporaryDirectory(prefix="edgeward-conv-") as work:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": work,
            "TMPDIR": work,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        log_path = Path(work) / ".converter.log"
        started = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise ConverterError(
                    f"package converter {converter.name} timed out after {timeout:g} s"
                    f"{_tail_suffix(log_path)}",
                    code="converter-timeout",
                ) from None
            finally:
                # Grandchildren left behind by a converter that exited still die.
                _kill_group(proc)
        tail = _tail(log_path)
        logger.info(
            "package converter %s exited %d after %.1f s",
            converter.name,
            rc,
            time.monotonic() - started,
        )
        if rc != 0:
            how = f"exit status {rc}" if rc > 0 else f"signal {-rc}"
            raise ConverterError(
                f"package converter {converter.name} failed ({how}){_tail_suffix(log_path)}",
                code="converter-failed",
            )
        return tail


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


def _tail(path: Path, limit: int = 64 * 1024) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return "\n".join(lines[-_TAIL_LINES:])


def _tail_suffix(path: Path) -> str:
    t = _tail(path)
    if not t:
        return ""
    last = " | ".join(t.splitlines()[-5:])
    return f"; output: {last}"


# --- ONNX rewrites -----------------------------------------------------------------------


def fix_batch(src: Path, dst: Path, batch_size: int) -> None:
    """Rewrite the ONNX graph so axis 0 of every input/output is ``batch_size``."""
    import onnx

    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if vi.name in inits:  # old-IR graphs list weights as inputs
            continue
        if t.HasField("shape") and len(t.shape.dim) >= 1:
            d0 = t.shape.dim[0]
            if d0.HasField("dim_value") and d0.dim_value > 0 and d0.dim_value != batch_size:
                raise ConverterError(
                    f"converter_config.batch_size {batch_size} conflicts with the fixed "
                    f"batch {d0.dim_value} of {vi.name}",
                    code="converter-config",
                )
            d0.ClearField("dim_param")
            d0.dim_value = batch_size
    # Intermediate shape annotations may name the old symbol; drop them, ORT re-infers.
    del model.graph.value_info[:]
    onnx.save(model, str(dst))


def fp16_weights(src: Path, dst: Path) -> None:
    """Weights to float16 via onnxconverter_common (optional dependency)."""
    try:
        from onnxconverter_common import float16  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConverterError(
            "converter_config.weight_compression 'fp16' needs the onnxconverter-common "
            "package, which is not installed on this device",
            code="unsupported-compression",
        ) from None
    import onnx

    model = onnx.load(str(src))
    model16 = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(model16, str(dst))


# --- the pipeline -------------------------------------------------------------------


def cache_key(
    model_file: Path,
    model_dir: Path,
    kind: str,
    cc: ConverterConfig,
    config: RuntimeConfig,
    *,
    model_sha256: str | None = None,
) -> str:
    return digest(
        {
            "format": CACHE_FORMAT,
            "device": device_info(config),
            "model": model_sha256 or file_sha256(model_file),
            "converter": tree_sha256(model_dir / CONVERTER_DIR),
            "converter_config": cc.raw,
            "backend": kind,
            "onnx_level": config.onnx.graph_optimization_level,
            "onnx_providers": config.onnx.providers,
            "onnx_provider_options": config.onnx.provider_options,
        }
    )[:32]


def pinned_sha256(model_dir: Path, entry_model: str, model_file: Path) -> str | None:
    """The model's SHA-256 as the package's signed manifest pins it, or None.

    ``unpack`` checked the decoded model against it (container digest, AEAD tags, zstd
    checksums) and kept ``manifest.sig`` beside the manifest; the daemon checks
    installed versions against it at start (agent/installed.py). Hashing the model once
    more for the cache key would read the whole file again. Residual models (pinned by a
    weights digest, not a file digest) and anything without a kept signature are hashed.
    """
    if not (model_dir / "manifest.sig").is_file():
        return None
    try:
        man = json.loads((model_dir / "manifest.json").read_bytes())
        size = model_file.stat().st_size
    except (OSError, ValueError):
        return None
    for m in man.get("models") or [] if isinstance(man, dict) else []:
        if not isinstance(m, dict) or m.get("name") != entry_model:
            continue
        sha = m.get("sha256")
        if (
            isinstance(sha, str)
            and len(sha) == 64
            and m.get("size") == size
            and not m.get("base_digest")
            and not m.get("target_digest")
        ):
            return sha.lower()
    return None


def convert(
    model_dir: Path,
    *,
    entry_model: str,
    kind: str,
    cc: ConverterConfig,
    config: RuntimeConfig,
    cache_dir: Path,
) -> Converted:
    """Produce (or reuse) the validated artefact for one package on this device.

    For ONNX the result carries the validated session (``Converted.session``): the
    loader serves the very graph that was checked instead of loading it again.

    Raises:
        ConverterError: a stage failed or its result does not match the original.
        RuntimeBackendError: the original model itself does not load.
    """
    src = model_dir / "Model" / entry_model
    converter = find_package_converter(model_dir)
    needs_files = converter is not None or (
        kind == "onnxruntime"
        and (
            cc.batch == "static"
            or cc.weight_compression != "none"
            or config.onnx.graph_optimization_level != "disable"
        )
    )
    if kind == "litert" and cc.weight_compression != "none":
        raise ConverterError(
            "converter_config.weight_compression is only supported for ONNX models",
            code="unsupported-compression",
        )
    if not needs_files:
        return _select_delegates(
            src, kind=kind, cc=cc, config=config, model_dir=model_dir, result=Converted(src, kind)
        )

    key = cache_key(
        src, model_dir, kind, cc, config, model_sha256=pinned_sha256(model_dir, entry_model, src)
    )
    final = cache_dir / key
    save_optimised = True
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(cache_dir)
        hit = _reuse(final, entry_model, src)
        if hit is not None and kind == "onnxruntime":
            ok = _load_reused(hit, config)
            if not ok:
                hit = None
                save_optimised = False  # ORT's saved graph misbehaves here: serve online
        if hit is not None:
            return _select_delegates(
                hit.model_path, kind=kind, cc=cc, config=config, model_dir=model_dir, result=hit
            )
        if final.exists():
            # Damaged entry (artefact missing or altered): move it aside, rebuild.
            logger.warning("converter cache entry %s is damaged; rebuilding", final.name)
            discard_tree(final, cache_dir / f".tmp-dead-{os.getpid()}-{key[:8]}", sync=False)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{key[:8]}-", dir=cache_dir))
    except OSError as exc:
        if disk_full(exc):
            raise _full(cache_dir, entry_model) from exc
        raise ConverterError(
            f"converter cache {cache_dir} is not usable: {exc}", code="converter-cache"
        ) from None
    session: Backend | None = None
    try:
        info, session = _build(
            tmp,
            src,
            model_dir=model_dir,
            entry_model=entry_model,
            converter=converter,
            kind=kind,
            cc=cc,
            config=config,
            save_optimised=save_optimised,
        )
        info.update({"key": key, "created": time.time(), "hits": 0, "entry_model": entry_model})
        if info.get("artefact") != "package":
            info["artefact_sha256"] = file_sha256(tmp / "model" / entry_model)
        # No fsync of the artefact: an entry torn by a power cut fails its SHA-256 on
        # reuse and is rebuilt, never served. The renames below are what must be atomic.
        (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        fsync_dir(tmp, best_effort=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another worker finished the same conversion first: use theirs.
            if not (final / "info.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(cache_dir, best_effort=True)
    except BaseException as exc:
        # Whatever failed (the package's converter, ORT saving the optimised graph, our
        # own writes), a filesystem found full before the cleanup is the device's fault:
        # the version is retried later, never refused for good.
        full = disk_full(exc) or _nearly_full(cache_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if session is not None:
            session.unload()
        if full and isinstance(exc, Exception):
            raise _full(cache_dir, entry_model) from exc
        if isinstance(exc, OSError):
            raise ConverterError(
                f"cannot write the converted model to {cache_dir}: {exc}", code="converter-cache"
            ) from None
        raise
    hit = _reuse(final, entry_model, src, count=False)
    if hit is None:  # pragma: no cover - we just wrote it
        if session is not None:
            session.unload()
        raise ConverterError(f"converted artefact {final} vanished", code="converter-cache")
    hit.from_cache = False
    hit.session = session
    return _select_delegates(
        hit.model_path, kind=kind, cc=cc, config=config, model_dir=model_dir, result=hit
    )


GOLDEN = "golden.npz"
# From this size on, an ONNX model whose only conversion is ORT's graph optimisation is
# served from the package, optimised at load (see _build): measured on this project's
# models, a saved optimised graph loads ~0.1 s faster (the optimisation time, which
# does not grow with the weights) while the copy costs a full write, a full hash and
# the model's size again on disk on every update.
ONLINE_OPTIMISE_BYTES = 64 << 20


#: A cache filesystem with less than this free after a failed conversion was full.
FULL_BYTES = 1 << 20


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < FULL_BYTES
    except OSError:
        return False


def _full(cache_dir: Path, entry_model: str) -> ConverterError:
    free = shutil.disk_usage(cache_dir).free if cache_dir.exists() else 0
    return ConverterError(
        f"disk full in {cache_dir} while converting {entry_model}: "
        f"{human_bytes(free)} free after cleanup",
        code="disk-full",
    )


def _save_golden(
    path: Path, pairs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
) -> bool:
    """Keep the validated graph's inputs and outputs with the cache entry (pickle-free:
    string tensors are left out, and then the entry has no golden record)."""
    arrays: dict[str, np.ndarray] = {}
    for i, (ins, outs) in enumerate(pairs):
        for prefix, group in (("input", ins), ("output", outs)):
            for name, value in group.items():
                a = np.asarray(value)
                if a.dtype.kind == "O":
                    return False
                arrays[f"{i}/{prefix}:{name}"] = a
    if not arrays:
        return False
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return True


def _load_reused(hit: Converted, config: RuntimeConfig) -> bool:
    """Load a reused ONNX artefact into ``hit.session`` and run the golden record.

    The record holds what the validated graph answered when the entry was built: the
    artefact reloaded from disk must answer the same (ORT's saved optimised graph is
    not always equivalent to the one it optimised in memory; bit rot the SHA-256 missed
    cannot happen, but a different reload can). False: load failed or outputs differ.
    """
    from runtime.onnx_backend import OnnxBackend

    cand = OnnxBackend(hit.model_path, config, level=hit.level)
    try:
        cand.load()
        golden = hit.model_path.parent.parent / GOLDEN
        if golden.is_file():
            with np.load(golden, allow_pickle=False) as z:
                cases: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
                for k in z.files:
                    i, _, rest = k.partition("/")
                    kind, _, name = rest.partition(":")
                    ins, outs = cases.setdefault(i, ({}, {}))
                    (ins if kind == "input" else outs)[name] = z[k]
            for _i, (ins, want) in sorted(cases.items()):
                why = compare_outputs(
                    cand.predict(ins), want, config.validate_rtol, config.validate_atol
                )
                if why is not None:
                    raise ConverterError(why, code="converter-validation")
    except Exception as exc:  # a torn record (BadZipFile...) is a miss too
        cand.unload()
        why = exc.message if isinstance(exc, EdgewardError) else str(exc)
        logger.warning(
            "cached artefact %s does not reproduce its validated outputs (%s); rebuilding "
            "and serving the model with online optimisation",
            hit.model_path.parent.parent.name,
            why,
        )
        return False
    hit.session = cand
    return True


def _remove_stale_temps(cache_dir: Path) -> None:
    """Delete ``.tmp-<pid>-*`` build dirs whose process is gone (crash, kill -9)."""
    for p in cache_dir.glob(".tmp-*"):
        parts = p.name.split("-")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is None and parts[1] != "dead":
            continue
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still running: another worker is converting
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif pid == os.getpid():
            continue
        logger.info("removing stale converter temp dir %s", p.name)
        shutil.rmtree(p, ignore_errors=True)


def prune_cache(
    cache_dir: Path, *, unused_for_s: float, keep: set[Path] | None = None
) -> list[Path]:
    """Delete cache entries not used (built or reused) for ``unused_for_s`` seconds.

    ``keep`` lists artefact paths (``Converted.model_path``) in use that must stay.
    Returns the removed entry directories.
    """
    removed: list[Path] = []
    now = time.time()
    keep_dirs = {k.parent.parent for k in keep or set()}
    for entry in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if entry.name.startswith(".") or not entry.is_dir() or entry in keep_dirs:
            continue
        try:
            info = json.loads((entry / "info.json").read_text())
            last = float(info.get("last_used") or info.get("created") or 0)
        except (OSError, ValueError, TypeError):
            last = 0.0
        if now - last >= unused_for_s:
            try:
                discard_tree(
                    entry, cache_dir / f".tmp-dead-{os.getpid()}-{entry.name[:8]}", sync=False
                )
            except OSError:
                continue
            removed.append(entry)
    return removed


def _reuse(final: Path, entry_model: str, src: Path, *, count: bool = True) -> Converted | None:
    info_path = final / "info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    package = info.get("artefact") == "package"
    # "package": no copy; the cache key pins the package model's SHA-256
    model = src if package else final / "model" / entry_model
    if not model.is_file():
        return None
    want = info.get("artefact_sha256")
    if count and not package and (not isinstance(want, str) or file_sha256(model) != want):
        return None  # bit rot or tampering: never serve it
    if count:
        info["hits"] = int(info.get("hits", 0)) + 1
        info["last_used"] = time.time()
        # a lost hit count costs nothing: no fsync on every reuse
        text = json.dumps(info, indent=1, sort_keys=True).encode()
        atomic_write_bytes(info_path, text, prefix=f".info.{os.getpid()}.", sync=False)
        logger.info("converter cache hit %s (%d reuses)", final.name, info["hits"])
    return Converted(
        model_path=model,
        backend=str(info.get("backend")),
        level=info.get("serve_level"),
        from_cache=count,
        info=info,
    )


def _build(
    tmp: Path,
    src: Path,
    *,
    model_dir: Path,
    entry_model: str,
    converter: Path | None,
    kind: str,
    cc: ConverterConfig,
    config: RuntimeConfig,
    save_optimised: bool = True,
) -> tuple[dict[str, Any], Backend | None]:
    """Run all stages inside ``tmp``; returns the info record and (ONNX) the validated
    session to serve. Validates the result.

    The unconverted reference loads on a thread while the stages run (a package
    converter is a subprocess; ORT releases the GIL while it builds a session). ONNX
    is validated on the session that will serve: ORT optimises the graph at the
    configured level while it loads (saving the optimised graph into the cache for
    later starts as it goes), and that session is compared with the reference and
    handed to the loader, so one conversion costs two session loads, not four.
    """
    info: dict[str, Any] = {"backend": kind, "stages": [], "device": device_info(config)}
    out_dir = tmp / "model"
    out_dir.mkdir()
    current = src
    tol_r, tol_a = config.validate_rtol, config.validate_atol
    reference: Backend
    if kind == "onnxruntime":
        from runtime.onnx_backend import OnnxBackend

        # weights read in place from the (page-cached) file: no copy, next to no load; one
        # thread that never spins: it answers a few inputs beside the serving session's load
        quiet = dataclasses.replace(config.onnx, intra_op_threads=1, allow_spinning=False)
        reference = OnnxBackend(
            src,
            dataclasses.replace(config, onnx=quiet),
            level="disable",
            prepack=False,
            shared_weights=True,
        )
    else:
        reference = make_backend(kind, src, config)
    samples = load_samples(model_dir)
    batch = cc.batch_size or 1

    def load_and_answer() -> Answers:
        reference.load()
        return reference_answers(reference, samples, batch=batch)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="converter-reference")
    loading = pool.submit(load_and_answer)

    def ref() -> Backend:
        loading.result()  # the original model's own load error, if any, comes first
        return reference

    def answers() -> Answers:
        return loading.result()

    serving: Backend | None = None
    try:
        later_stages = kind == "onnxruntime" and (
            cc.batch == "static" or cc.weight_compression == "fp16"
        )
        level = config.onnx.graph_optimization_level
        # A weight-heavy model's load time is its bytes, which an optimised copy does not
        # shrink: ORT optimises it at every load as fast, and the entry keeps no copy.
        online = (
            kind == "onnxruntime"
            and converter is None
            and not later_stages
            and level != "disable"
            and src.stat().st_size >= ONLINE_OPTIMISE_BYTES
        )
        opt = tmp / "stage-opt.onnx" if save_optimised and level != "disable" else None
        if online:
            opt = None
        record: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        if converter is not None:
            conv_out = tmp / "converter-out"
            tail = run_package_converter(
                converter,
                model_dir,
                conv_out,
                backend=kind,
                device=device_info(config),
                timeout=config.converter_timeout_s,
            )
            produced = conv_out / entry_model
            if not produced.is_file() or produced.is_symlink():
                raise ConverterError(
                    f"package converter {converter.name} exited 0 but wrote no "
                    f"{entry_model} in its output directory"
                    + (f"; output: {' | '.join(tail.splitlines()[-3:])}" if tail else ""),
                    code="converter-output",
                )
            # ONNX with nothing after it: this session (optimised online, the graph
            # saved on the way) is the one that serves.
            final_cand = kind == "onnxruntime" and not later_stages
            if final_cand:
                from runtime.onnx_backend import OnnxBackend

                cand: Backend = OnnxBackend(produced, config, level=level, optimized_out=opt)
            else:
                cand = make_backend(kind, produced, config)
            try:
                cand.load()
            except RuntimeBackendError as exc:
                ref()
                raise ConverterError(
                    f"package converter output {entry_model} does not load: {exc.message}",
                    code="converter-output",
                ) from None
            try:
                info["package_converter"] = validate_against(
                    ref(),
                    cand,
                    samples,
                    rtol=tol_r,
                    atol=tol_a,
                    batch=batch,
                    what="package converter output",
                    record=record,
                    answers=answers(),
                )
            except BaseException:
                cand.unload()
                raise
            if final_cand:
                serving = cand
                info["validation"] = info["package_converter"]
            else:
                cand.unload()
                record.clear()
            current = produced
            info["stages"].append("package-converter")

        if kind == "onnxruntime":
            from runtime.onnx_backend import OnnxBackend

            if cc.batch == "static":
                nxt = tmp / "stage-batch.onnx"
                fix_batch(current, nxt, batch)
                current = nxt
                info["stages"].append(f"static-batch-{batch}")
            if cc.weight_compression == "fp16":
                nxt = tmp / "stage-fp16.onnx"
                fp16_weights(current, nxt)
                current = nxt
                tol_r, tol_a = max(tol_r, 1e-2), max(tol_a, 1e-2)
                info["stages"].append("fp16-weights")
            serve_level = level
            if serving is None and level != "disable":
                serving = _load_optimising(current, config, level, opt, ref)
                try:
                    info["validation"] = validate_against(
                        ref(),
                        serving,
                        samples,
                        rtol=tol_r,
                        atol=tol_a,
                        batch=batch,
                        what="converted model",
                        record=record,
                        answers=answers(),
                    )
                except ConverterError as exc:
                    # ORT's optimiser breaks this graph: serve it unoptimised instead.
                    logger.warning(
                        "ORT-optimised model rejected (%s); serving unoptimised", exc.message
                    )
                    serving.unload()
                    serving = None
                    record.clear()
                    serve_level = "disable"
                    info["stages"].append("ort-optimise-rejected")
            artefact = current
            if serving is not None and level != "disable":
                if opt is not None and opt.is_file() and opt.stat().st_size > 0:
                    artefact, serve_level = opt, "disable"
                    info["stages"].append(f"ort-optimise-{level}")
                elif opt is not None:
                    logger.warning("ORT could not save an optimised model; optimising online")
                elif online:
                    info["stages"].append(f"ort-online-{level}")
            if serving is None:
                serve_level = "disable"
                if current == src:
                    # the unconverted model itself, loaded to serve (the reference reads
                    # its weights in place from the file, unpacked for a few inputs)
                    ref()
                    serving = OnnxBackend(src, config, level="disable")
                    serving.load()
                    info["validation"] = {"validated": True, "source": "unconverted"}
                else:
                    serving = OnnxBackend(current, config, level="disable")
                    try:
                        serving.load()
                    except RuntimeBackendError as exc:
                        serving = None
                        raise ConverterError(
                            f"converted model does not load: {exc.message}",
                            code="converter-validation",
                        ) from None
                    info["validation"] = validate_against(
                        ref(),
                        serving,
                        samples,
                        rtol=tol_r,
                        atol=tol_a,
                        batch=batch,
                        what="converted model",
                        record=record,
                        answers=answers(),
                    )
            if online and artefact == src:
                info["artefact"] = "package"  # served from the package, no copy
            else:
                _place(artefact, out_dir / entry_model)
            if record:
                info["golden"] = _save_golden(tmp / GOLDEN, record)
            info["serve_level"] = serve_level
        else:
            ref()
            _place(current, out_dir / entry_model)
            info["serve_level"] = None
        ref()
    except BaseException:
        if serving is not None and serving is not reference:
            serving.unload()
        serving = None
        raise
    finally:
        with contextlib.suppress(BaseException):
            loading.result()  # never unload while it is still loading
        pool.shutdown(wait=True)
        if serving is not reference:
            reference.unload()
    for p in tmp.glob("stage-*"):
        p.unlink()
    shutil.rmtree(tmp / "converter-out", ignore_errors=True)
    return info, serving


def _load_optimising(
    model: Path,
    config: RuntimeConfig,
    level: str,
    opt: Path | None,
    ref: Callable[[], Backend],
) -> Backend:
    """The serving candidate: ``model`` optimised by ORT at ``level`` while it loads,
    the optimised graph saved to ``opt`` on the way (retried without saving if ORT
    cannot save it)."""
    from runtime.onnx_backend import OnnxBackend

    for out in (opt, None) if opt is not None else (None,):
        cand = OnnxBackend(model, config, level=level, optimized_out=out)
        try:
            cand.load()
            return cand
        except RuntimeBackendError as exc:
            why = exc.message
            if out is not None:
                logger.warning("ORT could not save an optimised model: %s", why)
                with contextlib.suppress(OSError):
                    out.unlink()
    ref()
    raise ConverterError(f"model does not load for optimisation: {why}", code="converter-failed")


def _place(current: Path, dst: Path) -> None:
    """Move (a stage file of this build) or copy a model to the artefact path.

    A package converter's output may hold side files (ONNX external data): they are
    copied along when its model is served unchanged. Nothing is fsynced: the entry's
    SHA-256, checked on every reuse, is what keeps a torn artefact from serving.
    """
    if current.parent.name == "converter-out":
        for side in current.parent.iterdir():
            if side.name != current.name and side.is_file() and not side.is_symlink():
                shutil.copyfile(side, dst.parent / side.name)
    if current.name.startswith("stage-") and current.parent == dst.parent.parent:
        os.replace(current, dst)
        return
    tmp = dst.with_name(dst.name + ".part")
    shutil.copyfile(current, tmp)
    os.replace(tmp, dst)


def _select_delegates(
    model: Path,
    *,
    kind: str,
    cc: ConverterConfig,
    config: RuntimeConfig,
    model_dir: Path,
    result: Converted,
) -> Converted:
    """LiteRT: keep the configured delegates that load and match plain CPU output."""
    if kind != "litert" or not config.litert.delegates:
        return result
    from runtime.litert_backend import LiteRTBackend

    reference = LiteRTBackend(model, config, delegates=[])
    reference.load()
    samples = load_samples(model_dir)
    chosen: list[DelegateSpec] = []
    try:
        for spec in config.litert.delegates:
            # Candidate treats the delegate as required so a skip cannot look like success.
            cand = LiteRTBackend(
                model, config, delegates=[dataclasses.replace(spec, required=True)]
            )
            try:
                cand.load()
                validate_against(
                    reference,
                    cand,
                    samples,
                    rtol=config.validate_rtol,
                    atol=config.validate_atol,
                    batch=cc.batch_size or 1,
                    what=f"delegate {spec.path}",
                )
                chosen.append(spec)
            except (RuntimeBackendError, InvalidInputError) as exc:
                if spec.required:
                    if isinstance(exc, ConverterError):
                        raise
                    raise ConverterError(
                        f"required TFLite delegate {spec.path}: {exc.message}",
                        code="delegate-load",
                    ) from None
                logger.warning("delegate %s not used: %s", spec.path, exc.message)
            finally:
                cand.unload()
    finally:
        reference.unload()
    result.delegates = chosen
    result.info["delegates"] = [d.path for d in chosen]
    return result
