"""A worker's process: start, stop, restart with backoff, and its health.

:class:`Supervisor` spawns ``python -m agent.serving.worker_main`` (a fresh interpreter, no
fork of the threaded daemon) with a minimal environment, as the worker user if one is
set, in a session and process group of its own, and hands it its settings in a JSON
``init`` frame (nothing is pickled either way). The child answers ``ready`` with the
model's metadata; from then on its requests go through a :class:`Transport`
(agent/serving/transport.py) and, when the daemon lends connections, its
:class:`Lending` (agent/serving/lending.py).

This is the trust boundary of serving (docs/DAEMON.md, "Trust boundaries"): the child
runs a package's run scripts, so it gets only what ``agent/serving/sandbox.py`` allows
(environment, user, Landlock), and what it sends back is parsed, never executed.

Crash isolation: when the child dies (kill -9, segfault, OOM, memory cap) every request
in flight fails with ``WorkerError(code="worker-crashed", status 503)`` and the child
restarts with exponential backoff (``restart_backoff`` = (first, cap) seconds); state goes
``restarting`` then ``ready``. A request arriving while it restarts waits for it
(bounded by its timeout, or 30 s) and then fails with ``ModelNotReadyError``.

Health: a monitor thread waits for the child process itself (``waitpid``), so a death is
noticed even when a forked grandchild still holds the child's sockets open; whatever a
run script forked or spawned is killed with its process group (``killpg``) on stop, on
restart and when the child dies. A parent-side psutil watchdog kills a child whose RSS
exceeds ``memory_limit_bytes`` (RLIMIT_AS is unusable with ORT arenas; its requests
fail with ``worker-memory``). A prediction that outlives the request timeout (relayed,
or on a lent connection) kills the child: its request gets 504 ``worker-timeout``, the
state is ``restarting`` at once (readiness says so) and the child restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ModelNotReadyError, WorkerError
from agent.serving import ipc
from agent.serving.lending import Lending, channel_pair
from agent.serving.sandbox import Fence, worker_env, worker_identity
from agent.serving.transport import Counters, ReplyLoop, Transport
from runtime.config import RuntimeConfig

logger = logging.getLogger(__name__)

RESTART_WAIT = 30.0  # seconds a request without a timeout waits for a restart
WATCH_INTERVAL = 0.25  # seconds between the memory watchdog's looks


@dataclass
class Spawned:
    """A child process that has not had its ``init`` frame yet."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    lend_sock: socket.socket | None  # the daemon's end of the lending channel
    spawned: float
    fence: Fence
    lanes: list[socket.socket]  # per slot: requests out, replies in (the daemon's ends)

    def close_sockets(self) -> None:
        self.sock.close()
        for lane in self.lanes:
            lane.close()
        if self.lend_sock is not None:
            self.lend_sock.close()

    def discard(self) -> None:
        """Never used: end the child (it exits at EOF on its socket anyway)."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        killpg(self.proc.pid)
        self.close_sockets()


class Child:
    """One incarnation of a worker's process and its channel."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.transport: Transport = None  # type: ignore[assignment]  # set once ready
        self.lock = threading.Lock()
        self.dead = False
        self.gone = False  # its death has been handled (_gone runs once per child)
        self.kill_reason: tuple[str, str] | None = None


class Supervisor:
    """Runs one worker's child process (thread-safe). ``state``: stopped, starting,
    ready, restarting or failed."""

    def __init__(
        self,
        name: str,
        version: str,
        model_dir: Path,
        config: RuntimeConfig,
        *,
        cache_dir: Path,
        loader: str,
        self_test_fn: str,
        max_concurrency: int,
        shm_slot_bytes: int,
        memory_limit_bytes: int | None,
        restart_backoff: tuple[float, float],
        fence: Fence | None,
        replies: ReplyLoop,
        counters: Counters,
        lend: dict[str, Any] | None,
    ) -> None:
        self.name = name
        self.version = version
        self.label = f"{name} {version}"
        self.model_dir = Path(model_dir)
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.loader = loader
        self.self_test_fn = self_test_fn
        self.max_concurrency = max_concurrency
        self.shm_slot_bytes = shm_slot_bytes
        self.memory_limit_bytes = memory_limit_bytes
        self.restart_backoff = restart_backoff
        # What the child may reach (agent/serving/sandbox.py): its user, its environment,
        # the paths Landlock closes to it. None: the minimal environment only.
        self.fence = fence
        self.replies = replies
        self.counters = counters
        self.state = "stopped"
        self.child: Child | None = None
        self.meta: dict[str, Any] = {}
        self.start_phases: dict[str, float] = {}  # the last start: seconds per phase
        # One memfd of transfer slots for every child of this worker (a new one after stop).
        self.arena = ipc.ShmArena(max_concurrency, shm_slot_bytes)
        self._lend = lend
        self.lending = self._new_lending()
        self._launched: Spawned | None = None  # launch(): a child waiting for its model
        self._cv = threading.Condition()
        self._stopping = False
        self._failures = 0
        self._watchdog: threading.Thread | None = None

    def _new_lending(self) -> Lending | None:
        """The lending job: only with the daemon's event loop, which settles the
        connections."""
        if self._lend is None or self.replies.given is None:
            return None
        lending = Lending(self.name, self.version, self._lend)
        lending.hung = self._lent_hung
        lending.serving = lambda: self.state == "ready"
        return lending

    @property
    def pid(self) -> int | None:
        c = self.child
        return c.proc.pid if c is not None and not c.dead else None

    # --- start ------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Spawn the child, load and warm up the model; WorkerError carries its failure."""
        with self._cv:
            self._stopping = False
            lg = self.lending
            if lg is not None and lg.closed:  # started again after stop()
                self.lending = self._new_lending()
                if self.lending is not None:
                    self.lending.stats_sink = lg.stats_sink
            self.state = "starting"
            if self.arena.closed:  # started again after stop()
                self.arena = ipc.ShmArena(self.max_concurrency, self.shm_slot_bytes)
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
            if self._launched is not None or self.child is not None:
                return
            if self.arena.closed:
                return  # stopped: start() makes a new arena and spawns then
            self._launched = self._launch(early=True)

    def _spawn(self, timeout: float) -> None:
        with self._cv:
            early, self._launched = self._launched, None
        spawned = early if early is not None else self._launch()
        assert spawned is not None
        self._connect(spawned, timeout)

    def _launch(self, *, early: bool = False) -> Spawned | None:
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
            raise WorkerError(f"{self.label}: {exc}", code="worker-user") from None
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
                    f"{self.label}: worker user {ident[2]} cannot reach "
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
        # Two one-way socket pairs per transfer slot (a lane, see Transport): a request
        # wakes the one child thread that serves it. One-way, because on a two-way
        # socket our reading of a reply would wake that thread's blocked read for
        # nothing (the write-space wake-up shares the reader's wait queue).
        ends: list[socket.socket] = []  # ours: requests out, replies in, per lane
        theirs: list[socket.socket] = []  # the child's: requests in, replies out
        for _ in range(self.arena.slots):
            req_out, req_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            rep_in, rep_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ends += [req_out, rep_in]
            theirs += [req_in, rep_out]
        lend_pair = channel_pair() if self.lending is not None else None
        extra = (lend_pair[1].fileno(),) if lend_pair is not None else ()
        lane_fds = [s.fileno() for s in theirs]
        spawned = time.monotonic()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent.serving.worker_main",
                    str(child.fileno()),
                    str(self.arena.fd),
                    ",".join(
                        f"{a}:{b}" for a, b in zip(lane_fds[::2], lane_fds[1::2], strict=True)
                    ),
                    *(str(fd) for fd in extra),
                ],
                pass_fds=(child.fileno(), self.arena.fd, *lane_fds, *extra),
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
            parent.close()
            for sock in ends:
                sock.close()
            if lend_pair is not None:
                lend_pair[0].close()
            raise
        finally:
            child.close()
            for sock in theirs:
                sock.close()
            if lend_pair is not None:
                lend_pair[1].close()
        return Spawned(proc, parent, lend_pair[0] if lend_pair else None, spawned, fence, ends)

    def _connect(self, sp: Spawned, timeout: float) -> None:
        """Send the ``init`` frame, wait for ``ready``, then route requests to the child."""
        proc, parent = sp.proc, sp.sock
        chan = ipc.Channel(parent)
        init = {
            "model_dir": str(self.model_dir),
            "config": self.config.to_dict(),
            "explicit": sorted(self.config.explicit),
            "cache_dir": str(self.cache_dir),
            "loader": self.loader,
            "self_test": self.self_test_fn,
            "slots": self.arena.slots,
            "slot_bytes": self.arena.slot_bytes,
            "max_concurrency": self.max_concurrency,
            "deny": list(sp.fence.deny),  # closed by Landlock before the run script runs
        }
        parent.settimeout(timeout)
        try:
            chan.send({"op": "init"}, [json.dumps(init).encode()])  # JSON both ways
            header, _ = chan.recv(max_frame=ipc.MAX_HEADER)  # ready: a header only
        except (ipc.ChannelClosed, TimeoutError, OSError) as exc:
            proc.kill()
            rc = proc.wait()
            killpg(proc.pid)
            sp.close_sockets()
            if isinstance(exc, TimeoutError):
                raise WorkerError(
                    f"{self.label}: worker did not become ready in {timeout:g} s",
                    code="worker-timeout",
                ) from None
            raise WorkerError(
                f"{self.label}: worker process died while loading ({describe_exit(rc)})",
                code="worker-crashed",
            ) from None
        parent.settimeout(None)
        if header.get("op") != "ready":
            err = header.get("err") or {}
            proc.wait()
            killpg(proc.pid)
            sp.close_sockets()
            raise WorkerError(
                f"{self.label}: {err.get('msg', 'worker failed to start')}",
                code=str(err.get("code", "worker")),
            )
        self.meta = dict(header.get("meta") or {})
        self.start_phases = phases(sp.spawned, header.get("stamps"))
        c = Child(proc)
        c.transport = Transport(
            self.label,
            chan,
            self.arena,
            [(ipc.Channel(a), b) for a, b in zip(sp.lanes[::2], sp.lanes[1::2], strict=True)],
            replies=self.replies,
            counters=self.counters,
            lost=lambda why: self._lost(c, why),
        )
        self.child = c
        self.replies.call(c.transport.attach)
        # The loop sees EOF on the socket; the process itself is watched as well, since
        # a forked grandchild may keep the socket open after the child died.
        threading.Thread(
            target=self._monitor, args=(c,), name=f"worker-{self.name}-monitor", daemon=True
        ).start()
        if sp.lend_sock is not None:
            lending = self.lending
            if header.get("lends") and lending is not None:
                self._on_daemon_loop(lending.attach, sp.lend_sock, self.replies.given)
            else:
                sp.lend_sock.close()
        logger.info("%s: worker ready (pid %d)", self.label, proc.pid)

    def _on_daemon_loop(self, fn: Any, *args: Any) -> None:
        """Lending runs on the daemon's loop; once that is closed there is nothing to
        lend or settle."""
        loop = self.replies.given
        if loop is None or loop.is_closed():
            return
        if self.replies.on_loop():
            fn(*args)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    # --- stop -------------------------------------------------------------------------

    def stop(self, drain_timeout: float) -> None:
        """Refuse new requests, let in-flight ones finish (bounded), then end the child."""
        with self._cv:
            self._stopping = True
            self.state = "stopped"
            self._cv.notify_all()
            early, self._launched = self._launched, None
        if early is not None:
            early.discard()
        c = self.child
        if c is None:
            self.arena.close()
            self.replies.close()
            return
        deadline = time.monotonic() + drain_timeout
        lending = self.lending
        if lending is not None:
            # Lent connections come back once their request in flight is answered.
            self._on_daemon_loop(lending.recall)
            if not self.replies.on_loop():
                lending.wait_unlent(drain_timeout)
        while time.monotonic() < deadline and c.transport.in_flight and not c.dead:
            time.sleep(0.01)
        c.transport.shutdown()
        try:
            c.proc.wait(max(0.1, min(5.0, deadline - time.monotonic() + 1.0)))
        except subprocess.TimeoutExpired:
            c.kill_reason = ("worker-stopped", "worker stopped before the request finished")
            c.proc.kill()
            c.proc.wait()
        killpg(c.proc.pid)  # what the run script started goes with it
        c.transport.fail_all("worker-stopped", f"{self.label}: worker stopped")
        if lending is not None:
            msg = f"{self.label}: worker stopped; request not served"
            self._on_daemon_loop(lending.child_gone, "worker-stopped", msg)
            self._on_daemon_loop(lending.close)  # after child_gone (FIFO): its memfd
        c.transport.close()
        self.arena.close()  # shm pages are freed with the last mapping
        self.replies.close()

    # --- health -----------------------------------------------------------------------

    def _lost(self, c: Child, why: str) -> None:
        """The channel ended (on the loop): the child is gone, or garbled its stream or
        closed one of its sockets (a run script can) and is as good as gone: it is
        killed, so its requests fail now and it restarts, rather than hanging until the
        request timeout with its replies no longer read."""
        if why != "garbled":
            threading.Thread(target=self._closed_channel, args=(c,), daemon=True).start()
            return
        logger.error("%s: garbled frame from the worker; killing it", self.label)
        with contextlib.suppress(OSError):
            c.proc.kill()
        threading.Thread(target=self._gone, args=(c,), daemon=True).start()

    def _closed_channel(self, c: Child) -> None:
        """EOF: a child's sockets close as it exits. One still alive a moment later
        closed (or shut down) a socket itself, which a run script can do."""
        try:
            c.proc.wait(EOF_GRACE_S)
        except subprocess.TimeoutExpired:
            if not self._stopping:
                logger.error("%s: the worker closed its end of a channel; killing it", self.label)
                with contextlib.suppress(OSError):
                    c.proc.kill()
        self._gone(c)

    def _monitor(self, c: Child) -> None:
        c.proc.wait()
        self._gone(c)

    def _gone(self, c: Child) -> None:
        """The child exited (its monitor saw it) or its socket closed: fail its requests,
        kill what it left behind, restart it. Runs once per child."""
        rc = c.proc.wait()
        with c.lock:
            if c.gone:
                return
            c.gone = True
        killpg(c.proc.pid)
        if c.kill_reason is not None:
            code, why = c.kill_reason
        else:
            code, why = "worker-crashed", f"worker process died ({describe_exit(rc)})"
        # State first, then the failures: a caller retrying at once must see
        # "restarting" (and wait for it), not a dead child behind a "ready" state.
        with self._cv:
            c.dead = True
            restart = not self._stopping and self.child is c
            if restart:
                self.state = "restarting"
                self.counters.last_error = why
                self._cv.notify_all()
        c.transport.close()
        msg = f"{self.label}: {why}; request not served"
        c.transport.fail_all(code, msg)
        if self.lending is not None and not self._stopping:  # stop() settles its own
            self._on_daemon_loop(self.lending.child_gone, code, msg)
        if not restart:
            return
        logger.error("%s: %s; restarting", self.label, why)
        threading.Thread(target=self._restart, name=f"restart-{self.name}", daemon=True).start()

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
                self.counters.last_error = str(exc)
                logger.error("%s: restart failed: %s", self.label, exc)
                continue
            with self._cv:
                self.counters.restarts += 1
                self._failures = 0
                self.state = "stopped" if self._stopping else "ready"
                self._cv.notify_all()
            if self._stopping and self.child is not None:
                self.stop(0.0)
            return

    def kill_hung(self, c: Child, why: str) -> None:
        """A prediction outlived the request timeout: readiness goes down at once, the
        child (and its process group) is killed; _gone fails what was in flight with
        ``worker-timeout`` and restarts it."""
        with self._cv:
            if c.dead or c.kill_reason is not None or self.child is not c:
                return
            c.kill_reason = ("worker-timeout", why)
            if not self._stopping:
                self.state = "restarting"
                self._cv.notify_all()
        logger.error("%s: %s; killing the worker", self.label, why)
        killpg(c.proc.pid)

    def _lent_hung(self, seconds: float) -> None:
        """Lending saw a prediction on a lent connection running ``seconds``."""
        c = self.child
        if c is not None:
            self.kill_hung(c, f"a request ran longer than the {seconds:g} s request timeout")

    def _watch(self) -> None:
        import psutil

        limit = self.memory_limit_bytes
        while not self._stopping and limit is not None:
            time.sleep(WATCH_INTERVAL)
            c = self.child
            if c is None or c.dead or self.state != "ready":
                continue
            try:
                rss = psutil.Process(c.proc.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                why = f"worker RSS {rss >> 20} MiB exceeded the {limit >> 20} MiB memory limit"
                logger.error("%s: %s; killing it", self.label, why)
                c.kill_reason = ("worker-memory", why)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.proc.pid, signal.SIGKILL)

    def ready_child(self, timeout: float | None) -> Child:
        """The serving child, waiting for a start or restart (bounded)."""
        c = self.child
        if self.state == "ready" and c is not None and not c.dead:
            return c  # the common case, without the Condition
        wait = RESTART_WAIT if timeout is None else timeout
        with self._cv:
            ok = self._cv.wait_for(lambda: self.state in ("ready", "stopped", "failed"), wait)
            c = self.child
            if not ok or self.state != "ready" or c is None or c.dead:
                raise ModelNotReadyError(
                    f"model {self.name} version {self.version} is {self.state}"
                )
            return c


EOF_GRACE_S = 0.5  # a child whose socket closed and that has not exited by then is killed


def phases(spawned: float, stamps: Any) -> dict[str, float]:
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


def killpg(pgid: int) -> None:
    """SIGKILL a child's process group (it is the group's leader): the child if it still
    runs, and everything its run script forked or spawned."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def describe_exit(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"
