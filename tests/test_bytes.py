"""BYTES (text) tensors end to end: a string model installed without samples, served by
a real daemon, in JSON and binary form, lent and relayed; run scripts that return text
or garbage; the worker boundary carries BYTES without pickle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from agent.client import Client, UnixHTTPConnection
from agent.errors import InvalidInputError, InvalidOutputError
from agent.serving import ipc
from agent.serving.tensors import decode_request, encode_request, encode_tensor
from runtime.backend import TensorSpec, check_output
from runtime.converter import random_inputs
from tests.daemon_util import DaemonProc, start_daemon
from tests.text_models import OBJECT_SCRIPT, TEXTS, string_model_dir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=[True, False], ids=["lent", "relayed"])
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProc]:
    root = tmp_path_factory.mktemp("bytes")
    text = string_model_dir(root / "src", "text", "1")
    scripted = string_model_dir(root / "src", "scripted", "1", script=OBJECT_SCRIPT)
    tfl = string_model_dir(root / "src", "tftext", "1", kind="tflite")
    d = start_daemon(root / "w", [text, scripted, tfl], lend=request.param)
    yield d
    d.stop()


def _post_json(d: DaemonProc, model: str, doc: dict[str, Any]) -> tuple[int, Any]:
    with UnixHTTPConnection(str(d.infer_sock)) as conn:
        status, _h, body = conn.request(
            "POST",
            f"/v2/models/{model}/infer",
            json.dumps(doc).encode(),
            {"content-type": "application/json"},
        )
        return status, json.loads(body)


# ONNX Runtime (``Identity``) and LiteRT (``RESHAPE`` on a TFLite string tensor).
MODELS = ["text", "tftext"]


@pytest.mark.parametrize("model", MODELS)
def test_string_model_installs_without_samples_and_reports_bytes(
    daemon: DaemonProc, model: str
) -> None:
    meta = Client(str(daemon.infer_sock)).metadata(model)
    assert meta["inputs"] == [{"name": "s", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0]["datatype"] == "BYTES"


@pytest.mark.parametrize("model", MODELS)
def test_json_form_round_trips_text(daemon: DaemonProc, model: str) -> None:
    doc = {"inputs": [{"name": "s", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    status, body = _post_json(daemon, model, doc)
    assert status == 200, body
    assert body["outputs"] == [
        {"name": "y", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}
    ]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("binary", [True, False])
def test_python_client_gets_utf8_bytes(daemon: DaemonProc, binary: bool, model: str) -> None:
    arr = np.array([t.encode() for t in TEXTS], dtype=object)
    out = Client(str(daemon.infer_sock), binary=binary).infer(model, {"s": arr})
    assert out["y"].tolist() == [t.encode() for t in TEXTS]


def test_litert_carries_any_bytes(daemon: DaemonProc) -> None:
    """TFLite strings are bytes, not text: non-UTF-8 and trailing NULs pass unchanged
    in binary form (ONNX Runtime refuses non-UTF-8, below)."""
    raw = [b"\xff\xfe", b"tail\x00\x00", b"\x00", b""]
    arr = np.array(raw, dtype=object)
    out = Client(str(daemon.infer_sock), binary=True).infer("tftext", {"s": arr})
    assert out["y"].tolist() == raw


def test_non_utf8_bytes_are_refused_by_onnxruntime_with_400(daemon: DaemonProc) -> None:
    arr = np.array([b"ok", b"\xff\xfe"], dtype=object)
    with pytest.raises(InvalidInputError) as ei:
        Client(str(daemon.infer_sock)).infer("text", {"s": arr})
    assert ei.value.code == "not-utf8"
    # the model keeps serving
    out = Client(str(daemon.infer_sock)).infer("text", {"s": np.array([b"x"], dtype=object)})
    assert out["y"].tolist() == [b"x"]


def test_run_script_text_outputs_become_bytes(daemon: DaemonProc) -> None:
    c = Client(str(daemon.infer_sock))
    out = c.infer("scripted", {"s": np.array([b"str"], dtype=object)})
    assert out["y"].tolist() == b"plain str" or out["y"].reshape(-1).tolist() == [b"plain str"]
    out = c.infer("scripted", {"s": np.array([b"list"], dtype=object)})
    assert out["y"].tolist() == [b"one", "twö".encode(), b""]
    status, body = _post_json(
        daemon,
        "scripted",
        {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["list"]}]},
    )
    assert status == 200 and body["outputs"][0]["data"] == ["one", "twö", ""]


def test_run_script_returning_an_object_is_invalid_output(daemon: DaemonProc) -> None:
    status, body = _post_json(
        daemon,
        "scripted",
        {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["object"]}]},
    )
    assert status == 500
    assert body["code"] == "invalid-output"
    assert "object at 0x" not in body["error"]


# --- units: the codec and the worker boundary ---------------------------------------------


def test_json_output_of_non_utf8_bytes_is_refused() -> None:
    arr = np.array([b"\xff"], dtype=object)
    with pytest.raises(InvalidInputError) as ei:
        encode_tensor("y", arr, binary=False)
    assert ei.value.code == "not-utf8"
    _obj, raw = encode_tensor("y", arr, binary=True)
    assert bytes(raw) == b"\x01\x00\x00\x00\xff"


def test_arbitrary_objects_are_not_bytes() -> None:
    arr = np.array([object()], dtype=object)
    with pytest.raises(InvalidOutputError):
        encode_tensor("y", arr, binary=True)
    with pytest.raises(InvalidOutputError):
        check_output("y", arr, "test")
    with pytest.raises(InvalidOutputError):
        ipc.encode({"y": arr}, None, None)


def test_binary_request_carries_nul_and_empty_and_non_utf8() -> None:
    items = [b"", b"a\x00b", "héllo".encode(), b"\xff"]
    parts, hl = encode_request({"s": np.array(items, dtype=object)}, binary=True)
    req = decode_request(b"".join(bytes(p) for p in parts), hl)
    assert req.inputs["s"].tolist() == items


def test_lone_surrogate_in_json_is_400() -> None:
    body = b'{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","data":["\\ud800"]}]}'
    with pytest.raises(InvalidInputError):
        decode_request(body)


def test_worker_boundary_carries_bytes_without_pickle() -> None:
    arrays = {
        "o": np.array([b"", b"a\x00b", b"\xff"], dtype=object).reshape(3, 1),
        "u": np.array(["héllo", "x"]),
        "f": np.arange(3, dtype=np.float32),
    }
    descs, parts, _ = ipc.encode(arrays, None, None)
    assert {d["e"] for d in descs} == {"bytes", "raw"}
    payload = bytearray(b"".join(bytes(p) for p in parts))
    assert b"pickle" not in payload and b"\x80\x05" not in payload[:2]
    out = ipc.decode(json.loads(json.dumps(descs)), payload, None, copy=True)
    assert out["o"].shape == (3, 1) and out["o"].reshape(-1).tolist() == [b"", b"a\x00b", b"\xff"]
    assert out["u"].tolist() == ["héllo".encode(), b"x"]
    assert out["f"].tolist() == [0.0, 1.0, 2.0]
    # a frame whose BYTES lengths run past the data is refused, not trusted
    bad = [dict(descs[0], l=descs[0]["l"] + 4)]
    with pytest.raises(InvalidInputError):
        ipc.decode(bad, payload, None, copy=True)


def test_validation_inputs_for_string_tensors() -> None:
    got = random_inputs([TensorSpec("s", np.dtype(object), (-1,))], batch=3)
    assert got["s"].shape == (3,) and all(isinstance(v, str) for v in got["s"])
