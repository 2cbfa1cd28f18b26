"""The placement service's compiled side: one numba function that serves placements for ever.

``serve`` is entered once by the service's daemon thread and returns only when
told to stop: it waits for a request in a blocking ``read()`` of a pipe, computes
the placement into the buffers it was given (``compiled_core.placement_into``),
records it in a shared int64 array and answers with a ``write()`` on a second
pipe. It is compiled with ``nogil=True`` and calls the C library's ``read``,
``write`` and ``clock_gettime`` directly (intrinsics naming the symbols, so
the code is cached on disk like the core's): from entry to return it never
needs the interpreter lock.

Memory order between the two threads, on any architecture (x86's strong order
and ARM's weak one alike), rests on the pipes:

- in the hardware: a byte a ``read()`` returns was put there by a ``write()``,
  and the kernel hands it over under the pipe's lock (taken by both calls).
  Taking that lock is an acquire and releasing it a release on every
  architecture the kernel runs on, so everything the writing thread stored
  before its ``write()`` is visible to the reading thread after its
  ``read()``: the load the submitter put in the input buffer, to the service;
  the results the service put in the output buffers, to the submitter;
- in the compiler: ``read`` and ``write`` are external calls that may read and
  write any memory the buffers' pointers reach, so LLVM keeps every store of
  the buffers before the ``write()`` and every load after the ``read()``.

The sequence number in ``state`` is only a hint that saves the submitter a
system call while the service is busy; the results are read only after the
answering byte was read.

``helpers`` are the submitter's side: the same ``read``/``write`` without
``nogil``, so that a poll never gives the interpreter lock up (a thread that
gives it up waits up to a switch interval to get it back from a busy one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .compiled_core import placement_into
from .compiled_rows import jit

__all__ = [
    "CLOSED",
    "ERROR",
    "NANOS",
    "SEQUENCE",
    "VALID",
    "WIDTH",
    "read_byte",
    "serve",
    "write_byte",
]

#: Slots of the shared int64 ``state`` array.
SEQUENCE, WIDTH, VALID, NANOS, ERROR = 0, 1, 2, 3, 4
#: ``state[ERROR]`` when the request pipe failed or closed (the loop returned).
CLOSED = 1

_INT = ir.IntType(32)
_SIZE = ir.IntType(64)
_POINTER = ir.IntType(8).as_pointer()


def _io(name: str) -> Any:
    """An intrinsic calling C's ``ssize_t name(int fd, void *buf, size_t n)`` (read, write)."""

    def typer(typingctx: Any, fd: Any, buf: Any, count: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_SIZE, [_INT, _POINTER, _SIZE]), name
            )
            pointer = builder.inttoptr(args[1], _POINTER)
            return builder.call(function, [builder.trunc(args[0], _INT), pointer, args[2]])

        return types.int64(types.int64, types.uintp, types.int64), codegen

    typer.__name__ = f"_c_{name}"
    return intrinsic(typer)


_c_read = _io("read")
_c_write = _io("write")


@intrinsic
def _c_clock_gettime(typingctx: Any, clock: Any, buf: Any) -> Any:
    """C's ``int clock_gettime(clockid_t clock, struct timespec *buf)``; buf: two int64."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_INT, [_INT, _POINTER]), "clock_gettime"
        )
        result = builder.call(
            function, [builder.trunc(args[0], _INT), builder.inttoptr(args[1], _POINTER)]
        )
        return builder.sext(result, ir.IntType(64))

    return types.int64(types.int64, types.uintp), codegen


@jit()
def _nanos(clock: int, timespec: np.ndarray) -> int:
    _c_clock_gettime(clock, timespec.ctypes.data)  # type: ignore[call-arg]
    return timespec[0] * 1_000_000_000 + timespec[1]


_I64 = types.int64
_BUFFERS = types.Tuple((types.float64[::1], _I64[::1], types.int32[::1], types.int32[::1]))
_SERVE = (
    _I64,
    _I64,
    _I64,
    _I64[::1],
    types.float64[:, ::1],
    types.UniTuple(_I64, 4),
    _BUFFERS,
    _I64[::1],
)


@jit(_SERVE)
def serve(
    request_fd: int,
    done_fd: int,
    clock: int,
    state: np.ndarray,
    weight: np.ndarray,
    counts: tuple[int, int, int, int],
    buffers: tuple[np.ndarray, ...],
    out: np.ndarray,
) -> None:
    """Serve placements of ``weight`` until a stop byte (0) or a failed pipe.

    request_fd, done_fd: the read end of the request pipe, the write end of the answer pipe.
    clock: the clock ``state[NANOS]`` is measured on (``time.CLOCK_MONOTONIC``).
    state: [5] int64, shared: the sequence number of the last placement done,
        log2phy's width, valid (1/0), its nanoseconds, and ERROR (0 while serving).
    weight: [L, E] float64, the load; rewritten by the submitter between requests.
    counts: (R, G, N, P) as in SPEC.md.
    buffers, out: ``placement_into``'s buffers (f64, i64, i32, ranks) and its
        ``out``, of ``buffer_lengths``; the results go to ``out`` (phy2log
        [L*R], logcnt [L*E], log2phy [L*E*width]).
    """
    byte = np.zeros(1, dtype=np.uint8)
    timespec = np.zeros(2, dtype=np.int64)
    address = out.ctypes.data
    while True:
        if _c_read(request_fd, byte.ctypes.data, 1) != 1:
            state[ERROR] = CLOSED
            return
        if byte[0] == 0:
            return
        start = _nanos(clock, timespec)
        replicas, groups, nodes, gpus = counts
        f64, i64, i32, ranks = buffers
        valid, _, log2phy, _, _, _, _, _, used = placement_into(
            weight, replicas, groups, nodes, gpus, f64, i64, i32, ranks, out
        )
        if used.ctypes.data != address:  # cannot happen with buffer_lengths' buffers
            valid = False
        state[WIDTH] = log2phy.shape[2]
        state[VALID] = 1 if valid else 0
        state[NANOS] = _nanos(clock, timespec) - start
        state[SEQUENCE] += 1
        if _c_write(done_fd, byte.ctypes.data, 1) != 1:
            state[ERROR] = CLOSED
            return


# Without nogil: giving the lock up on entry would mean waiting for it on return.
@jit((_I64, types.uint8[::1]), nogil=False)
def read_byte(fd: int, byte: np.ndarray) -> int:
    """``read(fd, byte, 1)`` holding the interpreter lock (fd non-blocking: returns at once)."""
    return _c_read(fd, byte.ctypes.data, 1)


@jit((_I64, types.uint8[::1]), nogil=False)
def write_byte(fd: int, byte: np.ndarray) -> int:
    """``write(fd, byte, 1)`` holding the interpreter lock."""
    return _c_write(fd, byte.ctypes.data, 1)
