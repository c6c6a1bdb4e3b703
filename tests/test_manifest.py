"""The manifest parser: strict rules, canonical bytes, and arbitrary input."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import EdgewardError, LimitError, ManifestError, UnsupportedVersionError
from agent.manifest import canonical_json, check_path, parse_manifest
from agent.tario import parse_header

SHA = "ab" * 32
GOOD: dict[str, Any] = {
    "format": 1,
    "name": "det",
    "version": 3,
    "label": "3.0",
    "created": "2026-11-22T00:00:00Z",
    "signers": ["ed25519:0123456789abcdef"],
    "files": [
        {"path": "Meta-info/technicalinfo.json", "size": 10, "sha256": SHA},
        {"path": "Model/models.empc", "size": 100, "sha256": SHA},
    ],
    "models": [
        {
            "id": 0,
            "name": "det.onnx",
            "format": "onnx",
            "container": "Model/models.empc",
            "encoding": ["zstd", "aes-256-gcm"],
            "size": 50,
            "sha256": SHA,
        }
    ],
    "encryption": {"alg": "aes-256-gcm", "chunk_size": 1048576, "recipients": []},
}


def _edit(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
        del node[last if not last.isdigit() else int(last)]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


def test_good_manifest_round_trips() -> None:
    raw = canonical_json(GOOD)
    m = parse_manifest(raw)
    assert m.name == "det" and m.version == 3 and m.package_id == "det@3"
    assert m.to_bytes() == raw
    assert m.models[0].encoding == ("zstd", "aes-256-gcm")
    assert b" " not in raw and raw.index(b'"created"') < raw.index(b'"encryption"')


BAD = [
    ("name", "../x", "manifest-field"),
    ("version", -1, "manifest-field"),
    ("version", "3", "manifest-field"),
    ("version", True, "manifest-field"),
    ("files.0.path", "/etc/passwd", "manifest-path"),
    ("files.0.path", "Model/../../x", "manifest-path"),
    ("files.0.path", "Other/x", "manifest-path"),
    ("files.0.path", "Model/models.empc", "manifest-duplicate"),
    ("files.0.sha256", "XYZ", "manifest-field"),
    ("files.0.size", -5, "manifest-field"),
    ("files.0.extra", 1, "manifest-unknown-key"),
    ("models.0.format", "pytorch", "manifest-field"),
    ("models.0.container", "Model/other", "manifest-container"),
    ("models.0.encoding", ["aes-256-gcm", "zstd"], "manifest-field"),
    ("models.0.encoding", ["zstd"], "manifest-encoding"),
    ("models.0.encoding", ["residual", "zstd", "aes-256-gcm"], "manifest-missing-field"),
    ("models.0.name", "a/b", "manifest-field"),
    ("models", [], "manifest-missing-field"),
    ("encryption.alg", "rot13", "manifest-field"),
    ("encryption.chunk_size", 0, "manifest-field"),
    ("signers", "me", "manifest-field"),
    ("files", KeyError, "manifest-missing-field"),
    ("surprise", 1, "manifest-unknown-key"),
]


@pytest.mark.parametrize(("path", "value", "code"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_fields(path: str, value: Any, code: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(canonical_json(_edit(path, value)))
    assert info.value.code == code


def test_version_and_json_errors() -> None:
    with pytest.raises(UnsupportedVersionError) as info:
        parse_manifest(canonical_json(_edit("format", 2)))
    assert info.value.code == "manifest-version"
    for raw in (b"", b"[]", b"{", b"\xff\xfe", b'{"format": NaN}', b"1e999999"):
        with pytest.raises(ManifestError):
            parse_manifest(raw)
    with pytest.raises(ManifestError) as info:
        parse_manifest(b" " * 100, max_bytes=10)
    assert info.value.code == "manifest-too-large"
    with pytest.raises(LimitError):
        parse_manifest(canonical_json(GOOD), max_files=1)
    with pytest.raises(ManifestError):
        parse_manifest(b"[" * 100_000 + b"]" * 100_000)


def test_check_path() -> None:
    assert check_path("Program/Scripts/run.py") == "Program/Scripts/run.py"
    for bad in (
        "",
        "Model",
        "Model/",
        "Model//x",
        "./Model/x",
        "Model/x\n",
        "Model\\x",
        "Meta-info/" + "a" * 300,
    ):
        with pytest.raises(ManifestError):
            check_path(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_our_errors(data: bytes) -> None:
    with contextlib.suppress(EdgewardError):
        parse_manifest(data)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([p for p, _, _ in BAD] + ["models.0", "files.0", "encryption", "base"]), _json
)
def test_arbitrary_json_values_only_raise_our_errors(path: str, value: Any) -> None:
    try:
        doc = _edit(path, value)
    except (KeyError, IndexError, TypeError):
        return
    with contextlib.suppress(EdgewardError):
        parse_manifest(json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_tar_header_parser_only_raises_our_errors(block: bytes) -> None:
    with contextlib.suppress(EdgewardError):
        parse_header(block, 0)
