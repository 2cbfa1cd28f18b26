"""The migration-aware policy of SPEC.md in plain numpy and Python loops.

SPEC.md "Second policy": relabel a new placement so that the fewest experts
cross the wire (``relabel_for_migration``), and rebalance from the placement
the weights hold now, moving few experts, to within a tolerance of SPEC's
balance (``rebalance_experts_migration_aware``). Clarity over speed; the
production path (``eplb.production``) returns the same integers, faster.
The glossary is in the docstring of ``eplb.reference``.
"""

from __future__ import annotations

import numpy as np

from eplb._validation import check_count, validate_placement, validate_tolerance, validate_weight
from eplb.slot_maps import check_maps, keep_experts_in_place, optimal_assignment

from .numpy_ref import rebalance_experts

__all__ = [
    "exact_gpu_loads",
    "experts_to_receive",
    "greedy_migration",
    "hierarchy_nodes",
    "rebalance_experts_migration_aware",
    "relabel_for_migration",
    "slot_maps_from_phy2log",
]


def experts_to_receive(old_slots: list[int], new_slots: list[int]) -> int:
    """SPEC.md "Experts moved" for one GPU: distinct new experts its old slots lack.

    old_slots, new_slots: the experts of the GPU's slots before and after.
    """
    return len(set(new_slots) - set(old_slots))


def relabel_for_migration(
    old_phy2log: np.ndarray, new_phy2log: np.ndarray, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """SPEC.md "Relabelling": ``new_phy2log`` renamed (nodes, GPUs) to move the fewest experts.

    old_phy2log: [L, R] int, the expert each slot holds now.
    new_phy2log: [L, R] int, the placement to move to; every expert of a layer
        must occur in ``old_phy2log``'s layer.
    num_nodes: N; node n holds slots n*R/N .. (n+1)*R/N - 1.
    num_gpus: P (a multiple of N); GPU g holds slots g*R/P .. (g+1)*R/P - 1.

    Returns [L, R] int64: per layer, new's nodes permuted among nodes and each
    node's GPUs among the GPUs of its new position, so that the experts moved
    (SPEC.md) are the fewest any such relabelling gives; within a GPU, experts
    it holds now keep their slots. Each GPU holds the multiset of experts some
    GPU of ``new_phy2log`` holds: the same loads, renamed.
    """
    old, new = check_maps(old_phy2log, new_phy2log, check_count("num_gpus", num_gpus))
    nodes = check_count("num_nodes", num_nodes)
    if num_gpus % nodes:
        raise ValueError(f"num_nodes must divide num_gpus: num_gpus={num_gpus} % {nodes} != 0")
    num_layers, num_slots = old.shape
    per_gpu = num_slots // num_gpus
    gpus_per_node = num_gpus // nodes
    relabelled = np.empty_like(new)
    for layer in range(num_layers):
        # Step 1: GPU costs; a = new GPU, b = old GPU.
        old_gpu = [list(old[layer, b * per_gpu : (b + 1) * per_gpu]) for b in range(num_gpus)]
        new_gpu = [list(new[layer, a * per_gpu : (a + 1) * per_gpu]) for a in range(num_gpus)]
        gpu_cost = np.empty((num_gpus, num_gpus), dtype=np.int64)
        for a in range(num_gpus):
            for b in range(num_gpus):
                gpu_cost[a, b] = experts_to_receive(old_gpu[b], new_gpu[a])

        # Step 2: node costs, each the best matching of one node pair's GPUs.
        node_cost = np.empty((nodes, nodes), dtype=np.int64)
        pair_match = {}
        for m in range(nodes):
            for n in range(nodes):
                block = gpu_cost[
                    m * gpus_per_node : (m + 1) * gpus_per_node,
                    n * gpus_per_node : (n + 1) * gpus_per_node,
                ]
                match = optimal_assignment(block)
                pair_match[m, n] = match
                node_cost[m, n] = sum(int(block[i, match[i]]) for i in range(gpus_per_node))

        # Step 3: nodes to nodes, then each new GPU to the old GPU of its pair's matching.
        node_match = optimal_assignment(node_cost)
        for m in range(nodes):
            n = int(node_match[m])
            for i in range(gpus_per_node):
                a = m * gpus_per_node + i
                b = n * gpus_per_node + int(pair_match[m, n][i])
                relabelled[layer, b * per_gpu : (b + 1) * per_gpu] = new_gpu[a]

    # Step 4: experts that stay on a GPU keep their slots.
    return keep_experts_in_place(old, relabelled, num_gpus)


def exact_gpu_loads(
    weight: np.ndarray, phy2log: list[int], count: list[int], num_gpus: int
) -> list[float]:
    """SPEC.md "Exact GPU load" of one layer: slot loads added in slot order from 0.0.

    weight: [E] float64, the load of each logical expert.
    phy2log: [R] the expert of each slot; count: [E] the replica count of each expert.
    """
    per_gpu = len(phy2log) // num_gpus
    loads = []
    for gpu in range(num_gpus):
        total = 0.0
        for slot in range(gpu * per_gpu, (gpu + 1) * per_gpu):
            expert = phy2log[slot]
            total += float(weight[expert]) / float(count[expert])
        loads.append(total)
    return loads


def hierarchy_nodes(
    phy2log: np.ndarray, num_groups: int, num_nodes: int, num_experts: int
) -> list[int] | None:
    """The node of every expert's group in one layer, or None if a group spans nodes.

    phy2log: [R] int, the expert of each slot (every expert in some slot).
    """
    group_size = num_experts // num_groups
    slots_per_node = len(phy2log) // num_nodes
    group_node: list[int] = [-1] * num_groups
    for slot, expert in enumerate(phy2log):
        group, node = int(expert) // group_size, slot // slots_per_node
        if group_node[group] == -1:
            group_node[group] = node
        elif group_node[group] != node:
            return None
    return [group_node[e // group_size] for e in range(num_experts)]


def greedy_migration(
    weight: np.ndarray,
    old_phy2log: np.ndarray,
    expert_node: list[int],
    num_nodes: int,
    num_gpus: int,
    limit: float,
    budget: int,
) -> np.ndarray | None:
    """SPEC.md policy step 4 for one layer: improve ``old`` move by move until within ``limit``.

    weight: [E] float64, the new load of each logical expert.
    old_phy2log: [R] int64, the expert each slot holds now.
    expert_node: [E], the node of each expert's group.
    limit: the largest exact GPU load allowed; budget: the most move cost spent.

    Returns [R] int64, the placement reached, or None where no allowed move is left.
    """
    num_slots, num_experts = len(old_phy2log), len(weight)
    per_gpu = num_slots // num_gpus
    slots_per_node = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy2log = [int(e) for e in old_phy2log]
    count = [0] * num_experts
    for expert in phy2log:
        count[expert] += 1
    spent = 0
    while True:
        loads = exact_gpu_loads(weight, phy2log, count, num_gpus)
        peak = max(loads)
        if peak <= limit:
            return np.array(phy2log, dtype=np.int64)
        hot = loads.index(peak)  # the lowest index among equal loads
        node = hot // gpus_per_node
        node_slots = range(node * slots_per_node, (node + 1) * slots_per_node)
        node_experts = [e for e in range(num_experts) if expert_node[e] == node]
        on_hot = set(phy2log[hot * per_gpu : (hot + 1) * per_gpu])

        def node_peak(trial: list[int], trial_count: list[int], node: int = node) -> float:
            trial_loads = exact_gpu_loads(weight, trial, trial_count, num_gpus)
            return max(trial_loads[node * gpus_per_node : (node + 1) * gpus_per_node])

        best: tuple[float, int, int, int] | None = None
        for s in node_slots:
            a = phy2log[s]
            # Replace slot s by expert b (cost 1).
            if spent + 1 <= budget and count[a] >= 2:
                for b in node_experts:
                    if b == a or not (s // per_gpu == hot or b in on_hot):
                        continue
                    trial = phy2log.copy()
                    trial[s] = b
                    trial_count = count.copy()
                    trial_count[a] -= 1
                    trial_count[b] += 1
                    key = (node_peak(trial, trial_count), 1, s, b)
                    if key[0] < peak and (best is None or key < best):
                        best = key
            # Swap slot s on the hot GPU with slot t on another GPU (cost 2).
            if spent + 2 <= budget and s // per_gpu == hot:
                for t in node_slots:
                    if t // per_gpu == hot or phy2log[t] == a:
                        continue
                    trial = phy2log.copy()
                    trial[s], trial[t] = trial[t], trial[s]
                    key = (node_peak(trial, count), 2, s, t)
                    if key[0] < peak and (best is None or key < best):
                        best = key
        if best is None:
            return None
        _, cost, s, x = best
        if cost == 1:
            count[phy2log[s]] -= 1
            count[x] += 1
            phy2log[s] = x
        else:
            phy2log[s], phy2log[x] = phy2log[x], phy2log[s]
        spent += cost


def slot_maps_from_phy2log(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md policy step 5: logcnt [L, E] and log2phy [L, E, K], replica ranks in slot order.

    phy2log: [L, R] int64, every expert in some slot of every layer.
    """
    num_layers, num_slots = phy2log.shape
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        for slot in range(num_slots):
            logcnt[layer, phy2log[layer, slot]] += 1
    log2phy = np.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    for layer in range(num_layers):
        seen = [0] * num_experts
        for slot in range(num_slots):
            expert = phy2log[layer, slot]
            log2phy[layer, expert, seen[expert]] = slot
            seen[expert] += 1
    return log2phy, logcnt


def rebalance_experts_migration_aware(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    old_phy2log: np.ndarray,
    tolerance: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPEC.md "The policy": balance within ``tolerance`` of SPEC's, moving few experts.

    weight: [L, E] real, the new load of each logical expert in each layer.
    num_replicas, num_groups, num_nodes, num_gpus: R, G, N, P as for
        ``rebalance_experts``.
    old_phy2log: [L, R] int, the expert each slot holds now (every expert in
        at least one slot of every layer).
    tolerance: the largest GPU load may exceed SPEC's for this load by this
        fraction (finite, >= 0).

    Returns phy2log [L, R], log2phy [L, E, K] (replica ranks in slot order)
    and logcnt [L, E], int64. Raises ValueError / TypeError naming the
    argument on invalid input, before anything is computed.
    """
    weight64, config = validate_weight(
        np.asarray(weight) if not isinstance(weight, np.ndarray) else weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_gpus,
    )
    old = validate_placement("old_phy2log", old_phy2log, config)
    tol = validate_tolerance(tolerance)
    groups, nodes = (config.num_groups, config.num_nodes) if config.hierarchical else (1, 1)
    num_experts = config.num_logical_experts

    # Step 1: SPEC's placement, relabelled: the fallback.
    spec_phy2log, _, spec_logcnt = rebalance_experts(
        weight64, config.num_replicas, config.num_groups, config.num_nodes, config.num_gpus
    )
    fallback = relabel_for_migration(old, spec_phy2log, nodes, config.num_gpus)
    per_gpu = config.num_replicas // config.num_gpus
    result = np.empty_like(old)
    for layer in range(config.num_layers):
        # Step 2: the limit the fallback sets, and its experts moved (the budget).
        fallback_loads = exact_gpu_loads(
            weight64[layer], list(fallback[layer]), list(spec_logcnt[layer]), config.num_gpus
        )
        limit = (1.0 + tol) * max(fallback_loads)
        budget = sum(
            experts_to_receive(
                list(old[layer, g * per_gpu : (g + 1) * per_gpu]),
                list(fallback[layer, g * per_gpu : (g + 1) * per_gpu]),
            )
            for g in range(config.num_gpus)
        )
        # Step 3: the greedy keeps the old hierarchy, or there is none to keep.
        expert_node = hierarchy_nodes(old[layer], groups, nodes, num_experts)
        reached = None
        if expert_node is not None:
            # Step 4: greedy moves from the old placement.
            reached = greedy_migration(
                weight64[layer], old[layer], expert_node, nodes, config.num_gpus, limit, budget
            )
        result[layer] = fallback[layer] if reached is None else reached

    # Step 5: the maps.
    log2phy, logcnt = slot_maps_from_phy2log(result, num_experts)
    return result, log2phy, logcnt
