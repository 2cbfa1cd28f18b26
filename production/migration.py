"""Production migration-aware rebalancing: torch tensors in and out, SPEC.md's second policy.

``relabel_for_migration`` and ``rebalance_experts_migration_aware`` return
exactly what their namesakes in ``eplb.reference.migration`` return. The
reference loops over GPU pairs, candidate moves and slots in Python; here each
of those loops is one numpy operation over all of them at once, with the
float64 operations of the spec in the spec's order (slot loads are single
divisions; GPU loads are added slot by slot, ``_loads_in_order``), so the
comparisons that choose a move see the very same numbers. The scipy
assignments are the same calls on the same integer matrices.

The glossary (phy2log, log2phy, logcnt, slot) is the one of ``eplb.reference``.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb._validation import check_count, validate_placement, validate_tolerance
from eplb.metrics import experts_moved
from eplb.slot_maps import check_maps, keep_experts_in_place, optimal_assignment

from ._packing import rebalance_experts_hierarchical
from .rebalance import prepare_weight

__all__ = [
    "exact_gpu_loads",
    "greedy_migration",
    "hierarchy_nodes",
    "rebalance_experts_migration_aware",
    "relabel_for_migration",
    "slot_maps_from_phy2log",
]


def relabel_for_migration(
    old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """SPEC.md "Relabelling": ``new_phy2log`` renamed (nodes, GPUs) to move the fewest experts.

    old_phy2log: [L, R] int tensor (or numpy array), the expert each slot holds now.
    new_phy2log: [L, R] int tensor (or numpy array), the placement to move to;
        every expert of a layer must occur in ``old_phy2log``'s layer.
    num_nodes: N; node n holds slots n*R/N .. (n+1)*R/N - 1.
    num_gpus: P (a multiple of N); GPU g holds slots g*R/P .. (g+1)*R/P - 1.

    Returns [L, R] int64 on ``new_phy2log``'s device (CPU for numpy): per
    layer, new's nodes permuted among nodes and each node's GPUs among the GPUs
    of its new position, moving the fewest experts any such relabelling can;
    within a GPU, experts it holds now keep their slots. The same per-GPU
    experts and loads as ``new_phy2log``, renamed. Raises TypeError/ValueError
    naming the argument on invalid maps or counts.
    """
    old, new = check_maps(old_phy2log, new_phy2log, check_count("num_gpus", num_gpus))
    nodes = check_count("num_nodes", num_nodes)
    if num_gpus % nodes:
        raise ValueError(f"num_nodes must divide num_gpus: num_gpus={num_gpus} % {nodes} != 0")
    relabelled = _relabel(old, new, nodes, num_gpus)
    device = new_phy2log.device if isinstance(new_phy2log, torch.Tensor) else torch.device("cpu")
    return torch.from_numpy(relabelled).to(device)


def _relabel(old: np.ndarray, new: np.ndarray, nodes: int, gpus: int) -> np.ndarray:
    """:func:`relabel_for_migration` of checked host maps: [L, R] int64 in, [L, R] int64 out."""
    layers, slots = old.shape
    per_gpu, gpus_per_node = slots // gpus, gpus // nodes
    experts = int(max(old.max(), new.max())) + 1
    # Step 1: GPU costs for all layers at once: distinct new experts of GPU a
    # minus those GPU b holds already (a product of presence matrices).
    held = _presence(old, gpus, experts).astype(np.float64)
    wanted = _presence(new, gpus, experts).astype(np.float64)
    overlap = np.rint(wanted @ held.transpose(0, 2, 1)).astype(np.int64)  # exact: small counts
    gpu_cost = wanted.sum(-1).astype(np.int64)[:, :, None] - overlap  # [L, a, b]
    blocks = gpu_cost.reshape(layers, nodes, gpus_per_node, nodes, gpus_per_node)

    target_gpu = np.empty((layers, gpus), dtype=np.int64)
    for layer in range(layers):
        # Step 2: node costs, each the best matching of one node pair's GPUs.
        pair_match = np.empty((nodes, nodes, gpus_per_node), dtype=np.int64)
        node_cost = np.empty((nodes, nodes), dtype=np.int64)
        for m in range(nodes):
            for n in range(nodes):
                block = blocks[layer, m, :, n, :]
                match = optimal_assignment(np.ascontiguousarray(block))
                pair_match[m, n] = match
                node_cost[m, n] = block[np.arange(gpus_per_node), match].sum()
        # Step 3: nodes to nodes; each new GPU to the old GPU its pair matched it with.
        node_match = optimal_assignment(node_cost)
        target_gpu[layer] = (
            node_match[:, None] * gpus_per_node + pair_match[np.arange(nodes), node_match]
        ).ravel()
    # New GPU a's slots, in order, become old GPU target_gpu[a]'s slots.
    dest = target_gpu[:, :, None] * per_gpu + np.arange(per_gpu)
    relabelled = np.empty_like(new)
    np.put_along_axis(relabelled, dest.reshape(layers, slots), new, axis=1)
    # Step 4: experts that stay on a GPU keep their slots.
    return keep_experts_in_place(old, relabelled, gpus)


def _presence(phy2log: np.ndarray, gpus: int, experts: int) -> np.ndarray:
    """[L, P, E] bool: which experts each GPU holds. phy2log: [L, R] int64."""
    layers, slots = phy2log.shape
    present = np.zeros((layers, gpus, experts), dtype=bool)
    layer = np.arange(layers)[:, None]
    present[layer, np.arange(slots)[None, :] // (slots // gpus), phy2log] = True
    return present


def _loads_in_order(slot_load: np.ndarray) -> np.ndarray:
    """[..., k] slot loads to [...] sums, added slot by slot from 0.0 (SPEC.md "Exact GPU load").

    ``np.sum`` adds pairwise, in another order than the spec; this loop runs over
    the few slots of a GPU only, each addition over all GPUs and candidates.
    """
    total = np.zeros(slot_load.shape[:-1], dtype=np.float64)
    for k in range(slot_load.shape[-1]):
        total += slot_load[..., k]
    return total


def exact_gpu_loads(
    weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int
) -> np.ndarray:
    """SPEC.md "Exact GPU load" for all layers: ``[L, P]`` float64.

    weight: [L, E] float64; phy2log: [L, R] int64; logcnt: [L, E] int64.
    """
    layers, slots = phy2log.shape
    per_replica = weight / logcnt
    slot_load = np.take_along_axis(per_replica, phy2log, axis=1)
    return _loads_in_order(slot_load.reshape(layers, num_gpus, slots // num_gpus))


def hierarchy_nodes(
    phy2log: np.ndarray, num_groups: int, num_nodes: int, num_experts: int
) -> np.ndarray:
    """The node of each expert's group, per layer: ``[L, E]`` int64, -1 where a group spans nodes.

    phy2log: [L, R] int64, every expert in some slot of every layer. A layer
    with a group on more than one node is all -1 (it cannot be kept).
    """
    layers, slots = phy2log.shape
    group_size = num_experts // num_groups
    group = phy2log // group_size
    node = np.broadcast_to(np.arange(slots) // (slots // num_nodes), phy2log.shape)
    row = np.arange(layers)[:, None]
    lowest = np.full((layers, num_groups), num_nodes, dtype=np.int64)
    highest = np.full((layers, num_groups), -1, dtype=np.int64)
    np.minimum.at(lowest, (row, group), node)
    np.maximum.at(highest, (row, group), node)
    kept = (lowest == highest).all(axis=1)
    expert_node = np.repeat(lowest, group_size, axis=1)
    expert_node[~kept] = -1
    return expert_node


def greedy_migration(
    weight: np.ndarray,
    old_phy2log: np.ndarray,
    expert_node: np.ndarray,
    num_nodes: int,
    num_gpus: int,
    limit: float,
    budget: int,
) -> np.ndarray | None:
    """SPEC.md policy step 4 for one layer: improve ``old`` move by move until within ``limit``.

    weight: [E] float64, the new load of each logical expert.
    old_phy2log: [R] int64, the expert each slot holds now.
    expert_node: [E] int64, the node of each expert's group.
    limit: the largest exact GPU load allowed; budget: the most move cost spent.

    Returns [R] int64, the placement reached, or None where no allowed move is
    left. Each step scores every candidate move at once (one row per candidate).
    """
    slots = old_phy2log.size
    per_gpu, slots_per_node = slots // num_gpus, slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy2log = old_phy2log.copy()
    count = np.bincount(phy2log, minlength=weight.size)
    local_gpu = np.arange(slots_per_node) // per_gpu
    spent = 0
    while True:
        slot_load = weight[phy2log] / count[phy2log]
        loads = _loads_in_order(slot_load.reshape(num_gpus, per_gpu))
        hot = int(np.argmax(loads))  # the first of equal maxima: the lowest index
        peak = loads[hot]
        if peak <= limit:
            return phy2log
        node = hot // gpus_per_node
        first = node * slots_per_node
        node_phy = phy2log[first : first + slots_per_node]
        base = slot_load[first : first + slots_per_node]
        on_hot = local_gpu == hot - node * gpus_per_node
        node_experts = np.flatnonzero(expert_node == node)

        # Candidates as (score, cost, s, x), global slot and expert ids.
        keys = []
        if spent + 1 <= budget:
            held_by_hot = np.isin(node_experts, node_phy[on_hot])
            allowed = (
                (count[node_phy] >= 2)[:, None]
                & (node_experts[None, :] != node_phy[:, None])
                & (on_hot[:, None] | held_by_hot[None, :])
            )
            s, b_index = np.nonzero(allowed)
            a, b = node_phy[s], node_experts[b_index]
            a_load = weight[a] / (count[a] - 1)
            b_load = weight[b] / (count[b] + 1)
            trial = np.where(node_phy[None, :] == a[:, None], a_load[:, None], base[None, :])
            trial = np.where(node_phy[None, :] == b[:, None], b_load[:, None], trial)
            trial[np.arange(s.size), s] = b_load
            score = _loads_in_order(trial.reshape(s.size, gpus_per_node, per_gpu)).max(-1)
            keys.append((score, np.ones_like(s), s + first, b))
        if spent + 2 <= budget:
            s, t = np.nonzero(on_hot[:, None] & ~on_hot[None, :])
            differ = node_phy[s] != node_phy[t]
            s, t = s[differ], t[differ]
            trial = np.broadcast_to(base, (s.size, slots_per_node)).copy()
            trial[np.arange(s.size), s] = base[t]
            trial[np.arange(s.size), t] = base[s]
            score = _loads_in_order(trial.reshape(s.size, gpus_per_node, per_gpu)).max(-1)
            keys.append((score, np.full_like(s, 2), s + first, t + first))
        if not keys:
            return None
        score, cost, s, x = (np.concatenate(column) for column in zip(*keys, strict=True))
        allowed_move = score < peak
        if not allowed_move.any():
            return None
        score, cost, s, x = (
            score[allowed_move],
            cost[allowed_move],
            s[allowed_move],
            x[allowed_move],
        )
        best = np.lexsort((x, s, cost, score))[0]
        slot, other = int(s[best]), int(x[best])
        if cost[best] == 1:
            count[phy2log[slot]] -= 1
            count[other] += 1
            phy2log[slot] = other
        else:
            phy2log[slot], phy2log[other] = phy2log[other], phy2log[slot]
        spent += int(cost[best])


def slot_maps_from_phy2log(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md policy step 5: log2phy [L, E, K] and logcnt [L, E], replica ranks in slot order.

    phy2log: [L, R] int64, every expert in some slot of every layer.
    """
    layers, slots = phy2log.shape
    row = np.repeat(np.arange(layers), slots)
    logcnt = np.zeros((layers, num_experts), dtype=np.int64)
    np.add.at(logcnt, (row, phy2log.ravel()), 1)
    # A stable sort by expert keeps each expert's slots in ascending order.
    order = np.argsort(phy2log, axis=1, kind="stable")
    experts = np.take_along_axis(phy2log, order, axis=1)
    first = np.cumsum(logcnt, axis=1) - logcnt
    replica = np.arange(slots) - np.take_along_axis(first, experts, axis=1)
    log2phy = np.full((layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    log2phy[row, experts.ravel(), replica.ravel()] = order.ravel()
    return log2phy, logcnt


def rebalance_experts_migration_aware(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    old_phy2log: torch.Tensor,
    tolerance: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md "The policy": balance within ``tolerance`` of SPEC's, moving few experts.

    weight: [L, E] real tensor (CPU or CUDA), the new load of each logical
        expert in each layer; non-negative and finite.
    num_replicas, num_groups, num_nodes, num_gpus: R, G, N, P as for
        ``rebalance_experts``.
    old_phy2log: [L, R] int tensor, the expert each slot holds now (every
        expert in at least one slot of every layer).
    tolerance: the largest GPU load may exceed SPEC's for this load by this
        fraction (finite, >= 0).

    Returns phy2log [L, R], log2phy [L, E, K] (replica ranks in slot order) and
    logcnt [L, E], int64 tensors on ``weight.device``: the same integers as
    ``eplb.reference.migration``. Raises TypeError/ValueError naming the
    argument on invalid input, before anything is computed.
    """
    weight64, config = prepare_weight(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if not isinstance(old_phy2log, torch.Tensor):
        raise TypeError(f"old_phy2log must be a torch.Tensor, got {type(old_phy2log).__name__}")
    old = validate_placement("old_phy2log", old_phy2log.detach().cpu().numpy(), config)
    tol = validate_tolerance(tolerance)
    groups, nodes = (config.num_groups, config.num_nodes) if config.hierarchical else (1, 1)
    gpus = config.num_gpus

    # Step 1: SPEC's placement, relabelled: the fallback.
    spec_phy2log, _, spec_logcnt = rebalance_experts_hierarchical(
        weight64, config.num_replicas, groups, nodes, gpus
    )
    fallback = _relabel(old, spec_phy2log, nodes, gpus)
    # Step 2: the limit the fallback sets, and its experts moved (the budget).
    limit = (1.0 + tol) * exact_gpu_loads(weight64, fallback, spec_logcnt, gpus).max(-1)
    budget = experts_moved(old, fallback, gpus).sum(-1)
    # Step 3: the greedy keeps the old hierarchy, or there is none to keep.
    expert_node = hierarchy_nodes(old, groups, nodes, config.num_logical_experts)
    result = fallback.copy()
    for layer in range(config.num_layers):
        if expert_node[layer, 0] < 0:
            continue
        # Step 4: greedy moves from the old placement.
        reached = greedy_migration(
            weight64[layer],
            old[layer],
            expert_node[layer],
            nodes,
            gpus,
            float(limit[layer]),
            int(budget[layer]),
        )
        if reached is not None:
            result[layer] = reached

    # Step 5: the maps, as tensors on the load's device.
    log2phy, logcnt = slot_maps_from_phy2log(result, config.num_logical_experts)
    out = (torch.from_numpy(result), torch.from_numpy(log2phy), torch.from_numpy(logcnt))
    return tuple(t.to(weight.device) for t in out)  # type: ignore[return-value]
