"""One exception tree for all of Edgeward.

Every error carries a stable machine-readable ``code`` (scripts and tests match on it,
so codes never change meaning), an HTTP ``status`` hint used by the socket servers, and
a one-line human message used by the CLI. Raise a subclass with a specific ``code``
where the caller needs to tell failures apart (for example every kind of corrupt
package has its own code).
"""

from __future__ import annotations


class EdgewardError(Exception):
    """Root of every error Edgeward raises on purpose."""

    code = "error"
    status = 500
    exit_code = 1

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def to_dict(self) -> dict[str, object]:
        return {"error": self.message, "code": self.code}


class ConfigError(EdgewardError):
    """A configuration file or option is invalid; the message names the key."""

    code = "config"
    status = 500
    exit_code = 2


# --- packages -----------------------------------------------------------------------


class UsageError(EdgewardError):
    """A command line asks for something unsafe or contradictory (e.g. overwriting)."""

    code = "usage"
    status = 400
    exit_code = 2


class PackageError(EdgewardError):
    """A package (.emp) is malformed, untrusted or unsafe; it is refused whole."""

    code = "package"
    status = 400
    exit_code = 3


class FormatError(PackageError):
    """Bytes do not parse as the documented format (tar, container, header)."""

    code = "format"


class UnsupportedVersionError(FormatError):
    code = "unsupported-version"


class ManifestError(PackageError):
    """The manifest is invalid or disagrees with the package contents."""

    code = "manifest"


class SignatureError(PackageError):
    """Missing, malformed, unknown-signer or failing signature."""

    code = "signature"


class IntegrityError(PackageError):
    """A size or digest does not match what the signed manifest declares."""

    code = "integrity"


class UnsafeEntryError(PackageError):
    """A tar entry would escape the output directory or is not a regular file/dir."""

    code = "unsafe-entry"


class LimitError(PackageError):
    """A configured cap (size, count, length) was exceeded."""

    code = "limit"
    status = 413


class MetaInfoError(PackageError):
    """Meta-info JSON fails its schema; the message names the field."""

    code = "meta-info"


class CryptoError(PackageError):
    """Decryption or key unwrapping failed (wrong key, tampered ciphertext)."""

    code = "crypto"


class StoreError(EdgewardError):
    """The store on disk is unusable or an operation on it is not possible."""

    code = "store"
    status = 500


class KeyFileError(EdgewardError):
    """A key file is missing, malformed or of the wrong kind."""

    code = "key"
    exit_code = 2


# --- residual patches ---------------------------------------------------------------


class ResidualError(PackageError):
    """A residual patch cannot be built or applied."""

    code = "residual"


class BaseMismatchError(ResidualError):
    code = "base-mismatch"


class TargetDigestError(ResidualError):
    code = "target-digest"


# --- runtime ------------------------------------------------------------------------


class RuntimeBackendError(EdgewardError):
    """A backend failed to load or run a model."""

    code = "backend"
    status = 500


class ConverterError(RuntimeBackendError):
    code = "converter"


class RunScriptError(RuntimeBackendError):
    code = "run-script"


class InvalidOutputError(RuntimeBackendError):
    """A model or run script returned something that is not a tensor (e.g. an arbitrary
    object where BYTES elements must be ``str`` or ``bytes``)."""

    code = "invalid-output"


class WorkerError(RuntimeBackendError):
    """A model worker process died or did not answer; the request was not served."""

    code = "worker"
    status = 503


# --- serving ------------------------------------------------------------------------


class InferenceError(EdgewardError):
    code = "inference"
    status = 400


class ModelNotFoundError(InferenceError):
    code = "model-not-found"
    status = 404


class ModelNotReadyError(InferenceError):
    code = "model-not-ready"
    status = 503


class InvalidInputError(InferenceError):
    code = "invalid-input"
    status = 400


class PayloadTooLargeError(InferenceError):
    code = "payload-too-large"
    status = 413


class OverloadedError(InferenceError):
    """The per-model queue is full; the client should retry after ``retry_after`` s."""

    code = "overloaded"
    status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class MethodNotAllowedError(InferenceError):
    """The path exists but not for this method; ``allow`` is the ``Allow`` header."""

    code = "method-not-allowed"
    status = 405
    allow = "GET"


class NotFoundError(InferenceError):
    """No endpoint at this path (the inference and the control sockets)."""

    code = "not-found"
    status = 404


class ProtocolError(EdgewardError):
    """A request that cannot be parsed or received (HTTP framing, body coding): it is
    answered and the connection closed, since the byte stream can no longer be trusted.
    ``retry_after`` (seconds) becomes a ``Retry-After`` header (a refusal for load)."""

    code = "protocol"
    status = 400

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        """Extra response headers (``retry-after`` for a refusal for load)."""
        if self.retry_after is None:
            return None
        return {"retry-after": str(max(1, round(self.retry_after)))}


class SocketInUseError(EdgewardError):
    """Another live process already serves on the socket path."""

    code = "socket-in-use"
    status = 500


# --- control, fleet and command line -------------------------------------------------


class PermissionDeniedError(EdgewardError):
    """The peer on the control socket is not an administrator."""

    code = "forbidden"
    status = 403


class ControlError(EdgewardError):
    """The control socket could not be reached or refused the request."""

    code = "control"
    exit_code = 1


class FleetError(EdgewardError):
    """The broker could not be reached or refused us."""

    code = "fleet"


class CommandError(EdgewardError):
    """A fleet command message that is refused (malformed, oversized, unknown)."""

    code = "mqtt-command"


class CLIInputError(InvalidInputError):
    """A ``--input`` argument or its file is unusable."""

    code = "cli-input"
    exit_code = 2


# --- updates --------------------------------------------------------------------------


class UpdateError(EdgewardError):
    """An update could not be installed; the serving version is unchanged."""

    code = "update"
    status = 500


class PreflightError(UpdateError):
    code = "preflight"


class TransitionError(UpdateError):
    """A transition the update state table does not allow (a bug, never user input)."""

    code = "bad-transition"


# --- repository ---------------------------------------------------------------------


class RepositoryError(UpdateError):
    """The repository, its metadata or a download from it is unusable or untrusted."""

    code = "repository"
    status = 502


# --- whose fault ----------------------------------------------------------------------

#: Error codes whose cause is on this device (its disk, keys, configuration), not in the
#: package: an update failing with one is retried after a backoff and never refused for
#: good. Value: what the operator should fix (shown in the log and the status).
LOCAL_FAULTS: dict[str, str] = {
    "disk-space": "free disk space in the state directory",
    "memory": "free memory or raise the model's memory budget",
    "no-trust": "put the publisher's *.pub key in paths.trust_dir",
    "config": "correct the configuration file and reload (systemctl reload edgeward)",
    "config-key": "correct the configuration file and reload (systemctl reload edgeward)",
    "provider-unavailable": "fix runtime.onnx.providers or install the execution provider",
    "key-missing": "install this device's key in paths.keys_dir",
    "key-read": "make the device key readable by the daemon's user",
    "key-permissions": "chmod 600 the device key, owned by the daemon's user",
    "key-malformed": "replace the device key in paths.keys_dir with a valid one",
    "key-type": "replace the device key in paths.keys_dir with an X25519 key",
    "no-recipient-key": "install this device's key (one the package is encrypted for)",
    "store": "check the state directory (permissions, filesystem)",
    "disk-full": "free disk space in the state directory",
}

#: errno values of an OSError that are about this device, with what to fix.
_LOCAL_ERRNOS: dict[int, str] = {
    28: "free disk space in the state directory",  # ENOSPC
    122: "raise the disk quota of the daemon's user",  # EDQUOT
    13: "fix the permissions of the state, inbox or key directories",  # EACCES
    1: "fix the permissions of the state, inbox or key directories",  # EPERM
    30: "the state directory is on a read-only filesystem",  # EROFS
    5: "the disk reports I/O errors (EIO)",  # EIO
    12: "free memory",  # ENOMEM
    24: "raise the daemon's open-file limit",  # EMFILE
}


#: errno values that mean "the filesystem is full" (ENOSPC, EDQUOT).
_FULL_ERRNOS = frozenset({28, 122})


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or while handling (``__cause__``, else an
    unsuppressed ``__context__``), bounded and cycle-safe."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 16 and all(cur is not c for c in chain):
        chain.append(cur)
        nxt = cur.__cause__
        if nxt is None and not cur.__suppress_context__:
            nxt = cur.__context__
        cur = nxt
    return chain


def human_bytes(n: int) -> str:
    """``n`` bytes for a message: "512 B", "3.4 KiB", "12.0 MiB", "1.50 GiB"."""
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    if n < 1 << 30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` comes down to a full filesystem: an ENOSPC/EDQUOT ``OSError``
    anywhere in its chain (wrapped by a decoder, a thread pool or our own errors), or an
    error already classified ``disk-full`` (a worker's, which crosses processes as a
    code)."""
    for e in causes(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if isinstance(e, EdgewardError) and e.code == "disk-full":
            return True
    return False


def local_fault(exc: BaseException) -> str | None:
    """What to fix on this device when ``exc`` is a local fault, or None when the
    failure is the package's own (it is then refused for good).

    The one place that decides whose fault a failed update is (the updater asks it for
    every source; the repository's transport errors are local too: the link, not the
    package).
    """
    if disk_full(exc):
        return LOCAL_FAULTS["disk-full"]
    if isinstance(exc, EdgewardError):
        if isinstance(exc, RepositoryError):
            return "check the link to the repository"
        if exc.code in LOCAL_FAULTS:
            return LOCAL_FAULTS[exc.code]
        # ConfigError codes are "config-*"; from a worker child they arrive as the code
        # of a WorkerError
        if isinstance(exc, ConfigError) or exc.code.startswith("config"):
            return LOCAL_FAULTS["config"]
        if isinstance(exc, PreflightError):
            return "free the resource the message names"
        cause = exc.__cause__
        return local_fault(cause) if isinstance(cause, OSError) else None
    if isinstance(exc, OSError):
        return _LOCAL_ERRNOS.get(exc.errno or 0)
    return None
