"""Placement quality (SPEC.md "Measures"), in numpy."""

from __future__ import annotations

import numpy as np

__all__ = [
    "balancedness",
    "colocated_replicas",
    "contiguous_placement",
    "experts_moved",
    "gpu_loads",
    "max_load_lower_bound",
]


def contiguous_placement(num_layers: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The placement before balancing: experts laid out in order, no replicas.

    Returns phy2log [L, E] int64 and logcnt [L, E] int64 (all ones).
    """
    phy2log = np.tile(np.arange(num_experts, dtype=np.int64), (num_layers, 1))
    return phy2log, np.ones((num_layers, num_experts), dtype=np.int64)


def gpu_loads(
    weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int
) -> np.ndarray:
    """Load of each GPU: ``[L, P]`` float64.

    weight: [L, E] real, tokens routed to each logical expert.
    phy2log: [L, R] int, logical expert of each slot.
    logcnt: [L, E] int, replica count of each logical expert.
    """
    weight = np.asarray(weight, dtype=np.float64)
    per_replica = weight / logcnt
    slot_load = np.take_along_axis(per_replica, np.asarray(phy2log), axis=1)
    num_layers, num_slots = slot_load.shape
    return slot_load.reshape(num_layers, num_gpus, num_slots // num_gpus).sum(-1)


def balancedness(loads: np.ndarray) -> np.ndarray:
    """Mean over max GPU load per layer: ``[L]`` (1.0 is perfect; 1.0 for an idle layer).

    loads: [L, P] float, load of each GPU.
    """
    peak = loads.max(-1)
    safe_peak = np.where(peak > 0, peak, 1.0)
    return np.where(peak > 0, loads.mean(-1) / safe_peak, 1.0)


def max_load_lower_bound(weight: np.ndarray, num_replicas: int, num_gpus: int) -> np.ndarray:
    """SPEC.md's lower bound on the max GPU load of any placement: ``[L]`` float64.

    ``max(total / P, m*)``, where ``m*`` is the smallest possible largest
    per-replica load with ``num_replicas`` slots. ``m*`` is found by bisection on
    the count ``sum(ceil(w / m))`` each expert needs, which is what greedy
    replication achieves.
    """
    weight = np.asarray(weight, dtype=np.float64)
    total = weight.sum(-1)
    bound = np.empty(weight.shape[0])
    for layer, row in enumerate(weight):
        bound[layer] = max(total[layer] / num_gpus, _min_max_per_replica(row, num_replicas))
    return bound


def _min_max_per_replica(row: np.ndarray, num_replicas: int) -> float:
    """Smallest m such that giving expert j ceil(w_j / m) >= 1 replicas uses <= R slots."""
    if row.max() <= 0:
        return 0.0
    # The optimum is w_j / c for some expert j and count c <= R: evaluate the
    # candidates around each expert's share and keep the smallest feasible one.
    counts = np.arange(1, num_replicas + 1)
    candidates = np.unique((row[:, None] / counts[None, :]).ravel())
    candidates = candidates[candidates > 0]
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        needed = np.maximum(np.ceil(row / candidates[mid]), 1).sum()
        if needed <= num_replicas:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def colocated_replicas(phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Replicas that share a GPU with another replica of the same expert: ``[L]`` int64.

    Counts, per layer, the slots beyond the first that hold the same expert on
    the same GPU (a wasted replica: it splits the load without spreading it).
    """
    phy2log = np.asarray(phy2log)
    num_layers, num_slots = phy2log.shape
    per_gpu = phy2log.reshape(num_layers, num_gpus, num_slots // num_gpus)
    ordered = np.sort(per_gpu, axis=-1)
    return (ordered[..., 1:] == ordered[..., :-1]).sum(axis=(1, 2)).astype(np.int64)


def experts_moved(old_phy2log: np.ndarray, new_phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Experts each GPU must receive to go from one placement to another: ``[L, P]`` int64.

    old_phy2log, new_phy2log: [L, R] int, the expert of each slot before and after.

    SPEC.md "Experts moved": the distinct experts among a GPU's new slots that
    none of its old slots holds (a second slot of one expert, or an expert
    already on the GPU, is a local copy). Times the bytes of one expert: the
    bytes that cross the wire.
    """
    old, new = np.asarray(old_phy2log), np.asarray(new_phy2log)
    num_layers, num_slots = old.shape
    experts = int(max(old.max(), new.max())) + 1
    gpu = np.arange(num_layers)[:, None] * num_gpus + np.arange(num_slots)[None, :] // (
        num_slots // num_gpus
    )
    held = np.zeros((num_layers * num_gpus, experts), dtype=bool)
    wanted = np.zeros_like(held)
    held[gpu, old] = True
    wanted[gpu, new] = True
    return (wanted & ~held).sum(-1).reshape(num_layers, num_gpus).astype(np.int64)
