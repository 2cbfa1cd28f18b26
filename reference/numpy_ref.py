"""Hierarchical EPLB in plain numpy and Python loops (SPEC.md, line for line).

Clarity over speed: every loop below is one sentence of SPEC.md. The glossary
is in the docstring of ``eplb.reference``.
"""

from __future__ import annotations

import numpy as np

from eplb._validation import validate_weight

__all__ = [
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md primitive 1: pack ``n`` items of each row into ``num_packs`` equal packs.

    weight: [X, n] float64, the weight of each item; rows are independent.
    num_packs: number of packs ``m``; must divide ``n``.

    Returns
      pack: [X, n] int64, the pack of each item.
      rank: [X, n] int64, the item's position in its pack, in order of arrival.
    """
    num_rows, num_items = weight.shape
    items_per_pack = num_items // num_packs
    pack = np.empty((num_rows, num_items), dtype=np.int64)
    rank = np.empty((num_rows, num_items), dtype=np.int64)

    if items_per_pack == 1:
        for row in range(num_rows):
            for item in range(num_items):
                pack[row, item] = item
                rank[row, item] = 0
        return pack, rank

    for row in range(num_rows):
        # Largest first; Python's sort is stable, so equal weights keep
        # ascending item index.
        order = sorted(range(num_items), key=lambda item: -weight[row, item])
        totals = [0.0] * num_packs
        counts = [0] * num_packs
        for item in order:
            best = -1
            for p in range(num_packs):
                if counts[p] == items_per_pack:
                    continue
                # Strict "<" keeps the lowest pack index among equal totals.
                if best == -1 or totals[p] < totals[best]:
                    best = p
            pack[row, item] = best
            rank[row, item] = counts[best]
            totals[best] += float(weight[row, item])
            counts[best] += 1
    return pack, rank


def replicate_experts(
    weight: np.ndarray, num_phy: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPEC.md primitive 2: give the ``num_phy - n`` extra slots to the hottest experts.

    weight: [X, n] float64, the load of each expert; rows are independent.
    num_phy: slots per row, ``>= n``.

    Returns
      phy2log: [X, num_phy] int64, the expert of each slot.
      rank: [X, num_phy] int64, the replica rank of each slot.
      logcnt: [X, n] int64, the replica count of each expert.
    """
    num_rows, num_log = weight.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    rank = np.empty((num_rows, num_phy), dtype=np.int64)
    logcnt = np.empty((num_rows, num_log), dtype=np.int64)
    for row in range(num_rows):
        count = [1] * num_log
        for slot in range(num_log):
            phy2log[row, slot] = slot
            rank[row, slot] = 0
        for slot in range(num_log, num_phy):
            best = 0
            best_load = float(weight[row, 0]) / count[0]
            for j in range(1, num_log):
                load = float(weight[row, j]) / count[j]
                # Strict ">" keeps the lowest expert index among equal loads.
                if load > best_load:
                    best, best_load = j, load
            phy2log[row, slot] = best
            rank[row, slot] = count[best]
            count[best] += 1
        for j in range(num_log):
            logcnt[row, j] = count[j]
    return phy2log, rank, logcnt


def rebalance_experts_hierarchical(
    weight: np.ndarray,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPEC.md "The hierarchy": groups to nodes, replicas within nodes, slots to GPUs.

    weight: [L, E] float64, load of each logical expert in each layer.

    Returns
      phy2log: [L, R] int64, the logical expert of each slot.
      phyrank: [L, R] int64, the replica rank of each slot.
      logcnt: [L, E] int64, the replica count of each logical expert.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical_experts // num_nodes
    slots_per_gpu = num_physical_experts // num_gpus
    gpus_per_node = num_gpus // num_nodes

    # Step 1: group loads, each summed left to right.
    group_load = np.zeros((num_layers, num_groups), dtype=np.float64)
    for layer in range(num_layers):
        for g in range(num_groups):
            total = 0.0
            for offset in range(group_size):
                total += float(weight[layer, g * group_size + offset])
            group_load[layer, g] = total

    # Step 2: groups to nodes.
    group_pack, group_rank = balanced_packing(group_load, num_nodes)

    # Step 3: node-local order; mlog2log is the inverse permutation of log2mlog.
    log2mlog = np.empty((num_layers, num_logical), dtype=np.int64)
    mlog2log = np.empty((num_layers, num_logical), dtype=np.int64)
    for layer in range(num_layers):
        for e in range(num_logical):
            g, offset = divmod(e, group_size)
            node, r = group_pack[layer, g], group_rank[layer, g]
            mlog = (node * groups_per_node + r) * group_size + offset
            log2mlog[layer, e] = mlog
            mlog2log[layer, mlog] = e

    # Step 4: replicate within each node; row layer*N + node holds that node's experts.
    node_load = np.empty((num_layers * num_nodes, experts_per_node), dtype=np.float64)
    for layer in range(num_layers):
        for mlog in range(num_logical):
            node, local = divmod(mlog, experts_per_node)
            node_load[layer * num_nodes + node, local] = weight[layer, mlog2log[layer, mlog]]
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_load, slots_per_node)

    # Step 5: the load each slot carries.
    slot_load = np.empty((num_layers * num_nodes, slots_per_node), dtype=np.float64)
    for row in range(num_layers * num_nodes):
        for slot in range(slots_per_node):
            local = phy2mlog[row, slot]
            slot_load[row, slot] = float(node_load[row, local]) / float(mlogcnt[row, local])

    # Step 6: slots to GPUs within each node.
    gpu_pack, gpu_rank = balanced_packing(slot_load, gpus_per_node)

    # Step 7: map back to physical indices and logical experts.
    phy2log = np.empty((num_layers, num_physical_experts), dtype=np.int64)
    out_rank = np.empty((num_layers, num_physical_experts), dtype=np.int64)
    for row in range(num_layers * num_nodes):
        layer, node = divmod(row, num_nodes)
        for slot in range(slots_per_node):
            phy = node * slots_per_node + gpu_pack[row, slot] * slots_per_gpu + gpu_rank[row, slot]
            mlog = node * experts_per_node + phy2mlog[row, slot]
            phy2log[layer, phy] = mlog2log[layer, mlog]
            out_rank[layer, phy] = phyrank[row, slot]
    logcnt = np.empty((num_layers, num_logical), dtype=np.int64)
    for layer in range(num_layers):
        for e in range(num_logical):
            mlog = log2mlog[layer, e]
            node, local = divmod(mlog, experts_per_node)
            logcnt[layer, e] = mlogcnt[layer * num_nodes + node, local]
    return phy2log, out_rank, logcnt


def rebalance_experts(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the placement of SPEC.md for every layer.

    weight: [L, E] real, tokens routed to each logical expert in each layer
        (any non-negative finite values; converted to float64).
    num_replicas: R, slots per layer over all GPUs.
    num_groups: G, expert groups; experts ``g*E/G .. (g+1)*E/G - 1`` form group g.
    num_nodes: N, server nodes.
    num_gpus: P, GPUs (EP ranks) in all.

    Returns
      phy2log: [L, R] int64, the logical expert held by each slot.
      log2phy: [L, E, K] int64, the slot of each replica of each expert, -1 padded.
      logcnt: [L, E] int64, the replica count of each logical expert.

    Raises ValueError / TypeError (naming the argument) on invalid input.
    """
    weight64, config = validate_weight(
        np.asarray(weight) if not isinstance(weight, np.ndarray) else weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_gpus,
    )
    groups, nodes = config.num_groups, config.num_nodes
    # Policy choice: the global policy is the hierarchy with one group and one node.
    if not config.hierarchical:
        groups, nodes = 1, 1
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
        weight64, config.num_replicas, groups, nodes, config.num_gpus
    )
    return phy2log, _inverse_map(phy2log, phyrank, logcnt), logcnt


def _inverse_map(phy2log: np.ndarray, phyrank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """log2phy [L, E, K] from phy2log [L, R] and phyrank [L, R]; K = logcnt.max()."""
    num_layers, num_slots = phy2log.shape
    max_replicas = int(logcnt.max())
    log2phy = np.full((num_layers, logcnt.shape[1], max_replicas), -1, dtype=np.int64)
    for layer in range(num_layers):
        for slot in range(num_slots):
            log2phy[layer, phy2log[layer, slot], phyrank[layer, slot]] = slot
    return log2phy
