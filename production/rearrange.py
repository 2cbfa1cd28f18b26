"""Move expert weights between EP ranks after a new placement, exactly and in few messages.

:func:`rearrange_expert_weights` rewrites every rank's expert slots in place so
that each slot holds, bit for bit, the weights of its new expert.

How it keeps the link busy and the result exact:

- Both maps come to the host in one copy, before any layer is processed; every
  rank derives the same plan from them (:func:`plan_rearrangement`, pure numpy).
  One small all-reduce checks that every rank accepted its input and holds the
  same maps, so a bad call raises everywhere instead of hanging or corrupting.
- An expert already on a rank is copied locally, never received; an expert a
  rank needs in several slots is received once; senders are spread over the
  ranks holding a replica.
- Layers go in batches under a memory budget. Per batch, everything going to one
  peer is packed (all layers, experts and tensors, as raw bytes) into one
  contiguous buffer: one message per peer and direction, all issued in one
  ``batch_isend_irecv``. Packing and local-copy staging read the batch's layers
  before any of its slots is written, so nothing is overwritten before it is sent.
- Batches overlap: batch k+1 is packed and sent while batch k is unpacked.
  Layers never share memory, so this is safe; at most two batches are in flight.
- Bits move through integer views (8-byte words where a slot is one dense
  block), so every dtype ships exactly; slot copies are issued as lists through
  ``torch._foreach_copy_`` (fused kernels on CUDA, memcpy on the CPU).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ._rearrange_plan import RearrangePlan, batch_layers, check_maps, plan_rearrangement

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "RearrangePlan",
    "RearrangeStats",
    "batch_layers",
    "plan_rearrangement",
    "rearrange_expert_weights",
]

#: Default staging budget of one batch of layers on one rank: 1 GiB.
DEFAULT_MAX_BATCH_BYTES = 1 << 30

# Regions inside a message start at multiples of this, so that each can be viewed
# as its tensor's dtype (view(dtype) needs an aligned offset) with aligned loads.
_ALIGN = 64

# Bits are moved through same-sized integer views: every dtype (bfloat16, float8,
# bool...) then ships and copies exactly, including kernels not defined for it.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class RearrangeStats:
    """What one rank did in one call of :func:`rearrange_expert_weights`.

    bytes_sent, bytes_received: message bytes over the network (payload plus
        at most 63 bytes of alignment per layer, tensor and message).
    experts_sent, experts_received: (layer, expert) weights sent / received.
    local_copies: slots filled from another slot of this rank (an expert it
        already held, or a second slot of an expert it received).
    messages_sent, messages_received: point-to-point messages.
    batches: batches of layers (one ``batch_isend_irecv`` each, where any).
    seconds: host wall time of the call. On CUDA the last copies may still be
        running on the current stream when it returns; work queued later on that
        stream sees the new weights (call ``torch.cuda.synchronize()`` to time it).
    """

    bytes_sent: int
    bytes_received: int
    experts_sent: int
    experts_received: int
    local_copies: int
    messages_sent: int
    messages_received: int
    batches: int
    seconds: float


@dataclass(frozen=True)
class _Layout:
    """What every layer's tensor list looks like: bytes per slot of each tensor, and where."""

    slot_nbytes: tuple[int, ...]
    signature: str  # shapes and dtypes as given, for the cross-rank check
    device: torch.device | None

    def region(self, tensor: int, count: int) -> int:
        """Bytes one tensor's ``count`` slots take in a message, padded to _ALIGN."""
        return -(-count * self.slot_nbytes[tensor] // _ALIGN) * _ALIGN


@dataclass
class _Message:
    """One message to or from a peer (group rank), or the local staging buffer of a batch.

    parts: (layer, tensor, byte offset, local slots) per region, in message order:
        the region holds that tensor's slots of those slots, one after another.
    targets: for local staging only, per part the local slots its rows go to.
    """

    peer: int
    nbytes: int
    experts: int
    parts: list[tuple[int, int, int, list[int]]]
    targets: list[list[int]] = field(default_factory=list)


@dataclass
class _Batch:
    """This rank's share of one batch of layers."""

    layers: range
    sends: list[_Message]
    recvs: list[_Message]
    local: _Message  # staged local copies: sources in parts, destinations in targets
    post: list[tuple[int, list[int], list[int]]]  # (layer, source slots, destination slots)


def rearrange_expert_weights(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    group: dist.ProcessGroup | None = None,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> RearrangeStats:
    """Rewrite this rank's expert slots in place for a new placement (collective).

    old_phy2log: [layers, R] int (any device), the expert each slot holds now.
    new_phy2log: [layers, R] int (any device), the expert each slot must hold.
        Both the same on every rank; every id in ``new_phy2log[l]`` must occur in
        ``old_phy2log[l]`` (else no rank can provide it). Ids are >= 0.
    expert_weights: per layer, this rank's weight tensors of that layer, each
        ``[R / world_size, ...]``: rank r holds slots r*R/P .. (r+1)*R/P - 1.
        Any dtypes, shapes and strides, the same list of shapes and dtypes in
        every layer and on every rank, all on one device; tensors of different
        layers must not share memory. Replicas of an expert hold the same weights.
    group: the EP process group (default: the world; none needed for one rank).
        NCCL for CUDA tensors, gloo for CPU tensors.
    max_batch_bytes: staging memory one batch of layers may use on one rank
        (send, receive and local-copy buffers); default 1 GiB. Two batches can be
        in flight, so the extra memory peaks near twice this, or at one layer's
        need when a single layer needs more (a layer is never split).

    After the call, slot s of layer l holds bit for bit what expert
    ``new_phy2log[l, s]`` held before. Every rank must call it.

    Raises TypeError/ValueError on bad input, on every rank and before any weight
    is touched. A failure while moving raises RuntimeError naming the layers this
    rank had already (possibly partly) rewritten.
    """
    start = time.perf_counter()
    rank, world_size = _rank_and_size(group)
    error: Exception | None = None
    digest = 0
    layout: _Layout | None = None
    device = torch.device("cpu")
    try:
        old, new = _maps_to_host(old_phy2log, new_phy2log)
        layout = _check_weights(expert_weights, old.shape, world_size)
        device = layout.device or device
        if isinstance(max_batch_bytes, bool) or not isinstance(max_batch_bytes, numbers.Integral):
            raise TypeError(f"max_batch_bytes must be an int, got {type(max_batch_bytes).__name__}")
        if max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes}")
        plan = plan_rearrangement(old, new, world_size)
        digest = _digest(old, new, layout.signature, world_size)
    except (TypeError, ValueError) as exc:
        error = exc
    if world_size > 1:
        _agree(group, rank, world_size, error, digest, _collective_device(group, device))
    if error is not None:
        raise error
    assert layout is not None
    batches = _program(plan, layout, rank, max_batch_bytes)
    with torch.no_grad(), _on_device(device):
        views = [[_bit_view(t) for t in layer] for layer in expert_weights]
        _run(batches, views, device, group, rank)
    return RearrangeStats(
        bytes_sent=sum(m.nbytes for b in batches for m in b.sends),
        bytes_received=sum(m.nbytes for b in batches for m in b.recvs),
        experts_sent=sum(m.experts for b in batches for m in b.sends),
        experts_received=sum(m.experts for b in batches for m in b.recvs),
        local_copies=sum(b.local.experts + sum(len(t) for _, _, t in b.post) for b in batches),
        messages_sent=sum(len(b.sends) for b in batches),
        messages_received=sum(len(b.recvs) for b in batches),
        batches=len(batches),
        seconds=time.perf_counter() - start,
    )


def _rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return rank, dist.get_world_size(group)


def _maps_to_host(old_phy2log: object, new_phy2log: object) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as host int64 arrays, in one device-to-host copy where both are on a device."""
    for name, phy2log in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log)):
        if not isinstance(phy2log, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"{name} must be a torch.Tensor (or numpy.ndarray), got {type(phy2log).__name__}"
            )
        if isinstance(phy2log, torch.Tensor) and (
            phy2log.is_floating_point() or phy2log.is_complex() or phy2log.dtype == torch.bool
        ):
            raise TypeError(f"{name} must hold integers, got dtype {phy2log.dtype}")
    if (
        isinstance(old_phy2log, torch.Tensor)
        and isinstance(new_phy2log, torch.Tensor)
        and old_phy2log.device == new_phy2log.device
        and old_phy2log.device.type != "cpu"
        and old_phy2log.shape == new_phy2log.shape
    ):
        both = torch.stack((old_phy2log.to(torch.int64), new_phy2log.to(torch.int64))).cpu()
        return both[0].numpy(), both[1].numpy()
    old = old_phy2log.detach().cpu() if isinstance(old_phy2log, torch.Tensor) else old_phy2log
    new = new_phy2log.detach().cpu() if isinstance(new_phy2log, torch.Tensor) else new_phy2log
    return check_maps(old, new, 1)


def _bit_view(tensor: torch.Tensor) -> torch.Tensor:
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


def _check_weights(expert_weights: object, map_shape: tuple[int, ...], world_size: int) -> _Layout:
    """Validate ``expert_weights`` against the maps' shape and the world size."""
    if isinstance(expert_weights, torch.Tensor) or not isinstance(expert_weights, Sequence):
        raise TypeError(
            "expert_weights must be a list (per layer) of lists of tensors, got "
            f"{type(expert_weights).__name__}"
        )
    num_layers, num_slots = (int(d) for d in map_shape)
    if len(expert_weights) != num_layers:
        raise ValueError(
            f"expert_weights must have one entry per layer of the maps: got {len(expert_weights)} "
            f"layers, the maps have {num_layers}"
        )
    if num_slots % world_size:
        raise ValueError(
            f"the group size must divide the number of slots: R={num_slots} % world_size="
            f"{world_size} != 0"
        )
    per_rank = num_slots // world_size
    template: list[tuple[tuple[int, ...], torch.dtype]] | None = None
    device: torch.device | None = None
    for layer, tensors in enumerate(expert_weights):
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
            raise TypeError(
                f"expert_weights[{layer}] must be a list of tensors, got {type(tensors).__name__}"
            )
        signature = []
        for index, tensor in enumerate(tensors):
            where = f"expert_weights[{layer}][{index}]"
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{where} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() < 1 or tensor.shape[0] != per_rank:
                raise ValueError(
                    f"{where} must have first dimension R / world_size = {num_slots} / "
                    f"{world_size} = {per_rank}, got shape {tuple(tensor.shape)}"
                )
            device = device or tensor.device
            if tensor.device != device:
                raise ValueError(
                    f"all expert weights must be on one device: {where} is on {tensor.device}, "
                    f"expert_weights[0][0] on {device}"
                )
            try:
                _bit_view(tensor)
            except (KeyError, RuntimeError) as exc:
                raise TypeError(
                    f"{where} has dtype {tensor.dtype}, which cannot be moved as bits"
                ) from exc
            signature.append((tuple(tensor.shape), tensor.dtype))
        if template is None:
            template = signature
        elif signature != template:
            raise ValueError(
                f"every layer must hold the same list of tensor shapes and dtypes: expert_weights"
                f"[{layer}] has {_describe(signature)}, expert_weights[0] has {_describe(template)}"
            )
    template = template or []
    return _Layout(
        slot_nbytes=tuple(
            math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
            for shape, dtype in template
        ),
        signature=_describe(template),
        device=device,
    )


def _describe(signature: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
    return "[" + ", ".join(f"{dtype} {list(shape)}" for shape, dtype in signature) + "]"


def _digest(old: np.ndarray, new: np.ndarray, signature: str, world_size: int) -> int:
    """A 62-bit fingerprint of everything the plan and the message sizes depend on."""
    h = hashlib.blake2b(digest_size=8)
    for part in (old.shape, world_size, signature):
        h.update(repr(part).encode())
    h.update(old.tobytes())
    h.update(new.tobytes())
    return int.from_bytes(h.digest(), "little") >> 2


def _collective_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where the agreement all-reduce's tensor must live for this group's backend."""
    if device.type != "cpu" or "nccl" not in str(dist.get_backend(group)):
        return device
    return torch.device("cuda", torch.cuda.current_device())


def _agree(
    group: dist.ProcessGroup | None,
    rank: int,
    world_size: int,
    error: Exception | None,
    digest: int,
    device: torch.device,
) -> None:
    """Raise on every rank if any rank refused its input or the ranks' inputs differ.

    One all-reduce (max) of [refused flag per rank, fingerprint, -fingerprint]:
    equal fingerprints have max == -max(-x). Refusing only locally would leave
    the other ranks waiting for messages that never come.
    """
    flags = torch.zeros(world_size + 2, dtype=torch.int64)
    flags[rank] = error is not None
    flags[world_size] = digest
    flags[world_size + 1] = -digest
    flags = flags.to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    reduced = flags.cpu().tolist()
    if error is not None:
        return  # the caller raises this rank's own error
    refused = [r for r in range(world_size) if reduced[r]]
    if refused:
        raise ValueError(
            f"rank(s) {refused} of the group refused their input (see their error); "
            "no weights were changed"
        )
    if reduced[world_size] != -reduced[world_size + 1]:
        raise ValueError(
            "old_phy2log, new_phy2log and the shapes and dtypes of expert_weights must be "
            "the same on every rank of the group; they differ. No weights were changed"
        )


class _on_device:
    """Make ``device`` current while moving (NCCL hangs if another device is current)."""

    def __init__(self, device: torch.device) -> None:
        self._inner = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self) -> None:
        if self._inner is not None:
            self._inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._inner is not None:
            self._inner.__exit__(*exc)


def _program(plan: RearrangePlan, layout: _Layout, rank: int, max_batch_bytes: int) -> list[_Batch]:
    """This rank's batches: its messages with their byte layout, its local and post copies.

    Slots are local here (0 .. R/P - 1).
    """
    per_rank = plan.slots_per_rank
    base = rank * per_rank
    bounds = batch_layers(plan.staging_slots() * sum(layout.slot_nbytes), max_batch_bytes)
    t = plan.transfers
    # (layer, peer, local slot) per expert sent / received, and (layer, src, dst) per copy.
    sends = np.stack([t[:, 0], t[:, 4], t[:, 3] - base], axis=1)[t[:, 2] == rank]
    recvs = np.stack([t[:, 0], t[:, 2], t[:, 5] - base], axis=1)[t[:, 4] == rank]
    local = plan.local_copies[plan.local_copies[:, 2] // per_rank == rank] - [0, base, base]
    post = plan.post_copies[plan.post_copies[:, 2] // per_rank == rank] - [0, base, base]
    batches = []
    for lo, hi in bounds:
        sent, received, copied, posted = (
            table[(table[:, 0] >= lo) & (table[:, 0] < hi)] for table in (sends, recvs, local, post)
        )
        staging = _layout_message(-1, copied[:, 0], copied[:, 1], layout)
        # Same layout over the destinations: part i's rows go to these slots.
        destinations = _layout_message(-1, copied[:, 0], copied[:, 2], layout)
        staging.targets = [targets for _, _, _, targets in destinations.parts]
        batches.append(
            _Batch(
                layers=range(lo, hi),
                sends=_messages(sent, layout),
                recvs=_messages(received, layout),
                local=staging,
                post=[
                    (int(layer), *(posted[posted[:, 0] == layer, 1:].T.tolist()))
                    for layer in np.unique(posted[:, 0])
                ],
            )
        )
    return batches


def _messages(rows: np.ndarray, layout: _Layout) -> list[_Message]:
    """One message per peer from (layer, peer, local slot) rows in plan order."""
    rows = rows[np.argsort(rows[:, 1], kind="stable")]  # by peer; (layer, expert) order kept
    cuts = np.flatnonzero(np.diff(rows[:, 1])) + 1
    found = []
    for mine in np.split(rows, cuts) if rows.size else []:
        message = _layout_message(int(mine[0, 1]), mine[:, 0], mine[:, 2], layout)
        if message.nbytes:  # all tensors empty: nothing to ship
            found.append(message)
    return found


def _layout_message(peer: int, layers: np.ndarray, slots: np.ndarray, layout: _Layout) -> _Message:
    """Lay out the given (layer, local slot) experts: layer by layer, tensor by tensor.

    layers, slots: [experts] int, in message order (layers ascending). Both sides
    of a message call this with the same layers in the same order.
    """
    parts = []
    position = 0
    cuts = np.flatnonzero(np.diff(layers)) + 1
    for layer, mine in zip(
        layers[np.concatenate(([0], cuts))].tolist() if layers.size else [],
        np.split(slots, cuts) if layers.size else [],
        strict=True,
    ):
        mine_list = mine.tolist()
        for tensor in range(len(layout.slot_nbytes)):
            parts.append((layer, tensor, position, mine_list))
            position += layout.region(tensor, len(mine_list))
    return _Message(peer, position, len(slots), parts)


def _region(buffer: torch.Tensor, view: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """``count`` slots shaped like ``view``'s (its bit view) inside a message buffer."""
    nbytes = count * view[0].numel() * view.element_size()
    return buffer[offset : offset + nbytes].view(view.dtype).view(count, *view.shape[1:])


class _Copies:
    """Slot-to-slot copies, queued and then issued in as few launches as possible.

    ``torch._foreach_copy_`` copies a whole list at once: on CUDA a few fused
    kernels for all same-dtype dense pairs, on the CPU one memcpy per pair without
    Python in between. Index kernels (index_select / index_copy_) were slower:
    on the CPU up to 100x for wide rows.
    """

    def __init__(self) -> None:
        self._pairs: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def add(self, destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
        """Queue ``destinations[i] <- sources[i]``; all of one call share one dtype."""
        if len(destinations) != len(sources):
            raise AssertionError("copy lists differ in length")  # a bug, never bad input
        if destinations:
            into, out_of = self._pairs.setdefault(destinations[0].dtype, ([], []))
            into.extend(destinations)
            out_of.extend(sources)

    def run(self) -> None:
        for destinations, sources in self._pairs.values():
            _foreach_copy(destinations, sources)
        self._pairs.clear()


def _foreach_copy(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    copy_all = getattr(torch, "_foreach_copy_", None)  # torch >= 2.2
    if copy_all is not None:
        copy_all(destinations, sources)
        return
    for destination, source in zip(destinations, sources, strict=True):  # pragma: no cover
        destination.copy_(source)


class _SlotViews:
    """``views[layer][tensor]`` split into one view per slot, made once per tensor."""

    def __init__(self, views: list[list[torch.Tensor]]) -> None:
        self._views = views
        self._split: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def __call__(self, layer: int, tensor: int, slots: list[int]) -> list[torch.Tensor]:
        """The views of the given local slots of one tensor of one layer."""
        key = (layer, tensor)
        if key not in self._split:
            self._split[key] = self._views[layer][tensor].unbind(0)
        split = self._split[key]
        return [split[s] for s in slots]

    def count(self, layer: int) -> int:
        """Tensors per layer."""
        return len(self._views[layer])

    def region_rows(
        self, buffer: torch.Tensor, layer: int, tensor: int, offset: int, count: int
    ) -> tuple[torch.Tensor, ...]:
        """The rows of one region of ``buffer``, each shaped like one slot."""
        return _region(buffer, self._views[layer][tensor], offset, count).unbind(0)


def _run(
    batches: list[_Batch],
    views: list[list[torch.Tensor]],
    device: torch.device,
    group: dist.ProcessGroup | None,
    rank: int,
) -> None:
    """Move every batch, packing and sending batch k+1 while batch k is unpacked."""
    touched: set[int] = set()
    slots = _SlotViews(views)
    pending: _InFlight | None = None
    try:
        for batch in batches:
            started = _start(batch, slots, device, group, touched)
            if pending is not None:
                _finish(pending, slots, touched)
            pending = started
        if pending is not None:
            _finish(pending, slots, touched)
    except Exception as exc:
        changed = sorted(touched)
        unchanged = sorted(set(range(len(views))) - touched)
        raise RuntimeError(
            f"rearrange_expert_weights failed on rank {rank}: {type(exc).__name__}: {exc}. "
            f"Layers {changed} of this rank may already hold new weights (some only partly); "
            f"layers {unchanged} are unchanged. The weights no longer match either "
            "placement: reload them or rerun the rearrangement from the old placement"
        ) from exc


@dataclass
class _InFlight:
    """A started batch: its messages in flight and the buffers they use."""

    batch: _Batch
    works: list
    send_buffers: list[torch.Tensor]
    recv_buffers: list[torch.Tensor]


def _start(
    batch: _Batch,
    slots: _SlotViews,
    device: torch.device,
    group: dist.ProcessGroup | None,
    touched: set[int],
) -> _InFlight:
    """Pack and stage the batch's reads, start its messages, then write its local copies.

    Every read of the batch's old weights (packing, local staging) is issued
    before its first write, so nothing is overwritten before it is sent.
    """
    reads = _Copies()
    send_buffers = []
    for message in batch.sends:
        buffer = torch.empty(message.nbytes, dtype=torch.uint8, device=device)
        for layer, tensor, offset, mine in message.parts:
            rows = slots.region_rows(buffer, layer, tensor, offset, len(mine))
            reads.add(rows, slots(layer, tensor, mine))
        send_buffers.append(buffer)
    writes = _Copies()
    staging = torch.empty(batch.local.nbytes, dtype=torch.uint8, device=device)
    for (layer, tensor, offset, mine), targets in zip(
        batch.local.parts, batch.local.targets, strict=True
    ):
        rows = slots.region_rows(staging, layer, tensor, offset, len(mine))
        reads.add(rows, slots(layer, tensor, mine))
        writes.add(slots(layer, tensor, targets), rows)
    reads.run()
    recv_buffers = [
        torch.empty(message.nbytes, dtype=torch.uint8, device=device) for message in batch.recvs
    ]
    ops = [
        dist.P2POp(dist.isend, buffer, _global_rank(group, message.peer), group)
        for message, buffer in zip(batch.sends, send_buffers, strict=True)
    ] + [
        dist.P2POp(dist.irecv, buffer, _global_rank(group, message.peer), group)
        for message, buffer in zip(batch.recvs, recv_buffers, strict=True)
    ]
    works = dist.batch_isend_irecv(ops) if ops else []
    touched.update(layer for layer, _, _, _ in batch.local.parts)
    writes.run()
    return _InFlight(batch, works, send_buffers, recv_buffers)


def _finish(flight: _InFlight, slots: _SlotViews, touched: set[int]) -> None:
    """Wait for the batch's messages, write what arrived, then the post copies."""
    for work in flight.works:
        work.wait()
    flight.send_buffers.clear()  # free to reuse once sent (stream-ordered on CUDA)
    writes = _Copies()
    for message, buffer in zip(flight.batch.recvs, flight.recv_buffers, strict=True):
        for layer, tensor, offset, mine in message.parts:
            touched.add(layer)
            rows = slots.region_rows(buffer, layer, tensor, offset, len(mine))
            writes.add(slots(layer, tensor, mine), rows)
    writes.run()
    for layer, sources, targets in flight.batch.post:
        touched.add(layer)
        for tensor in range(slots.count(layer)):
            writes.add(slots(layer, tensor, targets), slots(layer, tensor, sources))
    writes.run()


def _global_rank(group: dist.ProcessGroup | None, peer: int) -> int:
    """P2POp wants global ranks on every torch version this supports."""
    if group is None or group is dist.GroupMember.WORLD:
        return peer
    return dist.get_global_rank(group, peer)
