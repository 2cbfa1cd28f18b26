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
"""

from __future__ import annotations

import hashlib
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

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
    """The per-layer tensor list as this module moves it: integer views, one slot each."""

    slot_shapes: tuple[tuple[int, ...], ...]  # shape of one slot of each tensor (int view)
    int_dtypes: tuple[torch.dtype, ...]
    slot_nbytes: tuple[int, ...]
    signature: str  # shapes and dtypes as given, for the cross-rank check
    device: torch.device | None

    def region(self, tensor: int, count: int) -> int:
        """Bytes one tensor's ``count`` slots take in a message, padded to _ALIGN."""
        return -(-count * self.slot_nbytes[tensor] // _ALIGN) * _ALIGN

    def message_bytes(self, counts: Sequence[int]) -> int:
        """Bytes of a message carrying ``counts[i]`` experts of the i-th layer it covers."""
        return sum(self.region(t, n) for n in counts for t in range(len(self.slot_nbytes)))


class _IndexPool:
    """Slot indices of the whole call, gathered on the host, sent to the device in one copy."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._size = 0
        self._on_device = torch.zeros(0, dtype=torch.int64)

    def add(self, slots: np.ndarray) -> slice:
        self._chunks.append(slots)
        self._size += slots.size
        return slice(self._size - slots.size, self._size)

    def upload(self, device: torch.device) -> None:
        if self._chunks:
            self._on_device = torch.from_numpy(np.concatenate(self._chunks)).to(device)

    def __getitem__(self, where: slice) -> torch.Tensor:
        return self._on_device[where]


@dataclass
class _Message:
    """One message to or from a peer (group rank) and where its bytes go.

    parts: (layer, tensor, byte offset, local slots) per region, in message order.
    """

    peer: int
    nbytes: int
    experts: int
    parts: list[tuple[int, int, int, slice]]


@dataclass
class _Batch:
    """This rank's share of one batch of layers. Copies: (layer, src slots, dst slots)."""

    layers: range
    sends: list[_Message]
    recvs: list[_Message]
    local: list[tuple[int, slice, slice]]
    post: list[tuple[int, slice, slice]]


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
    pool = _IndexPool()
    batches = _program(plan, layout, rank, max_batch_bytes, pool)
    pool.upload(device)
    with torch.no_grad(), _on_device(device):
        views = [[_int_view(t) for t in layer] for layer in expert_weights]
        _run(batches, views, layout, pool, group, rank)
    return RearrangeStats(
        bytes_sent=sum(m.nbytes for b in batches for m in b.sends),
        bytes_received=sum(m.nbytes for b in batches for m in b.recvs),
        experts_sent=sum(m.experts for b in batches for m in b.sends),
        experts_received=sum(m.experts for b in batches for m in b.recvs),
        local_copies=sum(_count(c) for b in batches for c in (*b.local, *b.post)),
        messages_sent=sum(len(b.sends) for b in batches),
        messages_received=sum(len(b.recvs) for b in batches),
        batches=len(batches),
        seconds=time.perf_counter() - start,
    )


def _count(copy: tuple[int, slice, slice]) -> int:
    return copy[2].stop - copy[2].start


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


def _int_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width (complex: as pairs of them)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.view(_INT_OF_SIZE[tensor.element_size()])


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
                _int_view(tensor)
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
    int_views = [
        _int_view(torch.empty(shape, dtype=dtype, device="meta")) for shape, dtype in template
    ]
    return _Layout(
        slot_shapes=tuple(tuple(v.shape[1:]) for v in int_views),
        int_dtypes=tuple(v.dtype for v in int_views),
        slot_nbytes=tuple(v[0].numel() * v.element_size() for v in int_views),
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


def _program(
    plan: RearrangePlan, layout: _Layout, rank: int, max_batch_bytes: int, pool: _IndexPool
) -> list[_Batch]:
    """This rank's batches: its messages with their byte layout, its local and post copies."""
    per_rank = plan.slots_per_rank
    base = rank * per_rank
    bounds = batch_layers(plan.staging_slots() * sum(layout.slot_nbytes), max_batch_bytes)
    sends = plan.transfers[plan.transfers[:, 2] == rank]
    recvs = plan.transfers[plan.transfers[:, 4] == rank]
    local = plan.local_copies[plan.local_copies[:, 2] // per_rank == rank]
    post = plan.post_copies[plan.post_copies[:, 2] // per_rank == rank]
    batches = []
    for lo, hi in bounds:

        def rows_of(table: np.ndarray, lo: int = lo, hi: int = hi) -> np.ndarray:
            return table[(table[:, 0] >= lo) & (table[:, 0] < hi)]

        batches.append(
            _Batch(
                layers=range(lo, hi),
                sends=_messages(rows_of(sends), 4, 3, base, layout, pool),
                recvs=_messages(rows_of(recvs), 2, 5, base, layout, pool),
                local=_copies(rows_of(local), base, pool),
                post=_copies(rows_of(post), base, pool),
            )
        )
    return batches


def _messages(
    rows: np.ndarray,
    peer_column: int,
    slot_column: int,
    base: int,
    layout: _Layout,
    pool: _IndexPool,
) -> list[_Message]:
    """One message per peer from plan rows (sorted by layer, then expert, per peer).

    A message holds, layer by layer and tensor by tensor, one region of that
    tensor's slots for the layer's experts, in plan order: both sides lay it out alike.
    """
    found = []
    for peer in np.unique(rows[:, peer_column]):
        mine = rows[rows[:, peer_column] == peer]
        parts = []
        position = 0
        for layer in np.unique(mine[:, 0]):
            slots = pool.add(mine[mine[:, 0] == layer, slot_column] - base)
            count = slots.stop - slots.start
            for tensor in range(len(layout.slot_nbytes)):
                parts.append((int(layer), tensor, position, slots))
                position += layout.region(tensor, count)
        if position:  # all tensors empty: nothing to ship
            found.append(_Message(int(peer), position, len(mine), parts))
    return found


def _copies(rows: np.ndarray, base: int, pool: _IndexPool) -> list[tuple[int, slice, slice]]:
    """Per layer: (layer, source local slots, destination local slots)."""
    return [
        (
            int(layer),
            pool.add(rows[rows[:, 0] == layer, 1] - base),
            pool.add(rows[rows[:, 0] == layer, 2] - base),
        )
        for layer in np.unique(rows[:, 0])
    ]


def _region(
    buffer: torch.Tensor, layout: _Layout, tensor: int, offset: int, count: int
) -> torch.Tensor:
    """``count`` slots of one tensor inside a message buffer, as that tensor's integer view."""
    nbytes = count * layout.slot_nbytes[tensor]
    return (
        buffer[offset : offset + nbytes]
        .view(layout.int_dtypes[tensor])
        .view(count, *layout.slot_shapes[tensor])
    )


def _run(
    batches: list[_Batch],
    views: list[list[torch.Tensor]],
    layout: _Layout,
    pool: _IndexPool,
    group: dist.ProcessGroup | None,
    rank: int,
) -> None:
    """Move every batch, packing and sending batch k+1 while batch k is unpacked."""
    touched: set[int] = set()
    pending: tuple[_Batch, list, list[torch.Tensor], list[torch.Tensor]] | None = None
    try:
        for batch in batches:
            started = _start(batch, views, layout, pool, group, touched)
            if pending is not None:
                _finish(*pending, views, layout, pool, touched)
            pending = started
        if pending is not None:
            _finish(*pending, views, layout, pool, touched)
    except Exception as exc:
        changed = sorted(touched)
        unchanged = sorted(set(range(len(views))) - touched)
        raise RuntimeError(
            f"rearrange_expert_weights failed on rank {rank}: {type(exc).__name__}: {exc}. "
            f"Layers {changed} of this rank may already hold new weights (some only partly); "
            f"layers {unchanged} are unchanged. The weights no longer match either "
            "placement: reload them or rerun the rearrangement from the old placement"
        ) from exc


def _start(
    batch: _Batch,
    views: list[list[torch.Tensor]],
    layout: _Layout,
    pool: _IndexPool,
    group: dist.ProcessGroup | None,
    touched: set[int],
) -> tuple[_Batch, list, list[torch.Tensor], list[torch.Tensor]]:
    """Pack and stage the batch's reads, start its messages, then write its local copies.

    Every read of the batch's old weights (packing, local staging) is issued
    before its first write, so nothing is overwritten before it is sent.
    """
    device = layout.device
    send_buffers = []
    for message in batch.sends:
        buffer = torch.empty(message.nbytes, dtype=torch.uint8, device=device)
        for layer, tensor, offset, slots in message.parts:
            out = _region(buffer, layout, tensor, offset, slots.stop - slots.start)
            torch.index_select(views[layer][tensor], 0, pool[slots], out=out)
        send_buffers.append(buffer)
    staged = [
        (layer, [view.index_select(0, pool[src]) for view in views[layer]], dst)
        for layer, src, dst in batch.local
    ]
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
    for layer, sources, dst in staged:
        touched.add(layer)
        for view, source in zip(views[layer], sources, strict=True):
            view.index_copy_(0, pool[dst], source)
    return batch, works, send_buffers, recv_buffers


def _finish(
    batch: _Batch,
    works: list,
    send_buffers: list[torch.Tensor],
    recv_buffers: list[torch.Tensor],
    views: list[list[torch.Tensor]],
    layout: _Layout,
    pool: _IndexPool,
    touched: set[int],
) -> None:
    """Wait for the batch's messages, write what arrived, then the post copies."""
    for work in works:
        work.wait()
    del send_buffers  # free to reuse once sent (stream-ordered on CUDA)
    for message, buffer in zip(batch.recvs, recv_buffers, strict=True):
        for layer, tensor, offset, slots in message.parts:
            touched.add(layer)
            region = _region(buffer, layout, tensor, offset, slots.stop - slots.start)
            views[layer][tensor].index_copy_(0, pool[slots], region)
    for layer, src, dst in batch.post:
        touched.add(layer)
        for view in views[layer]:
            view.index_copy_(0, pool[dst], view.index_select(0, pool[src]))


def _global_rank(group: dist.ProcessGroup | None, peer: int) -> int:
    """P2POp wants global ranks on every torch version this supports."""
    if group is None or group is dist.GroupMember.WORLD:
        return peer
    return dist.get_global_rank(group, peer)
