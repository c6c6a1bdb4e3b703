"""What a model worker may reach: its environment, its user, and its files (Landlock).

A worker runs a package's run script and converter: third-party code (DESIGN §5). The
daemon holds what such code must never have: the device keys (they decrypt every
package), its configuration (the MQTT password file, the repository's credentials), the
store (every other model, in plain text once unpacked) and the control socket. Three
fences keep a worker from them, each cheap (docs/DAEMON.md, "Trust boundaries"):

* :func:`worker_env`: a worker starts with an allow-list environment, not the
  daemon's: a secret the daemon was started with does not reach run scripts.
* :func:`worker_identity`: when the daemon runs as root, workers run as an unprivileged
  user (``daemon.worker_user``; ``edgeward-worker``, else ``nobody``): the key
  directory (0700 root) and the daemon's sockets are closed to them by plain file
  permissions.
* :func:`confine` (in the worker, before the run script is imported): a Landlock
  ruleset that leaves the whole file system as the user may use it *except* a list of
  denied paths (the key directory, the config file, the state directory with the store
  and the inbox), then opens back what the worker needs in there: its own model
  directory (read-only) and the converter cache (read-write). Landlock is an
  unprivileged kernel feature (Linux 5.13+, ``CONFIG_SECURITY_LANDLOCK``), so it works
  for a daemon under systemd (``User=edgeward``) as well; where the kernel lacks it
  the worker says so once and runs without.

Nothing here imports from ``agent``: the worker applies :func:`confine` before anything
else of the package runs.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "AUTO_USERS",
    "Fence",
    "confine",
    "landlock_abi",
    "worker_env",
    "worker_identity",
]


@dataclass(frozen=True)
class Fence:
    """What the daemon asks of one model worker's process (built from ``[daemon]``)."""

    deny: tuple[str, ...] = ()  # paths Landlock closes to it (empty: no Landlock)
    user: str = ""  # daemon.worker_user: "" = the daemon's user, "auto", or a name
    env: tuple[str, ...] = ()  # daemon.worker_env: more variables it inherits


# --- environment ----------------------------------------------------------------------

# Variables a worker inherits from the daemon when they are set. Locale and time zone
# (number formatting, log timestamps), the loader's library path (vendor NPU delegates
# ship .so files outside the system's), the journald stream (log priorities) and the
# daemon's log settings for worker lines.
ENV_ALLOW = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_NUMERIC",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "JOURNAL_STREAM",
    "EDGEWARD_WORKER_LOG",
    "EDGEWARD_LOG_FORMAT",
)
# Thread pools and engines read their tuning from these (onnxruntime, OpenMP, BLAS,
# LiteRT/TensorFlow's logging).
ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "ORT_", "ONNXRUNTIME_", "TF_")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def worker_env(
    environ: Mapping[str, str],
    *,
    home: str,
    pythonpath: str,
    tmpdir: str | None = None,
    extra: Sequence[str] = (),
) -> dict[str, str]:
    """The environment a worker starts with: the allow-list above, the names in
    ``extra`` (``daemon.worker_env``: ``NAME`` or ``PREFIX*``), ``HOME`` = its model
    directory, ``TMPDIR`` as given (else the daemon's), and the interpreter settings the
    worker needs (``PYTHONPATH`` to the package, no bytecode written into the store, no
    user site-packages)."""
    names = set(ENV_ALLOW)
    prefixes = list(ENV_PREFIXES)
    for item in extra:
        if item.endswith("*"):
            prefixes.append(item[:-1])
        else:
            names.add(item)
    env = {
        k: v
        for k, v in environ.items()
        if k in names or any(p and k.startswith(p) for p in prefixes)
    }
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    # onnxruntime >= 1.2x keeps a telemetry device id under $HOME/.cache; HOME is the
    # read-only model directory, and an edge box has no business sending telemetry.
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    env["HOME"] = home
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    env["PYTHONPATH"] = pythonpath
    # Importing a run script must not write __pycache__ into the installed version:
    # the store's integrity check (agent/installed.py) would call that a modification.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


# --- user -------------------------------------------------------------------------------

AUTO_USERS = ("edgeward-worker", "nobody")


def worker_identity(setting: str) -> tuple[int, int, str] | None:
    """(uid, gid, name) workers run as, or None to run them as the daemon's own user.

    Only a daemon running as root changes user (an unprivileged one cannot, and need
    not: it holds nothing root-only). ``""`` keeps the daemon's user; ``"auto"`` takes
    the first of :data:`AUTO_USERS` that exists; any other value names the user (its
    primary group is the worker's group, with no supplementary groups).

    Raises:
        LookupError: the named user does not exist.
    """
    if os.geteuid() != 0 or setting == "":
        return None
    names = AUTO_USERS if setting == "auto" else (setting,)
    for name in names:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid == 0:
            return None  # "root" asked for by name: the same as ""
        return pw.pw_uid, pw.pw_gid, name
    raise LookupError(f"worker user {' or '.join(names)} does not exist")


# --- Landlock ---------------------------------------------------------------------------

_SYS_CREATE_RULESET = 444  # the same number on x86_64 and the generic table (arm64)
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE = 1 << 0
_WRITE_FILE = 1 << 1
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
_REFER = 1 << 13  # ABI 2
_TRUNCATE = 1 << 14  # ABI 3
_IOCTL_DEV = 1 << 15  # ABI 5


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or a seccomp filter, such
    as systemd's ``SystemCallFilter=`` without the landlock calls, refuses them)."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1)
    )
    return max(0, int(v))


def _rights(abi: int) -> tuple[int, int]:
    """(every right on a directory, every right on a file) this ABI knows."""
    full = (1 << 13) - 1
    file = _EXECUTE | _WRITE_FILE | _READ_FILE
    if abi >= 2:
        full |= _REFER
    if abi >= 3:
        full |= _TRUNCATE
        file |= _TRUNCATE
    if abi >= 5:
        full |= _IOCTL_DEV
        file |= _IOCTL_DEV
    return full, file


def _real(paths: Iterable[str]) -> set[str]:
    return {os.path.realpath(p) for p in paths if p}


def plan(deny: Iterable[str]) -> list[tuple[str, bool]]:
    """The paths to grant everything on so that all of the file system but ``deny``
    stays reachable: for every directory above a denied path, each of its entries that
    neither is denied nor leads to one (directories and files; symbolic links are left
    out: they resolve to a place that has its own rule or none). Returns (path, is a
    directory). The directories above a denied path get no rule themselves: entries
    created in them later are not reachable."""
    denied = _real(deny) - {"/"}
    above: set[str] = set()
    for d in denied:
        p = d
        while p != "/":
            p = os.path.dirname(p)
            above.add(p)
    out: list[tuple[str, bool]] = []
    for a in sorted(above):
        try:
            entries = list(os.scandir(a))
        except OSError:
            continue  # a denied path that does not exist yet: nothing to open up here
        for e in entries:
            path = os.path.join(a, e.name)
            if path in denied or path in above:
                continue
            try:
                if e.is_symlink():
                    continue
                out.append((path, e.is_dir(follow_symlinks=False)))
            except OSError:
                continue
    return out


def confine(deny: Sequence[str], read: Sequence[str] = (), write: Sequence[str] = ()) -> int:
    """Restrict this process (and everything it starts) with Landlock: no access to
    anything under ``deny`` except ``read`` (read and execute) and ``write`` (every
    right); the rest of the file system as before. Call it before any other thread
    exists (Landlock restricts the calling thread and its future children).

    Returns the Landlock ABI used, or 0 when the kernel offers none (nothing done).

    Raises:
        OSError: the kernel has Landlock but refused the ruleset (the worker must not
            run half-fenced: it reports the error and exits).
    """
    if not deny:
        return 0
    abi = landlock_abi()
    if abi <= 0:
        return 0
    full, file_rights = _rights(abi)
    read_dir = _EXECUTE | _READ_FILE | _READ_DIR
    read_file = _EXECUTE | _READ_FILE
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.c_uint64(full)  # struct landlock_ruleset_attr, ABI 1 size (handled_access_fs)
    ruleset = int(
        libc.syscall(
            ctypes.c_long(_SYS_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(8),
            ctypes.c_uint32(0),
        )
    )
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        grants = [(p, full if d else file_rights) for p, d in plan(deny)]
        for p in _real(read):
            grants.append((p, read_dir if os.path.isdir(p) else read_file))
        for p in _real(write):
            grants.append((p, full if os.path.isdir(p) else file_rights))
        for path, rights in grants:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # gone since the scan, or not ours to open: stays closed
            try:
                rule = _PathBeneath(rights, fd)
                if libc.syscall(
                    ctypes.c_long(_SYS_ADD_RULE),
                    ctypes.c_int(ruleset),
                    ctypes.c_int(_RULE_PATH_BENEATH),
                    ctypes.byref(rule),
                    ctypes.c_uint32(0),
                ):
                    err = ctypes.get_errno()
                    if err != 22:  # EINVAL: a special file that takes no rule; stays closed
                        raise OSError(err, f"landlock_add_rule {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        if libc.syscall(
            ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return abi
