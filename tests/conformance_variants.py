"""Implementations of SPEC.md that are each wrong in one small way.

The conformance suite must catch every one of them (tests/test_conformance_cli.py
runs ``eplb conformance --impl tests.conformance_variants:NAME`` on each). They
share one row-vectorized implementation, ``_rebalance``, whose keyword
arguments switch on one deviation at a time; ``faithful`` switches none on and
must conform, which shows that each failure comes from its deviation alone.

The deviations are the choices SPEC.md closes where DeepSeek's original
leaves them open, i.e. the ones an engine author plausibly gets wrong:

- ``float32_arithmetic``: loads, totals and per-replica loads in float32.
- ``reversed_tie_order``: equal loads sorted by descending index.
- ``default_argsort``: ``numpy.argsort`` without ``kind="stable"``
  (introsort; stable for short rows only).
- ``highest_pack_on_ties``: equal pack totals go to the highest pack index.
- ``no_single_item_case``: SPEC.md primitive 1 step 1 skipped. This is not a
  no-op: with one item per pack, the greedy puts the i-th *largest* item in
  pack i (pack 0 is full after the first item, so each next item goes to
  the lowest open pack), which differs from item i -> pack i whenever the
  row is not already sorted descending (G == N, or one slot per GPU).
- ``pairwise_group_sum``: group loads by ``numpy.sum`` (pairwise summation
  for 9 or more experts per group).
- ``reversed_group_sum``: group loads added right to left.

Two more, written as an engine's copy is, for ``--same-balance``: int32
outputs, ``log2phy`` padded to ``R - E + 1`` as vLLM pads it, and
``AssertionError`` on invalid input.

- ``relabelled``: SPEC.md's placement with every GPU's slots in reverse
  order and the GPUs of each node numbered backwards. The same balance, so
  it passes ``--same-balance`` and fails the exact check.
- ``moved_slot``: SPEC.md's placement with the first slots of a node's first
  two GPUs swapped: a real difference wherever the two slots' loads differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = [
    "VARIANTS",
    "default_argsort",
    "faithful",
    "float32_arithmetic",
    "highest_pack_on_ties",
    "moved_slot",
    "no_single_item_case",
    "pairwise_group_sum",
    "relabelled",
    "reversed_group_sum",
    "reversed_tie_order",
]

Placement = tuple[np.ndarray, np.ndarray, np.ndarray]


def _order(weight: np.ndarray, ties: str) -> np.ndarray:
    """[X, n] item indices, largest weight first, ties broken as ``ties`` says."""
    if ties == "stable":
        return np.argsort(-weight, axis=1, kind="stable")
    if ties == "reversed":
        # A stable sort of the mirrored row, mapped back: ties by descending index.
        return weight.shape[1] - 1 - np.argsort(-weight[:, ::-1], axis=1, kind="stable")
    return np.argsort(-weight, axis=1)


def _pack(
    weight: np.ndarray, num_packs: int, *, ties: str, highest_pack: bool, single_item_case: bool
) -> tuple[np.ndarray, np.ndarray]:
    """pack [X, n] and rank [X, n] int64 of SPEC.md primitive 1, for all rows at once."""
    num_rows, num_items = weight.shape
    capacity = num_items // num_packs
    if capacity == 1 and single_item_case:
        return (
            np.broadcast_to(np.arange(num_items), weight.shape).copy(),
            np.zeros(weight.shape, np.int64),
        )
    rows = np.arange(num_rows)
    totals = np.zeros((num_rows, num_packs), weight.dtype)
    counts = np.zeros((num_rows, num_packs), np.int64)
    pack = np.empty(weight.shape, np.int64)
    rank = np.empty(weight.shape, np.int64)
    for item in _order(weight, ties).T:
        # Full packs never win: compare against the smallest open total, so
        # that totals which overflowed to inf still pick an open pack.
        is_open = counts < capacity
        smallest = np.where(is_open, totals, np.inf).min(axis=1, keepdims=True)
        candidates = is_open & (totals == smallest)
        if highest_pack:
            best = num_packs - 1 - np.argmax(candidates[:, ::-1], axis=1)
        else:
            best = np.argmax(candidates, axis=1)
        pack[rows, item] = best
        rank[rows, item] = counts[rows, best]
        totals[rows, best] += weight[rows, item]
        counts[rows, best] += 1
    return pack, rank


def _replicate(weight: np.ndarray, num_phy: int) -> Placement:
    """phy2log [X, num_phy], replica rank [X, num_phy], count [X, n] of primitive 2."""
    num_rows, num_log = weight.shape
    rows = np.arange(num_rows)
    count = np.ones(weight.shape, np.int64)
    phy2log = np.tile(np.arange(num_phy), (num_rows, 1))
    rank = np.zeros((num_rows, num_phy), np.int64)
    for slot in range(num_log, num_phy):
        # argmax keeps the first (lowest) expert among equal per-replica loads.
        best = np.argmax(weight / count.astype(weight.dtype), axis=1)
        phy2log[:, slot] = best
        rank[:, slot] = count[rows, best]
        count[rows, best] += 1
    return phy2log, rank, count


def _group_loads(grouped: np.ndarray, order: str) -> np.ndarray:
    """[L, G] sums of grouped [L, G, gs] in the given order of addition."""
    if order == "numpy":
        return grouped.sum(axis=-1)
    offsets = range(grouped.shape[-1])
    total = np.zeros(grouped.shape[:-1], grouped.dtype)
    for offset in reversed(offsets) if order == "reversed" else offsets:
        total = total + grouped[..., offset]
    return total


def _rebalance(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    dtype: type = np.float64,
    ties: str = "stable",
    highest_pack: bool = False,
    single_item_case: bool = True,
    group_sum: str = "left to right",
) -> Placement:
    """SPEC.md's placement with the chosen deviations (the defaults deviate in nothing)."""
    from eplb._validation import validate_weight

    weight64, config = validate_weight(
        np.asarray(weight), num_replicas, num_groups, num_nodes, num_gpus
    )
    load = weight64.astype(dtype)
    num_layers, num_experts = load.shape
    if not config.hierarchical:
        num_groups, num_nodes = 1, 1
    group_size = num_experts // num_groups
    per_node = num_experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    pack = functools.partial(
        _pack, ties=ties, highest_pack=highest_pack, single_item_case=single_item_case
    )

    group_load = _group_loads(load.reshape(num_layers, num_groups, group_size), group_sum)
    group_node, group_rank = pack(group_load, num_nodes)
    # Node-local index of every expert: its group's place on its node, then its offset.
    group_place = group_node * (num_groups // num_nodes) + group_rank
    log2mlog = (group_place[:, :, None] * group_size + np.arange(group_size)).reshape(
        num_layers, num_experts
    )
    mlog2log = np.argsort(log2mlog, axis=1)
    node_load = np.take_along_axis(load, mlog2log, axis=1).reshape(-1, per_node)

    phy2mlog, replica_rank, mlogcnt = _replicate(node_load, slots_per_node)
    slot_load = np.take_along_axis(node_load, phy2mlog, axis=1) / np.take_along_axis(
        mlogcnt, phy2mlog, axis=1
    ).astype(dtype)
    gpu, gpu_rank = pack(slot_load, num_gpus // num_nodes)
    phy_in_node = gpu * (num_replicas // num_gpus) + gpu_rank

    # Scatter every slot to its physical index; node n's slots start at n * R/N.
    node_offset = (np.arange(num_layers * num_nodes) % num_nodes)[:, None] * per_node
    mlog_at = np.empty_like(phy2mlog)
    rank_at = np.empty_like(replica_rank)
    np.put_along_axis(mlog_at, phy_in_node, phy2mlog + node_offset, axis=1)
    np.put_along_axis(rank_at, phy_in_node, replica_rank, axis=1)
    mlog_at = mlog_at.reshape(num_layers, num_replicas)
    rank_at = rank_at.reshape(num_layers, num_replicas)

    phy2log = np.take_along_axis(mlog2log, mlog_at, axis=1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, num_experts), log2mlog, axis=1)
    log2phy = np.full((num_layers, num_experts, int(logcnt.max())), -1, np.int64)
    log2phy[np.arange(num_layers)[:, None], phy2log, rank_at] = np.arange(num_replicas)
    return phy2log, log2phy, logcnt


def _variant(name: str, doc: str, **deviation: object) -> Callable[..., Placement]:
    """A public function ``name`` running ``_rebalance`` with one deviation."""

    def impl(
        weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
    ) -> Placement:
        return _rebalance(
            weight,
            num_replicas,
            num_groups,
            num_nodes,
            num_gpus,
            **deviation,  # type: ignore[arg-type]
        )

    impl.__name__ = impl.__qualname__ = name
    impl.__doc__ = doc
    return impl


faithful = _variant("faithful", "SPEC.md with no deviation: must conform.")
float32_arithmetic = _variant(
    "float32_arithmetic", "Loads, pack totals and per-replica loads in float32.", dtype=np.float32
)
reversed_tie_order = _variant(
    "reversed_tie_order", "Equal loads are sorted by descending index.", ties="reversed"
)
default_argsort = _variant(
    "default_argsort", "numpy.argsort's default (unstable) sort orders the items.", ties="quick"
)
highest_pack_on_ties = _variant(
    "highest_pack_on_ties", "Equal pack totals: the highest pack index wins.", highest_pack=True
)
no_single_item_case = _variant(
    "no_single_item_case",
    "The greedy runs even with one item per pack (SPEC.md primitive 1 step 1 skipped).",
    single_item_case=False,
)
pairwise_group_sum = _variant(
    "pairwise_group_sum", "Group loads by numpy.sum (pairwise summation).", group_sum="numpy"
)
reversed_group_sum = _variant(
    "reversed_group_sum", "Group loads added right to left.", group_sum="reversed"
)

#: Every variant that must fail the conformance check, by name.
VARIANTS = (
    "float32_arithmetic",
    "reversed_tie_order",
    "default_argsort",
    "highest_pack_on_ties",
    "no_single_item_case",
    "pairwise_group_sum",
    "reversed_group_sum",
)


def _engine_style(
    reorder: Callable[[np.ndarray, int, int], np.ndarray],
) -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """SPEC.md's placement with its slots reordered by ``reorder(phy2log, N, P)``, engine style."""

    def impl(
        weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from eplb.reference import rebalance_experts

        try:
            phy2log, _, logcnt = rebalance_experts(
                weight, num_replicas, num_groups, num_nodes, num_gpus
            )
        except (ValueError, TypeError) as exc:
            raise AssertionError(str(exc)) from None  # an engine's `assert`
        phy2log = reorder(phy2log, num_nodes, num_gpus)
        num_layers, num_experts = logcnt.shape
        # Replica k of an expert: its k-th slot in slot order; width R - E + 1 as vLLM's.
        log2phy = np.full((num_layers, num_experts, num_replicas - num_experts + 1), -1)
        for layer in range(num_layers):
            seen = np.zeros(num_experts, dtype=np.int64)
            for slot, expert in enumerate(phy2log[layer]):
                log2phy[layer, expert, seen[expert]] = slot
                seen[expert] += 1
        return phy2log.astype(np.int32), log2phy.astype(np.int32), logcnt.astype(np.int32)

    impl.__name__ = impl.__qualname__ = reorder.__name__
    impl.__doc__ = reorder.__doc__
    return impl


@_engine_style
def relabelled(phy2log: np.ndarray, num_nodes: int, num_gpus: int) -> np.ndarray:
    """SPEC.md's placement, each GPU's slots reversed, each node's GPUs numbered backwards."""
    num_layers, num_replicas = phy2log.shape
    shape = (num_layers, num_nodes, num_gpus // num_nodes, num_replicas // num_gpus)
    return phy2log.reshape(shape)[:, :, ::-1, ::-1].reshape(num_layers, num_replicas)


@_engine_style
def moved_slot(phy2log: np.ndarray, num_nodes: int, num_gpus: int) -> np.ndarray:
    """SPEC.md's placement with the first slots of GPUs 0 and 1 swapped (one node, 2+ GPUs)."""
    per_gpu = phy2log.shape[1] // num_gpus
    moved = phy2log.copy()
    if num_gpus // num_nodes >= 2:
        moved[:, [0, per_gpu]] = phy2log[:, [per_gpu, 0]]
    return moved
