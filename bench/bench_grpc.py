"""KServe v2 gRPC on the Unix socket vs in-process onnxruntime, with the HTTP socket's
figure beside it, and the daemon's idle RSS with gRPC enabled.

Anchor: the tiny model (``y = x * 2`` on a [1, 4096] float32 tensor) run in this
process with onnxruntime, measured in alternating blocks with the served calls (helpers
from bench/bench_socket.py). Served: the real daemon with ``[grpc] enabled = true``;
gRPC calls go through the generated grpcio stub with ``raw_input_contents`` (the
cheapest client, so the figure is the server side's), HTTP calls through
``agent.client.Client`` with binary tensors on a kept-alive (lent) connection.

The gRPC gateway is a process of its own (agent/grpc_v2/gateway.py) serving our HTTP/2
core (agent/serving/h2.py) with one thread per connection, and relays each RPC to the
daemon's inference socket (a lent connection: the worker answers it), so its added
latency includes one more process hop; the daemon's idle RSS is measured with the
gateway running, and the gateway's own RSS is printed and recorded beside it.

Three floors, measured in the same blocks, each the same RPC answered with a canned
answer of the same size (no upstream, no inference): a bare grpcio server with the old
gateway's settings (``--floor SOCKET``), our HTTP/2 core in the gateway's own
connection loop (``--core-floor SOCKET``), and a do-nothing responder that writes
precomputed frames (bench/grpc_floor.py's ``raw`` server): what the grpcio client
costs by itself, which no server can go below. The CPU each process spends per gRPC
call (client, gateway, worker) is printed beside them: the chain is serial, so their
sum is the latency.

History (2026-12-03, 2 vCPUs shared, interleaved medians): with grpcio's server the
gateway added ~1000 us at load 2 (the bare grpcio server alone 580-630 us); ``perf``
showed a quarter of its samples in context switches between grpcio's C-core threads,
and a grpc.aio server, 1 or 8 pool threads, ``grpc.optimization_target``, the worker's
spin off and a spinning upstream read all measured within the noise. A throwaway
hand-written HTTP/2 responder answered the same client in 178 us against 316 us for
bare grpcio, which led to agent/serving/h2.py (``python -m bench.h2_cores``: 32 us per
call cycle against 281 us for the h2 package). With it, this file run against main's
grpcio gateway, interleaved, 3 runs each at load 7-11: +625..757 us against +926..965;
in ``bench.run grpc`` at load 5-6, our core's floor +239..254 us against grpcio's
+416..516 in the same runs. Where the rest goes, measured inside the gateway: HPACK and
framing ~31 us per call, protobuf and the v2 head ~40 us, the upstream HTTP request to
the worker ~205 us. The same upstream request issued back to back from one process
takes ~115 us; issued after a 300 us pause (as the gateway does: it sleeps while the
grpcio client works) 267-344 us: the gateway and the worker have gone idle and their
vCPUs cold. Spinning on the upstream read and a longer worker spin (``lend_spin_us =
2000``) measured within the noise. So the goal needs the hop gone: the worker answering
the gRPC connection itself (lent, as HTTP connections are), which also needs the
connection's HTTP/2 state to travel with it or foreign calls relayed over the worker's
channel (workers may not reach the daemon's sockets).

Decomposed (2026-12-03, load 0.3-0.6, ``python -m bench.grpc_floor``): the grpcio
client against the do-nothing responder takes 190-260 us p50 and 195-230 us of its own
CPU per call (its C-core event-engine threads included; protobuf is ~1 us of it); our
core with a canned answer adds 30-90 us over that; the whole gateway chain is CPU-bound
(client ~215-230, gateway ~135-175, worker ~125-135 us CPU per call, perf: a third of
the gateway's own in wake-ups of the other processes). So ``<= 200`` is at or under
the client's own floor on this VM. Options for the hop, measured: our core + protobuf
+ onnxruntime in one process (the best a worker answering the gRPC connection itself
could do) 411 us p50 against ~480-500 through the gateway; the daemon relaying to the
worker instead of lending costs +292 us over a lent connection (HTTP, 384 against 92
us), so a gRPC listener in the daemon would be slower, not faster; a spinning worker
(``lend_spin_us`` 0/200/1000) is within the noise; glibc malloc tuning in the gateway
(agent/malloc.py, as the daemon and workers have) -22..-37 us.
``EDGEWARD_BENCH_QUICK=1`` shortens the loops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_socket import TINY_WIDTH, _package_dir, _paired_lat, _pct, _session, _tiny_onnx

ROOT = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("EDGEWARD_BENCH_QUICK") == "1"


def _grpc_extra(work: Path) -> str:
    from tests.daemon_util import run_dir

    return f'[grpc]\nenabled = true\nsocket = "{run_dir(work) / "grpc.sock"}"\n'


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def _cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` (every thread), from /proc (10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _idle_rss(work: Path) -> tuple[float, float]:
    """(daemon RSS, gateway RSS) in MB, a daemon serving no models with gRPC on."""
    import psutil

    from tests.daemon_util import start_daemon

    shutil.rmtree(work / "idle", ignore_errors=True)
    d = start_daemon(work / "idle", extra=_grpc_extra(work / "idle"))
    try:
        time.sleep(1.0)
        kids = psutil.Process(d.proc.pid).children()
        gateway = [k for k in kids if "agent.grpc_v2" in " ".join(k.cmdline())]
        return _rss_mb(d.proc.pid), (_rss_mb(gateway[0].pid) if gateway else float("nan"))
    finally:
        d.stop()


def _floor_server(path: str, options: list[tuple[str, Any]] | None = None) -> None:
    """A bare grpcio server (by default with the gateway's settings): ModelInfer answers
    y = the input's bytes, without an upstream (the floor of the gRPC figure)."""
    import threading
    from concurrent import futures

    import grpc

    from agent.grpc_v2 import grpc_service_pb2 as pb
    from agent.grpc_v2 import grpc_service_pb2_grpc as pb_grpc

    class Echo(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        def ModelInfer(self, request: Any, context: Any) -> Any:
            resp = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
            resp.outputs.add(name="y", datatype="FP32", shape=[1, TINY_WIDTH])
            resp.raw_output_contents.append(request.raw_input_contents[0])
            return resp

    if options is None:
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    print("READY", flush=True)
    threading.Event().wait()


def _core_floor_server(path: str) -> None:
    """Our HTTP/2 core in the gateway's connection loop, ModelInfer answering y = the
    input's bytes without an upstream (the floor of the gateway's transport)."""
    import threading

    from agent.grpc_v2 import grpc_service_pb2 as pb
    from agent.grpc_v2.gateway import Gateway, Service
    from agent.malloc import tune_malloc

    tune_malloc()  # as the gateway's main() does

    class Echo(Service):
        def call(self, path: str, message: bytes) -> tuple[int, bytes | str]:
            request = pb.ModelInferRequest.FromString(message)
            resp = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
            resp.outputs.add(name="y", datatype="FP32", shape=[1, TINY_WIDTH])
            resp.raw_output_contents.append(request.raw_input_contents[0])
            return 0, resp.SerializeToString()

    gw = Gateway(Path(path), "/nonexistent", mode=0o600)
    gw.service = Echo("/nonexistent", 1.0)
    gw.start()
    print("READY", flush=True)
    threading.Event().wait()


def _spawn_floor(flag: str, sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    argv = ["-m", "bench.bench_grpc", flag, str(sock)]
    if flag == "--raw-floor":  # bench/grpc_floor.py's do-nothing responder
        argv = ["-m", "bench.grpc_floor", "--serve", "raw", str(sock)]
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"READY"
    return proc


def run(work: Path) -> dict[str, float]:
    import grpc
    import psutil

    from agent.client import Client
    from agent.grpc_v2 import grpc_service_pb2 as pb
    from agent.grpc_v2 import grpc_service_pb2_grpc as pb_grpc
    from tests.daemon_util import start_daemon

    work.mkdir(parents=True, exist_ok=True)
    n = 300 if QUICK else 3000
    x = np.random.default_rng(1).standard_normal((1, TINY_WIDTH)).astype(np.float32)
    tiny_dir = _package_dir(work / "src", "tiny", _tiny_onnx(work / "tiny.onnx"), x)
    sess = _session(work / "tiny.onnx")

    def anchor() -> Any:
        return sess.run(None, {"x": x})

    shutil.rmtree(work / "daemon", ignore_errors=True)
    d = start_daemon(work / "daemon", [("tiny", "1", tiny_dir)], extra=_grpc_extra(work / "daemon"))
    try:
        from tests.daemon_util import run_dir

        channel = grpc.insecure_channel(f"unix:{run_dir(work / 'daemon') / 'grpc.sock'}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="tiny")
        req.inputs.add(name="x", datatype="FP32", shape=[1, TINY_WIDTH])
        req.raw_input_contents.append(x.tobytes())

        def via_grpc() -> Any:
            resp = stub.ModelInfer(req)
            return np.frombuffer(resp.raw_output_contents[0], dtype=np.float32)

        assert np.array_equal(via_grpc(), (x * 2).reshape(-1))
        floor = _spawn_floor("--floor", work / "floor.sock")
        floor_channel = grpc.insecure_channel(f"unix:{work / 'floor.sock'}")
        floor_stub = pb_grpc.GRPCInferenceServiceStub(floor_channel)
        core = _spawn_floor("--core-floor", work / "core.sock")
        core_channel = grpc.insecure_channel(f"unix:{work / 'core.sock'}")
        core_stub = pb_grpc.GRPCInferenceServiceStub(core_channel)

        raw = _spawn_floor("--raw-floor", work / "raw.sock")
        raw_channel = grpc.insecure_channel(f"unix:{work / 'raw.sock'}")
        raw_stub = pb_grpc.GRPCInferenceServiceStub(raw_channel)

        def via_floor() -> Any:
            return floor_stub.ModelInfer(req)

        def via_core() -> Any:
            return core_stub.ModelInfer(req)

        def via_raw() -> Any:
            return raw_stub.ModelInfer(req)

        assert core_stub.ModelInfer(req).raw_output_contents[0] == req.raw_input_contents[0]

        http = Client(str(d.infer_sock))

        def via_http() -> Any:
            return http.infer("tiny", {"x": x})

        kids = psutil.Process(d.proc.pid).children(recursive=True)
        pids = {
            "gateway": next(k.pid for k in kids if "agent.grpc_v2" in " ".join(k.cmdline())),
            "worker": next(k.pid for k in kids if "worker_main" in " ".join(k.cmdline())),
        }
        cpu0 = {k: _cpu(p) for k, p in pids.items()} | {"client": _own_cpu()}
        a_g, s_g = _paired_lat(anchor, via_grpc, n)
        cpu1 = {k: _cpu(p) for k, p in pids.items()} | {"client": _own_cpu()}
        a_h, s_h = _paired_lat(anchor, via_http, n)
        a_f, s_f = _paired_lat(anchor, via_floor, n)
        a_c, s_c = _paired_lat(anchor, via_core, n)
        a_r, s_r = _paired_lat(anchor, via_raw, n)
        for ch, proc in ((floor_channel, floor), (core_channel, core), (raw_channel, raw)):
            ch.close()
            proc.kill()
            proc.wait()
        live = pb.ServerLiveRequest()
        # the floor: an RPC that does no inference (the gateway asks the daemon's
        # /v2/health/live, a short HTTP round trip answered by the daemon itself)
        _a, s_live = _paired_lat(lambda: None, lambda: stub.ServerLive(live), max(n // 3, 100))
        channel.close()
    finally:
        d.stop()
    daemon_rss, gateway_rss = _idle_rss(work)
    us = 1e6
    grpc_added = (_pct(s_g, 0.5) - _pct(a_g, 0.5)) * us
    http_added = (_pct(s_h, 0.5) - _pct(a_h, 0.5)) * us
    floor_added = (_pct(s_f, 0.5) - _pct(a_f, 0.5)) * us
    core_added = (_pct(s_c, 0.5) - _pct(a_c, 0.5)) * us
    raw_added = (_pct(s_r, 0.5) - _pct(a_r, 0.5)) * us
    # CPU per gRPC call (the anchor's in-process runs, ~5 us each, are in the client's)
    calls = len(s_g) + 50 + 2 * 10  # _paired_lat's timed calls, its warm-up, 2 per block
    cpu = {k: (cpu1[k] - cpu0[k]) / calls * us for k in cpu0}
    print(
        f"tiny [1,{TINY_WIDTH}] fp32: in-process p50 {_pct(a_g, 0.5) * us:.1f} us; gRPC "
        f"(raw_input_contents, gateway process, our HTTP/2 core) p50 {_pct(s_g, 0.5) * us:.1f} us "
        f"(+{grpc_added:.1f} us, goal <= 200); HTTP binary (lent connection) p50 "
        f"{_pct(s_h, 0.5) * us:.1f} us (+{http_added:.1f} us); gRPC / HTTP added "
        f"{grpc_added / http_added:.2f}x"
    )
    print(
        f"floors, the same RPC with a canned answer (no upstream, no inference): our HTTP/2 "
        f"core in the gateway's loop p50 {_pct(s_c, 0.5) * us:.1f} us (+{core_added:.1f} us); "
        f"a bare grpcio server p50 {_pct(s_f, 0.5) * us:.1f} us (+{floor_added:.1f} us); "
        f"a do-nothing responder (precomputed frames: the grpcio client's own floor) p50 "
        f"{_pct(s_r, 0.5) * us:.1f} us (+{raw_added:.1f} us); "
        f"the gateway adds {grpc_added - core_added:.1f} us over its core's floor (the HTTP "
        f"hop to the worker and the inference included); uptime load "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        f"CPU per gRPC ModelInfer (process totals / calls): grpcio client "
        f"{cpu['client']:.0f} us, gateway {cpu['gateway']:.0f} us, worker {cpu['worker']:.0f} us "
        f"(the chain is serial: their sum is the latency, less what overlaps)"
    )
    print(
        f"gRPC ServerLive (no inference: grpcio client + the gateway + one HTTP round trip "
        f"to the daemon) p50 {_pct(s_live, 0.5) * us:.1f} us"
    )
    print(
        f"idle with [grpc] enabled: daemon RSS {daemon_rss:.1f} MB "
        f"({daemon_rss / 60:.2f}x of the 60 MB budget); gateway process RSS {gateway_rss:.1f} MB"
    )
    return {
        "grpc_added_p50_us_tiny": grpc_added,
        "grpc_http_added_p50_us_tiny": http_added,
        "grpc_floor_added_p50_us_tiny": floor_added,
        "grpc_core_floor_added_p50_us_tiny": core_added,
        "grpc_client_floor_added_p50_us_tiny": raw_added,
        "daemon_idle_rss_mb_grpc": daemon_rss,
        "grpc_gateway_idle_rss_mb": gateway_rss,
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor"]:
        _floor_server(sys.argv[2])
    if sys.argv[1:2] == ["--core-floor"]:
        _core_floor_server(sys.argv[2])
    print(run(ROOT / "bench" / "work" / "grpc"))
    sys.exit(0)
