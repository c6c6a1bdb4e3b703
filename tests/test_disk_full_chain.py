"""A full disk is recognised wherever its ENOSPC/EDQUOT sits in an exception chain
(agent.errors.disk_full), and the updater raises the cause itself, not a wrapper whose
link to it a re-raise would replace (agent.updater._final_cause)."""

from __future__ import annotations

import errno

import pytest

from agent.errors import (
    ConverterError,
    PreflightError,
    RepositoryError,
    WorkerError,
    causes,
    disk_full,
    human_bytes,
    local_fault,
)
from agent.updater import _final_cause


def _raised(make: object) -> BaseException:
    try:
        make()  # type: ignore[operator]
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def _enospc() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _wrapped_cause() -> None:
    try:
        _enospc()
    except OSError as exc:
        raise ValueError("zstd: write failed") from exc


def _wrapped_context() -> None:
    try:
        _enospc()
    except OSError:
        raise RepositoryError("the download failed", code="repo-tail")  # noqa: B904


def _twice() -> None:
    try:
        _wrapped_context()
    except RepositoryError as exc:
        raise RuntimeError("unpack") from exc


def _quota() -> None:
    raise OSError(errno.EDQUOT, "Disk quota exceeded")


FULL = [_enospc, _wrapped_cause, _wrapped_context, _twice, _quota]


@pytest.mark.parametrize("make", FULL)
def test_full_anywhere_in_the_chain(make: object) -> None:
    exc = _raised(make)
    assert disk_full(exc)
    assert local_fault(exc) == "free disk space in the state directory"
    cause = _final_cause(exc)
    assert isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def test_a_workers_code_counts_and_other_errors_do_not() -> None:
    assert disk_full(WorkerError("disk full in /x while converting", code="disk-full"))
    assert disk_full(ConverterError("disk full", code="disk-full"))
    for exc in (
        OSError(errno.EACCES, "Permission denied"),
        ValueError("bad"),
        ConverterError("exit 1", code="converter-failed"),
    ):
        assert not disk_full(exc)
    pre = PreflightError("not enough disk space", code="disk-space")
    assert _final_cause(pre) is pre


def test_suppressed_context_and_cycles_end_the_walk() -> None:
    try:
        try:
            _enospc()
        except OSError:
            raise ValueError("unrelated") from None
    except ValueError as exc:
        assert not disk_full(exc)  # `from None`: not the cause any more
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert len(causes(a)) == 2 and not disk_full(a)


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.00 GiB",
    ]
