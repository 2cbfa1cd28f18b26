"""The numpy core of the production rebalance: SPEC.md, vectorized over rows.

The reference loops over rows and items; here every loop runs over item
positions (or replica slots) only, and each iteration handles all rows at once
(``layers x nodes`` rows for the slot packing). The results are the same
integers as ``eplb.reference`` for every input, because each vectorized
operation makes exactly the choice the spec makes:

- ``np.argmin`` / ``np.argmax`` return the first extreme of a row, i.e. the
  lowest index among equal values: the spec's tie rule for packs and experts.
- Items are taken in the order of a stable descending sort (equal weights keep
  ascending index), computed exactly (``_descending_order``).
- Pack totals are float64 and each is updated by one ``+`` per arriving item, in
  arrival order: the very additions of the spec.
- A full pack's total is replaced by ``+inf``, so the argmin only sees packs
  with room, as the spec's "among packs holding fewer than n/m items" asks.
  That needs every real total below ``+inf``; when loads are so large that a
  total could overflow, a slower selection that masks with NaN instead is used
  (``_pack_sorted``).

Work the spec's loops would repeat is skipped only where the result is provably
the same, each argued where it is done: the first ``m`` items of a packing
row are placed in closed form; counts are checked only when a pack can fill;
the slot order within packs comes from one sort; replication with many extra
slots scans only the experts that can be chosen (``_replica_candidates``).
Every numpy call on these small arrays costs about a microsecond, mostly
overhead, so the loops use bound methods, ``out=`` buffers and ``np.add.at``
(gather, add and scatter in one call), and no Python loop runs over rows.

The glossary (phy2log, log2phy, logcnt, pack, rank, slot) is the one of
``eplb.reference``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "balanced_packing",
    "inverse_map",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]

#: Bit pattern of +inf. Non-negative doubles (+inf included) are ordered like
#: their bit patterns read as int64, which lets an integer sort order them.
_INF_BITS = 0x7FF0000000000000
#: Loads below this cannot make any float64 sum of a row overflow: the largest
#: partial sum is at most n * max * (1 + 2^-40) for any realistic row length n.
_SAFE_ROW_TOTAL = 2.0**1000


def _descending_order(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order of a stable descending sort of each row, and the sorted weights.

    weight: [X, n] float64, non-negative (``+inf`` allowed), no NaN.

    Returns
      order: [X, n] int64, per row the item indices by weight descending, equal
        weights by ascending index.
      weight_sorted: [X, n] float64, ``weight`` in that order.

    Why it is exact: one int64 key per item holds the weight's bit pattern
    (non-negative doubles, +inf included, are ordered like their bits read as
    int64), flipped so that larger weights come first, with its lowest ``b``
    bits replaced by the item index (``2^b >= n``). Keys are unique, so a
    plain values-only sort of the keys, much faster than ``argsort``, gives
    the stable order whenever the dropped bits do not matter. Equal weights
    have equal flipped bits, so they always come out by index. Two different
    weights that agree on all kept bits might come out in the wrong order;
    that shows up as a rise in the sorted weights, and only such rows are
    sorted again with numpy's stable argsort.
    """
    num_items = weight.shape[1]
    shift = max(1, (num_items - 1).bit_length())
    low = (1 << shift) - 1
    # "+ 0.0" turns -0.0 (which passes validation) into +0.0: equal weights
    # must have equal bits.
    key = np.add(weight, 0.0).view(np.int64)
    np.subtract(_INF_BITS, key, out=key)
    np.bitwise_and(key, ~low, out=key)
    np.bitwise_or(key, np.arange(num_items, dtype=np.int64), out=key)
    key.sort(axis=1)
    order = np.bitwise_and(key, low, out=key)
    weight_sorted = _take_rows(weight, order)
    if num_items > 1:
        rises = np.less(weight_sorted[:, :-1], weight_sorted[:, 1:])
        if rises.any():
            rows = np.flatnonzero(rises.any(axis=1))
            order[rows] = np.argsort(-weight[rows], axis=1, kind="stable")
            weight_sorted[rows] = np.take_along_axis(weight[rows], order[rows], axis=1)
    return order, weight_sorted


def _take_rows(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[r, index[r, i]]`` for every row ``r``: one flat ``take``, cheaper
    than ``take_along_axis``.

    values: [X, n] any dtype. index: [X, k] int64, column indices into each row.
    """
    num_rows, num_cols = values.shape
    flat = index + (np.arange(num_rows, dtype=np.int64) * num_cols)[:, None]
    return np.ascontiguousarray(values).ravel().take(flat)


def _pack_sorted(weight_sorted: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md primitive 1, step 3, on items already in sorted order.

    weight_sorted: [X, n] float64, each row's item weights largest first
        (stable order), non-negative; ``n % num_packs == 0``, ``n / num_packs >= 2``.

    Returns
      pack: [n, X] int64, the pack of the item at each sorted position (transposed:
        row ``t`` is the ``t``-th item of every row).
      item_at: [X, n] int, the sorted position of the item at each place of
        the row's packs laid end to end: place ``k`` is pack ``k // cap``,
        rank ``k % cap``.
    """
    num_rows, num_items = weight_sorted.shape
    capacity = num_items // num_packs
    num_cells = num_rows * num_packs
    pack_t = np.empty((num_items, num_rows), dtype=np.int64)
    row_offset = np.arange(num_rows, dtype=np.int64) * num_packs
    first = weight_sorted[:, :num_packs]
    key = first + 0.0  # [X, m]: pack totals, full packs masked; "+ 0.0": -0.0 -> 0.0
    key_flat = key.ravel()
    # A full pack's key is +inf, so argmin only sees packs with room. When a
    # total could overflow to +inf (loads near the float64 maximum), full
    # packs are NaN instead and the selection is fmin + first equal
    # (_select_first_min): fmin skips NaN and NaN equals nothing.
    huge = not float(first[:, 0].max(initial=0.0)) * num_items < _SAFE_ROW_TOTAL
    full_key = np.nan if huge else np.inf

    # The first m = num_packs items in closed form. Let z be the number of
    # positive weights among them (they lead: the row is sorted). Item t < z
    # finds packs 0..t-1 holding one positive weight each and packs t.. empty
    # at 0.0, so it goes to pack t (lowest index among the smallest totals).
    # Items t >= z weigh 0.0 and leave every total as it is, so each goes to
    # the lowest-index pack at 0.0 with room: pack z until it is full, then
    # z+1, ... Either way pack p's total afterwards is weight_sorted[:, p]
    # (0.0 for p >= z), the spec's 0.0 + w.
    if first[:, -1].min() > 0:  # z = m in every row: no zero, no full pack
        pack_t[:num_packs] = np.arange(num_packs, dtype=np.int64)[:, None]
        counts = np.ones(num_cells, dtype=np.int64)
        has_full = False
    else:
        positive = (first > 0).sum(axis=1)
        position = np.arange(num_packs, dtype=np.int64)[:, None]
        after_zero = np.maximum(position - positive, 0)
        pack_t[:num_packs] = np.where(
            position < positive, position, positive + after_zero // capacity
        )
        counts = np.bincount((pack_t[:num_packs] + row_offset).ravel(), minlength=num_cells)
        full = counts == capacity
        key_flat[full] = full_key
        has_full = bool(full.any())

    # Every later item: one step per sorted position, all rows at once.
    # np.add.at adds in index order; one step's indices are distinct (one
    # per row), so each chosen total gets exactly its one "+ w".
    weight_t = np.ascontiguousarray(weight_sorted.T)  # [n, X]: row t contiguous
    argmin, add, add_at = key.argmin, np.add, np.add.at
    flat = np.empty(num_rows, dtype=np.int64)  # row * m + pack of this step's choices
    scratch = (np.empty(num_rows), np.empty((num_rows, num_packs), dtype=np.bool_))

    # Phase A: while no pack can become full, only the counts are kept (one
    # np.add.at per step). With c the largest count of a pack with room, the
    # next cap - 1 - c steps cannot fill any pack; then c is taken again.
    t = num_packs
    while t < num_items:
        if has_full:
            largest = counts.max(initial=0, where=counts < capacity)
        else:  # no pack was full after the first m items, so none is now
            largest = counts.max()
        stop = min(num_items, t + capacity - 1 - int(largest))
        if stop <= t:
            break
        for chosen, weight in zip(pack_t[t:stop], weight_t[t:stop], strict=True):
            if huge:
                _select_first_min(key, chosen, *scratch)
            else:
                argmin(1, chosen)
            add(chosen, row_offset, flat)
            add_at(key_flat, flat, weight)
            add_at(counts, flat, 1)
        t = stop

    # Phase B: a pack may fill at any step. The item that fills a pack adds
    # full_key on top of its weight (+inf or NaN); every other item adds
    # w + 0.0 = w.
    penalty = np.zeros(capacity + 1, dtype=np.float64)
    penalty[capacity] = full_key
    take_count, take_penalty = counts.take, penalty.take
    arrived = np.empty(num_rows, dtype=np.int64)
    increment = np.empty(num_rows, dtype=np.float64)
    for chosen, weight in zip(pack_t[t:], weight_t[t:], strict=True):
        if huge:
            _select_first_min(key, chosen, *scratch)
        else:
            argmin(1, chosen)
        add(chosen, row_offset, flat)
        add_at(counts, flat, 1)
        take_count(flat, None, arrived, "clip")
        take_penalty(arrived, None, increment, "clip")
        add(increment, weight, increment)
        add_at(key_flat, flat, increment)

    # Ranks are arrival order within a pack, and items arrive by sorted
    # position, so sorting the unique keys pack * 2^s + position per row lists
    # the items pack by pack, each pack in rank order. int32 keys when they
    # fit: numpy sorts them about twice as fast as int64.
    shift = max(1, (num_items - 1).bit_length())
    place = pack_t.T.astype(np.int32 if num_packs << shift < 2**31 else np.int64)
    place <<= shift
    place |= np.arange(num_items, dtype=place.dtype)
    place.sort(axis=1)
    place &= (1 << shift) - 1
    return pack_t, place


def _select_first_min(
    key: np.ndarray, out: np.ndarray, smallest: np.ndarray, is_min: np.ndarray
) -> None:
    """``out[r]`` = the lowest index of the smallest non-NaN ``key[r]``.

    key: [X, m] float64, NaN for full packs; some pack of each row is not NaN.
    out: [X] int64, written. smallest: [X] float64 and is_min: [X, m] bool, scratch.
    """
    np.fmin.reduce(key, axis=1, out=smallest)
    np.equal(key, smallest[:, None], is_min)
    is_min.argmax(1, out)


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md primitive 1: pack ``n`` items of each row into ``num_packs`` equal packs.

    weight: [X, n] float64, the weight of each item; rows are independent.
    num_packs: number of packs ``m``; must divide ``n``.

    Returns
      pack: [X, n] int64, the pack of each item.
      rank: [X, n] int64, the item's position in its pack, in order of arrival.
    """
    num_rows, num_items = weight.shape
    capacity = num_items // num_packs
    if capacity == 1:
        pack = np.broadcast_to(np.arange(num_items, dtype=np.int64), (num_rows, num_items))
        return pack.copy(), np.zeros((num_rows, num_items), dtype=np.int64)
    with np.errstate(over="ignore"):
        order, weight_sorted = _descending_order(np.asarray(weight, dtype=np.float64))
        pack_t, item_at = _pack_sorted(weight_sorted, num_packs)
    # Back from sorted positions to items: item order[t] is in pack pack_t[t];
    # the item at place k of the packs has rank k % cap.
    row_start = (np.arange(num_rows, dtype=np.int64) * num_items)[:, None]
    pack = np.empty(num_rows * num_items, dtype=np.int64)
    rank = np.empty(num_rows * num_items, dtype=np.int64)
    pack[(order + row_start).ravel()] = pack_t.T.ravel()
    rank[(_take_rows(order, item_at) + row_start).ravel()] = np.tile(
        np.arange(num_items, dtype=np.int64) % capacity, num_rows
    )
    return pack.reshape(num_rows, num_items), rank.reshape(num_rows, num_items)


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
    extra_expert, extra_rank, count, _ = _replicate(weight, num_phy - num_log)
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log, dtype=np.int64)
    phy2log[:, num_log:] = extra_expert
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    rank[:, num_log:] = extra_rank
    return phy2log, rank, count


def _replicate(
    weight: np.ndarray, num_extra: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SPEC.md primitive 2, returning only what the extra slots change.

    weight: [X, n] float64, the load of each expert; rows are independent.
    num_extra: slots per row beyond the first n (slot ``i < n`` holds expert ``i``).

    Returns
      extra_expert: [X, num_extra] int64, the expert of slot ``n + i``.
      extra_rank: [X, num_extra] int64, its replica rank.
      count: [X, n] int64, the replica count of each expert.
      per_replica: [X, n] float64, each expert's load over its count (float64
        division, as SPEC.md step 5).
    """
    num_rows, num_log = weight.shape
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    candidates = _replica_candidates(weight, num_extra)
    if candidates is None:
        width, cand_weight = num_log, weight
    else:
        width = candidates.shape[1]
        cand_weight = _take_rows(weight, np.maximum(candidates, 0))
        cand_weight[candidates < 0] = -1.0  # padding: below every real load, never chosen
    # Per-replica load and replica count of every candidate; each slot changes
    # only the chosen one's two entries. float64 counts are exact (< 2^53)
    # and make the division the spec's float64 W / count; W / 1 = W.
    ratio = cand_weight.copy()
    ratio_flat, weight_flat = ratio.ravel(), cand_weight.ravel()
    count = np.ones(num_rows * width, dtype=np.float64)
    chosen_t = np.empty((num_extra, num_rows), dtype=np.int64)
    rank_t = np.empty((num_extra, num_rows), dtype=np.float64)
    row_offset = np.arange(num_rows, dtype=np.int64) * width
    flat = np.empty(num_rows, dtype=np.int64)
    new_count = np.empty(num_rows, dtype=np.float64)
    new_load = np.empty(num_rows, dtype=np.float64)
    argmax, add, divide = ratio.argmax, np.add, np.divide
    take_count, put_count = count.take, count.put
    take_weight, put_load = weight_flat.take, ratio_flat.put
    for chosen, before in zip(chosen_t, rank_t, strict=True):
        # First maximum = lowest index among equal per-replica loads; the
        # candidates are in ascending expert order, so lowest expert index.
        argmax(1, chosen)
        add(chosen, row_offset, flat)
        take_count(flat, None, before, "clip")
        add(before, 1.0, new_count)
        put_count(flat, new_count)
        take_weight(flat, None, new_load, "clip")
        divide(new_load, new_count, new_load)
        put_load(flat, new_load)
    extra = chosen_t.T.copy()
    extra_rank = rank_t.T.astype(np.int64)
    if candidates is None:
        return extra, extra_rank, count.astype(np.int64).reshape(num_rows, num_log), ratio
    # Back from candidates to all experts: counts are 1 + extras received.
    extra = _take_rows(candidates, extra)
    logcnt = np.ones(num_rows * num_log, dtype=np.int64)
    np.add.at(logcnt, (extra + (np.arange(num_rows, dtype=np.int64) * num_log)[:, None]).ravel(), 1)
    logcnt = logcnt.reshape(num_rows, num_log)
    return extra, extra_rank, logcnt, weight / logcnt


#: Extra slots per row from which replication first narrows the experts it
#: scans (below this, narrowing costs more than the scans it saves).
_NARROW_MIN_EXTRA = 32


def _replica_candidates(weight: np.ndarray, num_extra: int) -> np.ndarray | None:
    """The experts that replication can choose, per row in ascending order, or None.

    weight: [X, n] float64, the load of each expert.

    Returns [X, C] int64 expert indices, -1 padded, or None when narrowing
    does not pay (few extra slots, or ties make the candidates most experts).

    Why it is exact: replication hands out the extra slots in the order of
    the keys (-W_j / c, j, c) over all experts j and counts c >= 1 (each
    expert's keys only grow with c, and ties go to the lowest j), so the
    chosen keys are the num_extra smallest. An expert that gets any extra has
    its key (-W_j, j, 1) among them, and so do the keys (-W_i, i, 1) of every
    expert before it in the stable descending order of W: it is among the
    first num_extra of that order, hence W_j >= the num_extra-th largest
    load. Taking every expert at or above that load keeps them all, and
    argmax over them, in ascending index order, picks what it picks over all.
    """
    num_rows, num_log = weight.shape
    if num_extra < _NARROW_MIN_EXTRA or 4 * num_extra > num_log:
        return None
    threshold = np.partition(weight, num_log - num_extra, axis=1)[:, num_log - num_extra]
    flat = np.flatnonzero(weight >= threshold[:, None])  # row-major: each row ascending
    rows = flat // num_log
    per_row = np.bincount(rows, minlength=num_rows)
    width = int(per_row.max())
    if 2 * width > num_log:
        return None
    # Position of each kept expert within its row: its rank among the kept.
    place = np.arange(flat.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    candidates = np.full(num_rows * width, -1, dtype=np.int64)
    candidates[rows * width + place] = flat - rows * num_log
    return candidates.reshape(num_rows, width)


def _group_loads(weight: np.ndarray, num_groups: int) -> np.ndarray:
    """SPEC.md hierarchy step 1: ``[L, G]`` float64 group loads, each summed left to right.

    weight: [L, E] float64, load of each logical expert.

    ``np.sum`` along a contiguous axis adds pairwise, not left to right. A
    reduction over the first axis of a C-contiguous array adds whole rows in
    order (``out += row``), so the groups' experts are laid out along axis 0.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    by_offset = np.ascontiguousarray(weight.reshape(num_layers * num_groups, group_size).T)
    return np.add.reduce(by_offset, axis=0).reshape(num_layers, num_groups)


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

    Rows of the work arrays are (layer, node) pairs, row = layer * N + node;
    a row's node-local experts are its part of the [L, E] layout, the same
    way its slots are its part of the [L, R] output.
    """
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical_experts // num_nodes
    slots_per_gpu = num_physical_experts // num_gpus
    gpus_per_node = num_gpus // num_nodes
    num_rows = num_layers * num_nodes
    row_index = np.arange(num_rows, dtype=np.int64)[:, None]

    if groups_per_node > 1:
        # Step 1: group loads, each summed left to right.
        with np.errstate(over="ignore"):
            group_load = _group_loads(weight, num_groups)
        # Step 2: groups to nodes.
        group_pack, group_rank = balanced_packing(group_load, num_nodes)
        # Step 3: node-local order. Group g lands at node-local group position
        # pack * gpn + rank; group_rows[position] = the (layer, group) row of
        # the [L * G, gs] view of the loads that goes there.
        position = group_pack * groups_per_node + group_rank
        layer_start = (np.arange(num_layers, dtype=np.int64) * num_groups)[:, None]
        position += layer_start
        group_rows = np.empty(num_layers * num_groups, dtype=np.int64)
        group_rows[position.ravel()] = (np.arange(num_groups, dtype=np.int64) + layer_start).ravel()
        # The loads in node-local order: whole groups move, one row copy each.
        node_load = weight.reshape(-1, group_size).take(group_rows, axis=0)
        node_load = node_load.reshape(num_rows, experts_per_node)
        # Logical expert of each node-local expert: group * gs + offset.
        group_at = group_rows.reshape(num_layers, num_groups) - layer_start
        local_logical = (
            group_at[:, :, None] * group_size + np.arange(group_size, dtype=np.int64)
        ).reshape(num_rows, experts_per_node)
    else:
        # One group per node (G == N, the global policy included): packing G
        # items into N packs puts group g on node g at rank 0, so node-local
        # order is logical order: node p's experts are p * epn ...
        group_rows = None
        node_load = weight.reshape(num_rows, experts_per_node)
        local_logical = (row_index % num_nodes) * experts_per_node + np.arange(
            experts_per_node, dtype=np.int64
        )

    # Step 4: replicate within each node. Slot i < epn holds node-local
    # expert i (replica rank 0); the extra slots are what replication chose.
    num_extra = slots_per_node - experts_per_node
    extra_expert, extra_rank, mlogcnt, per_replica = _replicate(node_load, num_extra)
    extra_flat = extra_expert + row_index * experts_per_node

    # Step 5: the load each slot carries, its expert's load over its count.
    slot_load = np.empty((num_rows, slots_per_node), dtype=np.float64)
    slot_load[:, :experts_per_node] = per_replica
    slot_load[:, experts_per_node:] = per_replica.ravel().take(extra_flat)

    # Step 6: slots to GPUs within each node. source[row, k]: the flat index
    # (row * rpn + slot) of the slot at place k of the node's GPUs laid end
    # to end (GPU k // rpg, rank k % rpg): physical index row * rpn + k.
    if slots_per_gpu > 1:
        with np.errstate(over="ignore"):
            order, slot_load_sorted = _descending_order(slot_load)
            _, item_at = _pack_sorted(slot_load_sorted, gpus_per_node)
        source = _take_rows(order, item_at) + row_index * slots_per_node
    else:
        # One slot per GPU: slot i goes to GPU i, rank 0.
        source = np.arange(num_rows * slots_per_node, dtype=np.int64)

    # Step 7: map back to logical experts; the replica rank travels with the
    # slot. Expert and rank ride in one int64 (expert << 32 | rank) so that one
    # gather moves both.
    slot_code = np.empty((num_rows, slots_per_node), dtype=np.int64)
    np.left_shift(local_logical, 32, out=slot_code[:, :experts_per_node])
    extra_code = slot_code[:, experts_per_node:]
    np.left_shift(local_logical.ravel().take(extra_flat), 32, out=extra_code)
    extra_code |= extra_rank
    code = slot_code.ravel().take(source).reshape(num_layers, num_physical_experts)
    out_rank = code & 0xFFFFFFFF
    phy2log = np.right_shift(code, 32, out=code)
    if group_rows is None:
        logcnt = mlogcnt.reshape(num_layers, num_logical)
    else:
        # Whole groups move back, as they came.
        logcnt = np.empty((num_layers * num_groups, group_size), dtype=np.int64)
        logcnt[group_rows] = mlogcnt.reshape(-1, group_size)
        logcnt = logcnt.reshape(num_layers, num_logical)
    return phy2log, out_rank, logcnt


def inverse_map(phy2log: np.ndarray, phyrank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """log2phy ``[L, E, K]`` int64 (``-1`` padded, ``K = logcnt.max()``).

    phy2log: [L, R] int64, the logical expert of each slot.
    phyrank: [L, R] int64, the replica rank of each slot.
    logcnt: [L, E] int64, the replica count of each logical expert.
    """
    num_layers, num_slots = phy2log.shape
    num_logical = logcnt.shape[1]
    max_replicas = int(logcnt.max())
    log2phy = np.full(num_layers * num_logical * max_replicas, -1, dtype=np.int64)
    target = phy2log + (np.arange(num_layers, dtype=np.int64) * num_logical)[:, None]
    target *= max_replicas
    target += phyrank
    # Fancy assignment with 1-D index and value arrays is numpy's fast path.
    log2phy[target.ravel()] = np.tile(np.arange(num_slots, dtype=np.int64), num_layers)
    return log2phy.reshape(num_layers, num_logical, max_replicas)
