"""Durability: the one room where the agent makes bytes survive a crash or a power cut.

Everything that writes state (store, package unpack and pack, residual patches, the
converter cache, keys, the TUF repository and client, the CLI) goes through these
primitives, so the crash-safety promise (DESIGN §4) can be audited here.

The argument, for POSIX file systems with ordered metadata (ext4 ``data=ordered``,
xfs, btrfs, f2fs):

1. **Data before name.** New content is written to a temporary entry *in the directory
   of its final name* (same file system, so the rename below is atomic), then
   ``fsync``\\ ed. Only after that fsync returns is the entry renamed over its final
   name. A crash before the rename leaves the old file (or nothing) under the final
   name plus a temporary entry that its owner removes on the next start (``.tmp-*``,
   ``*.part``, ``*.partial``); a crash after it leaves the complete new file.
2. **Name before success.** ``rename`` changes the directory, not the file: until the
   directory is fsynced, a power cut may roll the rename back. So every rename (and
   every new entry whose existence matters) is followed by an fsync of the parent
   directory before the operation reports success. :func:`atomic_replace` does both.
3. **Trees are synced bottom up.** A directory tree that appears by one rename
   (an unpacked version, a converter cache entry) has every file and directory in it
   fsynced first (:func:`fsync_tree`, or per file as it is written), so the rename
   publishes a tree whose every byte is already on disk.
4. **Short writes are not errors.** ``os.write`` may write less than asked (signals,
   pipes, quotas near full): :func:`write_all` loops until all bytes are written or
   raises. A full disk raises ``OSError`` (ENOSPC) *before* the rename, so the old
   version stays.
5. **Nothing follows a planted link.** Temporary files are created new (``O_EXCL``,
   by ``mkstemp``) with their mode set through the descriptor, and ``rename`` replaces
   the entry at the final name whatever it is (a symlink is replaced, not written
   through); this is what lets the daemon write into a directory others can write.

A writer that streams into a descriptor of its own (unpack, the residual apply, a
resumable download) fsyncs that descriptor itself before handing the name to
:func:`atomic_replace`: step 1 is then its own ``os.fsync`` call, step 2 is here.

What is deliberately *not* synced (``sync=False``): bookkeeping whose loss only costs a
counter (the converter cache's hit count). Losing it is harmless; an fsync per cache
hit is not free. Sockets renamed into place by the servers (agent/serving/http.py, the
gRPC gateway) are not state: they do not outlive the process, so they are not here.

The helper threads at the end (:class:`HashThread`, :class:`WriteHashPipeline`) move
``os.write`` and SHA-256 (both release the GIL) off the decoding thread; they never
change what is written or in which order, only when.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

__all__ = [
    "HashThread",
    "WriteHashPipeline",
    "atomic_file",
    "atomic_replace",
    "atomic_write_bytes",
    "discard_tree",
    "failpoint",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "symlink_atomic",
    "unlink_durable",
    "write_all",
]


def fsync_dir(path: Path | str, *, best_effort: bool = False) -> None:
    """fsync a directory so a rename or new entry in it survives power loss (step 2).

    ``best_effort``: a cache that is rebuilt when lost ignores a failing fsync.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path | str) -> None:
    """fsync a file written by someone else (a library) before it is published."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, bottom up enough for a rename of
    ``root`` to publish only synced bytes (step 3). Symlinks are not followed."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


def write_all(fd: int, data: Any) -> None:
    """Write all of ``data`` (bytes, memoryview or a contiguous array) to ``fd`` (step 4).

    Goes through a byte view, so nothing is copied and short writes are resumed.
    """
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def atomic_replace(src: Path | str, dst: Path | str) -> None:
    """Rename ``src`` (already synced) over ``dst`` and fsync ``dst``'s directory (steps 1–2).

    Works for files and for directories (an empty directory at ``dst`` is replaced).
    """
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_file(
    path: Path | str,
    *,
    mode: int = 0o644,
    prefix: str | None = None,
    suffix: str = "",
    sync: bool = True,
) -> Iterator[BinaryIO]:
    """Write ``path`` whole or not at all: yields a new temporary file beside it.

    On a clean exit the file is flushed, given ``mode``, fsynced (unless ``sync`` is
    false) and renamed over ``path``, and the directory is fsynced; on an exception the
    temporary file is removed and ``path`` is untouched. The temporary name is
    ``.tmp-*`` unless ``prefix``/``suffix`` say otherwise (owners clean their own).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=".tmp-" if prefix is None else prefix, suffix=suffix, dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


def atomic_write_bytes(
    path: Path | str,
    data: bytes,
    mode: int = 0o644,
    *,
    sync: bool = True,
    prefix: str | None = None,
) -> None:
    """Replace ``path`` with ``data``: temp file in the same dir, fsync, rename, fsync dir.

    Never follows a link someone else planted (step 5), so this is also how the daemon
    writes into a directory others can write (the inbox).
    """
    with atomic_file(path, mode=mode, sync=sync, prefix=prefix) as fh:
        fh.write(data)


def symlink_atomic(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` by renaming a fresh symlink over it, then fsync the
    directory: a reader sees the old target or the new one, never no link."""
    tmp = link.parent / f".tmp-{link.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(link.parent)


def discard_tree(path: Path, doomed: Path, *, sync: bool = True) -> None:
    """Delete a directory so a crash never leaves it half-deleted under its own name:
    rename it to ``doomed`` (a name its owner removes at start), then delete that."""
    import shutil

    os.replace(path, doomed)
    if sync:
        fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def unlink_durable(path: Path) -> bool:
    """Remove the entry ``path`` (a link is removed, not followed) and fsync its directory,
    so the removal survives a power cut. Returns False when there was nothing to remove."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def failpoint(name: str) -> None:
    """Die here with SIGKILL, as a power cut would, when ``EDGEWARD_FAILPOINT`` names this
    point. The crash-recovery tests put a real ``kill -9`` between two durable steps
    this way (tests/test_repo_device_health.py); unset, it costs one dictionary lookup."""
    if os.environ.get("EDGEWARD_FAILPOINT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --- helper threads -------------------------------------------------------------------


class _Hash(Protocol):
    def update(self, data: Any, /) -> None: ...


class HashThread:
    """SHA-256 on a helper thread (hashlib releases the GIL), so hashing stored bytes
    overlaps with decrypting and decompressing them. At most ``depth`` pieces wait."""

    def __init__(self, depth: int = 8, *, name: str = "hash") -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (piece := self._q.get()) is not None:
            self._h.update(piece)

    def update(self, data: bytes) -> None:
        self._q.put(data)

    def hexdigest(self) -> str:
        """Wait for the queued pieces; idempotent (also the way to stop the thread)."""
        if self._digest is None:
            self._q.put(None)
            self._thread.join()
            self._digest = self._h.hexdigest()
        return self._digest


class WriteHashPipeline:
    """Output chunks go through two helper threads: one writes them (``os.write`` from
    the caller's buffer, no copy), the next hashes them and then runs the chunk's
    ``done`` callback (a buffer pool takes its buffer back there). ``os.write`` and
    SHA-256 release the GIL, so both overlap the decoding on the calling thread; each
    queue holds at most ``depth`` chunks, which bounds the extra memory. A chunk must
    not be modified once queued. The first write or hash error is re-raised on the
    calling thread by the next call (or :meth:`finish`); after it nothing more is
    written.
    """

    def __init__(self, depth: int, *, name: str = "durable") -> None:
        self._wq: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self._hq: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._abandon = False
        self._threads = [
            threading.Thread(target=self._write, name=f"{name}-write", daemon=True),
            threading.Thread(target=self._hash, name=f"{name}-hash", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _write(self) -> None:
        while (task := self._wq.get()) is not None:
            if task[0] is not None and self.error is None and not self._abandon:
                try:
                    write_all(task[0], task[1])
                except BaseException as exc:  # handed to the caller in check()
                    self.error = exc
            self._hq.put(task)
            del task
        self._hq.put(None)

    def _hash(self) -> None:
        while (task := self._hq.get()) is not None:
            _fd, data, sha, done = task
            if self.error is None and not self._abandon:
                try:
                    if sha is not None:
                        sha.update(data)
                    if done is not None and data is None:
                        done()
                except BaseException as exc:
                    self.error = exc
            if done is not None and data is not None:
                done()  # buffer bookkeeping: runs on every path
            del task, data

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def write(
        self,
        fd: int,
        data: Any,
        sha: _Hash | None = None,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``data`` for ``fd``; hash it into ``sha`` after it is written, then call
        ``done`` (always, also when an error stopped the pipeline)."""
        self.check()
        self._wq.put((fd, data, sha, done))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the hashing thread once everything queued before it is hashed."""
        self.check()
        self._wq.put((None, None, None, fn))

    def _join(self) -> None:
        self._wq.put(None)
        for t in self._threads:
            t.join()

    def finish(self) -> None:
        """Wait for every queued chunk; re-raise a write or hashing error."""
        if self._threads[1].is_alive():
            self._join()
        self.check()

    def stop(self) -> None:
        """Drop what is queued (error path) and wait for the threads (idempotent)."""
        if self._threads[1].is_alive():
            self._abandon = True
            self._join()

    @property
    def stopped(self) -> bool:
        return not self._threads[1].is_alive()
