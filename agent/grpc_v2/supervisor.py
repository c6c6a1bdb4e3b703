"""The daemon's side of the gRPC gateway: start the process, restart it if it dies,
stop it on shutdown. Imports neither protobuf nor the HTTP/2 core (the daemon stays
small; see gateway.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from agent.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["GatewayProcess"]

START_TIMEOUT = 30.0  # seconds for the gateway to import protobuf and bind its socket
MAX_BACKOFF = 30.0  # seconds between restarts of a gateway that keeps dying


class GatewayProcess:
    """One ``python -m agent.grpc_v2`` child, kept running while the daemon serves."""

    def __init__(
        self,
        socket_path: Path,
        upstream: Path,
        *,
        mode: int,
        group: str | None,
        max_message_bytes: int,
        max_concurrent: int,
        threads: int,
        timeout: float,
        grace: float,
        max_header_bytes: int = 16 * 1024,
        max_headers: int = 100,
        max_inflight_bytes: int = 256 * 1024 * 1024,
        idle_timeout: float = 75.0,
        header_timeout: float = 10.0,
        log_level: str = "info",
    ) -> None:
        self.socket_path = socket_path
        self.grace = grace
        self.argv = [
            sys.executable,
            "-m",
            "agent.grpc_v2",
            "--socket",
            str(socket_path),
            "--upstream",
            str(upstream),
            "--mode",
            f"{mode:04o}",
            "--group",
            group or "",
            "--max-message-bytes",
            str(max_message_bytes),
            "--max-concurrent",
            str(max_concurrent),
            "--threads",
            str(threads),
            "--timeout",
            str(timeout),
            "--idle-timeout",
            str(idle_timeout),
            "--header-timeout",
            str(header_timeout),
            "--max-header-bytes",
            str(max_header_bytes),
            "--max-headers",
            str(max_headers),
            "--max-inflight-bytes",
            str(max_inflight_bytes),
            "--grace",
            str(grace),
            "--log-level",
            log_level,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        """Spawn and wait until the socket is in place.

        Raises:
            ConfigError: the gateway cannot start (the grpc extra is not installed, the
                socket path or group is wrong); its one-line reason is in the message.
        """
        await self._spawn()
        self._watch = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.strip() != b"READY":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            err = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
            await proc.wait()
            reason = err[-1] if err else f"exited with {proc.returncode}"
            raise ConfigError(f"grpc: the gateway did not start: {reason}", code="grpc-start")
        self.proc = proc
        # Its log lines go to the daemon's journal through our stderr.
        asyncio.get_running_loop().create_task(_relay(proc.stderr))
        logger.info("grpc gateway pid %d serving %s", proc.pid, self.socket_path)

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            proc = self.proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            logger.error("grpc gateway exited with %s; restarting in %.1fs", code, backoff)
            await asyncio.sleep(backoff)
            try:
                await self._spawn()
                backoff = 0.5
            except ConfigError as exc:
                logger.error("%s", exc.message)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def stop(self) -> None:
        """SIGTERM (the gateway drains for ``grace`` seconds), then SIGKILL."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.grace + 2)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _relay(stream: asyncio.StreamReader) -> None:
    while True:
        line = await stream.readline()
        if not line:
            return
        sys.stderr.write(line.decode(errors="replace"))
