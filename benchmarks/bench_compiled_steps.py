"""The compiled placement core step by step, beside the numpy core, with page faults.

For each shape, on a synthetic skewed load, median milliseconds on ONE CPU
thread and minor page faults per call (``resource.getrusage``) of:

- ``groups to nodes``: ``balanced_packing(group loads [L, G], N)``;
- ``replicate``: ``replicate_experts(node loads [L*N, E/N], R/N)``;
- ``slots to GPUs``: ``balanced_packing(slot loads [L*N, R/N], P/N)`` (its
  stable sort included: the step that dominates);
- ``log2phy``: ``inverse_map(phy2log, phyrank, logcnt)``;
- ``hierarchy``: ``rebalance_experts_hierarchical`` (the four steps and the
  node-local orders, float64 in);
- ``placement``: the compiled core's one call (``compiled_core.placement``:
  the value checks and the hierarchy and log2phy, in its per-thread work space)
  against the numpy core's ``rebalance_experts_hierarchical`` + ``inverse_map``;
- ``rebalance_experts``: the public call on a CPU tensor (``core=...``).

Each step's input is the previous steps' output, computed once by the numpy
core; both cores get the same arrays. The per-step calls allocate their own
results and work space (as the public primitives do), the ``placement`` row
shows what the one-call path with its kept work space saves.

Page faults show the allocator: where large blocks are ``mmap``-ed (glibc
above ``M_MMAP_THRESHOLD``), every call faults its fresh arrays in, page by
page. ``--mmap-threshold BYTES`` reruns the benchmark with
``MALLOC_MMAP_THRESHOLD_=BYTES`` (glibc reads it at start-up), which imitates
such a machine: e.g. 4096 sends almost every array to ``mmap``.

    python benchmarks/bench_compiled_steps.py                  # V2-Lite, V3, Kimi-K2
    python benchmarks/bench_compiled_steps.py --mmap-threshold 4096
    python benchmarks/bench_compiled_steps.py --quick          # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.conformance.workloads import BENCHMARK_SHAPES  # noqa: E402
from eplb.loads import synthetic_load  # noqa: E402
from eplb.production import compiled_core_error, rebalance_experts  # noqa: E402
from eplb.production import rebalance as numpy_core  # noqa: E402
from eplb.production._packing import inverse_map as numpy_inverse_map  # noqa: E402

#: Shapes timed by default (names of BENCHMARK_SHAPES).
DEFAULT_SHAPES = ("DeepSeek-V2-Lite R=64", "DeepSeek-V3 R=288", "Kimi-K2 R=448")
#: --quick: name -> (experts, layers, R, G, N, P), small enough for a test.
QUICK_SHAPES = {"tiny R=24": (16, 3, 24, 4, 2, 4), "tiny global R=48": (24, 2, 48, 3, 2, 8)}
STEPS = (
    "groups to nodes",
    "replicate",
    "slots to GPUs",
    "log2phy",
    "hierarchy",
    "placement",
    "rebalance_experts",
)
ENV_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median ms, minor page faults per call) of ``fn``: ``repeats`` calls after a warm one."""
    fn()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return statistics.median(times) * 1e3, faults / repeats


def step_calls(
    weight: np.ndarray, counts: tuple[int, int, int, int], core: object, numpy: bool
) -> dict[str, Callable[[], object]]:
    """Each step of STEPS as a call of ``core`` (the compiled module, or the numpy core's).

    weight: [L, E] float64, tokens routed to each logical expert in each layer.
    counts: (R, G, N, P). numpy: whether ``core`` is the numpy core (its
    ``placement`` row is its hierarchy plus its inverse map).
    """
    R, G, N, P = counts
    if G % N:
        G, N = 1, 1  # SPEC.md's global policy
    L, E = weight.shape
    group_load = weight.reshape(L, G, E // G).sum(-1)
    group_pack, group_rank = numpy_core.balanced_packing(group_load, N)
    log2mlog = (
        ((group_pack * (G // N) + group_rank) * (E // G))[:, :, None] + np.arange(E // G)
    ).reshape(L, E)
    mlog2log = np.argsort(log2mlog, axis=1)
    node_load = np.ascontiguousarray(np.take_along_axis(weight, mlog2log, 1).reshape(L * N, -1))
    phy2mlog, _, mlogcnt = numpy_core.replicate_experts(node_load, R // N)
    slot_load = np.ascontiguousarray(np.take_along_axis(node_load / mlogcnt, phy2mlog, 1))
    maps = numpy_core.rebalance_experts_hierarchical(weight, R, G, N, P)
    inverse = numpy_inverse_map if numpy else core.inverse_map  # type: ignore[attr-defined]
    hierarchy = core.rebalance_experts_hierarchical  # type: ignore[attr-defined]
    tensor = torch.from_numpy(weight)
    whole: Callable[[], object]
    if numpy:
        whole = lambda: inverse(*hierarchy(weight, R, G, N, P))  # noqa: E731
    else:
        whole = lambda: core.placement(weight, *counts)  # type: ignore[attr-defined]  # noqa: E731
    name = "numpy" if numpy else "compiled"
    return {
        "groups to nodes": lambda: core.balanced_packing(group_load, N),  # type: ignore[attr-defined]
        "replicate": lambda: core.replicate_experts(node_load, R // N),  # type: ignore[attr-defined]
        "slots to GPUs": lambda: core.balanced_packing(slot_load, P // N),  # type: ignore[attr-defined]
        "log2phy": lambda: inverse(*maps),
        "hierarchy": lambda: hierarchy(weight, R, G, N, P),
        "placement": whole,
        "rebalance_experts": lambda: rebalance_experts(tensor, *counts, core=name),
    }


def measure(
    shapes: dict[str, tuple[int, int, int, int, int, int]], repeats: int
) -> list[tuple[str, str, float, float, float, float]]:
    """Rows (shape, step, compiled ms, compiled faults/call, numpy ms, numpy faults/call)."""
    from eplb.production import compiled_core

    rows = []
    for name, (experts, layers, *counts) in shapes.items():
        weight = synthetic_load(layers, experts, seed=1, skew=0.4, tokens=1 << 18)
        fast = step_calls(weight, tuple(counts), compiled_core, numpy=False)  # type: ignore[arg-type]
        slow = step_calls(weight, tuple(counts), numpy_core, numpy=True)  # type: ignore[arg-type]
        for step in STEPS:
            rows.append((name, step, *_timed(fast[step], repeats), *_timed(slow[step], repeats)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description="the compiled core step by step, with faults")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per cell")
    parser.add_argument("--shapes", help="comma-separated names of: " + ", ".join(BENCHMARK_SHAPES))
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help=f"rerun with {ENV_THRESHOLD}=BYTES (glibc: larger blocks are mmap-ed)",
    )
    args = parser.parse_args()
    if args.mmap_threshold is not None and os.environ.get(ENV_THRESHOLD) != str(
        args.mmap_threshold
    ):
        env = {**os.environ, ENV_THRESHOLD: str(args.mmap_threshold)}
        return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode
    if compiled_core_error() is not None:
        print(f"compiled core unavailable: {compiled_core_error()}")
        return 1
    torch.set_num_threads(1)
    if args.quick:
        shapes, args.repeats = QUICK_SHAPES, 5
    else:
        names = [n.strip() for n in args.shapes.split(",")] if args.shapes else DEFAULT_SHAPES
        unknown = [n for n in names if n not in BENCHMARK_SHAPES]
        if unknown:
            parser.error(f"unknown shapes {unknown}; choose from {list(BENCHMARK_SHAPES)}")
        shapes = {n: BENCHMARK_SHAPES[n] for n in names}

    threshold = os.environ.get(ENV_THRESHOLD)
    allocator = f"{ENV_THRESHOLD}={threshold}" if threshold else "default allocator"
    print(
        f"machine: {platform.machine()}, 1 thread, {allocator}; numpy {np.__version__}, "
        f"python {platform.python_version()}; median of {args.repeats} calls"
    )
    header = (
        f"{'shape':23} {'step':18} {'compiled ms':>11} {'faults':>7} "
        f"{'numpy ms':>9} {'faults':>7} {'x':>6}"
    )
    print(header)
    print("-" * len(header))
    for shape, step, fast_ms, fast_faults, slow_ms, slow_faults in measure(shapes, args.repeats):
        print(
            f"{shape:23} {step:18} {fast_ms:11.3f} {fast_faults:7.0f} "
            f"{slow_ms:9.3f} {slow_faults:7.0f} {slow_ms / fast_ms:6.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
