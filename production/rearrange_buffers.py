"""Message buffers a rearrangement keeps from one call to the next (opt-in).

:class:`RearrangeBuffers` owns the memory the executor's rings come from when a
caller keeps it: with NCCL, a pool registered with the group's communicator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist

from .group_guard import DEFAULT_TIMEOUT, check_timeout
from .transport import collective_device, rank_and_size, same_group, warm_up_group

__all__ = ["RearrangeBuffers", "check_buffers"]


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
        (``warmup_rearrangement``): registration needs the communicator.
    timeout: seconds that warm-up's waits may take (None:
        ``group_guard.DEFAULT_TIMEOUT``).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        timeout: float | None = None,
    ) -> None:
        seconds = check_timeout(DEFAULT_TIMEOUT if timeout is None else timeout)
        self.group = group
        world_size = rank_and_size(group)[1]
        if device is None:
            device = collective_device(group, torch.device("cpu")) if world_size > 1 else "cpu"
        self.device = torch.device(device)
        self._pool: torch.cuda.MemPool | None = None
        self._backend: Any = None  # ProcessGroupNCCL where registered
        self.closed = False
        if self.device.type == "cuda" and world_size > 1:
            warm_up_group(group, self.device, seconds)
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

    def allocating(self) -> Callable[[], AbstractContextManager[object]]:
        """A context manager factory: allocations inside come from the kept pool."""
        pool = self._pool
        if pool is None:
            return contextlib.nullcontext
        return lambda: torch.cuda.use_mem_pool(pool)


def check_buffers(buffers: object, group: dist.ProcessGroup | None, device: torch.device) -> None:
    """``buffers`` must be None or an open RearrangeBuffers of this group and device."""
    if buffers is None:
        return
    if not isinstance(buffers, RearrangeBuffers):
        raise TypeError(f"buffers must be a RearrangeBuffers or None, got {type(buffers).__name__}")
    if buffers.closed:
        raise ValueError("buffers was closed: make a new RearrangeBuffers")
    if not same_group(buffers.group, group):
        raise ValueError("buffers belongs to another process group than group")
    if buffers.registered and buffers.device != device:
        raise ValueError(f"buffers live on {buffers.device}, the expert weights on {device}")
