"""One child process per loaded model version (see docs/RUNTIME.md, "Worker processes").

The daemon never imports an inference engine: :class:`ModelWorker` spawns
``python -m agent.serving.worker_main`` (a fresh interpreter, no fork of the threaded
daemon), talks to it over a Unix socketpair with small framed messages and moves
tensors of 64 KiB or more through a pre-allocated memfd arena (:mod:`agent.serving.ipc`).

Crash isolation: when the child dies (kill -9, segfault, OOM, memory cap) every request
in flight fails with ``WorkerError(code="worker-crashed", status 503)`` and the worker
restarts with exponential backoff (``restart_backoff`` = (first, cap) seconds); state goes
``restarting`` then ``ready``. A request arriving while the worker restarts waits for it
(bounded by its timeout, or 30 s) and then fails with ``ModelNotReadyError``.

Memory: a parent-side psutil watchdog kills and restarts a child whose RSS exceeds
``memory_limit_bytes`` (RLIMIT_AS is unusable with ORT arenas); the requests in flight
fail with ``WorkerError(code="worker-memory")``.

Supervision: each child is the leader of its own session and process group
(``start_new_session``), so whatever a run script forks or spawns is killed with it
(``killpg``) on stop, on restart and when the child dies. A monitor thread waits for the
child process itself (``waitpid``), so a death is noticed even when a forked grandchild
still holds the child's sockets open. A prediction that outlives ``request_timeout``
seconds (relayed, or on a lent connection: see agent/serving/direct.py) kills the child: its
request gets 504 ``worker-timeout``, the state is ``restarting`` at once (readiness
says so) and the child restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import ModelNotReadyError, WorkerError
from agent.serving import direct, ipc
from agent.serving.direct import Lending
from agent.serving.sandbox import Fence, worker_env, worker_identity
from runtime.config import RuntimeConfig

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

DEFAULT_LOADER = "runtime.loader:open_model"
DEFAULT_SELF_TEST = "runtime.loader:self_test"
RESTART_WAIT = 30.0
WATCH_INTERVAL = 0.25


class _Busy(Exception):
    """No free transfer slot right now (``apredict`` then waits on a thread)."""


class _Follower:
    """A synchronous caller waiting for its reply (thread mode).

    Lighter than a Future plus an Event (both Python-level Conditions): the outcome sits
    in plain attributes, set under the child's ``role_cv``, and each wake-up (reply
    settled, or promoted to reader) is a token in a C ``SimpleQueue``, so none is lost
    and a stale one only costs the waiter one more look at its state.
    """

    __slots__ = ("abandoned", "child", "done", "exc", "q", "result", "rid")

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.done = False
        self.result: Any = None
        self.exc: BaseException | None = None
        self.abandoned = False  # timed out: the async reader reads the late reply
        self.rid = 0
        self.child: _Child | None = None


@dataclass
class _Launched:
    """A child started by :meth:`ModelWorker.launch` that has not had its model yet."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    lanes: list[ipc.Lane]
    lane_fds: list[list[int]]
    lend_pair: tuple[socket.socket, socket.socket] | None
    regions: list[tuple[int, int, int]]
    spawned: float
    fence: Fence

    def discard(self) -> None:
        """Never used: end the child (it exits at EOF on its socket anyway)."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        _killpg(self.proc.pid)
        self.sock.close()
        for lane in self.lanes:
            lane.close()
        if self.lend_pair is not None:
            self.lend_pair[0].close()


class _Child:
    """One incarnation: process, channel, reader state and its pending requests."""

    def __init__(self, proc: subprocess.Popen[bytes], chan: ipc.Channel, lanes: list[ipc.Lane]):
        self.proc = proc
        self.chan = chan
        self.lanes = lanes  # thread mode: one socket per shm slot for sync predicts
        self.pending: dict[int, tuple[Any, int | None]] = {}  # (future or _Follower, slot)
        self.lock = threading.Lock()
        self.dead = False
        self.gone = False  # its death has been handled (_gone runs once per child)
        self.kill_reason: tuple[str, str] | None = None
        # Event-loop reader state (loop mode): the frame being read.
        self.attached = False
        self.rbuf = bytearray(ipc.HEAD.size)
        self.rgot = 0
        self.hlen = -1  # header length of the frame being read; -1 = reading its prefix
        # Thread mode (leader/follower): whoever waits reads. ``leader`` = someone holds
        # the reader role; ``followers`` = sync callers waiting; ``n_async`` = pending
        # requests nobody waits on synchronously (apredict), read by the async reader.
        self.role_cv = threading.Condition()
        self.leader = False
        self.eof = False
        self.followers: dict[int, _Follower] = {}
        self.n_async = 0


class ModelWorker:
    """A model served by a child process; thread-safe and asyncio-safe."""

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
        self.model_dir = Path(model_dir)
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.memory_limit_bytes = memory_limit_bytes
        self.max_concurrency = max(1, max_concurrency)
        self.restart_backoff = restart_backoff
        self.loader = loader
        self.self_test_fn = self_test_fn
        self.state = "stopped"
        # Seconds one prediction may take; past it the child is killed and restarted.
        self.request_timeout = request_timeout
        # What the child may reach (agent/serving/sandbox.py): its user, its environment, the
        # paths Landlock closes to it. None: the minimal environment only.
        self.fence = fence
        self.shm_slot_bytes = shm_slot_bytes
        self._arena = ipc.ShmArena(self.max_concurrency, shm_slot_bytes)
        self._region_ids = itertools.count(1)
        self._regions_lock = threading.Lock()  # registering vs spawning a child
        self._child: _Child | None = None
        self._meta: dict[str, Any] = {}
        self.start_phases: dict[str, float] = {}  # the last start: seconds per phase
        self._launched: _Launched | None = None  # launch(): a child waiting for its model
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._stopping = False
        self._failures = 0
        self._stats: dict[str, Any] = {
            "requests": 0,
            "errors": 0,
            "restarts": 0,
            "shm_tensors_in": 0,
            "shm_tensors_out": 0,
            "region_tensors_in": 0,  # inputs read in place from a shared region
            "child_busy_us": 0,  # time the child spent decoding, predicting, encoding
            "last_error": None,
        }
        self._stats_lock = threading.Lock()  # the per-request counters
        self._watchdog: threading.Thread | None = None
        # Loop mode: replies are read by this event loop (add_reader) instead of a reader
        # thread, so an apredict reply wakes the loop directly, not a thread that then
        # wakes the loop. Synchronous callers still work from any other thread.
        self._loop = loop
        # Lent connections (agent/serving/direct.py): the child answers inference connections
        # the daemon hands it; only with an event loop (the daemon's), which settles them.
        self._lending: Lending | None = None
        if lend is not None and loop is not None:
            self._lending = Lending(name, version, lend)
            self._lending.hung = self._lent_hung
            self._lending.serving = self._serving

    # --- lifecycle -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        c = self._child
        return c.proc.pid if c is not None and not c.dead else None

    def start(self, timeout: float = 120.0) -> None:
        """Spawn the child, load and warm up the model; WorkerError carries its failure."""
        with self._cv:
            self._stopping = False
            lg = self._lending
            if lg is not None and lg.closed:  # started again after stop()
                self._lending = Lending(self.name, self.version, lg.settings)
                self._lending.stats_sink = lg.stats_sink
                self._lending.hung = self._lent_hung
                self._lending.serving = self._serving
            self.state = "starting"
            if self._arena.closed:  # started again after stop()
                regions = self._arena.regions
                self._arena = ipc.ShmArena(self.max_concurrency, self.shm_slot_bytes)
                self._arena.regions = regions
        try:
            self._spawn(timeout)
        except BaseException:
            with self._cv:
                self.state = "failed"
                self._cv.notify_all()
            raise
        with self._cv:
            self.state = "ready"
            self._cv.notify_all()
        if self._watchdog is None and self.memory_limit_bytes is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"watch-{self.name}", daemon=True
            )
            self._watchdog.start()

    def launch(self) -> None:
        """Start the child process now, without a model: its interpreter starts and
        imports the loader while the caller still downloads and unpacks; :meth:`start`
        then hands it the model. Idempotent; :meth:`stop` ends a launched child."""
        with self._cv:
            if self._launched is not None or self._child is not None:
                return
            if self._arena.closed:
                return  # stopped: start() makes a new arena and spawns then
            self._launched = self._launch(early=True)

    def _spawn(self, timeout: float) -> None:
        with self._cv:
            early, self._launched = self._launched, None
        launched = early if early is not None else self._launch()
        assert launched is not None
        self._handshake(launched, timeout)

    def _launch(self, *, early: bool = False) -> _Launched | None:
        """Start the child. ``early`` (the model is not installed yet): None when the
        worker user's access to the model must be checked first (spawned at start)."""
        root = str(Path(__file__).resolve().parents[2])
        fence = self.fence if self.fence is not None else Fence()
        env = worker_env(
            os.environ,
            home=str(self.model_dir),
            pythonpath=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
            extra=fence.env,
        )
        env["EDGEWARD_WORKER_LOADER"] = self.loader  # imported before the init frame
        try:
            ident = worker_identity(fence.user)
        except LookupError as exc:
            raise WorkerError(f"{self.name} {self.version}: {exc}", code="worker-user") from None
        if fence.deny or ident is not None:  # the worker converts into it: it must exist
            with contextlib.suppress(OSError):  # if not, the converter says so
                self.cache_dir.mkdir(parents=True, exist_ok=True)
        if ident is not None:
            # early: the model is not there yet; whether the worker user can reach it
            # is asked when it is (start() spawns then), unless the user falls back anyway
            missing = _unreachable(ident, [root] if early else [root, str(self.model_dir)])
            if missing and fence.user != "auto":
                if early:
                    return None
                raise WorkerError(
                    f"{self.name} {self.version}: worker user {ident[2]} cannot reach "
                    f"{missing} (make it and its parents readable, or set "
                    'daemon.worker_user = "")',
                    code="worker-user",
                )
            if missing:
                if ident not in _WARNED:
                    _WARNED.add(ident)
                    logger.warning(
                        "worker user %s cannot reach %s: workers run as the daemon's user "
                        '(set daemon.worker_user = "" to say so, or open the path to it)',
                        ident[2],
                        missing,
                    )
                ident = None
            elif early:
                return None
            else:
                _hand_over_tree(self.cache_dir, ident[0], ident[1])
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lend_pair = direct.channel_pair() if self._lending is not None else None
        extra = (lend_pair[1].fileno(),) if lend_pair is not None else ()
        # Thread mode: per slot a "lane", so a sync caller sends its request and blocks
        # on its own reply; the kernel wakes exactly that thread, and one child thread per
        # lane serves it (no reader role to pass on either side). A lane is two one-way
        # socketpairs, requests and replies (see ipc.Channel: the write-space wake-up).
        pairs = (
            [
                socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                for _ in range(2 * self._arena.slots)
            ]
            if self._loop is None
            else []
        )
        with self._regions_lock:  # a region added later is mapped by shared_region()
            regions = [(r.id, r.ro_fd, r.size) for r in self._arena.regions.values()]
        spawned = time.monotonic()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent.serving.worker_main",
                    str(child.fileno()),
                    str(self._arena.fd),
                    *(str(fd) for fd in extra),
                ],
                pass_fds=(
                    child.fileno(),
                    self._arena.fd,
                    *extra,
                    *(b.fileno() for _, b in pairs),
                    *(fd for _, fd, _ in regions),
                ),
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # As root: an unprivileged user of its own, no supplementary groups.
                user=ident[0] if ident is not None else None,
                group=ident[1] if ident is not None else None,
                extra_groups=[] if ident is not None else None,
                # Its own process group: whatever the run script starts dies with it.
                start_new_session=True,
            )
        except BaseException:
            for a, _ in pairs:
                a.close()
            raise
        finally:
            child.close()
            if lend_pair is not None:
                lend_pair[1].close()
            # Lane i: the child reads requests from pairs[2i], writes replies to [2i + 1].
            fds = [b.fileno() for _, b in pairs]
            lane_fds = [fds[i : i + 2] for i in range(0, len(fds), 2)]
            for _, b in pairs:
                b.close()
        lanes = [ipc.Lane(pairs[i + 1][0], pairs[i][0]) for i in range(0, len(pairs), 2)]
        return _Launched(proc, parent, lanes, lane_fds, lend_pair, regions, spawned, fence)

    def _handshake(self, launched: _Launched, timeout: float) -> None:
        proc, parent, lanes, lend_pair = (
            launched.proc,
            launched.sock,
            launched.lanes,
            launched.lend_pair,
        )
        lane_fds, regions, spawned = launched.lane_fds, launched.regions, launched.spawned
        fence = launched.fence
        chan = ipc.Channel(parent)
        init = {
            "model_dir": str(self.model_dir),
            "config": self.config.to_dict(),
            "explicit": sorted(self.config.explicit),
            "cache_dir": str(self.cache_dir),
            "loader": self.loader,
            "self_test": self.self_test_fn,
            "slots": self._arena.slots,
            "slot_bytes": self._arena.slot_bytes,
            "max_concurrency": self.max_concurrency,
            "lanes": lane_fds,
            "regions": regions,
            "deny": list(fence.deny),  # closed by Landlock before the run script is imported
        }
        parent.settimeout(timeout)
        try:
            chan.send({"op": "init"}, [json.dumps(init).encode()])  # JSON both ways, no pickle
            header, _ = chan.recv()
        except (ipc.ChannelClosed, TimeoutError, OSError) as exc:
            proc.kill()
            rc = proc.wait()
            _killpg(proc.pid)
            chan.close()
            for lane in lanes:
                lane.close()
            if lend_pair is not None:
                lend_pair[0].close()
            if isinstance(exc, TimeoutError):
                raise WorkerError(
                    f"{self.name} {self.version}: worker did not become ready in {timeout:g} s",
                    code="worker-timeout",
                ) from None
            raise WorkerError(
                f"{self.name} {self.version}: worker process died while loading "
                f"({_describe_exit(rc)})",
                code="worker-crashed",
            ) from None
        parent.settimeout(None)
        if header.get("op") != "ready":
            err = header.get("err") or {}
            proc.wait()
            _killpg(proc.pid)
            chan.close()
            for lane in lanes:
                lane.close()
            if lend_pair is not None:
                lend_pair[0].close()
            raise WorkerError(
                f"{self.name} {self.version}: {err.get('msg', 'worker failed to start')}",
                code=str(err.get("code", "worker")),
            )
        self._meta = dict(header.get("meta") or {})
        self.start_phases = _phases(spawned, header.get("stamps"))
        c = _Child(proc, chan, lanes)
        self._child = c
        if self._loop is not None:
            self._call_in_loop(self._attach, c)
            # The loop sees EOF on the socket; the process itself is watched as well,
            # since a forked grandchild may keep the socket open after the child died.
            threading.Thread(
                target=self._monitor, args=(c,), name=f"worker-{self.name}-monitor", daemon=True
            ).start()
        else:
            self._start_threads(c)
        if lend_pair is not None:
            if header.get("lends") and self._lending is not None:
                self._call_in_loop(self._lending.attach, lend_pair[0], self._loop)
            else:
                lend_pair[0].close()
        logger.info("%s %s: worker ready (pid %d)", self.name, self.version, proc.pid)

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new requests, let in-flight ones finish (bounded), then end the child."""
        with self._cv:
            self._stopping = True
            self.state = "stopped"
            self._cv.notify_all()
        with self._cv:
            early, self._launched = self._launched, None
        if early is not None:
            early.discard()
        c = self._child
        if c is None:
            self._arena.close()
            return
        deadline = time.monotonic() + drain_timeout
        lending = self._lending
        if lending is not None:
            # Lent connections come back once their request in flight is answered.
            self._call_in_loop(lending.recall)
            if _running_loop() is not self._loop:
                lending.wait_unlent(drain_timeout)
        while time.monotonic() < deadline:
            with c.lock:
                if not c.pending or c.dead:
                    break
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            c.chan.send({"op": "shutdown"})
        try:
            c.proc.wait(max(0.1, min(5.0, deadline - time.monotonic() + 1.0)))
        except subprocess.TimeoutExpired:
            c.kill_reason = ("worker-stopped", "worker stopped before the request finished")
            c.proc.kill()
            c.proc.wait()
        _killpg(c.proc.pid)  # what the run script started goes with it
        self._fail_pending(c, "worker-stopped", f"{self.name} {self.version}: worker stopped")
        if lending is not None:
            msg = f"{self.name} {self.version}: worker stopped; request not served"
            self._call_in_loop(lending.child_gone, "worker-stopped", msg)
            self._call_in_loop(lending.close)  # after child_gone (FIFO): its memfd
        self._close_chan(c)
        self._arena.close()  # shm pages are freed with the last mapping

    # --- child death and restart ------------------------------------------------------

    # --- thread mode: callers read their own replies ---------------------------------
    #
    # A sync predict uses its slot's lane (_lane_call): send, block on the reply. On the
    # shared socket (self_test) a synchronous caller that finds the reader role free takes
    # it and reads frames until
    # its own reply is in, settling the others' on the way; then it hands the role to a
    # waiting caller (or to the async reader). A lone caller thus gets its reply without
    # any thread hand-off. The async reader thread only reads while apredict requests
    # (which cannot block on the socket) are pending; a monitor thread waits for the
    # child's exit, so a death is noticed even when nobody is reading.

    def _start_threads(self, c: _Child) -> None:
        for target, what in ((self._monitor, "monitor"), (self._async_reader, "reader")):
            threading.Thread(
                target=target, args=(c,), name=f"worker-{self.name}-{what}", daemon=True
            ).start()

    def _monitor(self, c: _Child) -> None:
        c.proc.wait()
        with c.role_cv:
            c.eof = True
            c.role_cv.notify_all()
        self._gone(c)

    def _read_one(self, c: _Child, deadline: float | None) -> bool:
        """Read and deliver one frame as the role holder; False on EOF or deadline."""
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _readable(c.chan.sock, remaining):
                return remaining > 0
        try:
            h, p = c.chan.recv()
        except ipc.ChannelClosed:
            with c.role_cv:
                c.eof = True
                c.role_cv.notify_all()
            # EOF: the monitor sees the exit. A garbled stream from a live child: kill it.
            threading.Thread(target=_reap, args=(c.proc,), daemon=True).start()
            return False
        self._deliver(c, h, p)
        return True

    def _hand_over(self, c: _Child) -> None:
        """Give up the reader role: to a waiting sync caller, else to the async reader."""
        with c.role_cv:
            c.leader = False
            if c.eof:
                return
            for f in c.followers.values():
                if not f.done:
                    f.q.put(None)
                    return
            if c.n_async:
                c.role_cv.notify_all()

    def _wait_sync(self, c: _Child, f: _Follower, timeout: float | None) -> bool:
        """Wait for ``f``'s reply, reading the socket when the role is free; False on
        timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not f.done:
                with c.role_cv:
                    lead = not c.leader and not c.eof
                    if lead:
                        c.leader = True
                if lead:
                    try:
                        while not f.done and self._read_one(c, deadline):
                            pass
                    finally:
                        self._hand_over(c)
                    if f.done or c.eof:
                        continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return f.done
                with contextlib.suppress(queue.Empty):
                    f.q.get(True, remaining)
            return True
        finally:
            with c.role_cv:
                c.followers.pop(f.rid, None)
                handover = not c.leader
            if handover:  # we may have been promoted after our reply came: pass it on
                self._hand_over(c)

    def _async_reader(self, c: _Child) -> None:
        while True:
            with c.role_cv:
                while not c.eof and (c.leader or not c.n_async):
                    c.role_cv.wait()
                if c.eof:
                    return
                c.leader = True
            try:
                while True:
                    with c.role_cv:
                        if not c.n_async:
                            break
                    if not self._read_one(c, None):
                        break
            finally:
                self._hand_over(c)

    def _async_done(self, c: _Child) -> None:
        with c.role_cv:
            c.n_async -= 1

    def _deliver(self, c: _Child, h: dict[str, Any], p: bytearray | memoryview) -> None:
        """Settle the request a reply frame answers and free its slot."""
        rid = h.get("id")
        with c.lock:
            entry = c.pending.pop(rid, None) if isinstance(rid, int) else None
        if entry is None:
            return
        fut, slot = entry
        try:
            result, exc = self._outcome(h, p)
            self._settle(fut, result, exc)
        finally:
            if slot is not None:
                self._arena.release(slot)

    def _outcome(
        self,
        h: dict[str, Any],
        p: bytearray | memoryview,
        tensors: list[ipc.Tensor] | None = None,
        us: int | None = None,
    ) -> tuple[Any, BaseException | None]:
        """(result, None) or (None, error) of a reply frame; call before its slot is freed
        (shm outputs are copied out). A lane reply comes with its descriptors compiled
        and the child's busy time outside the header."""
        try:
            if h.get("op") == "result":
                if tensors is None:
                    out = ipc.decode(h["t"], p, self._arena, copy=True)
                else:
                    out = ipc.decode(tensors, p, self._arena, copy=True, compiled=True)
                with self._stats_lock:
                    self._stats["shm_tensors_out"] += int(h.get("shm", 0))
                    self._stats["child_busy_us"] += int(h.get("us", 0) if us is None else us)
                return (out if "n" not in h else int(h["n"])), None
            return None, ipc.error_from_dict(h.get("err") or {})
        except Exception as exc:  # a malformed frame fails that request only
            return None, WorkerError(f"bad reply from worker: {exc}")

    def _settle(self, fut: Any, result: Any, exc: BaseException | None) -> None:
        """Complete a sync caller's slot, or a concurrent or an asyncio future, from
        whichever thread we are on."""
        if type(fut) is _Follower:
            c = fut.child
            assert c is not None
            with c.role_cv:
                if fut.done:
                    return
                fut.result, fut.exc, fut.done = result, exc, True
                if fut.abandoned:
                    c.n_async -= 1
            fut.q.put(None)
            return
        if isinstance(fut, asyncio.Future):
            loop = fut.get_loop()
            if _running_loop() is loop:
                _set_future(fut, result, exc)
            else:
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                    loop.call_soon_threadsafe(_set_future, fut, result, exc)
            return
        if fut.done():
            return
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)

    # --- loop mode: the event loop reads the replies ----------------------------------

    def _call_in_loop(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        if _running_loop() is loop:
            fn(*args)
        else:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop is closed: fall back to a reader thread
                self._loop = None
                if fn == self._attach:
                    self._start_threads(*args)

    def _attach(self, c: _Child) -> None:
        if c.dead or c.attached:
            return
        assert self._loop is not None
        c.attached = True
        self._loop.add_reader(c.chan.sock.fileno(), self._on_readable, c)

    def _detach(self, c: _Child) -> None:
        if c.attached:
            c.attached = False
            assert self._loop is not None
            with contextlib.suppress(Exception):
                self._loop.remove_reader(c.chan.sock.fileno())

    def _on_readable(self, c: _Child) -> None:
        """Read what the socket holds without blocking; deliver every complete frame."""
        sock = c.chan.sock
        while c.attached:
            view = memoryview(c.rbuf)
            try:
                n = sock.recv_into(view[c.rgot :], 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if n == 0 and len(view) > c.rgot:  # EOF: the child is gone
                self._detach(c)
                threading.Thread(target=self._gone, args=(c,), daemon=True).start()
                return
            c.rgot += n
            if c.rgot < len(c.rbuf):
                continue
            if c.hlen < 0:
                hl, pl = ipc.HEAD.unpack(c.rbuf)
                if hl > ipc.MAX_HEADER or hl == 0:
                    self._garbled(c)
                    return
                c.hlen = hl
                c.rbuf = bytearray(hl + pl)
                c.rgot = 0
                continue
            body, hl = c.rbuf, c.hlen
            c.rbuf, c.rgot, c.hlen = bytearray(ipc.HEAD.size), 0, -1
            try:
                header = json.loads(body[:hl])
            except ValueError:
                header = None
            if not isinstance(header, dict):
                self._garbled(c)
                return
            self._deliver(c, header, memoryview(body)[hl:])

    def _garbled(self, c: _Child) -> None:
        """A garbled stream is as good as a dead child: kill it, restart."""
        self._detach(c)
        logger.error("%s %s: garbled frame from the worker; killing it", self.name, self.version)
        with contextlib.suppress(OSError):
            c.proc.kill()
        threading.Thread(target=self._gone, args=(c,), daemon=True).start()

    def _close_chan(self, c: _Child) -> None:
        """Close the socket; in loop mode only after the loop stopped watching its fd
        (a closed fd left in the selector would break the next socket with that number)."""
        for lane in c.lanes:
            lane.close()
        if self._loop is None or not c.attached:
            c.chan.close()
            return
        if _running_loop() is self._loop:
            self._detach(c)
            c.chan.close()
            return
        done = threading.Event()

        def close() -> None:
            self._detach(c)
            c.chan.close()
            done.set()

        try:
            self._loop.call_soon_threadsafe(close)
        except RuntimeError:  # loop closed: its selector is gone too
            c.chan.close()
            return
        if not done.wait(5.0):
            logger.warning(
                "%s %s: event loop did not release the worker socket", self.name, self.version
            )

    def _gone(self, c: _Child) -> None:
        """The child exited (its monitor saw it) or its socket closed: fail its requests,
        kill what it left behind, restart it. Runs once per child."""
        rc = c.proc.wait()
        with c.lock:
            if c.gone:
                return
            c.gone = True
        _killpg(c.proc.pid)
        if c.kill_reason is not None:
            code, why = c.kill_reason
        else:
            code, why = "worker-crashed", f"worker process died ({_describe_exit(rc)})"
        # State first, then the failures: a caller retrying at once must see
        # "restarting" (and wait for it), not a dead child behind a "ready" state.
        with self._cv:
            c.dead = True
            restart = not self._stopping and self._child is c
            if restart:
                self.state = "restarting"
                self._stats["last_error"] = why
                self._cv.notify_all()
        self._close_chan(c)
        self._fail_pending(c, code, f"{self.name} {self.version}: {why}; request not served")
        if self._lending is not None and not self._stopping:  # stop() settles its own
            msg = f"{self.name} {self.version}: {why}; request not served"
            self._call_in_loop(self._lending.child_gone, code, msg)
        if not restart:
            return
        logger.error("%s %s: %s; restarting", self.name, self.version, why)
        threading.Thread(target=self._restart, name=f"restart-{self.name}", daemon=True).start()

    def _fail_pending(self, c: _Child, code: str, msg: str) -> None:
        with c.lock:
            items = list(c.pending.values())
            c.pending.clear()
        for fut, slot in items:
            self._settle(fut, None, WorkerError(msg, code=code, status=_status_of(code)))
            if slot is not None:
                self._arena.release(slot)

    def _restart(self) -> None:
        first, cap = self.restart_backoff
        while True:
            delay = min(cap, first * (2 ** min(self._failures, 30)))
            time.sleep(delay)
            with self._cv:
                if self._stopping:
                    return
            try:
                self._spawn(120.0)
            except Exception as exc:
                self._failures += 1
                self._stats["last_error"] = str(exc)
                logger.error("%s %s: restart failed: %s", self.name, self.version, exc)
                continue
            with self._cv:
                self._stats["restarts"] += 1
                self._failures = 0
                if self._stopping:
                    self.state = "stopped"
                else:
                    self.state = "ready"
                self._cv.notify_all()
            if self._stopping and self._child is not None:
                self.stop(0.0)
            return

    def _kill_hung(self, c: _Child, why: str) -> None:
        """A prediction outlived the request timeout: readiness goes down at once, the
        child (and its process group) is killed; _gone fails what was in flight with
        ``worker-timeout`` and restarts it."""
        with self._cv:
            if c.dead or c.kill_reason is not None or self._child is not c:
                return
            c.kill_reason = ("worker-timeout", why)
            if not self._stopping:
                self.state = "restarting"
                self._cv.notify_all()
        logger.error("%s %s: %s; killing the worker", self.name, self.version, why)
        _killpg(c.proc.pid)

    def _lent_hung(self, seconds: float) -> None:
        """Lending saw a prediction on a lent connection running ``seconds``."""
        c = self._child
        if c is not None:
            self._kill_hung(c, f"a request ran longer than the {seconds:g} s request timeout")

    def _watch(self) -> None:
        import psutil

        limit = self.memory_limit_bytes
        while not self._stopping and limit is not None:
            time.sleep(WATCH_INTERVAL)
            c = self._child
            if c is None or c.dead or self.state != "ready":
                continue
            try:
                rss = psutil.Process(c.proc.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                why = f"worker RSS {rss >> 20} MiB exceeded the {limit >> 20} MiB memory limit"
                logger.error("%s %s: %s; killing it", self.name, self.version, why)
                c.kill_reason = ("worker-memory", why)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.proc.pid, signal.SIGKILL)

    # --- requests ---------------------------------------------------------------------

    def _ready_child(self, timeout: float | None) -> _Child:
        c = self._child
        if self.state == "ready" and c is not None and not c.dead:
            return c  # the common case, without the Condition
        wait = RESTART_WAIT if timeout is None else timeout
        with self._cv:
            ok = self._cv.wait_for(lambda: self.state in ("ready", "stopped", "failed"), wait)
            c = self._child
            if not ok or self.state != "ready" or c is None or c.dead:
                raise ModelNotReadyError(
                    f"model {self.name} version {self.version} is {self.state}"
                )
            return c

    def _submit(
        self,
        header: dict[str, Any],
        inputs: dict[str, np.ndarray] | None,
        timeout: float | None,
        *,
        nowait: bool = False,
        fut: Any = None,
        follower: _Follower | None = None,
        defer_send: bool = False,
        fds: list[int] | None = None,
    ) -> Any:
        """Send one request; returns ``fut`` (an asyncio future of the worker's loop) or a
        new ``concurrent.futures.Future``, settled when the reply comes."""
        if fut is None and self._loop is not None and _running_loop() is self._loop:
            # The loop reads the replies: blocking it on one would wait forever.
            raise RuntimeError("on the worker's event loop use apredict, not predict")
        c = self._ready_child(0.0 if nowait else timeout)
        rid = next(self._ids)
        if follower is not None:
            fut = follower
            follower.rid = rid
            follower.child = c  # before it can be settled (a death fails it at once)
        elif fut is None:
            fut = Future()
        slot = None
        if inputs is not None and any(
            isinstance(v, np.ndarray) and v.nbytes >= ipc.SHM_MIN for v in inputs.values()
        ):
            slot = self._arena.acquire(0.0 if nowait else timeout)
            if slot is None and nowait:
                raise _Busy
            if slot is None:
                raise ModelNotReadyError(f"model {self.name}: no free transfer slot")
        try:
            descs, parts, n_shm, n_reg = ipc.encode(
                inputs or {}, self._arena, slot, self._arena.regions
            )
        except BaseException:
            if slot is not None:
                self._arena.release(slot)
            raise
        header.update(id=rid, t=descs, slot=slot)
        with c.lock:
            if c.dead:
                if slot is not None:
                    self._arena.release(slot)
                raise WorkerError(f"{self.name} {self.version}: worker died", code="worker-crashed")
            c.pending[rid] = (fut, slot)
        if self._loop is None:  # thread mode: who reads this reply
            with c.role_cv:
                if follower is not None:
                    c.followers[rid] = follower
                else:
                    c.n_async += 1
                    c.role_cv.notify_all()
            if follower is None:
                fut.add_done_callback(lambda _f: self._async_done(c))
        self._count_request(n_shm, n_reg)
        if defer_send:
            return fut, c, header, parts
        with contextlib.suppress(OSError):  # the reader sees a death and fails this request
            c.chan.send(header, parts, fds)
        return fut

    def predict(
        self, inputs: dict[str, np.ndarray], timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request in the child; errors come back as the child's agent.errors class."""
        try:
            out: dict[str, np.ndarray] = self._call({"op": "predict"}, inputs, timeout)
        except FutureTimeout:
            self._count_error(TimeoutError("timeout"))
            raise WorkerError(
                f"{self.name}: no answer in {timeout} s", code="worker-timeout"
            ) from None
        except BaseException as exc:
            self._count_error(exc)
            raise
        return out

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
        c: _Child | None = None
        try:
            if loop is self._loop:  # loop mode: the loop itself settles this future
                waiter, c, header, parts = self._submit(
                    {"op": "predict"},
                    inputs,
                    timeout,
                    nowait=True,
                    fut=loop.create_future(),
                    defer_send=True,
                )
                await self._send_from_loop(loop, c, header, parts)
            else:
                waiter = asyncio.wrap_future(
                    self._submit({"op": "predict"}, inputs, timeout, nowait=True)
                )
        except (_Busy, ModelNotReadyError):  # restarting or all slots busy: wait off-loop
            cf = await loop.run_in_executor(None, self._submit, {"op": "predict"}, inputs, timeout)
            waiter = asyncio.wrap_future(cf)
        if c is None:
            c = self._child
        try:
            out: dict[str, np.ndarray] = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            self._count_error(TimeoutError("timeout"))
            if enforce and c is not None:
                self._kill_hung(c, f"a request ran longer than the {timeout:g} s request timeout")
            raise WorkerError(
                f"{self.name}: no answer in {timeout:g} s",
                code="worker-timeout",
                status=504 if enforce else None,
            ) from None
        except BaseException as exc:
            self._count_error(exc)
            raise
        return out

    async def _send_from_loop(
        self, loop: asyncio.AbstractEventLoop, c: _Child, header: dict[str, Any], parts: Any
    ) -> None:
        """Send without blocking the loop: the loop also reads the replies, and a child
        blocked sending a big reply reads no more requests, so a loop blocked in send
        would deadlock both. What does not go out at once is sent from a thread."""
        try:
            state, bufs = c.chan.send_nowait(header, parts)
            if state == "later":
                await loop.run_in_executor(None, c.chan.send_bufs, bufs)
            elif state == "rest":
                await loop.run_in_executor(None, c.chan.finish, bufs)
        except OSError:  # the reader sees the death and fails this request
            pass

    # --- lent connections (agent/serving/direct.py), on the daemon's event loop ---------------

    @property
    def lending(self) -> Lending | None:
        """The lending job (agent/serving/direct.py, the registry's ``LendingWorker``), or
        None: every request is relayed. A new one after ``stop()`` and ``start()``."""
        return self._lending

    def _serving(self) -> bool:
        return self.state == "ready"

    def _count_request(self, n_shm: int, n_reg: int) -> None:
        with self._stats_lock:
            self._stats["requests"] += 1
            self._stats["shm_tensors_in"] += n_shm
            self._stats["region_tensors_in"] += n_reg

    def _count_error(self, exc: BaseException) -> None:
        with self._stats_lock:
            self._stats["errors"] += 1
            self._stats["last_error"] = str(exc)

    def metadata(self) -> dict[str, Any]:
        """KServe v2 metadata the child reported when it became ready."""
        return dict(self._meta)

    def self_test(self) -> None:
        """Run Meta-info/samples in the child; raises the child's error on mismatch."""
        self._call({"op": "self_test"}, None, None)

    # --- shared regions (zero-copy inputs) ----------------------------------------------

    def shared_region(self, nbytes: int, timeout: float = 30.0) -> ipc.SharedRegion:
        """Memory the caller writes inputs into, shared with the worker: an input array
        that lies inside it (``region.ndarray(...)``) is not copied per request, only its
        place is sent (Triton's system shared memory, without the HTTP registration).

        The worker maps it read-only, and again after a restart. Until the request is
        answered the caller must not rewrite the data it passed; ``region.close()``
        unmaps it (arrays from it are then copied as any private array)."""
        region = ipc.SharedRegion(next(self._region_ids), nbytes, on_close=self._unmap)
        with self._regions_lock:
            self._arena.regions[region.id] = region
        try:
            if self.state in ("ready", "starting", "restarting"):
                # Idempotent in the child: a child spawned meanwhile may already have it.
                self._call(
                    {"op": "map", "r": region.id, "size": nbytes}, None, timeout, [region.ro_fd]
                )
        except BaseException:
            region.close()
            raise
        return region

    def _unmap(self, region: ipc.SharedRegion) -> None:
        with self._regions_lock:
            self._arena.regions.pop(region.id, None)
        c = self._child
        if c is None or c.dead or self.state != "ready":
            return  # a new child is not given it
        with contextlib.suppress(Exception):  # a dying child forgets it anyway
            self._call({"op": "unmap", "r": region.id}, None, 10.0)

    def _call(
        self,
        header: dict[str, Any],
        inputs: dict[str, np.ndarray] | None,
        timeout: float | None,
        fds: list[int] | None = None,
    ) -> Any:
        """Synchronous request: in thread mode a predict goes through its slot's lane;
        other requests share the socket, and the caller may read its own reply there."""
        if self._loop is not None:
            return self._submit(header, inputs, timeout, fds=fds).result(timeout)
        if header.get("op") == "predict":
            lc = self._ready_child(timeout)
            if lc.lanes:
                return self._lane_call(lc, header, inputs, timeout)
        f = _Follower()
        self._submit(header, inputs, timeout, follower=f, fds=fds)
        c = f.child
        if c is None or not self._wait_sync(c, f, timeout):
            self._abandon(c, f)
            raise FutureTimeout
        if f.exc is not None:
            raise f.exc
        return f.result

    def _lane_call(
        self,
        c: _Child,
        header: dict[str, Any],
        inputs: dict[str, np.ndarray] | None,
        timeout: float | None,
    ) -> Any:
        """Sync request on the lane of its slot: send, then block reading the reply.

        The request is in ``c.pending`` too (with no slot: the caller frees it), so a
        child death fails it through :meth:`_gone` with the usual code and message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = self._arena.acquire(timeout)
        if slot is None:
            raise ModelNotReadyError(f"model {self.name}: no free transfer slot")
        lane = c.lanes[slot]
        rid = next(self._ids)
        f = _Follower()
        f.rid, f.child = rid, c
        try:
            descs, parts, n_shm, n_reg = ipc.encode(
                inputs or {}, self._arena, slot, self._arena.regions
            )
            header["t"] = descs
            with c.lock:
                if c.dead:
                    raise WorkerError(
                        f"{self.name} {self.version}: worker died", code="worker-crashed"
                    )
                c.pending[rid] = (f, None)
        except BaseException:
            self._arena.release(slot)
            raise
        self._count_request(n_shm, n_reg)
        with contextlib.suppress(OSError):  # a death shows as EOF below
            lane.send(rid, slot, header, parts)
        reply = None
        try:
            reply = _lane_reply(lane, rid, deadline)
        except ipc.ChannelClosed:
            if c.proc.poll() is None:  # a garbled stream from a live child: kill it
                threading.Thread(target=_reap, args=(c.proc,), daemon=True).start()
            while not f.done:  # _gone fails it once the child has exited
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                with contextlib.suppress(queue.Empty):
                    f.q.get(True, left)
            if f.done:
                self._arena.release(slot)
                if f.exc is not None:
                    raise f.exc from None
                return f.result
        except BaseException:  # interrupted while waiting: the lane goes to a drainer
            self._start_drain(c, lane, rid, slot)
            raise
        if reply is None:  # timed out: the slot stays taken until the late reply
            self._start_drain(c, lane, rid, slot)
            raise FutureTimeout
        h, tensors, us, p = reply
        with c.lock:
            c.pending.pop(rid, None)
        try:
            result, exc = self._outcome(h, p, tensors, us)
        finally:
            self._arena.release(slot)
        if exc is not None:
            raise exc
        return result

    def _start_drain(self, c: _Child, lane: ipc.Lane, rid: int, slot: int) -> None:
        threading.Thread(target=self._drain_lane, args=(c, lane, rid, slot), daemon=True).start()

    def _drain_lane(self, c: _Child, lane: ipc.Lane, rid: int, slot: int) -> None:
        """After a timeout: read the late reply, then free the slot (its lane with it)."""
        try:
            while True:
                if lane.recv()[0] == rid:
                    break
        except ipc.ChannelClosed:
            if c.proc.poll() is None:
                _reap(c.proc)
            c.proc.wait()
        finally:
            with c.lock:
                c.pending.pop(rid, None)
            self._arena.release(slot)

    def _abandon(self, c: _Child | None, f: _Follower) -> None:
        """A timed-out sync request: the async reader reads its late reply (and so frees
        its slot) even if no other caller comes."""
        if c is None:
            return
        with c.role_cv:
            if f.done:
                return
            f.abandoned = True  # _settle takes it off n_async again
            c.n_async += 1
            c.role_cv.notify_all()

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
        c = self._child
        in_flight = len(c.pending) if c is not None else 0
        return {**self._stats, "rss": self.rss_bytes(), "in_flight": in_flight, "state": self.state}


def _readable(sock: socket.socket, timeout: float) -> bool:
    p = select.poll()
    try:
        p.register(sock, select.POLLIN)
    except (ValueError, OSError):  # closed meanwhile: the read reports it
        return True
    return bool(p.poll(max(0, int(timeout * 1000) + 1)))


def _lane_reply(
    lane: ipc.Lane, rid: int, deadline: float | None
) -> tuple[dict[str, Any], list[ipc.Tensor], int, bytearray] | None:
    """(header, tensors, child busy us, payload) of the reply to ``rid`` on a lane, or
    None at the deadline; ChannelClosed on EOF."""
    while True:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _readable(lane.sock, remaining):
                return None
        got, us, h, tensors, p = lane.recv()
        if got == rid:
            return h, tensors, us, p


def _phases(spawned: float, stamps: Any) -> dict[str, float]:
    """Seconds of the child's start phases from its monotonic stamps (CLOCK_MONOTONIC is
    one clock for every process): interpreter start, loader imports, waiting for the
    model (a launched child), open (convert, load, validate), warm-up. Empty when the
    child sent none."""
    if not isinstance(stamps, dict):
        return {}
    names = (
        ("entered", "interpreter"),
        ("imported", "imports"),
        ("init", "waiting for the model"),
        ("opened", "open"),
        ("warm", "warm-up"),
    )
    out: dict[str, float] = {}
    last = spawned
    for key, label in names:
        t = stamps.get(key)
        if isinstance(t, int | float) and not isinstance(t, bool):
            out[label] = max(0.0, float(t) - last)
            last = float(t)
    return out

_WARNED: set[tuple[int, int, str]] = set()
_REACH = (
    "import os, sys\n"
    "bad = [p for p in sys.argv[1:] if not os.access(p, os.R_OK | os.X_OK)]\n"
    "print(bad[0] if bad else '', end='')"
)


def _unreachable(ident: tuple[int, int, str], paths: list[str]) -> str:
    """The first of: this interpreter, its site-packages and ``paths`` that the worker
    user cannot read (a root daemon's interpreter may live in /root); "" if none. Asked
    of the user itself: a process of its own, the kernel judging (ACLs included)."""
    import sysconfig

    look = [sysconfig.get_paths()["purelib"], *paths]
    try:
        res = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _REACH, *look],
            user=ident[0],
            group=ident[1],
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return sys.executable
    if res.returncode != 0:
        return sys.executable
    return res.stdout


def _hand_over_tree(path: Path, uid: int, gid: int) -> None:
    """Make the converter cache the worker user's (a root daemon's workers write it):
    every entry not already owned by ``uid``."""
    for top, dirs, files in os.walk(path):
        for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
            with contextlib.suppress(OSError):
                if os.lstat(name).st_uid != uid:
                    os.lchown(name, uid, gid)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """After EOF or a garbled frame: a child still alive a second later is killed."""
    try:
        proc.wait(1.0)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _set_future(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # cancelled (timeout) meanwhile
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _killpg(pgid: int) -> None:
    """SIGKILL a child's process group (it is the group's leader): the child if it still
    runs, and everything its run script forked or spawned."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _status_of(code: str) -> int:
    """HTTP status of a request failed because its worker went away: 504 when it was
    killed for a request that ran past the timeout, else 503 (retry)."""
    return 504 if code == "worker-timeout" else 503


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


if TYPE_CHECKING:  # mypy holds the worker's jobs to the contracts the registry relies on
    from agent.serving.registry import LendingWorker, WorkerLike

    _worker_contract: type[WorkerLike] = ModelWorker
    _lending_contract: type[LendingWorker] = Lending
