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
  ``batch_isend_irecv``. A slot is written only after every pack and local copy
  that reads its old content, so nothing is overwritten before it is sent.
- Batches overlap: batch k+1 is packed while batch k is on the wire and older
  batches are unpacked. Packs, the wire and writes run on three streams that
  meet through events only, so the wire waits for its own pack and a free
  receive buffer, never for unrelated copies; buffers come from two rings
  allocated per call. Layers never share memory, so this is safe.
- The host stays ahead and out of the way: only the messages are worked out
  before the first launch (while the input check's all-reduce crosses the
  wire); the writes are scheduled while the first steps move, and each step's
  copies are laid out just before they are launched. The cyclic garbage
  collector is paused for the call. :func:`prepare_rearrangement` does all of
  that planning ahead, on a worker thread, with the slot side of every copy:
  the call then checks, agrees and moves.
- Bits move through integer views (8-byte words where a slot is one dense
  block), so every dtype ships exactly; slot copies are issued as lists through
  ``torch._foreach_copy_`` (fused kernels on CUDA, memcpy on the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from ._rearrange_plan import (
    RearrangePlan,
    _plan_checked,
    check_keeps_experts,
    check_maps,
    keep_experts_in_place,
    local_waves,
    plan_rearrangement,
    split_steps,
)

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "PreparedRearrangement",
    "RearrangeBuffers",
    "RearrangePlan",
    "RearrangeStats",
    "keep_experts_in_place",
    "plan_rearrangement",
    "prepare_rearrangement",
    "rearrange_expert_weights",
    "warmup_rearrangement",
]

#: Default bytes one pipeline step may send plus receive on one rank: 1 GiB.
#: Measured on 2 H200s (bench_rearrange.py, 2026-11-29): DeepSeek-V3 1.44-1.48x
#: the link bound with 7.6-8.6 GB of buffers per rank; 2 GiB steps gave
#: 1.37-1.40x with 10.5-12.3 GB (DeepSeek-V2-Lite: 1.9-2.2x either way).
DEFAULT_MAX_BATCH_BYTES = 1 << 30

# Receive buffers beyond what the plan's deferred writes need: steps the write
# stream may fall behind the wire (a layer's local copies run in a few steps)
# before the wire waits for it.
_RING_SLACK = 2

# Steps the host issues messages and packs ahead of writes. A step whose writes
# take the host long to issue (a layer's local copies, wave after wave) then
# does not delay the next messages: NCCL's kernels start only when both ranks
# have issued them, so one rank's host running late stalls the link for both.
_HOST_LEAD = 2

# Receive slots a call starts with: steps 0 .. _HOST_LEAD are issued before the
# writes (and so the full ring depth) are known.
_FIRST_RECV_SLOTS = _HOST_LEAD + 1

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
        the total. Also host milliseconds: ``host <phase>``, and ``plan (host)``
        before the first launch, split into the checks, the plan and messages
        (made while the ranks' verdicts on their input cross the wire), and the
        wait for those verdicts still left (the writes are scheduled while the
        first steps move: ``host schedule writes``). Empty otherwise.
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
    """One message to or from a peer (group rank).

    parts: (layer, tensor, byte offset, local slots) per region, in message order:
        the region holds that tensor's slots of those slots, one after another.
    """

    peer: int
    nbytes: int
    experts: int
    parts: list[tuple[int, int, int, list[int]]]


def rearrange_expert_weights(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    group: dist.ProcessGroup | None = None,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    profile: bool = False,
    buffers: RearrangeBuffers | None = None,
    prepared: PreparedRearrangement | None = None,
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
        NCCL for CUDA tensors, gloo for CPU tensors. With NCCL, create it with
        high-priority streams (``TORCH_NCCL_HIGH_PRIORITY=1``, or the NCCL
        options' ``is_high_priority_stream``): the wire's kernels then get SMs
        ahead of the copies running beside them (measured on 2 H200s: 3-4 ms of
        DeepSeek-V2-Lite's 33-37 ms, 2-3 ms of 65 ms for 3 DeepSeek-V3 layers).
    max_batch_bytes: bytes one pipeline step may send plus receive on one rank
        (default 1 GiB; a single expert may exceed it). The buffers take two
        steps' sends plus a few steps' receives (the ring depth: the steps the
        plan must defer a write, plus five); a large layer spans several steps.
        Local copies stage one slot per cycle of moves, no more.
    profile: record CUDA events per phase into ``phase_ms`` (one host sync at the
        end; for benchmarks).
    buffers: a :class:`RearrangeBuffers` of this group and device, to take the
        message buffers from (kept between calls and, with NCCL, registered with
        the communicator); every rank passes one or none. None: allocated per call.
    prepared: this rank's share of the move, worked out ahead by
        :func:`prepare_rearrangement` from the same arguments (checked), so the
        call plans nothing; ranks may mix prepared and unprepared calls.

    After the call, slot s of layer l holds bit for bit what expert
    ``new_phy2log[l, s]`` held before. Every rank must call it.

    Raises TypeError/ValueError on bad input, on every rank and before any weight
    is touched. A failure while moving raises RuntimeError naming the layers this
    rank had already (possibly partly) rewritten.

    Python's cyclic garbage collector is paused during the call (and resumed if
    it was on): a collection in the middle, triggered by the call's many small
    objects, stalls this rank's host for milliseconds, and the other rank waits.
    """
    with _gc_paused():
        return _rearrange(
            old_phy2log,
            new_phy2log,
            expert_weights,
            group,
            max_batch_bytes,
            profile,
            buffers,
            prepared,
        )


class PreparedRearrangement:
    """This rank's share of one move, worked out ahead (:func:`prepare_rearrangement`).

    Pass it to :func:`rearrange_expert_weights` (``prepared=``) with the same
    maps, tensor shapes and dtypes, group and ``max_batch_bytes``; the call
    checks that they match (a fingerprint) and refuses otherwise. It can be
    used more than once.

    rank, world_size: where it was made for.
    max_batch_bytes: the step budget it was cut with.
    seconds: host seconds :func:`prepare_rearrangement` took (what the call saves).
    """

    def __init__(
        self,
        key: int,
        rank: int,
        world_size: int,
        max_batch_bytes: int,
        steps: list[_Step],
        work: _SlotWork,
    ) -> None:
        self._key = key
        self.rank = rank
        self.world_size = world_size
        self.max_batch_bytes = max_batch_bytes
        self._steps = steps
        self._work = work  # used where the call gets these very tensors
        self.seconds = 0.0

    def __repr__(self) -> str:
        return (
            f"PreparedRearrangement(rank={self.rank}, world_size={self.world_size}, "
            f"steps={len(self._steps)}, max_batch_bytes={self.max_batch_bytes})"
        )


def prepare_rearrangement(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    group: dist.ProcessGroup | None = None,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> PreparedRearrangement:
    """Work out this rank's share of a move ahead of :func:`rearrange_expert_weights`.

    The same arguments as :func:`rearrange_expert_weights`, whose host planning
    this does ahead: the transfer plan, the messages, when each slot is written
    and the slot side of every copy (views of the weights' slots). Pure host
    work on the maps and the tensors' shapes, dtypes and addresses: no
    collective, no device work, no weight read or written, so a serving engine
    can run it on a worker thread while the GPU serves (``ExpertBalancer`` does),
    and the call then moves weights at once: the host time of planning no longer
    delays the first byte, and the host has less left to lay out while the
    steps move. Called with other tensors of the same shapes, the call still
    uses the plan and lays the copies out itself.

    old_phy2log, new_phy2log: [layers, R] int (any device), as for the call.
    expert_weights: per layer, this rank's weight tensors (views are made, no
        data is read); the prepared move keeps references to them.
    group: the EP process group, for this rank and the group size (default: the world).

    Raises TypeError/ValueError on bad input, as the call would.
    """
    start = time.perf_counter()
    rank, world_size = _rank_and_size(group)
    old, new, layout = _check_input(
        old_phy2log, new_phy2log, expert_weights, world_size, max_batch_bytes
    )
    steps = _program(_plan_checked(old, new, world_size), layout, rank, max_batch_bytes)
    with torch.no_grad():
        work = _SlotWork(expert_weights, steps, ahead=True)
    prepared = PreparedRearrangement(
        _digest(old, new, layout.signature, world_size),
        rank,
        world_size,
        int(max_batch_bytes),
        steps,
        work,
    )
    prepared.seconds = time.perf_counter() - start
    return prepared


def _already_scheduled() -> None:
    """The writes of a prepared move: scheduled by :func:`prepare_rearrangement`."""


def _check_prepared(
    prepared: object, key: int, rank: int, world_size: int, max_batch_bytes: int
) -> None:
    """Refuse a prepared move made for another call."""
    if not isinstance(prepared, PreparedRearrangement):
        raise TypeError(
            "prepared must be a PreparedRearrangement from prepare_rearrangement, got "
            f"{type(prepared).__name__}"
        )
    if (prepared.rank, prepared.world_size) != (rank, world_size):
        raise ValueError(
            f"prepared was made for rank {prepared.rank} of {prepared.world_size}; this is rank "
            f"{rank} of {world_size}"
        )
    if prepared.max_batch_bytes != max_batch_bytes:
        raise ValueError(
            f"prepared was made with max_batch_bytes={prepared.max_batch_bytes}, this call "
            f"has {max_batch_bytes}"
        )
    if prepared._key != key:
        raise ValueError(
            "prepared was made for other maps or other expert_weights shapes and dtypes than "
            "this call's; no weights were changed"
        )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rearrange(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    group: dist.ProcessGroup | None,
    max_batch_bytes: int,
    profile: bool,
    buffers: RearrangeBuffers | None,
    prepared: PreparedRearrangement | None,
) -> RearrangeStats:
    start = time.perf_counter()
    rank, world_size = _rank_and_size(group)
    error: Exception | None = None
    digest = 0
    layout: _Layout | None = None
    device = torch.device("cpu")
    try:
        old, new, layout = _check_input(
            old_phy2log, new_phy2log, expert_weights, world_size, max_batch_bytes
        )
        device = layout.device or device
        _check_buffers(buffers, group, device)
        key = _digest(old, new, layout.signature, world_size)
        if prepared is not None:
            _check_prepared(prepared, key, rank, world_size, max_batch_bytes)
        # Registered and unregistered buffers must not meet in one NCCL call.
        digest = key ^ (buffers is not None)
    except (TypeError, ValueError) as exc:
        error = exc
    checked = time.perf_counter()
    agreement = None
    if world_size > 1:
        agreement = _Agreement(
            group, rank, world_size, error is not None, digest, _collective_device(group, device)
        )
    schedule_writes: Callable[[], None] = _already_scheduled
    if error is None and prepared is not None:
        steps = prepared._steps
    elif error is None:
        assert layout is not None
        # Planned before the verdicts arrive; nothing is touched until they do.
        plan = _plan_checked(old, new, world_size)
        steps, schedule = _program_messages(plan, layout, rank, max_batch_bytes)
        schedule_writes = functools.partial(_program_writes, plan, rank, steps, schedule)
    planned = time.perf_counter()
    if agreement is not None:
        agreement.finish(error)
    if error is not None:
        raise error
    agreed = time.perf_counter()
    with torch.no_grad(), _on_device(device):
        work = prepared._work if prepared is not None else None
        if work is None or not work.made_from(expert_weights):
            work = _SlotWork(expert_weights, steps, ahead=False)
        phases = _run(
            steps,
            work,
            device,
            group,
            rank,
            profile,
            schedule_writes,
            buffers._allocating() if buffers is not None else contextlib.nullcontext,
        )
    if phases:
        phases["plan (host)"] = (agreed - start) * 1e3
        phases["of which checks"] = (checked - start) * 1e3
        phases["plan and messages"] = (planned - checked) * 1e3
        phases["agreement wait"] = (agreed - planned) * 1e3
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


class RearrangeBuffers:
    """Message buffers kept from one rearrangement to the next (opt-in).

    Pass one to :func:`rearrange_expert_weights` (``buffers=``) on every rank of
    ``group``. With NCCL the buffers come from NCCL's own allocator, through a
    memory pool registered with the group's communicator: NCCL (>= 2.23) then
    moves send/recv within a node without its internal staging copies, so the
    wire takes fewer SMs and less memory bandwidth from the copies running
    beside it. The pool keeps what the largest call needed (its memory is not
    given back between calls) until :meth:`close`, which every rank must call
    before the group is destroyed (a registered pool outliving its
    communicator breaks NCCL's teardown). On the CPU (gloo), or in a group of
    one, nothing is kept or registered: buffers are allocated per call.

    group: the EP process group (default: the world).
    device: the CUDA device of this rank's expert weights (default: the current
        one for NCCL). Making one opens the group's point-to-point channels
        (:func:`warmup_rearrangement`): registration needs the communicator.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
    ) -> None:
        self.group = group
        world_size = _rank_and_size(group)[1]
        if device is None:
            device = _collective_device(group, torch.device("cpu")) if world_size > 1 else "cpu"
        self.device = torch.device(device)
        self._pool: torch.cuda.MemPool | None = None
        self._backend: Any = None  # ProcessGroupNCCL where registered
        self.closed = False
        if self.device.type == "cuda" and world_size > 1:
            warmup_rearrangement(group, self.device)
            owner: Any = group if group is not None else dist.group.WORLD
            backend: Any = owner._get_backend(self.device)
            if not hasattr(backend, "mem_allocator") or not hasattr(backend, "register_mem_pool"):
                raise RuntimeError(
                    "RearrangeBuffers needs a NCCL process group whose backend has "
                    "mem_allocator and register_mem_pool (a newer torch)"
                )
            self._pool = torch.cuda.MemPool(backend.mem_allocator)
            backend.register_mem_pool(self._pool)  # later segments register as they come
            self._backend = backend

    @property
    def registered(self) -> bool:
        """Whether the buffers come from a pool registered with NCCL."""
        return self._pool is not None

    def close(self) -> None:
        """Deregister and free the kept buffers (waits for this device first). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._pool is not None:
            torch.cuda.synchronize(self.device)
            self._backend.deregister_mem_pool(self._pool)
            self._pool = self._backend = None

    def __enter__(self) -> RearrangeBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _allocating(self) -> Callable[[], AbstractContextManager[object]]:
        pool = self._pool
        if pool is None:
            return contextlib.nullcontext
        return lambda: torch.cuda.use_mem_pool(pool)


def _check_buffers(buffers: object, group: dist.ProcessGroup | None, device: torch.device) -> None:
    """``buffers`` must be None or an open RearrangeBuffers of this group and device."""
    if buffers is None:
        return
    if not isinstance(buffers, RearrangeBuffers):
        raise TypeError(f"buffers must be a RearrangeBuffers or None, got {type(buffers).__name__}")
    if buffers.closed:
        raise ValueError("buffers was closed: make a new RearrangeBuffers")
    if not _same_group(buffers.group, group):
        raise ValueError("buffers belongs to another process group than group")
    if buffers.registered and buffers.device != device:
        raise ValueError(f"buffers live on {buffers.device}, the expert weights on {device}")


def _same_group(a: object, b: object) -> bool:
    """None stands for the world group."""
    world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return (world if a is None else a) is (world if b is None else b)


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


def _check_input(
    old_phy2log: object,
    new_phy2log: object,
    expert_weights: object,
    world_size: int,
    max_batch_bytes: object,
) -> tuple[np.ndarray, np.ndarray, _Layout]:
    """The checks :func:`rearrange_expert_weights` and :func:`prepare_rearrangement` share."""
    old, new = _maps_to_host(old_phy2log, new_phy2log, world_size)
    check_keeps_experts(old, new)
    layout = _check_weights(expert_weights, old.shape, world_size)
    if isinstance(max_batch_bytes, bool) or not isinstance(max_batch_bytes, numbers.Integral):
        raise TypeError(f"max_batch_bytes must be an int, got {type(max_batch_bytes).__name__}")
    if max_batch_bytes < 1:
        raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes}")
    return old, new, layout


def _maps_to_host(
    old_phy2log: object, new_phy2log: object, world_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both maps, checked, as host int64 arrays (one device-to-host copy where both are on one)."""
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
        return check_maps(both[0].numpy(), both[1].numpy(), world_size)
    old = old_phy2log.detach().cpu() if isinstance(old_phy2log, torch.Tensor) else old_phy2log
    new = new_phy2log.detach().cpu() if isinstance(new_phy2log, torch.Tensor) else new_phy2log
    return check_maps(old, new, world_size)


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
                if template is None:  # later layers must match these dtypes
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


class _Agreement:
    """Every rank's verdict on its input, exchanged while the host plans (one all-reduce).

    One all-reduce (max) of [refused flag per rank, fingerprint, -fingerprint]:
    equal fingerprints have max == -max(-x). Refusing only locally would leave
    the other ranks waiting for messages that never come. It is started as soon
    as the input is checked and awaited (:meth:`finish`) once the plan is made:
    the host plans while the few bytes cross the wire and while a slower rank
    catches up, instead of waiting for them first.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        rank: int,
        world_size: int,
        refused: bool,
        digest: int,
        device: torch.device,
    ) -> None:
        self._world_size = world_size
        flags = torch.zeros(world_size + 2, dtype=torch.int64)
        flags[rank] = refused
        flags[world_size] = digest
        flags[world_size + 1] = -digest
        # On the pack stream, this exchange and the host's wait for it queue behind
        # nothing the serving stream holds (the forward pass in flight): the host
        # waits for a few bytes on the wire, not for the GPU to drain.
        self._streams = _Streams(device)
        with self._streams.use("pack"):
            self._flags = flags.to(device)
            self._work = dist.all_reduce(
                self._flags, op=dist.ReduceOp.MAX, group=group, async_op=True
            )

    def finish(self, error: Exception | None) -> None:
        """Wait for the verdicts; raise if another rank refused or the inputs differ.

        A rank that refused its own input (``error``) returns: its caller raises that.
        """
        with self._streams.use("pack"):
            self._work.wait()
            reduced = self._flags.cpu().tolist()
        if error is not None:
            return
        world_size = self._world_size
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
    """Consecutive waves of one layer's local copies (see local_waves), run in one step.

    The layer's first group (``stages``) first copies ``staged`` to staging rows.
    """

    layer: int
    staged: list[int]
    waves: list[list[tuple[int, int]]]
    stages: bool


@dataclass
class _Step:
    """This rank's share of one pipeline step, and the writes issued at its end."""

    sends: list[_Message]
    recvs: list[_Message]
    local: list[_LocalGroup] = field(default_factory=list)
    unpacks: list[_Unpack] = field(default_factory=list)
    post: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def _program(plan: RearrangePlan, layout: _Layout, rank: int, max_step_bytes: int) -> list[_Step]:
    """This rank's steps: messages with their byte layout, and when each slot is written."""
    steps, sched = _program_messages(plan, layout, rank, max_step_bytes)
    _program_writes(plan, rank, steps, sched)
    return steps


@dataclass
class _Schedule:
    """What :func:`_program_writes` needs from :func:`_program_messages`."""

    t: np.ndarray  # [T, 6] the plan's transfers in step order
    step_of: np.ndarray  # [T] the step of each
    last_pack: np.ndarray  # [layers, R/P] the last step packing each local slot


def _program_messages(
    plan: RearrangePlan, layout: _Layout, rank: int, max_step_bytes: int
) -> tuple[list[_Step], _Schedule]:
    """This rank's steps with their messages only: all the first steps need to start.

    The writes (:func:`_program_writes`) are scheduled while the first steps
    move: they take longer to work out on the host than the messages.
    """
    per_rank = plan.slots_per_rank
    base = rank * per_rank
    order, step_of = split_steps(plan, sum(layout.slot_nbytes), max_step_bytes)
    t = plan.transfers[order]
    num_steps = int(step_of[-1]) + 1 if step_of.size else 1
    steps = [_Step([], []) for _ in range(num_steps)]
    mine = t[:, 2] == rank
    last_pack = np.zeros((plan.num_layers, per_rank), dtype=np.int64)
    np.maximum.at(last_pack, (t[mine, 0], t[mine, 3] - base), step_of[mine])
    for s, messages in _messages(step_of[mine], t[mine][:, [0, 4, 3]] - [0, 0, base], layout):
        steps[s].sends = messages
    theirs = t[:, 4] == rank
    for s, messages in _messages(step_of[theirs], t[theirs][:, [0, 2, 5]] - [0, 0, base], layout):
        steps[s].recvs = messages
    return steps, _Schedule(t, step_of, last_pack)


def _program_writes(plan: RearrangePlan, rank: int, steps: list[_Step], sched: _Schedule) -> None:
    """Fill in when each slot is written: local copies, unpacks and post copies.

    A write to slot X is issued at the end of step s, after the packs of step
    s + 1 (the executor orders its streams so), so s >= (last step packing X) - 1;
    local copies of a layer run before unpacks and post copies that overwrite
    their sources. Slots are local here (0 .. R/P - 1). Per-slot facts are dense
    [layers, R/P] arrays.
    """
    per_rank = plan.slots_per_rank
    base = rank * per_rank
    t, step_of, last_pack = sched.t, sched.step_of, sched.last_pack
    num_steps = len(steps)

    # No write of a layer before the first step moving anything of it (or of a
    # later layer): a failure then leaves later layers untouched.
    first_step = np.full(plan.num_layers + 1, num_steps - 1, dtype=np.int64)
    np.minimum.at(first_step, t[:, 0], step_of)
    first_step = np.minimum.accumulate(first_step[::-1])[::-1]
    # [layers, R/P]: the first step at whose end a slot may be written.
    earliest = np.maximum(last_pack - 1, first_step[:-1, None])

    local = plan.local_copies[plan.local_copies[:, 2] // per_rank == rank] - [0, base, base]
    read_locally = np.zeros_like(earliest)  # step of the last local wave reading a slot
    layer_cuts = np.searchsorted(local[:, 0], np.arange(plan.num_layers + 1))
    for layer in range(plan.num_layers):
        pairs = local[layer_cuts[layer] : layer_cuts[layer + 1], 1:].tolist()
        if not pairs:
            continue
        staged, waves = local_waves([(src, dst) for src, dst in pairs])
        # Each copy as early as the packs of its destination and the copies
        # reading that destination allow, not the whole layer at its last pack:
        # a late copy delays the receives into the slot it reads, and their
        # buffers stay taken. Readers come in earlier waves, so one pass in wave
        # order settles every copy; within a step, waves keep their order.
        read_at: dict[int, int] = dict.fromkeys(staged, int(first_step[layer]))
        pieces: dict[int, list[list[tuple[int, int]]]] = {}
        for wave in waves:
            parts: dict[int, list[tuple[int, int]]] = {}
            for src, dst in wave:
                at = max(int(earliest[layer, dst]), read_at.get(dst, 0))
                parts.setdefault(at, []).append((src, dst))
                if src >= 0:
                    read_at[src] = max(read_at.get(src, 0), at)
            for at, part in parts.items():
                pieces.setdefault(at, []).append(part)
        for slot, at in read_at.items():
            read_locally[layer, slot] = at
        read_locally[layer, staged] = np.maximum(read_locally[layer, staged], min(pieces))
        for at in sorted(pieces):
            steps[at].local.append(_LocalGroup(layer, staged, pieces[at], at == min(pieces)))
    write_after = np.maximum(earliest, read_locally)

    filled = np.zeros_like(earliest)  # step at whose end a received slot is written
    for s, flight in enumerate(steps):
        for index, message in enumerate(flight.recvs):
            due: dict[int, tuple[list[int], list[int]]] = {}
            for layer, tensor, offset, slots in message.parts:
                if tensor == 0:  # every tensor of a layer has the same slots: shared lists
                    when = np.maximum(write_after[layer, slots], s)
                    filled[layer, slots] = when
                    due = {}
                    for row, (step, slot) in enumerate(zip(when.tolist(), slots, strict=True)):
                        rows, dsts = due.setdefault(step, ([], []))
                        rows.append(row)
                        dsts.append(slot)
                for step, (rows, dsts) in due.items():
                    steps[step].unpacks.append(
                        _Unpack(s, index, layer, tensor, offset, len(slots), rows, dsts)
                    )
    post = plan.post_copies[plan.post_copies[:, 2] // per_rank == rank] - [0, base, base]
    for layer, src, dst in post.tolist():
        at = max(int(filled[layer, src]), int(write_after[layer, dst]))
        steps[at].post.append((layer, [src], [dst]))


def _messages(
    step_of: np.ndarray, rows: np.ndarray, layout: _Layout
) -> list[tuple[int, list[_Message]]]:
    """Per step, one message per peer, from (layer, peer, local slot) rows in plan order.

    step_of: [rows] int, the step of each row (non-decreasing).
    rows: [rows, 3] int, (layer, peer, local slot); layers ascend within a step
        (the plan's order), so each message holds its layers one after another.

    A message lays out its experts layer by layer, tensor by tensor: a region per
    (layer, tensor) with that tensor's rows of the layer's slots, in row order.
    Both sides of a message see the same rows in the same order.
    """
    if not len(rows):
        return []
    # Stable: within a (step, peer), the plan's (layer, expert) order is kept.
    sort = np.lexsort((rows[:, 1], step_of))
    rows, step_of = rows[sort], step_of[sort]
    new_message = np.ones(len(rows), dtype=bool)
    new_message[1:] = (np.diff(step_of) != 0) | (np.diff(rows[:, 1]) != 0)
    new_run = new_message.copy()  # a run: one layer of one message
    new_run[1:] |= np.diff(rows[:, 0]) != 0
    starts = np.flatnonzero(new_run)
    stops = np.append(starts[1:], len(rows)).tolist()
    # Whole arrays to Python once, then a loop over runs (a few per message):
    # this runs before the first byte moves.
    slots = rows[:, 2].tolist()
    found: dict[int, list[_Message]] = {}
    message: _Message | None = None
    for start, stop, opens, layer, peer, step in zip(
        starts.tolist(),
        stops,
        new_message[starts].tolist(),
        rows[starts, 0].tolist(),
        rows[starts, 1].tolist(),
        step_of[starts].tolist(),
        strict=True,
    ):
        if opens:
            message = _Message(peer, 0, 0, [])
            found.setdefault(step, []).append(message)
        assert message is not None  # the first run opens a message
        mine = slots[start:stop]  # shared by the layer's tensors
        for tensor in range(len(layout.slot_nbytes)):
            message.parts.append((layer, tensor, message.nbytes, mine))
            message.nbytes += layout.region(tensor, len(mine))
        message.experts += len(mine)
    # All tensors empty: nothing to ship.
    return [(step, kept) for step, sent in found.items() if (kept := [m for m in sent if m.nbytes])]


def _region(buffer: torch.Tensor, view: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """``count`` slots shaped like ``view``'s (its bit view) inside a message buffer."""
    row = view.shape[1:]
    nbytes = count * math.prod(row) * view.element_size()
    return buffer.narrow(0, offset, nbytes).view(view.dtype).view(count, *row)


@dataclass
class _Batch:
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


def _foreach_copy(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
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


class _SlotViews:
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
        return _region(buffer, self._views[layer][tensor], offset, count).unbind(0)


class _Streams:
    """The pack, issue and write streams of a CUDA device, made once (cached blocks stay reusable).

    Packs run on ``pack``. Each step's messages are issued from ``issue``, which
    holds nothing but waits: NCCL's own stream waits for the stream current when
    the operations are issued, so the wire waits for exactly that step's pack and
    a free receive buffer, never for unrelated copies. ``write`` runs local
    copies and unpacks. Streams meet through events only. On the CPU everything
    runs in host order and events are None.
    """

    _cache: ClassVar[dict[torch.device, tuple[torch.cuda.Stream, ...]]] = {}

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._streams: dict[str, torch.cuda.Stream] = {}
        if self.cuda:
            if device not in self._cache:
                self._cache[device] = tuple(torch.cuda.Stream(device) for _ in range(3))
            self._streams = dict(zip(("pack", "issue", "write"), self._cache[device], strict=True))

    def use(self, which: str) -> AbstractContextManager[object]:
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._streams[which])

    def _get(self, which: str) -> torch.cuda.Stream:
        return torch.cuda.current_stream() if which == "current" else self._streams[which]

    def wait(self, which: str, other: str) -> None:
        """Stream ``which`` waits for everything queued so far on ``other`` (or ``"current"``)."""
        if self.cuda:
            self._get(which).wait_stream(self._get(other))

    def record(self, which: str) -> torch.cuda.Event | None:
        """An event at the end of what is queued on ``which`` now."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self._get(which))
        return event

    def wait_event(self, which: str, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self._get(which).wait_event(event)
        elif self.cuda:  # waiting for work not issued yet would silently not wait
            raise AssertionError(f"the {which} stream waits for an event never recorded")


class _Rings:
    """Send and receive buffers, allocated per call and reused step after step.

    Step k packs into send slot k % 2 and receives into receive slot k % depth.
    A send slot is reused once its previous step's messages are done; a receive
    slot once every write reading it is done. ``depth`` leaves room for writes
    the plan defers past their receive step, plus ``slack`` steps for the write
    stream to fall behind (a layer's local copies) without stalling the wire.
    The writes are scheduled while the first steps move, so the ring starts
    with the slots those steps need and grows once (:meth:`extend`).
    """

    def __init__(
        self,
        steps: list[_Step],
        device: torch.device,
        first: int,
        allocating: Callable[[], AbstractContextManager[object]],
    ) -> None:
        self._steps = steps
        self._allocating = allocating  # where the buffers come from (RearrangeBuffers)
        sent, self._received = _slot_bytes(steps)
        with allocating():
            self._send = torch.empty(min(2, len(steps)), sent, dtype=torch.uint8, device=device)
            self._recv = [
                torch.empty(self._received, dtype=torch.uint8, device=device)
                for _ in range(min(first, len(steps)))
            ]
        self.depth = len(self._recv)
        self.last_use: list[int] | None = None

    def extend(self, slack: int) -> None:
        """Grow to the full depth once the writes are scheduled (on the current stream)."""
        self.last_use = _last_use(self._steps)
        depth = max(_ring_depth(self._steps, self.last_use, slack), self.depth)
        device = self._send.device
        with self._allocating():
            self._recv += [
                torch.empty(self._received, dtype=torch.uint8, device=device)
                for _ in range(depth - len(self._recv))
            ]
        self.depth = depth

    def send(self, k: int, step: _Step) -> list[torch.Tensor]:
        return _split(self._send[k % 2], step.sends)

    def recv(self, k: int, step: _Step) -> list[torch.Tensor]:
        if k >= self.depth and self.last_use is None:
            raise AssertionError("receive ring used past its first slots before extend()")
        return _split(self._recv[k % self.depth], step.recvs)

    def recv_free_after(self, k: int) -> int | None:
        """The step whose writes must be done before step k may receive (None: no wait)."""
        previous = k - self.depth
        if previous < 0:
            return None
        assert self.last_use is not None  # k >= depth: extended (recv raised otherwise)
        return self.last_use[previous]


def _slot_bytes(steps: list[_Step]) -> tuple[int, int]:
    """Bytes of one send and one receive ring slot: the most any step sends and receives."""
    sent = max((sum(m.nbytes for m in step.sends) for step in steps), default=0)
    received = max((sum(m.nbytes for m in step.recvs) for step in steps), default=0)
    return sent, received


def _ring_depth(steps: list[_Step], last_use: list[int], slack: int) -> int:
    """Receive ring slots: the most steps a write is deferred past its receive, + 1 + slack.

    last_use: per step, the last step whose writes read its receive buffers.
    """
    deferred = max((last - k for k, last in enumerate(last_use)), default=0)
    return min(len(steps), deferred + 1 + slack)


def _buffer_bytes(steps: list[_Step]) -> int:
    """Bytes of the two rings a call allocates for these steps (for reports)."""
    sent, received = _slot_bytes(steps)
    depth = max(
        _ring_depth(steps, _last_use(steps), _HOST_LEAD + _RING_SLACK),
        min(_FIRST_RECV_SLOTS, len(steps)),
    )
    return min(2, len(steps)) * sent + depth * received


def _split(slot: torch.Tensor, messages: list[_Message]) -> list[torch.Tensor]:
    """One buffer per message, back to back in one ring slot (sizes are multiples of _ALIGN)."""
    buffers, position = [], 0
    for message in messages:
        buffers.append(slot[position : position + message.nbytes])
        position += message.nbytes
    return buffers


class _Phases:
    """CUDA events around each phase (only when profiling); sums them at the end, in ms.

    Also sums the host's time inside each phase (``host <phase>``): where the
    host, not the GPU, sets the pace, these add up to the call's duration.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.spans: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self._open: dict[str, tuple[torch.cuda.Event, float]] = {}
        self.host: dict[str, float] = {}

    def mark(self, name: str, end: bool = False) -> None:
        if not self.enabled:
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream
        now = time.perf_counter()
        if end:
            begin, started = self._open.pop(name)
            self.spans.setdefault(name, []).append((begin, event))
            self.host[name] = self.host.get(name, 0.0) + now - started
        else:
            self._open[name] = (event, now)

    def totals(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        torch.cuda.synchronize()
        gpu = {name: sum(a.elapsed_time(b) for a, b in spans) for name, spans in self.spans.items()}
        return gpu | {f"host {name}": seconds * 1e3 for name, seconds in self.host.items()}


def _run(
    steps: list[_Step],
    slot_work: _SlotWork,
    device: torch.device,
    group: dist.ProcessGroup | None,
    rank: int,
    profile: bool,
    schedule_writes: Callable[[], None],
    allocating: Callable[[], AbstractContextManager[object]],
) -> dict[str, float]:
    """Move every step: the wire moves step k while step k + 1 is packed and older steps written.

    Host order per step k: issue k's messages (waiting, on the GPU, for k's pack
    and a free receive buffer), pack k + 1, then the writes of step k - _HOST_LEAD
    (after that step's messages and the pack of the step after it, so no pack
    reads a slot after its write: packs of later steps never read those slots).
    No host sync; the wire never waits for writes beyond the receive ring's
    depth. ``steps`` come with their messages only: ``schedule_writes`` fills
    in their writes, called once the first steps are issued, so the host works
    it out while they move. Each step's copies are laid out just before they are
    launched, while earlier steps move; their slot sides come from ``slot_work``
    where it has them (a prepared move): only the buffer sides are left.
    """
    begun = time.perf_counter()
    slots = slot_work.slots
    streams = _Streams(device)
    phases = _Phases(profile and streams.cuda)
    # Allocated on the current stream, which waits for every stream at the end:
    # this memory is reused only after its last use.
    rings = _Rings(steps, device, _FIRST_RECV_SLOTS, allocating)
    staging: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    received: list[list[torch.Tensor]] = []
    sending = [rings.send(k, step) for k, step in enumerate(steps)]
    if phases.enabled:
        phases.host["prep"] = time.perf_counter() - begun
    for which in ("pack", "issue", "write"):
        streams.wait(which, "current")
    phases.mark("total")
    packed: list[torch.cuda.Event | None] = [None] * len(steps)
    sent: list[torch.cuda.Event | None] = [None] * len(steps)
    written: list[torch.cuda.Event | None] = [None] * len(steps)
    touched: set[int] = set()
    try:
        with streams.use("pack"):
            _issue([_pack_batch(steps[0], sending[0], slots, slot_work.pack[0])], phases)
            packed[0] = streams.record("pack")
        for k in range(len(steps) + _HOST_LEAD):
            if k < len(steps):
                received.append(rings.recv(k, steps[k]))
                with streams.use("issue"):
                    phases.mark("wire wait")
                    streams.wait_event("issue", packed[k])
                    free = rings.recv_free_after(k)
                    if free is not None:
                        streams.wait_event("issue", written[free])
                    phases.mark("wire wait", end=True)
                    phases.mark("wire")
                    for work in _start(steps[k], sending[k], received[k], group):
                        work.wait()
                    phases.mark("wire", end=True)
                    sent[k] = streams.record("issue")
            if k + 1 < len(steps):
                with streams.use("pack"):
                    if k >= 1:  # send slot (k + 1) % 2 last held step k - 1
                        streams.wait_event("pack", sent[k - 1])
                    _issue(
                        [_pack_batch(steps[k + 1], sending[k + 1], slots, slot_work.pack[k + 1])],
                        phases,
                    )
                    packed[k + 1] = streams.record("pack")
            j = k - _HOST_LEAD  # the step whose writes are issued now
            if j == 0:
                scheduled = time.perf_counter()
                schedule_writes()
                rings.extend(_HOST_LEAD + _RING_SLACK)
                staging = _allocate_staging(steps, slots)
                if phases.enabled:
                    phases.host["schedule writes"] = time.perf_counter() - scheduled
            if j >= 0:
                with streams.use("write"):
                    streams.wait_event("write", sent[j])
                    if j + 1 < len(steps):
                        streams.wait_event("write", packed[j + 1])
                    touched.update(_layers_written(steps[j]))
                    _issue(
                        _write_batches(
                            steps[j],
                            slots,
                            received,
                            staging,
                            slot_work.writes(j),
                        ),
                        phases,
                    )
                    written[j] = streams.record("write")
        for which in ("pack", "issue", "write"):
            streams.wait("current", which)
        phases.mark("total", end=True)
    except Exception as exc:
        changed = sorted(touched)
        unchanged = sorted(set(range(slots.num_layers)) - touched)
        raise RuntimeError(
            f"rearrange_expert_weights failed on rank {rank}: {type(exc).__name__}: {exc}. "
            f"Layers {changed} of this rank may already hold new weights (some only partly); "
            f"layers {unchanged} are unchanged. The weights no longer match either "
            "placement: reload them or rerun the rearrangement from the old placement"
        ) from exc
    return phases.totals()


def _issue(batches: list[_Batch], phases: _Phases) -> None:
    """Launch batches in order on the current stream, timing each phase when profiling."""
    for batch in batches:
        phases.mark(batch.phase)
        for destinations, sources in batch.pairs.values():
            _foreach_copy(destinations, sources)
        phases.mark(batch.phase, end=True)


def _layers_written(step: _Step) -> set[int]:
    return (
        {group.layer for group in step.local}
        | {unpack.layer for unpack in step.unpacks}
        | {layer for layer, _, _ in step.post}
    )


def _last_use(steps: list[_Step]) -> list[int]:
    """Per step, the last step whose writes read its receive buffers."""
    last = list(range(len(steps)))
    for k, step in enumerate(steps):
        for unpack in step.unpacks:
            last[unpack.step] = max(last[unpack.step], k)
    return last


def _allocate_staging(
    steps: list[_Step], slots: _SlotViews
) -> dict[int, list[tuple[torch.Tensor, ...]]]:
    """Per layer with staged slots, per tensor, one staging row per staged slot."""
    staging: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    for step in steps:
        for group in step.local:
            if group.stages and group.staged:
                staging[group.layer] = [
                    slots.whole(group.layer, tensor)
                    .new_empty((len(group.staged), *slots.whole(group.layer, tensor).shape[1:]))
                    .unbind(0)
                    for tensor in range(slots.count(group.layer))
                ]
    return staging


def _pack_batch(
    step: _Step,
    buffers: list[torch.Tensor],
    slots: _SlotViews,
    sources: list[list[torch.Tensor]] | None,
) -> _Batch:
    """The step's outgoing experts copied into their messages' buffers.

    sources: the slot views of each message part, in order (None: made here).
    """
    batch = _Batch("pack")
    i = 0
    for message, buffer in zip(step.sends, buffers, strict=True):
        for layer, tensor, offset, mine in message.parts:
            rows = slots.region_rows(buffer, layer, tensor, offset, len(mine))
            batch.add(rows, sources[i] if sources is not None else slots(layer, tensor, mine))
            i += 1
    return batch


def _pack_sources(step: _Step, slots: _SlotViews) -> list[list[torch.Tensor]]:
    """The slot views each of the step's message parts packs, in order."""
    return [
        slots(layer, tensor, mine)
        for message in step.sends
        for layer, tensor, _, mine in message.parts
    ]


def _write_batches(
    step: _Step,
    slots: _SlotViews,
    received: list[list[torch.Tensor]],
    staging: dict[int, list[tuple[torch.Tensor, ...]]],
    ahead: tuple[list[_Batch] | None, list[list[torch.Tensor]] | None, _Batch | None],
) -> list[_Batch]:
    """The writes due at the end of a step: local copies, then unpacks, then post copies.

    ahead: the local copies, the unpacks' destinations and the post copies,
        laid out ahead (each None: made here).
    """
    local, unpacked, post = ahead
    if local is None:
        local = _local_batches(step, slots, staging)
    if unpacked is None:
        unpacked = _unpack_destinations(step, slots)
    unpack = _Batch("unpack")
    for part, destinations in zip(step.unpacks, unpacked, strict=True):
        buffer = received[part.step][part.message]
        region = _region(buffer, slots.whole(part.layer, part.tensor), part.offset, part.count)
        # unbind makes every row in one call; one row at a time costs more per row.
        held = region.unbind(0) if 2 * len(part.rows) > part.count else region
        unpack.add(destinations, [held[r] for r in part.rows])
    if post is None:
        post = _post_batch(step, slots)
    return [b for b in (*local, unpack, post) if b.pairs]


def _unpack_destinations(step: _Step, slots: _SlotViews) -> list[list[torch.Tensor]]:
    """The slot views each of the step's unpacks writes, in order."""
    return [slots(part.layer, part.tensor, part.slots) for part in step.unpacks]


def _local_batches(
    step: _Step, slots: _SlotViews, staging: dict[int, list[tuple[torch.Tensor, ...]]]
) -> list[_Batch]:
    """The step's local copies: staging of cycle-breaking slots, then wave by wave.

    Local copies go wave by wave (a wave writes only slots earlier waves have
    read); a layer's first group first stages its cycle-breaking slots. Layers
    share no memory, so the i-th waves of all layers go in one batch: as many
    launches as the deepest layer has waves, not their sum.
    """
    stage = _Batch("local copies")
    waves: list[_Batch] = []
    for group in step.local:
        layer, tensors = group.layer, range(slots.count(group.layer))
        rows = staging.get(layer, [() for _ in tensors])
        if group.stages and group.staged:
            for tensor in tensors:
                stage.add(rows[tensor], slots(layer, tensor, group.staged))
        for i, wave in enumerate(group.waves):
            if i == len(waves):
                waves.append(_Batch("local copies"))
            dsts = [dst for _, dst in wave]
            srcs = [src for src, _ in wave]
            for tensor in tensors:
                split, staged = slots.rows(layer, tensor), rows[tensor]
                waves[i].add(
                    [split[d] for d in dsts], [staged[-1 - s] if s < 0 else split[s] for s in srcs]
                )
    return [stage, *waves]


def _post_batch(step: _Step, slots: _SlotViews) -> _Batch:
    """Copies into second slots of experts this step received (from their first slot)."""
    post = _Batch("post copies")
    for layer, filled, targets in step.post:
        for tensor in range(slots.count(layer)):
            post.add(slots(layer, tensor, targets), slots(layer, tensor, filled))
    return post


class _SlotWork:
    """The slot side of every step's copies: views of the weights' slots.

    Made in the call, it only wraps the weights (views are made as steps are
    laid out). Made ahead (:func:`prepare_rearrangement`, ``ahead=True``), it
    also lays out each step's pack sources, local copies, unpack destinations
    and post copies, which touch slots only: the call then lays out only the
    buffer sides. Views of the weights, never their data: making them reads
    and writes nothing.
    """

    def __init__(
        self, expert_weights: Sequence[Sequence[torch.Tensor]], steps: list[_Step], ahead: bool
    ) -> None:
        self._weights = [list(layer) for layer in expert_weights]
        # Checked by made_from, which only prepared moves use.
        self._meta = _tensor_meta(self._weights) if ahead else []
        self.slots = _SlotViews([[_bit_view(t) for t in layer] for layer in self._weights])
        count = len(steps)
        self.pack: list[list[list[torch.Tensor]] | None] = [None] * count
        self.local: list[list[_Batch] | None] = [None] * count
        self.unpack: list[list[list[torch.Tensor]] | None] = [None] * count
        self.post: list[_Batch | None] = [None] * count
        if not ahead:
            return
        for k, step in enumerate(steps):
            self.pack[k] = _pack_sources(step, self.slots)
            # Staging rows are allocated per call: a step copying through them
            # lays out its local copies in the call.
            if not any(group.staged for group in step.local):
                self.local[k] = _local_batches(step, self.slots, {})
            self.unpack[k] = _unpack_destinations(step, self.slots)
            self.post[k] = _post_batch(step, self.slots)

    def writes(
        self, k: int
    ) -> tuple[list[_Batch] | None, list[list[torch.Tensor]] | None, _Batch | None]:
        """What step k's writes have laid out ahead (see :func:`_write_batches`)."""
        return self.local[k], self.unpack[k], self.post[k]

    def made_from(self, expert_weights: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Whether ``expert_weights`` are the very tensors this was made from, unchanged."""
        if len(expert_weights) != len(self._weights) or any(
            len(given) != len(mine) or any(a is not b for a, b in zip(given, mine, strict=True))
            for given, mine in zip(expert_weights, self._weights, strict=True)
        ):
            return False
        return _tensor_meta(self._weights) == self._meta


def _tensor_meta(weights: list[list[torch.Tensor]]) -> list[tuple[object, ...]]:
    """Where each tensor's memory is and how it is laid out (an in-place resize changes it)."""
    return [
        (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for layer in weights for t in layer
    ]


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


def _global_rank(group: dist.ProcessGroup | None, peer: int) -> int:
    """P2POp wants global ranks on every torch version this supports."""
    if group is None or group is dist.GroupMember.WORLD:
        return peer
    return dist.get_global_rank(group, peer)
