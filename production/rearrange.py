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

import contextlib
import hashlib
import math
import numbers
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

from ._rearrange_plan import (
    RearrangePlan,
    check_maps,
    local_waves,
    plan_rearrangement,
    split_steps,
)

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "RearrangePlan",
    "RearrangeStats",
    "plan_rearrangement",
    "rearrange_expert_weights",
    "warmup_rearrangement",
]

#: Default bytes one pipeline step may send plus receive on one rank: 1 GiB.
#: Measured on 2 H200s (bench_rearrange.py): 256 MiB steps left NCCL at about
#: half its one-message rate (DeepSeek-V3 3.2x the bound), 1 GiB gave 2.0x
#: (V2-Lite) and 2.6x (V3), 4 GiB 2.1x and 1.9-2.2x for ~8 GB more memory.
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
    batches: pipeline steps (one ``batch_isend_irecv`` each, where any).
    seconds: host wall time of the call. On CUDA the last copies may still be
        running on the current stream when it returns; work queued later on that
        stream sees the new weights (call ``torch.cuda.synchronize()`` to time it).
    phase_ms: with ``profile=True`` on CUDA, GPU milliseconds per phase (pack,
        exposed wire wait, local copies, unpack, post copies, total), summed over
        steps; phases on different streams overlap, so they add up to more than
        the total. Also ``plan (host)``. Empty otherwise.
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
    phase_ms: dict[str, float] = field(default_factory=dict)


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


def rearrange_expert_weights(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    group: dist.ProcessGroup | None = None,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    profile: bool = False,
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
    max_batch_bytes: bytes one pipeline step may send plus receive on one rank
        (default 1 GiB; a single expert may exceed it). Up to about three steps'
        buffers are alive at once; a large layer spans several steps. Local copies
        stage one slot per cycle of moves, no more.
    profile: record CUDA events per phase into ``phase_ms`` (one host sync at the
        end; for benchmarks).

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
    steps = _program(plan, layout, rank, max_batch_bytes)
    planned = time.perf_counter()
    with torch.no_grad(), _on_device(device):
        views = [[_bit_view(t) for t in layer] for layer in expert_weights]
        phases = _run(steps, views, device, group, rank, profile)
    if phases:
        phases["plan (host)"] = (planned - start) * 1e3
    return RearrangeStats(
        bytes_sent=sum(m.nbytes for b in steps for m in b.sends),
        bytes_received=sum(m.nbytes for b in steps for m in b.recvs),
        experts_sent=sum(m.experts for b in steps for m in b.sends),
        experts_received=sum(m.experts for b in steps for m in b.recvs),
        local_copies=sum(
            sum(len(w) for g in b.local for w in g.waves) + len(b.post) for b in steps
        ),
        messages_sent=sum(len(b.sends) for b in steps),
        messages_received=sum(len(b.recvs) for b in steps),
        batches=sum(1 for b in steps if b.sends or b.recvs),
        seconds=time.perf_counter() - start,
        phase_ms=phases,
    )


def warmup_rearrangement(
    group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
) -> float:
    """Open the point-to-point channels to every peer now, not in the first rearrangement.

    NCCL creates a pair's P2P channels lazily, on the first send/recv between
    them (about 0.3 s on H200s); a serving engine calls this once at start-up
    (collective: every rank of ``group`` must call it). Each rank sends one
    byte to and receives one from every peer in one ``batch_isend_irecv``.

    group: the EP process group (default: the world).
    device: where the bytes live (default: the current CUDA device for NCCL,
        else the CPU).

    Returns the seconds it took on this rank (0.0 for a single rank).
    """
    start = time.perf_counter()
    rank, world_size = _rank_and_size(group)
    if world_size == 1:
        return 0.0
    if device is None:
        device = _collective_device(group, torch.device("cpu"))
    device = torch.device(device)
    out = torch.zeros(world_size, dtype=torch.uint8, device=device)
    into = torch.empty(world_size, dtype=torch.uint8, device=device)
    ops = [
        dist.P2POp(op, buffer[peer : peer + 1], _global_rank(group, peer), group)
        for op, buffer in ((dist.isend, out), (dist.irecv, into))
        for peer in range(world_size)
        if peer != rank
    ]
    with _on_device(device):
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


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
    # On the pack stream, this exchange and the host's wait for it queue behind
    # nothing the serving stream holds (the forward pass in flight): the host
    # waits for a few bytes on the wire, not for the GPU to drain.
    with _Streams(device).use("pack"):
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


@dataclass
class _Unpack:
    """Rows of one received message part written to their slots at some step."""

    step: int  # the step whose receive buffer holds them
    message: int  # index in that step's recvs
    layer: int
    tensor: int
    offset: int
    count: int  # rows in the part
    rows: list[int]  # which rows of the part
    slots: list[int]  # their destination slots


@dataclass
class _LocalGroup:
    """One layer's local copies in a safe order: stage, then waves (see local_waves)."""

    layer: int
    staged: list[int]
    waves: list[list[tuple[int, int]]]


@dataclass
class _Step:
    """This rank's share of one pipeline step, and the writes issued at its end."""

    sends: list[_Message]
    recvs: list[_Message]
    local: list[_LocalGroup] = field(default_factory=list)
    unpacks: list[_Unpack] = field(default_factory=list)
    post: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def _program(plan: RearrangePlan, layout: _Layout, rank: int, max_step_bytes: int) -> list[_Step]:
    """This rank's steps: messages with their byte layout, and when each slot is written.

    A write to slot X is issued at the end of step s, after the packs of step
    s + 1 (the executor orders its streams so), so s >= (last step packing X) - 1;
    local copies of a layer run before unpacks and post copies that overwrite
    their sources. Slots are local here (0 .. R/P - 1).
    """
    per_rank = plan.slots_per_rank
    base = rank * per_rank
    order, step_of = split_steps(plan, sum(layout.slot_nbytes), max_step_bytes)
    t = plan.transfers[order]
    num_steps = int(step_of[-1]) + 1 if step_of.size else 1
    steps = [_Step([], []) for _ in range(num_steps)]
    last_pack: dict[tuple[int, int], int] = {}
    mine = t[:, 2] == rank
    for s, layer, slot in zip(
        step_of[mine].tolist(), t[mine, 0].tolist(), t[mine, 3].tolist(), strict=True
    ):
        last_pack[(layer, slot - base)] = s
    for s in range(num_steps):
        at = step_of == s
        sends = np.stack([t[at, 0], t[at, 4], t[at, 3] - base], axis=1)[t[at, 2] == rank]
        recvs = np.stack([t[at, 0], t[at, 2], t[at, 5] - base], axis=1)[t[at, 4] == rank]
        steps[s].sends = _messages(sends, layout)
        steps[s].recvs = _messages(recvs, layout)

    # No write of a layer before the first step moving anything of it (or of a
    # later layer): a failure then leaves later layers untouched.
    first_step = np.full(plan.num_layers + 1, num_steps - 1, dtype=np.int64)
    np.minimum.at(first_step, t[:, 0], step_of)
    first_step = np.minimum.accumulate(first_step[::-1])[::-1].tolist()

    def earliest(layer: int, slot: int) -> int:
        return max(last_pack.get((layer, slot), 0) - 1, first_step[layer])

    local = plan.local_copies[plan.local_copies[:, 2] // per_rank == rank] - [0, base, base]
    local_step: dict[tuple[int, int], int] = {}  # (layer, source slot) -> step of its group
    for layer in np.unique(local[:, 0]).tolist():
        pairs = local[local[:, 0] == layer, 1:].tolist()
        at = max(earliest(layer, dst) for _, dst in pairs)
        staged, waves = local_waves([(src, dst) for src, dst in pairs])
        steps[at].local.append(_LocalGroup(layer, staged, waves))
        for src, _ in pairs:
            local_step[(layer, src)] = at

    def write_step(layer: int, slot: int, after: int) -> int:
        return max(after, earliest(layer, slot), local_step.get((layer, slot), 0))

    filled: dict[tuple[int, int], int] = {}  # (layer, slot) -> step its receive is written
    for s, flight in enumerate(steps):
        for index, message in enumerate(flight.recvs):
            for layer, tensor, offset, slots in message.parts:
                by_step: dict[int, tuple[list[int], list[int]]] = {}
                for row, slot in enumerate(slots):
                    at = write_step(layer, slot, s)
                    filled[(layer, slot)] = max(filled.get((layer, slot), 0), at)
                    rows, dsts = by_step.setdefault(at, ([], []))
                    rows.append(row)
                    dsts.append(slot)
                for at, (rows, dsts) in by_step.items():
                    steps[at].unpacks.append(
                        _Unpack(s, index, layer, tensor, offset, len(slots), rows, dsts)
                    )
    post = plan.post_copies[plan.post_copies[:, 2] // per_rank == rank] - [0, base, base]
    for layer, src, dst in post.tolist():
        at = write_step(layer, dst, filled[(layer, src)])
        steps[at].post.append((layer, [src], [dst]))
    return steps


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

    def whole(self, layer: int, tensor: int) -> torch.Tensor:
        """The bit view of one tensor of one layer, all its slots."""
        return self._views[layer][tensor]

    def count(self, layer: int) -> int:
        """Tensors per layer."""
        return len(self._views[layer])

    def region_rows(
        self, buffer: torch.Tensor, layer: int, tensor: int, offset: int, count: int
    ) -> tuple[torch.Tensor, ...]:
        """The rows of one region of ``buffer``, each shaped like one slot."""
        return _region(buffer, self._views[layer][tensor], offset, count).unbind(0)


class _Streams:
    """The pack and write streams of a CUDA device, made once (cached blocks stay reusable).

    NCCL runs on its own stream, which waits for the stream current when the
    operations are issued (the pack stream); the write stream waits for NCCL
    through ``work.wait()``. On the CPU everything runs in host order.
    """

    _cache: ClassVar[dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]]] = {}

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            if device not in self._cache:
                self._cache[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            self.pack, self.write = self._cache[device]

    def use(self, which: str) -> AbstractContextManager[object]:
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.pack if which == "pack" else self.write)

    def wait(self, which: str, other: str) -> None:
        """Stream ``which`` waits for what was queued on ``other`` (or ``"current"``)."""
        if self.cuda:
            streams = {
                "pack": self.pack,
                "write": self.write,
                "current": torch.cuda.current_stream(),
            }
            streams[which].wait_stream(streams[other])


class _Phases:
    """CUDA events around each phase (only when profiling); sums them at the end, in ms."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.spans: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self._open: dict[str, torch.cuda.Event] = {}

    def mark(self, name: str, end: bool = False) -> None:
        if not self.enabled:
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream
        if end:
            self.spans.setdefault(name, []).append((self._open.pop(name), event))
        else:
            self._open[name] = event

    def totals(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        torch.cuda.synchronize()
        return {
            name: sum(a.elapsed_time(b) for a, b in spans) for name, spans in self.spans.items()
        }


def _run(
    steps: list[_Step],
    views: list[list[torch.Tensor]],
    device: torch.device,
    group: dist.ProcessGroup | None,
    rank: int,
    profile: bool,
) -> dict[str, float]:
    """Move every step: NCCL moves step k while step k + 1 is packed and step k - 1 written.

    Host order per step k: issue k's messages (after its packs), pack k + 1,
    then its writes (after k's messages and k + 1's packs). No host sync. The
    pack stream waits for the write stream before packing, so buffers freed
    after their last write are reused only once that write has run.
    """
    touched: set[int] = set()
    slots = _SlotViews(views)
    streams = _Streams(device)
    phases = _Phases(profile and streams.cuda)
    streams.wait("pack", "current")
    streams.wait("write", "current")
    phases.mark("total")
    sent: list[list[torch.Tensor] | None] = [None] * len(steps)
    received: list[list[torch.Tensor] | None] = [None] * len(steps)
    last_use = _last_use(steps)
    try:
        with streams.use("pack"):
            sent[0] = _pack(steps[0], slots, device, phases)
        for k, step in enumerate(steps):
            with streams.use("pack"):
                received[k] = [
                    torch.empty(m.nbytes, dtype=torch.uint8, device=device) for m in step.recvs
                ]
                works = _start(step, sent[k] or [], received[k] or [], group)
                if k + 1 < len(steps):
                    # Covers the writes of step k - 1: buffers last used there or
                    # earlier may be freed, and pack-stream reuse comes after them.
                    streams.wait("pack", "write")
                    if k:
                        sent[k - 1] = None
                    for j in range(k):
                        if last_use[j] <= k - 1:
                            received[j] = None
                    sent[k + 1] = _pack(steps[k + 1], slots, device, phases)
            with streams.use("write"):
                phases.mark("wire (exposed)")
                for work in works:
                    work.wait()
                phases.mark("wire (exposed)", end=True)
                streams.wait("write", "pack")
                _write(step, slots, received, touched, phases)
        streams.wait("current", "write")
        streams.wait("current", "pack")
        phases.mark("total", end=True)
        sent.clear()  # freed after the current stream's wait: reuse comes after every use
        received.clear()
    except Exception as exc:
        changed = sorted(touched)
        unchanged = sorted(set(range(len(views))) - touched)
        raise RuntimeError(
            f"rearrange_expert_weights failed on rank {rank}: {type(exc).__name__}: {exc}. "
            f"Layers {changed} of this rank may already hold new weights (some only partly); "
            f"layers {unchanged} are unchanged. The weights no longer match either "
            "placement: reload them or rerun the rearrangement from the old placement"
        ) from exc
    return phases.totals()


def _last_use(steps: list[_Step]) -> list[int]:
    """Per step, the last step whose writes read its receive buffers."""
    last = list(range(len(steps)))
    for k, step in enumerate(steps):
        for unpack in step.unpacks:
            last[unpack.step] = max(last[unpack.step], k)
    return last


def _pack(
    step: _Step, slots: _SlotViews, device: torch.device, phases: _Phases
) -> list[torch.Tensor]:
    """Copy the step's outgoing experts into one buffer per peer."""
    phases.mark("pack")
    reads = _Copies()
    buffers = []
    for message in step.sends:
        buffer = torch.empty(message.nbytes, dtype=torch.uint8, device=device)
        for layer, tensor, offset, mine in message.parts:
            rows = slots.region_rows(buffer, layer, tensor, offset, len(mine))
            reads.add(rows, slots(layer, tensor, mine))
        buffers.append(buffer)
    reads.run()
    phases.mark("pack", end=True)
    return buffers


def _start(
    step: _Step,
    send_buffers: list[torch.Tensor],
    recv_buffers: list[torch.Tensor],
    group: dist.ProcessGroup | None,
) -> list:
    """Issue the step's messages in one batch: sends, then receives, peers ascending."""
    ops = [
        dist.P2POp(dist.isend, buffer, _global_rank(group, message.peer), group)
        for message, buffer in zip(step.sends, send_buffers, strict=True)
    ] + [
        dist.P2POp(dist.irecv, buffer, _global_rank(group, message.peer), group)
        for message, buffer in zip(step.recvs, recv_buffers, strict=True)
    ]
    return dist.batch_isend_irecv(ops) if ops else []


def _write(
    step: _Step,
    slots: _SlotViews,
    received: list[list[torch.Tensor] | None],
    touched: set[int],
    phases: _Phases,
) -> None:
    """The writes due at the end of a step: local copies, then unpacks, then post copies."""
    phases.mark("local copies")
    for group in step.local:
        touched.add(group.layer)
        for tensor in range(slots.count(group.layer)):
            whole = slots.whole(group.layer, tensor)
            staging = whole.new_empty((len(group.staged), *whole.shape[1:]))
            rows = staging.unbind(0)
            copies = _Copies()
            copies.add(list(rows), slots(group.layer, tensor, group.staged))
            copies.run()
            for wave in group.waves:
                sources = [
                    rows[-1 - src] if src < 0 else slots(group.layer, tensor, [src])[0]
                    for src, _ in wave
                ]
                copies.add(slots(group.layer, tensor, [dst for _, dst in wave]), sources)
                copies.run()
    phases.mark("local copies", end=True)
    phases.mark("unpack")
    writes = _Copies()
    for unpack in step.unpacks:
        touched.add(unpack.layer)
        buffer = (received[unpack.step] or [])[unpack.message]
        part = slots.region_rows(buffer, unpack.layer, unpack.tensor, unpack.offset, unpack.count)
        writes.add(slots(unpack.layer, unpack.tensor, unpack.slots), [part[r] for r in unpack.rows])
    writes.run()
    phases.mark("unpack", end=True)
    phases.mark("post copies")
    for layer, filled, targets in step.post:
        touched.add(layer)
        for tensor in range(slots.count(layer)):
            writes.add(slots(layer, tensor, targets), slots(layer, tensor, filled))
    writes.run()
    phases.mark("post copies", end=True)


def _global_rank(group: dist.ProcessGroup | None, peer: int) -> int:
    """P2POp wants global ranks on every torch version this supports."""
    if group is None or group is dist.GroupMember.WORLD:
        return peer
    return dist.get_global_rank(group, peer)
