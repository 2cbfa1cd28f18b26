"""The slot side of a rearrangement's copies: views of the weights' slots, and copy batches.

:class:`SlotWork` is the one place that makes views of the weights' slots,
for packs (read) and writes (local copies, unpacks, post copies); its
``into=`` sends the writes to other tensors of the same shapes (a staging copy
committed later) while packs and local copies read the live slots. The
executor (:func:`eplb.production.rearrange_executor.run_steps`) issues them as
:class:`CopyBatch` lists through :func:`copy_all`.

Bits move through integer views (:func:`bit_view`; 8-byte words where a slot is
one dense block), so every dtype ships exactly; slot copies go as lists through
``torch._foreach_copy_`` (fused kernels on CUDA, memcpy on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .rearrange_schedule import Step

__all__ = [
    "CopyBatch",
    "SlotViews",
    "SlotWork",
    "bit_view",
    "copy_all",
    "message_region",
]

# Bits are moved through same-sized integer views: every dtype (bfloat16, float8,
# bool...) then ships and copies exactly, including kernels not defined for it.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as ``[slots, ...]`` integers, as wide as the memory layout allows.

    A slot stored as one contiguous block becomes one row of 8-byte (else 4, 2)
    integers, so copies move wide words; otherwise each element becomes an
    integer of its own width (complex: a pair). Both read the slot's bytes in
    the same (row-major, element by element) order, so ranks whose tensors
    differ in strides still agree on every message's bytes.
    """
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    bits = tensor.view(_INT_OF_SIZE[tensor.element_size()])
    try:
        rows = bits.view(bits.shape[0], -1).view(torch.uint8)
    except RuntimeError:  # the slot is not one dense block
        return bits
    for width in (8, 4, 2):
        if rows.shape[1] % width == 0:
            try:
                return rows.view(_INT_OF_SIZE[width])
            except RuntimeError:  # misaligned offset or row stride: try narrower words
                continue
    return rows


def message_region(
    buffer: torch.Tensor, view: torch.Tensor, offset: int, count: int
) -> torch.Tensor:
    """``count`` slots shaped like ``view``'s (its bit view) inside a message buffer."""
    row = view.shape[1:]
    nbytes = count * math.prod(row) * view.element_size()
    return buffer.narrow(0, offset, nbytes).view(view.dtype).view(count, *row)


@dataclass
class CopyBatch:
    """Copies issued together: ``destinations[i] <- sources[i]`` (slot-sized views).

    Kept per dtype (one ``add`` is one tensor of one layer, so one dtype), so
    that issuing them is one ``_foreach_copy_`` per dtype with no per-pair work.
    """

    phase: str  # for profiling: pack, local copies, unpack, post copies
    pairs: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(
        default_factory=dict
    )

    def add(self, destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
        """Queue copies that share one dtype (one tensor of one layer)."""
        if destinations:
            into, out_of = self.pairs.setdefault(destinations[0].dtype, ([], []))
            into.extend(destinations)
            out_of.extend(sources)
            if len(into) != len(out_of):
                raise AssertionError("copy lists differ in length")  # a bug, never bad input


def copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copy a whole list at once: a few fused kernels on CUDA, one memcpy per pair on the CPU.

    Index kernels (index_select / index_copy_) were slower: on the CPU up to
    100x for wide rows. (A Triton copy kernel on half the SMs overlapped better
    with NCCL in isolation, benchmarks/probe_overlap.py, but laying out its
    address tables on the host cost more than it saved here.)
    """
    copy_all = getattr(torch, "_foreach_copy_", None)  # torch >= 2.2
    if copy_all is not None:
        copy_all(destinations, sources)
        return
    for destination, source in zip(destinations, sources, strict=True):  # pragma: no cover
        destination.copy_(source)


class SlotViews:
    """``views[layer][tensor]`` split into one view per slot, made once per tensor."""

    def __init__(self, views: list[list[torch.Tensor]]) -> None:
        self._views = views
        self._split: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def __call__(self, layer: int, tensor: int, slots: list[int]) -> list[torch.Tensor]:
        """The views of the given local slots of one tensor of one layer."""
        split = self.rows(layer, tensor)
        return [split[s] for s in slots]

    def rows(self, layer: int, tensor: int) -> tuple[torch.Tensor, ...]:
        """The views of every local slot of one tensor of one layer."""
        key = (layer, tensor)
        split = self._split.get(key)
        if split is None:
            split = self._split[key] = self._views[layer][tensor].unbind(0)
        return split

    def whole(self, layer: int, tensor: int) -> torch.Tensor:
        """The bit view of one tensor of one layer, all its slots."""
        return self._views[layer][tensor]

    @property
    def num_layers(self) -> int:
        return len(self._views)

    def count(self, layer: int) -> int:
        """Tensors per layer."""
        return len(self._views[layer])

    def region_rows(
        self, buffer: torch.Tensor, layer: int, tensor: int, offset: int, count: int
    ) -> tuple[torch.Tensor, ...]:
        """The rows of one region of ``buffer``, each shaped like one slot."""
        return message_region(buffer, self._views[layer][tensor], offset, count).unbind(0)


def _pack_sources(step: Step, slots: SlotViews) -> list[list[torch.Tensor]]:
    """The slot views each of the step's message parts packs, in order."""
    return [
        slots(layer, tensor, mine)
        for message in step.sends
        for layer, tensor, _, mine in message.parts
    ]


def _unpack_destinations(step: Step, slots: SlotViews) -> list[list[torch.Tensor]]:
    """The slot views each of the step's unpacks writes, in order."""
    return [slots(part.layer, part.tensor, part.slots) for part in step.unpacks]


def _local_batches(
    step: Step,
    slots: SlotViews,
    into: SlotViews,
    staging: dict[int, list[tuple[torch.Tensor, ...]]],
) -> list[CopyBatch]:
    """The step's local copies: staging of cycle-breaking slots, then wave by wave.

    Local copies go wave by wave (a wave writes only slots earlier waves have
    read); a layer's first group first stages its cycle-breaking slots. Layers
    share no memory, so the i-th waves of all layers go in one batch: as many
    launches as the deepest layer has waves, not their sum.
    """
    stage = CopyBatch("local copies")
    waves: list[CopyBatch] = []
    for group in step.local:
        layer, tensors = group.layer, range(slots.count(group.layer))
        rows = staging.get(layer, [() for _ in tensors])
        if group.stages and group.staged:
            for tensor in tensors:
                stage.add(rows[tensor], slots(layer, tensor, group.staged))
        for i, wave in enumerate(group.waves):
            if i == len(waves):
                waves.append(CopyBatch("local copies"))
            dsts = [dst for _, dst in wave]
            srcs = [src for src, _ in wave]
            for tensor in tensors:
                split, staged = slots.rows(layer, tensor), rows[tensor]
                written = into.rows(layer, tensor)
                waves[i].add(
                    [written[d] for d in dsts],
                    [staged[-1 - s] if s < 0 else split[s] for s in srcs],
                )
    return [stage, *waves]


def _post_batch(step: Step, slots: SlotViews) -> CopyBatch:
    """Copies into second slots of experts this step received (from their first slot)."""
    post = CopyBatch("post copies")
    for layer, filled, targets in step.post:
        for tensor in range(slots.count(layer)):
            post.add(slots(layer, tensor, targets), slots(layer, tensor, filled))
    return post


class SlotWork:
    """The slot side of every step's copies: views of the weights' slots.

    Each step's pack sources, local copies, unpack destinations and post
    copies touch slots only. Made ahead (``prepare_rearrangement``,
    ``ahead=True``), it lays them all out at once, off the call's path;
    otherwise each is laid out when the executor first asks for it
    (:meth:`pack_sources`, :meth:`writes`), just before its step is launched.
    Either way the executor gets them from here, through one path. Views of
    the weights, never their data: making them reads and writes nothing.
    """

    def __init__(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        steps: list[Step],
        ahead: bool,
        into: Sequence[Sequence[torch.Tensor]] | None = None,
    ) -> None:
        self._weights = [list(layer) for layer in expert_weights]
        self._into = None if into is None else [list(layer) for layer in into]
        # Checked by made_from, which only prepared moves use.
        self._meta = _tensor_meta(self._weights, self._into) if ahead else []
        self.slots = SlotViews([[bit_view(t) for t in layer] for layer in self._weights])
        #: Where writes go: the weights themselves, or ``into`` (tensors of the
        #: same shapes and dtypes, e.g. a staging copy committed later; only the
        #: slots that change are written there).
        self.into = (
            self.slots
            if into is None
            else SlotViews([[bit_view(t) for t in layer] for layer in into])
        )
        count = len(steps)
        self.pack: list[list[list[torch.Tensor]] | None] = [None] * count
        self.local: list[list[CopyBatch] | None] = [None] * count
        self.unpack: list[list[list[torch.Tensor]] | None] = [None] * count
        self.post: list[CopyBatch | None] = [None] * count
        self._steps = steps
        if not ahead:
            return
        for k, step in enumerate(steps):
            self.pack[k] = _pack_sources(step, self.slots)
            # Staging rows are allocated per call: a step copying through them
            # lays out its local copies in the call.
            if not any(group.staged for group in step.local):
                self.local[k] = _local_batches(step, self.slots, self.into, {})
            self.unpack[k] = _unpack_destinations(step, self.into)
            self.post[k] = _post_batch(step, self.into)

    def pack_sources(self, k: int) -> list[list[torch.Tensor]]:
        """The slot views step k's message parts pack, in order."""
        sources = self.pack[k]
        if sources is None:
            sources = self.pack[k] = _pack_sources(self._steps[k], self.slots)
        return sources

    def writes(
        self, k: int, staging: dict[int, list[tuple[torch.Tensor, ...]]]
    ) -> tuple[list[CopyBatch], list[list[torch.Tensor]], CopyBatch]:
        """Step k's local copies, unpack destinations and post copies (see ``_write_batches``).

        staging: the call's staging rows, per layer with staged slots.
        """
        step = self._steps[k]
        local = self.local[k]
        if local is None:  # staging rows are the call's own: never kept
            local = _local_batches(step, self.slots, self.into, staging)
        unpack = self.unpack[k]
        if unpack is None:
            unpack = self.unpack[k] = _unpack_destinations(step, self.into)
        post = self.post[k]
        if post is None:
            post = self.post[k] = _post_batch(step, self.into)
        return local, unpack, post

    def made_from(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        into: Sequence[Sequence[torch.Tensor]] | None = None,
    ) -> bool:
        """Whether ``expert_weights`` (and ``into``) are the very tensors this was made from,
        unchanged."""
        if not _same_tensors(expert_weights, self._weights):
            return False
        if (into is None) != (self._into is None):
            return False
        if into is not None and self._into is not None and not _same_tensors(into, self._into):
            return False
        return _tensor_meta(self._weights, self._into) == self._meta


def _same_tensors(given: Sequence[Sequence[torch.Tensor]], mine: list[list[torch.Tensor]]) -> bool:
    """Whether ``given`` holds the very tensor objects of ``mine``, layer by layer."""
    return len(given) == len(mine) and all(
        len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
        for a, b in zip(given, mine, strict=True)
    )


def _tensor_meta(
    weights: list[list[torch.Tensor]], into: list[list[torch.Tensor]] | None = None
) -> list[tuple[object, ...]]:
    """Where each tensor's memory is and how it is laid out (an in-place resize changes it)."""
    return [
        (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
        for layers in (weights, into or [])
        for layer in layers
        for t in layer
    ]
