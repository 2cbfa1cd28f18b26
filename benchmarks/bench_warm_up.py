"""The compiled core's start-up: a cold compile, then a load from numba's cache.

Runs fresh Python processes that import ``eplb.production`` and call
``warm_up_placement()`` (what ``ExpertBalancer`` does when created), with
``NUMBA_CACHE_DIR`` set to a new empty folder: the first process compiles and
fills it, the next ones load from it. Prints the seconds ``warm_up_placement``
took in each, and the same for the numpy core as the baseline (nothing to
load).

    python benchmarks/bench_warm_up.py [--warm-runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_CHILD = """
import time
start = time.perf_counter()
import eplb.production
imported = time.perf_counter() - start
from eplb.production import warm_up_placement
core, seconds = warm_up_placement()
print(core, f"{imported:.3f}", f"{seconds:.3f}")
"""


def _run(cache_dir: str, core: str) -> tuple[str, float, float]:
    """One fresh process: (core used, seconds to import eplb.production, seconds to warm up)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "EPLB_CORE": core}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True
    )
    name, imported, seconds = out.stdout.split()
    return name, float(imported), float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description="compiled core: cold and cached start-up")
    parser.add_argument("--warm-runs", type=int, default=3, help="processes after the cold one")
    args = parser.parse_args()
    print(f"{'run':14} {'core':9} {'import eplb.production s':>25} {'warm_up_placement s':>20}")
    with tempfile.TemporaryDirectory() as cache_dir:
        runs = [("cold (compile)", "compiled")]
        runs += [(f"cached {i + 1}", "compiled") for i in range(args.warm_runs)]
        runs += [("numpy core", "numpy")]
        for label, core in runs:
            name, imported, seconds = _run(cache_dir, core)
            print(f"{label:14} {name:9} {imported:25.3f} {seconds:20.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
