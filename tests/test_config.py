"""Daemon config: defaults, the shipped TOML, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, check_groups, load_config, parse_config
from agent.errors import ConfigError

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
    assert isinstance(cfg.runtime, dict)


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
[runtime]
intra_op_threads = 1
"""
    )
    cfg = load_config(p)
    assert cfg.paths.state_dir == Path("/tmp/s")
    assert cfg.paths.cache_dir is None
    assert cfg.paths.resolved_cache_dir == Path("/tmp/s/cache")
    assert cfg.inference.mode == 0o640
    assert cfg.inference.group is None
    assert cfg.inference.limits == {"max_body_bytes": 1024}
    assert cfg.updates.check_interval == 5.0
    assert cfg.runtime == {"intra_op_threads": 1}
    assert cfg.source == p


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[paths\n")
    with pytest.raises(ConfigError, match="invalid TOML") as ei:
        load_config(p)
    assert ei.value.code == "config-syntax"
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
