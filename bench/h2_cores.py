"""One unary gRPC call cycle of HTTP/2 framing, without sockets: Edgeward's own core
(agent/serving/h2.py) against the ``h2`` package's state machine, on the call the
tiny-model gRPC benchmark makes (ModelInfer with a [1, 4096] fp32 ``raw_input_contents``
as the grpcio client frames it: an indexed header block, the message in two DATA
frames, a connection WINDOW_UPDATE for the answer). Each cycle: the request's bytes
in, the call out, the answer (headers, one ~16 KiB message, grpc-status trailers)
rendered. What it decides: whether a kept library fits the 200 us budget of
``grpc_added_p50_us_tiny`` (every call pays this once). Results: docs/PROTOCOL.md, "One
HTTP/2 core".

    .venv/bin/python -m bench.h2_cores       (h2 is in the test extra)
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable

import hpack

HEADERS = [
    (":scheme", "http"),
    (":method", "POST"),
    (":authority", "localhost"),
    (":path", "/inference.GRPCInferenceService/ModelInfer"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-python/1.85.3 grpc-c/51.0.0 (linux; chttp2)"),
    ("grpc-accept-encoding", "identity, deflate, gzip"),
]
MESSAGE = bytes(16420)  # a ModelInferRequest with 16 KiB of raw_input_contents
ANSWER = bytes(16450)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CALLS = 4000  # calls per round (one connection each round: stream ids must rise)


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack("!HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _calls() -> tuple[bytes, list[bytes]]:
    """(the connection's opening bytes, each call's bytes), encoded once, untimed."""
    enc = hpack.Encoder()
    body = struct.pack("!BL", 0, len(MESSAGE)) + MESSAGE
    calls = []
    for i in range(CALLS + 1):
        sid = 2 * i + 1
        calls.append(
            _frame(1, 0x4, sid, enc.encode(HEADERS))
            + _frame(0, 0, sid, body[:16384])
            + _frame(0, 0x1, sid, body[16384:])
            + _frame(8, 0, 0, struct.pack("!L", len(ANSWER) + 5))
        )
    return PREFACE + _frame(4, 0, 0), calls


def ours() -> Callable[[], Callable[[], object]]:
    from agent.serving.h2 import H2Server

    opening, calls = _calls()

    def connect() -> Callable[[], object]:
        srv = H2Server()
        srv.receive(opening + calls[0])  # the first call fills the HPACK table
        srv.data_to_send()
        it = iter(calls[1:])

        def cycle() -> object:
            for call in srv.receive(next(it)):
                srv.respond(call.stream_id, ANSWER)
            return srv.data_to_send()

        return cycle

    return connect


def with_h2() -> Callable[[], Callable[[], object]]:
    import h2.config
    import h2.connection
    import h2.events

    opening, calls = _calls()
    head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    tail = [(b"grpc-status", b"0")]

    def connect() -> Callable[[], object]:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        bodies: dict[int, bytearray] = {}

        def feed(data: bytes) -> object:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    bodies[ev.stream_id] = bytearray()
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    sid = ev.stream_id
                    assert len(bodies.pop(sid)) == len(MESSAGE) + 5
                    conn.send_headers(sid, head)
                    out = struct.pack("!BL", 0, len(ANSWER)) + ANSWER
                    size = conn.max_outbound_frame_size  # h2 leaves the splitting to us
                    for i in range(0, len(out), size):
                        conn.send_data(sid, out[i : i + size])
                    conn.send_headers(sid, tail, end_stream=True)
            return conn.data_to_send()

        feed(opening + calls[0])  # the first call fills the HPACK table
        it = iter(calls[1:])
        return lambda: feed(next(it))

    return connect


def median_us(connect: Callable[[], Callable[[], object]], rounds: int = 5) -> float:
    per: list[float] = []
    for _ in range(rounds):
        fn = connect()
        n = CALLS - 10
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(per)


def main() -> None:
    contenders: dict[str, Callable[[], Callable[[], object]]] = {
        "edgeward h2 (agent/serving/h2.py)": ours(),
        "h2 4.x (hyper-h2, pure Python)": with_h2(),
    }
    results: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(3):  # interleaved: load swings hit every contender alike
        for k, connect in contenders.items():
            results[k].append(median_us(connect))
    anchor = statistics.median(results["edgeward h2 (agent/serving/h2.py)"])
    for k, xs in results.items():
        m = statistics.median(xs)
        print(f"{k:36s} {m:7.2f} us per call cycle ({m / anchor:.2f}x)")


if __name__ == "__main__":
    main()
