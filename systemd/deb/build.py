"""Build the edgeward Debian package (``make deb``) for amd64 or arm64 on any host.

Layout of the package:

    /opt/edgeward/                 a virtual environment: bin/python3 -> /usr/bin/python3,
                                   pyvenv.cfg, lib/python3.X/site-packages/ (edgeward and
                                   every dependency, from wheels)
    /opt/edgeward/bin/edgeward     the CLI (python3 -I: nothing from the cwd or PYTHON*)
    /usr/bin/edgeward              -> /opt/edgeward/bin/edgeward
    /lib/systemd/system/edgeward.service
    /usr/lib/sysusers.d/edgeward.conf, /usr/lib/tmpfiles.d/edgeward.conf
    /etc/edgeward/edgeward.toml    (a conffile)
    /usr/share/doc/edgeward/       README, INSTALL, DAEMON, ... , LICENSE, copyright

Why wheels and ``pip install --target`` instead of ``python -m venv`` + ``pip install``:
the target architecture's wheels (``--platform manylinux..._aarch64``) can be
downloaded and unpacked on an x86 build host, where an arm64 interpreter cannot run.
The venv around them is three files written by hand (``pyvenv.cfg`` and two symlinks
to the system ``python3``), identical for both architectures. Only binary wheels are
used (``--only-binary=:all:``), so nothing is compiled for the wrong machine; the
Python minor version (``--python``, default that of Debian 12) must match the target
distribution's ``python3``, which the package depends on.

Usage: ``python systemd/deb/build.py --arch arm64 [--out dist/] [--python 3.11]``.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
# manylinux tags a Debian 12 (glibc 2.36) / Ubuntu 22.04+ box can run, newest first.
GLIBC_MINORS = range(36, 16, -1)
DOCS = ("README.md", "docs/INSTALL.md", "docs/DAEMON.md", "docs/METRICS.md",
        "docs/PROTOCOL.md", "docs/RUNTIME.md", "docs/PACKAGE.md", "docs/FORMAT.md",
        "docs/RESIDUAL.md", "docs/DEPENDENCIES.md")  # fmt: skip


def _run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    # tools' chatter goes to stderr: stdout is the .deb path, for scripts
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kw)  # type: ignore[call-overload]


def _version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]["version"]


def _platforms(machine: str) -> list[str]:
    return [*(f"manylinux_2_{m}_{machine}" for m in GLIBC_MINORS), f"manylinux2014_{machine}"]


def build_wheels(wheelhouse: Path, arch: str, python: str) -> None:
    """The edgeward wheel (built here) and every dependency's wheel for ``arch``."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for old in wheelhouse.glob("edgeward-*.whl"):  # a kept wheelhouse: rebuild our own
        old.unlink()
    _run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheelhouse), str(ROOT)])
    (own,) = sorted(wheelhouse.glob("edgeward-*.whl"))
    plat: list[str] = []
    for tag in _platforms(ARCHES[arch]):
        plat += ["--platform", tag]
    abi = "cp" + python.replace(".", "")
    _run(
        [*pip, "download", "-q", "--only-binary=:all:", *plat,
         "--python-version", python, "--implementation", "cp",
         "--abi", abi, "--abi", "abi3", "--abi", "none",
         "-d", str(wheelhouse), str(own)]
    )  # fmt: skip


def install_venv(stage: Path, wheelhouse: Path, arch: str, python: str) -> Path:
    """Write the venv skeleton and unpack the wheels into its site-packages."""
    venv = stage / "opt" / "edgeward"
    site = venv / "lib" / f"python{python}" / "site-packages"
    (venv / "bin").mkdir(parents=True)
    site.mkdir(parents=True)
    os.symlink("lib", venv / "lib64")
    os.symlink("/usr/bin/python3", venv / "bin" / "python3")
    os.symlink("python3", venv / "bin" / "python")
    (venv / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {python}\n"
    )
    plat: list[str] = []
    for tag in _platforms(ARCHES[arch]):
        plat += ["--platform", tag]
    abi = "cp" + python.replace(".", "")
    (own,) = sorted(wheelhouse.glob("edgeward-*.whl"))
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
         str(wheelhouse), "--only-binary=:all:", *plat, "--python-version", python,
         "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
         "--no-compile", "--target", str(site), str(own)]
    )  # fmt: skip
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with the host's path
    cli = venv / "bin" / "edgeward"
    cli.write_text(
        "#!/opt/edgeward/bin/python3 -I\n"
        "# edgeward CLI (Debian package); -I: no cwd, user site or PYTHON* variables.\n"
        "import sys\n\nfrom agent.cli import main\n\nsys.exit(main())\n"
    )
    cli.chmod(0o755)
    return site


def compile_bytecode(stage: Path, site: Path, python: str) -> None:
    """Byte-compile at build time: /opt is read-only to the service (ProtectSystem=strict),
    so nothing could cache bytecode at run time. Needs a host python of the same minor
    version; without one the package works but starts slower (and says so here)."""
    system = Path(f"/usr/bin/python{python}")  # the target's own interpreter, if here
    host = str(system) if system.exists() else shutil.which(f"python{python}")
    if host is None:
        print(f"note: no python{python} on this host; bytecode not compiled", file=sys.stderr)
        return
    _run(
        [host, "-I", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode",
         "unchecked-hash", "-s", str(stage), "-p", "/", str(site)]
    )  # fmt: skip


def lay_out_files(stage: Path) -> None:
    """Unit, sysusers, tmpfiles, the config, docs, license."""

    def put(src: Path, dst: str, mode: int = 0o644) -> None:
        target = stage / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        target.chmod(mode)

    put(ROOT / "systemd" / "edgeward.service", "/lib/systemd/system/edgeward.service")
    put(ROOT / "systemd" / "edgeward.sysusers", "/usr/lib/sysusers.d/edgeward.conf")
    put(ROOT / "systemd" / "edgeward.tmpfiles", "/usr/lib/tmpfiles.d/edgeward.conf")
    put(ROOT / "configs" / "edgeward.toml", "/etc/edgeward/edgeward.toml")
    doc = "/usr/share/doc/edgeward/"
    for name in DOCS:
        put(ROOT / name, doc + Path(name).name)
    put(ROOT / "LICENSE", doc + "LICENSE")
    (stage / doc.lstrip("/") / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: edgeward\n\nFiles: *\nLicense: Apache-2.0\n"
        " On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0\n"
        " and in /usr/share/doc/edgeward/LICENSE.\n"
    )
    bindir = stage / "usr" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    os.symlink("/opt/edgeward/bin/edgeward", bindir / "edgeward")


def control_files(stage: Path, arch: str, python: str) -> None:
    debian = stage / "DEBIAN"
    debian.mkdir()
    size_kb = (
        sum(p.lstat().st_size for p in stage.rglob("*") if p.is_file() and not p.is_symlink())
        // 1024
    )
    major, minor = python.split(".")
    (debian / "control").write_text(
        f"Package: edgeward\nVersion: {_version()}\nArchitecture: {arch}\n"
        "Maintainer: Edgeward developers <edgeward@localhost>\n"
        f"Installed-Size: {size_kb}\n"
        f"Depends: python3 (>= {python}), python3 (<< {major}.{int(minor) + 1}), libc6 (>= 2.28)\n"
        "Recommends: systemd\nSection: misc\nPriority: optional\n"
        "Homepage: https://github.com/edgeward/edgeward\n"
        "Description: edge runtime agent for GB/T 42382.2 encapsulated models\n"
        " Installs signed, encrypted model packages (.emp), applies quantised residual\n"
        " patches, converts models for ONNX Runtime or LiteRT and serves KServe v2\n"
        " inference on a Unix socket. Runs as an unprivileged systemd service.\n"
    )
    (debian / "conffiles").write_text("/etc/edgeward/edgeward.toml\n")
    for script in ("postinst", "prerm", "postrm"):
        shutil.copyfile(ROOT / "systemd" / "deb" / script, debian / script)
        (debian / script).chmod(0o755)


def build(arch: str, out: Path, python: str, compress: str, wheelhouse: Path | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeward-deb-") as tmp:
        work = Path(tmp)
        wheels = wheelhouse or work / "wheels"
        build_wheels(wheels, arch, python)
        stage = work / "stage"
        site = install_venv(stage, wheels, arch, python)
        compile_bytecode(stage, site, python)
        lay_out_files(stage)
        control_files(stage, arch, python)
        deb = out / f"edgeward_{_version()}_{arch}.deb"
        kind, _, level = compress.partition(":")
        cmd = ["dpkg-deb", "--root-owner-group", f"-Z{kind}"]
        if level:
            cmd.append(f"-z{level}")
        _run([*cmd, "--build", str(stage), str(deb)])
    return deb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHES), required=True, help="Debian architecture")
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory (dist/)")
    p.add_argument(
        "--python", default="3.11", help="target python3 minor version (3.11 = Debian 12)"
    )
    p.add_argument(
        "--compress", default="xz", help="dpkg-deb compression TYPE[:LEVEL], e.g. zstd:3"
    )
    p.add_argument("--wheelhouse", type=Path, help="keep downloaded wheels here (reused)")
    args = p.parse_args(argv)
    deb = build(args.arch, args.out, args.python, args.compress, args.wheelhouse)
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
