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

from eplb.slot_maps import check_maps, keep_experts_in_place

__all__ = [
    "RearrangePlan",
    "keep_experts_in_place",
    "local_waves",
    "plan_rearrangement",
    "split_steps",
]

_TURN_ROUNDS = 3  # see _deal_turns

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


def plan_rearrangement(old_phy2log: object, new_phy2log: object, world_size: int) -> RearrangePlan:
    """The transfer plan from one placement to another (same on every rank).

    old_phy2log: [layers, R] int (numpy or torch), the expert each slot holds now.
    new_phy2log: [layers, R] int, the expert each slot must hold afterwards.
    world_size: P, the number of EP ranks; rank r holds slots r*R/P .. (r+1)*R/P - 1.

    Every id in ``new_phy2log[l]`` must occur in ``old_phy2log[l]``. Raises
    TypeError/ValueError otherwise. Replicas of an expert are taken to hold the
    same weights, so any of them may serve as the source.
    """
    return _plan_checked(*check_maps(old_phy2log, new_phy2log, world_size), int(world_size))


def _plan_checked(old: np.ndarray, new: np.ndarray, ranks: int) -> RearrangePlan:
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


def split_steps(
    plan: RearrangePlan, expert_nbytes: int, max_step_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Order the transfers and cut them into pipeline steps (same on every rank).

    expert_nbytes: bytes of one expert (all tensors of one slot).
    max_step_bytes: the most bytes one step may send plus receive on any rank; a
        step holds at least one transfer, so a lone expert may exceed it.

    Returns ``order`` [T] int64, the rows of ``plan.transfers`` in execution order,
    and ``step`` [T] int64, the step of each row of ``order`` (non-decreasing). Within a
    layer, transfers that read a slot this plan overwrites go first and those that
    write a slot something still reads go last, so that a slot's last read rarely
    comes after its write (the executor delays such writes); within those, the
    (sender, receiver) pairs take turns, so that every step uses every direction,
    and each pair sends first the slots that are overwritten first.
    """
    t = plan.transfers
    if not t.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    shape = (plan.num_layers, plan.num_slots)
    written = np.zeros(shape, dtype=bool)
    read = np.zeros(shape, dtype=bool)
    for table, src, dst in ((t, 3, 5), (plan.local_copies, 1, 2), (plan.post_copies, 1, 2)):
        written[table[:, 0], table[:, dst]] = True
        if table is not plan.post_copies:  # post copies read new content
            read[table[:, 0], table[:, src]] = True
    reads_written = written[t[:, 0], t[:, 3]]
    writes_read = read[t[:, 0], t[:, 5]]
    rank_class = np.where(reads_written, 0, 2) + writes_read
    # Slots a local copy overwrites: their old content is sent first, so that
    # the copy (and the receive into the slot it reads) need not wait.
    copied_into = np.zeros(shape, dtype=bool)
    copied_into[plan.local_copies[:, 0], plan.local_copies[:, 2]] = True
    turn = _deal_turns(t, rank_class, plan.num_slots, copied_into[t[:, 0], t[:, 3]])
    # The pairs take turns: the i-th transfer of every (sender, receiver) pair
    # before the (i+1)-th of any, so a step carries every direction at once.
    # Sorted by sender, steps went one way at a time and left the other
    # direction of each link idle (half the bandwidth).
    order = np.lexsort((t[:, 4], t[:, 2], turn, rank_class, t[:, 0]))
    # Every transfer weighs one expert, so the budget is a count per rank.
    per_step = max_step_bytes // expert_nbytes
    if per_step == 0:  # a lone expert exceeds the budget: one transfer per step
        return order, np.arange(order.size, dtype=np.int64)
    # A plain loop on ints: it runs before the first byte moves, and numpy per
    # row (or per step, for steps of a few experts) costs more than it saves.
    step = [0] * order.size
    used = [0] * plan.world_size
    current = 0
    ordered = t[order]
    for i, (src, dst) in enumerate(
        zip(ordered[:, 2].tolist(), ordered[:, 4].tolist(), strict=True)
    ):
        a, b = used[src], used[dst]
        if (a if a > b else b) >= per_step:  # never on a step's first transfer
            current += 1
            used = [0] * plan.world_size
        used[src] += 1
        used[dst] += 1
        step[i] = current
    return order, np.array(step, dtype=np.int64)


def _deal_turns(
    t: np.ndarray,
    rank_class: np.ndarray,
    num_slots: int,
    urgent: np.ndarray,
    rounds: int = _TURN_ROUNDS,
) -> np.ndarray:
    """[T] int64: each transfer's turn within its (layer, class, sender, receiver) group.

    A receive into a slot must wait until that slot's old content is sent (the
    executor keeps the received bytes buffered until then), so each pair sends
    first the slots that the other direction overwrites first: a few rounds of
    sorting every pair by the turn at which its source slot is written, starting
    from expert order. Fewer writes wait, and fewer receive buffers are needed.
    """
    slot_written = t[:, 0] * num_slots + t[:, 5]  # each slot is written at most once
    slot_read = t[:, 0] * num_slots + t[:, 3]
    by_written = np.argsort(slot_written)
    where = np.minimum(np.searchsorted(slot_written[by_written], slot_read), len(t) - 1)
    writer = by_written[where]
    has_writer = slot_written[writer] == slot_read
    key = np.where(urgent, -1, 0)
    # One int64 sort key per round, (group, key, expert), instead of a six-key
    # lexsort: this runs before the first byte moves. Group ids are dense ranks.
    by_group = np.lexsort((t[:, 4], t[:, 2], rank_class, t[:, 0]))
    group_key = np.stack([t[:, 0], rank_class, t[:, 2], t[:, 4]], axis=1)[by_group]
    new_group = np.ones(len(t), dtype=bool)
    new_group[1:] = (group_key[1:] != group_key[:-1]).any(axis=1)
    group = np.empty(len(t), dtype=np.int64)
    group[by_group] = np.cumsum(new_group) - 1
    experts = int(t[:, 1].max()) + 1
    keys = len(t) + 2  # key + 1 is in 0 .. len(t) + 1
    turn = np.zeros(len(t), dtype=np.int64)
    for _ in range(rounds + 1):
        grouped = np.argsort((group * keys + key + 1) * experts + t[:, 1], kind="stable")
        starts = np.ones(len(t), dtype=bool)
        starts[1:] = group[grouped[1:]] != group[grouped[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(len(t)), 0))
        turn[grouped] = np.arange(len(t)) - first
        key = np.where(urgent, -1, np.where(has_writer, turn[writer], len(t)))
    return turn


def local_waves(copies: list[tuple[int, int]]) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Order one rank's local copies of one layer so that most go slot to slot.

    copies: (source slot, destination slot) pairs; each destination once, never
    its own source. A copy may only write a slot once every copy reading that
    slot's old content has run; where that is impossible (a cycle), one slot per
    cycle is staged first.

    Returns ``staged`` (slots whose old content goes to staging row i, before
    anything else) and ``waves``: lists of (source, destination) run one wave
    after another, copies within a wave independent. A source ``-1 - i`` means
    staging row i.
    """
    pending = {dst: src for src, dst in copies}
    readers: dict[int, int] = {}
    for src in pending.values():
        readers[src] = readers.get(src, 0) + 1
    staged: list[int] = []
    waves: list[list[tuple[int, int]]] = []
    while pending:
        ready = sorted(dst for dst in pending if not readers.get(dst, 0))
        if not ready:  # every slot left is still to be read: break one cycle
            slot = min(pending)
            for dst, src in pending.items():
                if src == slot:
                    pending[dst] = -1 - len(staged)
            staged.append(slot)
            readers[slot] = 0
            continue
        wave = []
        for dst in ready:
            src = pending.pop(dst)
            wave.append((src, dst))
            if src >= 0:
                readers[src] -= 1
        waves.append(wave)
    return staged, waves
