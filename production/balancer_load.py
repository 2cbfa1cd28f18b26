"""The window's load on its way to the host: the EP group's sum, its copy, its deadline.

An ``ExpertBalancer`` sums each interval's load over the EP group and brings
it to the host without stalling the serving thread (:func:`reduce_load`); the
worker or the placement service reads it once it has arrived
(:func:`load_arrived`, polled against a deadline). A reduction that fails or
passes its deadline faults the group as a failed guarded call does
(:func:`fault_load_group`).
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .group_guard import GroupGuard

__all__ = ["LoadTimeout", "fault_load_group", "load_arrived", "reduce_load"]


def reduce_load(
    snapshot: torch.Tensor,
    host_load: torch.Tensor,
    group: dist.ProcessGroup | None,
    multi_rank: bool,
    side_stream: torch.cuda.Stream | None,
    timeout: float,
) -> torch.cuda.Event | None:
    """Sum ``snapshot`` over ``group`` into ``host_load``; the copy's event (None: done).

    snapshot: [L, E] int64 on the balancer's device, this rank's window total
        (on the CPU it is also ``host_load``, summed in place).
    host_load: [L, E] int64 pinned host tensor the sum lands in (CUDA).
    group, multi_rank: the EP group, and whether it has more than one rank
        (one rank: nothing to sum).
    side_stream: where the reduction and the copy run on CUDA, after the work
        queued on the current stream: neither the compute stream nor the host
        waits for them. None: the CPU, where the host waits within ``timeout``
        (gloo), a rank that froze or died noticed then, not after the group's
        own 30 minutes; a failure there faults the group and raises.
    """
    if side_stream is None:
        if multi_rank:
            try:
                work = dist.all_reduce(snapshot, group=group, async_op=True)
                work.wait(timeout=timedelta(seconds=timeout))
            except Exception as exc:
                fault_load_group(group, exc, timeout)
                raise
        return None
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(snapshot.device))
    with torch.cuda.stream(side_stream):
        side_stream.wait_event(ready)
        if multi_rank:
            dist.all_reduce(snapshot, group=group)
        host_load.copy_(snapshot, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    return copied


class LoadTimeout(TimeoutError):
    """The window's load, all-reduced over the EP group, did not reach the host in time."""


def fault_load_group(group: dist.ProcessGroup | None, cause: BaseException, timeout: float) -> None:
    """Fault ``group`` after its load all-reduce failed (expired or broke), as a guarded
    call's failure does: post on the failure board, mark the group faulted (later
    guarded calls on it refuse at once) and abort its NCCL communicator, whose
    pending all-reduce would otherwise spin on a dead peer. One rank: nothing to do.
    """
    guard = GroupGuard(group, timeout=timeout)
    if guard.world_size > 1:
        peers = [rank for rank in range(guard.world_size) if rank != guard.rank]
        guard.fault(f"the load's all-reduce over the EP group failed: {cause}", peers)


def load_arrived(copied: torch.cuda.Event | None, deadline: float, timeout: float) -> bool:
    """Whether the load's copy to the host is done (``copied``: its event, None: no copy).

    Polled, never ``synchronize()``: a peer that died leaves the load's
    all-reduce pending for ever; past ``deadline`` (``time.monotonic``) this
    raises TimeoutError naming ``timeout``.
    """
    if copied is None or copied.query():
        return True
    if time.monotonic() > deadline:
        raise LoadTimeout(
            f"the load's all-reduce over the EP group did not complete within "
            f"{timeout:g} s: a rank froze or died"
        )
    return False
