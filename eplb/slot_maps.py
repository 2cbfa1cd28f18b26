"""Two placements side by side: checking them against each other, and slot order.

Numpy only (torch tensors are accepted where torch is loaded, never imported),
so that the numpy reference, the production path and the CLI share it.

- :func:`check_maps`: the rules two maps ``[layers, R]`` of one rearrangement obey.
- :func:`keep_experts_in_place`: a new placement with each GPU's slots reordered
  so that experts staying on a GPU keep their slots.
- :func:`optimal_assignment`: SPEC.md's optimal assignment (scipy), with which
  relabelling matches new nodes and GPUs to old ones.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["check_maps", "keep_experts_in_place", "optimal_assignment"]


def _host_map(name: str, phy2log: object) -> np.ndarray:
    """Check one map's type and dtype and return it as a host int64 array."""
    # A torch tensor can only exist if torch is loaded: looking it up rather than
    # importing it keeps this module torch-free for the numpy reference.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(phy2log, torch.Tensor):
        if phy2log.is_floating_point() or phy2log.is_complex() or phy2log.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {phy2log.dtype}")
        phy2log = phy2log.detach().cpu().numpy()
    if not isinstance(phy2log, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(phy2log)}")
    if phy2log.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {phy2log.dtype}")
    if phy2log.ndim != 2:
        raise ValueError(f"{name} must be 2-D [layers, num_replicas], got shape {phy2log.shape}")
    return np.ascontiguousarray(phy2log, dtype=np.int64)


def check_maps(
    old_phy2log: object, new_phy2log: object, world_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the two maps against each other and the world size; return int64 copies.

    old_phy2log, new_phy2log: [layers, R] int, the expert held by each slot
        before and after. Raises TypeError/ValueError naming the broken rule.
    """
    old = _host_map("old_phy2log", old_phy2log)
    new = _host_map("new_phy2log", new_phy2log)
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if old.shape != new.shape:
        raise ValueError(
            f"old_phy2log and new_phy2log must have the same shape, got {old.shape} and {new.shape}"
        )
    layers, slots = old.shape
    if layers < 1 or slots < 1:
        raise ValueError(f"the maps need at least one layer and one slot, got shape {old.shape}")
    if slots % world_size:
        raise ValueError(
            f"the world size must divide the number of slots: R={slots} % world_size="
            f"{world_size} != 0"
        )
    for name, phy2log in (("old_phy2log", old), ("new_phy2log", new)):
        if (phy2log < 0).any():
            bad = np.argwhere(phy2log < 0)[0]
            raise ValueError(
                f"{name} must hold expert ids >= 0, got {phy2log[tuple(bad)]} at "
                f"[layer, slot]={bad.tolist()}"
            )
    _check_experts(old, new)
    return old, new


def _check_experts(old: np.ndarray, new: np.ndarray) -> None:
    """Every expert of ``new`` is held in the same layer of ``old``; every id is < R.

    old, new: [layers, R] int64 >= 0. An id only ``new`` holds has no sender. A
    placement on R slots holds each of its experts at least once, so ids are
    < R: the bound also keeps the planner's keys small (a huge id raises here,
    not as a MemoryError or an overflow later).
    """
    layers, slots = old.shape
    highest = int(max(old.max(), new.max()))
    if highest < slots:
        ids, old_ids, new_ids = highest + 1, old, new
    else:  # ids renumbered densely, so that the tables below stay small
        ids_seen, dense = np.unique(np.concatenate([old, new], axis=1), return_inverse=True)
        dense = dense.reshape(layers, 2 * slots)
        ids, old_ids, new_ids = ids_seen.size, dense[:, :slots], dense[:, slots:]
    rows = np.arange(layers)[:, None]
    in_old = np.zeros((layers, ids), dtype=bool)
    in_old[rows, old_ids] = True
    missing = ~in_old[rows, new_ids]
    if missing.any():
        layer, slot = np.argwhere(missing)[0]
        raise ValueError(
            f"new_phy2log[{layer}, {slot}] = expert {new[layer, slot]}, which no slot of "
            f"old_phy2log holds in layer {layer}: no rank can provide its weights"
        )
    if highest >= slots:
        layer, slot = np.argwhere(old == highest)[0]
        raise ValueError(
            f"expert ids must be < the number of slots R={slots} (a placement holds each of "
            f"its experts at least once), got {highest} at old_phy2log[{layer}, {slot}]"
        )


def keep_experts_in_place(old_phy2log: object, new_phy2log: object, world_size: int) -> np.ndarray:
    """``new_phy2log`` with each GPU's slots reordered so that experts stay where they are.

    old_phy2log: [layers, R] int, the expert each slot holds now.
    new_phy2log: [layers, R] int, the placement to move to; every id must occur
        in ``old_phy2log``'s layer (as for :func:`plan_rearrangement`).
    world_size: P; GPU r holds slots r*R/P .. (r+1)*R/P - 1.

    Returns [layers, R] int64: per layer and GPU the same multiset of experts as
    ``new_phy2log`` (so the same loads and replica counts), with every expert
    that GPU already holds left in a slot that holds it now, as many times as
    both placements have it there. The order of slots within a GPU does not
    matter to serving, but every slot that changes is a copy: between the two
    real placements of ``benchmarks/bench_rearrange.py`` this leaves 11-22
    local copies per rank instead of 471-498 (``--plan-only --keep-slots``; the
    transfers between GPUs stay the same). Not the SPEC placement: apply it
    where the slot order is free.
    """
    old, new = check_maps(old_phy2log, new_phy2log, world_size)
    layers, slots = old.shape
    ranks = int(world_size)
    per_rank = slots // ranks
    experts = int(max(old.max(), new.max())) + 1
    gpu = np.arange(layers)[:, None] * ranks + np.arange(slots)[None, :] // per_rank
    # Slots that already hold their new expert stay; among the others, the k-th
    # copy of an expert on a GPU, in slot order, meets the k-th copy in the other
    # placement. Vectorized over all (layer, GPU) at once: this runs for every
    # rebalance. (Matching equal slots first keeps the result a fixed point.)
    kept = old == new
    placed = kept.copy()
    rest = np.flatnonzero(~kept)
    old_key = _copy_keys((gpu * experts + old).ravel()[rest], per_rank)
    new_key = _copy_keys((gpu * experts + new).ravel()[rest], per_rank)
    np.put(kept, rest[_member(old_key, new_key)], True)
    np.put(placed, rest[_member(new_key, old_key)], True)
    out = np.where(kept, old, -1)
    # The other slots of a GPU take its other entries, both in slot order: both
    # counts are per_rank minus the kept ones, and row-major order groups by GPU.
    out[~kept] = new[~placed]
    return out


def _member(keys: np.ndarray, among: np.ndarray) -> np.ndarray:
    """[n] bool: which ``keys`` occur in ``among`` (np.isin sorts both, twice as slow here)."""
    if not among.size:
        return np.zeros(keys.size, dtype=bool)
    ordered = np.sort(among)
    at = np.minimum(np.searchsorted(ordered, keys), ordered.size - 1)
    return ordered[at] == keys


def _copy_keys(key: np.ndarray, per_rank: int) -> np.ndarray:
    """``key * per_rank + k`` for each entry that is the k-th occurrence of its key (in order).

    key: [n] int, (layer, GPU, expert) codes in slot order; a key occurs at most
    per_rank times (once per slot of its GPU), so the results are distinct.
    """
    order = np.argsort(key, kind="stable")
    sorted_keys = key[order]
    starts = np.ones(key.size, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(key.size), 0))
    occurrence = np.empty(key.size, dtype=np.int64)
    occurrence[order] = np.arange(key.size) - first
    return key * per_rank + occurrence


def optimal_assignment(cost: np.ndarray) -> np.ndarray:
    """SPEC.md "Optimal assignment": the column each row gets, for the least total cost.

    cost: [k, k] int64, ``cost[i, j]`` of giving row i the column j.

    Returns [k] int64. Among optimal assignments, one keeping the most rows in
    place (``i -> i``); the ties left are scipy's, which is deterministic.
    """
    from scipy.optimize import linear_sum_assignment  # imported on use: a second or so

    size = cost.shape[0]
    # Each unit of cost outweighs every off-diagonal term together (at most k).
    off_diagonal = 1 - np.eye(size, dtype=np.int64)
    _, columns = linear_sum_assignment(cost * (size + 1) + off_diagonal)
    return np.asarray(columns, dtype=np.int64)
