"""The transfer plan of a weight rearrangement: a pure numpy function of the two maps.

Every rank calls :func:`plan_rearrangement` with the same ``old_phy2log``,
``new_phy2log`` and world size and so derives the same plan without talking to
the others; tests call it once for all ranks.

For each layer and each slot whose expert changes, the plan says where the new
expert's weights come from:

- the rank already holds the expert (in an old slot): a **local copy** from the
  lowest such slot; nothing crosses the network;
- otherwise the rank **receives** it once, from one rank that holds it, into the
  lowest slot that needs it; further slots of that rank that need the same
  expert get a **post copy** from that slot after the receive.

Senders are spread: within a layer each request goes to the holder that sends
the fewest experts in that layer so far, then the fewest over all layers so
far, then the lowest rank. Requests with one possible holder are placed first,
then the others, fewest holders first (the more constrained first). All
experts of a layer have the same size, so counts balance bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RearrangePlan", "batch_layers", "plan_rearrangement"]

#: Column order of :attr:`RearrangePlan.transfers`.
TRANSFER_COLUMNS = ("layer", "expert", "src_rank", "src_slot", "dst_rank", "dst_slot")
#: Column order of :attr:`RearrangePlan.local_copies` and :attr:`RearrangePlan.post_copies`.
COPY_COLUMNS = ("layer", "src_slot", "dst_slot")


@dataclass(frozen=True)
class RearrangePlan:
    """What moves where; identical on every rank. Slots are global (``0 .. R-1``).

    transfers: [T, 6] int64 rows (layer, expert, src_rank, src_slot, dst_rank,
        dst_slot): ``src_rank`` sends the weights in its old slot ``src_slot``
        to ``dst_rank``, which writes them to slot ``dst_slot``. Sorted by
        (layer, src_rank, dst_rank, expert): the order of the bytes in every
        message, the same on both sides.
    local_copies: [C, 3] int64 rows (layer, src_slot, dst_slot), both slots on
        one rank; the source is read before any slot of the layer is written.
        Sorted by (layer, dst_slot).
    post_copies: [D, 3] int64 rows (layer, src_slot, dst_slot), both slots on
        one rank: a received expert needed in several slots, copied from the
        slot its transfer filled, after the receive. Sorted by (layer, dst_slot).
    num_layers, num_slots, world_size: L, R and P of the maps.
    """

    transfers: np.ndarray
    local_copies: np.ndarray
    post_copies: np.ndarray
    num_layers: int
    num_slots: int
    world_size: int

    @property
    def slots_per_rank(self) -> int:
        """R / P: the slots each rank holds per layer."""
        return self.num_slots // self.world_size

    def staging_slots(self) -> np.ndarray:
        """[layers, world_size] int64: expert-sized staging buffers per layer and rank.

        One per expert sent, received, locally copied or post-copied: what the
        executor allocates for the layer on that rank, in units of one expert.
        """
        layers, ranks = self.num_layers, self.world_size
        slots = self.slots_per_rank
        t, lc, pc = self.transfers, self.local_copies, self.post_copies
        index = np.concatenate(
            [
                t[:, 0] * ranks + t[:, 2],
                t[:, 0] * ranks + t[:, 4],
                lc[:, 0] * ranks + lc[:, 2] // slots,
                pc[:, 0] * ranks + pc[:, 2] // slots,
            ]
        )
        return np.bincount(index, minlength=layers * ranks).reshape(layers, ranks)


def _host_map(name: str, phy2log: object) -> np.ndarray:
    """Check one map's type and dtype and return it as a host int64 array."""
    try:
        import torch  # the planner itself needs only numpy; tensors are accepted

        if isinstance(phy2log, torch.Tensor):
            if phy2log.is_floating_point() or phy2log.is_complex() or phy2log.dtype == torch.bool:
                raise TypeError(f"{name} must hold integers, got dtype {phy2log.dtype}")
            phy2log = phy2log.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency of the distribution
        pass
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
    num_experts = int(max(old.max(), new.max())) + 1
    present = np.zeros((layers, num_experts), dtype=bool)
    present[np.repeat(np.arange(layers), slots), old.ravel()] = True
    missing = ~present[np.arange(layers)[:, None], new]
    if missing.any():
        layer, slot = np.argwhere(missing)[0]
        raise ValueError(
            f"new_phy2log[{layer}, {slot}] = expert {new[layer, slot]}, which no slot of "
            f"old_phy2log holds in layer {layer}: no rank can provide its weights"
        )
    return old, new


def plan_rearrangement(old_phy2log: object, new_phy2log: object, world_size: int) -> RearrangePlan:
    """The transfer plan from one placement to another (same on every rank).

    old_phy2log: [layers, R] int (numpy or torch), the expert each slot holds now.
    new_phy2log: [layers, R] int, the expert each slot must hold afterwards.
    world_size: P, the number of EP ranks; rank r holds slots r*R/P .. (r+1)*R/P - 1.

    Every id in ``new_phy2log[l]`` must occur in ``old_phy2log[l]``. Raises
    TypeError/ValueError otherwise. Replicas of an expert are taken to hold the
    same weights, so any of them may serve as the source.
    """
    old, new = check_maps(old_phy2log, new_phy2log, world_size)
    layers, slots = old.shape
    ranks = int(world_size)
    per_rank = slots // ranks
    num_experts = int(max(old.max(), new.max())) + 1
    slot = np.arange(slots)
    rank_of = slot // per_rank
    layer_of = np.repeat(np.arange(layers), slots)

    # Lowest old slot of each expert on each rank; `slots` where the rank lacks it.
    first = np.full((layers, ranks, num_experts), slots, dtype=np.int64)
    np.minimum.at(first, (layer_of, np.tile(rank_of, layers), old.ravel()), np.tile(slot, layers))

    changed = new != old
    local_src = first[np.arange(layers)[:, None], rank_of[None, :], new]
    is_local = changed & (local_src < slots)
    copy_layer, copy_dst = np.nonzero(is_local)
    local_copies = np.stack([copy_layer, local_src[copy_layer, copy_dst], copy_dst], axis=1)

    # Slots whose expert is nowhere on their rank: one receive per (layer, rank, expert).
    need_layer, need_slot = np.nonzero(changed & (local_src == slots))
    need_rank = rank_of[need_slot]
    need_expert = new[need_layer, need_slot]
    key = (need_layer * ranks + need_rank) * num_experts + need_expert
    # np.nonzero walks (layer, slot) in order, so each key's first occurrence is its lowest slot.
    _, first_index, inverse = np.unique(key, return_index=True, return_inverse=True)
    req_layer = need_layer[first_index]
    req_rank = need_rank[first_index]
    req_expert = need_expert[first_index]
    req_slot = need_slot[first_index]
    is_post = np.ones(key.size, dtype=bool)
    is_post[first_index] = False
    post_copies = np.stack(
        [need_layer[is_post], req_slot[inverse[is_post]], need_slot[is_post]], axis=1
    )
    post_copies = post_copies[np.lexsort((post_copies[:, 2], post_copies[:, 0]))]

    src_rank = _choose_senders(first[req_layer, :, req_expert] < slots, req_layer, layers)
    transfers = np.stack(
        [
            req_layer,
            req_expert,
            src_rank,
            first[req_layer, src_rank, req_expert],
            req_rank,
            req_slot,
        ],
        axis=1,
    )
    transfers = transfers[
        np.lexsort((transfers[:, 1], transfers[:, 4], transfers[:, 2], transfers[:, 0]))
    ]

    return RearrangePlan(
        transfers=_frozen(transfers, 6),
        local_copies=_frozen(local_copies, 3),
        post_copies=_frozen(post_copies, 3),
        num_layers=layers,
        num_slots=slots,
        world_size=ranks,
    )


def _frozen(table: np.ndarray, width: int) -> np.ndarray:
    """A read-only int64 [rows, width] copy: plans are shared, never edited."""
    table = np.array(table, dtype=np.int64).reshape(-1, width)
    table.flags.writeable = False
    return table


def _choose_senders(holders: np.ndarray, req_layer: np.ndarray, num_layers: int) -> np.ndarray:
    """The sending rank of each request.

    holders: [requests, P] bool, which ranks hold the requested expert.
    req_layer: [requests] int, the layer of each request (ascending).

    Returns [requests] int64. Greedy per layer: forced requests (one holder)
    first, then the rest, fewest holders first, each to the holder with the
    fewest sends in this layer, then over all layers so far, then the lowest rank.
    """
    num_holders = holders.sum(axis=1)
    src = np.argmax(holders, axis=1).astype(np.int64)  # the only holder where forced
    ranks = holders.shape[1]
    total = np.zeros(ranks, dtype=np.int64)
    bounds = np.searchsorted(req_layer, np.arange(num_layers + 1))
    for layer in range(num_layers):
        lo, hi = bounds[layer], bounds[layer + 1]
        count = np.bincount(src[lo:hi][num_holders[lo:hi] == 1], minlength=ranks)
        free = lo + np.nonzero(num_holders[lo:hi] > 1)[0]
        # Stable: among equally constrained requests, the plan order (rank, expert) decides.
        for request in free[np.argsort(num_holders[free], kind="stable")]:
            candidates = np.nonzero(holders[request])[0]
            best = candidates[np.lexsort((candidates, total[candidates], count[candidates]))[0]]
            src[request] = best
            count[best] += 1
        total += count
    return src


def batch_layers(staging_bytes: np.ndarray, max_batch_bytes: int) -> list[tuple[int, int]]:
    """Group consecutive layers into batches that fit a memory budget.

    staging_bytes: [layers, world_size] int, staging memory each layer needs on
        each rank.
    max_batch_bytes: the most staging memory one batch may need on any rank.

    Returns half-open layer ranges ``(start, stop)`` covering all layers in
    order. A layer that alone exceeds the budget forms a batch by itself (a
    layer is never split, so that nothing of it is overwritten before it is sent).
    """
    staging = np.asarray(staging_bytes, dtype=np.int64)
    batches: list[tuple[int, int]] = []
    start = 0
    used = np.zeros(staging.shape[1], dtype=np.int64)
    for layer in range(staging.shape[0]):
        if layer > start and (used + staging[layer]).max() > max_batch_bytes:
            batches.append((start, layer))
            start = layer
            used[:] = 0
        used += staging[layer]
    batches.append((start, staging.shape[0]))
    return batches
