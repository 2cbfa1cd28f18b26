"""Torch production on one device against the numpy reference, without hypothesis.

For machines where only the runtime dependencies are installed (a GPU box
with torch and numpy): every configuration of ``SHAPE_MENU`` filled with
every load kind, SPEC.md's worked example, and the real loads in every
benchmark configuration. Prints one row per case (agreement, production
time on the device) and exits 1 if any case differs.

    python -m eplb.conformance.device_check --device cuda --data-dir DIR
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from eplb.loads import read_load, real_loads

from .agreement import first_difference, numpy_reference, torch_production
from .cases import LOAD_KINDS, SHAPE_MENU, SPEC_EXAMPLE, Problem, make_load
from .invariants import check_invariants
from .workloads import benchmark_workloads

__all__ = ["main"]


def _menu_cases(seeds: int) -> Iterator[tuple[str, Problem]]:
    """Every menu configuration with every load kind in every layer, ``seeds`` times."""
    yield "SPEC.md example", SPEC_EXAMPLE
    for config in SHAPE_MENU:
        num_experts = config.num_logical_experts
        group_size = num_experts // config.num_groups
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            # One layer per kind, in a shifted order so that each kind meets
            # each layer position across seeds.
            kinds = tuple(np.roll(LOAD_KINDS, seed))
            weight = make_load(kinds, rng, num_experts, group_size)
            label = f"menu {num_experts}e/{config.num_replicas}r seed {seed}"
            yield label, Problem(weight, *config[2:], kinds=kinds)


def _real_cases(data_dir: Path | None, files: int | None) -> Iterator[tuple[str, Problem]]:
    """Every benchmark configuration with each of the first ``files`` real loads."""
    if data_dir is not None:
        # Layers 0-2 of DeepSeek-V3/R1 are dense (all-zero rows), as in real_loads().
        loads = {f.stem: read_load(f)[3:] for f in sorted(data_dir.glob("*.json"))}
    else:
        loads = real_loads()
    for workload in benchmark_workloads(dict(list(loads.items())[:files])):
        yield workload.name, Problem(workload.weight, *workload.counts, kinds=("real",))


def _check(problem: Problem, device: str) -> tuple[str, float]:
    """("ok" or what differs, production seconds) for one case."""
    expected = numpy_reference(problem.weight, *problem.counts)
    start = time.perf_counter()
    got = torch_production(problem.weight, *problem.counts, device=device)
    seconds = time.perf_counter() - start
    difference = first_difference(expected, got)
    if difference is not None:
        return str(difference), seconds
    try:
        check_invariants(*got, *problem.counts)
    except AssertionError as exc:
        return str(exc).splitlines()[1].strip(), seconds
    return "ok", seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run the device check; 0 when every case agrees."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m eplb.conformance.device_check")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device for production (default: cuda when available)",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="folder of real load JSONs")
    parser.add_argument("--seeds", type=int, default=3, help="loads per menu configuration")
    parser.add_argument("--files", type=int, default=None, help="real load files (default all)")
    args = parser.parse_args(argv)
    if args.data_dir is not None and not any(args.data_dir.glob("*.json")):
        parser.error(f"--data-dir {args.data_dir} holds no .json load files")

    print(f"torch production on {args.device} vs the numpy reference")
    print(f"{'case':44s} {'L x E':>9s} {'R/G/N/P':>14s} {'prod ms':>8s}  result")
    failures = 0
    cases = [*_menu_cases(args.seeds), *_real_cases(args.data_dir, args.files)]
    with warnings.catch_warnings():
        # The "overflow" kind makes float64 sums reach inf, as SPEC.md allows.
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        for label, problem in cases:
            result, seconds = _check(problem, args.device)
            failures += result != "ok"
            shape = "x".join(str(d) for d in problem.weight.shape)
            counts = "/".join(str(c) for c in problem.counts)
            print(f"{label:44s} {shape:>9s} {counts:>14s} {seconds * 1e3:8.2f}  {result}")
    real = sum(1 for _, p in cases if p.kinds == ("real",))
    print(f"{len(cases)} cases ({real} with real loads), {failures} differ")
    if real == 0:
        print("no real loads found: pass --data-dir DIR")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
