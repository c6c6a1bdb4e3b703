"""How long a worker thread polls for a lent connection's next request
(agent/serving/direct.py, "waiting for the next request"): it follows the connection's
own pace, with real sockets and a real request loop."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from agent.serving.direct import DirectServer, _Lent
from agent.serving.pace import CAP_S, PAD_S, SLACK


class _Echo:
    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"y": inputs["x"]}


@pytest.fixture
def lent() -> Any:
    a, b = socket.socketpair()
    srv = DirectServer(a, _Echo(), {"name": "m", "versions": ["1"], "inputs": [], "outputs": []})
    srv.spin_s = 0.001
    c, d = socket.socketpair()
    conn = _Lent(srv, 1, 0, d.detach(), b"")
    conn.client = c  # the client's end of the lent connection
    yield conn
    for s in (a, b, c, conn.sock):
        s.close()


def _answer_then_come_back(conn: Any, gap: float) -> None:
    conn.answered = time.perf_counter() - gap
    conn._came()


def test_the_poll_follows_the_connections_gap(lent: Any) -> None:
    lent.cost = 0.0001  # a short request: polling is worth it
    assert lent.pace.budget(lent.srv.spin_s) == 0.001  # no gap seen yet: the most allowed
    assert lent._spin_now()
    for _ in range(30):  # a binary client: back after ~40 us
        _answer_then_come_back(lent, 40e-6)
    assert lent.pace.avg == pytest.approx(40e-6, rel=0.5)
    assert lent.pace.budget(lent.srv.spin_s) == pytest.approx(SLACK * lent.pace.avg + PAD_S)
    assert lent.pace.budget(lent.srv.spin_s) < 0.0002
    for _ in range(30):  # a JSON client: ~220 us, still caught, never past the bound
        _answer_then_come_back(lent, 220e-6)
    assert 0.0003 < lent.pace.budget(lent.srv.spin_s) < 0.001
    assert lent._spin_now()


def test_a_connection_slower_than_the_bound_never_polls(lent: Any) -> None:
    lent.cost = 0.0001
    for _ in range(30):  # a camera at 30 fps
        _answer_then_come_back(lent, 0.033)
    assert lent.pace.avg == pytest.approx(CAP_S)
    assert not any(lent._spin_now() for _ in range(64))  # not even the 1-in-32 probe
    for _ in range(30):  # it speeds up again: polling resumes
        _answer_then_come_back(lent, 100e-6)
    assert lent._spin_now()


def test_no_poll_after_a_long_request_or_when_switched_off(lent: Any) -> None:
    lent.cost = 0.005  # a 5 ms model: a wake-up is noise
    assert not lent._spin_now()
    lent.cost = 0.0001
    lent.srv.spin_s = 0.0
    assert not lent._spin_now()


def test_a_poll_reads_a_request_that_comes_in_time(lent: Any) -> None:
    lent.cost = 0.0001
    lent.srv.spin_s = 2.0
    for _ in range(3):
        _answer_then_come_back(lent, 0.5)  # recorded as CAP_S: a poll of ~15 ms
    assert lent.pace.budget(lent.srv.spin_s) == pytest.approx(SLACK * CAP_S + PAD_S)
    lent.client.sendall(b"POST / HTTP/1.1\r\n")  # the client's next request, already here
    n = lent._spin()
    assert n == len(b"POST / HTTP/1.1\r\n")
    assert lent.spin_score > 0
    for _ in range(30):
        _answer_then_come_back(lent, 0.0005)  # now ~0.5 ms: a short poll, nothing comes
    assert lent._spin() == -1
    assert lent.spin_score < 0
