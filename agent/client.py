"""Python client for the inference socket: numpy in, numpy out, two lines.

    from agent.client import Client
    out = Client().infer("ppocr-det", {"image": img})   # dict[str, np.ndarray]

Speaks KServe v2 over HTTP/1.1 on the Unix socket with the binary tensor extension by
default (no JSON number formatting either way) and keeps one connection alive per
thread, so a ``Client`` may be shared between threads. Errors come back as the
``agent.errors`` classes the server raised (``ModelNotFoundError``,
``InvalidInputError``, ``OverloadedError`` with ``retry_after``, ...), chosen from the
error's ``code`` and HTTP status.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent import errors
from agent.serving.connection import IN_FLIGHT, StaleConnectionError, UnixHTTPConnection
from agent.serving.tensors import decode_response, encode_request

__all__ = ["DEFAULT_SOCKET", "Client", "UnixHTTPConnection"]

DEFAULT_SOCKET = "/run/edgeward/infer.sock"
DEFAULT_SPIN_US = 500  # see Client


def _error_class(code: str, status: int) -> type[errors.EdgewardError]:
    for cls in (
        errors.ModelNotFoundError,
        errors.ModelNotReadyError,
        errors.PayloadTooLargeError,
        errors.OverloadedError,
        errors.WorkerError,
        errors.InvalidInputError,
    ):
        if cls.code == code:
            return cls
    if code.startswith("worker-"):  # worker-crashed, worker-memory, worker-timeout, ...
        return errors.WorkerError
    if status == 404:
        return errors.ModelNotFoundError
    if status == 413:
        return errors.PayloadTooLargeError
    if status == 503:
        return errors.ModelNotReadyError
    if 400 <= status < 500:
        return errors.InvalidInputError
    return errors.InferenceError


def _raise_for(status: int, headers: Mapping[str, str], body: bytes | bytearray) -> None:
    try:
        doc = json.loads(body)
        message = str(doc.get("error", "")) or f"HTTP {status}"
        code = str(doc.get("code", "")) or None
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace") or f"HTTP {status}"
        code = None
    cls = _error_class(code or "", status)
    if cls is errors.OverloadedError:
        try:
            retry = float(headers.get("retry-after", "1"))
        except ValueError:
            retry = 1.0
        raise errors.OverloadedError(message, retry_after=retry, code=code)
    exc = cls(message, code=code, status=status)
    raise exc


class Client:
    """A client for one inference socket. Thread-safe: one connection per thread.

    Args:
        socket_path: the daemon's inference socket.
        timeout: seconds for connect and for each response (None = wait forever).
        binary: send inputs and ask for outputs with the binary tensor extension.
        spin_us: how long a request whose answers usually come back within that time
            polls for its answer instead of sleeping (agent/serving/connection.py,
            "Waiting for an answer"): ~45 us off a tiny model's round trip on a
            virtual machine, for at most that much CPU per request. 0 never polls.
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        timeout: float | None = 60.0,
        binary: bool = True,
        spin_us: int = DEFAULT_SPIN_US,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.binary = binary
        self.spin_us = spin_us
        self._in_flight = IN_FLIGHT  # one count per process (see InFlight)
        self._local = threading.local()

    # --- transport ------------------------------------------------------------------

    def _conn(self) -> UnixHTTPConnection:
        conn: UnixHTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = UnixHTTPConnection(
                self.socket_path, self.timeout, spin_us=self.spin_us, in_flight=self._in_flight
            )
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: Sequence[Any] | bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytearray]:
        """One request on this thread's kept-alive connection → (status, headers, body).

        Reconnects once when the server had closed an idle connection and not a byte
        of a response came back (the request was not processed).
        """
        for attempt in (0, 1):
            conn = self._conn()
            reused = conn.sock is not None and conn.reused
            try:
                return conn.request(method, path, body, headers)
            except StaleConnectionError:
                conn.close()
                # Retry only on a kept-alive socket the server had closed while idle: a
                # fresh connection closed without an answer may have run the request.
                if attempt or not reused:
                    raise ConnectionResetError(
                        "the server closed the connection without answering"
                    ) from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def _get_json(self, path: str, *, ok: tuple[int, ...] = (200,)) -> tuple[int, Any]:
        status, headers, body = self.request("GET", path)
        if status not in ok:
            _raise_for(status, headers, body)
        return status, json.loads(body) if body else {}

    # --- the v2 API -----------------------------------------------------------------

    @staticmethod
    def _model_path(model: str, version: str | None) -> str:
        path = f"/v2/models/{model}"
        if version is not None:
            path += f"/versions/{version}"
        return path

    def health(self) -> dict[str, bool]:
        """``{"live": bool, "ready": bool}`` of the server."""
        live, _ = self._get_json("/v2/health/live", ok=(200, 503))
        ready, _ = self._get_json("/v2/health/ready", ok=(200, 503))
        return {"live": live == 200, "ready": ready == 200}

    def server_metadata(self) -> dict[str, Any]:
        _, doc = self._get_json("/v2")
        return dict(doc)

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """The model's v2 metadata (name, versions, platform, inputs, outputs)."""
        _, doc = self._get_json(self._model_path(model, version))
        return dict(doc)

    def ready(self, model: str, version: str | None = None) -> bool:
        """True if the model answers requests; ModelNotFoundError if it is unknown."""
        status, _ = self._get_json(self._model_path(model, version) + "/ready", ok=(200, 503))
        return status == 200

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run the model; returns its outputs by name.

        Raises:
            ModelNotFoundError, InvalidInputError, ModelNotReadyError, OverloadedError,
            PayloadTooLargeError, WorkerError: as answered by the daemon.
        """
        return self.infer_full(
            model,
            inputs,
            version=version,
            outputs=outputs,
            parameters=parameters,
            request_id=request_id,
        )[1]

    def infer_full(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
        """Like ``infer`` but also returns the response document (id, model_version)."""
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        parts, hl = encode_request(
            arrays,
            binary=self.binary,
            binary_output=self.binary,
            outputs=outputs,
            request_id=request_id,
            parameters=parameters,
        )
        headers = {"Content-Type": "application/json"}
        if hl is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Inference-Header-Content-Length"] = str(hl)
        status, rh, body = self.request(
            "POST", self._model_path(model, version) + "/infer", parts, headers
        )
        if status != 200:
            _raise_for(status, rh, body)
        rhl = rh.get("inference-header-content-length")
        return decode_response(body, int(rhl) if rhl is not None else None)
