"""Conformance of SPEC.md's second policy: migration-aware rebalancing.

``migration_problems()`` draws a valid input of
``rebalance_experts_migration_aware``: a problem of ``problems()`` (the new
load), an old placement and a tolerance. The old placement is SPEC's placement
for the load drifted by up to the drawn fraction per expert (what a server
holds after the previous rebalance; it respects the hierarchy), or a shuffled
one (every expert once, the other slots random: it usually does not, and the
policy must fall back). ``check_migration_agreement`` runs the numpy reference
and the torch production path and raises ``AssertionError`` at the first
differing entry; ``check_migration_result`` checks what SPEC.md promises of
any result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from .agreement import first_difference
from .cases import LOAD_KINDS, Problem
from .strategies import problems

__all__ = [
    "MigrationProblem",
    "check_migration_agreement",
    "check_migration_result",
    "migration_problems",
]


@dataclass(frozen=True)
class MigrationProblem:
    """One valid input of ``rebalance_experts_migration_aware``.

    old_phy2log: [L, R] int64, the expert each slot holds now.
    """

    problem: Problem
    old_phy2log: np.ndarray = field(repr=False)
    tolerance: float
    old_kind: str


@st.composite
def migration_problems(draw: st.DrawFn) -> MigrationProblem:
    """A new load, an old placement ("drifted" or "shuffled") and a tolerance."""
    from eplb.reference import rebalance_experts

    # Small sizes only: the reference scores every candidate move in Python.
    # No "overflow" loads: drifting them overflows to inf.
    problem = draw(problems(large=False, kinds=tuple(k for k in LOAD_KINDS if k != "overflow")))
    tolerance = draw(st.sampled_from([0.0, 0.01, 0.02, 0.1]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_layers, num_experts = problem.weight.shape
    old_kind = draw(st.sampled_from(["drifted", "drifted", "shuffled"]))
    if old_kind == "drifted":
        drift = draw(st.sampled_from([0.0, 0.1, 0.5]))
        old_load = problem.weight * rng.uniform(1.0 - drift, 1.0 + drift, problem.weight.shape)
        old, _, _ = rebalance_experts(old_load, *problem.counts)
    else:
        extra = rng.integers(0, num_experts, (num_layers, problem.num_replicas - num_experts))
        old = np.concatenate(
            [np.tile(np.arange(num_experts), (num_layers, 1)), extra], axis=1
        ).astype(np.int64)
        old = rng.permuted(old, axis=1)
    return MigrationProblem(problem, old, tolerance, old_kind)


def _reference(case: MigrationProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from eplb.reference.migration import rebalance_experts_migration_aware

    return rebalance_experts_migration_aware(
        case.problem.weight,
        *case.problem.counts,
        old_phy2log=case.old_phy2log,
        tolerance=case.tolerance,
    )


def check_migration_agreement(case: MigrationProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference and production agree exactly on ``case``; returns the reference's result."""
    import torch

    from eplb.production import rebalance_experts_migration_aware

    expected = _reference(case)
    got = rebalance_experts_migration_aware(
        torch.from_numpy(case.problem.weight),
        *case.problem.counts,
        old_phy2log=torch.from_numpy(case.old_phy2log),
        tolerance=case.tolerance,
    )
    difference = first_difference(expected, tuple(t.numpy() for t in got))
    if difference is not None:
        raise AssertionError(f"production differs from the reference on {case}: {difference}")
    return expected


def check_migration_result(
    case: MigrationProblem, result: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """What SPEC.md promises of every result of the policy; AssertionError if broken.

    Every expert held, maps consistent, largest exact GPU load within the
    tolerance of SPEC's, every group on one node (hierarchical policy), and no
    more experts moved than relabelling SPEC's placement.
    """
    from eplb.metrics import experts_moved
    from eplb.reference import rebalance_experts
    from eplb.reference.migration import exact_gpu_loads, relabel_for_migration

    problem, old = case.problem, case.old_phy2log
    phy2log, log2phy, logcnt = result
    num_layers, num_experts = problem.weight.shape
    gpus, nodes = problem.num_gpus, problem.num_nodes if problem.hierarchical else 1
    spec, _, spec_logcnt = rebalance_experts(problem.weight, *problem.counts)
    relabelled = relabel_for_migration(old, spec, nodes, gpus)
    moved = experts_moved(old, phy2log, gpus).sum(-1)
    budget = experts_moved(old, relabelled, gpus).sum(-1)
    group_size = num_experts // (problem.num_groups if problem.hierarchical else 1)
    slots_per_node = problem.num_replicas // nodes
    for layer in range(num_layers):
        row = phy2log[layer]
        counts = np.bincount(row, minlength=num_experts)
        assert (counts == logcnt[layer]).all() and (counts >= 1).all(), f"layer {layer}: counts"
        for e in range(num_experts):
            slots = log2phy[layer, e, : counts[e]]
            assert (row[slots] == e).all() and (np.diff(slots) > 0).all(), f"layer {layer}: log2phy"
            assert (log2phy[layer, e, counts[e] :] == -1).all(), f"layer {layer}: log2phy padding"
        peak = max(exact_gpu_loads(problem.weight[layer], list(row), list(counts), gpus))
        # SPEC's loads, added in the slot order of the relabelled placement.
        target = max(
            exact_gpu_loads(
                problem.weight[layer], list(relabelled[layer]), list(spec_logcnt[layer]), gpus
            )
        )
        assert peak <= (1.0 + case.tolerance) * target, f"layer {layer}: {peak} > limit"
        node_of_group: dict[int, int] = {}
        for slot, expert in enumerate(row):
            group, node = int(expert) // group_size, slot // slots_per_node
            assert node_of_group.setdefault(group, node) == node, f"layer {layer}: hierarchy"
        assert moved[layer] <= budget[layer], f"layer {layer}: moved {moved[layer]}"
