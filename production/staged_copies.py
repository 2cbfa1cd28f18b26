"""A staged rebalance's slot copies, laid out ahead (host only: views, no data).

Per chunk (:class:`ChunkCopies`): the launch's local copies (staging <- live
slots, for the slots whose new expert this rank already holds) and the
commit's copies (live slots <- staging, the runs of slots whose expert
changes), as :class:`~eplb.production.slot_work.CopyBatch` lists of slot
views, each issued as one ``_foreach_copy_`` call per dtype (fused kernels on
CUDA). :class:`CopyLayout` makes them from the views of every slot, made once
per tensor, not per placement: a placement's layout is list indexing only,
and :func:`local_sources` (which old slot each local copy reads) is a few
vectorized numpy calls over every layer, so the balancer's worker thread lays
out a whole placement while holding the interpreter lock briefly.

Views are of given tensors: a chunk's copies are used only on the very tensors
they were made of, with the same memory and layout (:meth:`ChunkCopies.fits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .slot_work import CopyBatch, bit_view, copy_all

__all__ = [
    "ChunkCopies",
    "CopyLayout",
    "issue",
    "local_sources",
]

# A tensor's bit view and the views of its slots.
_Split = tuple[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class ChunkCopies:
    """One chunk's copies laid out on given weights: lists of slot views, no data.

    weights: the chunk's layers' tensors the views are of.
    layouts: their memory and layout when the views were made.
    launch: staging <- live slots, this rank's local copies.
    commit: live slots <- staging, the runs of slots whose expert changes.
    count: local copies (slots).
    """

    weights: tuple[tuple[torch.Tensor, ...], ...]
    layouts: tuple[tuple[object, ...], ...]
    launch: CopyBatch
    commit: CopyBatch
    count: int

    def fits(self, live: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Whether ``live`` are the very tensors these views were made of, unchanged
        (a tensor resized or re-pointed in place has other slots)."""
        return (
            len(live) == len(self.weights)
            and all(
                len(given) == len(mine) and all(a is b for a, b in zip(given, mine, strict=True))
                for given, mine in zip(live, self.weights, strict=True)
            )
            and tuple(_layout(layer) for layer in self.weights) == self.layouts
        )


class CopyLayout:
    """Slot views of the staging buffer and of the live weights, kept between placements.

    staging: per chunk layer, the staging tensors (shaped as one layer's weights).
    """

    def __init__(self, staging: Sequence[Sequence[torch.Tensor]]) -> None:
        self._staging = [list(stage) for stage in staging]
        self._staging_rows = [[_split(t) for t in stage] for stage in self._staging]
        # Per layer: its tensors, their layout, per tensor its views.
        self._rows: dict[int, tuple[tuple[torch.Tensor, ...], tuple[object, ...], list[_Split]]]
        self._rows = {}

    def lay_out(
        self,
        rows: range,
        live: Sequence[Sequence[torch.Tensor]],
        local: Sequence[tuple[Sequence[int], Sequence[int]]],
        changed: Sequence[Sequence[tuple[int, int]]],
    ) -> ChunkCopies:
        """The copies of the chunk of layers ``rows`` on ``live`` (its layers' tensors).

        local: per layer, (destinations, sources) local slots of the local copies.
        changed: per layer, runs (first, end) of the local slots whose expert changes.

        ValueError where ``live`` does not match the staging buffer (count,
        shapes, dtypes, device).
        """
        if len(live) != len(rows):
            raise ValueError("expert_weights must have one entry per layer")
        launch, commit, count = CopyBatch("local copies"), CopyBatch("commit"), 0
        for stage, stage_rows, layer, tensors in zip(
            self._staging, self._staging_rows, rows, live, strict=False
        ):
            _check_layer(layer, tensors, stage)
            destinations, sources = local[layer]
            count += len(destinations)
            runs = changed[layer]
            for tensor, buffer, (whole, slots), (into, staged) in zip(
                tensors, stage, self._slot_rows(layer, tensors), stage_rows, strict=True
            ):
                if whole.shape != into.shape:  # other strides: element by element
                    whole, into = tensor, buffer
                    slots, staged = tensor.unbind(0), buffer.unbind(0)
                launch.add([staged[d] for d in destinations], [slots[s] for s in sources])
                commit.add([whole[a:b] for a, b in runs], [into[a:b] for a, b in runs])
        return ChunkCopies(
            tuple(tuple(t) for t in live), tuple(_layout(t) for t in live), launch, commit, count
        )

    def _slot_rows(self, layer: int, tensors: Sequence[torch.Tensor]) -> list[_Split]:
        """Per tensor of ``layer``, its bit view and the views of its slots, made once
        per tensor and reused while the engine passes the same tensors, unchanged."""
        tensors = tuple(tensors)
        cached = self._rows.get(layer)
        if (
            cached is not None
            and len(cached[0]) == len(tensors)
            and all(a is b for a, b in zip(cached[0], tensors, strict=True))
            and cached[1] == _layout(tensors)
        ):
            return cached[2]
        rows = [_split(t) for t in tensors]
        self._rows[layer] = (tensors, _layout(tensors), rows)
        return rows


def _check_layer(layer: int, tensors: object, stage: list[torch.Tensor]) -> None:
    """ValueError unless ``tensors`` are shaped as the staging buffer's layer."""
    rule = "must hold the same list of tensor shapes and dtypes as when the move was prepared"
    if not isinstance(tensors, Sequence) or isinstance(tensors, torch.Tensor):
        raise ValueError(f"expert_weights[{layer}] {rule}: a list of {len(stage)} tensors")
    if len(tensors) != len(stage):
        raise ValueError(f"expert_weights[{layer}] {rule}: {len(stage)} tensors")
    for index, (tensor, buffer) in enumerate(zip(tensors, stage, strict=True)):
        if not isinstance(tensor, torch.Tensor) or (tensor.shape, tensor.dtype, tensor.device) != (
            buffer.shape,
            buffer.dtype,
            buffer.device,
        ):
            raise ValueError(
                f"expert_weights[{layer}][{index}] {rule}: {buffer.dtype} "
                f"{list(buffer.shape)} on {buffer.device}"
            )


def local_sources(old: np.ndarray, new: np.ndarray, world_size: int) -> np.ndarray:
    """[layers, R] int64: per slot, the lowest old slot on its own rank holding its new
    expert, or -1 where its rank holds none (the plan's local copy source).

    old, new: [layers, R] int >= 0, two placements (ids below R, as any placement's).
    """
    layers, slots = old.shape
    rank = np.arange(slots) // (slots // world_size)
    experts = int(max(old.max(), new.max())) + 1
    base = (np.arange(layers)[:, None] * world_size + rank) * experts
    # np.unique's first occurrence of a (layer, rank, expert) key walks the
    # slots in order: it is the lowest slot holding it.
    keys, first = np.unique((base + old).ravel(), return_index=True)
    wanted = base + new
    at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
    return np.where(keys[at] == wanted, first[at] % slots, -1)


def issue(batch: CopyBatch) -> None:
    """One copy call per dtype (fused kernels on CUDA), on the current stream."""
    for destinations, sources in batch.pairs.values():
        copy_all(destinations, sources)


def _split(tensor: torch.Tensor) -> _Split:
    bits = bit_view(tensor)
    return bits, bits.unbind(0)


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[object, ...]:
    """Where each tensor's memory is and how it is laid out."""
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors)
