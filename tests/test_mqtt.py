"""agent/mqtt.py without a broker: command parsing, topics, backoff, the rate limit,
the status document, the device id and the [mqtt] config section."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import BrokerAddress, Config, PathsConfig, parse_config
from agent.errors import ConfigError
from agent.mqtt import (
    Backoff,
    CheckScheduler,
    Command,
    CommandError,
    CommandLimits,
    Topics,
    device_id_for,
    parse_command,
    status_document,
)

# --- commands ---------------------------------------------------------------------------


def test_valid_commands() -> None:
    assert parse_command(b'{"cmd":"check","id":"a1"}') == Command("check", "a1")
    assert parse_command(b'{"cmd":"check","id":"a1","model":"det"}', fleet=True) == Command(
        "check", "a1", "det", True
    )
    assert parse_command(b'{"cmd": "status", "id": "x"}') == Command("status", "x")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"x" * 1025, "mqtt-oversized"),
        (b"", "mqtt-malformed"),
        (b"not json", "mqtt-malformed"),
        (b"\xff\xfe", "mqtt-malformed"),
        (b"[1,2]", "mqtt-malformed"),
        (b'{"id":"a"}', "mqtt-malformed"),
        (b'{"cmd":3,"id":"a"}', "mqtt-malformed"),
        (b'{"cmd":"reboot","id":"a"}', "mqtt-unknown"),
        (b'{"cmd":"check"}', "mqtt-malformed"),
        (b'{"cmd":"check","id":""}', "mqtt-malformed"),
        (b'{"cmd":"check","id":"a\\n"}', "mqtt-malformed"),
        (b'{"cmd":"check","id":"' + b"a" * 129 + b'"}', "mqtt-malformed"),
        # A trigger carries no authority: it cannot name a URL, a package or a version.
        (b'{"cmd":"check","id":"a","url":"http://evil/x.emp"}', "mqtt-malformed"),
        (b'{"cmd":"check","id":"a","version":"9"}', "mqtt-malformed"),
        (b'{"cmd":"check","id":"a","package":"x.emp"}', "mqtt-malformed"),
        (b'{"cmd":"check","id":"a","model":"../x"}', "mqtt-malformed"),
        (b'{"cmd":"check","id":"a","model":5}', "mqtt-malformed"),
        (b'{"cmd":"status","id":"a","model":"det"}', "mqtt-malformed"),
        (b'{"cmd":"check","id":"a","x":[[[[1]]]]}', "mqtt-malformed"),
        (b"[" * 500 + b"]" * 500, "mqtt-malformed"),
    ],
)
def test_refused_commands(payload: bytes, code: str) -> None:
    with pytest.raises(CommandError) as ei:
        parse_command(payload)
    assert ei.value.code == code


def test_depth_is_refused_before_json_parses() -> None:
    # 1000 levels would overflow a recursive parser; it is refused by the flat scan.
    with pytest.raises(CommandError, match="deeply"):
        parse_command(b"[" * 1000, limits=CommandLimits(max_bytes=4096))
    # brackets inside strings do not count
    assert parse_command(b'{"cmd":"check","id":"[[[{{{"}').id == "[[[{{{"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_only_command_errors(data: bytes) -> None:
    try:
        cmd = parse_command(data)
    except CommandError:
        return
    assert cmd.kind in ("check", "status")


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["cmd", "id", "model", "url", "x"]),
        st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.integers())),
    )
)
def test_fuzz_json_objects(doc: dict[str, Any]) -> None:
    try:
        cmd = parse_command(json.dumps(doc).encode())
    except CommandError:
        return
    assert set(doc) <= {"cmd", "id", "model"}
    assert cmd.id == doc["id"]


def test_topics() -> None:
    t = Topics("dev-1", ("lab", "eu"))
    assert t.cmd == "edgeward/dev-1/cmd"
    assert t.status == "edgeward/dev-1/status"
    assert t.events == "edgeward/dev-1/events"
    assert t.subscriptions() == [
        "edgeward/dev-1/cmd",
        "edgeward/fleet/lab/cmd",
        "edgeward/fleet/eu/cmd",
    ]
    assert t.is_fleet("edgeward/dev-1/cmd") is False
    assert t.is_fleet("edgeward/fleet/eu/cmd") is True
    assert t.is_fleet("edgeward/dev-2/cmd") is None
    assert t.is_fleet("edgeward/fleet/other/cmd") is None


# --- backoff -----------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_caps() -> None:
    rng = random.Random(7)
    b = Backoff(1.0, 60.0, rng.uniform)
    delays = [b.next_delay() for _ in range(12)]
    for n, d in enumerate(delays):
        full = min(60.0, 2.0**n)
        assert full / 2 <= d <= full
    assert len({round(d, 6) for d in delays[-5:]}) > 1  # jittered, not one fixed value
    b.reset()
    assert b.next_delay() <= 1.0


# --- rate limit ----------------------------------------------------------------------------


def _scheduler_run(
    burst: list[float], min_interval: float, check_s: float
) -> tuple[list[float], list[tuple[list[str], int]], float]:
    """Feed trigger times (seconds from start) into a CheckScheduler with a fake check
    lasting ``check_s``; return check start times, the done calls and the burst span."""
    starts: list[float] = []
    done: list[tuple[list[str], int]] = []

    async def main() -> float:
        t0 = time.monotonic()

        async def check() -> None:
            starts.append(time.monotonic() - t0)
            await asyncio.sleep(check_s)

        def run() -> asyncio.Future[Any]:
            return asyncio.ensure_future(check())

        s = CheckScheduler(run, min_interval, lambda ids, n, _e: done.append((ids, n)))
        s.start()
        first = last = None
        for i, at in enumerate(burst):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            first = now if first is None else first
            last = now
            s.request(f"c{i}")
        while s.running or s._count:
            await asyncio.sleep(0.01)
        await s.close()
        assert first is not None and last is not None
        return last - first

    span = asyncio.run(main())
    return starts, done, span


def test_burst_of_1000_is_bounded() -> None:
    burst = [i * 0.0008 for i in range(1000)]  # ~0.8 s of triggers
    starts, done, span = _scheduler_run(burst, min_interval=0.25, check_s=0.05)
    assert len(starts) <= math.ceil(span / 0.25) + 1
    assert sum(n for _ids, n in done) == 1000  # every trigger is answered by some check
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= 0.25 - 0.01 for g in gaps)


def test_trigger_during_a_running_check_gets_its_own_later_check() -> None:
    # a check runs from t=0 for 0.3 s; the trigger at 0.1 must not be folded into it
    starts, done, _span = _scheduler_run([0.0, 0.1, 0.15], min_interval=0.0, check_s=0.3)
    assert len(starts) == 2
    assert starts[1] >= 0.3
    assert [ids for ids, _n in done] == [["c0"], ["c1", "c2"]]


# --- status, device id, config -------------------------------------------------------------


def test_status_document(tmp_path: Path) -> None:
    hs = {
        "state": "serving",
        "started": 1.0,
        "uptime": 12.345,
        "models": {"det": "3"},
        "updates": {
            "det": {"state": "failed", "version": "3", "target": "4", "error": "x", "since": 5.0}
        },
        "last_check": {"finished": 9.0, "installed": {}, "failed": {"det": "[sig] bad"}},
    }
    doc = status_document(hs, "dev", "0.1.0", tmp_path)
    assert doc["online"] is True
    assert doc["models"] == {"det": "3"}
    assert doc["updates"]["det"]["target"] == "4"
    assert doc["last_check"]["outcome"] == "failed"
    assert doc["last_error"] == "det: [sig] bad"  # the newest error
    assert doc["disk_free_bytes"] > 0
    assert doc["uptime_s"] == 12.3


def test_device_id_from_key_then_hostname(tmp_path: Path) -> None:
    from agent.keys import generate_key

    cfg = parse_config({"mqtt": {"brokers": "mqtt://127.0.0.1"}})
    host_id = device_id_for(cfg)
    assert "/" not in host_id and "+" not in host_id and host_id
    kp = generate_key("device", tmp_path / "keys")
    cfg = Config(paths=PathsConfig(keys_dir=tmp_path / "keys"), mqtt=cfg.mqtt)
    assert device_id_for(cfg) == kp.key_id.replace(":", "-")
    named = parse_config({"mqtt": {"brokers": "mqtt://h", "device_id": "box-7"}})
    assert device_id_for(named) == "box-7"


def test_mqtt_config_parses() -> None:
    cfg = parse_config(
        {
            "mqtt": {
                "brokers": ["mqtts://a.example:8884", "mqtts://b.example"],
                "ca_file": "/etc/ca.pem",
                "username": "dev",
                "password_file": "/etc/pw",
                "groups": ["lab"],
                "keepalive": 30,
                "fleet_jitter_s": 5,
                "min_check_interval_s": 10,
            }
        }
    )
    m = cfg.mqtt
    assert m is not None
    assert m.brokers == (
        BrokerAddress("mqtts", "a.example", 8884),
        BrokerAddress("mqtts", "b.example", 8883),
    )
    assert m.groups == ("lab",)
    assert m.fleet_jitter_s == 5.0
    assert parse_config({}).mqtt is None
    assert (
        parse_config({"mqtt": {"brokers": "unix:///run/m.sock"}}).mqtt.brokers[0].host
        == "/run/m.sock"
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({}, "mqtt.brokers"),
        ({"brokers": "http://x"}, "mqtt.brokers[0]"),
        ({"brokers": "mqtt://u:p@x"}, "mqtt.brokers[0]"),
        ({"brokers": "unix://relative"}, "mqtt.brokers[0]"),
        ({"brokers": ["mqtt://a", "mqtts://b"]}, "mqtt.brokers"),
        ({"brokers": "mqtt://a", "ca_file": "/ca"}, "mqtt.ca_file"),
        ({"brokers": "mqtts://a", "cert_file": "/c"}, "mqtt.cert_file"),
        ({"brokers": "mqtt://a", "password_file": "/p"}, "mqtt.password_file"),
        ({"brokers": "mqtt://a", "device_id": "a/b"}, "mqtt.device_id"),
        ({"brokers": "mqtt://a", "device_id": "#"}, "mqtt.device_id"),
        ({"brokers": "mqtt://a", "groups": ["ok", "+"]}, "mqtt.groups[1]"),
        ({"brokers": "mqtt://a", "keepalive": 2}, "mqtt.keepalive"),
        ({"brokers": "mqtt://a", "fleet_jitter_s": -1}, "mqtt.fleet_jitter_s"),
        ({"brokers": "mqtt://a", "min_check_interval_s": "1m"}, "mqtt.min_check_interval_s"),
        ({"brokers": "mqtt://a", "protocol": "4"}, "mqtt.protocol"),
        ({"brokers": "mqtt://a", "reconnect_max_s": 0.5}, "mqtt.reconnect_max_s"),
        ({"brokers": "mqtt://a", "brokr": 1}, "mqtt.brokr"),
    ],
)
def test_mqtt_config_errors_name_the_key(table: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"mqtt": table})
    assert needle in ei.value.message


def test_sample_config_mqtt_block_parses() -> None:
    """configs/edgeward.toml documents [mqtt] as "## " lines; turned on, they are valid."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "edgeward.toml").read_text()
    block = "\n".join(ln[3:] for ln in text.splitlines() if ln.startswith("## "))
    m = parse_config(tomllib.loads(block)).mqtt
    assert m is not None
    assert m.brokers[0].tls and m.groups == ("eu-west", "canary")
    assert m.device_id is None and m.protocol == "auto"


def test_paho_is_not_imported_without_mqtt() -> None:
    """Idle RSS: the daemon's and the CLI's modules do not import paho (or agent.mqtt)."""
    import subprocess
    import sys

    code = (
        "import sys, agent.daemon, agent.control, agent.metrics, agent.cli;"
        "agent.cli.build_parser();"
        "print(sorted(m for m in sys.modules if m.startswith(('paho', 'agent.mqtt'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_fleet_flood_waits_one_jitter_and_makes_one_check(tmp_path: Path) -> None:
    """1,000 group triggers inside one jitter window: one timer, one check, every trigger
    counted, at most MAX_IDS_PER_EVENT ids kept (memory stays bounded)."""
    from agent.mqtt import MAX_IDS_PER_EVENT, MqttService

    cfg = parse_config(
        {
            "paths": {"state_dir": str(tmp_path)},
            "mqtt": {
                "brokers": "mqtt://127.0.0.1:1",
                "device_id": "d",
                "groups": ["g"],
                "fleet_jitter_s": 0.2,
                "min_check_interval_s": 0,
            },
        }
    )
    checks: list[float] = []

    class Host:
        def __init__(self) -> None:
            self.cfg = cfg

        def status(self) -> dict[str, Any]:
            return {"models": {}, "last_check": None}

        def trigger_check(self) -> asyncio.Future[Any]:
            checks.append(time.monotonic())
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

    done: list[tuple[list[str], int]] = []

    async def main() -> None:
        svc = MqttService(Host())
        svc._loop = asyncio.get_running_loop()
        svc.scheduler._on_done = lambda ids, n, _e: done.append((ids, n))
        svc.scheduler.start()
        for i in range(1000):
            svc._on_message("edgeward/fleet/g/cmd", b'{"cmd":"check","id":"f%d"}' % i, 24)
        assert len(svc._fleet_ids) == MAX_IDS_PER_EVENT
        for _ in range(200):
            await asyncio.sleep(0.02)
            if done:
                break
        await svc.scheduler.close()
        assert svc.stats.commands[("check", "accepted")] == 1
        assert svc.stats.commands[("check", "coalesced")] == 999

    asyncio.run(main())
    assert len(checks) == 1
    assert done[0][1] == 1000 and len(done[0][0]) == MAX_IDS_PER_EVENT
