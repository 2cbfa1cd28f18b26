"""SPEC.md's primitives on one row, compiled by numba, in work space the caller owns.

``compiled_core`` runs the hierarchy with these, layer by layer and node by
node, in one work space that every row rewrites:

- ``sort_descending``: the order of a stable descending sort (equal weights
  keep ascending index), by one int64 key per item: runs of eight sorted by
  a branch-free network, then branch-free merges;
- ``pack_row``: SPEC.md primitive 1 (balanced packing). The first round
  needs no search; then up to ``LINEAR_MAX_PACKS`` packs are scanned, more
  (Kimi-K2's 448 slots into 64 GPUs) go through a tournament tree whose
  nodes hold the winner's key (the total's bits) and index: a choice changes
  one leaf and replays its ``log2(m)`` matches, reading only siblings,
  without branches. The lexicographic minimum of (total, index) is SPEC.md's
  rule: the smallest total among packs with room, the lowest index on ties
  (``+inf`` totals of loads near the float64 maximum included);
- ``replicate_row``: SPEC.md primitive 2, the largest ``W / count`` by the same tree.

``jit`` is the numba decorator of both modules (``nogil=True``, cached on
disk where a cache folder is writable; ``CACHED`` says whether it is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

__all__ = [
    "CACHED",
    "LINEAR_MAX_PACKS",
    "jit",
    "pack_row",
    "replicate_row",
    "sort_descending",
    "tree_leaves",
]

#: True when the compiled code is cached on disk; False when no cache directory
#: was writable and every start compiles anew.
CACHED = True


def jit(*signatures: Any, nogil: bool = True) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(signatures, nogil=nogil, cache=True)``, in memory without a cache dir.

    The signatures compile when this module is imported (or load from the
    cache), so no call on the serving path compiles. numba refuses
    ``cache=True`` with a RuntimeError when neither the package folder nor its
    user cache folder (``NUMBA_CACHE_DIR``) is writable, as in a read-only
    install: then the code is compiled without a cache.
    """

    def wrap(function: Callable[..., Any]) -> Any:
        global CACHED
        # Helpers without signatures compile with (and are cached in) their callers.
        listed = list(signatures) if signatures else None
        try:
            return numba.njit(listed, nogil=nogil, cache=True)(function)
        except RuntimeError:
            CACHED = False
            return numba.njit(listed, nogil=nogil, cache=False)(function)

    return wrap


#: Packs up to this many are searched by a scan, more by a tournament tree.
LINEAR_MAX_PACKS = 16
#: Rows whose largest weight times their length is below this cannot make any
#: float64 pack total overflow (as in the numpy core).
_SAFE_ROW_TOTAL = 2.0**1000
#: Bit pattern of +inf. Non-negative doubles (+inf included) are ordered like
#: their bit patterns read as int64.
_INF_BITS = 0x7FF0000000000000
#: The tree key of a full pack (and of a padding leaf): above every total's bits, +inf's included.
_FULL = 0x7FFFFFFFFFFFFFFF
#: Run length of ``sort_descending`` before its merges (sorted by ``_sort_eight``).
_RUN = 8


@jit()
def tree_leaves(count: int) -> int:
    """The smallest power of two >= ``count``: the leaves of a tournament tree over ``count``."""
    leaves = 1
    while leaves < count:
        leaves *= 2
    return leaves


# --- a stable descending sort --------------------------------------------------------------


@jit()
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


@jit()
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


@jit()
def sort_descending(
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


@jit()
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


@jit()
def pack_row(
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
        ``LINEAR_MAX_PACKS`` packs.

    Up to ``LINEAR_MAX_PACKS`` packs are scanned, the float totals compared
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
    sort_descending(values, order, keys, spare)
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
    if num_packs > LINEAR_MAX_PACKS:
        leaves = tree_leaves(num_packs)
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


@jit()
def replicate_row(
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
    leaves = tree_leaves(n)
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
