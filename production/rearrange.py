"""Move expert weights between EP ranks after a new placement, exactly and in few messages.

:func:`rearrange_expert_weights` rewrites every rank's expert slots in place so
that each slot holds, bit for bit, the weights of its new expert.

How it keeps the link busy and the result exact:

- Both maps come to the host in one copy, before any layer is processed; every
  rank derives the same plan from them (:func:`plan_rearrangement`, pure numpy).
  Every call runs under a :class:`~eplb.production.group_guard.GuardedCall`:
  the ranks agree, through the group's store, on every argument that shapes
  the plan or the wire (or share a rank's refusal), so a bad call raises
  everywhere instead of hanging or corrupting; every wait of the move has a
  deadline (``timeout``), a rank that fails tells the others at once, and
  every rank ends with one outcome (see "Failure model" in the README).
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
  before the first launch (while the other ranks' verdicts on their input
  arrive); the writes are scheduled while the first steps move, and each step's
  copies are laid out just before they are launched. The cyclic garbage
  collector is paused for the call. :func:`prepare_rearrangement` does all of
  that planning ahead, on a worker thread, with the slot side of every copy:
  the call then checks, agrees and moves.
- Bits move through integer views (8-byte words where a slot is one dense
  block), so every dtype ships exactly; slot copies are issued as lists through
  ``torch._foreach_copy_`` (fused kernels on CUDA, memcpy on the CPU).

Modules, one per responsibility: this one holds the public calls and the
ranks' agreement; :mod:`.rearrange_checks` the input checks;
:mod:`.rearrange_plan` what moves where;
:mod:`.rearrange_schedule` when (steps, messages, writes, ring sizing; host
only); :mod:`.rearrange_executor` how on the device (streams, events, rings,
copy batches); :mod:`.transport` which wire (the only P2P calls). Whether a
move was prepared ahead or not, the call runs one :class:`PreparedRearrangement`
(made lazily in the call), through one executor path.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .errors import RearrangeError
from .group_guard import DEFAULT_TIMEOUT, GroupGuard, check_timeout
from .rearrange_buffers import RearrangeBuffers, check_buffers
from .rearrange_checks import check_host_wait, check_input
from .rearrange_executor import run_steps
from .rearrange_plan import (
    RearrangePlan,
    keep_experts_in_place,
    plan_checked,
    plan_rearrangement,
)
from .rearrange_progress import MoveProgress
from .rearrange_schedule import Layout, Step, program_messages, program_writes
from .slot_work import SlotWork
from .transport import (
    TorchDistributedTransport,
    on_device,
    rank_and_size,
    warm_up_group,
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

#: Default bytes one pipeline step may send plus receive on one rank: 1 GiB
#: (the README gives the measurements behind this choice).
DEFAULT_MAX_BATCH_BYTES = 1 << 30


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
    timeout: float | None = None,
    into: Sequence[Sequence[torch.Tensor]] | None = None,
    host_wait: bool = True,
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
        ahead of the copies running beside them (the README gives the gain).
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
    timeout: seconds any one wait of the call may take (None:
        ``group_guard.DEFAULT_TIMEOUT``, 90 s: it says why); each rank's own.
    into: other tensors of the same shapes, dtypes and device as
        ``expert_weights`` (sharing no memory with them) to write the new
        slots into, instead of in place: ``expert_weights`` are then only
        read, and of ``into`` only the slots whose expert changes are written
        (the others keep whatever they held). Local copies then need no
        ordering among them and no staging, and ``new_phy2log`` may drop
        experts (their weights stay where they are). None: in place. Every
        rank passes one or none. (A staged rebalance moves into its staging
        buffer so, only the slots whose expert crosses a wire.)
    host_wait: False: on CUDA, return without the host waiting for this rank's
        last messages (see below). Only with ``into`` on CUDA tensors: a
        ValueError naming the rule otherwise, on every rank before anything
        is done. The ranks need not agree on it (it changes no message).

    After the call, slot s of layer l holds bit for bit what expert
    ``new_phy2log[l, s]`` held before. Every rank must call it.

    Raises, on every rank and before any weight is touched: this rank's own
    TypeError/ValueError (or any exception its checks raised) on its bad
    input, :class:`~eplb.production.errors.AgreementError` (a ValueError) on
    the others, naming the refusing rank or the argument that differs between
    ranks; GroupFault if a rank does not reach the agreement in time. Once the
    move began, any failure on any rank (its own exception, a rank that froze
    or died, a wait past ``timeout``) raises
    :class:`~eplb.production.errors.RearrangeError` on every rank within
    ``timeout`` seconds, naming which layers this rank left new, old or mixed;
    the group is then aborted (NCCL) and refused by later calls: recreate it.
    On CUDA the host waits, within ``timeout``, until this rank's last
    messages have completed (not for the copies queued after them; not at all
    when this rank sends and receives nothing).

    With ``host_wait=False`` that wait is skipped, and a return then means
    only this: every rank agreed and issued its whole move (queued on the
    device; no rank raised while issuing it). Whether the messages arrive is
    not known: work queued afterwards on the current stream runs after the
    move's writes into ``into`` if they do, and never if a peer froze or died
    (its kernels wait). No later error comes from this call: the caller must
    bound its own wait for an event recorded after it (a staged apply's vote
    does) and, when that expires, fault the group
    (:meth:`~eplb.production.group_guard.GroupGuard.fault`). ``into`` then
    holds unknown contents; ``expert_weights`` are only read, never written,
    so they stay as they were whatever happens.

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
            timeout,
            into,
            host_wait,
        )


class PreparedRearrangement:
    """This rank's share of one move, worked out ahead (:func:`prepare_rearrangement`).

    Pass it to :func:`rearrange_expert_weights` (``prepared=``) with the same
    maps, tensor shapes and dtypes, group and ``max_batch_bytes``; the call
    checks that they match (a fingerprint) and refuses otherwise. It can be
    used more than once.

    rank, world_size: where it was made for.
    max_batch_bytes: the step budget it was cut with.
    num_steps: pipeline steps of this rank's program.
    seconds: host seconds :func:`prepare_rearrangement` took (what the call saves).
    """

    def __init__(
        self,
        key: int,
        rank: int,
        world_size: int,
        max_batch_bytes: int,
        steps: list[Step],
        work: SlotWork,
        schedule_writes: Callable[[], None],
    ) -> None:
        self._key = key
        self.rank = rank
        self.world_size = world_size
        self.max_batch_bytes = max_batch_bytes
        self._steps = steps
        self.num_steps = len(steps)
        self._work = work  # used where the call gets these very tensors
        self._schedule_writes = schedule_writes
        self.seconds = 0.0

    def _finish_schedule(self) -> None:
        """Schedule the writes if they are not yet (a move the call made lazily)."""
        self._schedule_writes()
        self._schedule_writes = _already_scheduled

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
    into: Sequence[Sequence[torch.Tensor]] | None = None,
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
    into: as for the call (the prepared move keeps references to them too).

    Raises TypeError/ValueError on bad input, as the call would. It never
    communicates (a worker thread may run it beside the serving thread's
    collectives), so it takes no ``timeout``: the call that uses it does.
    """
    start = time.perf_counter()
    rank, world_size = rank_and_size(group)
    old, new, layout, _ = check_input(
        old_phy2log, new_phy2log, expert_weights, world_size, max_batch_bytes, into
    )
    key = _digest(old, new, layout.signature, world_size)
    prepared = _prepare(
        old, new, layout, key, (rank, world_size), max_batch_bytes, expert_weights, into, True
    )
    prepared.seconds = time.perf_counter() - start
    return prepared


def _prepare(
    old: np.ndarray,
    new: np.ndarray,
    layout: Layout,
    key: int,
    where: tuple[int, int],
    max_batch_bytes: int,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    into: Sequence[Sequence[torch.Tensor]] | None,
    ahead: bool,
) -> PreparedRearrangement:
    """The prepared move of checked input; what the call and :func:`prepare_rearrangement` share.

    ahead=False (the call): the messages only; the writes are scheduled and each
    step's slot views laid out while the first steps move (lazily, once the
    executor asks for them).
    """
    rank, world_size = where
    plan = plan_checked(old, new, world_size)
    steps, order = program_messages(plan, layout, rank, max_batch_bytes)
    schedule_writes: Callable[[], None] = functools.partial(
        program_writes, plan, rank, steps, order, into is None
    )
    if ahead:
        schedule_writes()
        schedule_writes = _already_scheduled
    with torch.no_grad():
        work = SlotWork(expert_weights, steps, ahead=ahead, into=into)
    return PreparedRearrangement(
        key, rank, world_size, int(max_batch_bytes), steps, work, schedule_writes
    )


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
    timeout: object,
    into: Sequence[Sequence[torch.Tensor]] | None,
    host_wait: object,
) -> RearrangeStats:
    start = time.perf_counter()
    try:
        seconds, bad_timeout = check_timeout(DEFAULT_TIMEOUT if timeout is None else timeout), None
    except (TypeError, ValueError) as exc:  # refused below, on every rank (the agreement)
        seconds, bad_timeout = DEFAULT_TIMEOUT, exc
    rank, world_size = rank_and_size(group)
    guard = GroupGuard(group, timeout=seconds)

    def check() -> tuple[_Checked, dict[str, object]]:
        if bad_timeout is not None:
            raise bad_timeout
        check_host_wait(host_wait, into, None)
        old, new, layout, on = check_input(
            old_phy2log, new_phy2log, expert_weights, world_size, max_batch_bytes, into
        )
        device = on or torch.device("cpu")
        check_host_wait(host_wait, into, device)
        check_buffers(buffers, group, device)
        key = _digest(old, new, layout.signature, world_size)
        if prepared is not None:
            _check_prepared(prepared, key, rank, world_size, max_batch_bytes)
        # Every argument that shapes the plan or the wire. Not the timeout: each
        # rank's deadlines are its own, a difference changes no message.
        fields = {
            "old_phy2log": old,
            "new_phy2log": new,
            "expert_weights": f"{layout.signature} on {device.type}",
            "max_batch_bytes": int(max_batch_bytes),
            # Registered and unregistered buffers must not meet in one NCCL call.
            "buffers": buffers is not None,
            # A prepared move is checked above to be this very plan: it changes no message.
        }
        return _Checked(old, new, layout, device, key), fields

    progress: MoveProgress | None = None
    try:
        with guard.call("rearrange_expert_weights") as call:
            checked = call.propose(check)
            done_checks = time.perf_counter()
            given = prepared is not None
            if prepared is None:
                # Planned while the other ranks' verdicts arrive; nothing is
                # touched until confirm() says every rank agrees.
                prepared = _prepare(
                    checked.old,
                    checked.new,
                    checked.layout,
                    checked.key,
                    (rank, world_size),
                    max_batch_bytes,
                    expert_weights,
                    into,
                    False,
                )
            planned = time.perf_counter()
            call.confirm()
            agreed = time.perf_counter()
            steps = prepared._steps
            progress = MoveProgress(steps, checked.old.shape[0])
            device = checked.device
            try:
                with torch.no_grad(), on_device(device):
                    work = prepared._work
                    if given and not work.made_from(expert_weights, into):  # other tensors
                        work = SlotWork(expert_weights, steps, ahead=False, into=into)
                    phases = run_steps(
                        steps,
                        work,
                        device,
                        TorchDistributedTransport(group, call),
                        profile,
                        prepared._finish_schedule,
                        buffers.allocating() if buffers is not None else contextlib.nullcontext,
                        progress=progress,
                        host_wait=bool(host_wait),
                    )
                call.finish()
            except BaseException:
                # Read the write events now: the guard is about to abort the
                # communicator, after which a device in error may not answer.
                progress.settle()
                raise
    except Exception as exc:
        if progress is None:  # set once every rank agreed, before the first write
            raise  # refused (AgreementError on the others) or failed before any write
        new_layers, old_layers, mixed = progress.layers()
        raise RearrangeError.from_layers(
            "rearrange_expert_weights",
            rank=rank,
            cause=exc,
            layers_new=new_layers,
            layers_old=old_layers,
            layers_mixed=mixed,
        ) from exc
    if phases:
        phases["plan (host)"] = (agreed - start) * 1e3
        phases["of which checks"] = (done_checks - start) * 1e3
        phases["plan and messages"] = (planned - done_checks) * 1e3
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


class _Checked(NamedTuple):
    """One rank's checked input: both maps on the host, the weights' layout and device."""

    old: np.ndarray
    new: np.ndarray
    layout: Layout
    device: torch.device
    key: int


def warmup_rearrangement(
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    timeout: float | None = None,
) -> float:
    """Open the point-to-point channels to every peer now, not in the first rearrangement.

    NCCL creates a pair's P2P channels lazily, on the first send/recv between
    them (a fraction of a second on H200s); a serving engine calls this once at
    start-up (collective: every rank of ``group`` must call it). Each rank sends
    one byte to and receives one from every peer in one step of the transport.

    group: the EP process group (default: the world).
    device: where the bytes live (default: the current CUDA device for NCCL,
        else the CPU).
    timeout: seconds any one wait may take (None: ``group_guard.DEFAULT_TIMEOUT``);
        a rank that fails or stops answering makes every rank raise within it.

    Returns the seconds it took on this rank (0.0 for a single rank).
    """
    seconds = check_timeout(DEFAULT_TIMEOUT if timeout is None else timeout)
    return warm_up_group(group, device, seconds)


def _digest(old: np.ndarray, new: np.ndarray, signature: str, world_size: int) -> int:
    """A 62-bit fingerprint of everything the plan and the message sizes depend on."""
    h = hashlib.blake2b(digest_size=8)
    for part in (old.shape, world_size, signature):
        h.update(repr(part).encode())
    h.update(old.tobytes())
    h.update(new.tobytes())
    return int.from_bytes(h.digest(), "little") >> 2
