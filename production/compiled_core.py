"""The compiled placement core: SPEC.md's loops in numba, one call per placement, no GIL.

The same steps as ``eplb.reference`` (``balanced_packing``, ``replicate_experts``,
``rebalance_experts_hierarchical``, ``inverse_map``), compiled by numba with
``nogil=True``: ``placement`` runs the value checks, the float64 conversion,
the policy choice, the whole hierarchy and log2phy in one call that never
holds the interpreter lock, so a busy Python thread beside it keeps running
and the call waits for the lock only once, when it returns.

Every step makes exactly the choices of SPEC.md, in its order:

- items are taken in the order of a stable descending sort (``_sort_descending``:
  equal weights keep ascending index);
- pack totals start at ``0.0`` and get one float64 ``+`` per arriving item;
  replication divides ``W / count`` in float64;
- the smallest pack total (among packs with room) is found by a scan of few
  packs or a tournament tree over many, the largest per-replica load by a
  tree: each internal node holds the winner of its two children, the left
  child (the lower indices) winning unless the right one is strictly better,
  so the root is the lowest index among equal values, as SPEC.md's tie rule
  asks. A choice changes one leaf and replays its ``log2(m)`` matches instead
  of rescanning all ``m`` packs, which is what Kimi-K2's 448-slots-into-64-GPUs
  packing needs. A full pack's total becomes NaN, which never wins, so totals
  that overflow to ``+inf`` (loads near the float64 maximum) need no special
  case: ``inf < inf`` is false, and the lower index keeps the tie.

The module imports numpy and numba only; ``eplb.production.cores`` imports it
when the compiled core is chosen and falls back to the numpy core when numba is
missing or cannot compile. Compiled code is cached on disk (``cache=True``) next
to this file or in numba's user cache directory; where neither is writable,
the functions are compiled in memory on every start (see ``_jit``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import types

__all__ = [
    "CACHED",
    "balanced_packing",
    "inverse_map",
    "placement",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]

#: True when the compiled code is cached on disk; False when no cache directory
#: was writable and every start compiles anew.
CACHED = True


def _jit(*signatures: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(signatures, nogil=True, cache=True)``, in memory where no cache dir is writable.

    The signatures compile when this module is imported (or load from the
    cache), so no call on the serving path compiles. numba refuses
    ``cache=True`` with a RuntimeError when neither the package folder nor its
    user cache folder (``NUMBA_CACHE_DIR``) is writable, as in a read-only
    install: then the code is compiled without a cache.
    """

    def wrap(function: Callable[..., Any]) -> Any:
        global CACHED
        # Helpers without signatures compile with (and are cached in) their callers.
        args = (list(signatures),) if signatures else ()
        try:
            return numba.njit(*args, nogil=True, cache=True)(function)
        except RuntimeError:
            CACHED = False
            return numba.njit(*args, nogil=True, cache=False)(function)

    return wrap


#: Packs up to this many are searched by a scan, more by a tournament tree.
_LINEAR_MAX_PACKS = 16
#: Rows whose largest weight times their length is below this cannot make any
#: float64 pack total overflow (as in the numpy core).
_SAFE_ROW_TOTAL = 2.0**1000
#: Bit pattern of +inf. Non-negative doubles (+inf included) are ordered like
#: their bit patterns read as int64.
_INF_BITS = 0x7FF0000000000000
#: The tree key of a full pack (and of a padding leaf): above every total's bits, +inf's included.
_FULL = 0x7FFFFFFFFFFFFFFF
#: Insertion-sorted run length before the merges of ``_sort_descending``.
_RUN = 8

_F64_2D = types.float64[:, ::1]
_I64_2D = types.int64[:, ::1]
_F64_1D = types.float64[::1]
_I64_1D = types.int64[::1]
_I32_1D = types.int32[::1]


@_jit()
def _leaves(count: int) -> int:
    """The smallest power of two >= ``count``: the leaves of a tournament tree over ``count``."""
    leaves = 1
    while leaves < count:
        leaves *= 2
    return leaves


# --- a stable descending sort --------------------------------------------------------------


@_jit()
def _sort_eight(keys: np.ndarray, start: int) -> None:
    """Sort ``keys[start : start + 8]`` ascending by Batcher's network of 19 compare-exchanges.

    Branch-free (each exchange is a min and a max): an insertion sort's
    comparisons of random keys mispredict about half the time (measured: the
    network sorts 72 keys in about two thirds of the time).
    """
    a0, a1, a2, a3 = keys[start], keys[start + 1], keys[start + 2], keys[start + 3]
    a4, a5, a6, a7 = keys[start + 4], keys[start + 5], keys[start + 6], keys[start + 7]
    a0, a1, a2, a3 = min(a0, a1), max(a0, a1), min(a2, a3), max(a2, a3)
    a4, a5, a6, a7 = min(a4, a5), max(a4, a5), min(a6, a7), max(a6, a7)
    a0, a2, a1, a3 = min(a0, a2), max(a0, a2), min(a1, a3), max(a1, a3)
    a4, a6, a5, a7 = min(a4, a6), max(a4, a6), min(a5, a7), max(a5, a7)
    a1, a2, a5, a6 = min(a1, a2), max(a1, a2), min(a5, a6), max(a5, a6)
    a0, a4, a1, a5 = min(a0, a4), max(a0, a4), min(a1, a5), max(a1, a5)
    a2, a6, a3, a7 = min(a2, a6), max(a2, a6), min(a3, a7), max(a3, a7)
    a2, a4, a3, a5 = min(a2, a4), max(a2, a4), min(a3, a5), max(a3, a5)
    a1, a2, a3, a4 = min(a1, a2), max(a1, a2), min(a3, a4), max(a3, a4)
    a5, a6 = min(a5, a6), max(a5, a6)
    keys[start], keys[start + 1], keys[start + 2], keys[start + 3] = a0, a1, a2, a3
    keys[start + 4], keys[start + 5], keys[start + 6], keys[start + 7] = a4, a5, a6, a7


@_jit()
def _sort_keys(keys: np.ndarray, spare: np.ndarray) -> np.ndarray:
    """Sort ``keys`` ascending: runs of eight by a network, then merges; returns the sorted array.

    keys, spare: [n] int64, distinct; both are overwritten, the result is one of them.

    The merges pick with a select rather than a branch (the comparison of two
    loads mispredicts half the time); a short last run is insertion-sorted.
    """
    n = keys.size
    for start in range(0, n, _RUN):
        stop = min(start + _RUN, n)
        if stop - start == _RUN:
            _sort_eight(keys, start)
            continue
        for i in range(start + 1, stop):
            key = keys[i]
            j = i
            while j > start and keys[j - 1] > key:
                keys[j] = keys[j - 1]
                j -= 1
            keys[j] = key
    source, target = keys, spare
    width = _RUN
    while width < n:
        for start in range(0, n, 2 * width):
            middle = min(start + width, n)
            stop = min(start + 2 * width, n)
            left, right, out = start, middle, start
            while left < middle and right < stop:
                left_key, right_key = source[left], source[right]
                take_right = right_key < left_key
                target[out] = right_key if take_right else left_key
                right += take_right
                left += 1 - take_right
                out += 1
            for i in range(left, middle):
                target[out] = source[i]
                out += 1
            for i in range(right, stop):
                target[out] = source[i]
                out += 1
        source, target = target, source
        width *= 2
    return source


@_jit()
def _sort_descending(
    values: np.ndarray, order: np.ndarray, keys: np.ndarray, spare: np.ndarray
) -> None:
    """The order of a stable descending sort of ``values``: equal values keep ascending index.

    values: [n] float64, >= 0 or -0.0 (+inf allowed), no NaN.
    order: [>= n] int32, its first n filled with the item indices.
    keys, spare: [>= n] int64, work space.

    As in the numpy core: one int64 key per item holds the value's bits
    (ordered like the values), flipped so that larger values come first, with
    its lowest ``b`` bits replaced by the item index (``2^b >= n``). The keys
    are unique, so sorting them alone gives the stable order whenever the
    dropped bits do not matter; equal values have equal kept bits and always
    come out by index. Two different values that agree on every kept bit may
    come out in the wrong order, which shows as a rise in the sorted values:
    such a row is sorted again with the index as the tie-break, exactly.
    """
    n = values.size
    shift = 1
    while (1 << shift) < n:
        shift += 1
    low = (1 << shift) - 1
    keys, spare = keys[:n], spare[:n]
    for i in range(n):
        # "+ 0.0": -0.0 becomes 0.0, so that equal values have equal bits.
        keys[i] = ((_INF_BITS - np.float64(values[i] + 0.0).view(np.int64)) & ~low) | i
    sorted_keys = _sort_keys(keys, spare)
    rises = False
    previous = np.inf
    for i in range(n):
        item = sorted_keys[i] & low
        order[i] = item
        rises |= values[item] > previous
        previous = values[item]
    if rises:
        # Rare (values within 2^-(52-b) of each other): numba's stable sort.
        exact = np.argsort(-values, kind="mergesort")
        for i in range(n):
            order[i] = exact[i]


# --- SPEC.md's primitives, one row at a time, in caller-owned work space --------------------


@_jit()
def _replay_min(tree_key: np.ndarray, tree_index: np.ndarray, leaf: int, key: int) -> None:
    """Set leaf ``leaf``'s key and replay the matches above it, for the smallest (key, index).

    tree_key: [2 * M] int64, tree_index: [2 * M] int32: leaf ``j`` of pack j at
        ``M + j``; node ``i`` holds the winner of nodes ``2i`` and ``2i + 1``.

    The lexicographic minimum of (key, index) is SPEC.md's rule: the smallest
    total, the lowest index on equal totals. Keys and indices live in the
    nodes, so a match reads its sibling only (no indirection through the
    totals), and the winner travels up in registers.
    """
    node = leaf
    index = tree_index[node]
    tree_key[node] = key
    while node > 1:
        other_key = tree_key[node ^ 1]
        other_index = tree_index[node ^ 1]
        # "&" and "|", not "and" and "or", and selects: no branch to mispredict.
        other = (other_key < key) | ((other_key == key) & (other_index < index))
        key = other_key if other else key
        index = other_index if other else index
        node >>= 1
        tree_key[node] = key
        tree_index[node] = index


@_jit()
def _pack_row(
    values: np.ndarray,
    num_packs: int,
    pack: np.ndarray,
    rank: np.ndarray,
    order: np.ndarray,
    keys: np.ndarray,
    spare: np.ndarray,
    total: np.ndarray,
    counts: np.ndarray,
    tree_key: np.ndarray,
    tree_index: np.ndarray,
) -> None:
    """SPEC.md primitive 1 on one row: ``n`` items into ``num_packs`` packs of ``n / num_packs``.

    values: [n] float64, the weight of each item.
    pack, rank: [n] int (out), each item's pack and its position in that pack.
    order: [>= n] int32, keys, spare: [>= n] int64: the sort's work space.
    total: [>= num_packs] float64, counts: [>= num_packs] int32: pack totals and sizes.
    tree_key: [>= 2 * leaves] int64, tree_index: [>= 2 * leaves] int32, ``leaves``
        the power of two >= num_packs: the tree, for more than
        ``_LINEAR_MAX_PACKS`` packs.

    Up to ``_LINEAR_MAX_PACKS`` packs are scanned, the float totals compared
    with ``<``: a full pack's total becomes +inf (NaN where a total could
    itself overflow to +inf), which never wins. More packs go through a
    tournament tree whose keys are the totals' bits (ordered as the totals)
    and ``_FULL`` for a full pack.
    """
    n = values.size
    per_pack = n // num_packs
    if per_pack == 1:
        for i in range(n):
            pack[i] = i
            rank[i] = 0
        return
    _sort_descending(values, order, keys, spare)
    # The first round needs no search: while the items weigh more than 0,
    # item k finds packs 0..k-1 above 0.0 and packs k.. at 0.0, so it goes to
    # pack k, the lowest index among the smallest totals (0.0 + w == w).
    first = 0
    while first < num_packs and values[order[first]] > 0.0:
        item = order[first]
        pack[item] = first
        rank[item] = 0
        total[first] = values[item]
        counts[first] = 1
        first += 1
    for p in range(first, num_packs):
        total[p] = 0.0
        counts[p] = 0
    if num_packs > _LINEAR_MAX_PACKS:
        leaves = _leaves(num_packs)
        for j in range(leaves):
            # Totals' bits; padding leaves (on the right) are full packs.
            tree_key[leaves + j] = np.float64(total[j]).view(np.int64) if j < num_packs else _FULL
            tree_index[leaves + j] = j
        for node in range(leaves - 1, 0, -1):
            # The left child (lower indices) wins unless the right one is strictly smaller.
            right = tree_key[2 * node + 1] < tree_key[2 * node]
            tree_key[node] = tree_key[2 * node + right]
            tree_index[node] = tree_index[2 * node + right]
        for k in range(first, n):
            item = order[k]
            best = tree_index[1]
            count = counts[best]
            pack[item] = best
            rank[item] = count
            count += 1
            counts[best] = count
            total[best] += values[item]
            key = _FULL if count == per_pack else np.float64(total[best]).view(np.int64)
            _replay_min(tree_key, tree_index, leaves + best, key)
        return
    largest = 0.0
    for i in range(n):
        largest = max(largest, values[i])
    if largest * n < _SAFE_ROW_TOTAL:
        # No total can overflow: +inf marks a full pack, and a plain "<" passes over it.
        for k in range(first, n):
            item = order[k]
            best, lowest = 0, total[0]
            for p in range(1, num_packs):
                if total[p] < lowest:
                    best, lowest = p, total[p]
            count = counts[best]
            pack[item] = best
            rank[item] = count
            counts[best] = count + 1
            total[best] = np.inf if count + 1 == per_pack else total[best] + values[item]
        return
    # Totals may reach +inf: NaN marks a full pack ("right beats left when
    # right < left or left is NaN"), so an open +inf pack still wins by index.
    for k in range(first, n):
        item = order[k]
        best, lowest = 0, total[0]
        for p in range(1, num_packs):
            if (total[p] < lowest) | (lowest != lowest):
                best, lowest = p, total[p]
        count = counts[best]
        pack[item] = best
        rank[item] = count
        counts[best] = count + 1
        total[best] = np.nan if count + 1 == per_pack else total[best] + values[item]


@_jit()
def _replicate_row(
    weight: np.ndarray,
    phy2log: np.ndarray,
    rank: np.ndarray,
    count: np.ndarray,
    tree_value: np.ndarray,
    tree_index: np.ndarray,
) -> None:
    """SPEC.md primitive 2 on one row: give the ``num_phy - n`` extra slots to the hottest experts.

    weight: [n] float64, the load of each expert.
    phy2log, rank: [num_phy] int (out), the expert and replica rank of each slot.
    count: [n] int (out), the replica count of each expert.
    tree_value: [>= 2 * leaves] float64, tree_index: [>= 2 * leaves] int32, ``leaves``
        the power of two >= n: a tournament tree for the largest ``W / count``.

    A match goes to the larger value, the lower index on equal values (-0.0
    equals 0.0 here, as in the reference); padding leaves weigh -1.0, below every load.
    """
    n = weight.size
    num_phy = phy2log.size
    for e in range(n):
        phy2log[e] = e
        rank[e] = 0
        count[e] = 1
    if num_phy == n:
        return
    leaves = _leaves(n)
    for j in range(leaves):
        # float64 division by the count, as SPEC.md: W / 1 == W.
        tree_value[leaves + j] = weight[j] if j < n else -1.0
        tree_index[leaves + j] = j
    for node in range(leaves - 1, 0, -1):
        left_value, right_value = tree_value[2 * node], tree_value[2 * node + 1]
        right = right_value > left_value
        tree_value[node] = right_value if right else left_value
        tree_index[node] = tree_index[2 * node + 1] if right else tree_index[2 * node]
    for slot in range(n, num_phy):
        best = tree_index[1]
        replicas = count[best]
        phy2log[slot] = best
        rank[slot] = replicas
        count[best] = replicas + 1
        value = weight[best] / np.float64(replicas + 1)
        index = best
        node = leaves + best
        tree_value[node] = value
        while node > 1:
            other_value = tree_value[node ^ 1]
            other_index = tree_index[node ^ 1]
            other = (other_value > value) | ((other_value == value) & (other_index < index))
            value = other_value if other else value
            index = other_index if other else index
            node >>= 1
            tree_value[node] = value
            tree_index[node] = index


# --- the hierarchy, one layer at a time in one work space -----------------------------------


@_jit()
def _space(
    num_logical: int, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The lengths of the work-space arrays of one layer: (float64, int64, int32) tuples.

    ``_carve`` cuts them out of three buffers in this order; one layer's arrays
    serve every layer of a call (and, through ``placement``, every call of a thread).
    """
    per_node = num_logical // num_nodes
    slots = num_phy // num_nodes
    items = max(num_groups, slots)  # the longest row sorted
    packs = max(num_nodes, num_gpus // num_nodes)
    pack_tree = 2 * _leaves(packs)
    replica_tree = 2 * _leaves(per_node)
    f64 = (num_logical, num_groups, per_node, slots, packs, replica_tree)
    i64 = (items, items, pack_tree)
    i32 = (
        items, num_groups, num_groups, num_logical, slots, slots, per_node, slots, slots,
        packs, pack_tree, replica_tree,
    )  # fmt: skip
    return f64, i64, i32


@_jit()
def _need(lengths: tuple[int, ...]) -> int:
    """The buffer length that holds arrays of the given lengths one after another."""
    need = 0
    for length in lengths:
        need += length
    return need


@_jit()
def _cut(buffer: np.ndarray, lengths: tuple[int, ...], which: int) -> np.ndarray:
    """The ``which``-th of the consecutive views of ``buffer`` with the given lengths."""
    start = 0
    for i in range(which):
        start += lengths[i]
    return buffer[start : start + lengths[which]]


@_jit()
def _hierarchy(
    weight: np.ndarray,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    phy2log: np.ndarray,
    phyrank: np.ndarray,
    logcnt: np.ndarray,
    f64: np.ndarray,
    i64: np.ndarray,
    i32: np.ndarray,
) -> None:
    """SPEC.md "The hierarchy", layer by layer, in the work space of one layer.

    weight: [L, E] float32 or float64, load of each logical expert in each layer.
    phy2log: [L, R] int (out), the logical expert of each slot.
    phyrank: [L, R] int (out), the replica rank of each slot.
    logcnt: [L, E] int (out), the replica count of each logical expert.
    f64, i64, i32: [>= _need(...)] work space laid out by ``_space``.

    Nothing is allocated here: a layer's arrays (its float64 loads, group and
    slot loads, the sorts' keys, the trees) are views of the three buffers,
    rewritten by every layer.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    per_node = num_logical // num_nodes
    slots = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_phy // num_gpus
    f, q, s = _space(num_logical, num_phy, num_groups, num_nodes, num_gpus)
    load, group_load, node_load = _cut(f64, f, 0), _cut(f64, f, 1), _cut(f64, f, 2)
    slot_load, total, replica_value = _cut(f64, f, 3), _cut(f64, f, 4), _cut(f64, f, 5)
    keys, spare, tree_key = _cut(i64, q, 0), _cut(i64, q, 1), _cut(i64, q, 2)
    order, group_pack, group_rank = _cut(i32, s, 0), _cut(i32, s, 1), _cut(i32, s, 2)
    mlog2log, phy2mlog, replica_rank = _cut(i32, s, 3), _cut(i32, s, 4), _cut(i32, s, 5)
    mlogcnt, gpu_pack, gpu_rank = _cut(i32, s, 6), _cut(i32, s, 7), _cut(i32, s, 8)
    counts, tree_index, replica_index = _cut(i32, s, 9), _cut(i32, s, 10), _cut(i32, s, 11)
    for layer in range(num_layers):
        # float32 -> float64 is exact, as numpy's.
        for e in range(num_logical):
            load[e] = np.float64(weight[layer, e])
        # Step 1: group loads, each summed left to right.
        for g in range(num_groups):
            acc = 0.0
            for offset in range(group_size):
                acc += load[g * group_size + offset]
            group_load[g] = acc
        # Step 2: groups to nodes.
        _pack_row(
            group_load, num_nodes, group_pack, group_rank,
            order, keys, spare, total, counts, tree_key, tree_index,
        )  # fmt: skip
        # Step 3: node-local order; the loops run over (group, offset) rather
        # than dividing each index: an integer division costs more than the step.
        for g in range(num_groups):
            start = (group_pack[g] * groups_per_node + group_rank[g]) * group_size
            for offset in range(group_size):
                mlog2log[start + offset] = g * group_size + offset
        for node in range(num_nodes):
            base = node * per_node
            # Step 4: replicate within the node.
            for local in range(per_node):
                node_load[local] = load[mlog2log[base + local]]
            _replicate_row(node_load, phy2mlog, replica_rank, mlogcnt, replica_value, replica_index)
            # Step 5: the load each slot carries.
            for slot in range(slots):
                local = phy2mlog[slot]
                slot_load[slot] = node_load[local] / np.float64(mlogcnt[local])
            # Step 6: slots to GPUs within the node.
            _pack_row(
                slot_load, gpus_per_node, gpu_pack, gpu_rank,
                order, keys, spare, total, counts, tree_key, tree_index,
            )  # fmt: skip
            # Step 7: back to physical slots and logical experts.
            for slot in range(slots):
                phy = node * slots + gpu_pack[slot] * slots_per_gpu + gpu_rank[slot]
                phy2log[layer, phy] = mlog2log[base + phy2mlog[slot]]
                phyrank[layer, phy] = replica_rank[slot]
            for local in range(per_node):
                logcnt[layer, mlog2log[base + local]] = mlogcnt[local]


@_jit()
def _work_space(
    num_logical: int, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh (float64, int64, int32) buffers for ``_hierarchy`` on this shape."""
    f, q, s = _space(num_logical, num_phy, num_groups, num_nodes, num_gpus)
    return (
        np.empty(_need(f), dtype=np.float64),
        np.empty(_need(q), dtype=np.int64),
        np.empty(_need(s), dtype=np.int32),
    )


@_jit()
def _fill_log2phy(phy2log: np.ndarray, phyrank: np.ndarray, log2phy: np.ndarray) -> None:
    """log2phy[l, phy2log[l, s], phyrank[l, s]] = s; log2phy: [L, E, K] int64 filled with -1."""
    num_layers, num_slots = phy2log.shape
    for layer in range(num_layers):
        for slot in range(num_slots):
            log2phy[layer, phy2log[layer, slot], phyrank[layer, slot]] = slot


# --- the public entry points -----------------------------------------------------------------


@_jit((_F64_2D, types.int64))
def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md primitive 1: pack ``n`` items of each row into ``num_packs`` equal packs.

    weight: [X, n] float64 (C-contiguous), the weight of each item; rows are independent.
    num_packs: number of packs ``m``; must divide ``n``.

    Returns
      pack: [X, n] int64, the pack of each item.
      rank: [X, n] int64, the item's position in its pack, in order of arrival.
    """
    num_rows, num_items = weight.shape
    pack = np.empty((num_rows, num_items), dtype=np.int64)
    rank = np.empty((num_rows, num_items), dtype=np.int64)
    tree = 2 * _leaves(num_packs)
    order = np.empty(num_items, dtype=np.int32)
    keys, spare = np.empty(num_items, dtype=np.int64), np.empty(num_items, dtype=np.int64)
    total, counts = np.empty(num_packs, dtype=np.float64), np.empty(num_packs, dtype=np.int32)
    tree_key, tree_index = np.empty(tree, dtype=np.int64), np.empty(tree, dtype=np.int32)
    for row in range(num_rows):
        _pack_row(
            weight[row], num_packs, pack[row], rank[row],
            order, keys, spare, total, counts, tree_key, tree_index,
        )  # fmt: skip
    return pack, rank


@_jit((_F64_2D, types.int64))
def replicate_experts(
    weight: np.ndarray, num_phy: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPEC.md primitive 2: give the ``num_phy - n`` extra slots to the hottest experts.

    weight: [X, n] float64 (C-contiguous), the load of each expert; rows are independent.
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
    tree = 2 * _leaves(num_log)
    tree_value, tree_index = np.empty(tree, dtype=np.float64), np.empty(tree, dtype=np.int32)
    for row in range(num_rows):
        _replicate_row(weight[row], phy2log[row], rank[row], logcnt[row], tree_value, tree_index)
    return phy2log, rank, logcnt


@_jit((_F64_2D, types.int64, types.int64, types.int64, types.int64))
def rebalance_experts_hierarchical(
    weight: np.ndarray,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPEC.md "The hierarchy": groups to nodes, replicas within nodes, slots to GPUs.

    weight: [L, E] float64 (C-contiguous), load of each logical expert in each layer.

    Returns
      phy2log: [L, R] int64, the logical expert of each slot.
      phyrank: [L, R] int64, the replica rank of each slot.
      logcnt: [L, E] int64, the replica count of each logical expert.
    """
    num_layers, num_logical = weight.shape
    phy2log = np.empty((num_layers, num_physical_experts), dtype=np.int64)
    phyrank = np.empty((num_layers, num_physical_experts), dtype=np.int64)
    logcnt = np.empty((num_layers, num_logical), dtype=np.int64)
    f64, i64, i32 = _work_space(num_logical, num_physical_experts, num_groups, num_nodes, num_gpus)
    _hierarchy(
        weight, num_physical_experts, num_groups, num_nodes, num_gpus,
        phy2log, phyrank, logcnt, f64, i64, i32,
    )  # fmt: skip
    return phy2log, phyrank, logcnt


@_jit((_I64_2D, _I64_2D, _I64_2D))
def inverse_map(phy2log: np.ndarray, phyrank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """log2phy ``[L, E, K]`` int64 (``-1`` padded, ``K = logcnt.max()``).

    phy2log: [L, R] int64, the logical expert of each slot.
    phyrank: [L, R] int64, the replica rank of each slot.
    logcnt: [L, E] int64, the replica count of each logical expert.
    """
    log2phy = np.full((phy2log.shape[0], logcnt.shape[1], logcnt.max()), -1, dtype=np.int64)
    _fill_log2phy(phy2log, phyrank, log2phy)
    return log2phy


def _placement_signature(dtype: Any) -> Any:
    """(weight, R, G, N, P, f64, i64, i32, ranks) for loads of ``dtype``."""
    counts = (types.int64,) * 4
    return (dtype[:, ::1], *counts, _F64_1D, _I64_1D, _I32_1D, _I32_1D)


@_jit(_placement_signature(types.float64), _placement_signature(types.float32))
def _placement(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    f64: np.ndarray,
    i64: np.ndarray,
    i32: np.ndarray,
    ranks: np.ndarray,
) -> tuple[Any, ...]:
    """``placement``'s work, in the given work space; returns the work space it used.

    f64, i64, i32: the layer work space (``_space``); ranks: [>= L * R] int32,
    the replica rank of every slot. A buffer too short is replaced by a new
    one of the length needed, and the four are returned for the next call.
    """
    num_layers, num_logical = weight.shape
    # Step 1: the value rules.
    for layer in range(num_layers):
        for e in range(num_logical):
            value = np.float64(weight[layer, e])
            if not (np.isfinite(value) and value >= 0.0):
                empty = np.empty((0, 0), dtype=np.int64)
                none = np.empty((0, 0, 0), dtype=np.int64)
                return False, empty, none, empty, f64, i64, i32, ranks
    # Step 2: the policy choice; the global policy is the hierarchy with one group and one node.
    groups, nodes = (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)
    f, q, s = _space(num_logical, num_replicas, groups, nodes, num_gpus)
    if f64.size < _need(f):
        f64 = np.empty(_need(f), dtype=np.float64)
    if i64.size < _need(q):
        i64 = np.empty(_need(q), dtype=np.int64)
    if i32.size < _need(s):
        i32 = np.empty(_need(s), dtype=np.int32)
    if ranks.size < num_layers * num_replicas:
        ranks = np.empty(num_layers * num_replicas, dtype=np.int32)
    # Step 3: the hierarchy, layer by layer in one work space.
    phy2log = np.empty((num_layers, num_replicas), dtype=np.int64)
    logcnt = np.empty((num_layers, num_logical), dtype=np.int64)
    phyrank = ranks[: num_layers * num_replicas].reshape((num_layers, num_replicas))
    _hierarchy(
        weight, num_replicas, groups, nodes, num_gpus,
        phy2log, phyrank, logcnt, f64, i64, i32,
    )  # fmt: skip
    # Step 4: log2phy from phy2log and the replica ranks.
    log2phy = np.full((num_layers, num_logical, logcnt.max()), -1, dtype=np.int64)
    _fill_log2phy(phy2log, phyrank, log2phy)
    return True, phy2log, log2phy, logcnt, f64, i64, i32, ranks


#: Each thread's work space for ``placement``: (f64, i64, i32, ranks), grown to
#: the largest shape that thread has placed. Per thread, because the compiled
#: call runs without the interpreter lock: two threads placing at once each
#: write their own buffers.
_work = threading.local()


def _no_work_space() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.empty(0, dtype=np.float64),
        np.empty(0, dtype=np.int64),
        np.empty(0, dtype=np.int32),
        np.empty(0, dtype=np.int32),
    )


def placement(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """The whole placement of SPEC.md in one call that never holds the interpreter lock.

    weight: [L, E] float32 or float64 (C-contiguous), tokens routed to each
        logical expert in each layer. The counts must already satisfy SPEC.md's
        rules (``eplb._validation.validate_config``).

    Returns
      valid: False when a load is NaN, infinite or negative; the three arrays
        are then empty and the caller raises (``validate_weight`` names the value).
      phy2log: [L, R] int64, the logical expert held by each slot.
      log2phy: [L, E, K] int64, the slot of each replica of each expert, -1 padded.
      logcnt: [L, E] int64, the replica count of each logical expert.

    The compiled call allocates only the three results: its work space is
    this thread's, kept from one call to the next (``_work``).
    """
    space = getattr(_work, "space", None) or _no_work_space()
    valid, phy2log, log2phy, logcnt, *space = _placement(
        weight, num_replicas, num_groups, num_nodes, num_gpus, *space
    )
    _work.space = tuple(space)
    return valid, phy2log, log2phy, logcnt
