"""The compiled placement core: SPEC.md's loops in numba, one call per placement, no GIL.

The same steps as ``eplb.reference`` (``balanced_packing``, ``replicate_experts``,
``rebalance_experts_hierarchical``, ``inverse_map``), compiled by numba with
``nogil=True``: ``placement`` runs the value checks, the float64 conversion,
the policy choice, the whole hierarchy and log2phy in one call that never
holds the interpreter lock, so a busy Python thread beside it keeps running
and the call waits for the lock only once, when it returns.

Every step makes exactly the choices of SPEC.md, in its order:

- items are taken in the order of a stable descending sort (numba's
  ``argsort(kind="mergesort")`` is stable; sorting ``-w`` keeps equal weights by
  ascending index);
- pack totals start at ``0.0`` and get one float64 ``+`` per arriving item;
  replication divides ``W / count`` in float64;
- the smallest pack total (among packs with room) and the largest per-replica
  load are found by a tournament tree (``_tree_*``): each internal node holds
  the winner of its two children, the left child (the lower indices) winning
  unless the right one is strictly better, so the root is the lowest index
  among equal totals, as SPEC.md's tie rule asks. A choice changes one leaf
  and updates its ``log2(m)`` ancestors instead of rescanning all ``m`` packs,
  which is what Kimi-K2's 448-slots-into-64-GPUs packing needs. A full pack
  leaves the tree (its leaf becomes ``-1``, which never wins), so totals that
  overflow to ``+inf`` (loads near the float64 maximum) need no special case:
  ``inf < inf`` is false, and the lower index keeps the tie.

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

_F64_2D = types.float64[:, ::1]
_I64_2D = types.int64[:, ::1]
_I64_1D = types.int64[::1]
_F64_1D = types.float64[::1]


# --- tournament trees: the lowest index among the best ------------------------------------


@_jit((_I64_1D, _F64_1D, types.int64))
def _tree_update_min(tree: np.ndarray, key: np.ndarray, node: int) -> None:
    """Replay the matches above tree node ``node`` for the smallest ``key`` (lowest index on ties).

    tree: [2 * M] int64, ``tree[M + i]`` is leaf ``i`` (an index into ``key``,
        or -1 for none); ``tree[j]`` the winner of ``tree[2j]`` and ``tree[2j+1]``.
    key: [m] float64, the value of each index.
    """
    node //= 2
    while node >= 1:
        left, right = tree[2 * node], tree[2 * node + 1]
        if left < 0 or (right >= 0 and key[right] < key[left]):
            tree[node] = right
        else:
            tree[node] = left
        node //= 2


@_jit((_I64_1D, _F64_1D, types.int64))
def _tree_update_max(tree: np.ndarray, key: np.ndarray, node: int) -> None:
    """As ``_tree_update_min``, for the largest ``key`` (lowest index on ties)."""
    node //= 2
    while node >= 1:
        left, right = tree[2 * node], tree[2 * node + 1]
        if left < 0 or (right >= 0 and key[right] > key[left]):
            tree[node] = right
        else:
            tree[node] = left
        node //= 2


@_jit((_I64_1D, _F64_1D, types.int64, types.boolean))
def _tree_build(tree: np.ndarray, key: np.ndarray, count: int, smallest: bool) -> None:
    """Fill a tournament tree over indices ``0..count-1`` of ``key``.

    tree: [2 * M] int64, ``M`` a power of two ``>= count``; overwritten.
    smallest: True for the smallest key wins, False for the largest.
    """
    leaves = tree.size // 2
    for i in range(leaves):
        tree[leaves + i] = i if i < count else -1
    for node in range(leaves - 1, 0, -1):
        left, right = tree[2 * node], tree[2 * node + 1]
        if right < 0:
            tree[node] = left
        elif left < 0:
            tree[node] = right
        elif (key[right] < key[left]) if smallest else (key[right] > key[left]):
            tree[node] = right
        else:
            tree[node] = left


@_jit((types.int64,))
def _tree_size(count: int) -> int:
    """Entries of a tournament tree over ``count`` leaves: twice the next power of two."""
    leaves = 1
    while leaves < count:
        leaves *= 2
    return 2 * leaves


# --- a stable descending sort --------------------------------------------------------------

#: Runs of this many items are put in order by insertion before the merges.
_RUN = 16


@_jit((_F64_1D, _I64_1D, _F64_1D, _I64_1D))
def _sort_descending(
    values: np.ndarray, order: np.ndarray, scratch: np.ndarray, spare: np.ndarray
) -> None:
    """The order of a stable descending sort of ``values``: equal values keep ascending index.

    values: [n] float64, no NaN. order: [n] int64, filled with the item indices.
    scratch: [n] float64 and spare: [n] int64, work space.

    numba's ``argsort(kind="mergesort")`` allocates and compares generically;
    this bottom-up merge sort (insertion-sorted runs, then merges) reuses its
    buffers and sorts values and indices together. Both passes are stable:
    insertion moves an item only past strictly smaller values, and a merge
    takes from the left run (the lower indices) unless the right value is
    strictly larger.
    """
    n = values.size
    sorted_values = scratch
    for i in range(n):
        order[i] = i
    # Insertion sort of each run, values carried in a local copy.
    keys = values.copy()
    for start in range(0, n, _RUN):
        stop = min(start + _RUN, n)
        for i in range(start + 1, stop):
            key, item = keys[i], order[i]
            j = i
            while j > start and keys[j - 1] < key:
                keys[j] = keys[j - 1]
                order[j] = order[j - 1]
                j -= 1
            keys[j] = key
            order[j] = item
    width = _RUN
    src_keys, src_order, dst_keys, dst_order = keys, order, sorted_values, spare
    while width < n:
        for start in range(0, n, 2 * width):
            middle = min(start + width, n)
            stop = min(start + 2 * width, n)
            left, right = start, middle
            for out in range(start, stop):
                if left < middle and (right >= stop or src_keys[right] <= src_keys[left]):
                    dst_keys[out] = src_keys[left]
                    dst_order[out] = src_order[left]
                    left += 1
                else:
                    dst_keys[out] = src_keys[right]
                    dst_order[out] = src_order[right]
                    right += 1
        src_keys, dst_keys = dst_keys, src_keys
        src_order, dst_order = dst_order, src_order
        width *= 2
    if src_order is not order:
        order[:] = src_order


# --- SPEC.md's primitives ------------------------------------------------------------------


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
    items_per_pack = num_items // num_packs
    pack = np.empty((num_rows, num_items), dtype=np.int64)
    rank = np.empty((num_rows, num_items), dtype=np.int64)
    if items_per_pack == 1:
        for row in range(num_rows):
            for item in range(num_items):
                pack[row, item] = item
                rank[row, item] = 0
        return pack, rank

    totals = np.empty(num_packs, dtype=np.float64)
    counts = np.empty(num_packs, dtype=np.int64)
    tree = np.empty(_tree_size(num_packs), dtype=np.int64)
    leaves = tree.size // 2
    order = np.empty(num_items, dtype=np.int64)
    scratch, spare = np.empty(num_items, dtype=np.float64), np.empty(num_items, dtype=np.int64)
    for row in range(num_rows):
        _sort_descending(weight[row], order, scratch, spare)
        totals[:] = 0.0
        counts[:] = 0
        if num_packs <= _LINEAR_MAX_PACKS and weight[row].max() * num_items < _SAFE_ROW_TOTAL:
            # Few packs, no total near overflow: a scan of all packs, a full
            # one's total replaced by +inf (which no real total reaches here),
            # costs less than the tree's branches.
            for item in order:
                best, lowest = 0, totals[0]
                for p in range(1, num_packs):
                    if totals[p] < lowest:  # strict: the lowest index keeps a tie
                        best, lowest = p, totals[p]
                pack[row, item] = best
                rank[row, item] = counts[best]
                totals[best] += weight[row, item]
                counts[best] += 1
                if counts[best] == items_per_pack:
                    totals[best] = np.inf
            continue
        _tree_build(tree, totals, num_packs, True)
        for item in order:
            best = tree[1]
            pack[row, item] = best
            rank[row, item] = counts[best]
            totals[best] += weight[row, item]
            counts[best] += 1
            if counts[best] == items_per_pack:
                tree[leaves + best] = -1  # full: leaves the tournament
            _tree_update_min(tree, totals, leaves + best)
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
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    per_replica = np.empty(num_log, dtype=np.float64)
    tree = np.empty(_tree_size(num_log), dtype=np.int64)
    leaves = tree.size // 2
    for row in range(num_rows):
        for slot in range(num_log):
            phy2log[row, slot] = slot
            # float64 division by the count, as SPEC.md: W / 1 == W.
            per_replica[slot] = weight[row, slot]
        if num_phy == num_log:
            continue
        _tree_build(tree, per_replica, num_log, False)
        for slot in range(num_log, num_phy):
            best = tree[1]
            phy2log[row, slot] = best
            rank[row, slot] = logcnt[row, best]
            logcnt[row, best] += 1
            per_replica[best] = weight[row, best] / np.float64(logcnt[row, best])
            _tree_update_max(tree, per_replica, leaves + best)
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
