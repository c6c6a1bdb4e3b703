"""``edgeward fleet status | check``: the operator's view of a fleet, through the broker.

It speaks only to the MQTT broker (never to a device): ``status`` subscribes to the
retained ``edgeward/+/status`` topics and prints one row per device; ``check`` publishes a
trigger on ``edgeward/<device>/cmd`` or ``edgeward/fleet/<group>/cmd`` and, with
``--wait``, prints the devices' result events that carry its id. What devices publish is
untrusted here too: each message is size-capped, parsed defensively and escaped before
it reaches the terminal. Topic layout: docs/FLEET.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, FleetError

if TYPE_CHECKING:
    from agent.config import BrokerAddress

#: The topic tree devices use (agent.mqtt.Topics).
PREFIX = "edgeward"
#: Largest status or event document read from the broker.
MAX_DOC_BYTES = 64 * 1024


def _printable(value: Any, limit: int = 60) -> str:
    from agent.mqtt import printable

    return printable(str(value), limit)


def _connect(args: argparse.Namespace) -> Any:
    """A connected paho client on its own network thread (raises FleetError)."""
    from agent.config import broker_address

    urls = args.broker or [u for u in os.environ.get("EDGEWARD_MQTT_BROKER", "").split() if u]
    if not urls:
        raise ConfigError(
            "no broker: give --broker URL or set EDGEWARD_MQTT_BROKER", code="fleet-broker"
        )
    errors = []
    for url in urls:
        client, error = _try_connect(broker_address("--broker", url), args)
        if client is not None:
            return client
        errors.append(error)
    raise FleetError("cannot connect to the broker: " + "; ".join(errors), code="fleet-connect")


def _try_connect(b: BrokerAddress, args: argparse.Namespace) -> tuple[Any, str]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"edgeward-fleet-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5,
        transport="unix" if b.scheme == "unix" else "tcp",
    )
    if b.tls:
        import ssl

        ctx = ssl.create_default_context(cafile=args.ca)
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
        c.tls_set_context(ctx)
    if args.username:
        pw = None
        if args.password_file:
            from agent.mqtt import read_password

            pw = read_password(Path(args.password_file), "--password-file")
        c.username_pw_set(args.username, pw)
    done = threading.Event()
    result: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        result.append(rc)
        done.set()

    c.on_connect = on_connect
    try:
        c.connect(b.host, b.port or 1, keepalive=30)
    except (OSError, ValueError) as exc:
        return None, f"{b}: {exc}"
    c.loop_start()
    if not done.wait(15) or result[0].is_failure:
        c.loop_stop()
        return None, f"{b}: {result[0] if result else 'no answer'}"
    return c, ""


def _subscribe_collect(client: Any, topic: str, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if len(msg.payload) <= MAX_DOC_BYTES:
            with lock:
                got.append((str(msg.topic), bytes(msg.payload)))

    client.on_message = on_message
    client.subscribe(topic, qos=1)
    time.sleep(seconds)
    with lock:
        return list(got)


def _parse(payload: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _dict(doc: dict[str, Any], key: str) -> dict[str, Any]:
    v = doc.get(key)
    return v if isinstance(v, dict) else {}


def fleet_table(docs: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """Rows (with a header) for the retained status documents, keyed by device id."""
    rows: list[tuple[str, ...]] = [
        ("DEVICE", "ONLINE", "MODELS", "UPDATE", "LAST CHECK", "LAST ERROR")
    ]
    for dev, d in sorted(docs.items()):
        models = _dict(d, "models")
        updates = _dict(d, "updates")
        states = sorted(
            {str(u.get("state")) for u in updates.values() if isinstance(u, dict)} - {"active"}
        )
        last = d.get("last_check") if isinstance(d.get("last_check"), dict) else None
        rows.append(
            (
                _printable(dev, 64),
                "yes" if d.get("online") is True else "NO",
                _printable(", ".join(f"{k}:{v}" for k, v in sorted(models.items())) or "-", 60),
                _printable(", ".join(states) or "ok", 30),
                _printable(last.get("outcome"), 12) if last else "-",
                _printable(d.get("last_error") or "-", 60),
            )
        )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    client = _connect(args)
    try:
        msgs = _subscribe_collect(client, f"{PREFIX}/+/status", args.wait)
    finally:
        client.disconnect()
        client.loop_stop()
    docs: dict[str, dict[str, Any]] = {}
    for topic, payload in msgs:
        doc = _parse(payload)
        if doc is not None:
            docs[topic.split("/")[-2]] = doc
    if args.json:
        json.dump(docs, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    rows = fleet_table(docs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    online = sum(1 for d in docs.values() if d.get("online") is True)
    print(f"{len(docs)} devices, {online} online")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from agent.config import topic_name

    if args.device:
        topic = f"{PREFIX}/{topic_name('--device', args.device)}/cmd"
    else:
        topic = f"{PREFIX}/fleet/{topic_name('--group', args.group)}/cmd"
    cmd: dict[str, str] = {"cmd": "check", "id": uuid.uuid4().hex}
    if args.model:
        cmd["model"] = topic_name("--model", args.model)
    if args.expect is None:
        args.expect = 1 if args.device else sys.maxsize
    client = _connect(args)
    events: list[dict[str, Any]] = []
    lock = threading.Lock()
    try:
        if args.wait > 0:

            def on_message(_c: Any, _u: Any, msg: Any) -> None:
                if len(msg.payload) > MAX_DOC_BYTES:
                    return
                doc = _parse(msg.payload)
                ids = doc.get("ids") if doc is not None else None
                if doc is not None and isinstance(ids, list) and cmd["id"] in ids:
                    with lock:
                        events.append(doc)

            client.on_message = on_message
            sub = f"{PREFIX}/{args.device}/events" if args.device else f"{PREFIX}/+/events"
            client.subscribe(sub, qos=1)
        info = client.publish(topic, json.dumps(cmd), qos=1)
        info.wait_for_publish(15)
        if not info.is_published():
            raise FleetError(f"the broker did not acknowledge the trigger on {topic}")
        print(f"sent check {cmd['id']} to {topic}", file=sys.stderr)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            with lock:
                if len({str(e.get("device_id")) for e in events}) >= args.expect:
                    break
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    if args.json:
        json.dump({"id": cmd["id"], "topic": topic, "events": events}, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    for ev in events:
        installed = _dict(ev, "installed")
        failed = _dict(ev, "failed")
        what = ", ".join(f"installed {k} v{v}" for k, v in sorted(installed.items()))
        what = what or ("failed " + ", ".join(sorted(failed)) if failed else "up to date")
        print(f"{_printable(ev.get('device_id'), 64)}: {_printable(what, 120)}")
    return 0


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        action="append",
        metavar="URL",
        help="mqtt://, mqtts:// or unix:// broker URL (repeat to try several; "
        "default $EDGEWARD_MQTT_BROKER)",
    )
    p.add_argument("--ca", metavar="FILE", help="CA bundle for mqtts://")
    p.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    p.add_argument("--key", metavar="FILE", help="client key (PEM)")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", metavar="FILE", help="file holding the password")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``fleet status`` and ``fleet check``."""
    p = sub.add_parser("fleet", help="the fleet through the MQTT broker: status, check")
    fsub = p.add_subparsers(dest="fleet_command", required=True, metavar="SUBCOMMAND")
    sp = fsub.add_parser("status", help="one row per device from the retained status topics")
    _add_broker_args(sp)
    sp.add_argument(
        "--wait", type=float, default=2.0, metavar="S", help="seconds to collect (default 2)"
    )
    sp.set_defaults(func=cmd_status)
    cp = fsub.add_parser("check", help="ask a device or a group to check for updates now")
    who = cp.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", help="fleet group (devices wait their fleet jitter first)")
    who.add_argument("--device", help="one device id")
    cp.add_argument(
        "--model",
        help="a device that does not serve this model refuses the trigger "
        "(the check itself covers every model)",
    )
    _add_broker_args(cp)
    cp.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds to wait for the devices' result events (default: do not wait)",
    )
    cp.add_argument(
        "--expect",
        type=int,
        default=None,
        metavar="N",
        help="with --wait: stop once N devices answered (default 1 with --device)",
    )
    cp.set_defaults(func=cmd_check)
