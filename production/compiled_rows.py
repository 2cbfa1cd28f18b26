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
from typing import Any, Literal

import numba
import numpy as np

__all__ = [
    "CACHED",
    "jit",
    "pack_row",
    "replicate_row",
    "sort_descending",
    "tree_size",
]

#: True when the compiled code is cached on disk; False when no cache directory
#: was writable and every start compiles anew.
CACHED = True


def jit(
    *signatures: Any, nogil: bool = True, inline: bool = False
) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(signatures, nogil=nogil, cache=True)``, in memory without a cache dir.

    The signatures compile when this module is imported (or load from the
    cache), so no call on the serving path compiles. numba refuses
    ``cache=True`` with a RuntimeError when neither the package folder nor its
    user cache folder (``NUMBA_CACHE_DIR``) is writable, as in a read-only
    install: then the code is compiled without a cache.

    ``inline=True`` inlines a helper into its callers in numba's IR. A call
    that stays a call takes a reference to each array argument and drops it
    on return, two atomic operations per array, which numba removes only
    within one function: for a row primitive called per node with nine
    arrays, more than its loop of eight packs costs. Each inlined copy
    compiles anew, so only the helpers on the per-row path are inlined.
    """

    def wrap(function: Callable[..., Any]) -> Any:
        global CACHED
        # Helpers without signatures compile with (and are cached in) their callers.
        listed = list(signatures) if signatures else None
        how: Literal["always", "never"] = "always" if inline else "never"
        try:
            return numba.njit(listed, nogil=nogil, cache=True, inline=how)(function)
        except RuntimeError:
            CACHED = False
            return numba.njit(listed, nogil=nogil, cache=False, inline=how)(function)

    return wrap


#: Rows up to this long are sorted by counting (``_rank_block``); longer ones
#: in blocks of at most this many, then merged.
_RANK_BLOCK = 64
#: Up to this many packs, the keys live in registers (``_pack_few``); more, and
#: the experts of ``replicate_row``, in a tree of this many ways.
_BLOCK = 8
#: Bit pattern of +inf. Non-negative doubles (+inf included) are ordered like
#: their bit patterns read as int64.
_INF_BITS = 0x7FF0000000000000
#: The key of a full pack (and of a padding one): above every total's bits, +inf's included.
_FULL = 0x7FFFFFFFFFFFFFFF


@jit()
def _tree_width(count: int) -> int:
    """The leaves of an eight-way tree over ``count``: the smallest power of 8 >= ``count``."""
    width = _BLOCK
    while width < count:
        width *= _BLOCK
    return width


@jit()
def _tree_top(width: int) -> int:
    """Where the top level (the eight entries below the root) of a ``width``-leaf tree starts."""
    top = 0
    while width > _BLOCK:
        top += width
        width //= _BLOCK
    return top


@jit()
def tree_size(count: int) -> int:
    """The length of the key (int64) and index (int32) arrays of a tree over ``count`` leaves."""
    return _tree_top(_tree_width(count)) + _BLOCK


# --- a stable descending sort --------------------------------------------------------------


@jit(inline=True)
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


@jit(inline=True)
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


@jit(inline=True)
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


@jit(inline=True)
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


@jit(inline=True)
def _place(
    item: int, best: int, pack: np.ndarray, rank: np.ndarray, counts: np.ndarray, per_pack: int
) -> bool:
    """Item ``item`` joins pack ``best`` at its next rank; True when that fills the pack."""
    count = counts[best]
    pack[item] = best
    rank[item] = count
    counts[best] = count + 1
    return count + 1 == per_pack


@jit(inline=True)
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
def _tree_build(key: np.ndarray, index: np.ndarray, width: int) -> None:
    """Fill the levels of an eight-way tree whose ``width`` leaves' keys are set.

    key: [tree_size] int64, index: [tree_size] int32. The leaves (``width``, a
    power of 8, padding full) come first, then each level above: one entry per
    block of eight below, holding the block's lowest key and the leaf it
    belongs to (the lower entry's on equal keys). The root, the lowest of the
    top level's eight, is not stored. Each entry's blocks lie in leaf order,
    so by induction an entry is the lexicographic minimum of (key, leaf) over
    its leaves: SPEC.md's smallest value, lowest index on ties.
    """
    for j in range(width):
        index[j] = j
    start = 0
    while width > _BLOCK:
        for b in range(width // _BLOCK):
            lowest, at = _lowest_in_block(key, start + b * _BLOCK)
            key[start + width + b] = lowest
            index[start + width + b] = index[at]
        start += width
        width //= _BLOCK


@jit(inline=True)
def _tree_set(key: np.ndarray, index: np.ndarray, width: int, leaf: int, new: int) -> None:
    """Give leaf ``leaf`` the key ``new`` and find again the entries above it.

    One tournament of eight per level (one for 64 leaves, two for 512), each
    without branches, where a binary tree replays ``log2`` matches one after
    the other.
    """
    key[leaf] = new
    start, position = 0, leaf
    while width > _BLOCK:
        lowest, at = _lowest_in_block(key, start + (position & ~(_BLOCK - 1)))
        start += width
        position //= _BLOCK
        key[start + position] = lowest
        index[start + position] = index[at]
        width //= _BLOCK


@jit(inline=True)
def _tree_root(key: np.ndarray, index: np.ndarray, top: int) -> tuple[int, int]:
    """(lowest key, its leaf) of the tree whose top level starts at ``top`` (``_tree_top``)."""
    lowest, at = _lowest_in_block(key, top)
    return lowest, index[at]


@jit()
def _pack_tree(
    values: np.ndarray, order: np.ndarray, first: int, per_pack: int,
    pack: np.ndarray, rank: np.ndarray, counts: np.ndarray,
    key: np.ndarray, index: np.ndarray, width: int,
) -> None:  # fmt: skip
    """``pack_row``'s greedy for more than eight packs: an eight-way tree of the packs' keys.

    key, index: [tree_size] the tree (``_tree_build``), its ``width`` leaves
    the packs' keys after the first round (padding full).
    """
    _tree_build(key, index, width)
    top = _tree_top(width)
    for k in range(first, values.size):
        item = order[k]
        lowest, best = _tree_root(key, index, top)
        full = _place(item, best, pack, rank, counts, per_pack)
        _tree_set(key, index, width, best, _added(lowest, values[item], full))


@jit(inline=True)
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
    tree_key: [>= tree_size(num_packs)] int64, tree_index: the same, int32:
        the greedy's work space.

    A pack's key is its float64 total's bits (ordered as the totals, +inf
    included), or ``_FULL`` once it holds ``n / num_packs`` items: the
    smallest (key, pack) is SPEC.md's choice, the lightest pack with room,
    the lowest index on equal totals. Up to eight packs are searched in
    registers, more in an eight-way tree.
    """
    n = values.size
    per_pack = n // num_packs
    if per_pack == 1:
        for i in range(n):
            pack[i] = i
            rank[i] = 0
        return
    sort_descending(values, order, keys, spare)
    width = _tree_width(num_packs)
    # The first round needs no search: while the items weigh more than 0,
    # item k finds packs 0..k-1 above 0.0 and packs k.. at 0.0, so it goes to
    # pack k, the lowest index among the smallest totals (0.0 + w == w).
    first = 0
    while first < num_packs and values[order[first]] > 0.0:
        item = order[first]
        pack[item] = first
        rank[item] = 0
        tree_key[first] = np.float64(values[item]).view(np.int64)
        counts[first] = 1
        first += 1
    for p in range(first, width):
        tree_key[p] = 0 if p < num_packs else _FULL  # 0: the bits of 0.0
    for p in range(first, num_packs):
        counts[p] = 0
    if num_packs <= _BLOCK:
        _pack_few(values, order, first, per_pack, pack, rank, counts, tree_key)
    else:
        _pack_tree(values, order, first, per_pack, pack, rank, counts, tree_key, tree_index, width)


@jit(inline=True)
def replicate_row(
    weight: np.ndarray,
    phy2log: np.ndarray,
    rank: np.ndarray,
    count: np.ndarray,
    tree_key: np.ndarray,
    tree_index: np.ndarray,
) -> None:
    """SPEC.md primitive 2 on one row: give the ``num_phy - n`` extra slots to the hottest experts.

    weight: [n] float64, the load of each expert.
    phy2log, rank: [num_phy] int (out), the expert and replica rank of each slot.
    count: [n] int (out), the replica count of each expert.
    tree_key: [>= tree_size(n)] int64, tree_index: the same, int32: an
        eight-way tree for the largest ``W / count``.

    An expert's key is its ``W / count``'s bits negated (``+ 0.0`` first, so
    -0.0 equals 0.0, as in the reference): the smallest (key, expert) is the
    largest value, the lowest index on equal values. Padding leaves are full.
    """
    n = weight.size
    num_phy = phy2log.size
    for e in range(n):
        phy2log[e] = e
        rank[e] = 0
        count[e] = 1
    if num_phy == n:
        return
    width = _tree_width(n)
    for j in range(width):
        # float64 division by the count, as SPEC.md: W / 1 == W.
        tree_key[j] = _negated_key(weight[j]) if j < n else _FULL
    _tree_build(tree_key, tree_index, width)
    top = _tree_top(width)
    for slot in range(n, num_phy):
        best = _tree_root(tree_key, tree_index, top)[1]
        replicas = count[best]
        phy2log[slot] = best
        rank[slot] = replicas
        count[best] = replicas + 1
        new = _negated_key(weight[best] / np.float64(replicas + 1))
        _tree_set(tree_key, tree_index, width, best, new)


@jit()
def _negated_key(value: float) -> int:
    """``-bits(value + 0.0)``: ordered against the values of other experts, reversed."""
    return -np.float64(value + 0.0).view(np.int64)
