"""The compiled placement core: SPEC.md's hierarchy in numba, one call per placement, no GIL.

The same steps as ``eplb.reference`` (``balanced_packing``, ``replicate_experts``,
``rebalance_experts_hierarchical``, ``inverse_map``), compiled by numba with
``nogil=True``: ``placement`` runs the value checks, the float64 conversion,
the policy choice, the whole hierarchy and log2phy in one call that never
holds the interpreter lock, so a busy Python thread beside it keeps running
and the call waits for the lock only once, when it returns.

The hierarchy runs layer by layer, node by node, on the row primitives of
``compiled_rows`` (which make exactly SPEC.md's choices, in its order), in
one work space sized for one layer: three buffers (float64, int64, int32)
whose views every layer rewrites. ``placement`` keeps them per thread from
one call to the next, with the int32 replica ranks log2phy is built from; its
three results are views of one int64 buffer that each call allocates and
hands over. On an allocator that hands large blocks out by ``mmap`` (glibc
above ``M_MMAP_THRESHOLD``), every fresh array is faulted in page by page on
every call; a placement in steady state allocates nothing but its results.

The module imports numpy and numba only; ``eplb.production.cores`` imports it
when the compiled core is chosen and falls back to the numpy core when numba is
missing or cannot compile. Compiled code is cached on disk (``cache=True``) next
to this file or in numba's user cache directory; where neither is writable,
the functions are compiled in memory on every start (``compiled_rows.jit``).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numba import types

from . import compiled_rows
from .compiled_rows import jit as _jit
from .compiled_rows import pack_row, replicate_row, tree_size

__all__ = [
    "CACHED",
    "balanced_packing",
    "buffer_lengths",
    "inverse_map",
    "placement",
    "placement_into",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]

_F64_2D = types.float64[:, ::1]
_I64_2D = types.int64[:, ::1]
_F64_1D = types.float64[::1]
_I64_1D = types.int64[::1]
_I32_1D = types.int32[::1]
#: The largest finite float64: a load above it is +inf.
_MAX = np.finfo(np.float64).max


# --- the hierarchy, one layer at a time in one work space -----------------------------------


@_jit()
def _space(
    num_logical: int, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The lengths of the work-space arrays of one layer: (float64, int64, int32) tuples.

    ``_cut`` cuts them out of three buffers in this order; one layer's arrays
    serve every layer of a call (and, through ``placement``, every call of a thread).
    """
    per_node = num_logical // num_nodes
    slots = num_phy // num_nodes
    items = max(num_groups, slots)  # the longest row sorted
    packs = max(num_nodes, num_gpus // num_nodes)
    pack_tree = tree_size(packs)
    replica_tree = tree_size(per_node)
    f64 = (num_logical, num_groups, per_node, slots)
    i64 = (items, items, pack_tree, replica_tree)
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


@_jit(inline=True)
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
    slot_load = _cut(f64, f, 3)
    keys, spare, tree_key = _cut(i64, q, 0), _cut(i64, q, 1), _cut(i64, q, 2)
    replica_key = _cut(i64, q, 3)
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
        pack_row(
            group_load, num_nodes, group_pack, group_rank,
            order, keys, spare, counts, tree_key, tree_index,
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
            replicate_row(node_load, phy2mlog, replica_rank, mlogcnt, replica_key, replica_index)
            # Step 5: the load each slot carries. Slot s < per_node holds expert
            # s, and W / 1 == W; an expert with more replicas has one among the
            # extra slots, which writes W / count (its final count) to both.
            for local in range(per_node):
                slot_load[local] = node_load[local]
            for slot in range(per_node, slots):
                local = phy2mlog[slot]
                slot_load[slot] = slot_load[local] = node_load[local] / np.float64(mlogcnt[local])
            # Step 6: slots to GPUs within the node.
            pack_row(
                slot_load, gpus_per_node, gpu_pack, gpu_rank,
                order, keys, spare, counts, tree_key, tree_index,
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


@_jit(inline=True)
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
    tree = tree_size(num_packs)
    order = np.empty(num_items, dtype=np.int32)
    keys, spare = np.empty(num_items, dtype=np.int64), np.empty(num_items, dtype=np.int64)
    counts = np.empty(num_packs, dtype=np.int32)
    tree_key, tree_index = np.empty(tree, dtype=np.int64), np.empty(tree, dtype=np.int32)
    for row in range(num_rows):
        pack_row(
            weight[row], num_packs, pack[row], rank[row],
            order, keys, spare, counts, tree_key, tree_index,
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
    tree = tree_size(num_log)
    tree_key, tree_index = np.empty(tree, dtype=np.int64), np.empty(tree, dtype=np.int32)
    for row in range(num_rows):
        replicate_row(weight[row], phy2log[row], rank[row], logcnt[row], tree_key, tree_index)
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
    """(weight, R, G, N, P, f64, i64, i32, ranks, out) for loads of ``dtype``."""
    counts = (types.int64,) * 4
    return (dtype[:, ::1], *counts, _F64_1D, _I64_1D, _I32_1D, _I32_1D, _I64_1D)


@_jit(_placement_signature(types.float64), _placement_signature(types.float32))
def placement_into(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    f64: np.ndarray,
    i64: np.ndarray,
    i32: np.ndarray,
    ranks: np.ndarray,
    out: np.ndarray,
) -> tuple[Any, ...]:
    """``placement``'s work, in the given buffers; returns the buffers it used.

    f64, i64, i32: the layer work space (``_space``); ranks: [>= L * R] int32,
    the replica rank of every slot; out: int64, where the results go, one
    after another (phy2log, logcnt, log2phy). A buffer too short is replaced by
    a new one of the length needed, and the five are returned for the next call;
    buffers of ``buffer_lengths`` are never replaced (the placement service
    relies on it: its caller reads the results from the ``out`` it passed).
    """
    num_layers, num_logical = weight.shape
    # Step 1: the value rules. NaN fails both comparisons; counting without a
    # branch lets the loop run on vectors.
    invalid = 0
    for value in weight.ravel():
        invalid += not ((value >= 0.0) & (value <= _MAX))
    if invalid:
        empty = np.empty((0, 0), dtype=np.int64)
        none = np.empty((0, 0, 0), dtype=np.int64)
        return False, empty, none, empty, f64, i64, i32, ranks, out
    # Step 2: the policy choice; the global policy is the hierarchy with one group and one node.
    groups, nodes = (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)
    f, q, s = _space(num_logical, num_replicas, groups, nodes, num_gpus)
    if f64.size < _need(f):
        f64 = np.empty(_need(f), dtype=np.float64)
    if i64.size < _need(q):
        i64 = np.empty(_need(q), dtype=np.int64)
    if i32.size < _need(s):
        i32 = np.empty(_need(s), dtype=np.int32)
    slots = num_layers * num_replicas
    if ranks.size < slots:
        ranks = np.empty(slots, dtype=np.int32)
    counted = slots + num_layers * num_logical
    if out.size < counted:
        out = np.empty(counted, dtype=np.int64)
    # Step 3: the hierarchy, layer by layer in one work space.
    phyrank = ranks[:slots].reshape((num_layers, num_replicas))
    logcnt = out[slots:counted].reshape((num_layers, num_logical))
    _hierarchy(
        weight, num_replicas, groups, nodes, num_gpus,
        out[:slots].reshape((num_layers, num_replicas)), phyrank, logcnt, f64, i64, i32,
    )  # fmt: skip
    # Step 4: log2phy from phy2log and the replica ranks, after the other two in ``out``.
    width = logcnt.max()
    need = counted + num_layers * num_logical * width
    if out.size < need:
        grown = np.empty(need, dtype=np.int64)
        grown[:counted] = out[:counted]
        out = grown
    phy2log = out[:slots].reshape((num_layers, num_replicas))
    logcnt = out[slots:counted].reshape((num_layers, num_logical))
    log2phy = out[counted:need].reshape((num_layers, num_logical, width))
    log2phy[:] = -1
    _fill_log2phy(phy2log, phyrank, log2phy)
    return True, phy2log, log2phy, logcnt, f64, i64, i32, ranks, out


def buffer_lengths(
    num_layers: int,
    num_logical: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[int, int, int, int, int]:
    """Lengths of ``placement_into``'s buffers (f64, i64, i32, ranks, out) that no load outgrows.

    ``out`` holds log2phy at its widest, ``num_replicas - num_logical + 1``
    replicas of one expert; the counts must satisfy SPEC.md's rules.
    """
    hierarchical = num_groups % num_nodes == 0
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    f, q, s = _space(num_logical, num_replicas, groups, nodes, num_gpus)
    slots = num_layers * num_replicas
    widest = num_replicas - num_logical + 1
    out = slots + num_layers * num_logical * (1 + widest)
    return _need(f), _need(q), _need(s), slots, out


#: Each thread's work space for ``placement`` (f64, i64, i32, ranks), grown to
#: the largest shape that thread has placed. Per thread, because the compiled
#: call runs without the interpreter lock: two threads placing at once never
#: share one. Results are never kept: they are the caller's.
_work = threading.local()


def _no_buffers() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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

    The three are C-contiguous views of one int64 buffer allocated by this
    call (a result buffer kept for reuse would hand a caller's arrays to a
    later call's writes, a corruption no type check sees).
    """
    space = getattr(_work, "space", None) or _no_buffers()
    valid, phy2log, log2phy, logcnt, *space, _ = placement_into(
        weight, num_replicas, num_groups, num_nodes, num_gpus, *space, np.empty(0, dtype=np.int64)
    )
    _work.space = tuple(space)
    return valid, phy2log, log2phy, logcnt


#: True when the compiled code is cached on disk; False when no cache directory
#: was writable and every start compiles anew (read here, after every function
#: of both modules has been compiled or loaded).
CACHED = compiled_rows.CACHED
