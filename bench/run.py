"""`make bench`: run every area's benchmark in one process run and record the figures.

Each area module exposes ``run(work: Path) -> dict[str, float]`` and prints its own
human-readable lines (every figure as a ratio against an anchor measured in the same
run). The whole set runs ``EDGEWARD_BENCH_REPEAT`` times (default 3) and each key
records the median: single runs on a shared 2-vCPU VM swing by ±20%. The numbers are
merged into ``bench/results.json``; a full run (all areas) also rewrites
``BENCHMARKS.md`` with the table of figures (median and range) against the issues'
goals and the whole transcript, so the document always matches the command that
produced it. Select areas with ``python -m bench.run unpack residual``: the selected areas'
keys and transcripts (``bench/transcripts/<area>.txt``) are replaced, the others kept, and
BENCHMARKS.md is rewritten from all of them, each area's section dated by its own run.
``make test-arm64`` records the emulated suite's duration and counts in ``bench/arm64.json``,
which the document shows beside the figures (not a speed figure: emulation is no device).
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TextIO

AREAS = (
    "unpack",
    "residual",
    "worker",
    "socket",
    "reliability_serve",
    "reliability",
    "install",
    "fleet",
    "update",
    "grpc",
)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# key: (what it is, goal as (op, value) or None, issue)
FIGURES: dict[str, tuple[str, tuple[str, float] | None, int]] = {
    "unpack_throughput_ratio": ("unpack MB/s / (SHA-256 + AES-256-GCM) MB/s", (">=", 0.5), 2),
    "unpack_peak_rss_mb": ("peak RSS unpacking a >= 1 GiB package, MB", ("<=", 200), 2),
    "patch_int8_size_ratio": ("int8 patch / full signed .emp", ("<=", 0.20), 3),
    "patch_int8_cosine_min": ("min per-sample output cosine B vs B' (int8)", (">=", 0.9999), 3),
    "patch_int4_size_ratio": ("int4 patch / full signed .emp", ("<=", 0.12), 3),
    "patch_int4_cosine_min": ("min per-sample output cosine (int4; goal is top-1)", None, 3),
    "patch_int8_top1_agreement": ("top-1 agreement B vs B' over 64 samples (int8)", None, 3),
    "patch_int4_top1_agreement": ("top-1 agreement B vs B' over 64 samples (int4)", (">=", 1.0), 3),
    "patch_vs_zstd_patch_from": ("zstd -19 --patch-from size / our int8 patch", (">=", 3.0), 3),
    "patch_apply_ratio": ("apply GB/s / numpy a += q*s GB/s", (">=", 0.5), 3),
    "patch_apply_peak_rss_mb": ("peak RSS applying to a 512 MiB model, MB", ("<=", 260), 3),
    "patch_int8_size_ratio_transformer": ("transformer pair: int8 patch / .emp", ("<=", 0.17), 19),
    "patch_int8_entropy_floor_transformer": (
        "transformer pair: entropy floor of int8 codes / .emp",
        None,
        19,
    ),
    "patch_int8_cosine_min_transformer": ("transformer int8: held-out cosine", (">=", 0.9999), 19),
    "patch_rd_size_ratio_999": (
        "--target-cosine 0.999 patch / .emp, max of the transformer and TFLite pairs",
        ("<=", 0.0625),
        19,
    ),
    "patch_rd_size_ratio_999_cnn": ("the same, CNN pair", None, 19),
    "patch_rd_size_ratio_999_transformer": ("the same, transformer pair", None, 19),
    "patch_rd_size_ratio_999_tflite": ("the same, TFLite MLP pair", None, 19),
    "patch_rd_cosine_min_999": ("held-out cosine B vs B' of those patches, min", (">=", 0.999), 19),
    "patch_rd_seconds": ("seconds of the two searches", None, 19),
    "patch_rd_size_ratio_9999_transformer": (
        "transformer pair: --target-cosine 0.9999 patch / .emp (the int8 row's fidelity class)",
        None,
        19,
    ),
    "patch_rd_cosine_min_9999_transformer": ("held-out cosine of that patch", None, 19),
    "patch_make_peak_rss_mb": (
        "peak RSS making an int8 patch of a 512 MiB pair, MB",
        ("<=", 406),
        19,
    ),
    "worker_added_p50_us_224": ("worker vs in-process, 224x224x3 CNN, added p50 us", None, 4),
    "worker_throughput_ratio_4c": ("worker / in-process throughput, 4 callers", (">=", 0.9), 4),
    "socket_added_p50_us_tiny_binary": ("tiny model, binary tensors, added p50 us", ("<=", 150), 5),
    "socket_added_p99_us_tiny_binary": ("tiny model, binary tensors, added p99 us", None, 5),
    "socket_added_p50_us_tiny_json": ("tiny model, JSON tensors, added p50 us", ("<=", 400), 15),
    "socket_added_p50_us_224": ("224x224x3 CNN over the socket, added p50 us", None, 5),
    "socket_throughput_ratio_4c": ("socket / in-process throughput, 4 clients", (">=", 0.9), 5),
    "daemon_idle_rss_mb": ("daemon idle RSS without model workers, MB", ("<=", 60), 5),
    "reliability_daemon_rss_hostile_ratio": (
        "daemon peak RSS, 40+40 hostile connections / (2 x idle + body budget)",
        ("<=", 1.0),
        13,
    ),
    "reliability_daemon_rss_idle_mb": ("the daemon's idle RSS in that run, MB", None, 13),
    "reliability_daemon_rss_hostile_mb": ("the daemon's peak RSS under them, MB", None, 13),
    "reliability_worker_rss_hostile_ratio": (
        "the same for the worker on lent connections",
        ("<=", 1.0),
        13,
    ),
    "reliability_flood_legit_served_ratio": (
        "legit requests served during a 512-connection flood",
        (">=", 0.99),
        13,
    ),
    "reliability_flood_p50_ratio": ("legit p50 latency, flood / no flood", None, 13),
    "reliability_inbox_cases_refused_ratio": (
        "hostile inbox / store cases refused (links, JSON, non-regular, names, installed)",
        (">=", 1.0),
        13,
    ),
    "reliability_inbox_json_tried": ("hostile JSON before the signature: cases", None, 13),
    "reliability_inbox_json_refused": ("... refused with one EdgewardError", None, 13),
    "reliability_inbox_nonregular_tried": ("non-regular inbox entries: cases", None, 13),
    "reliability_inbox_nonregular_refused": ("... refused as such", None, 13),
    "reliability_inbox_links_tried": ("links planted where a refusal writes: cases", None, 13),
    "reliability_inbox_links_refused": ("... target left untouched", None, 13),
    "reliability_inbox_names_tried": ("names with control characters: cases", None, 13),
    "reliability_inbox_names_refused": ("... escaped", None, 13),
    "reliability_inbox_installed_tried": ("tampered installed versions: cases", None, 13),
    "reliability_inbox_installed_refused": ("... found by the start-up check", None, 13),
    "reliability_refuse_nonregular_max_s": (
        "worst time to refuse a FIFO, /dev/zero link, socket, dir, link, s",
        ("<=", 1.0),
        13,
    ),
    "reliability_refuse_sparse_s": ("time to refuse a 4 GiB sparse file, s", ("<=", 1.0), 13),
    "reliability_refuse_sparse_signed_head_s": (
        "time to refuse a signed head + 4 GiB of zeros, s",
        ("<=", 1.0),
        13,
    ),
    "reliability_refuse_check_s": ("daemon check with all of them + a valid package, s", None, 13),
    "reliability_refuse_sigterm_s": (
        "SIGTERM to exit during a check with a FIFO in the inbox, s",
        None,
        13,
    ),
    "reliability_tensor_cases_400_ratio": (
        "edge-case tensor requests answered 400 (relayed + lent)",
        (">=", 1.0),
        13,
    ),
    "cli_version_start_ratio": ("edgeward --version / python -I -c pass, wall", None, 17),
    "cli_version_start_ms": ("edgeward --version wall time, ms", None, 17),
    "metrics_scrape_p50_ms": ("GET /metrics on the metrics socket, p50 ms", None, 17),
    "metrics_scrape_vs_live_ratio": ("metrics scrape p50 / health-live p50", None, 17),
    "daemon_rss_idle_unscraped_mb": ("daemon idle RSS (tiny model), never scraped, MB", None, 17),
    "daemon_rss_after_scrapes_mb": ("the same after 500 scrapes, MB", None, 17),
    "fleet_converge_s": ("one fleet trigger -> every agent's status shows v2, s", None, 14),
    "fleet_failures": ("agents that did not converge or failed the update", ("<=", 0), 14),
    "fleet_check_start_spread_s": ("max - min of the agents' check start times, s", None, 14),
    "fleet_residual_to_full_ratio": ("residual v2 package / full v2 package", None, 14),
    "fleet_messages_per_device": ("MQTT messages a device sends for one update", None, 14),
    "fleet_bytes_per_device_ratio": (
        "nginx bytes per device / (residual package + its TUF metadata)",
        ("<=", 1.1),
        14,
    ),
    "update_full_ratio": ("(curl + unpack + session) / daemon trigger->serving", (">=", 0.8), 12),
    "update_residual_wire_ratio": ("bytes served, residual / full update", ("<=", 0.2), 12),
    "update_residual_time_ratio": ("trigger->serving at 2 MB/s, residual / full", ("<=", 0.3), 12),
    "update_idle_check_bytes": ("bytes on the wire for a check with nothing new", ("<=", 2048), 12),
    "update_kill9_points": ("kill -9 points survived, 0 inconsistent", (">=", 200), 12),
    "grpc_added_p50_us_tiny": (
        "tiny model over gRPC (gateway, our HTTP/2 core), added p50 us",
        ("<=", 200),
        18,
    ),
    "grpc_http_added_p50_us_tiny": ("the same over HTTP, beside it, added p50 us", None, 18),
    "grpc_floor_added_p50_us_tiny": (
        "the same RPC on a bare grpcio server (no gateway, no inference), us",
        None,
        18,
    ),
    "grpc_core_floor_added_p50_us_tiny": (
        "the same RPC on our HTTP/2 core alone (canned answer, no upstream): the floor, us",
        None,
        18,
    ),
    "grpc_client_floor_added_p50_us_tiny": (
        "the same RPC on a do-nothing responder: the grpcio client's own cost, us",
        None,
        18,
    ),
    "daemon_idle_rss_mb_grpc": ("daemon idle RSS with [grpc] enabled, MB", ("<=", 60), 18),
    "grpc_gateway_idle_rss_mb": ("the gRPC gateway process's idle RSS, MB", None, 18),
}

TRANSCRIPTS = HERE / "transcripts"
ARM64 = HERE / "arm64.json"


class _Tee(io.TextIOBase):
    """Echo to the terminal and keep a copy for BENCHMARKS.md."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.buf = out, io.StringIO()

    def write(self, s: str) -> int:
        self.out.write(s)
        self.out.flush()
        return self.buf.write(s)

    def flush(self) -> None:
        self.out.flush()


def _met(value: float, goal: tuple[str, float] | None) -> str:
    if goal is None:
        return "—"
    op, target = goal
    ok = value >= target if op == ">=" else value <= target
    return f"{op} {target:g}: {'met' if ok else '**missed**'}"


def _arm64_section() -> str:
    """The emulated arm64 suite's last runs (``make test-arm64``), one line per mode."""
    if not ARM64.exists():
        return ""
    data = json.loads(ARM64.read_text())
    runs = [data] if "mode" in data else [data[m] for m in ("full", "smoke") if m in data]
    lines = []
    for a in runs:
        what = "the whole suite" if a.get("mode") == "full" else "the smoke subset CI runs"
        lines.append(
            f"- `make test-arm64 ARM64_MODE={a.get('mode', 'full')}` ({what}, {a.get('date', '?')},"
            f" qemu-user {a.get('qemu', '?')} on {a.get('host', '?')}): **{a.get('passed', 0)}"
            f" passed, {a.get('failed', 0)} failed, {a.get('xfailed', 0)} xfailed,"
            f" {a.get('skipped', 0)} skipped** in {a.get('seconds', 0):.0f} s"
        )
    body = "\n".join(lines)
    return f"""
## The test suite on aarch64 (emulated)

An arm64 Debian bookworm root under qemu-user emulation (`.ci/arm64.sh`).
{body}

Durations under emulation say nothing about a real device's speed; the counts are the point.
"""


def _write_doc(
    results: dict[str, float], spread: dict[str, list[float]], transcript: str, started: str
) -> None:
    rows = []
    for key, (what, goal, issue) in FIGURES.items():
        if key not in results:
            continue
        vals = spread.get(key) or [results[key]]
        rng = f"{min(vals):.4g}–{max(vals):.4g}" if len(vals) > 1 else ""
        rows.append(
            f"| `{key}` | {what} | {results[key]:.4g} | {rng} | {_met(results[key], goal)} "
            f"| #{issue} |"
        )
    cpu = os.cpu_count()
    doc = f"""# Benchmarks

Written by `make bench` (= `python -m bench.run`, every area, median of
`EDGEWARD_BENCH_REPEAT` runs per key, default 3) on {platform.machine()}, {cpu} CPUs,
Python {platform.python_version()}. `python -m bench.run AREA...` re-measures only those
areas and rewrites this file from `bench/results.json` and the areas' transcripts
(`bench/transcripts/`), so each area's transcript heading below gives the date and run
count its rows come from (this file was last written {started}).
Do not edit by hand. Every figure is a ratio or a
difference against an anchor measured in the same run (in-process onnxruntime, hashlib +
cryptography on the same bytes, `zstd --patch-from`, curl through the same nginx, numpy),
so the numbers compare across machines better than absolute times do. The range column
(empty for a row from a single run) shows how much runs swing on this shared 2-vCPU VM.

| key | figure | median | range | goal | issue |
|---|---|---:|---|---|---|
{chr(10).join(rows)}
{_arm64_section()}
Where a goal is missed, the area's document says why and what it would take:
[docs/PACKAGE.md](docs/PACKAGE.md) (unpack), [docs/RESIDUAL.md](docs/RESIDUAL.md)
(apply speed), [docs/RUNTIME.md](docs/RUNTIME.md) (worker),
[docs/DAEMON.md](docs/DAEMON.md) and [docs/PROTOCOL.md](docs/PROTOCOL.md) (socket,
update),
[docs/FLEET.md](docs/FLEET.md) (fleet).

## Transcript

```
{transcript.rstrip()}
```
"""
    (ROOT / "BENCHMARKS.md").write_text(doc)


def main(argv: list[str]) -> int:
    """Run the named areas (all by default); ``--doc`` runs none and only rewrites
    BENCHMARKS.md from results.json and the transcripts (after a merge of two areas)."""
    areas = [] if argv == ["--doc"] else argv or list(AREAS)
    work = HERE / "work"
    work.mkdir(exist_ok=True)
    out = HERE / "results.json"
    results: dict[str, float] = json.loads(out.read_text()) if out.exists() else {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    repeat = max(1, int(os.environ.get("EDGEWARD_BENCH_REPEAT", "3")))
    spread_file = HERE / "spread.json"
    kept: dict[str, list[float]] = (
        json.loads(spread_file.read_text()) if spread_file.exists() else {}
    )
    spread: dict[str, list[float]] = {}
    chunks: dict[str, list[str]] = {}
    tee = _Tee(sys.stdout)
    real_stdout, sys.stdout = sys.stdout, tee
    try:
        print(f"# edgeward bench on {platform.machine()} {platform.python_version()}")
        for r in range(repeat):
            for area in areas:
                mod = importlib.import_module(f"bench.bench_{area}")
                t0 = time.perf_counter()
                mark = tee.buf.tell()
                print(f"\n## {area} (run {r + 1} of {repeat}, {started})")
                figures = mod.run(work / area)
                for key, value in figures.items():
                    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                        raise SystemExit(f"bench {area}: {key} is not a finite number: {value!r}")
                    spread.setdefault(key, []).append(float(value))
                print(f"({area} took {time.perf_counter() - t0:.1f} s)")
                chunks.setdefault(area, []).append(tee.buf.getvalue()[mark:])
    finally:
        sys.stdout = real_stdout
    for key, vals in spread.items():
        results[key] = statistics.median(vals)
    out.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    # Each key's per-run values, kept so a partial run's document still shows the other
    # areas' ranges (results.json holds the medians only: numbers the issues name).
    kept.update(spread)
    kept = {k: v for k, v in kept.items() if k in results}
    spread_file.write_text(json.dumps(dict(sorted(kept.items())), indent=1) + "\n")
    print(f"\nwrote {out}")
    TRANSCRIPTS.mkdir(exist_ok=True)
    for area, parts in chunks.items():
        (TRANSCRIPTS / f"{area}.txt").write_text("".join(parts).strip() + "\n")
    transcript = "\n\n".join(
        (TRANSCRIPTS / f"{a}.txt").read_text().strip()
        for a in AREAS
        if (TRANSCRIPTS / f"{a}.txt").exists()
    )
    _write_doc(results, kept, transcript, started)
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
