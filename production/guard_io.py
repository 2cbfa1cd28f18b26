"""What the group guard does outside its own bookkeeping: reach the group's store,
run blocking store requests on a daemon thread, abort a communicator.

``eplb.production.group_guard`` builds its deadlines, failure board and
agreement on these; they hold no state of their own.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["DaemonWorker", "abort_group", "get_all", "group_store"]

T = TypeVar("T")


def abort_group(group: dist.ProcessGroup | None) -> bool:
    """Abort ``group``'s NCCL communicator: its pending kernels and operations fail, none hangs.

    Uses ``ProcessGroup.abort()`` (2.13 has it; ``benchmarks/check_group_guard.py``
    tells for the installed torch), else c10d's ``_abort_process_group``. Only groups
    with an NCCL backend are aborted: NCCL kernels waiting on a dead peer spin
    on the GPU forever otherwise. gloo accepts the call but leaves its pending
    receives pending, so it gains nothing; its waits end by their own deadline.
    Either way a faulted group is refused by every later guarded call.
    Returns True if the communicator was aborted; errors while aborting are
    swallowed: the caller is already raising the reason.
    """
    target = group if group is not None else dist.group.WORLD
    if "nccl" not in str(dist.get_backend(group)):
        return False
    abort = getattr(target, "abort", None)
    if abort is None:  # older torch: the same through c10d's internal helper
        internal = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if internal is None:
            return False
        abort = functools.partial(internal, target)
    try:
        abort()
    except Exception:  # best effort; the caller raises the real failure
        return False
    return True


def group_store(group: dist.ProcessGroup | None) -> dist.Store:
    """The store ``group`` rendezvoused with (keys under the group's own prefix)."""
    target = group if group is not None else dist.group.WORLD
    getter = getattr(target, "get_group_store", None)
    if getter is not None:
        return getter()
    internal = getattr(dist.distributed_c10d, "_get_process_group_store", None)
    if internal is None:
        raise ValueError("this torch cannot give the group's store: pass store= to GroupGuard")
    return internal(target)


_Request = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonWorker:
    """One daemon thread running requests in order, each answered through a Future.

    Not a ThreadPoolExecutor: the interpreter joins those at exit, so a request
    stuck on a frozen store host (up to the store's 30 min timeout) would keep
    a failed process from exiting. A daemon thread does not.
    """

    def __init__(self, name: str) -> None:
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            future, function, args = request
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as exc:
                    future.set_exception(exc)

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._requests.put((future, function, args))
        return future

    def shutdown(self) -> None:
        """Stop once the requests queued so far have run; never waits for them."""
        self._requests.put(None)


def get_all(store: dist.Store, keys: list[str]) -> list[str]:
    """The values of ``keys``, decoded, in one request where the store can (``multi_get``)."""
    multi_get = getattr(store, "multi_get", None)
    raw = multi_get(keys) if multi_get is not None else [store.get(k) for k in keys]
    return [bytes(v).decode() for v in raw]
