"""Typed runtime configuration.

The device side (the daemon's TOML ``[runtime]`` section) decides *how* models run on
this box: execution providers, delegates, threads, converter timeout, cache location.
A package's ``technicalinfo.json`` ``runtime_config`` may suggest tuning values (threads,
graph optimisation level, validation tolerances) but only for keys the device did not
set explicitly, and never the providers, delegates, timeouts or paths: those load native
code or spend device resources, so only the device owner chooses them.

Every key is validated at load; a bad key raises :class:`ConfigError` naming the key and
the allowed values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from agent.errors import ConfigError

GraphLevel = Literal["disable", "basic", "extended", "all"]
GRAPH_LEVELS: tuple[str, ...] = ("disable", "basic", "extended", "all")
ProviderPolicy = Literal["fallback", "error"]
PROVIDER_POLICIES: tuple[str, ...] = ("fallback", "error")

# Keys a package's runtime_config may tune (when the device left them unset).
PACKAGE_TUNABLE: frozenset[str] = frozenset(
    {
        "onnx.intra_op_threads",
        "onnx.inter_op_threads",
        "onnx.graph_optimization_level",
        "litert.num_threads",
        "litert.use_xnnpack",
        "validate_rtol",
        "validate_atol",
    }
)


@dataclass(frozen=True)
class OnnxOptions:
    """ONNX Runtime session options.

    ``providers`` are tried in order. A provider ORT does not know at all (a typo) is a
    :class:`ConfigError`; a known provider this ORT build or box lacks is dropped with a
    warning (``unavailable_providers="fallback"``, the default, so one fleet-wide config
    works on boxes with and without the accelerator) or refused
    (``unavailable_providers="error"``). CPU is always appended as the last resort.
    """

    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    graph_optimization_level: GraphLevel = "all"
    unavailable_providers: ProviderPolicy = "fallback"
    # ORT worker threads busy-wait between ops by default; with several model workers on
    # a small box that burns cores. None = ORT default.
    allow_spinning: bool | None = None


@dataclass(frozen=True)
class DelegateSpec:
    """An external TFLite delegate (for example a vendor NPU driver).

    ``required=True`` (default): a missing ``.so`` or a delegate that fails to load or
    to validate is an error. ``required=False``: it is dropped with a warning and the
    model runs on the CPU (XNNPACK).
    """

    path: str
    options: dict[str, str] = field(default_factory=dict)
    required: bool = True


@dataclass(frozen=True)
class LiteRTOptions:
    """LiteRT / TFLite interpreter options.

    ``pool_size`` interpreters are created; TFLite interpreters are not thread-safe, so
    each call checks one out of the pool (callers beyond the pool size wait).
    """

    num_threads: int | None = None
    delegates: list[DelegateSpec] = field(default_factory=list)
    use_xnnpack: bool = True
    pool_size: int = 1


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything the runtime needs to convert, load and run one model."""

    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    litert: LiteRTOptions = field(default_factory=LiteRTOptions)
    converter_timeout_s: float = 300.0  # seconds a package converter may run
    cache_dir: Path | None = None  # converted artefacts; None = caller passes cache_dir
    validate_rtol: float = 1e-3
    validate_atol: float = 1e-4
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RuntimeConfig:
        """Build from a TOML ``[runtime]`` table (nested ``onnx``/``litert`` tables).

        Raises:
            ConfigError: unknown key or bad value; the message names ``runtime.<key>``.
        """
        d = dict(d or {})
        explicit: set[str] = set()
        _check_keys(d, _field_names(cls) - {"explicit"}, "runtime")
        onnx = _onnx_from(d.get("onnx", {}), explicit)
        litert = _litert_from(d.get("litert", {}), explicit)
        kwargs: dict[str, Any] = {"onnx": onnx, "litert": litert, "explicit": frozenset()}
        if "converter_timeout_s" in d:
            kwargs["converter_timeout_s"] = _positive_float(
                d["converter_timeout_s"], "runtime.converter_timeout_s"
            )
        if "cache_dir" in d:
            if not isinstance(d["cache_dir"], str | Path) or not str(d["cache_dir"]):
                raise ConfigError("runtime.cache_dir must be a path string")
            kwargs["cache_dir"] = Path(d["cache_dir"])
        for key in ("validate_rtol", "validate_atol"):
            if key in d:
                kwargs[key] = _nonneg_float(d[key], f"runtime.{key}")
        explicit.update(k for k in d if k not in ("onnx", "litert"))
        kwargs["explicit"] = frozenset(explicit)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (used to hand the config to a worker process)."""
        out = dataclasses.asdict(self)
        out.pop("explicit")
        out["cache_dir"] = str(self.cache_dir) if self.cache_dir is not None else None
        if out["cache_dir"] is None:
            del out["cache_dir"]
        for k in (
            "onnx.intra_op_threads",
            "onnx.inter_op_threads",
            "onnx.allow_spinning",
            "litert.num_threads",
        ):
            sect, key = k.split(".")
            if out[sect][key] is None:
                del out[sect][key]
        return out

    def with_package(self, package_runtime_config: Mapping[str, Any] | None) -> RuntimeConfig:
        """Apply a package's tuning suggestions where the device left the key unset.

        Only :data:`PACKAGE_TUNABLE` keys are read (flat ``"onnx.intra_op_threads"`` or
        nested ``{"onnx": {...}}``); other keys in ``runtime_config`` (backend,
        entry_model, inputs, ...) are not runtime options and are ignored here.

        Raises:
            ConfigError: a tunable key has a bad value (names ``runtime_config.<key>``).
        """
        if not package_runtime_config:
            return self
        flat: dict[str, Any] = {}
        for k, v in package_runtime_config.items():
            if k in ("onnx", "litert") and isinstance(v, Mapping):
                for k2, v2 in v.items():
                    flat[f"{k}.{k2}"] = v2
            else:
                flat[k] = v
        chosen = {k: v for k, v in flat.items() if k in PACKAGE_TUNABLE and k not in self.explicit}
        if not chosen:
            return self
        onnx_d = {k.split(".", 1)[1]: v for k, v in chosen.items() if k.startswith("onnx.")}
        lite_d = {k.split(".", 1)[1]: v for k, v in chosen.items() if k.startswith("litert.")}
        top = {k: v for k, v in chosen.items() if "." not in k}
        try:
            onnx = dataclasses.replace(self.onnx, **_onnx_kwargs(onnx_d, set()))
            litert = dataclasses.replace(self.litert, **_litert_kwargs(lite_d, set()))
            tol: dict[str, Any] = {k: _nonneg_float(v, f"runtime.{k}") for k, v in top.items()}
        except ConfigError as exc:
            raise ConfigError(
                f"package {exc.message.replace('runtime.', 'runtime_config.', 1)}"
            ) from None
        return dataclasses.replace(self, onnx=onnx, litert=litert, **tol)


# --- helpers -------------------------------------------------------------------------


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(
                f"{where}.{k} is not a known key; allowed: {', '.join(sorted(allowed))}"
            )


def _positive_float(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ConfigError(f"{key} must be a positive number, got {v!r}")
    return float(v)


def _nonneg_float(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ConfigError(f"{key} must be a number >= 0, got {v!r}")
    return float(v)


def _threads(v: Any, key: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{key} must be an integer >= 0 (0 = library default), got {v!r}")
    return v


def _onnx_from(d: Any, explicit: set[str]) -> OnnxOptions:
    if not isinstance(d, Mapping):
        raise ConfigError("runtime.onnx must be a table")
    return OnnxOptions(**_onnx_kwargs(d, explicit))


def _onnx_kwargs(d: Mapping[str, Any], explicit: set[str]) -> dict[str, Any]:
    _check_keys(d, _field_names(OnnxOptions), "runtime.onnx")
    out: dict[str, Any] = {}
    if "providers" in d:
        p = d["providers"]
        if isinstance(p, str):
            p = [p]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) and x for x in p):
            raise ConfigError(
                "runtime.onnx.providers must be a non-empty list of provider names, "
                'e.g. ["CPUExecutionProvider"]'
            )
        out["providers"] = list(p)
    if "provider_options" in d:
        po = d["provider_options"]
        if not isinstance(po, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in po.items()
        ):
            raise ConfigError(
                "runtime.onnx.provider_options must map provider name -> table of options"
            )
        out["provider_options"] = {k: dict(v) for k, v in po.items()}
    for key in ("intra_op_threads", "inter_op_threads"):
        if key in d:
            out[key] = _threads(d[key], f"runtime.onnx.{key}")
    if "graph_optimization_level" in d:
        lvl = d["graph_optimization_level"]
        if lvl not in GRAPH_LEVELS:
            raise ConfigError(
                f"runtime.onnx.graph_optimization_level must be one of "
                f"{', '.join(GRAPH_LEVELS)}; got {lvl!r}"
            )
        out["graph_optimization_level"] = cast(GraphLevel, lvl)
    if "allow_spinning" in d:
        if not isinstance(d["allow_spinning"], bool):
            raise ConfigError("runtime.onnx.allow_spinning must be true or false")
        out["allow_spinning"] = d["allow_spinning"]
    if "unavailable_providers" in d:
        pol = d["unavailable_providers"]
        if pol not in PROVIDER_POLICIES:
            raise ConfigError(
                f"runtime.onnx.unavailable_providers must be one of "
                f"{', '.join(PROVIDER_POLICIES)}; got {pol!r}"
            )
        out["unavailable_providers"] = pol
    explicit.update(f"onnx.{k}" for k in d)
    return out


def _litert_from(d: Any, explicit: set[str]) -> LiteRTOptions:
    if not isinstance(d, Mapping):
        raise ConfigError("runtime.litert must be a table")
    return LiteRTOptions(**_litert_kwargs(d, explicit))


def _litert_kwargs(d: Mapping[str, Any], explicit: set[str]) -> dict[str, Any]:
    _check_keys(d, _field_names(LiteRTOptions), "runtime.litert")
    out: dict[str, Any] = {}
    if "num_threads" in d:
        out["num_threads"] = _threads(d["num_threads"], "runtime.litert.num_threads")
    if "use_xnnpack" in d:
        if not isinstance(d["use_xnnpack"], bool):
            raise ConfigError("runtime.litert.use_xnnpack must be true or false")
        out["use_xnnpack"] = d["use_xnnpack"]
    if "pool_size" in d:
        ps = d["pool_size"]
        if isinstance(ps, bool) or not isinstance(ps, int) or not 1 <= ps <= 64:
            raise ConfigError(f"runtime.litert.pool_size must be an integer 1..64, got {ps!r}")
        out["pool_size"] = ps
    if "delegates" in d:
        dl = d["delegates"]
        if not isinstance(dl, list):
            raise ConfigError("runtime.litert.delegates must be a list of {path, options}")
        specs = []
        for i, raw in enumerate(dl):
            where = f"runtime.litert.delegates[{i}]"
            item = {"path": raw} if isinstance(raw, str) else raw
            if not isinstance(item, Mapping):
                raise ConfigError(f"{where} must be a table with a path")
            _check_keys(item, {"path", "options", "required"}, where)
            path = item.get("path")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{where}.path must be the delegate's .so path")
            opts = item.get("options", {})
            if not isinstance(opts, Mapping):
                raise ConfigError(f"{where}.options must be a table of strings")
            req = item.get("required", True)
            if not isinstance(req, bool):
                raise ConfigError(f"{where}.required must be true or false")
            specs.append(DelegateSpec(path, {str(k): str(v) for k, v in opts.items()}, req))
        out["delegates"] = specs
    explicit.update(f"litert.{k}" for k in d)
    return out
