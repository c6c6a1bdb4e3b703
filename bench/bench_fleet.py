"""Fleet simulation (issue 14): one MQTT trigger updates N real agents.

A real mosquitto and a real nginx on 127.0.0.1 and N real ``edgeward agent`` processes
(default 24, ``EDGEWARD_BENCH_QUICK=1`` → 6), each with its own state directory, its own X25519
device key (the device id derives from it) and a small MLP (v1, encrypted for every
device key). The publisher builds v2 as an int8 residual package against v1; one fleet
trigger goes to ``edgeward/fleet/bench/cmd``; every agent waits its random fleet jitter
(``FLEET_JITTER_S``), checks, patches, self-serves v2 and republishes its retained
status.

Figures:

- ``fleet_converge_s``: trigger → the last device's retained status shows v2 serving.
  Anchor printed beside it: the jitter window (the floor a spread trigger cannot beat)
  and one device's install time (check start → its result event).
- ``fleet_failures``: devices that did not converge or reported a failed check (goal 0).
- ``fleet_check_start_spread_s``: max − min of the devices' check start times (the
  jitter spreading the load on the repository; ideally close to ``FLEET_JITTER_S``).
- ``fleet_residual_to_full_ratio``: residual package bytes / full v2 package bytes.
- ``fleet_bytes_per_device_ratio``: bytes nginx sent per device (its access log) /
  (residual package + the TUF metadata each device fetched); goal <= 1.1. The
  repository holds both the full and the residual v2 (as a publisher ships them); a
  ratio near 1 says every device took the residual, once.
- ``fleet_messages_per_device``: MQTT messages (status + events) a device sent.

The repository is built with ``edgeward repo`` (v1, then v2 full + residual) and served
by a real nginx over HTTPS (trustme certificate); the devices fetch with their TUF client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

FLEET_JITTER_S = 10.0
TIMEOUT_S = 600.0


def _mlp(path: Path, seed: int, delta: float = 0.0) -> Path:
    """x[N,64] → MatMul 64x256 → Relu → MatMul 256x16: ~80 K float32 weights (320 KB)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 256)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((256, 16)).astype(np.float32) * 0.1
    if delta:
        d = np.random.default_rng(seed + 1)
        w1 = w1 + d.standard_normal(w1.shape).astype(np.float32) * delta
        w2 = w2 + d.standard_normal(w2.shape).astype(np.float32) * delta
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [x],
        [y],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _config(work: Path, keys_dir: Path, trust: Path, broker_url: str, repo_table: str) -> Path:
    from tests.daemon_util import write_config

    extra = mqtt_config_from_url(broker_url) + repo_table
    cfg = write_config(work, trust_dir=trust, extra=extra)
    cfg.write_text(cfg.read_text().replace('keys_dir = ""', f'keys_dir = "{keys_dir}"'))
    return cfg


def mqtt_config_from_url(url: str) -> str:
    """The agents' [mqtt] section: group "bench", the device id from the device key."""
    return (
        "[mqtt]\n"
        f'brokers = ["{url}"]\n'
        'groups = ["bench"]\n'
        f"fleet_jitter_s = {FLEET_JITTER_S}\n"
        "min_check_interval_s = 0\n"
        "reconnect_min_s = 0.5\n"
        "reconnect_max_s = 5.0\n"
    )


def run(work: Path) -> dict[str, float]:
    from tests.daemon_util import edgeward, start_daemon
    from tests.mqtt_util import Watcher, start_broker
    from tests.nginx_util import Nginx
    from tests.repo_util import PubRepo, write_repo_config

    quick = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"
    n = int(os.environ.get("EDGEWARD_BENCH_FLEET", "6" if quick else "24"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # publisher: signing key, one device key per agent, v1 (full) and v2 (residual)
    edgeward("keygen", "--kind", "signing", "--out", str(work / "pub"))
    skey = next((work / "pub").glob("*.key"))
    trust = work / "trust"
    trust.mkdir()
    for p in (work / "pub").glob("*.pub"):
        shutil.copy(p, trust / p.name)
    pubs = work / "device-pubs"
    pubs.mkdir()
    devices: list[Path] = []
    for i in range(n):
        kdir = work / f"dev{i:03d}" / "keys"
        edgeward("keygen", "--kind", "device", "--out", str(kdir))
        for p in kdir.glob("*.pub"):
            shutil.move(p, pubs / p.name)
        devices.append(kdir)
    m1 = _mlp(work / "models" / "v1" / "mlp.onnx", seed=1)
    m2 = _mlp(work / "models" / "v2" / "mlp.onnx", seed=1, delta=0.002)
    v1 = work / "mlp-1.emp"
    v2 = work / "mlp-2.emp"
    v2_full = work / "mlp-2-full.emp"
    common = ["--name", "mlp", "--signing-key", str(skey), "--encrypt-for", str(pubs)]
    edgeward("pack", "--model", str(m1), "--version", "1", *common, "-o", str(v1))
    edgeward("pack", "--model", str(m2), "--version", "2", *common, "-o", str(v2_full))
    # every device starts with v1 installed (unpacked once with the first device's key)
    v1_dir = work / "v1-unpacked"
    first_key = next(devices[0].glob("*.key"))
    pub = str(next(trust.glob("*.pub")))
    edgeward("unpack", str(v1), "--trust", pub, "--device-key", str(first_key), "-o", str(v1_dir))
    # v2 as an int8 residual against v1 (its manifest names base mlp 1)
    edgeward(
        "pack",
        "--model",
        str(m2),
        "--version",
        "2",
        *common,
        "--base",
        str(v1_dir),
        "--bits",
        "8",
        "-o",
        str(v2),
    )
    residual, full = v2.stat().st_size, v2_full.stat().st_size
    print(
        f"fleet of {n} agents; v2 residual package {residual} B, full {full} B "
        f"({residual / full:.3f})"
    )

    # the repository: v1 (full) published with edgeward repo, served by nginx over HTTPS
    repo = PubRepo.create(work, trust)
    repo.add(v1)
    repo.publish()
    nginx = Nginx(work / "nginx", repo.root_dir)
    broker = start_broker(work / "broker")
    procs = []
    try:
        t_start = time.monotonic()
        for kdir in devices:
            dwork = kdir.parent
            cfg = _config(dwork, kdir, trust, broker.url, write_repo_config(dwork, nginx, repo))
            procs.append(start_daemon(dwork, [v1_dir], config=cfg, wait_ready=False))
        for d in procs:
            d.wait_for("READY=1", timeout=TIMEOUT_S)
        print(f"{n} agents READY in {time.monotonic() - t_start:.1f} s")
        statuses: dict[str, dict[str, Any]] = {}
        events: list[dict[str, Any]] = []
        lock = threading.Lock()
        sent = [0, 0]  # status + event messages (and bytes) the devices sent for the update
        counting = False
        with Watcher(broker, ["edgeward/+/status", "edgeward/+/events"]) as w:

            def collect() -> None:
                with w.lock:
                    msgs, w.messages[:] = list(w.messages), []
                with lock:
                    for topic, payload, _r in msgs:
                        doc = json.loads(payload)
                        if topic.endswith("/status"):
                            statuses[topic.split("/")[1]] = doc
                            if counting:
                                sent[0] += 1
                                sent[1] += len(payload)
                        else:
                            events.append(doc)
                            if counting:
                                sent[0] += 1
                                sent[1] += len(payload)

            def wait(pred: Any, what: str) -> float:
                deadline = time.monotonic() + TIMEOUT_S
                while time.monotonic() < deadline:
                    collect()
                    if pred():
                        return time.monotonic()
                    time.sleep(0.05)
                raise TimeoutError(f"fleet: {what} not reached in {TIMEOUT_S}s")

            wait(
                lambda: (
                    sum(
                        1
                        for s in statuses.values()
                        if s.get("online") and s.get("models") == {"mlp": "1"}
                    )
                    == n
                ),
                "every agent online with v1",
            )
            nginx.clear_log()
            repo.add(v2_full, v2)  # what a publisher does: both; each device picks
            repo.publish()
            collect()
            counting = True
            t0 = time.monotonic()
            w.publish("edgeward/fleet/bench/cmd", {"cmd": "check", "id": "bench-1"})
            deadline = time.monotonic() + TIMEOUT_S
            converged_at: float | None = None
            while time.monotonic() < deadline:
                collect()
                with lock:
                    done = [s for s in statuses.values() if s.get("models") == {"mlp": "2"}]
                    answered = {e.get("device_id") for e in events if "bench-1" in e.get("ids", [])}
                if len(done) == n:
                    converged_at = time.monotonic()
                    break
                if len(answered) == n and len(done) < n:
                    time.sleep(2.0)  # statuses lag events by at most a poll period
                    collect()
                    if len([s for s in statuses.values() if s.get("models") == {"mlp": "2"}]) < n:
                        break
                time.sleep(0.05)
            collect()
        mine = [e for e in events if "bench-1" in e.get("ids", [])]
        failed = {e["device_id"] for e in mine if e.get("failed") or e.get("result") != "done"}
        converged = {k for k, s in statuses.items() if s.get("models") == {"mlp": "2"}}
        failures = len(failed | (set(statuses) - converged)) + max(0, n - len(statuses))
        starts = sorted(float(e["check_started"]) for e in mine if e.get("check_started"))
        installs = [
            float(e["time"]) - float(e["check_started"])
            for e in mine
            if e.get("check_started") and e.get("installed")
        ]
        spread = (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
        converge = (converged_at - t0) if converged_at is not None else float(TIMEOUT_S)
        install_med = statistics.median(installs) if installs else 0.0
        print(
            f"fleet_converge_s {converge:.2f} (jitter window {FLEET_JITTER_S:.0f} s; "
            f"one device's check+patch+swap median {install_med:.2f} s, "
            f"max {max(installs, default=0.0):.2f} s)"
        )
        print(f"fleet_failures {failures} of {n}")
        print(
            f"fleet_check_start_spread_s {spread:.2f} (jitter window {FLEET_JITTER_S:.0f} s, "
            f"{n} devices)"
        )
        log = nginx.log()
        total = sum(e.body_bytes for e in log) / n
        meta = sum(e.body_bytes for e in log if "/metadata/" in e.path) / n
        pkg_bytes = total - meta
        bytes_ratio = total / (residual + meta)
        print(
            f"fleet_bytes_per_device_ratio {bytes_ratio:.3f} (nginx sent {total:.0f} B per "
            f"device: {pkg_bytes:.0f} B of packages, {meta:.0f} B of TUF metadata; the residual "
            f"package is {residual} B, the full one {full} B; {len(log)} requests)"
        )
        print(
            f"fleet_messages_per_device {sent[0] / n:.1f} ({sent[1] / n:.0f} B of status "
            "and event payload per device for the whole update)"
        )
        rss = [d.rss_bytes() for d in procs if d.proc.poll() is None]
        print(f"agent RSS median {statistics.median(rss) / 1e6:.1f} MB (daemon process only)")
        log = procs[0].log()
        if re.search(r"Traceback", log):
            print("first agent's log has a traceback:\n" + log[-3000:])
        return {
            "fleet_converge_s": converge,
            "fleet_failures": float(failures),
            "fleet_check_start_spread_s": spread,
            "fleet_residual_to_full_ratio": residual / full,
            "fleet_messages_per_device": sent[0] / n,
            "fleet_bytes_per_device_ratio": bytes_ratio,
        }
    finally:
        for d in procs:
            d.stop()
        broker.stop()
        nginx.stop()
