"""`make bench`: run every area's benchmark in one process run and record the figures.

Each area module exposes ``run(work: Path) -> dict[str, float]`` and prints its own
human-readable lines (every figure as a ratio against an anchor measured in the same
run). The numbers are merged into ``bench/results.json``.
Select areas with ``python -m bench.run unpack residual``.
"""

from __future__ import annotations

import importlib
import json
import math
import platform
import sys
import time
from pathlib import Path

AREAS = ("unpack", "residual", "worker", "socket")
HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    areas = argv or list(AREAS)
    work = HERE / "work"
    work.mkdir(exist_ok=True)
    out = HERE / "results.json"
    results: dict[str, float] = json.loads(out.read_text()) if out.exists() else {}
    print(f"# edgeward bench on {platform.machine()} {platform.python_version()}")
    for area in areas:
        mod = importlib.import_module(f"bench.bench_{area}")
        t0 = time.perf_counter()
        print(f"\n## {area}")
        figures = mod.run(work / area)
        for key, value in figures.items():
            if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                raise SystemExit(f"bench {area}: {key} is not a finite number: {value!r}")
            results[key] = float(value)
        print(f"({area} took {time.perf_counter() - t0:.1f} s)")
    out.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
