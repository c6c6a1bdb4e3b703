"""Open an unpacked package for serving: read Meta-info, convert (cached), validate,
load the backend, wrap the run script. This is what one worker process holds.

See docs/RUNTIME.md for the package contract and docs/INTERFACES.md for the layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import (
    ConfigError,
    EdgewardError,
    MetaInfoError,
    RuntimeBackendError,
)
from runtime.backend import BACKEND_KINDS, Backend, make_backend
from runtime.config import RuntimeConfig
from runtime.converter import (
    Converted,
    ConverterConfig,
    compare_outputs,
    convert,
    load_samples,
    random_inputs,
)
from runtime.preprocess import Preprocessing
from runtime.scripts import RunScript, load_run_script

logger = logging.getLogger(__name__)

DEFAULT_RUN_SCRIPT = "Program/Scripts/run.py"
_EXT_BACKEND = {".onnx": "onnxruntime", ".ort": "onnxruntime", ".tflite": "litert"}


@dataclass(frozen=True)
class PackageInfo:
    """What the runtime reads out of an unpacked package."""

    name: str
    version: str
    backend: str
    entry_model: str
    run_script: Path | None
    runtime_config: dict[str, Any] = field(default_factory=dict)
    converter_config: ConverterConfig = field(default_factory=ConverterConfig)
    image_inputs: tuple[str, ...] = ()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MetaInfoError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MetaInfoError(f"{what} must be a JSON object")
    return data


def _inside(root: Path, rel: str, what: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise MetaInfoError(f"{what} {rel!r} points outside the package")
    return p


def read_package(model_dir: Path) -> PackageInfo:
    """Parse manifest.json and Meta-info/*.json of an unpacked package.

    Raises:
        MetaInfoError: technicalinfo is malformed or names files that do not exist.
    """
    model_dir = Path(model_dir)
    manifest = _read_json(model_dir / "manifest.json", "manifest.json")
    mgmt = _read_json(model_dir / "Meta-info" / "managementinfo.json", "managementinfo.json")
    tech = _read_json(model_dir / "Meta-info" / "technicalinfo.json", "technicalinfo.json")
    rc = tech.get("runtime_config") or {}
    if not isinstance(rc, dict):
        raise MetaInfoError("technicalinfo.runtime_config must be an object")

    entry = rc.get("entry_model")
    if entry is None:
        models = manifest.get("models") or []
        if models and isinstance(models[0], Mapping) and models[0].get("name"):
            entry = str(models[0]["name"])
        else:
            files = sorted(p.name for p in (model_dir / "Model").glob("*") if p.is_file())
            if not files:
                raise MetaInfoError(f"{model_dir}: Model/ holds no model file")
            entry = files[0]
    if not isinstance(entry, str) or "/" in entry or entry in ("", ".", ".."):
        raise MetaInfoError(f"runtime_config.entry_model must be a Model/ file name: {entry!r}")
    if not (model_dir / "Model" / entry).is_file():
        raise MetaInfoError(f"runtime_config.entry_model Model/{entry} does not exist")

    backend = rc.get("backend") or _EXT_BACKEND.get(Path(entry).suffix.lower())
    if backend == "tflite":
        backend = "litert"
    if backend not in BACKEND_KINDS:
        raise MetaInfoError(
            f"runtime_config.backend must be one of {', '.join(BACKEND_KINDS)}, got {backend!r}"
        )

    script: Path | None = None
    if rc.get("run_script"):
        script = _inside(model_dir, str(rc["run_script"]), "runtime_config.run_script")
        if not script.is_file():
            raise MetaInfoError(f"runtime_config.run_script {rc['run_script']} does not exist")
    elif (model_dir / DEFAULT_RUN_SCRIPT).is_file():
        script = model_dir / DEFAULT_RUN_SCRIPT

    image_inputs: list[str] = []
    for d in rc.get("inputs") or []:
        if isinstance(d, Mapping) and d.get("name"):
            kind = str(d.get("modality") or d.get("data_type") or d.get("type") or "").lower()
            if kind == "image":
                image_inputs.append(str(d["name"]))

    def pick(*vals: Any) -> str:
        for v in vals:
            if isinstance(v, str | int | float) and not isinstance(v, bool) and str(v):
                return str(v)
        return ""

    name = pick(manifest.get("name"), mgmt.get("name"), mgmt.get("model_name"), model_dir.name)
    version = pick(manifest.get("version"), mgmt.get("version"), "1")
    return PackageInfo(
        name=name,
        version=version,
        backend=str(backend),
        entry_model=entry,
        run_script=script,
        runtime_config=dict(rc),
        converter_config=ConverterConfig.from_dict(tech.get("converter_config")),
        image_inputs=tuple(image_inputs),
    )


class Servable:
    """A converted, validated, loaded model (plus its run script) ready to predict.

    ``predict`` is thread-safe: the backends are, and a run script that does not set
    ``thread_safe = True`` is serialised by the host.
    """

    def __init__(
        self,
        info: PackageInfo,
        model_dir: Path,
        *,
        backend: Backend,
        config: RuntimeConfig,
        converted: Converted,
        script: RunScript | None = None,
        warmed: bool = False,
    ):
        self.info = info
        # the backend already ran on the warm-up's input (the converter's validation)
        self._warmed = warmed
        self.name = info.name
        self.version = info.version
        self.model_dir = model_dir
        self.backend = backend
        self.config = config
        self.converted = converted
        self.script = script
        self._pre: dict[str, Preprocessing] = {}
        pre = info.converter_config.preprocessing
        if pre is not None and script is None:
            names = list(info.image_inputs)
            if not names:
                four_d = [s.name for s in backend.inputs if s.shape and len(s.shape) == 4]
                names = four_d[:1] if len(four_d) == 1 else []
            self._pre = {n: pre for n in names}

    @property
    def ready(self) -> bool:
        return self.backend.ready

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Named arrays in, named arrays out (through the run script if there is one).

        Raises:
            InvalidInputError: the request does not match the signature (status 400).
            RunScriptError: the run script failed.
            RuntimeBackendError: the engine failed.
        """
        if self.script is not None:
            return self.script.predict(inputs)
        if self._pre:
            specs = {s.name: s for s in self.backend.inputs}
            inputs = dict(inputs)
            for n, pre in self._pre.items():
                v = inputs.get(n)
                # A model that itself takes uint8 (quantised TFLite) gets its bytes as is.
                if (
                    isinstance(v, np.ndarray)
                    and v.dtype == np.uint8
                    and n in specs
                    and specs[n].dtype != np.uint8
                ):
                    inputs[n] = pre.apply(v, specs[n].dtype, n)
        return self.backend.predict(inputs)

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata: name, versions, platform, inputs, outputs."""
        meta = self.backend.metadata()
        if self.script is not None:
            smeta = self.script.metadata()
            if smeta is not None:
                meta = {**meta, **smeta}
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": meta.get("platform", self.backend.platform),
            "inputs": meta["inputs"],
            "outputs": meta["outputs"],
        }

    def warmup(self) -> bool:
        """Run the backend once so first-request latency excludes lazy initialisation.

        Uses the first model-level sample, else seeded random inputs from the signature
        (see docs/RUNTIME.md). Returns False if the model refused the warm-up input
        (logged; not an error: a model may need specific sizes). A session the converter
        just validated ran on that very input already: nothing to do then.
        """
        if self._warmed:
            self._warmed = False
            return True
        names = {s.name for s in self.backend.inputs}
        feed = next((ins for _, ins, _ in load_samples(self.model_dir) if set(ins) == names), None)
        if feed is None:
            batch = self.info.converter_config.batch_size or 1
            feed = random_inputs(self.backend.inputs, batch=batch)
        try:
            self.backend.predict(feed)
        except EdgewardError as exc:
            logger.info("%s %s: warm-up input refused: %s", self.name, self.version, exc.message)
            return False
        return True

    def close(self) -> None:
        if self.script is not None:
            self.script.close()
            self.script = None
        self.backend.unload()


def prefetch() -> None:
    """What a model worker does while it waits for its model (agent/serving/worker_main.py):
    import onnxruntime and compute the device fingerprint the converter cache key hashes,
    so neither is on an update's critical path (~0.1 s on the 2-core VM). It starts no
    thread that runs package code and reads nothing of a package."""
    from runtime.fingerprint import device_info

    device_info()


def open_model(
    model_dir: Path,
    config: RuntimeConfig | None = None,
    *,
    cache_dir: Path | None = None,
) -> Servable:
    """Convert (or reuse the cached conversion), validate, load and wrap one package.

    Raises:
        MetaInfoError: technicalinfo is malformed.
        ConverterError: a conversion stage failed or its output does not validate.
        RunScriptError: the run script fails to import or initialise.
        RuntimeBackendError: the model does not load.
    """
    model_dir = Path(model_dir)
    base = config if config is not None else RuntimeConfig()
    cache = cache_dir if cache_dir is not None else base.cache_dir
    if cache is None:
        raise ConfigError("runtime.cache_dir is not set and open_model got no cache_dir")
    info = read_package(model_dir)
    cfg = base.with_package(info.runtime_config)
    converted = convert(
        model_dir,
        entry_model=info.entry_model,
        kind=info.backend,
        cc=info.converter_config,
        config=cfg,
        cache_dir=Path(cache),
    )
    # The converter hands over the session it validated (or checked on reuse): serving
    # it saves loading the model once more.
    backend = converted.session if converted.session is not None else None
    checked = (converted.info.get("validation") or {}).get("checked", 0)
    # a fresh build validated this session on the warm-up's inputs (a reused one may not
    # have run at all: no golden record)
    warmed = backend is not None and not converted.from_cache and isinstance(checked, int)
    warmed = warmed and checked > 0
    converted.session = None
    if backend is None:
        backend = _make_loaded_backend(converted, cfg)
    script = None
    if info.run_script is not None:
        try:
            script = load_run_script(
                info.run_script,
                model_dir,
                backend,
                {
                    "runtime_config": info.runtime_config,
                    "converter_config": info.converter_config.raw,
                },
            )
        except BaseException:
            backend.unload()
            raise
    logger.info(
        "opened %s %s (%s, %s%s)",
        info.name,
        info.version,
        info.backend,
        converted.model_path.name,
        ", cached" if converted.from_cache else "",
    )
    return Servable(
        info,
        model_dir,
        backend=backend,
        config=cfg,
        converted=converted,
        script=script,
        warmed=warmed,
    )


def _make_loaded_backend(converted: Converted, cfg: RuntimeConfig) -> Backend:
    backend: Backend
    if converted.backend == "onnxruntime":
        from runtime.onnx_backend import OnnxBackend

        backend = OnnxBackend(converted.model_path, cfg, level=converted.level)
    elif converted.backend == "litert":
        from runtime.litert_backend import LiteRTBackend

        backend = LiteRTBackend(converted.model_path, cfg, delegates=converted.delegates)
    else:
        backend = make_backend(converted.backend, converted.model_path, cfg)
    backend.load()
    return backend


def self_test(servable: Servable, model_dir: Path | None = None) -> int:
    """Run ``Meta-info/samples/*.npz`` through the servable and compare outputs.

    Samples whose inputs are the servable's inputs go through :meth:`Servable.predict`;
    samples whose inputs are the bare model's (a package with a run script may ship
    both) go to the backend. Returns the number of samples checked.

    Raises:
        RuntimeBackendError: code ``self-test``, naming the sample and the output.
    """
    mdir = Path(model_dir) if model_dir is not None else servable.model_dir
    meta_inputs = {d["name"] for d in servable.metadata()["inputs"]}
    model_inputs = {s.name for s in servable.backend.inputs}
    rtol, atol = servable.config.validate_rtol, servable.config.validate_atol
    checked = 0
    for sample, ins, want in load_samples(mdir):
        if not want:
            continue
        try:
            if set(ins) == meta_inputs:
                got = servable.predict(ins)
            elif set(ins) == model_inputs:
                got = servable.backend.predict(ins)
            else:
                raise RuntimeBackendError(
                    f"self-test sample {sample}: inputs {sorted(ins)} match neither the "
                    f"model ({sorted(meta_inputs)}) nor the backend ({sorted(model_inputs)})",
                    code="self-test",
                )
        except RuntimeBackendError as exc:
            if exc.code == "self-test":
                raise
            raise RuntimeBackendError(
                f"self-test sample {sample} failed: {exc.message}", code="self-test"
            ) from exc
        except EdgewardError as exc:
            raise RuntimeBackendError(
                f"self-test sample {sample} failed: {exc.message}", code="self-test"
            ) from exc
        why = compare_outputs(got, want, rtol, atol)
        if why is not None:
            raise RuntimeBackendError(f"self-test sample {sample}: {why}", code="self-test")
        checked += 1
    return checked
