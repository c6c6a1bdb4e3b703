"""Load: 16 clients x 2,000 requests with malformed ones mixed in; hot swap under load.

Clients are threads speaking raw HTTP/1.1 over keep-alive Unix-socket connections with
prebuilt request bytes, so the client side stays cheap on a 2-core box.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from agent.serving.connection import UnixHTTPConnection
from tests.daemon_util import DaemonProc, make_package, needs_worker, signing_key, start_daemon
from tests.emulation import thread_rss_cost

pytestmark = [pytest.mark.e2e, needs_worker]

CLIENTS = 16
REQUESTS = 2000
BAD_EVERY = 40  # one malformed request in 40
HEADER_TIMEOUT = 0.5  # seconds; the slow-header client waits this long for its 408


def _request(body: bytes, *, extra: bytes = b"", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: edge\r\n"
        b"Content-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n" % n + body
    )


def _body(shape: list[int], datatype: str, data: list[float]) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}
    ).encode()


GOOD = _request(_body([1, 4], "FP32", [1, 1, 1, 1]))
BAD: dict[str, bytes] = {
    "bad-json": _request(b'{"inputs": [{"name": "x", "shape": [1, 4'),
    "wrong-shape": _request(_body([1, 5], "FP32", [1, 1, 1, 1, 1])),
    "wrong-dtype": _request(_body([1, 4], "BYTES", ["a", "b", "c", "d"])),
    "lying-length": _request(_body([1, 4], "FP32", [1, 1, 1, 1]), length=17),
    "header-flood": _request(
        b"{}", extra=b"".join(b"X-Flood-%d: %s\r\n" % (i, b"a" * 64) for i in range(2000))
    ),
    "slow-headers": b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: edge\r\n",
}


class Conn(UnixHTTPConnection):
    """One keep-alive HTTP/1.1 connection, requests written by hand (the agent's one
    client connection class reads the responses)."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), 60)
        self.sock = self.connect()

    def response(self) -> tuple[int, bytes]:
        status, _headers, body = self.read_response()
        return status, bytes(body)

    def call(self, raw: bytes) -> tuple[int, bytes]:
        self.send(raw)
        return self.response()


def bad_request(path: Path, kind: str) -> tuple[int, dict[str, object]]:
    """Send one malformed request on its own connection; return (status, JSON body)."""
    c = Conn(path)
    try:
        try:
            c.sock.sendall(BAD[kind])
        except (BrokenPipeError, ConnectionResetError):
            # The server answers a header flood once it has read past its limit and
            # closes; the rest of our send then fails, but its answer is still readable.
            if kind != "header-flood":
                raise
        if kind == "lying-length":
            c.sock.shutdown(socket.SHUT_WR)
        status, body = c.response()
        return status, json.loads(body)
    finally:
        c.close()


@dataclass
class Tally:
    good: int = 0
    served_by: Counter[str] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(
    path: Path,
    n: int,
    tally: Tally,
    *,
    bad_every: int,
    seed: int,
    until: threading.Event | None = None,
) -> None:
    """``n`` requests (and more, until ``until`` is set, if given)."""
    conn = Conn(path)
    kinds = list(BAD)
    i = -1
    try:
        while True:
            i += 1
            if i >= n and (until is None or until.is_set()):
                break
            if bad_every and i % bad_every == bad_every - 1:
                kind = kinds[(seed + i // bad_every) % len(kinds)]
                try:
                    status, err = bad_request(path, kind)
                    ok = 400 <= status < 500 and isinstance(err.get("error"), str)
                except Exception as exc:
                    ok, status, err = False, 0, {"exc": repr(exc)}
                with tally.lock:
                    if ok:
                        tally.bad[kind] += 1
                    else:
                        tally.failures.append(f"{kind}: {status} {err}")
                continue
            try:
                status, body = conn.call(GOOD)
            except Exception as exc:
                with tally.lock:
                    tally.failures.append(f"good request: {exc!r}")
                conn.close()
                conn = Conn(path)
                continue
            if status != 200:
                with tally.lock:
                    tally.failures.append(f"good request: {status} {body[:200]!r}")
                continue
            out = json.loads(body)["outputs"][0]["data"]
            with tally.lock:
                tally.good += 1
                tally.served_by[str(out[0])] += 1
    finally:
        conn.close()


def hammer(
    path: Path,
    n: int,
    *,
    bad_every: int,
    clients: int = CLIENTS,
    until: threading.Event | None = None,
) -> Tally:
    tally = Tally()
    kw = {"bad_every": bad_every, "until": until}
    threads = [
        threading.Thread(target=client, args=(path, n, tally), kwargs={**kw, "seed": k})
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def _limits() -> dict[str, object]:
    from agent.serving.http import HTTPLimits

    names = {f for f in HTTPLimits.__dataclass_fields__}
    for key in ("header_timeout", "header_timeout_s", "header_read_timeout"):
        if key in names:
            return {key: HEADER_TIMEOUT}
    raise AssertionError(f"HTTPLimits has no header timeout field: {sorted(names)}")


def _run_in_background(fn: Callable[[], Tally]) -> tuple[threading.Thread, dict[str, Tally]]:
    box: dict[str, Tally] = {}
    t = threading.Thread(target=lambda: box.__setitem__("t", fn()))
    t.start()
    return t, box


def test_16x2000_with_malformed_rss_flat(tmp_path: Path) -> None:
    key, trust = signing_key(tmp_path)
    pkg = make_package(tmp_path, key, "tiny", "1", scale=2.0)
    d = start_daemon(tmp_path / "w", [pkg], trust=[*trust.glob("*.pub")], limits=_limits())
    try:
        warm = hammer(d.infer_sock, 150, bad_every=10)
        assert warm.failures == [], warm.failures[:5]
        rss_warm = d.rss_bytes()
        (worker,) = psutil.Process(d.proc.pid).children()  # answers lent connections
        worker_warm = worker.memory_info().rss
        t0 = time.monotonic()
        tally = hammer(d.infer_sock, REQUESTS, bad_every=BAD_EVERY)
        elapsed = time.monotonic() - t0
        rss_end = d.rss_bytes()
        worker_end = worker.memory_info().rss
        assert tally.failures == [], tally.failures[:10]
        expected_bad = CLIENTS * (REQUESTS // BAD_EVERY)
        assert tally.good == CLIENTS * REQUESTS - expected_bad
        assert sum(tally.bad.values()) == expected_bad
        assert set(tally.bad) == set(BAD)
        assert tally.served_by == Counter({"2.0": tally.good})
        assert d.proc.poll() is None
        # Each malformed request has its own connection; a thread per connection costs
        # RSS for good only under emulation (measured; ~0 natively, tests/emulation.py).
        connections = CLIENTS + expected_bad
        allowance = 20 * 1024 * 1024 + int(thread_rss_cost() * connections)
        assert rss_end - rss_warm < allowance, (rss_warm, rss_end, allowance)
        assert worker_end - worker_warm < allowance, (worker_warm, worker_end, allowance)
        print(
            f"\n{tally.good} good + {expected_bad} bad requests in {elapsed:.1f}s; "
            f"daemon RSS {rss_warm / 1e6:.1f} -> {rss_end / 1e6:.1f} MB, worker "
            f"{worker_warm / 1e6:.1f} -> {worker_end / 1e6:.1f} MB"
        )
    finally:
        d.stop()


def test_hot_swap_under_load_zero_failures(tmp_path: Path) -> None:
    key, trust = signing_key(tmp_path)
    v1 = make_package(tmp_path, key, "tiny", "1", scale=2.0)
    v2 = make_package(tmp_path, key, "tiny", "2", scale=3.0)
    d: DaemonProc = start_daemon(
        tmp_path / "w", [v1], trust=[*trust.glob("*.pub")], trust_dir=trust
    )
    try:
        done = threading.Event()
        thread, box = _run_in_background(lambda: hammer(d.infer_sock, 100, bad_every=0, until=done))
        time.sleep(0.5)
        (d.inbox / v2.name).write_bytes(v2.read_bytes())
        res = d.cli("check", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["installed"] == {"tiny": "2"}
        time.sleep(0.5)  # keep hammering the new version for a moment
        done.set()
        thread.join()
        tally = box["t"]
        assert tally.failures == [], tally.failures[:10]
        assert tally.good >= CLIENTS * 100
        # both versions served during the run, v2 at the end
        assert tally.served_by["2.0"] > 0 and tally.served_by["3.0"] > 0, tally.served_by
        after = hammer(d.infer_sock, 5, bad_every=0, clients=2)
        assert set(after.served_by) == {"3.0"}
        models = json.loads(d.cli("models", "--json").stdout)["models"]
        assert models[0]["version"] == "2" and models[0]["previous"] == "1"
    finally:
        d.stop()
