"""Which model versions are served, and the hot swap between them.

Implements the ``ServedModel`` / ``Registry`` protocols of docs/INTERFACES.md over
``agent.serving.worker.ModelWorker`` processes. Routing is one dict entry per model name,
replaced in a single assignment on the event loop, so a request sees either the old or
the new version, never nothing.

Hot swap, zero failed requests: the new worker is started, warmed and self-tested
*before* it becomes visible; then routing switches; the old model is marked retired
(a request that looked it up just before the switch and only now calls ``infer`` is
forwarded to its successor) and stopped only once its in-flight count is zero or the
drain timeout passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import EdgewardError, ModelNotFoundError, ModelNotReadyError

if TYPE_CHECKING:
    from agent.serving.http import LentConnection

logger = logging.getLogger(__name__)

__all__ = [
    "LATENCY_BUCKETS",
    "LendingWorker",
    "ModelRegistry",
    "ModelStats",
    "WorkerLike",
    "WorkerModel",
]

# Worker states in which a model takes requests.
READY_STATES = frozenset({"ready", "serving", "running"})

# Seconds; tuned for sub-millisecond tiny models up to multi-second CNNs on slow boxes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class WorkerLike(Protocol):
    """What the registry needs of ``agent.serving.worker.ModelWorker``."""

    name: str
    version: str

    @property
    def state(self) -> str: ...
    @property
    def pid(self) -> int | None: ...

    def start(self, timeout: float = ...) -> None: ...
    async def apredict(self, inputs: Any, timeout: float | None = ...) -> Any: ...
    def metadata(self) -> dict[str, Any]: ...
    def self_test(self) -> None: ...
    def stop(self, drain_timeout: float = ...) -> None: ...
    def rss_bytes(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    @property
    def lending(self) -> LendingWorker | None: ...


class LendingWorker(Protocol):
    """The lending contract: the job of a worker that may serve inference connections
    itself (``agent.serving.lending.Lending``, a worker's ``lending``; None: every request
    is relayed). The daemon's HTTP server calls ``lend``/``recall`` (it is an
    ``agent.serving.http.Lender``); the registry reads the counts and routes the
    worker's own request counters into the model's statistics."""

    @property
    def lends(self) -> bool:
        """Connections may be handed over now (ready, not recalled)."""

    @property
    def lent(self) -> int:
        """Connections the worker holds now."""

    @property
    def lent_busy(self) -> int:
        """Requests in flight on lent connections."""

    def lend(self, fd: int, data: bytes, conn: LentConnection) -> bool: ...

    def recall(self) -> None: ...

    def set_stats_sink(self, sink: Callable[[dict[str, Any]], None]) -> None: ...


WorkerFactory = Callable[[str, str, Path], WorkerLike]


@dataclass
class ModelStats:
    """Request counters per model name (kept across versions, for /metrics)."""

    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    swaps: int = 0
    last_inference: float = 0.0  # wall-clock seconds of the last request counted

    def observe(self, seconds: float, ok: bool) -> None:
        self.last_inference = time.time()
        self.requests += 1
        if not ok:
            self.errors += 1
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                break


class WorkerModel:
    """One loaded model version served by one worker process (a ``ServedModel``)."""

    def __init__(
        self, worker: WorkerLike, model_dir: Path, stats: ModelStats, *, since: float | None = None
    ) -> None:
        self.name = worker.name
        self.version = worker.version
        self.worker = worker
        self.model_dir = model_dir
        self.stats = stats
        self.since = since if since is not None else time.time()
        self.inflight = 0
        self._retired = False
        self._successor: WorkerModel | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._metadata: dict[str, Any] | None = None
        self.start_phases: dict[str, float] = {}  # seconds per phase of the worker's start
        lw = worker.lending
        if lw is not None:  # requests the worker answers on lent connections
            lw.set_stats_sink(self._merge_stats)  # a new Lending after a restart keeps it

    @property
    def ready(self) -> bool:
        """True while the worker answers and this version is routed."""
        if self._retired:
            # a request that fetched this model just before a swap is forwarded
            return self._successor is not None and self._successor.ready
        return self.worker.state in READY_STATES

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            meta = dict(self.worker.metadata())
            meta.setdefault("name", self.name)
            meta["versions"] = [self.version]
            self._metadata = meta
        return self._metadata

    async def infer(self, inputs: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        """Run one request on the worker; a retired model forwards to its successor."""
        if self._retired:
            if self._successor is not None:
                return await self._successor.infer(inputs, parameters)
            raise ModelNotReadyError(f"model {self.name} version {self.version} is unloading")
        self.inflight += 1
        self._idle.clear()
        t0 = time.perf_counter()
        ok = False
        try:
            out: dict[str, Any] = await self.worker.apredict(inputs)
            ok = True
            return out
        finally:
            self.stats.observe(time.perf_counter() - t0, ok)
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    def lender(self) -> LendingWorker | None:
        """The worker, if it may serve inference connections itself now (see
        agent/serving/direct.py); None: requests are relayed to it."""
        lw = self.worker.lending
        if self._retired or lw is None or not lw.lends:
            return None
        return lw

    def statistics(self) -> dict[str, Any]:
        """Request counters in Triton's statistics-extension shape (per model name,
        across versions; requests answered on lent connections arrive batched every
        0.2 s). Times are whole requests: no queue or compute split is measured."""
        st = self.stats
        ok = st.requests - st.errors
        ns = round(st.latency_sum * 1e9)
        zero = {"count": 0, "ns": 0}
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": round(st.last_inference * 1000),
            "inference_count": ok,
            "execution_count": ok,
            "inference_stats": {
                "success": {"count": ok, "ns": ns},
                "fail": {"count": st.errors, "ns": 0},
                "queue": dict(zero),
                "compute_input": dict(zero),
                "compute_infer": {"count": ok, "ns": ns},
                "compute_output": dict(zero),
                "cache_hit": dict(zero),
                "cache_miss": dict(zero),
            },
            "batch_stats": [],
        }

    def _merge_stats(self, d: dict[str, Any]) -> None:
        st = self.stats
        if d.get("n"):
            st.last_inference = time.time()
        st.requests += int(d.get("n", 0))
        st.errors += int(d.get("e", 0))
        st.latency_sum += float(d.get("s", 0.0))
        for i, k in enumerate(d.get("b", [])[: len(st.buckets)]):
            st.buckets[i] += int(k)

    def retire(self, successor: WorkerModel | None) -> None:
        """Stop taking new requests; later callers go to ``successor``; lent connections
        come back after their request in flight (and go to the successor's worker)."""
        self._retired = True
        self._successor = successor
        lw = self.worker.lending
        if lw is not None:
            lw.recall()

    async def drained(self, timeout: float) -> bool:
        """Wait until no request is in flight (relayed, or on a lent connection); False if
        ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        while (lw := self.worker.lending) is not None and lw.lent:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def describe(self) -> dict[str, Any]:
        """Status for the control socket (GET /models)."""
        try:
            rss = self.worker.rss_bytes()
        except Exception:  # a dead worker has no RSS; status must still answer
            rss = 0
        try:
            stats = self.worker.stats()
        except Exception:
            stats = {}
        lw = self.worker.lending
        return {
            "name": self.name,
            "version": self.version,
            "state": self.worker.state,
            "since": self.since,
            "pid": self.worker.pid,
            "rss_bytes": rss,
            "inflight": self.inflight + (lw.lent_busy if lw is not None else 0),
            "restarts": int(stats.get("restarts", 0)),
            "lent_connections": lw.lent if lw is not None else 0,
            "path": str(self.model_dir),
        }


class ModelRegistry:
    """The routing table: model name → the ``WorkerModel`` that serves it."""

    def __init__(self, factory: WorkerFactory, *, start_timeout: float = 120.0) -> None:
        self._factory = factory
        self._start_timeout = start_timeout
        self._routes: dict[str, WorkerModel] = {}
        self._stats: dict[str, ModelStats] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[WorkerModel] = set()

    # --- Registry protocol ---------------------------------------------------------

    def models(self) -> list[WorkerModel]:
        return [self._routes[k] for k in sorted(self._routes)]

    def get(self, name: str, version: str | None = None) -> WorkerModel:
        model = self._routes.get(name)
        if model is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        if version is not None and version != model.version:
            raise ModelNotFoundError(
                f"model {name!r} version {version!r} is not served (serving {model.version})"
            )
        return model

    # --- lifecycle -----------------------------------------------------------------

    def stats(self) -> dict[str, ModelStats]:
        return self._stats

    def lock(self, name: str) -> asyncio.Lock:
        """Serialises loads and swaps of one model name."""
        return self._locks.setdefault(name, asyncio.Lock())

    def launch(self, name: str, version: str, model_dir: Path) -> WorkerLike:
        """A worker for a version still being downloaded or unpacked, its process started
        now (``launch()``, when the worker has it) so that the interpreter and imports
        overlap that work; :meth:`prepare` takes it. Stop it if it is not used."""
        worker = self._factory(name, version, model_dir)
        early = getattr(worker, "launch", None)
        if callable(early):
            try:
                early()
            except Exception as exc:  # prepare() spawns it then, and reports a failure
                logger.debug("early launch of %s %s: %s", name, version, exc)
        return worker

    async def prepare(
        self, name: str, version: str, model_dir: Path, *, worker: WorkerLike | None = None
    ) -> WorkerModel:
        """Start, warm up and self-test a worker without routing to it yet (``worker``:
        one from :meth:`launch`).

        On failure the worker is stopped and the error re-raised; nothing changes.
        """
        if worker is None:
            worker = self._factory(name, version, model_dir)
        loop = asyncio.get_running_loop()
        stats = self._stats.setdefault(name, ModelStats())
        try:
            await loop.run_in_executor(None, worker.start, self._start_timeout)
            t0 = time.monotonic()
            await loop.run_in_executor(None, worker.self_test)
            tested = time.monotonic() - t0
        except BaseException:
            await loop.run_in_executor(None, _stop_quietly, worker, 0.0)
            raise
        model = WorkerModel(worker, model_dir, stats)
        # the start's phases (worker.start_phases: interpreter, open, warm-up) + self-test
        phases = getattr(worker, "start_phases", None)
        model.start_phases = {**(phases if isinstance(phases, dict) else {}), "self-test": tested}
        model.metadata()  # cache now: metadata must not block the event loop later
        return model

    async def activate(self, model: WorkerModel, drain_timeout: float) -> WorkerModel | None:
        """Route ``model.name`` to ``model``; drain and stop the old one. Returns the old."""
        old = self._routes.get(model.name)
        self._routes[model.name] = model  # the atomic switch
        if old is None:
            logger.info(
                "serving %s version %s (pid %s)", model.name, model.version, model.worker.pid
            )
            return None
        self._stats[model.name].swaps += 1
        logger.info(
            "switched %s from version %s to %s (pid %s)",
            model.name,
            old.version,
            model.version,
            model.worker.pid,
        )
        await self._retire(old, model, drain_timeout)
        return old

    async def load(self, name: str, version: str, model_dir: Path, drain_timeout: float) -> None:
        """prepare + activate under the model's lock."""
        async with self.lock(name):
            model = await self.prepare(name, version, model_dir)
            await self.activate(model, drain_timeout)

    async def unload(self, name: str, drain_timeout: float) -> None:
        """Stop serving ``name`` (drained)."""
        old = self._routes.pop(name, None)
        if old is not None:
            await self._retire(old, None, drain_timeout)

    async def _retire(
        self, old: WorkerModel, successor: WorkerModel | None, timeout: float
    ) -> None:
        old.retire(successor)
        self._retiring.add(old)
        try:
            # One loop turn first: a handler that fetched ``old`` just before the switch
            # enters ``infer`` (and is counted or forwarded) before we look at the count.
            await asyncio.sleep(0)
            if not await old.drained(timeout):
                logger.warning(
                    "%s version %s: %d requests still running after %.1fs drain; stopping",
                    old.name,
                    old.version,
                    old.inflight,
                    timeout,
                )
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _stop_quietly, old.worker, timeout)
        finally:
            self._retiring.discard(old)

    async def close(self, drain_timeout: float) -> None:
        """Drain and stop every worker (daemon shutdown)."""
        names = list(self._routes)
        await asyncio.gather(*(self.unload(n, drain_timeout) for n in names))


def _stop_quietly(worker: WorkerLike, drain_timeout: float) -> None:
    try:
        worker.stop(drain_timeout)
    except EdgewardError as exc:
        logger.warning("stopping worker %s %s: %s", worker.name, worker.version, exc.message)
    except Exception:
        logger.exception("stopping worker %s %s failed", worker.name, worker.version)
