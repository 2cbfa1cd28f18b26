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
        try:
            return numba.njit(list(signatures), nogil=True, cache=True)(function)
        except RuntimeError:
            CACHED = False
            return numba.njit(list(signatures), nogil=True, cache=False)(function)

    return wrap


#: Packs up to this many are searched by a scan, more by a tournament tree.
_LINEAR_MAX_PACKS = 16
#: Rows whose largest weight times their length is below this cannot make any
#: float64 pack total overflow (as in the numpy core).
_SAFE_ROW_TOTAL = 2.0**1000
#: Bit pattern of +inf. Non-negative doubles (+inf included) are ordered like
#: their bit patterns read as int64.
_INF_BITS = 0x7FF0000000000000
#: Insertion-sorted run length before the merges of ``_sort_descending``.
_RUN = 8

_F64_2D = types.float64[:, ::1]
_I64_2D = types.int64[:, ::1]
_I64_1D = types.int64[::1]
_F64_1D = types.float64[::1]


# --- tournament trees ----------------------------------------------------------------------


@_jit((_I64_1D, _F64_1D, types.int64))
def _replay_min(tree: np.ndarray, key: np.ndarray, leaf: int) -> None:
    """Replay the matches above ``leaf`` of a tree for the smallest key, NaN never winning.

    tree: [2 * M] int64, ``tree[M + j] == j``; ``tree[i]`` the winner of
        ``tree[2i]`` and ``tree[2i + 1]``. key: [M] float64, NaN for no candidate.

    Right beats left when strictly smaller or when left is NaN, so the lowest
    index wins among equal keys (``+inf`` ones included). The index tests
    always pass; written this way (measured) numba's code runs about three
    times faster than with the comparison alone.
    """
    node = leaf // 2
    while node >= 1:
        left, right = tree[2 * node], tree[2 * node + 1]
        if left < 0 or (right >= 0 and (key[right] < key[left] or key[left] != key[left])):
            tree[node] = right
        else:
            tree[node] = left
        node //= 2


@_jit((_I64_1D, _F64_1D, types.int64))
def _replay_max(tree: np.ndarray, key: np.ndarray, leaf: int) -> None:
    """As ``_replay_min``, for the largest key (no NaN): right wins only when strictly larger."""
    node = leaf // 2
    while node >= 1:
        left, right = tree[2 * node], tree[2 * node + 1]
        if left < 0 or (right >= 0 and key[right] > key[left]):
            tree[node] = right
        else:
            tree[node] = left
        node //= 2


# --- a stable descending sort --------------------------------------------------------------


@_jit((_I64_1D, _I64_1D))
def _sort_keys(keys: np.ndarray, spare: np.ndarray) -> np.ndarray:
    """Sort ``keys`` ascending: insertion-sorted runs, then merges; returns the sorted array.

    keys, spare: [n] int64; both are overwritten, the result is one of them.

    The merges pick with a select rather than a branch (the comparison of two
    loads mispredicts half the time), with the exhausted side read as the
    largest int64.
    """
    n = keys.size
    for start in range(0, n, _RUN):
        stop = min(start + _RUN, n)
        for i in range(start + 1, stop):
            key = keys[i]
            j = i
            while j > start and keys[j - 1] > key:
                keys[j] = keys[j - 1]
                j -= 1
            keys[j] = key
    largest = np.int64(0x7FFFFFFFFFFFFFFF)
    last = n - 1
    source, target = keys, spare
    width = _RUN
    while width < n:
        for start in range(0, n, 2 * width):
            middle = min(start + width, n)
            stop = min(start + 2 * width, n)
            left, right = start, middle
            for out in range(start, stop):
                left_key = source[min(left, last)] if left < middle else largest
                right_key = source[min(right, last)] if right < stop else largest
                take_right = right_key < left_key
                target[out] = right_key if take_right else left_key
                right += take_right
                left += 1 - take_right
        source, target = target, source
        width *= 2
    return source


@_jit((_F64_1D, _I64_1D, _I64_1D, _I64_1D))
def _sort_descending(
    values: np.ndarray, order: np.ndarray, keys: np.ndarray, spare: np.ndarray
) -> None:
    """The order of a stable descending sort of ``values``: equal values keep ascending index.

    values: [n] float64, >= 0 or -0.0 (+inf allowed), no NaN.
    order: [n] int64, filled with the item indices. keys, spare: [n] int64, work space.

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
    for i in range(n):
        # "+ 0.0": -0.0 becomes 0.0, so that equal values have equal bits.
        keys[i] = ((_INF_BITS - np.float64(values[i] + 0.0).view(np.int64)) & ~low) | i
    sorted_keys = _sort_keys(keys, spare)
    rises = False
    for i in range(n):
        order[i] = sorted_keys[i] & low
        if i > 0 and values[order[i]] > values[order[i - 1]]:
            rises = True
    if rises:
        # Rare (values within 2^-(52-b) of each other): numba's stable sort.
        order[:] = np.argsort(-values, kind="mergesort")


# --- SPEC.md's primitives ------------------------------------------------------------------


@_jit((_F64_2D, types.int64))
def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md primitive 1: pack ``n`` items of each row into ``num_packs`` equal packs.

    weight: [X, n] float64 (C-contiguous), the weight of each item; rows are independent.
    num_packs: number of packs ``m``; must divide ``n``.

    Returns
      pack: [X, n] int64, the pack of each item.
      rank: [X, n] int64, the item's position in its pack, in order of arrival.

    ``total[p]`` holds pack p's total while it has room and NaN once full;
    "right beats left when ``right < left`` or left is NaN" then picks the
    smallest total among open packs, and the lower index on equal totals
    (``+inf`` ones included, when loads near the float64 maximum overflow).
    Up to ``_LINEAR_MAX_PACKS`` packs are scanned; more go through a
    tournament tree (``tree[j]`` is the winner of ``tree[2j]`` and
    ``tree[2j+1]``, leaf ``j`` at ``tree[M + j]``; padding packs are NaN),
    where a choice replays only the ``log2 M`` matches above its leaf.
    """
    num_rows, num_items = weight.shape
    items_per_pack = num_items // num_packs
    pack = np.empty((num_rows, num_items), dtype=np.int64)
    rank = np.empty((num_rows, num_items), dtype=np.int64)
    if items_per_pack == 1:
        for row in range(num_rows):
            for i in range(num_items):
                pack[row, i] = i
                rank[row, i] = 0
        return pack, rank

    leaves = 1
    while leaves < num_packs:
        leaves *= 2
    linear = num_packs <= _LINEAR_MAX_PACKS
    total = np.empty(leaves, dtype=np.float64)
    counts = np.empty(num_packs, dtype=np.int64)
    tree = np.empty(2 * leaves, dtype=np.int64)
    order = np.empty(num_items, dtype=np.int64)
    keys, spare = np.empty(num_items, dtype=np.int64), np.empty(num_items, dtype=np.int64)
    for row in range(num_rows):
        _sort_descending(weight[row], order, keys, spare)
        total[:num_packs] = 0.0
        total[num_packs:] = np.nan
        counts[:] = 0
        if not linear:
            for j in range(leaves):
                tree[leaves + j] = j
            for node in range(leaves - 1, 0, -1):
                tree[node] = tree[2 * node]  # all totals 0.0: the left one
        if linear and weight[row].max() * num_items < _SAFE_ROW_TOTAL:
            # No total can overflow: a full pack's total becomes +inf instead
            # of NaN, which a plain "<" scan passes over for less.
            for item in order:
                best, lowest = 0, total[0]
                for p in range(1, num_packs):
                    if total[p] < lowest:
                        best, lowest = p, total[p]
                pack[row, item] = best
                rank[row, item] = counts[best]
                total[best] += weight[row, item]
                counts[best] += 1
                if counts[best] == items_per_pack:
                    total[best] = np.inf
            continue
        for item in order:
            if linear:
                best, lowest = 0, total[0]
                for p in range(1, num_packs):
                    if (total[p] < lowest) | (lowest != lowest):
                        best, lowest = p, total[p]
            else:
                best = tree[1]
            pack[row, item] = best
            rank[row, item] = counts[best]
            total[best] += weight[row, item]
            counts[best] += 1
            if counts[best] == items_per_pack:
                total[best] = np.nan
            if not linear:
                _replay_min(tree, total, leaves + best)
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

    The largest ``W / count`` is found by a tournament tree as in
    ``balanced_packing``: right beats left only when strictly larger, so the
    lowest index wins ties; padding experts weigh -1.0, below every load.
    """
    num_rows, num_log = weight.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    leaves = 1
    while leaves < num_log:
        leaves *= 2
    per_replica = np.full(leaves, -1.0)
    tree = np.empty(2 * leaves, dtype=np.int64)
    for row in range(num_rows):
        for slot in range(num_log):
            phy2log[row, slot] = slot
            # float64 division by the count, as SPEC.md: W / 1 == W.
            per_replica[slot] = weight[row, slot]
        if num_phy == num_log:
            continue
        for j in range(leaves):
            tree[leaves + j] = j
        for node in range(leaves - 1, 0, -1):
            left, right = tree[2 * node], tree[2 * node + 1]
            if per_replica[right] > per_replica[left]:
                tree[node] = right
            else:
                tree[node] = left
        for slot in range(num_log, num_phy):
            best = tree[1]
            phy2log[row, slot] = best
            rank[row, slot] = logcnt[row, best]
            logcnt[row, best] += 1
            per_replica[best] = weight[row, best] / np.float64(logcnt[row, best])
            _replay_max(tree, per_replica, leaves + best)
    return phy2log, rank, logcnt


# --- the hierarchy -------------------------------------------------------------------------


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
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical_experts // num_nodes
    slots_per_gpu = num_physical_experts // num_gpus
    gpus_per_node = num_gpus // num_nodes
    num_rows = num_layers * num_nodes

    # Step 1: group loads, each summed left to right.
    group_load = np.empty((num_layers, num_groups), dtype=np.float64)
    for layer in range(num_layers):
        for g in range(num_groups):
            total = 0.0
            for offset in range(group_size):
                total += weight[layer, g * group_size + offset]
            group_load[layer, g] = total

    # Step 2: groups to nodes.
    group_pack, group_rank = balanced_packing(group_load, num_nodes)

    # Step 3: node-local order; mlog2log is the inverse permutation of log2mlog.
    # The loops run over (group, offset) and (node, local index) rather than
    # dividing each index: an int64 division costs more than the rest of the step.
    log2mlog = np.empty((num_layers, num_logical), dtype=np.int64)
    mlog2log = np.empty((num_layers, num_logical), dtype=np.int64)
    for layer in range(num_layers):
        for g in range(num_groups):
            start = (group_pack[layer, g] * groups_per_node + group_rank[layer, g]) * group_size
            for offset in range(group_size):
                e = g * group_size + offset
                log2mlog[layer, e] = start + offset
                mlog2log[layer, start + offset] = e

    # Step 4: replicate within each node; row layer*N + node holds that node's experts.
    node_load = np.empty((num_rows, experts_per_node), dtype=np.float64)
    for layer in range(num_layers):
        for node in range(num_nodes):
            row = layer * num_nodes + node
            for local in range(experts_per_node):
                mlog = node * experts_per_node + local
                node_load[row, local] = weight[layer, mlog2log[layer, mlog]]
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_load, slots_per_node)

    # Step 5: the load each slot carries.
    slot_load = np.empty((num_rows, slots_per_node), dtype=np.float64)
    for row in range(num_rows):
        for slot in range(slots_per_node):
            local = phy2mlog[row, slot]
            slot_load[row, slot] = node_load[row, local] / np.float64(mlogcnt[row, local])

    # Step 6: slots to GPUs within each node.
    gpu_pack, gpu_rank = balanced_packing(slot_load, gpus_per_node)

    # Step 7: map back to physical indices and logical experts.
    phy2log = np.empty((num_layers, num_physical_experts), dtype=np.int64)
    out_rank = np.empty((num_layers, num_physical_experts), dtype=np.int64)
    logcnt = np.empty((num_layers, num_logical), dtype=np.int64)
    for layer in range(num_layers):
        for node in range(num_nodes):
            row = layer * num_nodes + node
            for slot in range(slots_per_node):
                phy = (
                    node * slots_per_node
                    + gpu_pack[row, slot] * slots_per_gpu
                    + gpu_rank[row, slot]
                )
                mlog = node * experts_per_node + phy2mlog[row, slot]
                phy2log[layer, phy] = mlog2log[layer, mlog]
                out_rank[layer, phy] = phyrank[row, slot]
            for local in range(experts_per_node):
                logcnt[layer, mlog2log[layer, node * experts_per_node + local]] = mlogcnt[
                    row, local
                ]
    return phy2log, out_rank, logcnt


@_jit((_I64_2D, _I64_2D, _I64_2D))
def inverse_map(phy2log: np.ndarray, phyrank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """log2phy ``[L, E, K]`` int64 (``-1`` padded, ``K = logcnt.max()``).

    phy2log: [L, R] int64, the logical expert of each slot.
    phyrank: [L, R] int64, the replica rank of each slot.
    logcnt: [L, E] int64, the replica count of each logical expert.
    """
    num_layers, num_slots = phy2log.shape
    log2phy = np.full((num_layers, logcnt.shape[1], logcnt.max()), -1, dtype=np.int64)
    for layer in range(num_layers):
        for slot in range(num_slots):
            log2phy[layer, phy2log[layer, slot], phyrank[layer, slot]] = slot
    return log2phy


@_jit(
    (types.float64[:, ::1], types.int64, types.int64, types.int64, types.int64),
    (types.float32[:, ::1], types.int64, types.int64, types.int64, types.int64),
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
    """
    num_layers, num_logical = weight.shape
    # Step 1: the value rules and float64 (float32 -> float64 is exact, as numpy's).
    weight64 = np.empty((num_layers, num_logical), dtype=np.float64)
    for layer in range(num_layers):
        for e in range(num_logical):
            value = np.float64(weight[layer, e])
            if not (np.isfinite(value) and value >= 0.0):
                empty = np.empty((0, 0), dtype=np.int64)
                return False, empty, np.empty((0, 0, 0), dtype=np.int64), empty
            weight64[layer, e] = value
    # Step 2: the policy choice; the global policy is the hierarchy with one group and one node.
    groups, nodes = (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)
    # Step 3: the hierarchy.
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
        weight64, num_replicas, groups, nodes, num_gpus
    )
    # Step 4: log2phy from phy2log and the replica ranks.
    return True, phy2log, inverse_map(phy2log, phyrank, logcnt), logcnt
