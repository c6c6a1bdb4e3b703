"""``edgeward serve PATH...``: try models and write clients without a config or a package.

Like ``tritonserver --model-repository`` or ``mlserver start .``: each PATH is a plain
``.onnx``/``.tflite`` file, an unpacked package directory (``manifest.json``, ``Model/``,
``Meta-info/``) or a signed ``.emp`` (verified against ``--trust``). They are installed
into a temporary state directory and served by the real daemon (same workers, same
KServe v2 socket) on ``./edgeward.sock`` unless ``--socket`` says otherwise. Nothing is
written outside the current directory's socket and the temporary directory, which is
removed on exit (Ctrl-C). A plain model file gets Meta-info generated from the model
itself (``agent.meta.generate``), named after the file, version 1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import UsageError

MODEL_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve``."""
    p = sub.add_parser(
        "serve",
        help="development: serve model files, package directories or .emp files, no config",
        description="Serve PATHs (.onnx/.tflite files, unpacked package directories, .emp "
        "packages with --trust) over KServe v2 on a Unix socket in the current directory.",
    )
    p.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="model file, package dir or .emp"
    )
    p.add_argument(
        "--socket",
        type=Path,
        default=Path("edgeward.sock"),
        metavar="PATH",
        help="inference socket to create (default ./edgeward.sock)",
    )
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="publisher .pub (or directory) that .emp packages must be signed by",
    )
    p.add_argument(
        "--device-key",
        action="append",
        default=[],
        type=Path,
        metavar="K",
        help="device .key / fleet .psk for encrypted .emp packages (repeatable)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="daemon log level (default info)",
    )
    p.set_defaults(func=_serve)


def _name_for(path: Path) -> str:
    """A model name from a file name: the characters the store accepts."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-") or "model"
    return name[:64]


def _stage_model_file(path: Path, dest: Path) -> tuple[str, str, Path]:
    """An unpacked package directory around a bare model file (Meta-info generated)."""
    from agent.meta import generate

    name = _name_for(path)
    d = dest / name
    (d / "Model").mkdir(parents=True)
    (d / "Meta-info").mkdir()
    shutil.copyfile(path, d / "Model" / path.name)
    mgmt, tech = generate(
        name, 1, "edgeward serve", [(path.name, path, MODEL_SUFFIXES[path.suffix])]
    )
    (d / "Meta-info" / "managementinfo.json").write_text(json.dumps(mgmt, indent=2))
    (d / "Meta-info" / "technicalinfo.json").write_text(json.dumps(tech, indent=2))
    (d / "manifest.json").write_text(
        json.dumps({"name": name, "version": "1", "models": [{"name": path.name}]})
    )
    return name, "1", d


def _stage_dir(path: Path, dest: Path) -> tuple[str, str, Path]:
    manifest = path / "manifest.json"
    try:
        doc = json.loads(manifest.read_text())
        name, version = str(doc["name"]), str(doc["version"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{path}: not an unpacked package (needs manifest.json with name and version)",
            code="serve-path",
        ) from None
    d = dest / f"{name}-{version}"
    shutil.copytree(path, d, symlinks=False)
    return name, version, d


def _stage_emp(path: Path, dest: Path, args: argparse.Namespace) -> tuple[str, str, Path]:
    from agent.keys import Keyring, TrustStore
    from agent.package import unpack

    if not args.trust:
        raise UsageError(
            f"{path}: a .emp package is verified before it is served: pass --trust PUB",
            code="serve-trust",
        )
    d = dest / f"{path.name}.d"
    keyring = Keyring.from_paths(args.device_key) if args.device_key else None
    manifest = unpack(path, d, trust=TrustStore.from_paths(args.trust), keyring=keyring)
    return str(manifest.name), str(manifest.version), d


def stage(paths: list[Path], state_dir: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Install every PATH into a fresh store at ``state_dir``; returns (name, version)."""
    from agent.store import Store

    store = Store(state_dir).open()
    staged = Path(tempfile.mkdtemp(prefix="stage-", dir=state_dir))
    served: list[tuple[str, str]] = []
    for path in paths:
        if path.is_dir():
            name, version, d = _stage_dir(path, staged)
        elif path.suffix == ".emp":
            name, version, d = _stage_emp(path, staged, args)
        elif path.suffix in MODEL_SUFFIXES and path.is_file():
            name, version, d = _stage_model_file(path, staged)
        else:
            raise UsageError(
                f"{path}: expected a .onnx or .tflite file, a package directory or a .emp",
                code="serve-path",
            )
        if any(n == name for n, _v in served):
            raise UsageError(f"{path}: a model named {name!r} is already served", code="serve-path")
        store.install(name, version, d)
        store.activate(name, version)
        served.append((name, version))
    shutil.rmtree(staged, ignore_errors=True)
    return served


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from agent.config import (
        Config,
        ControlConfig,
        DaemonConfig,
        InferenceConfig,
        MetricsConfig,
        PathsConfig,
        UpdatesConfig,
    )
    from agent.daemon import Daemon, apply_logging, preflight
    from agent.malloc import tune_malloc
    from agent.serving.http import bind_path

    # Kept relative when given relative: a Unix socket address holds ~100 bytes, and a
    # project directory can be deeper than that; the daemon never changes directory.
    sock: Path = args.socket
    bind_path(sock)  # before staging models: fail fast on a path too long to bind
    tmp = Path(tempfile.mkdtemp(prefix="edgeward-serve-"))
    try:
        state = tmp / "state"
        served = stage(list(args.paths), state, args)
        cfg = Config(
            paths=PathsConfig(
                state_dir=state, inbox_dir=tmp / "inbox", trust_dir=tmp / "trust", keys_dir=None
            ),
            inference=InferenceConfig(socket=sock, mode=0o660, group=None),
            control=ControlConfig(socket=tmp / "control.sock"),
            metrics=MetricsConfig(socket=tmp / "metrics.sock", group=None),
            updates=UpdatesConfig(check_interval=0.0, check_on_start=False),
            daemon=DaemonConfig(log_level=args.log_level),
        )
        preflight(cfg)
        apply_logging(cfg)
        tune_malloc()
        names = ", ".join(f"{n} v{v}" for n, v in served)
        print(f"edgeward serve: {names} on {sock.absolute()}", file=sys.stderr)
        print(
            f"  try: curl --unix-socket {sock} http://localhost/v2/models/{served[0][0]}",
            file=sys.stderr,
        )

        async def _main() -> None:
            await Daemon(cfg).serve()

        asyncio.run(_main())  # SIGINT/SIGTERM: the daemon drains and returns
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
