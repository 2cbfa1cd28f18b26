"""Deadlines and failure signalling for the collective calls of an EP group.

A weight move is a collective: if one rank raises, freezes or dies in the
middle, the others would wait in their receives until the process group's
timeout (30 minutes for gloo, 10 for NCCL) and a serving deployment stands
still. :class:`GroupGuard` bounds every wait of a call and lets a failing rank
tell the others at once:

- **Call ids**: every guarded call on a group takes the next number of a
  counter this process keeps per group. Every rank makes the same calls in the
  same order (they are collectives), so the numbers agree without talking.
- **Failure board**: the group's key-value store (the one ``torch.distributed``
  rendezvoused with, ``ProcessGroup.getgroup_store()``). A rank that fails in
  call ``n`` writes ``rank r failed: <reason>`` under call ``n``'s keys; every
  wait of the others polls the board (one store round trip every
  ``board_interval`` seconds, never on the fast path) and raises as soon as it
  sees it: well under the timeout. A post by :meth:`GroupGuard.fault` (the
  poster faulted the group) faults the group on the reader too.
- **Deadlines**: each wait (a ``torch.distributed`` work, a CUDA event, the
  agreement) gives up ``timeout`` seconds after it began. The calling thread
  never blocks in a collective: it polls CUDA events (``query()``), and a gloo
  work is waited on by a daemon thread with one ``wait(timeout)`` bounded by
  the deadline (gloo works complete only inside ``wait()``, and a gloo wait
  that times out closes its connection). Store requests run on a daemon
  thread too, so a frozen store host cannot stall the caller past its
  deadline, nor keep a failed process from exiting.
- **Agreement** (:meth:`GuardedCall.agree`): before any weight is touched,
  every rank posts a fingerprint of each argument that shapes the plan or the
  wire, or its refusal (the text of any exception its checks raised, not only
  TypeError/ValueError). A refusal or a difference is raised on every rank,
  naming the rank and the argument. It goes through the store, not the
  communicator, so it has a deadline on NCCL and gloo alike and a refused call
  leaves the communicator clean.
- **One outcome** (:meth:`GuardedCall.finish`): a closing round in which
  every rank posts its success; a rank that finished its share while another
  failed after it raises too.
- **Abort**: a call that fails after the agreement leaves messages in flight
  (sends nobody will receive, receives nobody will send). The guard aborts the
  group's communicator (``ProcessGroup.abort()``), which frees NCCL kernels
  stuck on the GPU, and marks the group faulted: later guarded calls on it
  raise at once. Recreate the group before moving weights again. Work that
  outlives its call (a staged apply's vote, issued after a move that returned
  without the host waiting for its messages) is faulted the same way, by
  :meth:`GroupGuard.fault`, when its own deadline expires.

Errors (``eplb.production.errors``): AgreementError (a ValueError: nothing
was touched), GroupFault (another rank failed, or a wait expired) and
RearrangeError, which a weight move raises with the layers this rank left new,
old or possibly mixed.
"""

from __future__ import annotations

import json
import math
import numbers
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import GroupFault
from .guard_io import DaemonWorker, abort_group, get_all, group_store
from .verdicts import compare_verdicts, fingerprint

__all__ = [
    "DEFAULT_TIMEOUT",
    "GroupGuard",
    "GuardedCall",
    "abort_group",
    "check_timeout",
    "fault_of",
]

#: Seconds one wait of a guarded call may take (see :func:`check_timeout`).
#: The longest legitimate wait is a whole move seen from its last event: a full
#: DeepSeek-V3 rank at EP32 (58 layers x 9 slots x ~44 MB, about 23 GB) takes a
#: few seconds at a realistic 5-25 GB/s per rank, so 90 s leaves an order of
#: magnitude for slow links and ranks that arrive late, and still fails twenty
#: times sooner than the process group's default timeout (30 minutes).
DEFAULT_TIMEOUT = 90.0

_T = TypeVar("_T")
_PREFIX = "eplb/guard"
_GRACE = 0.5  # seconds a store request may take past a deadline (normally < 1 ms)
# Per process group object: a new group (the recovery after a fault) starts
# afresh on every rank, including a restarted one.
_counters: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
_faulted: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


class _Single:
    """The key of a single process without torch.distributed."""


_SINGLE = _Single()
_registry_lock = threading.Lock()


def check_timeout(timeout: object) -> float:
    """``timeout`` as float seconds if it is a finite number > 0, else TypeError/ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    return seconds


def fault_of(group: dist.ProcessGroup | None) -> str | None:
    """Why ``group`` faulted (None: it has not, or torch.distributed is not initialized).

    Cheap (no store, no communication): for code that issues a collective on
    the group outside a guarded call and must refuse a faulted group at once.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return _faulted.get(group if group is not None else dist.group.WORLD)


class GroupGuard:
    """Deadlines, a failure board and an agreement for the calls of one group.

    group: the process group (None: the default group, or a single process
        when torch.distributed is not initialized).
    timeout: seconds any one wait of a call may take (:data:`DEFAULT_TIMEOUT`).
    store: the key-value store every rank of the group shares (default: the
        group's own, ``ProcessGroup.getgroup_store()``).
    board_interval: seconds between two reads of the failure board while
        waiting: how late a rank learns of another's failure.
    abort_on_fault: abort the communicator when a call fails after its
        agreement (see :func:`abort_group`).

    Cheap to make (no communication); make one per call or keep one.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        store: dist.Store | None = None,
        board_interval: float = 0.05,
        abort_on_fault: bool = True,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.board_interval = check_timeout(board_interval)
        self.group = group
        self.abort_on_fault = bool(abort_on_fault)
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            if self.rank < 0:
                raise ValueError("this process is not a member of group")
            self.world_size = dist.get_world_size(group)
            self.key: object = group if group is not None else dist.group.WORLD
        elif group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        else:
            self.rank, self.world_size, self.key = 0, 1, _SINGLE
        self._store = store
        if self._store is None and self.world_size > 1:
            self._store = group_store(group)

    @property
    def faulted(self) -> str | None:
        """Why this group faulted in an earlier call (None: it has not)."""
        return _faulted.get(self.key)

    def mark_faulted(self, reason: str) -> bool:
        """Mark the group faulted and, with ``abort_on_fault``, abort its communicator.

        Later guarded calls on the group raise GroupFault at once (the first
        reason is kept). Returns whether the communicator was aborted
        (:func:`abort_group`: NCCL only). A single rank has nothing to fault.
        """
        if self.world_size == 1:
            return False
        with _registry_lock:
            _faulted.setdefault(self.key, reason)
        return abort_group(self.group) if self.abort_on_fault else False

    def fault(self, reason: str, failed: Sequence[int] | None = None) -> bool:
        """Fault the group outside a guarded call: what a call that fails after its agreement does.

        For work a guarded call left behind it on the device (a collective
        queued after a move that returned without waiting for its messages)
        whose own deadline expired: posts ``reason`` on the failure board under
        the next call's number, so that a rank entering that call (the next
        guarded call of every rank) raises GroupFault at once instead of
        waiting for this one; then :meth:`mark_faulted` (faulted, and the NCCL
        communicator aborted: its kernels stuck on a dead peer end).

        failed: the ranks the failure is about, as for :meth:`GuardedCall.fail`
            (None: this rank). Returns whether the communicator was aborted.
        """
        if self.world_size == 1:
            return False
        with _registry_lock:
            number = _counters.get(self.key, 0)
        call = GuardedCall(self, "fault", number)
        try:
            call.fail(reason, failed, group_faulted=True)  # best effort within one second
        finally:
            if call._executor is not None:
                call._executor.shutdown()
        return self.mark_faulted(reason)

    def call(self, name: str) -> GuardedCall:
        """The next guarded call on this group (every rank must make the same calls)."""
        if self.world_size > 1 and self.key in _faulted:
            raise GroupFault(
                f"{name}: the process group faulted in an earlier call ({_faulted[self.key]}); "
                "its communicator may hold stale messages: recreate the group",
                rank=self.rank,
                failed_ranks=(),
                timed_out=False,
            )
        with _registry_lock:
            number = _counters.get(self.key, 0)
            _counters[self.key] = number + 1
        return GuardedCall(self, name, number)


class GuardedCall:
    """One collective call under a :class:`GroupGuard`; use it as a context manager.

    Leaving the block with an exception posts it on the failure board (so the
    other ranks raise at once) and, if the agreement had passed, aborts the
    communicator and marks the group faulted.
    """

    def __init__(self, guard: GroupGuard, name: str, number: int) -> None:
        self.guard = guard
        self.name = name
        self.number = number
        self.agreed = False
        self._posted = False
        self._verdict: Future[None] | None = None
        self._executor: DaemonWorker | None = None
        self._waiter: DaemonWorker | None = None
        if guard.world_size > 1:
            # Store requests block in C++ until the store's own timeout (the
            # group's, 30 min) if its host froze: they run here, the caller only
            # polls their futures against its deadline.
            self._executor = DaemonWorker("eplb-guard")

    # ------------------------------------------------------------------ keys

    def _key(self, *parts: object) -> str:
        return "/".join((_PREFIX, str(self.number), *map(str, parts)))

    def __enter__(self) -> GuardedCall:
        if self._executor is not None and self.number >= 2:
            # No rank reads call n - 2's keys any more: this rank's agreement on
            # call n - 1 saw every rank's verdict, posted after it left call n - 2.
            stale = "/".join((_PREFIX, str(self.number - 2)))
            mine = [f"{stale}/verdict/{self.guard.rank}", f"{stale}/failed/{self.guard.rank}"]
            shared = [f"{stale}/failures", f"{stale}/finished"] if self.guard.rank == 0 else []

            def forget(store: dist.Store) -> None:
                for key in mine + shared:
                    store.delete_key(key)  # False where it never existed

            self._submit(forget)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None and self.guard.world_size > 1:
                if not self._posted:
                    # A GroupFault reports other ranks (or a deadline), not this one.
                    about = exc.failed_ranks if isinstance(exc, GroupFault) else None
                    self.fail(f"{type(exc).__name__}: {exc}", about)
                if self.agreed:
                    self.guard.mark_faulted(f"{self.name} #{self.number}: {exc}")
        finally:
            # Never wait here for a store request stuck on a frozen store host,
            # nor for a work: its wait ends by its own deadline.
            for executor in (self._executor, self._waiter):
                if executor is not None:
                    executor.shutdown()

    # ------------------------------------------------------------------ store access

    def _submit(self, request: Callable[[dist.Store], _T]) -> Future[_T]:
        assert self._executor is not None and self.guard._store is not None
        store = self.guard._store
        return self._executor.submit(request, store)

    def _fault(
        self, message: str, failed: tuple[int, ...], timed_out: bool, cause: BaseException | None
    ) -> GroupFault:
        error = GroupFault(
            f"{self.name} (call #{self.number}) on rank {self.guard.rank}: {message}",
            rank=self.guard.rank,
            failed_ranks=failed,
            timed_out=timed_out,
        )
        error.__cause__ = cause
        return error

    def _result(self, future: Future[_T], deadline: float, what: str) -> _T:
        """A store request's result, or GroupFault once ``deadline`` passes."""
        try:
            # A request sent just before the deadline still gets its round trip.
            return future.result(timeout=max(_GRACE, deadline - time.monotonic()))
        except FutureTimeout:
            raise self._fault(
                f"the group's store did not answer {what} within {self.guard.timeout:g} s "
                "(its host may be frozen)",
                (),
                True,
                None,
            ) from None
        except Exception as exc:  # the store host died: connection refused or reset
            raise self._fault(
                f"the group's store failed {what} ({type(exc).__name__}: {exc}); the rank "
                "hosting it may have died",
                (),
                False,
                exc,
            ) from exc

    # ------------------------------------------------------------------ failure board

    def fail(
        self, reason: str, failed: Sequence[int] | None = None, *, group_faulted: bool = False
    ) -> None:
        """Post this rank's failure on the board (once; a second call does nothing).

        failed: the ranks the failure is about: this rank (None, the default),
            or, when this rank only relays another's failure or a deadline,
            the ranks it names (possibly none).
        group_faulted: this rank faulted the group (:meth:`GroupGuard.fault`):
            a rank that reads the post marks the group faulted too, so that its
            later calls refuse at once as well.

        Best effort within one second: a failing rank must not hang on a frozen store.
        """
        if self._posted or self._executor is None:
            return
        self._posted = True
        rank = self.guard.rank
        text = json.dumps(
            {
                "text": f"rank {rank} failed: {reason}",
                "failed": [rank] if failed is None else [int(r) for r in failed],
                "faulted": bool(group_faulted),
            }
        )
        key, count = self._key("failed", rank), self._key("failures")

        def post(store: dist.Store) -> None:
            store.set(key, text)
            store.add(count, 1)

        try:
            self._submit(post).result(timeout=1.0)
        except Exception:  # the caller is already raising the reason
            pass

    def _read_board(self, store: dist.Store) -> list[dict[str, Any]]:
        if store.add(self._key("failures"), 0) == 0:
            return []
        posted = []
        for rank in range(self.guard.world_size):
            key = self._key("failed", rank)
            if rank != self.guard.rank and store.check([key]):
                posted.append(json.loads(store.get(key).decode(errors="replace")))
        return posted

    def _raise_posted(self, posted: list[dict[str, Any]]) -> None:
        """GroupFault naming the failed ranks the posts name (relays name the original).

        A post of a rank that faulted the group (outside a call: its
        communicator may be aborted) faults it here too, even before the agreement.
        """
        if posted:
            text = "; ".join(post["text"] for post in posted)
            if any(post.get("faulted") for post in posted):
                self.guard.mark_faulted(f"{self.name} #{self.number}: {text}")
            raise self._fault(
                text,
                tuple(sorted({r for post in posted for r in post["failed"]})),
                False,
                None,
            )

    def check(self) -> None:
        """Raise GroupFault if another rank posted a failure (one store round trip)."""
        if self._executor is None:
            return
        deadline = time.monotonic() + self.guard.timeout
        self._raise_posted(self._result(self._submit(self._read_board), deadline, "a read"))

    # ------------------------------------------------------------------ waits

    def wait_until(self, done: Callable[[], bool], what: str, peers: Sequence[int] = ()) -> None:
        """Poll ``done()`` until it is True; GroupFault on a posted failure or the deadline.

        done: a non-blocking test that turns True by itself (``event.query``).
        what: what is awaited, for the message.
        peers: the ranks it waits on, named as failed if the deadline passes.
        """
        if done():
            return

        def ready(pause: float) -> bool:
            if done():
                return True
            time.sleep(pause)
            return False

        # Slept in steps of at most 0.2 ms: the host learns of the end that late
        # at most (a move's last event ends its call), for a few % of a core.
        self._await(ready, what, 0.2e-3, peers)

    def wait_works(
        self, works: Sequence[Any], what: str = "a step's messages", peers: Sequence[int] = ()
    ) -> None:
        """Wait for ``torch.distributed`` works with the deadline; raise what they raise.

        gloo's works complete only inside ``wait()``, and a gloo wait that times
        out closes its connection, so it cannot be polled in slices: a waiter
        thread makes one ``wait(timeout)`` per work, bounded by this wait's
        deadline, while this thread reads the failure board. A dead peer makes
        gloo's wait raise at once (connection closed). With NCCL ``wait()``
        returns at once (it only orders the current stream): follow it with
        :meth:`wait_event` for the host's deadline. peers: as for :meth:`wait_until`.
        """
        if not works:
            return
        if self._waiter is None:
            self._waiter = DaemonWorker("eplb-guard-wait")
        deadline = time.monotonic() + self.guard.timeout

        def wait_all() -> None:
            for work in works:
                left = max(deadline - time.monotonic(), 1e-3)
                work.wait(timedelta(seconds=left))

        waiting = self._waiter.submit(wait_all)
        # futures_wait returns as soon as the waiter does: the pause costs no latency.
        self._await(
            lambda pause: bool(futures_wait([waiting], timeout=pause).done), what, 2e-3, peers
        )
        try:
            waiting.result()
        except Exception as exc:
            if time.monotonic() >= deadline - 1e-3:
                raise self._expired(what, peers) from exc
            self.check()  # a peer that failed first may have said why
            raise self._fault(
                f"{what} failed: {type(exc).__name__}: {exc}", tuple(peers), False, exc
            ) from exc

    def wait_event(
        self, event: torch.cuda.Event, what: str = "the device work", peers: Sequence[int] = ()
    ) -> None:
        """Wait for a recorded CUDA event with the deadline (NCCL: the host never blocks)."""
        self.wait_until(event.query, what, peers)

    def _expired(self, what: str, peers: Sequence[int]) -> GroupFault:
        among = f" (waiting on rank(s) {sorted(peers)})" if peers else ""
        return self._fault(
            f"{what}{among} did not complete within {self.guard.timeout:g} s: a rank froze, "
            "died or is far behind",
            tuple(sorted(peers)),
            True,
            None,
        )

    def _await(
        self, ready: Callable[[float], bool], what: str, longest: float, peers: Sequence[int]
    ) -> None:
        """Call ``ready(pause)`` (which may block up to ``pause`` s) until True.

        The pause doubles from 20 us up to ``longest`` s.

        Reads the failure board every ``board_interval`` s on the store thread
        (never blocking here) and raises GroupFault on a posted failure or at
        the deadline.
        """
        start = time.monotonic()
        deadline = start + self.guard.timeout
        next_read = start + self.guard.board_interval
        reading: Future[list[dict[str, Any]]] | None = None
        pause = 20e-6
        while not ready(pause):
            now = time.monotonic()
            if reading is not None and reading.done():
                self._raise_posted(self._result(reading, deadline, "a read"))
                reading, next_read = None, now + self.guard.board_interval
            elif reading is None and self._executor is not None and now >= next_read:
                reading = self._submit(self._read_board)
            if now >= deadline:
                raise self._expired(what, peers)
            pause = min(pause * 2, longest)

    # ------------------------------------------------------------------ agreement

    def propose(self, check: Callable[[], tuple[_T, Mapping[str, object]]]) -> _T:
        """Run this rank's checks and post its verdict; return what ``check`` returned.

        check: returns (checked values, fields); fields maps each argument that
            shapes the plan or the wire (name -> value: arrays, strings, ints,
            bools, tuples) to what this rank got. Any exception it raises is
            posted as this rank's refusal, then re-raised here.

        Post first, then plan, then :meth:`confirm`: the others' verdicts arrive
        while this rank plans.
        """
        if self._executor is None:  # a single rank: no verdict to post or compare
            return check()[0]
        try:
            value, fields = check()
            verdict: dict[str, Any] = {
                "ok": True,
                "fields": {name: fingerprint(v) for name, v in fields.items()},
            }
        except BaseException as exc:
            self._post_verdict({"ok": False, "reason": f"{type(exc).__name__}: {exc}"}, wait=True)
            self._posted = True  # the refusal is this call's failure report
            raise
        self._post_verdict(verdict, wait=False)
        return value

    def _post_verdict(self, verdict: dict[str, Any], wait: bool) -> None:
        if self._executor is None:
            return
        key, text = self._key("verdict", self.guard.rank), json.dumps(verdict)
        self._verdict = self._submit(lambda store: store.set(key, text))
        if wait:
            try:
                self._verdict.result(timeout=1.0)
            except Exception:  # the caller raises its own refusal
                pass

    def _poll(self, ready: Callable[[dist.Store], bool], what: str) -> bool:
        """Poll the store until ``ready`` holds: True, or False at the deadline.

        Raises GroupFault as soon as another rank posts a failure while
        ``ready`` does not hold. Backs off to
        one pair of round trips every 20 ms: a store serves every rank at once.
        """
        deadline = time.monotonic() + self.guard.timeout

        def probe(store: dist.Store) -> tuple[bool, int]:
            return ready(store), int(store.add(self._key("failures"), 0))

        pause = 0.2e-3
        while True:
            done, failures = self._result(self._submit(probe), deadline, what)
            if done:
                # Complete before a failure counts: once every verdict is in,
                # the others may have begun; their failure reaches this rank
                # in its next wait, after it agreed (so the group is faulted
                # here too, not left with their messages in flight).
                return True
            if failures:
                self.check()
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 20e-3)

    def confirm(self) -> None:
        """Wait for every rank's verdict; raise if one refused or the arguments differ.

        AgreementError names the refusing ranks with their reasons, or the first
        argument (in this rank's order) whose value differs; GroupFault if a
        rank does not post within the timeout or posts a failure.
        """
        if self._executor is None:
            self.agreed = True
            return
        assert self._verdict is not None, "propose() first"
        deadline = time.monotonic() + self.guard.timeout
        self._result(self._verdict, deadline, "this rank's verdict")
        keys = [self._key("verdict", r) for r in range(self.guard.world_size)]
        if not self._poll(lambda s: bool(s.check(keys)), "a read of the verdicts"):
            here = self._result(
                self._submit(lambda s: [s.check([k]) for k in keys]), deadline, "a read"
            )
            missing = tuple(r for r, present in enumerate(here) if not present)
            raise self._fault(
                f"rank(s) {list(missing)} did not reach the agreement within "
                f"{self.guard.timeout:g} s; no weights were changed",
                missing,
                True,
                None,
            )
        texts = self._result(self._submit(lambda s: get_all(s, keys)), deadline, "a read")
        # Every rank reaches the same verdict from the same posts: none is a failure to post.
        self._posted = True
        compare_verdicts([json.loads(t) for t in texts])
        self._posted = False
        self.agreed = True

    def agree(self, check: Callable[[], tuple[_T, Mapping[str, object]]]) -> _T:
        """:meth:`propose` then :meth:`confirm`."""
        value = self.propose(check)
        self.confirm()
        return value

    def finish(self) -> None:
        """Post this rank's success and wait for every rank's: all ranks see one outcome.

        Without it a rank that finished its share would return while another
        failed after it. GroupFault if a rank failed or did not finish in time.
        """
        if self._executor is None:
            return
        deadline = time.monotonic() + self.guard.timeout
        counter, size = self._key("finished"), self.guard.world_size
        self._result(self._submit(lambda s: s.add(counter, 1)), deadline, "this rank's success")
        if not self._poll(lambda s: int(s.add(counter, 0)) >= size, "a read of the successes"):
            raise self._fault(
                f"not every rank finished within {self.guard.timeout:g} s: a rank froze, died "
                "or is far behind",
                (),
                True,
                None,
            )
        self.check()
