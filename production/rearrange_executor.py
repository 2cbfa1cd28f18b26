"""How a rearrangement's program runs on the device: streams, events, rings, copy batches.

:func:`run_steps` runs one rank's program (a list of
:class:`~eplb.production.rearrange_schedule.Step`): per step it packs the
outgoing slots into a send buffer, posts the step's messages through a
:class:`~eplb.production.transport.Transport`, and issues the writes the
schedule put at the end of an earlier step (local copies, unpacks from the
receive ring, post copies).

Packs, the wire and writes run on three streams (:class:`Streams`) that meet
through events only, so the wire waits for its own pack and a free receive
buffer, never for unrelated copies; buffers come from two rings. The ordering
this relies on, and which a recording fake of :class:`Streams` and of the
transport checks on the CPU (tests/test_rearrange_ordering.py):

- a slot is written only after every pack (and local copy) reading its old
  content is done: the write of step j waits for step j's messages and for the
  pack of step j + 1, and the schedule never puts a write before the last pack
  reading that slot minus one;
- a send buffer is reused (step k + 2) only after step k's messages are done;
- a receive buffer is reused (step k + depth) only after every unpack reading
  it is done.

The slot side of every copy (views of the weights' slots, copy batches) comes
from :class:`~eplb.production.slot_work.SlotWork`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ClassVar

import torch

from .rearrange_progress import MoveProgress
from .rearrange_schedule import (
    FIRST_RECV_SLOTS,
    HOST_LEAD,
    RING_SLACK,
    Message,
    Step,
    last_use,
    ring_depth,
    slot_bytes,
)
from .slot_work import CopyBatch, SlotViews, SlotWork, copy_all, message_region
from .transport import Transport

__all__ = [
    "Streams",
    "run_steps",
]


class Streams:
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
        """Stream ``which`` waits for ``event`` (from :meth:`record`)."""
        if event is not None:
            self._get(which).wait_event(event)
        elif self.cuda:  # waiting for work not issued yet would silently not wait
            raise AssertionError(f"the {which} stream waits for an event never recorded")

    def copy(self, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Queue ``destinations[i] <- sources[i]`` on the current stream (one dtype)."""
        copy_all(destinations, sources)


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
        steps: list[Step],
        device: torch.device,
        first: int,
        allocating: Callable[[], AbstractContextManager[object]],
    ) -> None:
        self._steps = steps
        self._allocating = allocating  # where the buffers come from (RearrangeBuffers)
        sent, self._received = slot_bytes(steps)
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
        self.last_use = last_use(self._steps)
        depth = max(ring_depth(self._steps, self.last_use, slack), self.depth)
        device = self._send.device
        with self._allocating():
            self._recv += [
                torch.empty(self._received, dtype=torch.uint8, device=device)
                for _ in range(depth - len(self._recv))
            ]
        self.depth = depth

    def send(self, k: int, step: Step) -> list[torch.Tensor]:
        return _split(self._send[k % 2], step.sends)

    def recv(self, k: int, step: Step) -> list[torch.Tensor]:
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


def _split(slot: torch.Tensor, messages: list[Message]) -> list[torch.Tensor]:
    """One buffer per message, back to back in one ring slot (sizes are multiples of ALIGN)."""
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


def run_steps(
    steps: list[Step],
    slot_work: SlotWork,
    device: torch.device,
    transport: Transport,
    profile: bool,
    schedule_writes: Callable[[], None],
    allocating: Callable[[], AbstractContextManager[object]],
    streams: Streams | None = None,
    progress: MoveProgress | None = None,
    host_wait: bool = True,
) -> dict[str, float]:
    """Move every step: the wire moves step k while step k + 1 is packed and older steps written.

    Host order per step k: issue k's messages (waiting, on the GPU, for k's pack
    and a free receive buffer), pack k + 1, then the writes of step k - HOST_LEAD
    (after that step's messages and the pack of the step after it, so no pack
    reads a slot after its write: packs of later steps never read those slots).
    No host sync; the wire never waits for writes beyond the receive ring's
    depth. ``steps`` come with their messages only: ``schedule_writes`` fills
    in their writes, called once the first steps are issued, so the host works
    it out while they move. Each step's copies are laid out just before they are
    launched, while earlier steps move; their slot sides come from ``slot_work``
    where it has them (a prepared move): only the buffer sides are left.

    steps: this rank's program (rearrange_schedule.program, or program_messages
        with ``schedule_writes`` calling program_writes).
    transport: the wire (rearrange's calls pass a TorchDistributedTransport).
    streams: the stream and event layer (default: :class:`Streams` of
        ``device``); tests pass a recording fake with the same methods.
    progress: told as each step's writes are issued and (their event) done;
        when this raises, it says which layers the move left new, old or mixed.

    host_wait: on CUDA, the host returns once this rank's last messages have
        completed (:meth:`Transport.wait_device`, within the transport's
        deadline; at once when this rank has none): a peer that froze or died
        is noticed here, not by a stream that never finishes. False: the host
        returns once everything is queued, without that wait (nor ``progress``
        settled): a dead peer then leaves the streams waiting, and the caller
        must bound its own wait for work queued after this (a staged apply's
        vote does). No effect on the CPU, where every step's messages are
        waited for by :meth:`Transport.wait` (gloo's work is not stream-ordered).

    The writes queued after the messages may still be running. Whatever fails
    is raised as is; the caller reports the layers from ``progress``.
    """
    begun = time.perf_counter()
    slots = slot_work.slots
    if streams is None:
        streams = Streams(device)
    phases = _Phases(profile and streams.cuda)
    # Allocated on the current stream, which waits for every stream at the end:
    # this memory is reused only after its last use.
    rings = _Rings(steps, device, FIRST_RECV_SLOTS, allocating)
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
    with streams.use("pack"):
        _issue(
            [_pack_batch(steps[0], sending[0], slots, slot_work.pack_sources(0))],
            streams,
            phases,
        )
        packed[0] = streams.record("pack")
    for k in range(len(steps) + HOST_LEAD):
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
                transport.wait(
                    transport.post(
                        [(m.peer, b) for m, b in zip(steps[k].sends, sending[k], strict=True)],
                        [(m.peer, b) for m, b in zip(steps[k].recvs, received[k], strict=True)],
                    )
                )
                phases.mark("wire", end=True)
                sent[k] = streams.record("issue")
        if k + 1 < len(steps):
            with streams.use("pack"):
                if k >= 1:  # send slot (k + 1) % 2 last held step k - 1
                    streams.wait_event("pack", sent[k - 1])
                pack = _pack_batch(
                    steps[k + 1], sending[k + 1], slots, slot_work.pack_sources(k + 1)
                )
                _issue([pack], streams, phases)
                packed[k + 1] = streams.record("pack")
        j = k - HOST_LEAD  # the step whose writes are issued now
        if j == 0:
            scheduled = time.perf_counter()
            schedule_writes()
            rings.extend(HOST_LEAD + RING_SLACK)
            staging = _allocate_staging(steps, slots)
            if phases.enabled:
                phases.host["schedule writes"] = time.perf_counter() - scheduled
        if j >= 0:
            with streams.use("write"):
                streams.wait_event("write", sent[j])
                if j + 1 < len(steps):
                    streams.wait_event("write", packed[j + 1])
                if progress is not None:
                    progress.issuing(j)
                _issue(
                    _write_batches(steps[j], slots, received, *slot_work.writes(j, staging)),
                    streams,
                    phases,
                )
                written[j] = streams.record("write")
                if progress is not None:
                    progress.issued_all(j, written[j] if streams.cuda else None)
    for which in ("pack", "issue", "write"):
        streams.wait("current", which)
    phases.mark("total", end=True)
    last = sent[-1] if sent else None
    messages = any(step.sends or step.recvs for step in steps)
    if host_wait and streams.cuda and last is not None and messages:
        # The only host wait of the move: no success is reported before this
        # rank's messages have arrived (a dead peer would leave them pending).
        # Without messages (one rank, or none of this rank's in this move) no
        # peer can hold it up, and the event only follows the work queued
        # before the call (a staged launch: the forward pass just queued), so
        # the host does not wait for it.
        transport.wait_device(last, "this rank's last messages")
        if progress is not None:
            progress.settle()
    return phases.totals()


def _issue(batches: list[CopyBatch], streams: Streams, phases: _Phases) -> None:
    """Launch batches in order on the current stream, timing each phase when profiling."""
    for batch in batches:
        phases.mark(batch.phase)
        for destinations, sources in batch.pairs.values():
            streams.copy(destinations, sources)
        phases.mark(batch.phase, end=True)


def _allocate_staging(
    steps: list[Step], slots: SlotViews
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
    step: Step,
    buffers: list[torch.Tensor],
    slots: SlotViews,
    sources: list[list[torch.Tensor]],
) -> CopyBatch:
    """The step's outgoing experts copied into their messages' buffers.

    sources: the slot views of each message part, in order.
    """
    batch = CopyBatch("pack")
    i = 0
    for message, buffer in zip(step.sends, buffers, strict=True):
        for layer, tensor, offset, mine in message.parts:
            rows = slots.region_rows(buffer, layer, tensor, offset, len(mine))
            batch.add(rows, sources[i])
            i += 1
    return batch


def _write_batches(
    step: Step,
    slots: SlotViews,
    received: list[list[torch.Tensor]],
    local: list[CopyBatch],
    unpacked: list[list[torch.Tensor]],
    post: CopyBatch,
) -> list[CopyBatch]:
    """The writes due at the end of a step: local copies, then unpacks, then post copies.

    local, unpacked, post: the slot sides (:meth:`SlotWork.writes`): the local
        copies, the unpacks' destinations and the post copies.
    """
    unpack = CopyBatch("unpack")
    for part, destinations in zip(step.unpacks, unpacked, strict=True):
        buffer = received[part.step][part.message]
        region = message_region(
            buffer, slots.whole(part.layer, part.tensor), part.offset, part.count
        )
        # unbind makes every row in one call; one row at a time costs more per row.
        held = region.unbind(0) if 2 * len(part.rows) > part.count else region
        unpack.add(destinations, [held[r] for r in part.rows])
    return [b for b in (*local, unpack, post) if b.pairs]
