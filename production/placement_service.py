"""A placement service that never needs the interpreter lock, polled by a thread that holds it.

A Python thread that calls even a lock-free compiled placement must take the
interpreter lock back when the call returns; a busy thread beside it gives the
lock up only after ``sys.getswitchinterval()`` (5 ms), so a placement of
``T`` ms keeps at most ``T / (T + 5)`` of its rate. Here no Python thread
waits for the placement at all: a daemon thread enters one compiled function
once (``compiled_service.serve``) and stays in it, waiting on a pipe, placing
into preallocated buffers and answering on a second pipe. The thread that
wants placements (a serving thread, which holds the lock) submits a load and
polls; a poll reads one shared integer and makes a system call only once the
placement is done, never giving the lock up.

    service = PlacementService(58, 256, 288, 8, 4, 32)
    service.submit(load)  # [58, 256] real, numpy or CPU torch
    ...
    if service.poll():  # cheap; call as often as convenient
        phy2log, log2phy, logcnt = service.result()
    service.stop()

The results are exactly the compiled core's (``rebalance_experts``, SPEC.md).
One placement is in flight at a time, for the shape the service was made for.

Where the compiled core cannot load, or the platform lacks what the service
needs (POSIX pipes, 64-bit), ``placement_service_error()`` says why and
``PlacementService`` raises RuntimeError with that reason: callers fall back
to ``rebalance_experts`` (``ExpertBalancer`` does so by itself).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from types import ModuleType
from typing import TypeVar

import numpy as np
import torch

from eplb._validation import EplbConfig, validate_config, validate_weight

from . import cores
from .balancer_load import load_arrived
from .rebalance import prepare_weight

__all__ = [
    "PlacementInFlight",
    "PlacementService",
    "placement_service_error",
    "service_for",
]

_STOP, _REQUEST = b"\x00", 1
T = TypeVar("T")


def _platform_error() -> str | None:
    if sys.platform == "win32":
        return "the placement service needs POSIX pipes and libc; this is Windows"
    if struct.calcsize("P") != 8:
        return "the placement service needs a 64-bit platform"
    if not hasattr(time, "CLOCK_MONOTONIC") or not hasattr(signal, "pthread_sigmask"):
        return "the placement service needs clock_gettime and pthread_sigmask"
    return None


def _load_service() -> tuple[ModuleType | None, str | None]:
    """The compiled service module, or None and why it cannot load."""
    why = _platform_error()
    if why is not None:
        return None, why
    if cores.load_compiled_core() is None:
        return None, f"the compiled core cannot load: {cores.compiled_core_error()}"
    try:
        from . import compiled_service
    except Exception as exc:  # numba cannot compile the service loop here
        return None, f"the service loop cannot compile: {type(exc).__name__}: {exc}"
    return compiled_service, None


def placement_service_error() -> str | None:
    """Why a ``PlacementService`` cannot run here (loading it if not tried yet), or None."""
    return _load_service()[1]


class PlacementService:
    """Placements of one shape, computed on a thread that never holds the interpreter lock.

    num_layers, num_logical_experts, num_replicas, num_groups, num_nodes, num_gpus:
        the shape (L, E, R, G, N, P as in SPEC.md), fixed for the service's life.

    Starts its thread at once (``start``); ``stop`` ends it (``start`` again
    resumes, with the same buffers). Not thread-safe: one thread submits and
    polls. Raises RuntimeError with the reason where the service cannot run
    (``placement_service_error``), TypeError/ValueError for bad counts.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical_experts: int,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_gpus: int,
    ) -> None:
        shape = (num_layers, num_logical_experts)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise TypeError(f"num_layers and num_logical_experts must be ints, got {shape!r}")
        self.config: EplbConfig = validate_config(
            shape, num_replicas, num_groups, num_nodes, num_gpus
        )
        compiled, why = _load_service()
        if compiled is None:
            raise RuntimeError(f"the placement service cannot run here: {why}")
        self._compiled = compiled
        self._sequence, self._error = compiled.SEQUENCE, compiled.ERROR
        from .compiled_core import buffer_lengths

        counts = self.config[2:]
        f64, i64, i32, ranks, out = buffer_lengths(*self.config)
        #: [L, E] float64, the load of the request in flight (written before its byte).
        self._load = np.zeros(shape, dtype=np.float64)
        # Every placement_into buffer is sized for any load: the service never
        # replaces one, so the results are always in self._out.
        self._buffers = (
            np.empty(f64, dtype=np.float64),
            np.empty(i64, dtype=np.int64),
            np.empty(i32, dtype=np.int32),
            np.empty(ranks, dtype=np.int32),
        )
        self._out = np.empty(out, dtype=np.int64)
        self._state = np.zeros(5, dtype=np.int64)
        self._byte = np.zeros(1, dtype=np.uint8)
        self._counts = tuple(counts)
        self._thread: threading.Thread | None = None
        self._pipes: tuple[int, int, int, int] | None = None
        self._requested = 0  # sequence number of the last request
        self._in_flight = False  # submitted, result not taken
        self._done = False  # its answer was read: the results are visible
        self.start()

    # ------------------------------------------------------------------ life

    @property
    def running(self) -> bool:
        """Whether the service thread is serving (started and not stopped)."""
        return self._thread is not None

    def start(self) -> None:
        """Start the service thread (nothing if it runs)."""
        if self._thread is not None:
            return
        request_read, request_write = os.pipe()
        done_read, done_write = os.pipe()
        # The submitter's ends never block: a poll returns at once.
        os.set_blocking(request_write, False)
        os.set_blocking(done_read, False)
        self._pipes = (request_read, request_write, done_read, done_write)
        self._state[:] = 0
        self._requested, self._in_flight, self._done = 0, False, False
        self._thread = threading.Thread(
            target=self._serve, name="eplb-placement-service", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        # Signals go to other threads: a blocking read() here then never
        # returns EINTR, which the loop would take for a failed pipe.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        assert self._pipes is not None
        request_read, _, _, done_write = self._pipes
        self._compiled.serve(
            request_read,
            done_write,
            time.CLOCK_MONOTONIC,
            self._state,
            self._load,
            self._counts,
            self._buffers,
            self._out,
        )

    def stop(self, timeout: float | None = None) -> None:
        """End the service thread after the placement in flight, if any (dropped).

        timeout: seconds to wait for the thread (None: as long as it takes).
        Raises TimeoutError if it has not ended by then (it still will).
        """
        if self._thread is None:
            return
        assert self._pipes is not None
        os.write(self._pipes[1], _STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the placement service did not stop within {timeout} s")
        self._thread = None
        for fd in self._pipes:
            os.close(fd)
        self._pipes = None
        self._in_flight = self._done = False

    def __enter__(self) -> PlacementService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests

    @property
    def in_flight(self) -> bool:
        """Whether a placement was submitted and its result not taken yet."""
        return self._in_flight

    def submit(self, weight: np.ndarray | torch.Tensor) -> None:
        """Start placing ``weight``; returns at once.

        weight: [num_layers, num_logical_experts] real (numpy array or CPU
            tensor), tokens routed to each logical expert. Copied: the caller
            may reuse it at once.

        Raises TypeError/ValueError (SPEC.md's rules, as ``rebalance_experts``)
        before anything is submitted; RuntimeError if the service is stopped
        or a placement is still in flight (take its ``result`` first).
        """
        if isinstance(weight, torch.Tensor):
            if weight.device.type != "cpu":
                raise ValueError(f"weight must be on the CPU, got {weight.device}")
            host, _ = prepare_weight(weight, *self._counts)
        else:
            host, _ = validate_weight(weight, *self._counts)
        if host.shape != self._load.shape:
            raise ValueError(
                f"weight must have shape [{self.config.num_layers}, "
                f"{self.config.num_logical_experts}] (this service's), got {tuple(host.shape)}"
            )
        if self._thread is None or self._pipes is None:
            raise RuntimeError("the placement service is stopped; start() it first")
        if self._in_flight:
            raise RuntimeError("a placement is in flight: take its result() first")
        np.copyto(self._load, host)
        self._byte[0] = _REQUEST
        # The load is stored before this write: the service reads it after the
        # matching read (compiled_service's docstring: why that orders memory).
        if self._compiled.write_byte(self._pipes[1], self._byte) != 1:
            raise RuntimeError("the placement service's request pipe refused the request")
        self._requested += 1
        self._in_flight, self._done = True, False

    def poll(self) -> bool:
        """Whether the placement in flight is done (False when none is in flight).

        Never blocks and never gives the interpreter lock up; makes a system
        call only once the placement is done. Raises RuntimeError if the
        service thread failed.
        """
        if self._done:
            return True
        if not self._in_flight:
            return False
        if self._state[self._sequence] != self._requested:  # the hint: still computing
            if self._state[self._error]:
                raise RuntimeError("the placement service's thread ended: its pipe failed")
            return False
        assert self._pipes is not None
        # The answer's byte: after reading it, the results are visible.
        self._done = self._compiled.read_byte(self._pipes[2], self._byte) == 1
        return self._done

    def result(self, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The placement in flight, waiting for it up to ``timeout`` seconds (None: no limit).

        Returns new arrays (the caller's to keep):
          phy2log: [L, R] int64, the logical expert held by each slot.
          log2phy: [L, E, K] int64, the slot of each replica of each expert, -1 padded.
          logcnt: [L, E] int64, the replica count of each logical expert.

        Raises RuntimeError when none is in flight, TimeoutError past the
        timeout (the placement stays in flight).
        """
        if not self._in_flight:
            raise RuntimeError("no placement is in flight: submit() one first")
        deadline = None if timeout is None else time.monotonic() + timeout
        assert self._pipes is not None
        while not self.poll():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"the placement was not done within {timeout:g} s")
            select.select([self._pipes[2]], [], [], left)  # gives the lock up: it waits
        state, compiled = self._state, self._compiled
        if not state[compiled.VALID]:
            raise AssertionError("the service refused a load that submit() accepted")
        layers, experts, replicas = self.config[:3]
        slots, counted = layers * replicas, layers * (replicas + experts)
        width = int(state[compiled.WIDTH])
        phy2log = self._out[:slots].reshape(layers, replicas).copy()
        logcnt = self._out[slots:counted].reshape(layers, experts).copy()
        log2phy = self._out[counted : counted + layers * experts * width]
        self._in_flight = self._done = False
        return phy2log, log2phy.reshape(layers, experts, width).copy(), logcnt

    @property
    def shared_state(self) -> np.ndarray:
        """[5] int64, read-only view of what the service thread records: the sequence
        number of the last placement done (``[0]``, a hint: results are read only
        through ``poll``/``result``), then log2phy's width, valid, nanoseconds, error."""
        view = self._state.view()
        view.flags.writeable = False
        return view

    @property
    def last_seconds(self) -> float:
        """Seconds the service thread spent computing the last placement."""
        return float(self._state[self._compiled.NANOS]) * 1e-9


# ---------------------------------------------------------------------- serving


def service_for(
    config: EplbConfig, migration_aware: bool, apply_delay: int
) -> tuple[PlacementService | None, str | None]:
    """A started service for ``ExpertBalancer``'s placements, or None and why it has none.

    config: the balancer's validated shape. migration_aware: whether it uses the
    migration-aware policy (the numpy core's, computed on its worker thread).
    apply_delay: steps from the interval to the apply. The service's placement
    is handed to the worker at a ``step()``, which then prepares the move: with
    one step between, the apply would wait for that preparation, where the
    worker alone places and prepares back to back as soon as the load arrives.
    """
    if apply_delay < 2:
        return None, (
            "apply_delay is 1: the worker places and prepares the move back to back, ready "
            "for the next step (the service needs apply_delay >= 2)"
        )
    if migration_aware:
        return None, "the migration-aware policy is computed on the worker thread"
    if cores.resolve_core() != "compiled":
        return None, f"the placement core is numpy ({cores.ENV_VAR} or no compiled core)"
    why = placement_service_error()
    if why is not None:
        return None, why
    return PlacementService(*config), None


class PlacementInFlight:
    """A balancer's placement on its way: the load's copy to the host, then the service.

    service: the balancer's service, with nothing in flight.
    load: [L, E] int64 CPU tensor, tokens per logical expert, where the copy lands.
    copied: the event recorded after that copy (None: the load is there).
    timeout: seconds the copy may take.

    ``poll`` (the serving thread's, every step) submits the load once its copy
    is done and then polls the service: it never blocks. ``wait`` blocks.
    """

    def __init__(
        self,
        service: PlacementService,
        load: torch.Tensor,
        copied: torch.cuda.Event | None,
        timeout: float,
    ) -> None:
        self._service, self._load, self._copied = service, load, copied
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._submitted = False

    def poll(self) -> bool:
        """Whether the placement is done; submits the load when it has arrived."""
        if not self._submitted:
            if not load_arrived(self._copied, self._deadline, self._timeout):
                return False
            self._service.submit(self._load)
            self._submitted = True
        return self._service.poll()

    def wait(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(phy2log, log2phy, logcnt) as CPU tensors, and the service's seconds on them."""
        while not self.poll() and not self._submitted:
            time.sleep(1e-4)
        left = max(self._deadline - time.monotonic(), 0.0) + self._timeout
        maps = self._service.result(timeout=left)
        phy2log, log2phy, logcnt = (torch.from_numpy(m) for m in maps)
        return phy2log, log2phy, logcnt, self._service.last_seconds

    def hand_over(
        self,
        block: bool,
        executor: Executor,
        then: Callable[..., T],
        *args: object,
    ) -> Future[T] | None:
        """Once the placement is done (``block``: wait for it), ``then(maps, *args,
        seconds)`` on ``executor``: its Future; None while not done. A failure
        (e.g. the copy's TimeoutError) comes back as a Future holding it."""
        try:
            if not (block or self.poll()):
                return None
            *maps, seconds = self.wait()
        except Exception as exc:
            self.drop()
            failed: Future[T] = Future()
            failed.set_exception(exc)
            return failed
        return executor.submit(then, maps, *args, seconds)

    def drop(self) -> None:
        """Forget it; the service is idle again once its placement is done (waited for)."""
        if self._service.in_flight:
            self._service.stop()
            self._service.start()
