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


class UpdateError(EdgewardError):
    """An update could not be installed; the serving version is unchanged."""

    code = "update"
    status = 500


class PreflightError(UpdateError):
    code = "preflight"


# --- repository ---------------------------------------------------------------------


class RepositoryError(UpdateError):
    """The repository, its metadata or a download from it is unusable or untrusted."""

    code = "repository"
    status = 502
