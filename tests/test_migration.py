"""Migration-aware rebalancing (SPEC.md "Second policy"): relabelling, the policy, agreement.

Brute force over every hierarchical relabelling checks optimality on small
cases; hypothesis (``ci`` profile) checks that the numpy reference and the torch
production path return the same integers, and what SPEC.md promises of each result.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given

from eplb.conformance import (
    MigrationProblem,
    check_migration_agreement,
    check_migration_result,
    migration_problems,
)
from eplb.metrics import balancedness, experts_moved, gpu_loads
from eplb.production import migration as production
from eplb.production import plan_rearrangement
from eplb.reference import migration as reference
from eplb.reference import rebalance_experts
from eplb.slot_maps import optimal_assignment


def _random_placement(rng: np.random.Generator, experts: int, slots: int) -> np.ndarray:
    """[slots] int64: every expert once, the other slots random, shuffled."""
    row = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
    return rng.permutation(row).astype(np.int64)


def _relabellings(nodes: int, gpus: int):
    """Every hierarchical relabelling: [P] old GPU of each new GPU."""
    per_node = gpus // nodes
    for node_perm in itertools.permutations(range(nodes)):
        for gpu_perms in itertools.product(itertools.permutations(range(per_node)), repeat=nodes):
            yield np.array(
                [
                    node_perm[m] * per_node + gpu_perms[m][i]
                    for m in range(nodes)
                    for i in range(per_node)
                ]
            )


def _moved_under(old: np.ndarray, new: np.ndarray, target: np.ndarray, gpus: int) -> int:
    per_gpu = old.size // gpus
    relabelled = np.empty_like(new)
    for a, b in enumerate(target):
        relabelled[b * per_gpu : (b + 1) * per_gpu] = new[a * per_gpu : (a + 1) * per_gpu]
    return int(experts_moved(old[None], relabelled[None], gpus).sum())


def _brute_force_moved(old: np.ndarray, new: np.ndarray, nodes: int, gpus: int) -> int:
    return min(_moved_under(old, new, t, gpus) for t in _relabellings(nodes, gpus))


def _nodes_then_gpus_moved(old: np.ndarray, new: np.ndarray, nodes: int, gpus: int) -> int:
    """Nodes matched first by their node-level expert sets, then GPUs inside each pair."""
    per_node_slots, per_node = old.size // nodes, gpus // nodes
    per_gpu = old.size // gpus
    node_cost = np.array(
        [
            [
                len(
                    set(new[m * per_node_slots : (m + 1) * per_node_slots])
                    - set(old[n * per_node_slots : (n + 1) * per_node_slots])
                )
                for n in range(nodes)
            ]
            for m in range(nodes)
        ]
    )
    node_match = optimal_assignment(node_cost)
    target = np.empty(gpus, dtype=np.int64)
    for m, n in enumerate(node_match):
        cost = np.array(
            [
                [
                    len(
                        set(new[a * per_gpu : (a + 1) * per_gpu])
                        - set(old[b * per_gpu : (b + 1) * per_gpu])
                    )
                    for b in range(n * per_node, (n + 1) * per_node)
                ]
                for a in range(m * per_node, (m + 1) * per_node)
            ]
        )
        target[m * per_node : (m + 1) * per_node] = n * per_node + optimal_assignment(cost)
    return _moved_under(old, new, target, gpus)


def _nodes_of(row: np.ndarray, nodes: int, gpus: int) -> list:
    """Each node as the sorted list of its GPUs' sorted experts, nodes sorted."""
    per_gpu, per_node = row.size // gpus, gpus // nodes
    gpu_sets = [tuple(sorted(row[g * per_gpu : (g + 1) * per_gpu])) for g in range(gpus)]
    return sorted(sorted(gpu_sets[n * per_node : (n + 1) * per_node]) for n in range(nodes))


SMALL_SHAPES = [(2, 4, 8, 12), (2, 6, 6, 12), (3, 6, 9, 12), (2, 4, 5, 8)]  # (N, P, E, R)


@pytest.mark.parametrize(("nodes", "gpus", "experts", "slots"), SMALL_SHAPES)
def test_relabelling_moves_the_brute_force_optimum(nodes, gpus, experts, slots):
    rng = np.random.default_rng(nodes * 100 + gpus)
    for _ in range(15):
        old = np.stack([_random_placement(rng, experts, slots) for _ in range(2)])
        new = np.stack([_random_placement(rng, experts, slots) for _ in range(2)])
        out = reference.relabel_for_migration(old, new, nodes, gpus)
        fast = production.relabel_for_migration(
            torch.from_numpy(old), torch.from_numpy(new), nodes, gpus
        )
        np.testing.assert_array_equal(fast.numpy(), out)
        moved = experts_moved(old, out, gpus).sum(-1)
        for layer in range(2):
            assert moved[layer] == _brute_force_moved(old[layer], new[layer], nodes, gpus)
            # The same GPUs (sorted experts, hence loads), the same GPUs together on a node.
            assert _nodes_of(out[layer], nodes, gpus) == _nodes_of(new[layer], nodes, gpus)


def test_nodes_then_gpus_is_not_optimal_but_the_joint_matching_is():
    # Matching nodes by their node-level sets first can lose: a node pair that
    # shares many experts may share them on the wrong GPUs.
    rng = np.random.default_rng(7)
    worse = 0
    for _ in range(60):
        old, new = (_random_placement(rng, 6, 8) for _ in range(2))
        best = _brute_force_moved(old, new, 2, 4)
        joint = int(
            experts_moved(
                old[None], reference.relabel_for_migration(old[None], new[None], 2, 4), 4
            ).sum()
        )
        assert joint == best
        two_stage = _nodes_then_gpus_moved(old, new, 2, 4)
        assert two_stage >= best
        worse += two_stage > best
    assert worse > 0


def test_relabelling_keeps_sorted_gpu_loads_and_slots_of_staying_experts(real_loads):
    load = real_loads["prefill_in1024"][:6]
    drifted = load * np.random.default_rng(0).uniform(0.9, 1.1, load.shape)
    old, _, _ = rebalance_experts(load, 288, 8, 4, 32)
    new, _, logcnt = rebalance_experts(drifted, 288, 8, 4, 32)
    out = production.relabel_for_migration(
        torch.from_numpy(old), torch.from_numpy(new), 4, 32
    ).numpy()
    # Slot loads sorted within each GPU, so that the sums do not depend on slot order.
    np.testing.assert_array_equal(
        np.sort(_order_free_gpu_loads(drifted, out, logcnt), -1),
        np.sort(_order_free_gpu_loads(drifted, new, logcnt), -1),
    )
    # Every GPU of the result holds the multiset of some GPU of new, on the same node.
    for layer in range(6):
        new_sets = {tuple(sorted(new[layer, g * 9 : (g + 1) * 9])) for g in range(32)}
        assert {tuple(sorted(out[layer, g * 9 : (g + 1) * 9])) for g in range(32)} == new_sets
    moved = experts_moved(old, out, 32).sum()
    assert moved < experts_moved(old, new, 32).sum()
    # Relabelling old to itself moves nothing and changes nothing.
    same = production.relabel_for_migration(torch.from_numpy(old), torch.from_numpy(old), 4, 32)
    np.testing.assert_array_equal(same.numpy(), old)


def _order_free_gpu_loads(weight, phy2log, logcnt, gpus=32):
    slot_load = np.take_along_axis(weight / logcnt, phy2log, axis=1)
    per_gpu = np.sort(slot_load.reshape(len(weight), gpus, -1), axis=-1)
    return per_gpu.sum(-1)


def test_experts_moved_counts_the_transfers_of_the_rearrangement_plan():
    rng = np.random.default_rng(3)
    old = np.stack([_random_placement(rng, 10, 16) for _ in range(3)])
    new = np.stack([_random_placement(rng, 10, 16) for _ in range(3)])
    plan = plan_rearrangement(old, new, 4)
    per_layer = np.bincount(plan.transfers[:, 0], minlength=3)
    np.testing.assert_array_equal(experts_moved(old, new, 4).sum(-1), per_layer)


@given(migration_problems())
def test_reference_and_production_agree_and_keep_the_promises(case: MigrationProblem):
    check_migration_result(case, check_migration_agreement(case))


def test_policy_on_real_drift_moves_little_within_tolerance(real_loads):
    load = real_loads["decode_in1000out1000"][:8]
    drifted = load * np.random.default_rng(1).uniform(0.9, 1.1, load.shape)
    old, _, _ = rebalance_experts(load, 288, 8, 4, 32)
    case = MigrationProblem(
        problem=_problem(drifted, 288, 8, 4, 32),
        old_phy2log=old,
        tolerance=0.02,
        old_kind="drifted",
    )
    result = check_migration_agreement(case)
    check_migration_result(case, result)
    spec, _, _ = rebalance_experts(drifted, 288, 8, 4, 32)
    # Loose: the greedy's whole point is far fewer moves than SPEC's placement.
    assert experts_moved(old, result[0], 32).sum() * 5 < experts_moved(old, spec, 32).sum()


def test_default_tolerance_meets_the_balance_and_bytes_target_on_real_drift(real_loads):
    # Issue 17's target: balancedness within 1% of SPEC's new placement for at
    # least 5x fewer experts moved, with the default tolerance.
    load = real_loads["prefill_in1024"][3:15]
    drifted = load * np.random.default_rng(3).uniform(0.9, 1.1, load.shape)
    old, _, _ = rebalance_experts(load, 288, 8, 4, 32)
    phy2log, _, logcnt = reference.rebalance_experts_migration_aware(
        drifted, 288, 8, 4, 32, old_phy2log=old
    )
    spec, _, spec_cnt = rebalance_experts(drifted, 288, 8, 4, 32)
    ours = balancedness(gpu_loads(drifted, phy2log, logcnt, 32)).mean()
    theirs = balancedness(gpu_loads(drifted, spec, spec_cnt, 32)).mean()
    assert ours >= 0.99 * theirs
    assert experts_moved(old, phy2log, 32).sum() * 5 <= experts_moved(old, spec, 32).sum()


def _problem(weight, r, g, n, p):
    from eplb.conformance import Problem

    return Problem(weight, r, g, n, p)


def test_an_old_placement_without_the_hierarchy_falls_back_to_relabelled_spec():
    weight = np.arange(1.0, 9.0)[None] ** 2  # 8 experts, 4 groups of 2, 2 nodes of 2 GPUs
    old = np.array([[0, 2, 4, 6, 1, 3, 5, 7]])  # every group split over both nodes
    result = reference.rebalance_experts_migration_aware(weight, 8, 4, 2, 4, old_phy2log=old)
    spec, _, _ = rebalance_experts(weight, 8, 4, 2, 4)
    np.testing.assert_array_equal(result[0], reference.relabel_for_migration(old, spec, 2, 4))


def test_tolerance_trades_balance_for_moves(real_loads):
    load = real_loads["prefill_in2048"][:6]
    drifted = load * np.random.default_rng(2).uniform(0.9, 1.1, load.shape)
    old = torch.from_numpy(rebalance_experts(load, 288, 8, 4, 32)[0])
    moved = []
    for tolerance in (0.0, 0.05):
        phy2log, _, _ = production.rebalance_experts_migration_aware(
            torch.from_numpy(drifted), 288, 8, 4, 32, old_phy2log=old, tolerance=tolerance
        )
        moved.append(experts_moved(old.numpy(), phy2log.numpy(), 32).sum())
    assert moved[1] < moved[0]


_GOOD = dict(num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"old_phy2log": np.zeros((1, 12), dtype=np.int64)},
            ValueError,
            "old_phy2log must hold every expert",
        ),
        (
            {"old_phy2log": np.zeros((2, 12), dtype=np.int64)},
            ValueError,
            "old_phy2log must have shape",
        ),
        ({"old_phy2log": np.full((1, 12), 0.5)}, TypeError, "old_phy2log must hold integers"),
        ({"old_phy2log": np.full((1, 12), 8)}, ValueError, "old_phy2log must hold expert ids"),
        ({"tolerance": -0.1}, ValueError, "tolerance must be finite and >= 0"),
        ({"tolerance": float("nan")}, ValueError, "tolerance must be finite"),
        ({"tolerance": True}, TypeError, "tolerance must be a real number"),
        ({"tolerance": "0.02"}, TypeError, "tolerance must be a real number"),
        ({"num_gpus": 5}, ValueError, "num_gpus"),
    ],
)
def test_bad_input_is_refused_by_both(change, error, match):
    args = {**_GOOD, "old_phy2log": np.tile(np.arange(12) % 8, (1, 1)), "tolerance": 0.02, **change}
    weight = np.ones((1, 8))
    with pytest.raises(error, match=match):
        reference.rebalance_experts_migration_aware(weight, **args)
    old = args["old_phy2log"]
    args["old_phy2log"] = torch.from_numpy(old) if isinstance(old, np.ndarray) else old
    with pytest.raises(error, match=match):
        production.rebalance_experts_migration_aware(torch.from_numpy(weight), **args)


def test_production_refuses_an_old_placement_that_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"old_phy2log must be a torch\.Tensor"):
        production.rebalance_experts_migration_aware(
            torch.ones(1, 8), 12, 2, 2, 4, old_phy2log=np.arange(12)[None] % 8
        )


@pytest.mark.parametrize("impl", ["reference", "production"])
@pytest.mark.parametrize(
    ("nodes", "gpus", "error", "match"),
    [
        (3, 4, ValueError, "num_nodes must divide num_gpus"),
        (0, 4, ValueError, "num_nodes"),
        (2, 5, ValueError, "world size must divide"),
        (2, 2.0, TypeError, "num_gpus"),
    ],
)
def test_relabelling_refuses_bad_counts(impl, nodes, gpus, error, match):
    old = torch.arange(8).reshape(1, 8)
    module = reference if impl == "reference" else production
    maps = (old.numpy(), old.numpy()) if impl == "reference" else (old, old)
    with pytest.raises(error, match=match):
        module.relabel_for_migration(*maps, nodes, gpus)


def test_balancer_with_migration_tolerance_rebalances_from_its_placement(monkeypatch):
    import eplb.production.serving as serving
    from eplb.production import ExpertBalancer

    calls = []
    policy = serving.rebalance_experts_migration_aware

    def recording(weight, *counts, old_phy2log, tolerance):
        calls.append((weight.clone(), old_phy2log.clone(), tolerance))
        return policy(weight, *counts, old_phy2log=old_phy2log, tolerance=tolerance)

    monkeypatch.setattr(serving, "rebalance_experts_migration_aware", recording)
    layers, experts, slots = 2, 8, 12
    balancer = ExpertBalancer(
        layers,
        experts,
        slots,
        2,
        1,
        device="cpu",
        window_size=4,
        step_interval=3,
        migration_tolerance=0.05,
    )
    initial = balancer.phy2log.clone()
    weights = [
        [torch.arange(slots, dtype=torch.float32)[:, None].repeat(1, 2)] for _ in range(layers)
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        for layer in range(layers):
            balancer.route(layer, torch.randint(0, 3, (50, 2), generator=generator))
        balancer.step(weights)
    assert balancer.stats.rebalances == 1 and len(calls) == 1
    load, old, tolerance = calls[0]
    assert torch.equal(old, initial) and tolerance == 0.05
    expected = reference.rebalance_experts_migration_aware(
        load.numpy(), slots, 2, 1, 1, old_phy2log=old.numpy(), tolerance=0.05
    )
    # One GPU holds every slot: any placement is within the tolerance, so nothing moves,
    # where SPEC's placement for this skewed load would replicate experts 0..2.
    assert torch.equal(balancer.phy2log, torch.from_numpy(expected[0]))
    assert torch.equal(balancer.phy2log, initial)
    assert not np.array_equal(rebalance_experts(load.numpy(), slots, 2, 1, 1)[0], initial.numpy())
    assert torch.equal(balancer.logcnt, torch.from_numpy(expected[2]))
    balancer.close()


@pytest.mark.parametrize(("value", "error"), [(-1.0, ValueError), ("0.1", TypeError)])
def test_balancer_refuses_a_bad_migration_tolerance(value, error):
    from eplb.production import ExpertBalancer

    with pytest.raises(error, match="migration_tolerance must be"):
        ExpertBalancer(2, 8, 12, 2, 1, device="cpu", migration_tolerance=value)
