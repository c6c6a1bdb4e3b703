"""KServe v2 gRPC on the Unix socket vs in-process onnxruntime, with the HTTP socket's
figure beside it, and the daemon's idle RSS with gRPC enabled.

Anchor: the tiny model (``y = x * 2`` on a [1, 4096] float32 tensor) run in this
process with onnxruntime, measured in alternating blocks with the served calls (helpers
from bench/bench_socket.py). Served: the real daemon with ``[grpc] enabled = true``;
gRPC calls go through the generated stub with ``raw_input_contents`` (the cheapest
client, so the figure is the server side's), HTTP calls through ``agent.client.Client``
with binary tensors on a kept-alive (lent) connection.

The gRPC gateway is a process of its own that relays each RPC to the daemon's inference
socket (agent/grpc_v2/gateway.py: ``import grpc`` costs ~26 MB, which the daemon's 60 MB
budget cannot hold), so its added latency includes one more process hop; the daemon's
idle RSS is measured with the gateway running, and the gateway's own RSS is printed and
recorded beside it.

The floor, measured in the same blocks: the same RPC answered by a bare grpcio server
(this file run with ``--floor SOCKET``: the gateway's server settings, a handler that
returns a canned answer of the same size, no upstream, no inference). It is what the
Python grpcio client and server cost by themselves, which no gateway design over grpcio
can go below.

Where the rest goes (2026-12-03, load 7-15 on 2 vCPUs, interleaved medians): the
gateway's own work per RPC, run in-process without gRPC, is ~75 us (the HTTP client's is
~73); inside the grpcio server the same handler takes ~280 us and the RPC ~800 us.
``perf`` on the gateway shows a quarter of its samples in context switches (futex waits
between the C-core threads, the poll thread and the pool thread). A grpc.aio server (with
an asyncio or a blocking upstream), 1 or 8 pool threads, ``grpc.optimization_target``,
the worker's spin off and a spinning upstream read all measured within the noise (±10%).
A throwaway hand-written HTTP/2 responder (frames + the hpack package, one thread per
connection) answered the same grpcio client in 178 us against 316 us for the bare grpcio
server: that transport, not grpcio's, is the way under 200.
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


def _floor_server(path: str) -> None:
    """A bare grpcio server with the gateway's settings: ModelInfer answers y = the
    input's bytes, without an upstream (the floor of the gRPC figure)."""
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

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    print("READY", flush=True)
    threading.Event().wait()


def run(work: Path) -> dict[str, float]:
    import grpc

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
        floor_sock = work / "floor.sock"
        floor_sock.unlink(missing_ok=True)
        floor = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_grpc", "--floor", str(floor_sock)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert floor.stdout is not None and floor.stdout.readline().strip() == b"READY"
        floor_channel = grpc.insecure_channel(f"unix:{floor_sock}")
        floor_stub = pb_grpc.GRPCInferenceServiceStub(floor_channel)

        def via_floor() -> Any:
            return floor_stub.ModelInfer(req)

        http = Client(str(d.infer_sock))

        def via_http() -> Any:
            return http.infer("tiny", {"x": x})

        a_g, s_g = _paired_lat(anchor, via_grpc, n)
        a_h, s_h = _paired_lat(anchor, via_http, n)
        a_f, s_f = _paired_lat(anchor, via_floor, n)
        floor_channel.close()
        floor.kill()
        floor.wait()
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
    print(
        f"tiny [1,{TINY_WIDTH}] fp32: in-process p50 {_pct(a_g, 0.5) * us:.1f} us; gRPC "
        f"(raw_input_contents, gateway process) p50 {_pct(s_g, 0.5) * us:.1f} us "
        f"(+{grpc_added:.1f} us, goal <= 200); HTTP binary (lent connection) p50 "
        f"{_pct(s_h, 0.5) * us:.1f} us (+{http_added:.1f} us); gRPC / HTTP added "
        f"{grpc_added / http_added:.2f}x"
    )
    print(
        f"the floor: the same RPC answered by a bare grpcio server (no gateway, no inference) "
        f"p50 {_pct(s_f, 0.5) * us:.1f} us (+{floor_added:.1f} us); the gateway adds "
        f"{grpc_added - floor_added:.1f} us over it (its HTTP hop to the worker and the "
        f"inference included); uptime load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"gRPC ServerLive (no inference: Python gRPC client + server + one HTTP round trip "
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
        "daemon_idle_rss_mb_grpc": daemon_rss,
        "grpc_gateway_idle_rss_mb": gateway_rss,
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor"]:
        _floor_server(sys.argv[2])
    print(run(ROOT / "bench" / "work" / "grpc"))
    sys.exit(0)
