"""MQTT end to end: a real mosquitto, a real daemon process, real inference traffic.

A "newly published version" is published with ``edgeward repo`` into a TUF repository
that a real nginx serves over HTTPS (the daemon's ``[repository]``); the trigger travels
over the broker and only starts the daemon's ordinary check, which fetches it. Where a
test only needs *some* local update (the broker is down), the package goes into the
daemon's inbox instead (:func:`drop_in_inbox`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_util import (
    ROOT,
    DaemonProc,
    http_unix,
    infer_json,
    make_package,
    needs_worker,
    signing_key,
    start_daemon,
)
from tests.mqtt_util import (
    Broker,
    Watcher,
    free_port,
    make_tls,
    mqtt_config,
    needs_mosquitto,
    retained,
    start_broker,
)
from tests.nginx_util import Nginx, needs_nginx
from tests.repo_util import PubRepo, bytes_for, write_repo_config

pytestmark = [pytest.mark.e2e, needs_mosquitto, needs_worker, needs_nginx]

FAST = {"reconnect_min_s": 0.5, "reconnect_max_s": 2.0, "keepalive": 10}


def drop_in_inbox(daemon: DaemonProc, pkg: Path) -> None:
    """A sideloaded package: the daemon's next check installs it, no network involved."""
    shutil.copy(pkg, daemon.inbox / pkg.name)


def publish_version(repo: PubRepo, pkg: Path) -> None:
    """Publish ``pkg`` in the repository (``edgeward repo add`` + ``publish``)."""
    repo.add(pkg)
    repo.publish()


@pytest.fixture
def served(tmp_path: Path, pkgs: dict[str, Path]) -> Iterator[tuple[PubRepo, Nginx]]:
    """A repository built by ``edgeward repo`` holding v1, served by nginx over HTTPS."""
    repo = PubRepo.create(tmp_path, pkgs["trust"])
    publish_version(repo, pkgs["v1"])
    nginx = Nginx(tmp_path / "nginx", repo.root_dir)
    try:
        yield repo, nginx
    finally:
        nginx.stop()


def metrics(d: DaemonProc) -> dict[str, float]:
    status, _h, body = http_unix(d.control_sock, "GET", "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def fleet(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


@contextmanager
def traffic(d: DaemonProc, clients: int = 2) -> Iterator[dict[str, Any]]:
    """Inference from ``clients`` threads while the block runs; counts and failures."""
    stats: dict[str, Any] = {"ok": 0, "failures": [], "scales": set()}
    stop = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        while not stop.is_set():
            try:
                status, body = infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])
            except Exception as exc:  # a failed request is the thing we count
                with lock:
                    stats["failures"].append(repr(exc))
                continue
            with lock:
                if status == 200:
                    stats["ok"] += 1
                    stats["scales"].add(body["outputs"][0]["data"][0])
                else:
                    stats["failures"].append(f"{status} {body}")

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield stats
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def wait_until(pred: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout}s")


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("pkgs")
    key, trust = signing_key(work)
    return {
        "trust": trust,
        "v1": make_package(work, key, "tiny", "1", scale=2.0),
        "v2": make_package(work, key, "tiny", "2", scale=3.0),
    }


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tmp_path / "broker")
    yield b
    b.stop()


def _daemon(
    tmp_path: Path,
    pkgs: dict[str, Path],
    broker: Broker,
    served: tuple[PubRepo, Nginx] | None = None,
    **mqtt: Any,
) -> DaemonProc:
    """A daemon serving v1 with ``[mqtt]`` (and ``[repository]`` when ``served``)."""
    kw = {"device_id": "dev1", "groups": ["lab"], **FAST, **mqtt}
    extra = mqtt_config(broker, **kw)
    if served is not None:
        extra += write_repo_config(tmp_path, served[1], served[0])  # type: ignore[arg-type]  # a PubRepo has the root_json it reads
    return start_daemon(
        tmp_path / "d",
        [pkgs["v1"]],
        trust=[*pkgs["trust"].glob("*.pub")],
        trust_dir=pkgs["trust"],
        extra=extra,
    )


def test_trigger_installs_new_version_under_traffic(
    tmp_path: Path, pkgs: dict[str, Path], broker: Broker, served: tuple[PubRepo, Nginx]
) -> None:
    repo, nginx = served
    d = _daemon(tmp_path, pkgs, broker, served, min_check_interval_s=0)
    try:
        first = retained(broker, "edgeward/dev1/status")
        assert first["online"] is True and first["models"] == {"tiny": "1"}
        with traffic(d) as load:
            wait_until(lambda: load["ok"] > 20, what="traffic")
            publish_version(repo, pkgs["v2"])
            res = fleet(
                "check", "--device", "dev1", "--broker", broker.url, "--wait", "90", "--json"
            )
            assert res.returncode == 0, res.stderr
            out = json.loads(res.stdout)
            assert out["events"], res.stderr
            assert out["events"][0]["installed"] == {"tiny": "2"}
            wait_until(lambda: 3.0 in load["scales"], what="v2 answering")
            time.sleep(0.5)
        assert load["failures"] == []
        assert load["scales"] == {2.0, 3.0}  # v1 (x*2) then v2 (x*3), nothing else
        # the device fetched v2 from the repository (nginx served the package once)
        assert bytes_for(nginx, "tiny-2.emp") == pkgs["v2"].stat().st_size
        # a fresh subscriber sees the new version in the retained status
        doc = wait_until(
            lambda: (
                (s := retained(broker, "edgeward/dev1/status"))["models"] == {"tiny": "2"} and s
            ),
            what="retained status with v2",
        )
        assert doc["last_check"]["outcome"] == "installed"
        res = fleet("status", "--broker", broker.url, "--json")
        assert json.loads(res.stdout)["dev1"]["models"] == {"tiny": "2"}
        res = fleet("status", "--broker", broker.url)
        assert re.search(r"dev1\s+yes\s+tiny:2", res.stdout), res.stdout
    finally:
        d.stop()
    # a clean stop leaves "offline" (stopped) as the retained status
    assert retained(broker, "edgeward/dev1/status")["online"] is False


def test_broker_restart_and_broker_down(
    tmp_path: Path, pkgs: dict[str, Path], broker: Broker
) -> None:
    d = _daemon(tmp_path, pkgs, broker)
    try:
        retained(broker, "edgeward/dev1/status")
        with traffic(d) as load:
            broker.stop()
            wait_until(lambda: metrics(d)["edgeward_mqtt_connected"] == 0, what="disconnect")
            assert "disconnected" in d.cli("status").stdout
            # local updates do not need the broker
            drop_in_inbox(d, pkgs["v2"])
            res = d.cli("check")
            assert res.returncode == 0 and "installed tiny version 2" in res.stdout, res.stderr
            ok_before = load["ok"]
            wait_until(lambda: load["ok"] > ok_before + 20, what="traffic while broker down")
            broker.start()
            wait_until(lambda: metrics(d)["edgeward_mqtt_connected"] == 1, what="reconnect")
            # the broker lost its retained messages (no persistence): the agent republished
            doc = retained(broker, "edgeward/dev1/status")
            assert doc["online"] is True and doc["models"] == {"tiny": "2"}
        assert load["failures"] == []
        m = metrics(d)
        assert m["edgeward_mqtt_reconnects_total"] >= 1
        assert "connected" in d.cli("status").stdout
    finally:
        d.stop()


def test_broker_down_at_start(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    port = free_port()  # nothing listens here yet
    work = tmp_path / "broker"
    work.mkdir()
    absent = Broker(work, port, work / "mosquitto.conf", work / "mosquitto.log")
    d = _daemon(tmp_path, pkgs, absent)  # start_daemon waits for READY=1
    try:
        status, body = infer_json(d.infer_sock, "tiny", [[1, 2, 3, 4]])
        assert status == 200 and body["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
        assert metrics(d)["edgeward_mqtt_connected"] == 0
        # the broker appears later: the agent connects and publishes its status
        broker = start_broker(work, port=port)
        try:
            doc = retained(broker, "edgeward/dev1/status", timeout=30)
            assert doc["online"] is True
        finally:
            broker.stop()
    finally:
        d.stop()


def test_burst_of_triggers_is_rate_limited(
    tmp_path: Path, pkgs: dict[str, Path], broker: Broker
) -> None:
    interval = 1.0
    d = _daemon(tmp_path, pkgs, broker, min_check_interval_s=interval, fleet_jitter_s=0)
    try:
        retained(broker, "edgeward/dev1/status")
        checks0 = metrics(d)["edgeward_update_checks_total"]
        with Watcher(broker, ["edgeward/dev1/events"]) as w:
            t0 = time.monotonic()
            for i in range(1000):
                topic = "edgeward/dev1/cmd" if i % 2 else "edgeward/fleet/lab/cmd"
                w.client.publish(topic, json.dumps({"cmd": "check", "id": f"b{i}"}), qos=1)
            key_acc = 'edgeward_mqtt_commands_total{kind="check",outcome="accepted"}'
            key_co = 'edgeward_mqtt_commands_total{kind="check",outcome="coalesced"}'

            def received() -> bool:
                m = metrics(d)
                return m.get(key_acc, 0) + m.get(key_co, 0) >= 1000

            wait_until(received, timeout=120, what="all triggers received")
            burst = time.monotonic() - t0  # an upper bound of the burst as the agent saw it
            # let the last (coalesced) check run
            time.sleep(interval * 2 + 1)
            wait_until(lambda: w.docs("edgeward/dev1/events"), what="an event")
        m = metrics(d)
        checks = m["edgeward_update_checks_total"] - checks0
        assert 1 <= checks <= math.ceil(burst / interval) + 1, (checks, burst)
        assert m["edgeward_mqtt_triggers_rate_limited_total"] >= 1000 - checks
        answered = sum(e["triggers"] for e in w.docs("edgeward/dev1/events"))
        assert answered == 1000
    finally:
        d.stop()


def test_bad_commands_change_nothing(tmp_path: Path, pkgs: dict[str, Path], broker: Broker) -> None:
    d = _daemon(tmp_path, pkgs, broker)
    try:
        retained(broker, "edgeward/dev1/status")
        checks0 = metrics(d)["edgeward_update_checks_total"]
        drop_in_inbox(d, pkgs["v2"])  # a check would install it: none may run
        with Watcher(broker, ["edgeward/dev1/events"]) as w:
            bad = [
                b"{not json",
                b'{"cmd":"check"}',
                b'{"cmd":"check","id":"x","url":"http://evil.example/p.emp"}',
                b'{"cmd":"check","id":"x","version":"9"}',
                b'{"cmd":"reboot","id":"x"}',
                b'{"cmd":"check","id":"' + b"A" * 5000 + b'"}',
                b"[" * 50000,
                b"\x1b[31mred\x00",
            ]
            for p in bad:
                w.publish("edgeward/dev1/cmd", p)
            w.publish("edgeward/fleet/other/cmd", {"cmd": "check", "id": "y"})  # not our group

            def counted() -> float:
                m = metrics(d)
                return sum(v for k, v in m.items() if 'kind="invalid"' in k)

            wait_until(lambda: counted() >= len(bad), what="bad commands counted")
            time.sleep(1.0)
            assert w.docs("edgeward/dev1/events") == []
        m = metrics(d)
        assert m['edgeward_mqtt_commands_total{kind="invalid",outcome="malformed"}'] == 5
        assert m['edgeward_mqtt_commands_total{kind="invalid",outcome="oversized"}'] == 2
        assert m['edgeward_mqtt_commands_total{kind="invalid",outcome="unknown"}'] == 1
        assert m["edgeward_update_checks_total"] == checks0
        assert m.get('edgeward_mqtt_commands_total{kind="check",outcome="accepted"}', 0) == 0
        # beyond the MQTT 5 Maximum Packet Size the agent announced, the broker drops the
        # message instead of sending it: the device never reads it
        with Watcher(broker, ["edgeward/dev1/events"]) as w:
            w.publish("edgeward/dev1/cmd", b"[" * 200_000)
        wait_until(
            lambda: "Dropping too large outgoing PUBLISH for dev1" in broker.log(),
            what="the broker dropping it",
        )
        time.sleep(0.5)
        m = metrics(d)
        assert m['edgeward_mqtt_commands_total{kind="invalid",outcome="oversized"}'] == 2
        status, body = infer_json(d.infer_sock, "tiny", [[1, 1, 1, 1]])
        assert status == 200 and body["outputs"][0]["data"][0] == 2.0  # still v1
        log = d.log()
        assert log.count("refused command on edgeward/dev1/cmd") == len(bad)
        assert "\x1b" not in log  # escaped, not replayed into the terminal
    finally:
        d.stop()


def test_kill9_publishes_last_will(tmp_path: Path, pkgs: dict[str, Path], broker: Broker) -> None:
    d = _daemon(tmp_path, pkgs, broker)
    try:
        with Watcher(broker, ["edgeward/dev1/status", "edgeward/dev1/events"]) as w:
            w.wait_for("edgeward/dev1/status", lambda s: s.get("online") is True)
            # a check naming a model this device does not serve is refused, with its id
            w.publish("edgeward/dev1/cmd", {"cmd": "check", "id": "m1", "model": "nope"})
            ev = w.wait_for("edgeward/dev1/events", lambda e: e["ids"] == ["m1"])
            assert ev["result"] == "refused"
            d.kill()
            will = w.wait_for("edgeward/dev1/status", lambda s: s.get("online") is False)
            assert will["reason"] == "connection lost" and will["device_id"] == "dev1"
        assert retained(broker, "edgeward/dev1/status")["online"] is False
    finally:
        d.stop()


def test_tls_password_and_acl(
    tmp_path: Path, pkgs: dict[str, Path], served: tuple[PubRepo, Nginx]
) -> None:
    tls = make_tls(tmp_path / "tls")
    users = {"dev1": "pw-dev1", "dev2": "pw-dev2", "operator": "pw-op"}
    acl = "\n".join(
        [
            "user operator",
            "topic readwrite edgeward/#",
            "",
            "user dev1",
            "topic read edgeward/fleet/lab/cmd",
            "",
            "user dev2",
            "topic read edgeward/fleet/lab/cmd",
            "",
            "pattern read edgeward/%u/cmd",
            "pattern write edgeward/%u/status",
            "pattern write edgeward/%u/events",
            "",
        ]
    )
    broker = start_broker(tmp_path / "broker", tls=tls, passwords=users, acl=acl)
    pw = tmp_path / "dev1.pw"
    pw.write_text("pw-dev1\n")
    op_pw = tmp_path / "op.pw"
    op_pw.write_text("pw-op\n")
    d = _daemon(
        tmp_path,
        pkgs,
        broker,
        served,
        ca_file=tls.ca_pem,
        username="dev1",
        password_file=pw,
        min_check_interval_s=0,
        fleet_jitter_s=0.5,
        groups=["lab", "not-mine"],  # the ACL lets dev1 read only the "lab" group
    )
    op = ["--broker", broker.url, "--ca", str(tls.ca_pem), "--username", "operator"]
    op += ["--password-file", str(op_pw)]
    try:
        doc = retained(broker, "edgeward/dev1/status", username="operator", password="pw-op")
        assert doc["online"] is True
        # mosquitto grants the subscription to a group the ACL does not let dev1 read, but
        # never delivers from it: an operator's trigger there reaches nobody
        res = fleet("check", "--group", "not-mine", *op)
        assert res.returncode == 0, res.stderr
        checks0 = metrics(d)["edgeward_update_checks_total"]
        assert checks0 == 0
        # another device may neither trigger dev1 nor forge its status
        with Watcher(broker, ["edgeward/dev2/cmd"], username="dev2", password="pw-dev2") as w2:
            info = w2.publish("edgeward/dev1/cmd", {"cmd": "check", "id": "forged"})
            assert info.is_published()
            w2.publish("edgeward/dev1/status", {"online": True, "models": {"tiny": "666"}})
        denied = re.compile(r"Denied PUBLISH from \S+ \(.*'edgeward/dev1/(cmd|status)'")
        wait_until(lambda: len(denied.findall(broker.log())) == 2, what="the broker's two denials")
        time.sleep(1.0)
        # the forger is told "not authorized" (MQTT 5 PUBACK reason 135)
        assert broker.log().count("rc135)") == 2
        m = metrics(d)
        assert m["edgeward_update_checks_total"] == checks0
        assert m.get('edgeward_mqtt_commands_total{kind="check",outcome="accepted"}', 0) == 0
        doc = retained(broker, "edgeward/dev1/status", username="operator", password="pw-op")
        assert doc["models"] == {"tiny": "1"}
        # the operator may, through the group topic (the device waits its fleet jitter)
        publish_version(served[0], pkgs["v2"])
        res = fleet("check", "--group", "lab", "--wait", "60", "--expect", "1", "--json", *op)
        assert res.returncode == 0, res.stderr
        assert [e["device_id"] for e in json.loads(res.stdout)["events"]] == ["dev1"]
        wait_until(
            lambda: (
                retained(broker, "edgeward/dev1/status", username="operator", password="pw-op")[
                    "models"
                ]
                == {"tiny": "2"}
            ),
            what="v2 in the status",
        )
        res = fleet("status", "--json", *op)
        assert json.loads(res.stdout)["dev1"]["models"] == {"tiny": "2"}
        # a wrong password is refused by the broker: no connection, the CLI says so
        bad = tmp_path / "bad.pw"
        bad.write_text("nope\n")
        res = fleet("status", *op[:-1], str(bad))
        assert res.returncode != 0 and "cannot connect" in res.stderr
    finally:
        d.stop()
        broker.stop()


class _V5RefusingProxy:
    """A TCP front for mosquitto that answers an MQTT 5 CONNECT with CONNACK reason 0x84
    ("unsupported protocol version"), as a 3.1.1-only broker does, and relays 3.1.1
    connections to the real broker."""

    def __init__(self, upstream: int) -> None:
        import socket as _s

        self.upstream = upstream
        self.sock = _s.socket(_s.AF_INET, _s.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.levels: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        import socket as _s

        conn.settimeout(10)
        try:
            head = conn.recv(4096)  # a CONNECT fits in one segment on loopback
            # fixed header: 1 byte + a 1-4 byte remaining length; then 00 04 "MQTT" level
            i = 1
            while i < len(head) and head[i] & 0x80:
                i += 1
            level = head[i + 7] if len(head) > i + 7 else -1
            self.levels.append(level)
            if level == 5:
                conn.sendall(bytes([0x20, 0x03, 0x00, 0x84, 0x00]))
                conn.close()
                return
            up = _s.create_connection(("127.0.0.1", self.upstream), timeout=10)
            up.sendall(head)
        except OSError:
            conn.close()
            return
        conn.settimeout(None)
        up.settimeout(None)

        def pipe(a: Any, b: Any) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                a.close()
                b.close()

        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def test_mqtt5_refused_falls_back_to_311(
    tmp_path: Path, pkgs: dict[str, Path], broker: Broker
) -> None:
    proxy = _V5RefusingProxy(broker.port)
    front = Broker(broker.work, proxy.port, broker.config, broker.log_path)
    d = _daemon(tmp_path, pkgs, front)
    try:
        doc = retained(broker, "edgeward/dev1/status", timeout=60)
        assert doc["online"] is True
        assert proxy.levels[:1] == [5] and 4 in proxy.levels
        st = json.loads(d.cli("status", "--json").stdout)["mqtt"]
        assert st["connected"] is True and st["protocol"] == "3.1.1"
        with Watcher(broker, ["edgeward/dev1/events"]) as w:
            w.publish("edgeward/dev1/cmd", {"cmd": "check", "id": "over-311"})
            w.wait_for("edgeward/dev1/events", lambda e: "over-311" in e["ids"])
        assert "refuses MQTT 5; trying 3.1.1" in d.log()
    finally:
        d.stop()
        proxy.close()


def test_unix_socket_broker_and_failover(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    """``unix://`` reaches a broker's Unix socket; with two URLs, a dead first broker
    makes the agent move to the next one."""
    sock = tmp_path / "mqtt.sock"
    broker = start_broker(tmp_path / "broker", unix=sock)
    try:
        d = start_daemon(
            tmp_path / "d1",
            [pkgs["v1"]],
            trust=[*pkgs["trust"].glob("*.pub")],
            trust_dir=pkgs["trust"],
            extra=f'[mqtt]\nbrokers = ["unix://{sock}"]\ndevice_id = "via-unix"\n',
        )
        try:
            assert retained(broker, "edgeward/via-unix/status")["online"] is True
            st = json.loads(d.cli("status", "--json").stdout)["mqtt"]
            assert st["broker"] == f"unix://{sock}" and st["connected"] is True
        finally:
            d.stop()
        dead = free_port()
        d = start_daemon(
            tmp_path / "d2",
            [pkgs["v1"]],
            trust=[*pkgs["trust"].glob("*.pub")],
            trust_dir=pkgs["trust"],
            extra=(
                "[mqtt]\n"
                f'brokers = ["mqtt://127.0.0.1:{dead}", "{broker.url}"]\n'
                'device_id = "failover"\nreconnect_min_s = 0.5\nreconnect_max_s = 1.0\n'
            ),
        )
        try:
            assert retained(broker, "edgeward/failover/status", timeout=60)["online"] is True
            st = json.loads(d.cli("status", "--json").stdout)["mqtt"]
            assert st["broker"] == broker.url
        finally:
            d.stop()
    finally:
        broker.stop()
