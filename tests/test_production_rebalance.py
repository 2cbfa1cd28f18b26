"""eplb.production.rebalance_experts returns exactly what eplb.reference returns.

Exact equality on SPEC.md's worked example, on seeded random problems (ties,
decimals, zeros, both policies, degenerate shapes, every input dtype), on the
rare paths of the vectorized core (overflowing totals, truncated sort keys,
-0.0, left-to-right group sums), and on the real loads in the benchmark
configurations; int64 outputs on the input's device; the same refusals.
The heavy randomized agreement lives in the conformance suite.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from eplb import reference
from eplb.conformance.invariants import check_invariants
from eplb.conformance.workloads import BENCHMARK_MODELS, benchmark_workloads
from eplb.production import _packing, rebalance_experts
from eplb.production import rebalance as production

SPEC_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
SPEC_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
SPEC_LOGCNT = [
    [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
    [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
]


def _assert_same_as_reference(weight: torch.Tensor, *counts: int) -> None:
    """Production on ``weight`` equals the reference on the same values in float64."""
    expected = reference.rebalance_experts(weight.double().cpu().numpy(), *counts)
    got = rebalance_experts(weight, *counts)
    for name, want, have in zip(("phy2log", "log2phy", "logcnt"), expected, got, strict=True):
        assert have.dtype == torch.int64 and have.device == weight.device, name
        np.testing.assert_array_equal(have.cpu().numpy(), want, err_msg=name)


def test_spec_worked_example():
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor(SPEC_WEIGHT), 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log.numpy(), SPEC_PHY2LOG)
    np.testing.assert_array_equal(logcnt.numpy(), SPEC_LOGCNT)
    check_invariants(phy2log, log2phy, logcnt, 16, 4, 2, 8)


def _random_problem(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A valid problem of SPEC.md: counts drawn small, loads of a random kind."""
    num_groups = int(rng.choice([1, 2, 3, 4, 8]))
    num_nodes = int(rng.choice([1, 2, 4]))  # G % N != 0 draws exercise the global policy
    num_experts = num_groups * int(rng.integers(1, 6))
    num_gpus = num_nodes * int(rng.integers(1, 5))
    per_gpu = -(-num_experts // num_gpus) + int(rng.integers(0, 3))
    num_layers = int(rng.integers(1, 7))
    shape = (num_layers, num_experts)
    kind = rng.integers(0, 6)
    if kind == 0:  # small integers: many ties
        weight = rng.integers(0, 4, shape).astype(np.float64)
    elif kind == 1:  # decimals
        weight = np.round(rng.random(shape) * 100, 2)
    elif kind == 2:  # all zero: idle layers
        weight = np.zeros(shape)
    elif kind == 3:  # skewed token counts with some idle layers and experts
        weight = rng.zipf(1.5, shape).astype(np.float64) * (rng.random((num_layers, 1)) < 0.8)
    elif kind == 4:  # one hot expert per layer
        weight = np.ones(shape)
        weight[np.arange(num_layers), rng.integers(0, num_experts, num_layers)] = 1e6
    else:  # continuous
        weight = rng.random(shape) * 1e3
    return weight, (per_gpu * num_gpus, num_groups, num_nodes, num_gpus)


@pytest.mark.parametrize("seed", range(4))
def test_random_problems_equal_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        weight, counts = _random_problem(rng)
        _assert_same_as_reference(torch.from_numpy(weight), *counts)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int32,
        torch.int64,
        torch.int16,
        torch.int8,
        torch.uint8,
    ],
)
def test_every_real_dtype_equals_reference_on_its_values(dtype):
    rng = np.random.default_rng(7)
    for _ in range(12):
        weight, counts = _random_problem(rng)
        # Values every dtype holds exactly (bfloat16: 8 significant bits).
        tensor = torch.from_numpy(np.minimum(np.round(weight), 100)).to(dtype)
        _assert_same_as_reference(tensor, *counts)
    # Fractions of a power of two, which float16 and bfloat16 also hold exactly.
    if dtype.is_floating_point:
        tensor = torch.tensor([[0.5, 0.25, 1.75, 3.0, 0.125, 2.5, 0.0, 1.0]], dtype=dtype)
        _assert_same_as_reference(tensor, 12, 2, 2, 4)


@pytest.mark.parametrize(
    ("shape", "counts"),
    [
        ((1, 1), (1, 1, 1, 1)),  # one expert, one slot
        ((1, 1), (5, 1, 1, 5)),  # one expert replicated on every GPU
        ((3, 4), (4, 4, 4, 4)),  # one group per node, one slot per GPU
        ((2, 6), (6, 3, 1, 1)),  # one GPU holds everything
        ((2, 8), (64, 2, 1, 2)),  # many more slots than experts
        ((1, 16), (16, 16, 1, 16)),  # groups of one expert
        ((2, 12), (24, 4, 2, 2)),  # one GPU per node
    ],
)
def test_degenerate_shapes(shape, counts):
    rng = np.random.default_rng(3)
    weight = rng.integers(0, 5, shape).astype(np.float64)
    _assert_same_as_reference(torch.from_numpy(weight), *counts)


def test_overflowing_totals_follow_the_spec():
    # Totals overflow to +inf: a non-full pack at +inf must still beat a full one.
    rng = np.random.default_rng(11)
    for _ in range(20):
        weight = rng.integers(0, 3, (3, 16)) * 8e307
        _assert_same_as_reference(torch.from_numpy(weight), 32, 1, 1, 4)
        _assert_same_as_reference(torch.from_numpy(weight[:, :8]), 12, 4, 2, 4)


def test_weights_equal_in_their_top_bits_are_still_sorted_exactly():
    # Loads that differ only in the lowest mantissa bits: the fast integer-key
    # sort cannot tell them apart and must hand those rows to the stable argsort.
    rng = np.random.default_rng(5)
    weight = 1.0 + rng.integers(0, 64, (4, 32)) * np.finfo(np.float64).eps
    with mock.patch.object(_packing.np, "argsort", wraps=np.argsort) as stable_sort:
        order, weight_sorted = _packing._descending_order(weight)
    assert stable_sort.call_count == 1  # the fallback ran
    np.testing.assert_array_equal(order, np.argsort(-weight, axis=1, kind="stable"))
    np.testing.assert_array_equal(weight_sorted, np.take_along_axis(weight, order, axis=1))
    _assert_same_as_reference(torch.from_numpy(weight), 40, 4, 2, 8)
    _assert_same_as_reference(torch.from_numpy(weight), 64, 1, 1, 8)


def test_negative_zero_counts_as_zero():
    weight = np.array([[0.0, -0.0, 1.0, -0.0, 0.0, 2.0, -0.0, 0.0]] * 2)
    _assert_same_as_reference(torch.from_numpy(weight), 16, 2, 2, 4)
    _assert_same_as_reference(torch.from_numpy(weight), 8, 1, 1, 4)


def test_group_loads_are_summed_left_to_right():
    # Group 0 is 1e16 then fifteen 1s: left to right every "+ 1" rounds away
    # (1e16), a pairwise sum keeps them (1e16 + 14) and then outweighs group 1
    # (1e16 + 2), which swaps the two groups' nodes.
    weight = np.zeros((1, 64))
    weight[0, :16] = 1.0
    weight[0, 0], weight[0, 16] = 1e16, 1e16 + 2
    weight[0, 32:] = np.arange(1, 33)
    _assert_same_as_reference(torch.from_numpy(weight), 64, 4, 2, 2)
    pairwise = weight.reshape(1, 4, 16).sum(-1)
    assert pairwise[0, 0] > pairwise[0, 1]  # the sum this test guards against


def test_primitives_equal_reference():
    rng = np.random.default_rng(9)
    for _ in range(40):
        rows, packs, per_pack = (int(x) for x in rng.integers(1, 6, 3))
        weight = rng.integers(0, 4, (rows, packs * per_pack)).astype(np.float64)
        if rng.random() < 0.5:
            weight = rng.random(weight.shape)
        for got, want in zip(
            production.balanced_packing(weight, packs),
            reference.balanced_packing(weight, packs),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
        extra = int(rng.integers(0, 12))
        for got, want in zip(
            production.replicate_experts(weight, weight.shape[1] + extra),
            reference.replicate_experts(weight, weight.shape[1] + extra),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["ties", "skewed", "few-hot", "continuous"])
def test_replication_over_narrowed_candidates_equals_reference(kind):
    # Many extra slots: replication scans only the experts at or above the
    # num_extra-th largest load; ties at that load must all stay in.
    rng = np.random.default_rng(12)
    shape, extra = (3, 256), 48
    weight = {
        "ties": rng.integers(0, 5, shape).astype(np.float64),
        "skewed": rng.zipf(1.3, shape).astype(np.float64),
        "few-hot": np.where(np.arange(256) < 3, 5.0, 0.0) * np.ones(shape),
        "continuous": rng.random(shape),
    }[kind]
    if kind != "few-hot":  # few-hot ties most experts at 0: narrowing declines
        assert _packing._replica_candidates(weight, extra) is not None
    for got, want in zip(
        production.replicate_experts(weight, 256 + extra),
        reference.replicate_experts(weight, 256 + extra),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    _assert_same_as_reference(torch.from_numpy(weight), 256 + extra, 1, 1, 8)


def test_real_loads_in_the_benchmark_configurations(real_loads):
    # One real workload in every configuration (the conformance suite runs them all).
    name = sorted(real_loads)[0]
    for workload in benchmark_workloads({name: real_loads[name]}, BENCHMARK_MODELS):
        _assert_same_as_reference(torch.from_numpy(workload.weight), *workload.counts)


def test_real_loads_with_the_idle_dense_layers(real_loads):
    # The files' first three layers are all zero (dense layers).
    weight = np.concatenate([np.zeros((3, 256)), real_loads[sorted(real_loads)[-1]][:7]])
    _assert_same_as_reference(torch.from_numpy(weight), 288, 8, 4, 32)


def test_input_is_not_modified_and_layouts_do_not_matter():
    rng = np.random.default_rng(2)
    base = torch.from_numpy(rng.integers(0, 9, (8, 24)).astype(np.float32))
    before = base.clone()
    transposed = base.t().contiguous().t()  # same values, column-major strides
    strided = torch.zeros(8, 48)[:, ::2]
    strided.copy_(base)
    grad = base.clone().requires_grad_(True)
    want = rebalance_experts(base, 32, 4, 2, 8)
    for tensor in (transposed, strided, grad, base.to(torch.float64)):
        for have, expected in zip(rebalance_experts(tensor, 32, 4, 2, 8), want, strict=True):
            assert torch.equal(have, expected)
    assert torch.equal(base, before)


@pytest.mark.parametrize(
    ("weight", "counts", "error"),
    [
        (np.ones((2, 8)), (8, 1, 1, 1), TypeError),  # a numpy array, not a tensor
        ([[1.0] * 8], (8, 1, 1, 1), TypeError),  # a list
        (torch.ones(2, 8, dtype=torch.bool), (8, 1, 1, 1), TypeError),
        (torch.ones(2, 8, dtype=torch.complex64), (8, 1, 1, 1), TypeError),
        (torch.tensor([[1.0, float("nan")] * 4]), (8, 1, 1, 1), ValueError),
        (torch.tensor([[1.0, float("inf")] * 4]), (8, 1, 1, 1), ValueError),
        (torch.tensor([[1.0, -1.0] * 4]), (8, 1, 1, 1), ValueError),
        (torch.ones(8), (8, 1, 1, 1), ValueError),  # 1-D
        (torch.ones(0, 8), (8, 1, 1, 1), ValueError),  # no layer
        (torch.ones(2, 8), (4, 1, 1, 1), ValueError),  # R < E
        (torch.ones(2, 8), (8, 3, 1, 1), ValueError),  # E % G
        (torch.ones(2, 8), (9, 1, 1, 2), ValueError),  # R % P
        (torch.ones(2, 8), (8, 1, 3, 4), ValueError),  # P % N
        (torch.ones(2, 8), (8.0, 1, 1, 1), TypeError),  # float count
        (torch.ones(2, 8), (8, True, 1, 1), TypeError),  # bool count
        (torch.ones(2, 8), (8, 1, 0, 1), ValueError),  # zero count
    ],
)
def test_refusals_match_the_reference(weight, counts, error):
    with pytest.raises(error):
        rebalance_experts(weight, *counts)
    if isinstance(weight, torch.Tensor) and not (weight.is_complex() or weight.dtype == torch.bool):
        with pytest.raises(error):
            reference.rebalance_experts(weight.numpy(), *counts)


def test_bfloat16_nan_is_refused():
    with pytest.raises(ValueError, match="finite"):
        rebalance_experts(torch.tensor([[1.0, float("nan")] * 4], dtype=torch.bfloat16), 8, 1, 1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_and_stays_on_the_device():
    rng = np.random.default_rng(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        for _ in range(5):
            weight, counts = _random_problem(rng)
            cpu = torch.from_numpy(np.minimum(np.round(weight), 100)).to(dtype)
            on_cpu = rebalance_experts(cpu, *counts)
            on_cuda = rebalance_experts(cpu.cuda(), *counts)
            for have, want in zip(on_cuda, on_cpu, strict=True):
                assert have.device.type == "cuda" and have.dtype == torch.int64
                assert torch.equal(have.cpu(), want)
    with pytest.raises(ValueError):
        rebalance_experts(torch.tensor([[1.0, -1.0] * 4], device="cuda"), 8, 1, 1, 1)
