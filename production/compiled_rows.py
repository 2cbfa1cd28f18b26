"""SPEC.md's primitives on one row, compiled by numba, in work space the caller owns.

``compiled_core`` runs the hierarchy with these, layer by layer and node by
node, in one work space that every row rewrites:

- ``sort_descending``: the order of a stable descending sort (equal weights
  keep ascending index), by one int64 key per item: blocks of up to 64 keys
  sorted by counting (each key's place is the number of keys below it:
  independent comparisons, which compile to vector instructions), then
  merged two runs at a time from both ends at once;
- ``pack_row``: SPEC.md primitive 1 (balanced packing). Each pack has an
  int64 key, its float64 total's bits (ordered as the totals) or a "full"
  key above them all; the smallest (key, pack) is SPEC.md's choice, the
  lightest pack with room and the lowest index on equal totals (``+inf``
  totals of loads near the float64 maximum included). The first round needs
  no search; then up to eight packs' keys live in registers and a
  tournament of three rounds picks one, up to 64 live in blocks of eight
  with each block's minimum, more (a tournament tree) replay one leaf's
  ``log2(m)`` matches. None of them branches on the loads;
- ``replicate_row``: SPEC.md primitive 2, the largest ``W / count`` by a tournament tree.

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
    "jit",
    "pack_row",
    "pack_tree_size",
    "replicate_row",
    "sort_descending",
    "tree_leaves",
]

#: True when the compiled code is cached on disk; False when no cache directory
#: was writable and every start compiles anew.
CACHED = True


def jit(*signatures: Any) -> Callable[[Callable[..., Any]], Any]:
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
        listed = list(signatures) if signatures else None
        try:
            return numba.njit(listed, nogil=True, cache=True)(function)
        except RuntimeError:
            CACHED = False
            return numba.njit(listed, nogil=True, cache=False)(function)

    return wrap


#: Rows up to this long are sorted by counting (``_rank_block``); longer ones
#: in blocks of at most this many, then merged.
_RANK_BLOCK = 64
#: Up to this many packs, the totals live in registers (``_pack_few``); up to
#: its square, in blocks of this many (``_pack_blocks``); more go through a tree.
_BLOCK = 8
#: Bit pattern of +inf. Non-negative doubles (+inf included) are ordered like
#: their bit patterns read as int64.
_INF_BITS = 0x7FF0000000000000
#: The key of a full pack (and of a padding one): above every total's bits, +inf's included.
_FULL = 0x7FFFFFFFFFFFFFFF


@jit()
def tree_leaves(count: int) -> int:
    """The smallest power of two >= ``count``: the leaves of a tournament tree over ``count``."""
    leaves = 1
    while leaves < count:
        leaves *= 2
    return leaves


@jit()
def pack_tree_size(num_packs: int) -> int:
    """The length of ``pack_row``'s ``tree_key`` and ``tree_index`` for ``num_packs`` packs."""
    return max(2 * tree_leaves(num_packs), _BLOCK * (_BLOCK + 1))


# --- a stable descending sort --------------------------------------------------------------


@jit()
def _rank_block(keys: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """Sort ``keys[start:stop]`` (distinct) ascending into ``out[start:stop]`` by counting.

    A key's place is the number of keys below it. The ``n^2`` comparisons
    have no branch and no dependency between them, so they compile to vector
    compares (8 int64 lanes with AVX-512): for up to ``_RANK_BLOCK`` keys this
    beats a merge sort, whose every step waits on the previous one.
    """
    block = keys[start:stop]  # views: the inner loop vectorizes on a plain 0..n range
    target = out[start:stop]
    n = block.size
    for i in range(n):
        key = block[i]
        place = 0
        for j in range(n):
            place += block[j] < key
        target[place] = key


@jit()
def _merge_halves(
    source: np.ndarray, target: np.ndarray, start: int, middle: int, stop: int
) -> None:
    """Merge the sorted runs ``source[start:middle]`` and ``source[middle:stop]`` into ``target``.

    The runs' lengths differ by at most one. Two independent chains run at
    once: the front one takes the smaller head, the back one the larger tail,
    each ``(stop - start) // 2`` times, without branches. Neither reads past
    its runs: taking ``h`` from the front exhausts a run of ``h`` or more
    items at its last step at the earliest (and likewise at the back); an odd
    total leaves one item, in whichever run still holds one.
    """
    left, right, front = start, middle, start
    left_end, right_end, back = middle - 1, stop - 1, stop - 1
    for _ in range((stop - start) // 2):
        left_key, right_key = source[left], source[right]
        take_right = right_key < left_key
        target[front] = right_key if take_right else left_key
        right += take_right
        left += 1 - take_right
        front += 1
        left_key, right_key = source[left_end], source[right_end]
        take_left = left_key > right_key
        target[back] = left_key if take_left else right_key
        left_end -= take_left
        right_end -= 1 - take_left
        back -= 1
    if (stop - start) & 1:
        target[front] = source[left] if left <= left_end else source[right]


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

    The keys are sorted in ``2^k`` blocks of at most ``_RANK_BLOCK`` (block
    ``i`` starts at ``i * n // 2^k``, so all runs of a level differ in length
    by at most one) by counting, then merged level by level.
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
    blocks = 1
    while n > blocks * _RANK_BLOCK:
        blocks *= 2
    for b in range(blocks):
        _rank_block(keys, spare, b * n // blocks, (b + 1) * n // blocks)
    source, target = spare, keys
    width = 1
    while width < blocks:
        for b in range(0, blocks, 2 * width):
            start, middle = b * n // blocks, (b + width) * n // blocks
            _merge_halves(source, target, start, middle, (b + 2 * width) * n // blocks)
        source, target = target, source
        width *= 2
    rises = False
    previous = np.inf
    for i in range(n):
        item = source[i] & low
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
def _pick(key: int, index: int, other_key: int, other_index: int) -> tuple[int, int]:
    """The smaller of (key, index) and (other_key, other_index), ``other_index`` the higher.

    The higher index wins only when its key is strictly smaller: SPEC.md's
    lowest index among equal totals. A select, not a branch.
    """
    other = other_key < key
    return (other_key if other else key), (other_index if other else index)


@jit()
def _lowest_of_eight(
    k0: int, k1: int, k2: int, k3: int, k4: int, k5: int, k6: int, k7: int
) -> tuple[int, int]:
    """(smallest key, its position 0..7; the lowest position on equal keys), by a tournament.

    Three rounds of independent matches, each match's left side holding the
    lower positions: about a third of the latency of a scan over eight.
    """
    a, ia = _pick(k0, 0, k1, 1)
    b, ib = _pick(k2, 2, k3, 3)
    c, ic = _pick(k4, 4, k5, 5)
    d, id_ = _pick(k6, 6, k7, 7)
    a, ia = _pick(a, ia, b, ib)
    c, ic = _pick(c, ic, d, id_)
    return _pick(a, ia, c, ic)


@jit()
def _lowest_in_block(key: np.ndarray, start: int) -> tuple[int, int]:
    """``_lowest_of_eight`` of ``key[start : start + 8]``, as (key, index into ``key``)."""
    lowest, at = _lowest_of_eight(
        key[start], key[start + 1], key[start + 2], key[start + 3],
        key[start + 4], key[start + 5], key[start + 6], key[start + 7],
    )  # fmt: skip
    return lowest, start + at


@jit()
def _keep_or_put(key: int, new: int, chosen: int, position: int) -> int:
    """``new`` when ``chosen == position``, else ``key``: by masks (a select chain on one
    index compiles to a jump table, whose indirect jump mispredicts)."""
    mask = -np.int64(chosen == position)
    return (new & mask) | (key & ~mask)


@jit()
def _added(key: int, value: float, full: bool) -> int:
    """The key of a pack of total bits ``key`` after ``value`` arrives; ``_FULL`` if now full.

    float64 addition, as SPEC.md; the sum is >= 0 (or +inf), so its bits
    have no sign bit and ``| _FULL`` is ``_FULL``.
    """
    total = np.float64(np.int64(key).view(np.float64) + value).view(np.int64)
    return total | (_FULL & -np.int64(full))


@jit()
def _place(
    item: int, best: int, pack: np.ndarray, rank: np.ndarray, counts: np.ndarray, per_pack: int
) -> bool:
    """Item ``item`` joins pack ``best`` at its next rank; True when that fills the pack."""
    count = counts[best]
    pack[item] = best
    rank[item] = count
    counts[best] = count + 1
    return count + 1 == per_pack


@jit()
def _pack_few(
    values: np.ndarray, order: np.ndarray, first: int, per_pack: int,
    pack: np.ndarray, rank: np.ndarray, counts: np.ndarray, key: np.ndarray,
) -> None:  # fmt: skip
    """``pack_row``'s greedy for up to eight packs: the keys of all eight in registers.

    key: [8] int64, each pack's key after the first round (padding full). The
    key a choice changes is replaced by masks, so the loop has no branch and
    no memory round trip between one choice and the next.
    """
    k0, k1, k2, k3, k4, k5, k6, k7 = key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7]
    for k in range(first, values.size):
        item = order[k]
        lowest, best = _lowest_of_eight(k0, k1, k2, k3, k4, k5, k6, k7)
        new = _added(lowest, values[item], _place(item, best, pack, rank, counts, per_pack))
        k0, k1 = _keep_or_put(k0, new, best, 0), _keep_or_put(k1, new, best, 1)
        k2, k3 = _keep_or_put(k2, new, best, 2), _keep_or_put(k3, new, best, 3)
        k4, k5 = _keep_or_put(k4, new, best, 4), _keep_or_put(k5, new, best, 5)
        k6, k7 = _keep_or_put(k6, new, best, 6), _keep_or_put(k7, new, best, 7)


@jit()
def _pack_blocks(
    values: np.ndarray, order: np.ndarray, first: int, per_pack: int,
    pack: np.ndarray, rank: np.ndarray, counts: np.ndarray, key: np.ndarray,
    block_index: np.ndarray,
) -> None:  # fmt: skip
    """``pack_row``'s greedy for up to 64 packs: eight blocks of eight, and each block's lowest.

    key: [72] int64: the keys of packs 0..63 after the first round (padding
        full), then the lowest key of each block; block_index: [>= 8] int32,
        the pack that holds it.

    The lowest of the block minima, the lower block on equal keys, is the
    lexicographic minimum of (key, pack) over all packs: SPEC.md's choice. A
    choice changes one pack, so only its block's minimum is found again:
    two tournaments of eight per item instead of a tree's six matches.
    """
    block_key = key[_BLOCK * _BLOCK :]
    for b in range(_BLOCK):
        block_key[b], block_index[b] = _lowest_in_block(key, b * _BLOCK)
    for k in range(first, values.size):
        item = order[k]
        lowest, b = _lowest_of_eight(
            block_key[0], block_key[1], block_key[2], block_key[3],
            block_key[4], block_key[5], block_key[6], block_key[7],
        )  # fmt: skip
        best = block_index[b]
        full = _place(item, best, pack, rank, counts, per_pack)
        key[best] = _added(lowest, values[item], full)
        block_key[b], block_index[b] = _lowest_in_block(key, b * _BLOCK)


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
def _pack_tree(
    tree_key: np.ndarray, tree_index: np.ndarray, values: np.ndarray, order: np.ndarray,
    first: int, per_pack: int, pack: np.ndarray, rank: np.ndarray, counts: np.ndarray,
) -> None:  # fmt: skip
    """``pack_row``'s greedy for more than 64 packs: a tournament tree over the packs' keys.

    tree_key: [2 * leaves] int64, its second half the keys after the first
    round (padding full), ``leaves`` a power of two; tree_index: [2 * leaves]
    int32. A choice changes one leaf and replays its ``log2(leaves)``
    matches, reading only siblings, without branches.
    """
    leaves = tree_key.size // 2
    for j in range(leaves):
        tree_index[leaves + j] = j
    for node in range(leaves - 1, 0, -1):
        # The left child (lower indices) wins unless the right one is strictly smaller.
        right = tree_key[2 * node + 1] < tree_key[2 * node]
        tree_key[node] = tree_key[2 * node + right]
        tree_index[node] = tree_index[2 * node + right]
    for k in range(first, values.size):
        item = order[k]
        best = tree_index[1]
        full = _place(item, best, pack, rank, counts, per_pack)
        _replay_min(tree_key, tree_index, leaves + best, _added(tree_key[1], values[item], full))


@jit()
def pack_row(
    values: np.ndarray,
    num_packs: int,
    pack: np.ndarray,
    rank: np.ndarray,
    order: np.ndarray,
    keys: np.ndarray,
    spare: np.ndarray,
    counts: np.ndarray,
    tree_key: np.ndarray,
    tree_index: np.ndarray,
) -> None:
    """SPEC.md primitive 1 on one row: ``n`` items into ``num_packs`` packs of ``n / num_packs``.

    values: [n] float64, the weight of each item.
    pack, rank: [n] int (out), each item's pack and its position in that pack.
    order: [>= n] int32, keys, spare: [>= n] int64: the sort's work space.
    counts: [>= num_packs] int32: the items in each pack.
    tree_key: [>= pack_tree_size(num_packs)] int64, tree_index: the same, int32:
        the greedy's work space.

    A pack's key is its float64 total's bits (ordered as the totals, +inf
    included), or ``_FULL`` once it holds ``n / num_packs`` items: the
    smallest (key, pack) is SPEC.md's choice, the lightest pack with room,
    the lowest index on equal totals. Up to eight packs are searched in
    registers, up to 64 in blocks of eight, more through a tree.
    """
    n = values.size
    per_pack = n // num_packs
    if per_pack == 1:
        for i in range(n):
            pack[i] = i
            rank[i] = 0
        return
    sort_descending(values, order, keys, spare)
    # The packs' keys (padded with full ones to the path's width) start at
    # tree_key[0], or at tree_key[width] for the tree, whose leaves are its second half.
    width = _BLOCK if num_packs <= _BLOCK else _BLOCK * _BLOCK
    if num_packs > _BLOCK * _BLOCK:
        width = tree_leaves(num_packs)
    leaf = tree_key[width : 2 * width] if num_packs > _BLOCK * _BLOCK else tree_key[:width]
    # The first round needs no search: while the items weigh more than 0,
    # item k finds packs 0..k-1 above 0.0 and packs k.. at 0.0, so it goes to
    # pack k, the lowest index among the smallest totals (0.0 + w == w).
    first = 0
    while first < num_packs and values[order[first]] > 0.0:
        item = order[first]
        pack[item] = first
        rank[item] = 0
        leaf[first] = np.float64(values[item]).view(np.int64)
        counts[first] = 1
        first += 1
    for p in range(first, width):
        leaf[p] = 0 if p < num_packs else _FULL  # 0: the bits of 0.0
    for p in range(first, num_packs):
        counts[p] = 0
    if num_packs <= _BLOCK:
        _pack_few(values, order, first, per_pack, pack, rank, counts, leaf)
    elif num_packs <= _BLOCK * _BLOCK:
        key = tree_key[: _BLOCK * (_BLOCK + 1)]  # the 64 packs', then the 8 blocks' minima
        _pack_blocks(values, order, first, per_pack, pack, rank, counts, key, tree_index)
    else:
        key, index = tree_key[: 2 * width], tree_index[: 2 * width]
        _pack_tree(key, index, values, order, first, per_pack, pack, rank, counts)


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
