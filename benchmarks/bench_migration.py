"""Migration-aware rebalancing speed: eplb.production against the numpy reference.

Median milliseconds on ONE CPU thread for one rebalance of real DeepSeek-R1
loads (``../shared/data``) in the DeepSeek-V3 shape (288 slots, 8 groups, 4
nodes, 32 GPUs): the held placement is SPEC's for the trace's load, the new
load the same drifted by up to 10% per expert (seed 0). Per trace:

- ``spec``: ``eplb.production.rebalance_experts`` (what the policy computes first);
- ``relabel``: ``eplb.production.relabel_for_migration`` of SPEC's new placement;
- ``migration``: ``eplb.production.rebalance_experts_migration_aware`` (default tolerance 0.01);
- ``reference``: ``eplb.reference.rebalance_experts_migration_aware``, the
  plain-loop version of the same policy: the baseline, run once (it is slow).

Every production result must equal the reference's, bit for bit.

    python benchmarks/bench_migration.py              # 8 traces x first --layers layers
    python benchmarks/bench_migration.py --quick      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os

# One thread everywhere, set before numpy and torch start their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.loads import real_loads  # noqa: E402
from eplb.production import (  # noqa: E402
    rebalance_experts,
    rebalance_experts_migration_aware,
    relabel_for_migration,
)
from eplb.reference import migration as reference  # noqa: E402

COUNTS = (288, 8, 4, 32)


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: the first call also imports scipy
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=58, help="first layers of each trace")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one trace, 3 layers, 1 repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loads = real_loads()
    if not loads:
        raise SystemExit("real loads not found: put them in ../shared/data or set EPLB_DATA_DIR")
    names = sorted(loads)[:1] if args.quick else sorted(loads)
    layers, repeats = (3, 1) if args.quick else (args.layers, args.repeats)
    print(f"one CPU thread; DeepSeek-V3 shape {COUNTS}; {layers} layers; median of {repeats}")
    print("trace | spec ms | relabel ms | migration ms | reference ms | x | equal")
    for name in names:
        load = loads[name][:layers]
        drifted = load * np.random.default_rng(0).uniform(0.9, 1.1, load.shape)
        old = rebalance_experts(torch.from_numpy(load), *COUNTS)[0]
        weight = torch.from_numpy(drifted)
        spec = rebalance_experts(weight, *COUNTS)[0]
        spec_ms = _median_ms(lambda w=weight: rebalance_experts(w, *COUNTS), repeats)
        relabel_ms = _median_ms(
            lambda o=old, s=spec: relabel_for_migration(o, s, COUNTS[2], COUNTS[3]), repeats
        )
        ours = rebalance_experts_migration_aware(weight, *COUNTS, old_phy2log=old)
        ours_ms = _median_ms(
            lambda w=weight, o=old: rebalance_experts_migration_aware(w, *COUNTS, old_phy2log=o),
            repeats,
        )
        start = time.perf_counter()
        expected = reference.rebalance_experts_migration_aware(
            drifted, *COUNTS, old_phy2log=old.numpy()
        )
        reference_ms = (time.perf_counter() - start) * 1e3
        equal = all(np.array_equal(e, o.numpy()) for e, o in zip(expected, ours, strict=True))
        if not equal:
            raise SystemExit(f"{name}: production differs from the reference")
        print(
            f"{name} | {spec_ms:.2f} | {relabel_ms:.1f} | {ours_ms:.1f} | {reference_ms:.0f} | "
            f"{reference_ms / ours_ms:.0f} | {equal}"
        )


if __name__ == "__main__":
    main()
