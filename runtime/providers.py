"""Check configured ONNX Runtime execution provider names before anything starts.

A misspelled provider must fail at startup (and in ``edgeward config check``), not when
the first package is converted. The names ORT knows come from ORT itself, asked in a
short child process: the daemon never imports onnxruntime (only model workers do), and
importing it just to read a list would keep tens of MB resident in the daemon.
"""

from __future__ import annotations

import json
import subprocess
import sys

from agent.errors import ConfigError
from runtime.config import OnnxOptions

__all__ = ["check_provider_names", "known_providers", "unknown_provider_error"]

CPU = "CPUExecutionProvider"


def unknown_provider_error(name: str, known: set[str] | list[str]) -> ConfigError:
    """The one error for a provider name ORT does not know (a typo, most likely)."""
    return ConfigError(
        f"runtime.onnx.providers: unknown execution provider {name!r}; "
        f"this onnxruntime knows: {', '.join(sorted(known))}"
    )  # code "config": the updater's local_fault() knows it as the device's own fault


def known_providers(timeout: float = 120.0) -> list[str]:
    """``onnxruntime.get_all_providers()``, read in a child process."""
    try:
        res = subprocess.run(
            [sys.executable, "-m", "runtime.providers"],
            capture_output=True,
            timeout=timeout,
            check=True,
        )
        names = json.loads(res.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise ConfigError(
            f"runtime.onnx.providers: cannot ask onnxruntime for its providers: {exc}",
            code="config-runtime",
        ) from None
    return [str(n) for n in names]


def check_provider_names(opts: OnnxOptions) -> None:
    """Raise :class:`ConfigError` naming the first provider ORT does not know.

    The default (CPU only) needs no check and costs nothing.
    """
    if all(p == CPU for p in opts.providers):
        return
    known = set(known_providers())
    for p in opts.providers:
        if p not in known:
            raise unknown_provider_error(p, known)


def _main() -> int:
    import onnxruntime as ort

    print(json.dumps(list(ort.get_all_providers())))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
