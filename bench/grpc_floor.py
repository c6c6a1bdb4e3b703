"""Where the gRPC floor goes (issue 18): the grpcio client's own cost per call against
our HTTP/2 core's, on the tiny-model RPC (ModelInfer, [1, 4096] fp32 as
``raw_input_contents``, a canned answer of the same size: no upstream, no inference).

``python -m bench.grpc_floor [N]`` (not part of ``make bench``). Two clients × three
servers, each server a process of its own on a Unix socket, measured in interleaved
blocks (medians of the per-block p50s):

clients
  ``grpcio``: the generated stub on ``grpc.insecure_channel("unix:...")``, as
  bench/bench_grpc.py calls it;
  ``raw``: a blocking socket writing precomputed frames (HEADERS with literal fields,
  the message in DATA frames) and reading until the trailers: no HPACK table, no
  protobuf, no threads. No Python client can do less per call.
servers
  ``raw``: reads frames, answers each finished stream with precomputed frames (only the
  stream id patched), SETTINGS ACKs and PINGs answered, flow control opened wide. No
  server can do less per call.
  ``core``: our HTTP/2 core (agent/serving/h2.py) in the gateway's blocking loop
  shape, answering with the canned message bytes (no protobuf).
  ``model``: ``core`` plus what a model worker answering the gRPC connection itself
  would do at least: parse the request (protobuf), run the tiny model (onnxruntime),
  build and serialise the answer. The best case of lending gRPC connections to workers.
  ``grpcio``: a bare grpcio server (generated servicer, ``raw_output_contents`` echo).

Besides wall time, each pair's CPU per call: the client process's (``getrusage``,
all its threads, grpcio's C-core included) and the server process's
(``/proc/PID/stat``). Wall − client CPU − server CPU is the time neither process
runs: wake-ups and scheduling on this VM.

Also the client stub's protobuf work alone, in process: building nothing (the request
is built once, as the benchmark does), ``SerializeToString`` of the request and
``FromString`` of the answer.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bench_grpc import _cpu, _own_cpu
from bench.bench_socket import TINY_WIDTH as WIDTH

ROOT = Path(__file__).resolve().parents[1]
FRAME = struct.Struct("!HBBBL")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PATH = b"/inference.GRPCInferenceService/ModelInfer"
BIG = 2**31 - 1


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _messages() -> tuple[bytes, bytes]:
    """(the request message, the canned answer message), protobuf-encoded."""
    from agent.grpc_v2 import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="x", datatype="FP32", shape=[1, WIDTH])
    req.raw_input_contents.append(bytes(4 * WIDTH))
    resp = pb.ModelInferResponse(model_name="tiny", model_version="1")
    resp.outputs.add(name="y", datatype="FP32", shape=[1, WIDTH])
    resp.raw_output_contents.append(bytes(4 * WIDTH))
    return req.SerializeToString(), resp.SerializeToString()


def _data_frames(sid: int, message: bytes, end: bool) -> bytes:
    body = struct.pack("!BL", 0, len(message)) + message
    out = []
    for i in range(0, len(body), 16384):
        last = i + 16384 >= len(body)
        out.append(_frame(0, 1 if (last and end) else 0, sid, body[i : i + 16384]))
    return b"".join(out)


def _opening_server() -> bytes:
    settings = struct.pack("!HLHL", 4, BIG, 3, 1000)  # initial window, max streams
    return _frame(4, 0, 0, settings) + _frame(8, 0, 0, struct.pack("!L", BIG - 65535))


class _Reader:
    """Frames from a blocking socket."""

    def __init__(self, sock: socket.socket, skip: int = 0) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.skip = skip  # the connection preface, on a server

    def frames(self) -> Any:
        while True:
            data = self.sock.recv(1 << 18)
            if not data:
                return
            self.buf += data
            if self.skip:
                if len(self.buf) < self.skip:
                    continue
                del self.buf[: self.skip]
                self.skip = 0
            pos, end = 0, len(self.buf)
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = FRAME.unpack_from(self.buf, pos)
                n = (hi << 8) | lo
                if end - pos - 9 < n:
                    break
                yield ftype, flags, sid & BIG, bytes(self.buf[pos + 9 : pos + 9 + n])
                pos += 9 + n
            del self.buf[:pos]


# --- servers (each runs in its own process: ``--serve KIND PATH``) ----------------------


def _serve_raw(conn: socket.socket, answer: bytes) -> None:
    from agent.serving.h2 import encode_headers

    head = encode_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
    trailers = encode_headers([(b"grpc-status", b"0")])
    # One answer, every byte but the stream ids precomputed.
    parts = [_frame(1, 4, 1, head), _data_frames(1, answer, False), _frame(1, 5, 1, trailers)]
    tmpl = bytearray(b"".join(parts))
    offsets = []
    pos = 0
    while pos < len(tmpl):
        offsets.append(pos + 5)
        pos += 9 + ((tmpl[pos] << 16) | (tmpl[pos + 1] << 8) | tmpl[pos + 2])
    conn.sendall(_opening_server())
    r = _Reader(conn, len(PREFACE))
    received = 0
    for ftype, flags, sid, payload in r.frames():
        if ftype == 0:
            received += len(payload)
            if received > 1 << 30:
                conn.sendall(_frame(8, 0, 0, struct.pack("!L", received)))
                received = 0
            if flags & 1:
                for off in offsets:
                    struct.pack_into("!L", tmpl, off, sid)
                conn.sendall(tmpl)
        elif ftype == 4 and not flags & 1:
            conn.sendall(_frame(4, 1, 0))
        elif ftype == 6 and not flags & 1:
            conn.sendall(_frame(6, 1, 0, payload))


def _h2_loop(conn: socket.socket, answer_for: Callable[[bytes], bytes]) -> None:
    """Our HTTP/2 core in the gateway's blocking loop shape, answering each call's
    message with ``answer_for(message)``."""
    from agent.serving.h2 import H2Server

    h2 = H2Server()
    conn.sendall(h2.data_to_send())
    while True:
        data = conn.recv(256 * 1024)
        if not data:
            return
        for call in h2.receive(data):
            h2.respond(call.stream_id, answer_for(call.message))
        out = h2.data_to_send()
        if out:
            conn.sendall(out)
        if h2.closed:
            return


def _serve_core(conn: socket.socket, answer: bytes) -> None:
    _h2_loop(conn, lambda _message: answer)


def _serve_model(conn: socket.socket, answer: bytes) -> None:
    """What a worker answering the gRPC connection itself would do per call, at least:
    our core, the request parsed (protobuf), the tiny model run by onnxruntime on the
    raw bytes, the answer built and serialised."""
    import numpy as np

    from agent.grpc_v2 import grpc_service_pb2 as pb
    from bench.bench_socket import _session, _tiny_onnx

    sess = _session(_tiny_onnx(ROOT / "bench" / "work" / "grpc_floor" / "tiny.onnx"))

    def run(message: bytes) -> bytes:
        req = pb.ModelInferRequest.FromString(message)
        t = req.inputs[0]
        x = np.frombuffer(req.raw_input_contents[0], dtype=np.float32).reshape(t.shape)
        (y,) = sess.run(None, {t.name: x})
        resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1")
        resp.outputs.add(name="y", datatype="FP32", shape=list(y.shape))
        resp.raw_output_contents.append(y.tobytes())
        return bytes(resp.SerializeToString())

    _h2_loop(conn, run)


def _serve(kind: str, path: str) -> None:
    _req, answer = _messages()
    if kind == "grpcio":
        from bench.bench_grpc import _floor_server

        _floor_server(path, options=[])
    fn = {"raw": _serve_raw, "core": _serve_core, "model": _serve_model}[kind]
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    print("READY", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=fn, args=(conn, answer), daemon=True).start()


# --- clients ----------------------------------------------------------------------------


def _raw_client(path: str, message: bytes) -> Callable[[], Any]:
    from agent.serving.h2 import encode_headers

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(PREFACE + _opening_server())
    head = encode_headers(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", PATH),
            (b":authority", b"localhost"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ]
    )
    body = _data_frames(1, message, True)
    tmpl = bytearray(_frame(1, 4, 1, head) + body)
    offsets = []
    pos = 0
    while pos < len(tmpl):
        offsets.append(pos + 5)
        pos += 9 + ((tmpl[pos] << 16) | (tmpl[pos + 1] << 8) | tmpl[pos + 2])
    r = _Reader(sock)
    frames = r.frames()
    state = {"sid": 1, "got": 0}

    def call() -> bytes:
        sid = state["sid"]
        state["sid"] = sid + 2
        for off in offsets:
            struct.pack_into("!L", tmpl, off, sid)
        sock.sendall(tmpl)
        got = bytearray()
        for ftype, flags, fsid, payload in frames:
            if ftype == 0 and fsid == sid:
                got += payload
                state["got"] += len(payload)
            elif ftype == 1 and fsid == sid and flags & 1:
                if state["got"] > 1 << 30:
                    sock.sendall(_frame(8, 0, 0, struct.pack("!L", state["got"])))
                    state["got"] = 0
                return bytes(got)
            elif ftype == 4 and not flags & 1:
                sock.sendall(_frame(4, 1, 0))
            elif ftype == 6 and not flags & 1:
                sock.sendall(_frame(6, 1, 0, payload))
        raise ConnectionError("server closed")

    return call


def _grpcio_client(path: str, message: bytes) -> Callable[[], Any]:
    import grpc

    from agent.grpc_v2 import grpc_service_pb2 as pb
    from agent.grpc_v2 import grpc_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"unix:{path}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    req = pb.ModelInferRequest.FromString(message)
    return lambda: stub.ModelInfer(req)


def _block(fn: Callable[[], Any], n: int, pid: int) -> tuple[float, float, float]:
    """(p50 wall, client CPU, server CPU) of n calls, seconds (CPU summed: the kernel
    counts it in 10 ms ticks, so only sums over many calls mean anything)."""
    lat = []
    c0, s0 = _own_cpu(), _cpu(pid)
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    c1, s1 = _own_cpu(), _cpu(pid)
    lat.sort()
    return lat[n // 2], c1 - c0, s1 - s0


def _proto_alone(message: bytes, answer: bytes, n: int = 20000) -> tuple[float, float]:
    from agent.grpc_v2 import grpc_service_pb2 as pb

    req = pb.ModelInferRequest.FromString(message)
    t0 = time.perf_counter()
    for _ in range(n):
        req.SerializeToString()
    ser = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        pb.ModelInferResponse.FromString(answer)
    de = (time.perf_counter() - t0) / n
    return ser, de


def main(n: int) -> None:
    work = ROOT / "bench" / "work" / "grpc_floor"
    work.mkdir(parents=True, exist_ok=True)
    message, answer = _messages()
    servers: dict[str, subprocess.Popen[bytes]] = {}
    paths = {}
    try:
        for kind in ("raw", "core", "model", "grpcio"):
            p = work / f"{kind}.sock"
            p.unlink(missing_ok=True)
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.grpc_floor", "--serve", kind, str(p)],
                stdout=subprocess.PIPE,
                cwd=ROOT,
            )
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"READY"
            servers[kind] = proc
            paths[kind] = str(p)
        pairs: dict[str, tuple[Callable[[], Any], int]] = {}
        for ckind, make in (("raw", _raw_client), ("grpcio", _grpcio_client)):
            for skind in ("raw", "core", "model", "grpcio"):
                if ckind == "raw" and skind in ("grpcio", "model"):
                    continue  # grpcio's server wants HPACK state and more than we send
                fn = make(paths[skind], message)
                for _ in range(200):
                    fn()
                pairs[f"{ckind} client -> {skind} server"] = (fn, servers[skind].pid)
        inproc: Callable[[], Any] = lambda: None  # noqa: E731 (the anchor: a call of nothing)
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in pairs}
        anchor: list[float] = []
        for _ in range(10):
            for k, (fn, pid) in pairs.items():
                results[k].append(_block(fn, n, pid))
                anchor.append(_block(inproc, n, os.getpid())[0])
        load = os.getloadavg()[0]
        print(f"per call, medians of 10 interleaved blocks of {n} calls; load {load:.1f}")
        print(f"{'pair':34s} {'p50 us':>8s} {'client CPU':>11s} {'server CPU':>11s} {'idle':>8s}")
        for k, rows in results.items():
            wall = statistics.median(r[0] for r in rows) * 1e6
            ccpu = sum(r[1] for r in rows) / (n * len(rows)) * 1e6
            scpu = sum(r[2] for r in rows) / (n * len(rows)) * 1e6
            print(f"{k:34s} {wall:8.1f} {ccpu:11.1f} {scpu:11.1f} {wall - ccpu - scpu:8.1f}")
        ser, de = _proto_alone(message, answer)
        print(
            f"client stub's protobuf alone: request SerializeToString {ser * 1e6:.1f} us, "
            f"answer FromString {de * 1e6:.1f} us; anchor (an empty call) "
            f"{statistics.median(anchor) * 1e6:.2f} us"
        )
    finally:
        for proc in servers.values():
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _serve(sys.argv[2], sys.argv[3])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
