"""Shared fixtures. End-to-end tests are marked ``e2e``; under CI
(EDGEWARD_E2E_REQUIRED=1) a skipped e2e test is turned into a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.assets import asset

E2E_REQUIRED = os.environ.get("EDGEWARD_E2E_REQUIRED") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if E2E_REQUIRED and report.skipped and item.get_closest_marker("e2e") is not None:
        report.outcome = "failed"
        report.longrepr = f"end-to-end test skipped under CI: {report.longrepr}"


@pytest.fixture(scope="session")
def ppocr_det() -> Path:
    return asset("ppocr_det.onnx")


@pytest.fixture(scope="session")
def ppocr_cls() -> Path:
    return asset("ppocr_cls.onnx")


@pytest.fixture(scope="session")
def hand_tflite() -> Path:
    return asset("hand_landmark_lite.tflite")


@pytest.fixture(scope="session")
def face_tflite() -> Path:
    return asset("face_detection_short_range.tflite")
