"""runtime.config: typed, validated runtime configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from runtime.config import DelegateSpec, RuntimeConfig


def test_defaults() -> None:
    cfg = RuntimeConfig.from_dict({})
    assert cfg == RuntimeConfig()
    assert cfg.onnx.providers == ["CPUExecutionProvider"]
    assert cfg.onnx.graph_optimization_level == "all"
    assert cfg.litert.delegates == []
    assert cfg.converter_timeout_s == 300.0
    assert cfg.cache_dir is None


def test_full_table() -> None:
    cfg = RuntimeConfig.from_dict(
        {
            "onnx": {
                "providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"],
                "provider_options": {"XnnpackExecutionProvider": {"intra_op_num_threads": 2}},
                "intra_op_threads": 2,
                "inter_op_threads": 1,
                "graph_optimization_level": "extended",
                "unavailable_providers": "error",
                "allow_spinning": False,
            },
            "litert": {
                "num_threads": 4,
                "delegates": [{"path": "/usr/lib/libnpu.so", "options": {"cache": 1}}, "/x.so"],
                "use_xnnpack": False,
                "pool_size": 2,
            },
            "converter_timeout_s": 12,
            "cache_dir": "/var/cache/x",
            "validate_rtol": 0.01,
            "validate_atol": 0,
        }
    )
    assert cfg.onnx.intra_op_threads == 2
    assert cfg.onnx.graph_optimization_level == "extended"
    assert cfg.onnx.allow_spinning is False
    assert cfg.litert.delegates == [
        DelegateSpec("/usr/lib/libnpu.so", {"cache": "1"}),
        DelegateSpec("/x.so"),
    ]
    assert cfg.litert.pool_size == 2
    assert cfg.converter_timeout_s == 12.0
    assert cfg.cache_dir == Path("/var/cache/x")
    assert cfg.validate_atol == 0.0
    # Round trip through the JSON-able form (how a worker process receives it).
    assert RuntimeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("d", "words"),
    [
        ({"onnx": {"graph_optimization_level": "max"}}, ["graph_optimization_level", "extended"]),
        ({"onnx": {"providers": []}}, ["runtime.onnx.providers"]),
        ({"onnx": {"threads": 2}}, ["runtime.onnx.threads", "intra_op_threads"]),
        ({"onnx": {"intra_op_threads": -1}}, ["intra_op_threads"]),
        ({"litert": {"delegates": [{"options": {}}]}}, ["delegates[0].path"]),
        ({"litert": {"pool_size": 0}}, ["pool_size"]),
        ({"litert": {"use_xnnpack": "yes"}}, ["use_xnnpack"]),
        ({"converter_timeout_s": 0}, ["converter_timeout_s"]),
        ({"converter_timeout": 5}, ["runtime.converter_timeout", "converter_timeout_s"]),
        ({"onnx": {"unavailable_providers": "ignore"}}, ["fallback", "error"]),
        ({"onnx": {"allow_spinning": 1}}, ["allow_spinning"]),
    ],
)
def test_bad_keys_are_named(d: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        RuntimeConfig.from_dict(d)
    for w in words:
        assert w in ei.value.message


def test_package_tunes_only_what_device_left_unset() -> None:
    device = RuntimeConfig.from_dict({"onnx": {"intra_op_threads": 1}})
    merged = device.with_package(
        {
            "backend": "onnxruntime",
            "onnx": {"intra_op_threads": 4, "graph_optimization_level": "basic"},
            "litert.num_threads": 3,
            "validate_rtol": 0.05,
            # Not tunable by a package: ignored.
            "converter_timeout_s": 9999,
            "onnx.providers": ["CUDAExecutionProvider"],
        }
    )
    assert merged.onnx.intra_op_threads == 1  # device wins
    assert merged.onnx.graph_optimization_level == "basic"
    assert merged.litert.num_threads == 3
    assert merged.validate_rtol == 0.05
    assert merged.converter_timeout_s == 300.0
    assert merged.onnx.providers == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match=r"runtime_config\.onnx\.graph_optimization_level"):
        device.with_package({"onnx": {"graph_optimization_level": "turbo"}})
