#!/usr/bin/env bash
# `make test-arm64`: the test suite inside an arm64 Debian root under qemu-user emulation.
#
# Steps, each stamped under .cache/arm64 so a re-run redoes only what changed:
#   binfmt   register qemu-aarch64 with the kernel (root; Debian's qemu-user-static)
#   root     debootstrap --arch=arm64 bookworm (first + second stage)
#   venv     python3-venv in the root and a venv with the runtime + test dependencies
#            (aarch64 wheels from PyPI), keyed by a hash of setup.cfg
#   tarball  .cache/arm64/root.tar.zst of the ready root, restored on a machine that kept it
#   sync     the working tree copied into ROOT/src and installed (editable) into the venv
#   run      pytest inside the root, with /proc, /sys, /dev mounted and a tmpfs over
#            /sys/devices/system/cpu (onnxruntime's CPU probe under qemu 7.2 crashes on the
#            host's x86 description; see shared ARM64-NOTES)
# Mounts are undone on every exit (trap), before anything is deleted.
#
# Usage: .ci/arm64.sh [smoke|full|deb|shell|clean] [pytest args...]
#   smoke (default in CI): the subset that proves the platform (package, crypto, residual
#   round trip incl. host-packed patches applied here, both backends, the daemon serving
#   one inference over the socket); full: the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
CACHE=${EDGEWARD_ARM64_CACHE:-$TOP/.cache/arm64}
ROOT=$CACHE/root
MIRROR=${EDGEWARD_ARM64_MIRROR:-http://deb.debian.org/debian}
HOST_PY=${HOST_PY:-$TOP/.venv/bin/python}
MODE=${1:-smoke}
shift || true
mkdir -p "$CACHE"

log() { printf '[arm64] %s\n' "$*" >&2; }

MOUNTS=()
cleanup() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount -l "${MOUNTS[i]}" 2>/dev/null || true
  done
  MOUNTS=()
}
trap cleanup EXIT INT TERM

mounted() { mountpoint -q "$1"; }

do_mount() {  # do_mount TARGET ARGS... ; remembered for cleanup
  local target=$1
  shift
  mkdir -p "$target"
  if ! mounted "$target"; then
    mount "$@" "$target"
    MOUNTS+=("$target")
  fi
}

step_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    log "cannot register qemu-aarch64 with binfmt_misc (need root and qemu-user-static)"
    exit 3
  fi
}

mount_root() {
  # The root a mount point of its own: `unshare --propagation private` needs one.
  do_mount "$ROOT" --bind "$ROOT"
  do_mount "$ROOT/proc" -t proc proc
  do_mount "$ROOT/sys" -t sysfs sysfs
  # onnxruntime reads the CPU description under /sys/devices/system/cpu; the host's x86
  # one crashes it under qemu 7.2, so the root sees only the CPU lists.
  local cpu=$ROOT/sys/devices/system/cpu
  do_mount "$cpu" -t tmpfs -o size=64k tmpfs
  for f in possible present online; do cat "/sys/devices/system/cpu/$f" >"$cpu/$f"; done
  do_mount "$ROOT/dev" --bind /dev
  do_mount "$ROOT/dev/pts" --bind /dev/pts
  do_mount "$ROOT/dev/shm" -t tmpfs tmpfs
  do_mount "$ROOT/tmp" -t tmpfs -o size=8g tmpfs
  # debootstrap writes no /etc/hosts (an installed Debian has one): without it "localhost"
  # does not resolve in the root and the TLS tests that name it fail for no aarch64 reason.
  if [ ! -s "$ROOT/etc/hosts" ]; then
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
  fi
}

in_root() {  # run a command in the root with a clean environment
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    TMPDIR=/tmp PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$@"
}

venv_key() { { cat setup.cfg pyproject.toml; declare -f step_venv; } | sha256sum | cut -c1-16; }

step_root() {
  [ -f "$CACHE/root.stamp" ] && return 0
  if [ -f "$CACHE/root.tar.zst" ]; then
    log "restoring the root from $CACHE/root.tar.zst"
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    tar -C "$ROOT" --zstd -xf "$CACHE/root.tar.zst"
    cp "$CACHE/root.tar.key" "$CACHE/venv.stamp" 2>/dev/null || true
    touch "$CACHE/root.stamp"
    return 0
  fi
  log "debootstrap arm64 bookworm (emulated second stage: several minutes)"
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --foreign --variant=minbase bookworm "$ROOT" "$MIRROR" >"$CACHE/debootstrap1.log"
  chroot "$ROOT" /debootstrap/debootstrap --second-stage >"$CACHE/debootstrap2.log"
  echo "deb $MIRROR bookworm main" >"$ROOT/etc/apt/sources.list"
  touch "$CACHE/root.stamp"
}

step_venv() {
  local key
  key=$(venv_key)
  if [ -f "$CACHE/venv.stamp" ] && [ "$(cat "$CACHE/venv.stamp")" = "$key" ]; then
    return 0
  fi
  log "apt + venv inside the root (aarch64 wheels from PyPI)"
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # No service starts inside the root when its package installs (nginx, mosquitto).
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
  chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  in_root apt-get update -qq
  in_root apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev ca-certificates zstd curl openssl procps nginx-light mosquitto \
    systemd \
    passwd util-linux >/dev/null
  # The host's CA bundle: the registries may sit behind the host's own TLS proxy CA.
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  in_root python3 -m venv /opt/venv
  in_root /opt/venv/bin/python -m pip install -q --upgrade pip
  # Dependencies only (the project itself is synced and installed on every run).
  mkdir -p "$ROOT/src"
  cp setup.cfg pyproject.toml README.md "$ROOT/src/"
  mkdir -p "$ROOT/src/agent" "$ROOT/src/runtime"
  touch "$ROOT/src/agent/__init__.py" "$ROOT/src/runtime/__init__.py"
  in_root sh -c 'cd /src && /opt/venv/bin/python -m pip install -q ".[test]" && /opt/venv/bin/python -m pip uninstall -q -y edgeward'
  rm -rf "$ROOT/src"
  echo "$key" >"$CACHE/venv.stamp"
  log "packing the ready root into $CACHE/root.tar.zst"
  cleanup
  tar -C "$ROOT" --zstd -cf "$CACHE/root.tar.zst.tmp" --exclude=./proc/* --exclude=./sys/* \
    --exclude=./dev/* --exclude=./tmp/* --exclude=./src .
  mv "$CACHE/root.tar.zst.tmp" "$CACHE/root.tar.zst"
  echo "$key" >"$CACHE/root.tar.key"
  mount_root
}

step_sync() {
  log "syncing the working tree into the root"
  rm -rf "$ROOT/src"
  mkdir -p "$ROOT/src"
  git ls-files -co --exclude-standard -z | grep -zv '^\.cache/' \
    | xargs -0 -I{} cp --parents -P {} "$ROOT/src/" 2>/dev/null || true
  # Model assets are platform-independent files read out of wheels on the host.
  mkdir -p "$ROOT/src/.cache"
  cp -r .cache/assets "$ROOT/src/.cache/assets"
  in_root sh -c 'cd /src && /opt/venv/bin/python -m pip install -q setuptools wheel &&
    /opt/venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .'
  # XNNPACK's NEON kernels crawl under qemu-user 7.2 (hand landmark: 25 s per invoke
  # against 1.8 s with LiteRT's builtin kernels), so interpreters in this root default to
  # the builtin kernels; a caller that names an op resolver (test_arm64_parity's XNNPACK
  # check) still gets what it asks for. A real arm64 box runs XNNPACK as usual.
  local site
  site=$(in_root /opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp .ci/arm64_sitecustomize.py "$ROOT$site/sitecustomize.py"
  log "packing the parity vectors on the host ($(uname -m))"
  "$HOST_PY" -m tests.arm64_vectors "$ROOT/src/.cache/parity" >/dev/null
  # `make deb`'s arm64 package, built here on the host from aarch64 wheels; the root
  # installs and starts it (tests/test_deb.py with EDGEWARD_DEB).
  log "building the arm64 .deb on the host"
  local deb
  deb=$("$HOST_PY" systemd/deb/build.py --arch arm64 --python 3.11 --compress zstd:1 \
    --wheelhouse "$CACHE/wheels-arm64" --out "$ROOT/src/.cache/deb" 2>"$CACHE/deb.log")
  DEB_IN_ROOT=${deb#"$ROOT"}
}

SMOKE_TESTS=(
  tests/test_container.py tests/test_crypto.py tests/test_manifest.py tests/test_package.py
  tests/test_residual.py tests/test_residual_tflite.py tests/test_runtime_backends.py
  tests/test_arm64_parity.py tests/test_daemon.py tests/test_deb.py
)

SPEED_PROBE='import time
t = time.perf_counter(); sum(i * i for i in range(2_000_000)); print(time.perf_counter() - t)'

step_run() {
  local args=("$@")
  local start end rc tests host emu slowdown
  if [ "$MODE" = smoke ]; then tests="${SMOKE_TESTS[*]}"; else tests=""; fi
  # Deadlines in tests scale with the measured slowdown (tests/emulation.py).
  host=$("$HOST_PY" -c "$SPEED_PROBE")
  emu=$(in_root /opt/venv/bin/python -c "$SPEED_PROBE")
  slowdown=$(python3 -c "print(max(1.0, round($emu / $host, 1)))")
  log "measured slowdown: ${slowdown}x (pure Python, emulated vs host)"
  start=$(date +%s)
  set +e
  in_root sh -c "cd /src && EDGEWARD_E2E_REQUIRED=${EDGEWARD_E2E_REQUIRED:-} EDGEWARD_ARM64=1 \
    EDGEWARD_SLOWDOWN=$slowdown EDGEWARD_PARITY_VECTORS=/src/.cache/parity EDGEWARD_DEB=$DEB_IN_ROOT \
    /opt/venv/bin/python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider \
    -o timeout=$(python3 -c "print(int(300 * $slowdown))") $tests ${args[*]:-}" \
    2>&1 | tee "$CACHE/last-run.log"
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s)
  log "$MODE run: $((end - start)) s, exit $rc"
  if [ ${#args[@]} -eq 0 ]; then record "$((end - start))"; fi
  return "$rc"
}

record() {  # bench/arm64.json: what BENCHMARKS.md shows for the emulated suite, per mode
  local line qemu
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$CACHE/last-run.log" | tail -1 || true)
  qemu=$(qemu-aarch64-static --version 2>/dev/null | head -1 | awk '{print $3}')
  python3 - "$1" "$MODE" "$qemu" "$line" "$TOP/bench/arm64.json" <<'PY'
import json, os, platform, re, sys, time
seconds, mode, qemu, line, path = sys.argv[1:6]
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|xfailed|errors?)", line)}
try:
    runs = json.load(open(path))
except (OSError, ValueError):
    runs = {}
if "mode" in runs:  # the one-run layout of earlier records
    runs = {runs["mode"]: runs}
runs[mode] = {
    "mode": mode, "seconds": int(seconds), "qemu": qemu or "?",
    "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "passed": counts.get("passed", 0),
    "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
    "xfailed": counts.get("xfailed", 0), "skipped": counts.get("skipped", 0),
}
with open(path, "w") as fh:
    json.dump(runs, fh, indent=1)
    fh.write("\n")
PY
}

case "$MODE" in
  clean)
    cleanup
    for m in $(mount | awk -v r="$ROOT" '$3 ~ "^"r {print $3}' | sort -r); do umount -l "$m"; done
    rm -rf "$ROOT" "$CACHE"/*.stamp
    ;;
  shell)
    step_binfmt; step_root; mount_root; step_venv; step_sync
    chroot "$ROOT" /bin/bash
    ;;
  exec)  # run one command in the root as it stands (no sync): .ci/arm64.sh exec python -c ...
    step_binfmt; step_root; mount_root
    in_root sh -c "cd /src && $*"
    ;;
  smoke | full)
    step_binfmt; step_root; mount_root; step_venv; step_sync
    step_run "$@"
    ;;
  *)
    echo "usage: $0 [smoke|full|shell|exec|clean] [pytest args...]" >&2
    exit 2
    ;;
esac
