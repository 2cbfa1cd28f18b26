"""The numpy reference against SPEC.md: worked example, primitives, invariants, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from eplb.conformance.cases import SPEC_EXAMPLE, SPEC_LOGCNT, SPEC_PHY2LOG
from eplb.reference import (
    balanced_packing,
    rebalance_experts,
    rebalance_experts_hierarchical,
    replicate_experts,
)

# SPEC.md's worked example, as the conformance suite ships it.
SPEC_WEIGHT = SPEC_EXAMPLE.weight


def _check_placement(weight, phy2log, log2phy, logcnt, R, G, N, P):
    """SPEC.md "Invariants", written out independently of the implementation."""
    L, E = weight.shape
    assert phy2log.shape == (L, R) and phy2log.dtype == np.int64
    assert logcnt.shape == (L, E) and logcnt.dtype == np.int64
    assert log2phy.shape == (L, E, logcnt.max()) and log2phy.dtype == np.int64
    assert ((phy2log >= 0) & (phy2log < E)).all()
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == R).all()
    for layer in range(L):
        np.testing.assert_array_equal(np.bincount(phy2log[layer], minlength=E), logcnt[layer])
        for e in range(E):
            for k in range(log2phy.shape[2]):
                if k < logcnt[layer, e]:
                    assert phy2log[layer, log2phy[layer, e, k]] == e
                else:
                    assert log2phy[layer, e, k] == -1
    if G % N == 0:
        node_of_slot = np.arange(R) // (R // N)
        group_of_slot = phy2log // (E // G)
        for layer in range(L):
            for g in range(G):
                assert len(set(node_of_slot[group_of_slot[layer] == g])) == 1


def test_spec_worked_example():
    phy2log, log2phy, logcnt = rebalance_experts(SPEC_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, SPEC_PHY2LOG)
    np.testing.assert_array_equal(logcnt, SPEC_LOGCNT)
    _check_placement(SPEC_WEIGHT, phy2log, log2phy, logcnt, 16, 4, 2, 8)


def test_reference_imports_neither_torch_nor_jax():
    code = (
        "import sys, eplb.reference, eplb.reference.numpy_ref;"
        "bad = [m for m in ('torch', 'jax') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_balanced_packing_ties_go_to_lowest_pack_and_keep_item_order():
    # All equal: items arrive 0,1,2,3; equal totals pick the lowest pack.
    pack, rank = balanced_packing(np.ones((1, 4)), 2)
    np.testing.assert_array_equal(pack, [[0, 1, 0, 1]])
    np.testing.assert_array_equal(rank, [[0, 0, 1, 1]])


def test_balanced_packing_is_greedy_largest_first():
    # 5 -> p0, 4 -> p1, 3 -> p1 (4 < 5), 1 -> p0 (p1 is full).
    pack, rank = balanced_packing(np.array([[1.0, 5.0, 3.0, 4.0]]), 2)
    np.testing.assert_array_equal(pack, [[0, 0, 1, 1]])
    np.testing.assert_array_equal(rank, [[1, 0, 1, 0]])


def test_balanced_packing_one_item_per_pack_is_the_identity():
    pack, rank = balanced_packing(np.array([[3.0, 9.0, 1.0]]), 3)
    np.testing.assert_array_equal(pack, [[0, 1, 2]])
    np.testing.assert_array_equal(rank, [[0, 0, 0]])


def test_replicate_experts_gives_extra_slots_to_the_largest_per_replica_load():
    phy2log, rank, logcnt = replicate_experts(np.array([[4.0, 1.0, 3.0]]), 6)
    # Slot 3: 4/1 wins; slot 4: 3/1 > 4/2; slot 5: 4/2 = 2 > 3/2.
    np.testing.assert_array_equal(phy2log, [[0, 1, 2, 0, 2, 0]])
    np.testing.assert_array_equal(rank, [[0, 0, 0, 1, 1, 2]])
    np.testing.assert_array_equal(logcnt, [[3, 1, 2]])


def test_replicate_experts_ties_go_to_the_lowest_expert():
    phy2log, _, logcnt = replicate_experts(np.array([[2.0, 2.0]]), 3)
    np.testing.assert_array_equal(phy2log, [[0, 1, 0]])
    np.testing.assert_array_equal(logcnt, [[2, 1]])


def test_hierarchical_keeps_groups_on_one_node():
    rng = np.random.default_rng(0)
    weight = rng.integers(0, 50, size=(3, 32)).astype(np.float64)
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, 48, 8, 4, 16)
    group_of_slot = phy2log // 4
    for layer in range(3):
        for node in range(4):
            groups = set(group_of_slot[layer, node * 12 : (node + 1) * 12])
            assert len(groups) == 2
    # phyrank numbers each expert's replicas 0..logcnt-1.
    for layer in range(3):
        for e in range(32):
            assert sorted(phyrank[layer, phy2log[layer] == e]) == list(range(logcnt[layer, e]))


@pytest.mark.parametrize(
    ("shape", "R", "G", "N", "P"),
    [
        ((1, 16), 24, 4, 2, 8),  # one layer
        ((3, 16), 16, 4, 2, 8),  # R == E: no redundancy
        ((3, 16), 32, 4, 4, 8),  # G == N
        ((3, 16), 32, 4, 2, 2),  # P == N: one GPU per node
        ((3, 16), 20, 4, 2, 1 * 2),  # R/P = 10
        ((2, 8), 16, 2, 1, 1),  # one GPU
        ((2, 8), 12, 8, 2, 4),  # one expert per group
        ((2, 12), 16, 3, 2, 4),  # G % N != 0: global policy
        ((2, 1), 4, 1, 1, 2),  # one expert, four replicas
    ],
)
def test_degenerate_shapes_satisfy_the_invariants(shape, R, G, N, P):
    rng = np.random.default_rng(sum(shape) + R)
    weight = rng.integers(0, 20, size=shape).astype(np.float64)
    phy2log, log2phy, logcnt = rebalance_experts(weight, R, G, N, P)
    _check_placement(weight, phy2log, log2phy, logcnt, R, G, N, P)
    if R == shape[1]:
        assert (logcnt == 1).all()


def test_global_policy_equals_hierarchy_with_one_group_and_node():
    rng = np.random.default_rng(1)
    weight = rng.random((2, 12))
    phy2log, _, logcnt = rebalance_experts(weight, 16, 3, 2, 4)
    expected, _, expected_cnt = rebalance_experts_hierarchical(weight, 16, 1, 1, 4)
    np.testing.assert_array_equal(phy2log, expected)
    np.testing.assert_array_equal(logcnt, expected_cnt)


def test_integer_and_float_inputs_agree():
    weight = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], dtype=np.int32)
    a = rebalance_experts(weight, 12, 2, 2, 4)
    b = rebalance_experts(weight.astype(np.float32), 12, 2, 2, 4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_all_zero_load_is_valid():
    phy2log, log2phy, logcnt = rebalance_experts(np.zeros((2, 8)), 12, 2, 2, 4)
    _check_placement(np.zeros((2, 8)), phy2log, log2phy, logcnt, 12, 2, 2, 4)


def test_real_loads_satisfy_invariants(real_loads):
    weight = next(iter(real_loads.values()))[:4]
    phy2log, log2phy, logcnt = rebalance_experts(weight, 288, 8, 4, 32)
    _check_placement(weight, phy2log, log2phy, logcnt, 288, 8, 4, 32)
