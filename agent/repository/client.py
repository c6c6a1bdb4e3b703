"""The device's view of a TUF repository: refresh metadata, list offers, download one.

Trust decisions are python-tuf's (``tuf.ngclient``: root chain, signatures and
thresholds, versions against rollback, expiry against freeze, snapshot against
mix-and-match, length caps against endless data). This module adds what a box on a bad
link needs around them:

* one ``requests`` Session for every request (keep-alive, the configured CA bundle,
  optional client certificate, connect and read timeouts, no redirect to another
  origin, a minimum transfer rate against slow-retrieval);
* metadata persisted with temp file + fsync + rename + fsync(dir) (TUF's own
  persistence does not fsync: a power cut could leave a truncated ``timestamp.json``);
* package downloads into ``staging/<name>-<version>.part`` that resume with HTTP
  ``Range`` after a cut connection, a 5xx or a restart (the expected length and hashes
  live beside it in ``.part.json``), hashed while they stream so the file is read once,
  never longer than the target declares, retried with exponential backoff and jitter.

Layout of a repository URL: ``<url>/metadata/<role>.json`` and ``<url>/targets/<path>``
(content-addressed ``<dir>/<sha256>.<file>`` with consistent snapshots).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.config import RepositoryConfig
from agent.durable import WriteHashPipeline, atomic_write_bytes, fsync_dir
from agent.errors import RepositoryError
from agent.repository.fields import TargetFields

logger = logging.getLogger(__name__)

__all__ = ["Listing", "Offer", "RepositoryClient", "Tail", "TailBroken", "TransferStats"]

_CHUNK = 256 << 10  # bytes per read from the socket
_BATCH = 1 << 20  # bytes gathered before they are written and hashed (on helper threads)
_DEPTH = 8  # batches queued to those threads at most
_SMALL_BODY = 4096  # error bodies up to this are read so the connection stays reusable
_MAX_REDIRECTS = 3
_FSYNC_EVERY = 16 << 20  # bytes of a .part between fsyncs (resume point after power loss)
_MIN_RATE = 512  # bytes/s averaged over read_timeout below which a transfer is cut


@dataclass
class TransferStats:
    """Counters for /metrics and the status (updated from the download thread)."""

    bytes_downloaded: int = 0
    metadata_bytes: int = 0
    resumes: int = 0
    retries: int = 0
    requests: int = 0
    # what is downloading now: name, version, done, total
    progress: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int, *, metadata: bool) -> None:
        with self.lock:
            if metadata:
                self.metadata_bytes += n
            else:
                self.bytes_downloaded += n


@dataclass(frozen=True)
class Offer:
    """One package the repository offers (its TUF target and Edgeward fields)."""

    fields: TargetFields
    path: str  # TUF target path
    length: int
    hashes: dict[str, str]
    url_path: str  # path under <url>/targets/ (hash-prefixed with consistent snapshots)

    def to_dict(self) -> dict[str, Any]:
        f = self.fields
        d: dict[str, Any] = {
            "model": f.model,
            "version": f.version,
            "kind": f.kind,
            "channels": list(f.channels),
            "length": self.length,
        }
        if f.base_version is not None:
            d["base_version"] = f.base_version
        return d


@dataclass
class Listing:
    """The outcome of one metadata refresh."""

    mirror: str
    offers: list[Offer]
    expires: dict[str, float]  # role -> unix time
    skipped: dict[str, str]  # target path -> why it was ignored


class TailBroken(RepositoryError):
    """The download under a :class:`Tail` failed or started over."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="repo-tail")


class Tail:
    """The ``.part`` file read while the download writes it, so a package downloads,
    verifies and unpacks in one pass (agent/updater.py).

    The downloader says how many leading bytes of the file are written for good
    (:meth:`advance`) and how the download ended (:meth:`finish`, after the target's
    length and hashes checked): :meth:`read` blocks until bytes are there and reports the
    end of the file only after that check, so whatever reads the tail cannot finish on
    bytes the signed metadata does not vouch for. When the download starts over (a
    server that ignores ``Range``) the bytes read so far may not be the final ones: the
    reader fails (:class:`TailBroken`) and the caller unpacks the finished file instead.
    ``stopping``: polled while waiting (the daemon is stopping: give up).
    """

    def __init__(self, part: Path, stopping: Callable[[], bool] | None = None) -> None:
        self.part = part
        self._stopping = stopping
        self._cv = threading.Condition()
        self._avail = 0  # leading bytes of the file written for good
        self._end = False  # the download finished and verified
        self._error: str | None = None
        self._pos = 0
        self._fd: int | None = None
        #: set by the reader when it gave up for a reason the rest of the download
        #: cannot cure (the disk is full): the downloader stops at its next piece
        self.abandoned: str | None = None

    # the downloader's side

    def advance(self, written: int) -> None:
        with self._cv:
            if written > self._avail:
                self._avail = written
                self._cv.notify_all()

    def restart(self) -> None:
        self.finish("the download started over")

    def finish(self, error: str | None = None) -> None:
        with self._cv:
            if error is None:
                self._end = True
            elif self._error is None:
                self._error = error
            self._cv.notify_all()

    # the reader's side

    def abandon(self, why: str) -> None:
        """Tell the downloader to stop (it raises ``repo-abandoned``, keeping the
        ``.part`` for a later resume)."""
        self.abandoned = why

    def read(self, n: int | None = -1) -> bytes:
        with self._cv:
            while self._error is None and self._avail <= self._pos and not self._end:
                if self._stopping is not None and self._stopping():
                    raise TailBroken("the daemon is stopping")
                self._cv.wait(0.5)
            if self._error is not None:
                raise TailBroken(self._error)
            k = self._avail - self._pos
        if k == 0:
            return b""
        if n is not None and n >= 0:
            k = min(k, n)
        if self._fd is None:
            self._fd = os.open(self.part, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(self._fd, k, self._pos)
        if len(data) != k:
            raise TailBroken(f"{self.part.name} is shorter than the download reported")
        self._pos += k
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Cut(Exception):
    """A transfer broke in a way worth resuming (connection, timeout, 5xx)."""


class RequestsFetcher(FetcherInterface):
    """tuf's fetcher interface over one ``requests`` Session (also used for packages)."""

    def __init__(self, cfg: RepositoryConfig, stats: TransferStats) -> None:
        self.cfg = cfg
        self.stats = stats
        s = requests.Session()
        s.verify = str(cfg.ca_bundle) if cfg.ca_bundle is not None else True
        if cfg.client_cert is not None and cfg.client_key is not None:
            s.cert = (str(cfg.client_cert), str(cfg.client_key))
        s.headers["User-Agent"] = "edgeward"
        s.headers["Accept-Encoding"] = "identity"  # lengths are of the bytes on the wire
        s.trust_env = False  # no proxy or netrc from the environment of a system service
        self.session = s

    def close(self) -> None:
        self.session.close()

    def get(self, url: str, headers: dict[str, str] | None = None) -> requests.Response:
        """GET with timeouts; same-origin redirects followed (bounded), others refused."""
        origin = (*urlsplit(url)[:2], urlsplit(url).port)
        for _ in range(_MAX_REDIRECTS + 1):
            self.stats.requests += 1
            resp = self.session.get(
                url,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(self.cfg.connect_timeout, self.cfg.read_timeout),
            )
            if resp.status_code not in (301, 302, 303, 307, 308):
                return resp
            loc = resp.headers.get("Location", "")
            resp.close()
            nxt = urljoin(url, loc)
            parts = urlsplit(nxt)
            if (*parts[:2], parts.port) != origin:
                raise RepositoryError(
                    f"{url} redirects to another origin ({parts.scheme}://{parts.netloc}); refused",
                    code="repo-redirect",
                )
            url = nxt
        raise RepositoryError(f"{url}: more than {_MAX_REDIRECTS} redirects", code="repo-redirect")

    def chunks(self, resp: requests.Response, *, metadata: bool) -> Iterator[bytes]:
        """The body in pieces; a transfer slower than the floor is cut (slow retrieval)."""
        window_start = time.monotonic()
        window_bytes = 0
        floor = _MIN_RATE * self.cfg.read_timeout
        raw = resp.raw
        while True:
            # read1: whatever one recv gives, so a trickling server is seen trickling
            # (read(n) would wait for n bytes, and the read timeout never fires)
            try:
                piece = raw.read1(_CHUNK, decode_content=False)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise requests.exceptions.ReadTimeout(str(exc)) from None
            except (urllib3.exceptions.ProtocolError, OSError) as exc:
                raise requests.exceptions.ConnectionError(str(exc)) from None
            if not piece:
                return
            self.stats.add(len(piece), metadata=metadata)
            window_bytes += len(piece)
            now = time.monotonic()
            if now - window_start >= self.cfg.read_timeout:
                if window_bytes < floor:
                    resp.close()
                    raise RepositoryError(
                        f"{resp.url}: {window_bytes} bytes in {now - window_start:.0f}s, "
                        f"below {_MIN_RATE} B/s; transfer cut (slow-retrieval)",
                        code="repo-slow",
                    )
                window_start, window_bytes = now, 0
            yield piece

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self.get(url)
        except requests.RequestException as exc:
            raise tuf_exc.DownloadError(f"{url}: {_why(exc)}") from None
        if resp.status_code != 200:
            _drain_small(resp, self.stats)
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {resp.status_code}", resp.status_code)
        return self._guarded(resp)

    def _guarded(self, resp: requests.Response) -> Iterator[bytes]:
        try:
            yield from self.chunks(resp, metadata=True)
        except requests.RequestException as exc:
            raise tuf_exc.DownloadError(f"{resp.url}: {_why(exc)}") from None
        finally:
            resp.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS verification failed: {exc}"
    if isinstance(exc, (requests.exceptions.ReadTimeout, requests.exceptions.ConnectTimeout)):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _drain_small(resp: requests.Response, stats: TransferStats) -> None:
    """Read a short error body so keep-alive survives; close on anything longer."""
    try:
        n = int(resp.headers.get("Content-Length", "-1"))
        if 0 <= n <= _SMALL_BODY:
            stats.add(len(resp.content), metadata=True)
    except (ValueError, requests.RequestException):
        pass
    finally:
        resp.close()


class _DurableUpdater(Updater):
    """tuf's Updater with metadata written durably (fsync file and directory)."""

    def _persist_file(self, filename: str, data: bytes) -> None:
        atomic_write_bytes(Path(filename), data)

    def top_level_targets(self) -> dict[str, TargetFile]:
        """Targets of the verified top-level targets role (delegations are not used)."""
        return dict(self._trusted_set.targets.targets)

    def consistent(self) -> bool:
        return bool(self._trusted_set.root.consistent_snapshot)

    def expiries(self) -> dict[str, float]:
        ts = self._trusted_set
        out: dict[str, float] = {"root": _unix(ts.root.expires)}
        for role in ("timestamp", "snapshot", "targets"):
            if role in ts:
                out[role] = _unix(ts[role].expires)
        return out


def _unix(dt: datetime) -> float:
    return dt.timestamp()


class RepositoryClient:
    """Refresh and download against the configured mirrors (blocking; run in a thread)."""

    def __init__(self, cfg: RepositoryConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.metadata_dir = state_dir / "repository" / "metadata"
        self.stats = TransferStats()
        self.fetcher = RequestsFetcher(cfg, self.stats)
        self._sleep: Callable[[float], None] = time.sleep

    def close(self) -> None:
        self.fetcher.close()

    def _root(self) -> bytes:
        try:
            data = self.cfg.root.read_bytes()
        except OSError as exc:
            raise RepositoryError(
                f"repository.root: cannot read the trusted root {self.cfg.root}: {exc.strerror}",
                code="repo-root",
            ) from None
        if len(data) > self.cfg.max_metadata_bytes:
            raise RepositoryError(
                f"{self.cfg.root} is larger than max_metadata_bytes", code="repo-root"
            )
        return data

    def _updater(self, url: str) -> _DurableUpdater:
        base = url if url.endswith("/") else url + "/"
        cap = self.cfg.max_metadata_bytes
        config = UpdaterConfig(
            root_max_length=cap,
            timestamp_max_length=min(cap, 64 << 10),
            snapshot_max_length=cap,
            targets_max_length=cap,
        )
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            return _DurableUpdater(
                str(self.metadata_dir),
                base + "metadata/",
                target_base_url=base + "targets/",
                fetcher=self.fetcher,
                config=config,
                bootstrap=self._root(),
            )
        except tuf_exc.RepositoryError as exc:
            raise RepositoryError(
                f"repository.root {self.cfg.root} is not a valid root: {exc}", code="repo-root"
            ) from None

    def refresh(self) -> Listing:
        """Update the trusted metadata from the first mirror that gives a valid set.

        Raises:
            RepositoryError: every mirror failed; the message names each reason
                (``repo-metadata`` for a trust failure, ``repo-download`` for transport).
        """
        errors: list[RepositoryError] = []
        for url in self.cfg.urls:
            try:
                up = self._updater(url)
                up.refresh()
            except tuf_exc.DownloadError as exc:
                errors.append(RepositoryError(f"{url}: {_root_cause(exc)}", code="repo-download"))
                continue
            except tuf_exc.RepositoryError as exc:
                errors.append(
                    RepositoryError(
                        f"{url}: metadata refused ({type(exc).__name__}: {exc})",
                        code="repo-metadata",
                    )
                )
                continue
            except RepositoryError as exc:
                errors.append(exc)
                continue
            offers, skipped = self._offers(up)
            return Listing(url, offers, up.expiries(), skipped)
        if len(errors) == 1:
            raise errors[0]
        raise RepositoryError(
            "; ".join(e.message for e in errors), code=errors[0].code if errors else "repo"
        )

    def _offers(self, up: _DurableUpdater) -> tuple[list[Offer], dict[str, str]]:
        offers: list[Offer] = []
        skipped: dict[str, str] = {}
        consistent = up.consistent()
        for path, tf in sorted(up.top_level_targets().items()):
            try:
                fields = TargetFields.from_custom(tf.custom)
            except RepositoryError as exc:
                skipped[path] = exc.message
                logger.warning("repository target %s ignored: %s", path, exc.message)
                continue
            if tf.length > self.cfg.max_download_bytes:
                skipped[path] = f"{tf.length} bytes exceeds max_download_bytes"
                continue
            if "sha256" not in tf.hashes:
                skipped[path] = "no sha256 hash"
                continue
            url_path = path
            if consistent:
                d, sep, base = path.rpartition("/")
                url_path = f"{d}{sep}{tf.hashes['sha256']}.{base}"
            offers.append(Offer(fields, path, tf.length, dict(tf.hashes), url_path))
        return offers, skipped

    # --- packages ------------------------------------------------------------------

    def download(self, offer: Offer, part: Path, tail: Tail | None = None) -> Path:
        """Fetch ``offer`` into ``part`` (resuming it) and check length and hashes.

        Returns ``part`` complete and verified against the target. A hash mismatch
        deletes the file (the next attempt starts over); a cut transfer keeps it.
        ``tail``: told of every byte written for good and of the outcome (a reader
        follows the file).

        Raises:
            RepositoryError: ``repo-length`` (longer than declared), ``repo-hash``,
                ``repo-download`` (retries exhausted), ``repo-redirect``, ``repo-slow``.
        """
        try:
            out = self._download(offer, part, tail)
        except BaseException as exc:
            if tail is not None:
                tail.finish(f"the download failed: {exc}")
            raise
        if tail is not None:
            tail.finish()
        return out

    def _download(self, offer: Offer, part: Path, tail: Tail | None) -> Path:
        sidecar = part.with_name(part.name + ".json")
        expect = {"path": offer.path, "length": offer.length, "hashes": offer.hashes}
        hashers = {alg: hashlib.new(alg) for alg in offer.hashes}
        pos = _resume_point(part, sidecar, expect, hashers)
        if pos == 0:
            part.unlink(missing_ok=True)
            atomic_write_bytes(sidecar, json.dumps(expect, sort_keys=True).encode())
            part.touch()
        elif pos < offer.length:
            self.stats.resumes += 1
            logger.info("resuming %s at byte %d of %d", part.name, pos, offer.length)
        if tail is not None:
            tail.advance(pos)
        f = offer.fields
        self.stats.progress = {
            "model": f.model,
            "version": f.version,
            "kind": f.kind,
            "done": pos,
            "total": offer.length,
        }
        attempt = 0
        delay = self.cfg.backoff_s
        last = ""
        while pos < offer.length:
            for url in self.cfg.urls:
                base = url if url.endswith("/") else url + "/"
                try:
                    pos = self._range(
                        base + "targets/" + offer.url_path, part, pos, offer, hashers, tail=tail
                    )
                    break
                except _Cut as exc:
                    last = str(exc)
                    logger.warning("download of %s cut at byte %d: %s", part.name, pos, last)
            else:
                attempt += 1
                if attempt > self.cfg.retries:
                    raise RepositoryError(
                        f"download of {offer.path} failed after {attempt} attempts at byte "
                        f"{pos} of {offer.length}: {last}",
                        code="repo-download",
                    )
                self.stats.retries += 1
                wait = min(delay, self.cfg.backoff_max_s) * random.uniform(0.5, 1.5)  # noqa: S311
                logger.info("retrying %s in %.1fs (attempt %d)", offer.path, wait, attempt + 1)
                self._sleep(wait)
                delay *= 2
                if pos > 0:
                    self.stats.resumes += 1
        for alg, h in hashers.items():
            if h.hexdigest() != offer.hashes[alg]:
                part.unlink(missing_ok=True)
                sidecar.unlink(missing_ok=True)
                raise RepositoryError(
                    f"{offer.path}: {alg} of the download does not match the signed target "
                    "metadata; deleted",
                    code="repo-hash",
                )
        return part

    def _range(
        self,
        url: str,
        part: Path,
        pos: int,
        offer: Offer,
        hashers: dict[str, Any],
        *,
        tail: Tail | None = None,
    ) -> int:
        """One GET from ``pos``; returns the new position. Raises _Cut to retry."""
        headers = {"Range": f"bytes={pos}-"} if pos else None
        try:
            resp = self.fetcher.get(url, headers)
        except requests.RequestException as exc:
            raise _Cut(_why(exc)) from None
        with contextlib.closing(resp):
            if resp.status_code >= 500 or resp.status_code == 429:
                _drain_small(resp, self.stats)
                raise _Cut(f"HTTP {resp.status_code}")
            if pos and resp.status_code == 200:
                logger.info("%s: the server ignored Range; starting over", url)
                pos = 0
                if tail is not None:
                    tail.restart()
                for alg in hashers:
                    hashers[alg] = hashlib.new(alg)
            elif resp.status_code == 416:
                raise _Cut("HTTP 416 (range not satisfiable)")
            elif resp.status_code not in (200, 206):
                _drain_small(resp, self.stats)
                raise RepositoryError(f"{url}: HTTP {resp.status_code}", code="repo-download")
            if resp.status_code == 206:
                start = _range_start(resp.headers.get("Content-Range", ""))
                if start != pos:
                    raise _Cut(f"Content-Range starts at {start}, asked {pos}")
            remaining = offer.length - pos
            announced = resp.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) > remaining:
                raise RepositoryError(
                    f"{offer.path}: the server sends {int(announced) + pos} bytes, the signed "
                    f"metadata declares {offer.length}; refused (endless data)",
                    code="repo-length",
                )
            # Pieces (one TLS record, 16 KiB, per read1) are gathered into _BATCH-sized
            # blocks that two helper threads write and hash (both release the GIL), so the
            # socket keeps being read meanwhile; the periodic fsync runs on them too.
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            sink = WriteHashPipeline(_DEPTH, name="download")
            hashing = _Hashers(hashers)
            pending: list[bytes] = []
            npending = 0
            written = pos  # queued to the sink (the file once it finishes)
            try:
                os.ftruncate(fd, pos)
                os.lseek(fd, pos, os.SEEK_SET)
                synced = pos
                try:
                    for piece in self.fetcher.chunks(resp, metadata=False):
                        if tail is not None and tail.abandoned is not None:
                            raise RepositoryError(
                                f"download of {offer.path} stopped at byte {pos}: {tail.abandoned}",
                                code="repo-abandoned",
                            )
                        if len(piece) > offer.length - pos:
                            raise RepositoryError(
                                f"{offer.path}: the server sends more than the {offer.length} "
                                "bytes the signed metadata declares; refused (endless data)",
                                code="repo-length",
                            )
                        pending.append(piece)
                        npending += len(piece)
                        pos += len(piece)
                        self.stats.progress["done"] = pos
                        if npending >= _BATCH:
                            sink.write(fd, b"".join(pending), hashing)
                            written += npending
                            pending, npending = [], 0
                            if tail is not None:  # once the batch is in the file
                                sink.call(functools.partial(tail.advance, written))
                            if written - synced >= _FSYNC_EVERY:
                                sink.call(functools.partial(os.fsync, fd))
                                synced = written
                except requests.RequestException as exc:
                    raise _Cut(_why(exc)) from None
                except RepositoryError as exc:
                    if exc.code != "repo-slow":
                        raise
                    raise _Cut(exc.message) from None
                finally:
                    # what arrived before a cut is kept: written, hashed, synced
                    if pending and not sink.stopped and sink.error is None:
                        sink.write(fd, b"".join(pending), hashing)
                    sink.finish()
                    if tail is not None:
                        tail.advance(pos)
                    os.fsync(fd)
            finally:
                sink.stop()
                os.close(fd)
            if pos < offer.length:
                raise _Cut(f"connection closed at byte {pos} of {offer.length}")
        fsync_dir(part.parent)
        return pos


class _Hashers:
    """Several hashlib objects updated as one (the sink's hashing thread feeds them)."""

    def __init__(self, hashers: dict[str, Any]) -> None:
        self._hashers = hashers

    def update(self, data: Any, /) -> None:
        for h in self._hashers.values():
            h.update(data)


def _range_start(value: str) -> int:
    # "bytes 100-999/1000"
    try:
        return int(value.split()[1].split("-", maxsplit=1)[0])
    except (IndexError, ValueError):
        return -1


def _resume_point(
    part: Path, sidecar: Path, expect: dict[str, Any], hashers: dict[str, Any]
) -> int:
    """Bytes of ``part`` to keep (hashed into ``hashers``), or 0 to start over."""
    try:
        recorded = json.loads(sidecar.read_bytes())
        size = part.stat().st_size
    except (OSError, ValueError):
        return 0
    if recorded != expect or size > int(expect["length"]):
        return 0
    with open(part, "rb") as fh:
        while piece := fh.read(1 << 20):
            for h in hashers.values():
                h.update(piece)
    return size


def _root_cause(exc: BaseException) -> str:
    parts = [str(exc)]
    cause = exc.__cause__
    while cause is not None and len(parts) < 4:
        parts.append(_why(cause) if isinstance(cause, requests.RequestException) else str(cause))
        cause = cause.__cause__
    return ": ".join(p for p in parts if p)
