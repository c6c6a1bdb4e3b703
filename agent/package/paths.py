"""The disk side of reading a package: open an untrusted file without being fooled by
what it is (a FIFO, a device, a link planted in the inbox), cap what is read of small
files, and hand the package stream to the trust-first reader (:mod:`.reader`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from agent.errors import LimitError, PackageError
from agent.keys import TrustStore
from agent.limits import Limits
from agent.manifest import Manifest, signature_key_ids
from agent.package.reader import Opened, Progress, open_stream, verify_stream

logger = logging.getLogger(__name__)


def open_regular(path: Path, *, nofollow: bool = False) -> BinaryIO:
    """Open an untrusted file for reading only if it is a regular file.

    ``O_NONBLOCK`` so a FIFO (or a device behind a link) cannot block the open, then
    ``fstat`` on the descriptor (no race with a swap of the name): anything but a
    regular file is refused before a byte is read. ``nofollow``: a symlink is refused
    too (the daemon's inbox, which others can write).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise PackageError(
                f"{path.name} is a symbolic link; packages must be regular files",
                code="package-not-regular",
            ) from None
        if exc.errno == errno.ENXIO:  # what open() says of a Unix socket
            raise PackageError(
                f"{path.name} is not a regular file (a socket)", code="package-not-regular"
            ) from None
        raise PackageError(f"cannot open {path}: {exc.strerror}", code="package-read") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(
                f"{path.name} is not a regular file ({_file_kind(st.st_mode)})",
                code="package-not-regular",
            )
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: Path, cap: int, what: str, *, nofollow: bool = False) -> bytes:
    """All of a small untrusted file (a regular file of at most ``cap`` bytes)."""
    with open_regular(path, nofollow=nofollow) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(cap + 1) if size <= cap else b""
    if size > cap or len(data) > cap:
        raise LimitError(f"{what} {path.name} is larger than {cap} bytes", code="limit-member-size")
    return data


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_package(
    pkg: Path, limits: Limits, trust: TrustStore | None, *, nofollow: bool = False
) -> Iterator[Opened]:
    """The package file opened (regular files only) with its signature verified."""
    pkg = Path(pkg)
    with open_regular(pkg, nofollow=nofollow) as f:
        size = os.fstat(f.fileno()).st_size
        yield open_stream(f, limits, trust, size=size, name=pkg.name)


def verify(
    pkg: Path,
    trust: TrustStore,
    limits: Limits | None = None,
    *,
    nofollow: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Verify a package file without writing anything (:func:`.reader.verify_stream`).

    Raises:
        PackageError subclasses with specific codes (see docs/PACKAGE.md).
    """
    pkg = Path(pkg)
    with open_regular(pkg, nofollow=nofollow) as f:
        size = os.fstat(f.fileno()).st_size
        opened = verify_stream(f, trust, limits, size=size, name=pkg.name, progress=progress)
    manifest = opened.manifest
    logger.info(
        "verified %s version %d (signed by %s)", manifest.name, manifest.version, opened.signer
    )
    return manifest


def inspect(pkg: Path, limits: Limits | None = None) -> dict[str, Any]:
    """Describe a package without keys: the (unverified) manifest and the signer ids."""
    limits = limits or Limits()
    pkg = Path(pkg)
    with open_package(pkg, limits, None) as opened:
        m = opened.manifest
        doc = m.to_dict()
        doc["package_size"] = pkg.stat().st_size
        doc["signature_key_ids"] = signature_key_ids(opened.signature)
        doc["verified"] = False
        if m.encryption is not None:
            doc["encryption"] = {
                "alg": m.encryption.alg,
                "chunk_size": m.encryption.chunk_size,
                "recipients": [r.get("key_id") for r in m.encryption.recipients],
            }
    return doc


def read_manifest(
    pkg: Path,
    trust: TrustStore | None = None,
    limits: Limits | None = None,
    *,
    nofollow: bool = False,
) -> Manifest:
    """The package's manifest; its signature is verified when ``trust`` is given."""
    with open_package(pkg, limits or Limits(), trust, nofollow=nofollow) as opened:
        return opened.manifest
