"""One request/response cycle of HTTP/1.1 framing, without sockets: Edgeward's own core
(agent/serving/h1.py) against h11 and httptools, on the request the tiny-model socket
benchmark sends (agent.client, binary tensors, kept alive). What it decides: whether a
kept library fits the latency budget (socket_added_p50_us_tiny_binary <= 150 us; every
request pays this once in the worker that serves a lent connection, and once more in
the daemon for relayed ones). Results: docs/PROTOCOL.md, "One HTTP/1.1 core".

    .venv/bin/python -m bench.h1_parsers       (pip install h11 httptools first)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

BODY = bytes(16 * 4 + 160)  # a [1,16] fp32 input after a 160-byte JSON header
HEAD = (
    b"POST /v2/models/tiny/infer HTTP/1.1\r\nhost: localhost\r\n"
    b"inference-header-content-length: 160\r\ncontent-type: application/octet-stream\r\n"
    b"content-length: %d\r\n\r\n" % len(BODY)
)
REQUEST = HEAD + BODY
OUT_BODY = bytes(64 + 150)
OUT_HEADERS = {"content-type": "application/octet-stream", "inference-header-content-length": "150"}


def ours() -> Callable[[], object]:
    from agent.limits import HTTPLimits
    from agent.serving import h1
    from agent.serving.http import Response

    limits = HTTPLimits()
    resp = Response(200, OUT_HEADERS, OUT_BODY)

    buf = bytearray(REQUEST)  # what the shell's recv_into filled

    def cycle() -> object:
        end = h1.find_head(buf, 0, len(buf), limits)
        head = h1.parse_request(bytes(buf[:end]), limits)
        body = buf[end + 4 : end + 4 + head.length]
        assert len(body) == len(BODY)
        return h1.render_response(resp, head.keep_alive)

    return cycle


def ours_cached() -> Callable[[], object]:
    """As the worker does: a program repeats the same head, parsed once."""
    from agent.limits import HTTPLimits
    from agent.serving import h1
    from agent.serving.http import Response

    limits = HTTPLimits()
    resp = Response(200, OUT_HEADERS, OUT_BODY)
    heads = h1.HeadCache(256)

    buf = bytearray(REQUEST)  # what the shell's recv_into filled

    def cycle() -> object:
        end = h1.find_head(buf, 0, len(buf), limits)
        head = heads.parse(bytes(buf[:end]), limits)
        body = buf[end + 4 : end + 4 + head.length]
        assert len(body) == len(BODY)
        return h1.render_response(resp, head.keep_alive)

    return cycle


def with_h11() -> Callable[[], object]:
    import h11

    conn = h11.Connection(h11.SERVER)
    out_headers = [(k.encode(), v.encode()) for k, v in OUT_HEADERS.items()]
    out_headers.append((b"content-length", str(len(OUT_BODY)).encode()))

    def cycle() -> object:
        conn.receive_data(REQUEST)
        req = conn.next_event()
        assert isinstance(req, h11.Request)
        data = conn.next_event()
        assert isinstance(data, h11.Data) and len(data.data) == len(BODY)
        assert isinstance(conn.next_event(), h11.EndOfMessage)
        out = [
            conn.send(h11.Response(status_code=200, headers=out_headers)),
            conn.send(h11.Data(data=OUT_BODY)),
            conn.send(h11.EndOfMessage()),
        ]
        conn.start_next_cycle()
        return out

    return cycle


def with_httptools() -> Callable[[], object]:
    import httptools

    from agent.serving import h1
    from agent.serving.http import Response

    resp = Response(200, OUT_HEADERS, OUT_BODY)

    class Sink:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.url = b""
            self.body = bytearray()
            self.done = False

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done = True

    sink = Sink()
    parser = httptools.HttpRequestParser(sink)

    def cycle() -> object:
        sink.headers = {}
        sink.body = bytearray()
        sink.done = False
        parser.feed_data(REQUEST)
        assert sink.done and len(sink.body) == len(BODY)
        parsed = httptools.parse_url(sink.url)
        keep = parser.should_keep_alive()
        assert parsed.path and keep
        return h1.render_response(resp, keep)

    return cycle


def median_us(fn: Callable[[], object], n: int = 10000, rounds: int = 5) -> float:
    for _ in range(2000):
        fn()
    per: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(per)


def main() -> None:
    contenders: dict[str, Callable[[], Callable[[], object]]] = {
        "edgeward h1 (parse every head)": ours,
        "edgeward h1 (head cache, as the worker)": ours_cached,
        "h11": with_h11,
        "httptools + edgeward render": with_httptools,
    }
    results: dict[str, list[float]] = {k: [] for k in contenders}
    fns = {k: make() for k, make in contenders.items()}
    for _ in range(3):  # interleaved: load swings hit every contender alike
        for k, fn in fns.items():
            results[k].append(median_us(fn))
    anchor = statistics.median(results["edgeward h1 (parse every head)"])
    for k, xs in results.items():
        m = statistics.median(xs)
        print(f"{k:42s} {m:7.2f} us per request cycle ({m / anchor:.2f}x)")


if __name__ == "__main__":
    main()
