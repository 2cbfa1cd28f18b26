"""The rebalance benchmark's baselines stay valid, and its quick run works."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from eplb.conformance.invariants import check_invariants
from eplb.loads import synthetic_load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_rebalance  # noqa: E402


@pytest.mark.parametrize("baseline", [bench_rebalance.numpy_per_layer, bench_rebalance.torch_port])
@pytest.mark.parametrize("counts", [(24, 4, 2, 8), (20, 1, 1, 4), (16, 3, 2, 4)])
def test_baselines_return_valid_placements(baseline, counts):
    weight = synthetic_load(3, 12 if counts[1] == 3 else 16, seed=2, skew=0.4)
    check_invariants(*baseline(weight, *counts), *counts)


def test_baselines_match_eplb_without_ties():
    # Distinct float32-exact loads: no tie and no rounding difference is left.
    rng = np.random.default_rng(0)
    weight = rng.permutation(np.arange(1, 3 * 32 + 1, dtype=np.float64)).reshape(3, 32) * 8
    counts = (40, 4, 2, 8)
    ours = bench_rebalance.ours(weight, *counts)
    for baseline in (bench_rebalance.numpy_per_layer, bench_rebalance.torch_port):
        phy2log, _, logcnt = baseline(weight, *counts)
        np.testing.assert_array_equal(phy2log, ours[0])
        np.testing.assert_array_equal(logcnt, ours[2])


def test_quick_run_prints_the_table(run_benchmark):
    stdout = run_benchmark("bench_rebalance.py", "--quick")
    assert "DeepSeek-V2-Lite R=72" in stdout and "numpy loop ms" in stdout
    assert "compiled ms" in stdout and "numpy core ms" in stdout
    assert "targets" in stdout and "differ" not in stdout
