"""One child process per loaded model version (see docs/RUNTIME.md, "Worker processes").

The daemon never imports an inference engine: a :class:`ModelWorker` runs the model in a
child process and is what the registry holds (its ``WorkerLike``). It is the requests
face of three jobs, each in a module of its own:

- agent/serving/supervisor.py: the process — start, early launch, stop, restart with
  backoff, health (exit, memory cap, hung predictions), the sandbox it starts in;
- agent/serving/transport.py: the frame channel to the child — requests out, replies read
  by an event loop (the daemon's, or a private one) and settled;
- agent/serving/lending.py: lending a client's connection to the child (``lending``,
  the registry's ``LendingWorker``), when the daemon's loop is given.

The child's side of all three is agent/serving/worker_main.py (and agent/serving/direct.py
for lent connections); the frames both speak are agent/serving/ipc.py.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import ModelNotReadyError, WorkerError
from agent.serving.lending import Lending
from agent.serving.sandbox import Fence
from agent.serving.supervisor import Child, Supervisor
from agent.serving.transport import Busy, Counters, ReplyLoop
from runtime.config import RuntimeConfig

DEFAULT_LOADER = "runtime.loader:open_model"
DEFAULT_SELF_TEST = "runtime.loader:self_test"


class ModelWorker:
    """A model served by a child process; thread-safe and asyncio-safe.

    ``loop``: the daemon's event loop, which then reads the replies and settles lent
    connections (``lend``); without it the worker reads its replies on a private loop
    thread and lends nothing. ``request_timeout``: seconds one prediction may take; past
    it the child is killed and restarted."""

    def __init__(
        self,
        name: str,
        version: str,
        model_dir: Path,
        config: RuntimeConfig,
        *,
        cache_dir: Path,
        memory_limit_bytes: int | None = None,
        max_concurrency: int = 4,
        restart_backoff: tuple[float, float] = (0.5, 30.0),
        loader: str = DEFAULT_LOADER,
        self_test_fn: str = DEFAULT_SELF_TEST,
        shm_slot_bytes: int = 16 * 1024 * 1024,
        loop: asyncio.AbstractEventLoop | None = None,
        lend: dict[str, Any] | None = None,
        request_timeout: float | None = None,
        fence: Fence | None = None,
    ):
        self.name = name
        self.version = version
        self.request_timeout = request_timeout
        self._counters = Counters()
        self._replies = ReplyLoop(name, loop)
        self._sup = Supervisor(
            name,
            version,
            Path(model_dir),
            config,
            cache_dir=Path(cache_dir),
            loader=loader,
            self_test_fn=self_test_fn,
            max_concurrency=max(1, max_concurrency),
            shm_slot_bytes=shm_slot_bytes,
            memory_limit_bytes=memory_limit_bytes,
            restart_backoff=restart_backoff,
            fence=fence,
            replies=self._replies,
            counters=self._counters,
            lend=lend,
        )

    # --- lifecycle (agent/serving/supervisor.py) ---------------------------------------

    @property
    def state(self) -> str:
        """stopped, starting, ready, restarting or failed."""
        return self._sup.state

    @property
    def pid(self) -> int | None:
        return self._sup.pid

    @property
    def model_dir(self) -> Path:
        return self._sup.model_dir

    @property
    def cache_dir(self) -> Path:
        return self._sup.cache_dir

    @property
    def config(self) -> RuntimeConfig:
        return self._sup.config

    @property
    def start_phases(self) -> dict[str, float]:
        """The last start: seconds per phase (interpreter, imports, open, warm-up)."""
        return self._sup.start_phases

    def start(self, timeout: float = 120.0) -> None:
        """Spawn the child, load and warm up the model; WorkerError carries its failure."""
        self._sup.start(timeout)

    def launch(self) -> None:
        """Start the child now, before its model is installed (see Supervisor.launch)."""
        self._sup.launch()

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new requests, let in-flight ones finish (bounded), then end the child."""
        self._sup.stop(drain_timeout)

    @property
    def lending(self) -> Lending | None:
        """The lending job (agent/serving/lending.py, the registry's ``LendingWorker``),
        or None: every request is relayed. A new one after ``stop()`` and ``start()``."""
        return self._sup.lending

    # --- requests (agent/serving/transport.py) ----------------------------------------

    def metadata(self) -> dict[str, Any]:
        """KServe v2 metadata the child reported when it became ready."""
        return dict(self._sup.meta)

    def self_test(self) -> None:
        """Run Meta-info/samples in the child; raises the child's error on mismatch."""
        self._call({"op": "self_test"}, None, None)

    def predict(
        self, inputs: dict[str, np.ndarray], timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request in the child; errors come back as the child's agent.errors class."""
        try:
            out: dict[str, np.ndarray] = self._call({"op": "predict"}, inputs, timeout)
        except FutureTimeout:
            self._counters.error("timeout")
            raise WorkerError(
                f"{self.name}: no answer in {timeout} s", code="worker-timeout"
            ) from None
        except BaseException as exc:
            self._counters.error(exc)
            raise
        return out

    def _call(
        self, header: dict[str, Any], inputs: dict[str, np.ndarray] | None, timeout: float | None
    ) -> Any:
        """A synchronous request from a thread other than the loop's: the loop settles
        the future this waits on (FutureTimeout past ``timeout``)."""
        if self._replies.on_loop():
            # The loop reads the replies: blocking it on one would wait forever.
            raise RuntimeError("on the worker's event loop use apredict, not predict")
        c = self._sup.ready_child(timeout)
        return c.transport.submit(header, inputs, timeout).result(timeout)

    async def apredict(
        self, inputs: dict[str, np.ndarray], timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Asyncio form of :meth:`predict` (no thread per request once the worker is ready).

        Without ``timeout`` the worker's ``request_timeout`` applies, and a prediction
        that outlives it kills and restarts the child (504 ``worker-timeout``)."""
        loop = asyncio.get_running_loop()
        waiter: Any
        enforce = timeout is None and self.request_timeout is not None
        if enforce:
            timeout = self.request_timeout
        c: Child | None = None
        slot_wait = False
        try:
            c = self._sup.ready_child(0.0)
            if loop is self._replies.given:  # the loop itself settles this future
                try:
                    waiter = await self._submit_on_loop(loop, c.transport, inputs, timeout, None)
                except Busy:  # every slot taken: wait for one on the loop, below
                    slot_wait = True
            else:
                waiter = asyncio.wrap_future(
                    c.transport.submit({"op": "predict"}, inputs, timeout, nowait=True)
                )
        except (Busy, ModelNotReadyError):  # restarting: wait off-loop
            c, cf = await loop.run_in_executor(None, self._submit_waiting, inputs, timeout)
            waiter = asyncio.wrap_future(cf)
        if slot_wait:  # no thread waits: a freed slot is handed to this coroutine
            assert c is not None
            arena = c.transport.arena  # the worker's, kept across restarts of its child
            try:
                slot = await arena.acquire_async(timeout)
            except TimeoutError:
                self._counters.error("timeout")
                raise ModelNotReadyError(
                    f"model {self.name}: no free transfer slot in {timeout:g} s"
                ) from None
            try:
                c = self._sup.ready_child(0.0)  # the child may have died meanwhile
            except ModelNotReadyError:  # restarting: wait for the new child off-loop
                arena.release(slot)
                c, cf = await loop.run_in_executor(None, self._submit_waiting, inputs, timeout)
                waiter = asyncio.wrap_future(cf)
            else:
                waiter = await self._submit_on_loop(loop, c.transport, inputs, timeout, slot)
        try:
            out: dict[str, np.ndarray] = await (
                waiter if timeout is None else asyncio.wait_for(waiter, timeout)
            )
        except TimeoutError:
            self._counters.error("timeout")
            if enforce:
                assert c is not None
                self._sup.kill_hung(
                    c, f"a request ran longer than the {timeout:g} s request timeout"
                )
            raise WorkerError(
                f"{self.name}: no answer in {timeout:g} s",
                code="worker-timeout",
                status=504 if enforce else None,
            ) from None
        except BaseException as exc:
            self._counters.error(exc)
            raise
        return out

    async def _submit_on_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        t: Any,
        inputs: dict[str, np.ndarray],
        timeout: float | None,
        slot: int | None,
    ) -> Any:
        """Send a request from the loop that reads its reply; the future it settles.
        Busy when no slot is free (and ``slot`` is None)."""
        waiter, header, parts = t.submit(
            {"op": "predict"},
            inputs,
            timeout,
            nowait=True,
            fut=loop.create_future(),
            defer_send=True,
            slot=slot,
        )
        await t.send_from_loop(loop, header, parts)  # a frame fits its lane's empty socket
        return waiter

    def _submit_waiting(
        self, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> tuple[Child, Any]:
        """On a thread: wait for the child (restarting) and a free slot, then send."""
        c = self._sup.ready_child(timeout)
        return c, c.transport.submit({"op": "predict"}, inputs, timeout)

    # --- observation ------------------------------------------------------------------

    def rss_bytes(self) -> int:
        import psutil

        pid = self.pid
        if pid is None:
            return 0
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0

    def stats(self) -> dict[str, Any]:
        c = self._sup.child
        in_flight = c.transport.in_flight if c is not None else 0
        return {
            **self._counters.snapshot(),
            "rss": self.rss_bytes(),
            "in_flight": in_flight,
            "state": self.state,
        }


if TYPE_CHECKING:  # mypy holds the worker's jobs to the contracts the registry relies on
    from agent.serving.registry import LendingWorker, WorkerLike

    _worker_contract: type[WorkerLike] = ModelWorker
    _lending_contract: type[LendingWorker] = Lending
