"""Daemon config: defaults, the shipped TOML, and errors that name the bad key."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.config import (
    SECTIONS,
    Config,
    apply_environment,
    check_groups,
    config_to_dict,
    load_config,
    parse_config,
)
from agent.errors import ConfigError
from agent.serving.http import HTTPLimits
from runtime.config import RuntimeConfig
from runtime.providers import check_provider_names

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_and_matches_defaults() -> None:
    cfg = load_config(ROOT / "configs" / "edgeward.toml")
    d = Config()
    assert cfg.paths.state_dir == d.paths.state_dir
    assert cfg.inference.socket == Path("/run/edgeward/infer.sock")
    assert cfg.inference.mode == 0o660
    assert cfg.control.mode == 0o600
    assert cfg.inference.group == "edgeward"
    assert cfg.updates.check_interval == d.updates.check_interval
    assert cfg.runtime == RuntimeConfig()


def _uncommented(text: str) -> str:
    """The sample with every commented-out ``# key = value`` line made live."""
    return re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.M)


def test_sample_config_with_commented_keys_is_exactly_the_defaults() -> None:
    text = (ROOT / "configs" / "edgeward.toml").read_text()
    live = _uncommented(text)
    assert live.count("\n") == text.count("\n") and live != text
    cfg = parse_config(tomllib.loads(live))
    assert cfg == Config()
    assert config_to_dict(cfg) == config_to_dict(Config())
    # every key of every section appears in the sample, so it documents them all
    doc = tomllib.loads(live)
    for section, cls in SECTIONS.items():
        # (a key whose default is "unset" may be described in prose instead)
        keys = {f.name for f in dataclasses.fields(cls) if f.default is not None}
        assert keys <= set(doc[section]) <= {f.name for f in dataclasses.fields(cls)}, section
    assert set(doc["package_limits"]) == set(Config().package_limits.__dataclass_fields__)
    limit_keys = {f.name for f in dataclasses.fields(HTTPLimits) if f.default is not None}
    assert limit_keys <= set(doc["inference"]["limits"]) <= set(HTTPLimits.__dataclass_fields__)


def test_every_commented_key_of_the_sample_is_accepted() -> None:
    """Uncommenting any key of the example config (also the ``## `` sections that turn
    MQTT and the repository on) gives a config that loads: the sample documents only
    keys the parser accepts, and every key of the optional sections."""
    text = (ROOT / "configs" / "edgeward.toml").read_text()
    commented = re.compile(r"^#{1,2} ?(\[[a-z_.]+\]$|[a-z_]+ = )", flags=re.M)
    assert len(commented.findall(text)) > 40
    live = commented.sub(r"\1", text)
    assert not commented.search(live)
    doc = tomllib.loads(live)
    cfg = parse_config(doc)
    assert cfg.mqtt is not None and cfg.repository is not None
    from agent.config import MqttConfig, RepositoryConfig

    for section, cls in (("mqtt", MqttConfig), ("repository", RepositoryConfig)):
        assert set(doc[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_typed_sections_are_built_and_checked_at_load() -> None:
    cfg = parse_config(
        {
            "runtime": {"onnx": {"providers": ["CPUExecutionProvider"]}},
            "package_limits": {"max_models": 3},
            "inference": {"limits": {"max_body_bytes": 1024}},
        }
    )
    assert isinstance(cfg.runtime, RuntimeConfig)
    assert cfg.package_limits.max_models == 3
    assert cfg.inference.limits == HTTPLimits(max_body_bytes=1024)
    for doc, needle in (
        ({"runtime": {"onnx": {"provider": ["x"]}}}, "runtime.onnx.provider"),
        ({"package_limits": {"max_model": 3}}, "package_limits.max_model"),
        ({"package_limits": {"max_models": -1}}, "package_limits.max_models"),
        ({"inference": {"limits": {"header_timeout": 1.0}}}, "inference.limits.header_timeout"),
        ({"inference": {"limits": {"max_body_bytes": "1M"}}}, "inference.limits.max_body_bytes"),
        ({"daemon": {"log_format": "xml"}}, "daemon.log_format"),
        ({"metrics": {"mode": "0666"}}, "metrics.mode"),
        ({"metrics": {"socket": "/run/edgeward/control.sock"}}, "metrics.socket"),
    ):
        with pytest.raises(ConfigError) as ei:
            parse_config(doc)
        assert needle in ei.value.message, (doc, ei.value.message)


def test_misspelled_provider_fails_at_check_not_at_first_package() -> None:
    bad = parse_config({"runtime": {"onnx": {"providers": ["CUDAExecutonProvider"]}}})
    with pytest.raises(ConfigError, match="CUDAExecutonProvider") as ei:
        check_provider_names(bad.runtime.onnx)
    assert "runtime.onnx.providers" in ei.value.message
    good = parse_config({"runtime": {"onnx": {"providers": ["CUDAExecutionProvider"]}}})
    check_provider_names(good.runtime.onnx)  # known to ORT, even if not on this box


def test_environment_overrides() -> None:
    env = {
        "EDGEWARD_DAEMON_LOG_LEVEL": "debug",
        "EDGEWARD_UPDATES_CHECK_INTERVAL": "60",
        "EDGEWARD_INFERENCE_MODE": "0600",
        "EDGEWARD_INFERENCE_SOCKET": "/tmp/x/infer.sock",
        "EDGEWARD_UPDATES_CHECK_ON_START": "false",
        "EDGEWARD_PACKAGE_LIMITS_MAX_MODELS": "2",
        "EDGEWARD_E2E_REQUIRED": "1",  # not a section: ignored
    }
    cfg = parse_config(apply_environment({"daemon": {"log_level": "error"}}, env))
    assert cfg.daemon.log_level == "debug"
    assert cfg.updates.check_interval == 60.0 and cfg.updates.check_on_start is False
    assert cfg.inference.mode == 0o600
    assert cfg.inference.socket == Path("/tmp/x/infer.sock")
    assert cfg.package_limits.max_models == 2
    with pytest.raises(ConfigError, match="EDGEWARD_DAEMON_LOGLEVEL") as ei:
        apply_environment({}, {"EDGEWARD_DAEMON_LOGLEVEL": "debug"})
    assert "log_level" in ei.value.message
    with pytest.raises(ConfigError, match=r"daemon\.log_level"):
        parse_config(apply_environment({}, {"EDGEWARD_DAEMON_LOG_LEVEL": "loud"}))


def test_load_config_reads_environment_only_when_given(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[daemon]\nlog_level = "warning"\n')
    env = {"EDGEWARD_DAEMON_LOG_LEVEL": "debug"}
    assert load_config(f).daemon.log_level == "warning"
    assert load_config(f, environ=env).daemon.log_level == "debug"


@pytest.mark.e2e
def test_config_check_command(tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "agent", "config", "check"]
    good = tmp_path / "good.toml"
    good.write_text((ROOT / "configs" / "edgeward.toml").read_text())
    res = subprocess.run(
        [*exe, "--no-groups", str(good)], check=False, capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stderr
    res = subprocess.run(
        [*exe, "--no-groups", "--json", str(good)], check=False, capture_output=True, text=True
    )
    assert json.loads(res.stdout)["config"]["inference"]["mode"] == "0660"
    bad = tmp_path / "bad.toml"
    bad.write_text('[runtime.onnx]\nproviders = ["CUDAExecutonProvider"]\n')
    res = subprocess.run(
        [*exe, "--no-groups", str(bad)], check=False, capture_output=True, text=True
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "runtime.onnx.providers" in lines[0], res.stderr
    bad.write_text('[inference]\ngroup = "no-such-group-xyz"\n')
    res = subprocess.run([*exe, str(bad)], check=False, capture_output=True, text=True)
    assert res.returncode == 2 and "inference.group" in res.stderr
    res = subprocess.run(
        [*exe, str(good)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "EDGEWARD_DAEMON_LOG_FORMAT": "yaml"},
    )
    assert res.returncode == 2 and "daemon.log_format" in res.stderr


def test_empty_config_is_defaults() -> None:
    assert parse_config({}) == Config()


@pytest.mark.parametrize(
    ("doc", "needle", "code"),
    [
        ({"inference": {"sockt": "/x"}}, "inference.sockt", "config-key"),
        ({"inference": {"mode": "0666"}}, "inference.mode", "config-mode"),
        ({"control": {"mode": "rw"}}, "control.mode", "config-mode"),
        ({"updates": {"jitter": 2}}, "updates.jitter", "config-range"),
        ({"updates": {"check_interval": "1h"}}, "updates.check_interval", "config-type"),
        ({"daemon": {"log_level": "loud"}}, "daemon.log_level", "config-value"),
        ({"daemon": {"drain_timeout": True}}, "daemon.drain_timeout", "config-type"),
        ({"paths": {"state_dir": 3}}, "paths.state_dir", "config-type"),
        ({"inferense": {}}, "[inferense]", "config-key"),
        ({"runtime": 3}, "[runtime]", "config-type"),
        (
            {"control": {"socket": "/run/a.sock"}, "inference": {"socket": "/run/a.sock"}},
            "control.socket",
            "config-value",
        ),
    ],
)
def test_bad_values_name_the_key(doc: dict[str, object], needle: str, code: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert needle in ei.value.message
    assert ei.value.code == code


def test_missing_group_named() -> None:
    cfg = parse_config({"inference": {"group": ""}, "control": {"admin_group": "no-such-grp-x"}})
    with pytest.raises(ConfigError, match=r"control\.admin_group") as ei:
        check_groups(cfg)
    assert ei.value.code == "config-group"
    check_groups(parse_config({"inference": {"group": "root"}}))


def test_unknown_key_lists_allowed() -> None:
    with pytest.raises(ConfigError, match=r"allowed: .*drain_timeout"):
        parse_config({"daemon": {"drain": 1}})


def test_values_are_typed(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        """
[paths]
state_dir = "/tmp/s"
cache_dir = ""
[inference]
mode = "0640"
group = ""
[inference.limits]
max_body_bytes = 1024
[updates]
check_interval = 5
[runtime.onnx]
intra_op_threads = 1
"""
    )
    cfg = load_config(p)
    assert cfg.paths.state_dir == Path("/tmp/s")
    assert cfg.paths.cache_dir is None
    assert cfg.paths.resolved_cache_dir == Path("/tmp/s/cache")
    assert cfg.inference.mode == 0o640
    assert cfg.inference.group is None
    assert cfg.inference.limits == HTTPLimits(max_body_bytes=1024)
    assert cfg.updates.check_interval == 5.0
    assert cfg.runtime.onnx.intra_op_threads == 1
    assert cfg.source == p


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[paths\n")
    with pytest.raises(ConfigError, match="invalid TOML") as ei:
        load_config(p)
    assert ei.value.code == "config-syntax"
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
