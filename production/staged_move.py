"""A staged rebalance's placement, ready to apply in chunks: :class:`StagedMove`, and the
host helpers that make and check it (:class:`eplb.production.staged.StagedApply`'s
``prepare`` and launch use them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .rearrange import PreparedRearrangement
from .slot_moves import FROM_STAGING, SlotMoves
from .staged_copies import ChunkCopies

__all__ = [
    "StagedMove",
    "changed_runs",
    "check_in_place",
    "logcnt_of",
]


@dataclass(frozen=True)
class StagedMove:
    """A placement ready to apply in chunks (host tensors, from :meth:`StagedApply.prepare`).

    old_phy2log: [layers, R] int64, the placement the weights hold when it begins.
    old_logcnt: [layers, E] int64, its replicas per expert.
    phy2log: [layers, R] int64, the new placement.
    log2phy: [layers, E, max_replicas] int64, its slots per expert, -1 padded.
    logcnt: [layers, E] int64, its replicas per expert.
    first: this rank's share of the first chunk's wire move, worked out ahead
        (None: planned in the call, as every later chunk's is, by its launch;
        or the first chunk has nothing to send or receive).
    changed: per layer, the runs ``(first, end)`` of this rank's slots (local
        indices) whose expert changes: the only slots a commit writes.
    wire: [layers, R] int64, ``phy2log`` with every slot that some rank fills
        by a local copy (its new expert is already on that rank) left at its old
        expert: the map each chunk's call to ``rearrange_expert_weights`` gets,
        so that it moves only what crosses a wire (receives, and copies from a
        received slot). The same on every rank.
    wired: per chunk, whether any slot of any rank crosses a wire: without, no
        rank makes the chunk's call (none would send or receive anything).
    local: per layer, this rank's local copies: ``(destinations, sources)``,
        local slot indices, the source the lowest old slot of this rank
        holding the destination's new expert (empty with ``in_place``).
    copies: per chunk, the copies of :meth:`StagedApply.prepare`'s weights laid
        out ahead (None where that failed, or with ``in_place``: the launch lays
        them out).
    programs: with ``in_place``, per layer, this rank's in-place moves
        (:func:`eplb.production.slot_moves.plan_slot_moves`); else empty.
    """

    old_phy2log: torch.Tensor
    old_logcnt: torch.Tensor
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    first: PreparedRearrangement | None
    changed: tuple[tuple[tuple[int, int], ...], ...]
    wire: torch.Tensor
    wired: tuple[bool, ...]
    local: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    copies: tuple[ChunkCopies | None, ...]
    programs: tuple[SlotMoves, ...] = ()


def logcnt_of(phy2log: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[L, E] int64 replicas per expert of host ``phy2log`` (E from ``like``)."""
    layers, experts = like.shape
    counts = np.zeros((layers, experts), dtype=np.int64)
    np.add.at(counts, (np.arange(layers)[:, None], phy2log.numpy()), 1)
    return torch.from_numpy(counts)


def check_in_place(
    move: StagedMove,
    rows: range,
    live: Sequence[Sequence[torch.Tensor]],
    staging: Sequence[Sequence[torch.Tensor]],
) -> int:
    """The chunk's local moves; ValueError unless every layer's tensors match staging's."""
    if len(move.programs) <= rows.stop - 1:
        raise ValueError("the staged move has no in-place program for these layers")
    for tensors, stage in zip(live, staging, strict=True):
        if len(tensors) != len(stage) or any(
            not isinstance(t, torch.Tensor) or t.shape != b.shape or t.dtype != b.dtype
            for t, b in zip(tensors, stage, strict=False)
        ):
            raise ValueError(
                "expert_weights must have, per layer, tensors of the first layer's shapes "
                "and dtypes (the staging buffer's)"
            )
    return sum(int((move.programs[layer].ops[:, 1] != FROM_STAGING).sum()) for layer in rows)


def changed_runs(
    old: np.ndarray, new: np.ndarray, rank: int, world_size: int
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per layer, runs (first, end) of this rank's local slots where ``new`` differs from ``old``.

    old, new: [layers, R] int, two placements.
    """
    local = old.shape[1] // world_size
    mine = slice(rank * local, (rank + 1) * local)
    changed = np.pad(old[:, mine] != new[:, mine], ((0, 0), (1, 1)))
    runs = []
    for row in changed:
        edges = np.flatnonzero(row[1:] != row[:-1])  # starts and ends alternate
        runs.append(tuple(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)))
    return tuple(runs)
