"""What moves where in a weight rearrangement: a pure numpy function of the two maps.

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

from eplb.slot_maps import check_maps, keep_experts_in_place

# plan_checked and check_maps are internal APIs of the rearrangement modules
# (the call checks the maps once, then plans from the checked copies).
__all__ = [
    "RearrangePlan",
    "check_keeps_experts",
    "check_maps",
    "keep_experts_in_place",
    "plan_checked",
    "plan_rearrangement",
]


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


def check_keeps_experts(old: np.ndarray, new: np.ndarray) -> None:
    """Refuse a ``new`` that drops an expert ``old`` holds: its weights would be lost.

    old, new: [layers, R] int64, maps :func:`check_maps` has returned (so every
    id of ``new`` is held by ``old`` in its layer and is < R).
    """
    layers, slots = old.shape
    rows = np.arange(layers)[:, None]
    kept = np.zeros((layers, slots), dtype=bool)
    kept[rows, new] = True
    dropped = ~kept[rows, old]
    if dropped.any():
        layer, slot = np.argwhere(dropped)[0]
        raise ValueError(
            f"new_phy2log must keep every expert of old_phy2log: layer {layer} drops expert "
            f"{old[layer, slot]} (old_phy2log[{layer}, {slot}]), whose weights would be lost"
        )


def plan_rearrangement(old_phy2log: object, new_phy2log: object, world_size: int) -> RearrangePlan:
    """The transfer plan from one placement to another (same on every rank).

    old_phy2log: [layers, R] int (numpy or torch), the expert each slot holds now.
    new_phy2log: [layers, R] int, the expert each slot must hold afterwards.
    world_size: P, the number of EP ranks; rank r holds slots r*R/P .. (r+1)*R/P - 1.

    Every id in ``new_phy2log[l]`` must occur in ``old_phy2log[l]`` and lie in
    0..R-1. Raises TypeError/ValueError otherwise. (The plan itself allows
    ``new_phy2log`` to drop an expert; :func:`check_keeps_experts` refuses that
    for weight moves.) Replicas of an expert are taken to hold the
    same weights, so any of them may serve as the source.
    """
    return plan_checked(*check_maps(old_phy2log, new_phy2log, world_size), int(world_size))


def plan_checked(old: np.ndarray, new: np.ndarray, ranks: int) -> RearrangePlan:
    """:func:`plan_rearrangement` of maps :func:`check_maps` has returned."""
    layers, slots = old.shape
    per_rank = slots // ranks
    holdings = _Holdings(old, ranks)
    rank_of = np.arange(slots) // per_rank
    layer_of = np.arange(layers)[:, None]

    changed = new != old
    local_src = holdings.lowest_slot(layer_of, rank_of[None, :], new)
    is_local = changed & (local_src >= 0)
    copy_layer, copy_dst = np.nonzero(is_local)
    local_copies = np.stack([copy_layer, local_src[copy_layer, copy_dst], copy_dst], axis=1)

    # Slots whose expert is nowhere on their rank: one receive per (layer, rank, expert).
    need_layer, need_slot = np.nonzero(changed & (local_src < 0))
    need_rank = rank_of[need_slot]
    need_expert = new[need_layer, need_slot]
    key = (need_layer * ranks + need_rank) * holdings.num_experts + need_expert
    # np.nonzero walks (layer, slot) in order, so each key's first occurrence is its lowest slot.
    _, first_index, inverse = np.unique(key, return_index=True, return_inverse=True)
    req_layer = need_layer[first_index]
    req_rank = need_rank[first_index]
    req_expert = need_expert[first_index]
    req_slot = need_slot[first_index]
    is_post = np.ones(key.size, dtype=bool)
    is_post[first_index] = False
    post_copies = np.stack(
        [need_layer[is_post], req_slot[inverse.ravel()[is_post]], need_slot[is_post]], axis=1
    )
    post_copies = post_copies[np.lexsort((post_copies[:, 2], post_copies[:, 0]))]

    src_rank = _choose_senders(holdings, req_layer, req_expert, layers)
    transfers = np.stack(
        [
            req_layer,
            req_expert,
            src_rank,
            holdings.lowest_slot(req_layer, src_rank, req_expert),
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


class _Holdings:
    """Who holds what under the old placement, as sorted keys (no dense [L, P, E] array).

    old: [layers, R] int64, the old phy2log.
    """

    def __init__(self, old: np.ndarray, ranks: int) -> None:
        layers, slots = old.shape
        self.ranks = ranks
        self.num_experts = int(old.max()) + 1
        slot = np.tile(np.arange(slots), layers)
        layer = np.repeat(np.arange(layers), slots)
        rank = slot // (slots // ranks)
        # Keys ordered (layer, rank, expert); walking slots layer by layer in
        # order, each key's first occurrence is its lowest slot on that rank.
        key = (layer * ranks + rank) * self.num_experts + old.ravel()
        self._keys, first = np.unique(key, return_index=True)
        self._lowest = slot[first]
        # The same holdings ordered (layer, expert, rank): the holders of one
        # expert are one contiguous run.
        held_rank = (self._keys // self.num_experts) % ranks
        expert_key = (self._keys // (self.num_experts * ranks)) * self.num_experts + (
            self._keys % self.num_experts
        )
        order = np.lexsort((held_rank, expert_key))
        self._expert_keys = expert_key[order]
        self._holder = held_rank[order]

    def lowest_slot(self, layer: np.ndarray, rank: np.ndarray, expert: np.ndarray) -> np.ndarray:
        """Lowest old slot of ``expert`` on ``rank`` in ``layer`` (broadcast), -1 if none."""
        query = (layer * self.ranks + rank) * self.num_experts + expert
        inside = expert < self.num_experts  # ids only the new map has are held nowhere
        pos = np.minimum(np.searchsorted(self._keys, query), self._keys.size - 1)
        found = inside & (self._keys[pos] == query)
        return np.where(found, self._lowest[pos], -1)

    def holders(self, layer: np.ndarray, expert: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the holders of each (layer, expert) start in :attr:`holder` and how many."""
        query = layer * self.num_experts + expert
        start = np.searchsorted(self._expert_keys, query, side="left")
        stop = np.searchsorted(self._expert_keys, query, side="right")
        return start, stop - start

    @property
    def holder(self) -> np.ndarray:
        """[holdings] int64: ranks holding each expert, grouped by (layer, expert)."""
        return self._holder


def _choose_senders(
    holdings: _Holdings, req_layer: np.ndarray, req_expert: np.ndarray, num_layers: int
) -> np.ndarray:
    """The sending rank of each request (layer, expert), requests sorted by layer.

    Returns [requests] int64. Greedy per layer: forced requests (one holder)
    first, then the rest, fewest holders first, each to the holder with the
    fewest sends in this layer, then over all layers so far, then the lowest rank.
    """
    start, count = holdings.holders(req_layer, req_expert)
    src = holdings.holder[start].copy()  # the only holder where forced
    ranks = holdings.ranks
    forced = count == 1
    sent_rows = (
        np.bincount(req_layer[forced] * ranks + src[forced], minlength=num_layers * ranks)
        .reshape(num_layers, ranks)
        .tolist()
    )
    # Layer by layer, fewest holders first; lexsort is stable, so among equally
    # constrained requests the plan order (rank, expert) decides.
    free = np.flatnonzero(~forced)
    free = free[np.lexsort((count[free], req_layer[free]))]
    # One loop over all layers' free requests in plain ints: this runs before
    # the first byte moves, and numpy calls per layer cost more than the loop.
    holder = holdings.holder.tolist()
    total = [0] * ranks
    layer, sent = 0, sent_rows[0]
    chosen = []
    for at, first, many in zip(
        req_layer[free].tolist(), start[free].tolist(), count[free].tolist(), strict=True
    ):
        while layer < at:  # the sends of finished layers count from now on
            total = [t + c for t, c in zip(total, sent, strict=True)]
            layer += 1
            sent = sent_rows[layer]
        # Holders come in ascending rank, so a strict < keeps the lowest rank.
        best = holder[first]
        key = (sent[best], total[best])
        for candidate in holder[first + 1 : first + many]:
            other = (sent[candidate], total[candidate])
            if other < key:
                best, key = candidate, other
        chosen.append(best)
        sent[best] += 1
    src[free] = chosen
    return src
