"""Which wire a rearrangement's messages take: a small transport interface.

The executor (:mod:`eplb.production.rearrange_executor`) hands a
:class:`Transport` one pipeline step's messages at a time: :meth:`Transport.post`
issues the step's sends and receives together, :meth:`Transport.wait` waits
for them (on CUDA: makes the current stream wait, the host does not block),
:meth:`Transport.wait_device` blocks the host until an event recorded after
such a wait has completed (on CUDA, the host's one way to learn that the wire
is done), and :meth:`Transport.warm_up` opens the channels ahead of the first
move. Given a :class:`~eplb.production.group_guard.GuardedCall`, the
transport's waits take its deadline and read its failure board: on gloo the
step's works are waited by the guard (``wait_works``), on CUDA events are
polled (``wait_event``), so no host thread sits in a collective past the
deadline; the guard aborts an NCCL communicator when its call fails.
:class:`TorchDistributedTransport` implements it over ``torch.distributed``
(NCCL or gloo) and is the only code of the library that calls point-to-point
operations. A test swaps in a recording fake to check the executor's ordering
on the CPU; another transport (NVSHMEM, a different communicator) is one class.

Also the process-group helpers the rearrangement modules share
(:func:`rank_and_size`, :func:`collective_device`, :func:`same_group`,
:func:`on_device`).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from .group_guard import DEFAULT_TIMEOUT, GroupGuard, GuardedCall

__all__ = [
    "TorchDistributedTransport",
    "Transport",
    "collective_device",
    "on_device",
    "rank_and_size",
    "same_group",
    "warm_up_group",
]


class Transport(abc.ABC):
    """Point-to-point messages of one rank, one pipeline step at a time.

    Peers are ranks of the transport's group (0 .. world_size - 1). Buffers are
    1-D uint8 tensors; a send's buffer must not be written, nor a receive's
    read, until :meth:`wait` of its step returned.
    """

    @abc.abstractmethod
    def post(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> object:
        """Issue one step's messages, all at once: (peer, buffer) per send and receive.

        Returns a handle for :meth:`wait`. Both sides list a pair's messages in
        the same order.
        """

    @abc.abstractmethod
    def wait(self, pending: object) -> None:
        """Wait for the step :meth:`post` returned ``pending`` for.

        On CUDA the current stream waits (work queued after it sees the
        messages done; :meth:`wait_device` bounds the host's wait); on the CPU
        the host waits, within the transport's deadline where it has one.
        """

    def wait_device(self, done: torch.cuda.Event, what: str) -> None:
        """Block the host until ``done`` (recorded after a step's :meth:`wait`) has completed.

        What a transport with a deadline bounds (raising once it passes); this
        default waits without one. what: what is awaited, for the message.
        """
        done.synchronize()

    @abc.abstractmethod
    def warm_up(self, device: torch.device) -> None:
        """Open the channels to every peer now (collective: every rank calls it)."""


class _Posted(NamedTuple):
    """One step's works and the peers they talk to (for the deadline's message)."""

    works: list[dist.Work]
    peers: tuple[int, ...]
    cuda: bool


class TorchDistributedTransport(Transport):
    """:class:`Transport` over a ``torch.distributed`` group (one ``batch_isend_irecv`` per step).

    group: the process group (None: the world).
    call: the guarded call the messages belong to: every wait takes its
        deadline and raises GroupFault as soon as another rank posts a
        failure. None: waits end only by the process group's own timeout.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, call: GuardedCall | None = None
    ) -> None:
        self.group = group
        self.call = call
        self.rank, self.world_size = rank_and_size(group)

    def post(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> object:
        # Sends, then receives, each in the order given (peers ascending).
        ops = [
            dist.P2POp(op, buffer, self._global(peer), self.group)
            for op, messages in ((dist.isend, sends), (dist.irecv, recvs))
            for peer, buffer in messages
        ]
        works = dist.batch_isend_irecv(ops) if ops else []
        peers = tuple(sorted({peer for messages in (sends, recvs) for peer, _ in messages}))
        cuda = any(buffer.is_cuda for messages in (sends, recvs) for _, buffer in messages)
        return _Posted(works, peers, cuda)

    def wait(self, pending: object) -> None:
        assert isinstance(pending, _Posted)
        if self.call is not None and not pending.cuda:
            # gloo: the host waits for the messages themselves, within the deadline.
            self.call.wait_works(pending.works, "a step's messages", pending.peers)
            return
        for work in pending.works:  # NCCL: only orders the current stream
            work.wait()

    def wait_device(self, done: torch.cuda.Event, what: str) -> None:
        if self.call is None:
            done.synchronize()
            return
        peers = [peer for peer in range(self.world_size) if peer != self.rank]
        self.call.wait_event(done, what, peers)

    def warm_up(self, device: torch.device) -> None:
        # One byte to and from every peer in one batch: NCCL opens a pair's
        # channels lazily, on its first send/recv.
        out = torch.zeros(self.world_size, dtype=torch.uint8, device=device)
        into = torch.empty(self.world_size, dtype=torch.uint8, device=device)
        peers = [peer for peer in range(self.world_size) if peer != self.rank]
        with on_device(device):
            self.wait(
                self.post(
                    [(peer, out[peer : peer + 1]) for peer in peers],
                    [(peer, into[peer : peer + 1]) for peer in peers],
                )
            )
            if device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
                self.wait_device(done, "the warm-up's messages")

    def _global(self, peer: int) -> int:
        """P2POp wants global ranks on every torch version this supports."""
        if self.group is None or self.group is dist.GroupMember.WORLD:
            return peer
        return dist.get_global_rank(self.group, peer)


def warm_up_group(
    group: dist.ProcessGroup | None,
    device: torch.device | str | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> float:
    """:meth:`TorchDistributedTransport.warm_up` of ``group``; seconds taken (0.0 for one rank).

    Runs as one guarded call (:class:`~eplb.production.group_guard.GroupGuard`):
    every wait within ``timeout`` seconds, one outcome on every rank.
    """
    start = time.perf_counter()
    if rank_and_size(group)[1] == 1:
        return 0.0
    if device is None:
        device = collective_device(group, torch.device("cpu"))
    where = torch.device(device)
    with GroupGuard(group, timeout=timeout).call("warmup_rearrangement") as call:
        call.agree(lambda: (None, {"device type": where.type}))
        TorchDistributedTransport(group, call).warm_up(where)
        call.finish()
    return time.perf_counter() - start


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return rank, dist.get_world_size(group)


def same_group(a: object, b: object) -> bool:
    """None stands for the world group."""
    world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return (world if a is None else a) is (world if b is None else b)


def collective_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where a collective's tensor must live for this group's backend."""
    if device.type != "cpu" or "nccl" not in str(dist.get_backend(group)):
        return device
    return torch.device("cuda", torch.cuda.current_device())


class on_device:
    """Make ``device`` current while moving (NCCL hangs if another device is current)."""

    def __init__(self, device: torch.device) -> None:
        self._inner = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self) -> None:
        if self._inner is not None:
            self._inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._inner is not None:
            self._inner.__exit__(*exc)
