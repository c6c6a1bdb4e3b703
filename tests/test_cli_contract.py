"""The CLI contract every command keeps (DESIGN §6): help on every option, --version,
--json where scripts read output, --force before overwriting, quiet on a closed pipe,
progress bars on a terminal's stderr that end at 100 %."""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent import __version__
from agent.cli import build_parser, main

EXE = [sys.executable, "-m", "agent"]
# Commands whose output a script reads: each must offer --json.
JSON_COMMANDS = (
    "keygen", "pack", "inspect", "verify", "unpack", "diff", "patch", "digest",
    "status", "models", "check", "rollback", "infer", "config check",
)  # fmt: skip


def _walk(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(prefix.strip(), parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.extend(_walk(sub, f"{prefix} {name}"))
    return out


def test_every_option_of_every_command_has_help() -> None:
    missing = []
    commands = _walk(build_parser())
    assert len(commands) > 15
    for name, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(
                    f"{name or 'edgeward'} {'/'.join(action.option_strings) or action.dest}"
                )
    assert not missing, "options without help: " + ", ".join(missing)


def test_json_wherever_a_script_reads_output() -> None:
    commands = dict(_walk(build_parser()))
    for name in JSON_COMMANDS:
        opts = {o for a in commands[name]._actions for o in a.option_strings}
        assert "--json" in opts, name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"edgeward {__version__}"


def _package(tmp: Path) -> tuple[Path, Path, Path]:
    assert main(["keygen", "--kind", "signing", "--out", str(tmp / "sign")]) == 0
    model = tmp / "w.bin"
    model.write_bytes(np.arange(300_000, dtype=np.float32).tobytes())
    pkg = tmp / "p.emp"
    args = ["pack", "--model", str(model), "--name", "c", "--version", "1"]
    args += ["--signing-key", str(next((tmp / "sign").glob("*.key"))), "-o", str(pkg)]
    assert main(args) == 0
    return pkg, model, tmp / "sign"


def test_outputs_are_replaced_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg, model, sign = _package(tmp_path)
    capsys.readouterr()
    before = pkg.read_bytes()
    args = ["pack", "--model", str(model), "--name", "c", "--version", "2"]
    args += ["--signing-key", str(next(sign.glob("*.key"))), "-o", str(pkg)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeward: error [output-exists]:") and "--force" in err
    assert pkg.read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert pkg.read_bytes() != before

    out = tmp_path / "u"
    unpack = ["unpack", str(pkg), "--trust", str(sign), "-o", str(out)]
    assert main(unpack) == 0
    (out / "stale").write_text("x")
    assert main(unpack) == 2
    assert (out / "stale").exists()
    assert main([*unpack, "--force"]) == 0
    assert not (out / "stale").exists() and (out / "Model" / "w.bin").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".u.")]

    assert main(["keygen", "--kind", "fleet", "--name", "f", "--out", str(tmp_path / "k")]) == 0
    psk = (tmp_path / "k" / "f.psk").read_bytes()
    assert main(["keygen", "--kind", "fleet", "--name", "f", "--out", str(tmp_path / "k")]) != 0
    assert (tmp_path / "k" / "f.psk").read_bytes() == psk
    assert (
        main(["keygen", "--kind", "fleet", "--name", "f", "--out", str(tmp_path / "k"), "--force"])
        == 0
    )
    assert (tmp_path / "k" / "f.psk").read_bytes() != psk
    assert (tmp_path / "k" / "f.psk").stat().st_mode & 0o777 == 0o600


@pytest.mark.e2e
def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    pkg, _model, _sign = _package(tmp_path)
    for _ in range(5):  # the race the issue saw was intermittent: close early, repeatedly
        proc = subprocess.Popen(
            [*EXE, "inspect", str(pkg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line is written
        err = proc.stderr.read()
        rc = proc.wait(timeout=60)
        assert err == b"", err
        assert rc in (0, 141)
    res = subprocess.run(
        f"{' '.join(EXE)} inspect {pkg} | head -1",
        check=False,
        shell=True,
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stderr == b"", res.stderr
    assert res.stdout.startswith(b"package   c version 1")


def _run_on_tty(args: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (stdout a pipe); return (rc, terminal text)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 1.0)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    rc = proc.wait(timeout=60)
    assert proc.stdout is not None
    json.loads(proc.stdout.read())  # stdout stays clean JSON
    return rc, b"".join(chunks).decode(errors="replace")


@pytest.mark.e2e
def test_progress_on_terminal_stderr_reaches_100(tmp_path: Path) -> None:
    pkg, model, sign = _package(tmp_path)
    rc, text = _run_on_tty(
        [*EXE, "pack", "--model", str(model), "--name", "c", "--version", "3", "--json",
         "--signing-key", str(next(sign.glob("*.key"))), "-o", str(tmp_path / "q.emp")]
    )  # fmt: skip
    assert rc == 0
    assert "packing" in text and "100%" in text, text
    rc, text = _run_on_tty(
        [*EXE, "unpack", str(pkg), "--trust", str(sign), "--json", "-o", str(tmp_path / "v")]
    )
    assert rc == 0
    assert "unpacking" in text and "100%" in text, text
    assert "\r" in text  # a bar redrawn in place, not a log of lines


def test_no_progress_when_stderr_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _package(tmp_path)
    assert "%" not in capsys.readouterr().err
