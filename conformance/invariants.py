"""SPEC.md "Invariants every output satisfies", as one reusable check.

``check_invariants`` raises ``AssertionError`` listing every violated
invariant (not only the first), so that it drops into pytest or any test
harness. It needs no reference implementation and no load: any placement an
engine computes, by any algorithm of this shape, must pass it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_invariants"]


def check_invariants(
    phy2log: object,
    log2phy: object,
    logcnt: object,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> None:
    """Raise ``AssertionError`` naming each SPEC.md invariant the placement breaks.

    phy2log: [L, R] int64, the logical expert held by each slot.
    log2phy: [L, E, K] int64, the slot of replica k of each expert, -1 padded.
    logcnt: [L, E] int64, the replica count of each logical expert.
    num_replicas, num_groups, num_nodes, num_gpus: the counts the placement
        was computed for (R, G, N, P).

    The arrays may be numpy arrays, torch tensors (on the CPU), JAX arrays or
    anything ``numpy.asarray`` converts. Checked: dtypes (int64) and shapes;
    ``phy2log`` in ``0..E-1`` and holding each expert ``logcnt`` times;
    ``logcnt >= 1`` summing to ``R`` per layer; ``K == logcnt.max()``;
    ``log2phy`` and ``phy2log`` inverse, ``-1`` exactly at ``k >= logcnt``;
    and, for the hierarchical policy (``G % N == 0``), every group's replicas
    on one node, ``G/N`` whole groups per node.
    """
    violations = _violations(
        np.asarray(phy2log),
        np.asarray(log2phy),
        np.asarray(logcnt),
        num_replicas,
        num_groups,
        num_nodes,
        num_gpus,
    )
    if violations:
        raise AssertionError("placement breaks SPEC.md invariants:\n  " + "\n  ".join(violations))


def _violations(
    phy2log: np.ndarray,
    log2phy: np.ndarray,
    logcnt: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> list[str]:
    """Every violated invariant, one line each; empty when the placement is sound."""
    found = [
        f"{name} dtype is {array.dtype}, expected int64"
        for name, array in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt))
        if array.dtype != np.int64
    ]
    if phy2log.ndim != 2 or logcnt.ndim != 2 or log2phy.ndim != 3:
        return [
            *found,
            f"ndim: phy2log {phy2log.ndim}, log2phy {log2phy.ndim}, logcnt {logcnt.ndim}; "
            "expected 2, 3, 2",
        ]
    num_layers, num_experts = logcnt.shape
    if phy2log.shape != (num_layers, num_replicas):
        return [*found, f"phy2log shape {phy2log.shape}, expected {(num_layers, num_replicas)}"]
    if log2phy.shape[:2] != (num_layers, num_experts):
        return [*found, f"log2phy shape {log2phy.shape}, expected ({num_layers}, {num_experts}, K)"]
    # Comparisons below need integers; a float output was reported above.
    phy2log, log2phy, logcnt = (a.astype(np.int64) for a in (phy2log, log2phy, logcnt))

    if ((phy2log < 0) | (phy2log >= num_experts)).any():
        at = np.argwhere((phy2log < 0) | (phy2log >= num_experts))[0]
        found.append(f"phy2log{at.tolist()} = {phy2log[tuple(at)]} is outside 0..{num_experts - 1}")
        return found
    if (logcnt < 1).any():
        at = np.argwhere(logcnt < 1)[0]
        found.append(f"logcnt{at.tolist()} = {logcnt[tuple(at)]} < 1")
    bad_sums = np.flatnonzero(logcnt.sum(-1) != num_replicas)
    if bad_sums.size:
        layer = int(bad_sums[0])
        found.append(f"logcnt[{layer}] sums to {logcnt[layer].sum()}, expected R={num_replicas}")
    held = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    if (held != logcnt).any():
        layer, expert = np.argwhere(held != logcnt)[0]
        found.append(
            f"expert {expert} of layer {layer} is in {held[layer, expert]} slots of phy2log, "
            f"logcnt says {logcnt[layer, expert]}"
        )
    found += _inverse_violations(phy2log, log2phy, logcnt)
    if num_groups % num_nodes == 0 and not found:
        found += _hierarchy_violations(phy2log, num_experts, num_groups, num_nodes)
    return found


def _inverse_violations(phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray) -> list[str]:
    """log2phy's width, padding and agreement with phy2log."""
    found = []
    num_layers, num_replicas = phy2log.shape
    width = log2phy.shape[2]
    if width != logcnt.max():
        found.append(f"log2phy has K={width} columns, expected logcnt.max()={logcnt.max()}")
    replica = np.arange(width)
    used = replica < logcnt[:, :, None]
    pad_wrong = ~used & (log2phy != -1)
    if pad_wrong.any():
        at = np.argwhere(pad_wrong)[0]
        found.append(f"log2phy{at.tolist()} = {log2phy[tuple(at)]}, expected -1 (k >= logcnt)")
    slot = np.where(used, log2phy, 0)
    out_of_range = used & ((slot < 0) | (slot >= num_replicas))
    if out_of_range.any():
        at = np.argwhere(out_of_range)[0]
        found.append(
            f"log2phy{at.tolist()} = {log2phy[tuple(at)]} is not a slot 0..{num_replicas - 1}"
        )
        return found
    layer = np.arange(num_layers)[:, None, None]
    expert = np.arange(logcnt.shape[1])[None, :, None]
    not_inverse = used & (phy2log[layer, slot] != expert)
    if not_inverse.any():
        at = np.argwhere(not_inverse)[0]
        found.append(
            f"log2phy{at.tolist()} = slot {log2phy[tuple(at)]}, but phy2log there holds expert "
            f"{phy2log[at[0], log2phy[tuple(at)]]}"
        )
    return found


def _hierarchy_violations(
    phy2log: np.ndarray, num_experts: int, num_groups: int, num_nodes: int
) -> list[str]:
    """Hierarchical policy: each group's replicas on one node, G/N groups a node."""
    num_layers, num_replicas = phy2log.shape
    group_size = max(1, num_experts // num_groups)
    node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
    group_of_slot = phy2log // group_size
    found = []
    for layer in range(num_layers):
        nodes_of_group: dict[int, set[int]] = {}
        for group, node in zip(group_of_slot[layer].tolist(), node_of_slot.tolist(), strict=True):
            nodes_of_group.setdefault(group, set()).add(node)
        split = {g: sorted(n) for g, n in nodes_of_group.items() if len(n) > 1}
        if split:
            group, nodes = next(iter(sorted(split.items())))
            found.append(f"layer {layer}: replicas of group {group} lie on nodes {nodes}")
            break
        per_node = np.bincount([min(n) for n in nodes_of_group.values()], minlength=num_nodes)
        if (per_node != num_groups // num_nodes).any():
            found.append(
                f"layer {layer}: groups per node {per_node.tolist()}, "
                f"expected {num_groups // num_nodes} each"
            )
            break
    return found
