"""Registry routing and hot swap, driven with an in-process worker stand-in.

The stand-in implements the worker contract (start/apredict/stop/state) with asyncio
sleeps, so interleavings around the routing switch are exercised deterministically;
the real-worker hot swap under load is in tests/test_load.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ModelNotFoundError, RuntimeBackendError
from agent.serving.registry import LATENCY_BUCKETS, ModelRegistry, WorkerLike


class StandInWorker:
    def __init__(self, name: str, version: str, model_dir: Path, *, fail: str = "") -> None:
        self.name, self.version, self.model_dir = name, version, model_dir
        self.state = "new"
        self.pid: int | None = None
        self.fail = fail
        self.served = 0
        self.lending = None  # every request is relayed (no LendingWorker)

    def start(self, timeout: float = 120.0) -> None:
        if self.fail == "start":
            raise RuntimeBackendError("cannot load", code="backend")
        self.state, self.pid = "ready", 1234

    async def apredict(self, inputs: Any, timeout: float | None = None) -> Any:
        if self.state != "ready":
            raise RuntimeBackendError(f"worker {self.version} is {self.state}", code="worker")
        await asyncio.sleep(0.002)
        if self.state != "ready":
            raise RuntimeBackendError("stopped mid-request", code="worker")
        self.served += 1
        return {"y": self.version}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "platform": "stand-in", "inputs": [], "outputs": []}

    def self_test(self) -> None:
        if self.fail == "self_test":
            raise RuntimeBackendError("sample mismatch", code="self-test")

    def stop(self, drain_timeout: float = 10.0) -> None:
        self.state = "stopped"

    def rss_bytes(self) -> int:
        return 1000

    def stats(self) -> dict[str, Any]:
        return {"restarts": 0}


def _registry(fail: dict[str, str] | None = None) -> tuple[ModelRegistry, list[StandInWorker]]:
    made: list[StandInWorker] = []

    def factory(name: str, version: str, model_dir: Path) -> WorkerLike:
        w = StandInWorker(name, version, model_dir, fail=(fail or {}).get(version, ""))
        made.append(w)
        return w

    return ModelRegistry(factory), made


def test_get_and_models(tmp_path: Path) -> None:
    async def go() -> None:
        reg, _ = _registry()
        await reg.load("m", "1", tmp_path, 1.0)
        assert [m.name for m in reg.models()] == ["m"]
        assert reg.get("m").version == "1"
        assert reg.get("m", "1").ready
        with pytest.raises(ModelNotFoundError):
            reg.get("m", "2")
        with pytest.raises(ModelNotFoundError):
            reg.get("other")
        meta = reg.get("m").metadata()
        assert meta["versions"] == ["1"]
        out = await reg.get("m").infer({}, {})
        assert out == {"y": "1"}
        s = reg.stats()["m"]
        assert s.requests == 1 and s.errors == 0 and sum(s.buckets) == 1
        assert len(s.buckets) == len(LATENCY_BUCKETS)
        d = reg.get("m").describe()
        assert d["pid"] == 1234 and d["rss_bytes"] == 1000 and d["version"] == "1"
        await reg.close(1.0)
        assert reg.models() == []

    asyncio.run(go())


def test_hot_swap_under_load_no_failures(tmp_path: Path) -> None:
    async def go() -> None:
        reg, made = _registry()
        await reg.load("m", "1", tmp_path, 1.0)
        results: list[str] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                model = reg.get("m")
                await asyncio.sleep(0)  # a lookup and the call are separate steps
                try:
                    out = await model.infer({}, {})
                    results.append(out["y"])
                except Exception as exc:
                    errors.append(exc)

        tasks = [asyncio.create_task(client()) for _ in range(16)]
        await asyncio.sleep(0.05)
        await reg.load("m", "2", tmp_path, 5.0)
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        assert errors == []
        assert "1" in results and results[-1] == "2"
        assert made[0].state == "stopped"  # old worker drained and stopped
        assert reg.get("m").version == "2"
        assert reg.stats()["m"].swaps == 1

    asyncio.run(go())


@pytest.mark.parametrize("stage", ["start", "self_test"])
def test_failed_new_version_keeps_old(tmp_path: Path, stage: str) -> None:
    async def go() -> None:
        reg, made = _registry({"2": stage})
        await reg.load("m", "1", tmp_path, 1.0)
        with pytest.raises(RuntimeBackendError):
            await reg.load("m", "2", tmp_path, 1.0)
        assert reg.get("m").version == "1"
        assert made[0].state == "ready"
        assert made[1].state in ("stopped", "new")

    asyncio.run(go())


def test_errors_counted(tmp_path: Path) -> None:
    async def go() -> None:
        reg, made = _registry()
        await reg.load("m", "1", tmp_path, 1.0)
        made[0].state = "crashed"
        with pytest.raises(RuntimeBackendError):
            await reg.get("m").infer({}, {})
        assert reg.stats()["m"].errors == 1
        assert not reg.get("m").ready

    asyncio.run(go())
