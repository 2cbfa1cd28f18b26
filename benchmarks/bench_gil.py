"""The interpreter lock: placements beside a busy pure-Python thread, numpy core vs compiled core.

In serving, the placement runs on the balancer's worker thread while the
serving thread runs Python (launching kernels). This benchmark puts a
pure-Python busy loop on one thread and ``rebalance_experts`` in a loop on
another, and prints, per placement core and shape:

- each one's rate alone (placements per second; loop iterations per second);
- each one's rate beside the other, as a fraction of its rate alone.

A thread that gives the lock up (the numpy core does in every numpy call on a
large array, the compiled core once per placement) gets it back only when the
busy thread yields it: after ``sys.getswitchinterval()`` (5 ms by default) of
waiting. The ``waits`` column estimates how many such waits one placement
made: (time per placement beside the loop - alone) / switch interval. A
placement of ``T`` ms that waits once keeps ``T / (T + 5)`` of its rate at the
default interval; ``--switch-interval`` sets another for the run (an engine
can set it with ``sys.setswitchinterval``).

Core ``service`` is the placement service (``eplb.production.placement_service``):
its thread never holds the lock, and the busy loop itself is the consumer, as
a serving thread is: after each slice of its work (1000 iterations, or 10
torch calls) it polls the service, taking the result and submitting the load
again when one is done. "alone" is then the service with a consumer that only
submits and waits, and the loop with no service; a poll costs no switch interval.

    python benchmarks/bench_gil.py                  # V3 and Kimi-K2, both cores
    python benchmarks/bench_gil.py --busy python,torch   # also beside torch calls
    python benchmarks/bench_gil.py --quick          # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.conformance.workloads import BENCHMARK_SHAPES  # noqa: E402
from eplb.loads import synthetic_load  # noqa: E402
from eplb.production import compiled_core_error, rebalance_experts  # noqa: E402
from eplb.production.placement_service import (  # noqa: E402
    PlacementService,
    placement_service_error,
)

#: Shapes timed by default (names of BENCHMARK_SHAPES).
DEFAULT_SHAPES = ("DeepSeek-V3 R=288", "Kimi-K2 R=448")
#: The issue's targets: fraction of the solo rate kept beside the other thread.
TARGET_REBALANCE, TARGET_LOOP = 0.70, 0.80


@dataclass(frozen=True)
class Shared:
    """Rates of a placement and a busy loop, alone and side by side (per second)."""

    rebalance_alone: float
    loop_alone: float
    rebalance_beside: float
    loop_beside: float

    @property
    def rebalance_kept(self) -> float:
        """The placement's rate beside the loop over its rate alone."""
        return self.rebalance_beside / self.rebalance_alone

    @property
    def loop_kept(self) -> float:
        """The loop's rate beside the placements over its rate alone."""
        return self.loop_beside / self.loop_alone

    def waits(self, switch_interval: float) -> float:
        """Estimated waits for the lock per placement (see the module doc)."""
        extra = 1.0 / self.rebalance_beside - 1.0 / self.rebalance_alone
        return max(0.0, extra / switch_interval)


class _BusyLoop:
    """A busy thread: a pure-Python loop (it never gives the lock up by itself), or
    a loop of small torch calls (each gives the lock up while it runs, as a
    serving loop launching kernels does)."""

    def __init__(self, kind: str = "python") -> None:
        self.count = 0
        self._stop = False
        run = self._run_python if kind == "python" else self._run_torch
        self._thread = threading.Thread(target=run, daemon=True)

    def _run_python(self) -> None:
        count = 0
        while not self._stop:
            count += _python_slice()
            self.count = count

    def _run_torch(self) -> None:
        count, tensor = 0, torch.zeros(16)
        while not self._stop:
            count += _torch_slice(tensor)
            self.count = count

    def __enter__(self) -> _BusyLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


def _python_slice() -> int:
    """One slice of pure-Python work (it never gives the lock up): its iterations."""
    count = 0
    for _ in range(1000):
        count += 1
    return count


def _torch_slice(tensor: torch.Tensor) -> int:
    """One slice of small torch calls (each gives the lock up while it runs): its calls."""
    for _ in range(10):
        tensor.add_(1.0)
    return 10


def _consume(
    busy: str, seconds: float, service: PlacementService | None, load: np.ndarray
) -> tuple[float, float]:
    """(loop iterations, placements) per second of a busy loop on this thread that
    polls ``service`` after each slice and resubmits ``load`` when a placement is
    done; without a service, the loop alone."""
    tensor = torch.zeros(16)
    count = placements = 0
    if service is not None:
        service.submit(load)
    start = time.perf_counter()
    while True:
        count += _python_slice() if busy == "python" else _torch_slice(tensor)
        if service is not None and service.poll():
            service.result()
            placements += 1
            service.submit(load)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    if service is not None:
        service.result()
    return count / elapsed, placements / elapsed


def measure_service(name: str, seconds: float, busy: str = "python") -> Shared:
    """Rates of the placement service and of a busy loop that consumes it, alone and together."""
    experts, layers, *counts = BENCHMARK_SHAPES[name]
    load = synthetic_load(layers, experts, seed=1, skew=0.4, tokens=1 << 18)
    service = PlacementService(layers, experts, *counts)
    try:

        def place() -> None:
            service.submit(load)
            service.result()

        place()  # warm caches and the allocator
        alone = _rate(place, seconds)
        loop_alone, _ = _consume(busy, seconds, None, load)
        loop_beside, beside = _consume(busy, seconds, service, load)
    finally:
        service.stop()
    return Shared(alone, loop_alone, beside, loop_beside)


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls of ``fn`` per second, over at least ``seconds`` and at least one call."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


def _loop_rate(seconds: float, kind: str) -> float:
    """Iterations per second of the busy loop alone."""
    with _BusyLoop(kind) as loop:
        start_count, start = loop.count, time.perf_counter()
        time.sleep(seconds)
        return (loop.count - start_count) / (time.perf_counter() - start)


def measure_shared(rebalance: Callable[[], object], seconds: float, busy: str = "python") -> Shared:
    """Rates of ``rebalance`` (a placement) and of a busy loop, alone and side by side.

    busy: "python" (a pure-Python loop) or "torch" (a loop of small torch calls).
    """
    rebalance()  # warm caches and the allocator
    alone = _rate(rebalance, seconds)
    loop_alone = _loop_rate(seconds, busy)
    with _BusyLoop(busy) as loop:
        time.sleep(0.05)  # let the loop start
        start_count, start = loop.count, time.perf_counter()
        beside = _rate(rebalance, seconds)
        loop_beside = (loop.count - start_count) / (time.perf_counter() - start)
    return Shared(alone, loop_alone, beside, loop_beside)


def placement_call(name: str, core: str) -> Callable[[], object]:
    """One ``rebalance_experts`` call on a CPU tensor of shape ``name``'s synthetic load."""
    experts, layers, *counts = BENCHMARK_SHAPES[name]
    weight = torch.from_numpy(synthetic_load(layers, experts, seed=1, skew=0.4, tokens=1 << 18))
    return lambda: rebalance_experts(weight, *counts, core=core)


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description="placements beside a busy Python thread")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--seconds", type=float, default=2.0, help="each measurement's length")
    parser.add_argument("--shapes", help="comma-separated names of: " + ", ".join(BENCHMARK_SHAPES))
    parser.add_argument(
        "--cores",
        default="numpy,compiled,service",
        help="comma-separated placement cores to time (service: the placement service)",
    )
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval, seconds")
    parser.add_argument(
        "--busy",
        default="python",
        help="comma-separated busy loops: python (pure Python), torch (small torch calls)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n.strip() for n in args.shapes.split(",")] if args.shapes else list(DEFAULT_SHAPES)
    unknown = [n for n in names if n not in BENCHMARK_SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(BENCHMARK_SHAPES)}")
    cores = [c.strip() for c in args.cores.split(",")]
    busy_kinds = [b.strip() for b in args.busy.split(",")]
    if not set(busy_kinds) <= {"python", "torch"}:
        parser.error(f"--busy takes python and/or torch, got {args.busy!r}")
    if "compiled" in cores and compiled_core_error() is not None:
        print(f"compiled core unavailable ({compiled_core_error()}): numpy core only")
        cores.remove("compiled")
    if "service" in cores and placement_service_error() is not None:
        print(f"placement service unavailable ({placement_service_error()})")
        cores.remove("service")
    if args.quick:
        names, args.seconds = names[:1], 0.3
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    interval = sys.getswitchinterval()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
        f"commit {_commit()}; switch interval {interval * 1e3:g} ms; {args.seconds:g} s each"
    )
    header = (
        f"{'shape':19} {'core':9} {'busy':7} {'ms alone':>9} {'ms beside':>10} "
        f"{'placement kept':>15} {'loop kept':>10} {'waits':>6} {'targets met':>11}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        for busy in busy_kinds:
            for core in cores:
                _print_row(name, core, busy, args.seconds, interval)
    print(
        f"\ntargets (python loop): placement keeps >= {TARGET_REBALANCE:.2f} of its rate, "
        f"the loop >= {TARGET_LOOP:.2f} of its own; load average {os.getloadavg()[0]:.2f} "
        "at the end (other processes share the cores)"
    )
    return 0


def _print_row(name: str, core: str, busy: str, seconds: float, interval: float) -> None:
    if core == "service":
        shared = measure_service(name, seconds, busy)
    else:
        shared = measure_shared(placement_call(name, core), seconds, busy)
    print(
        f"{name:19} {core:9} {busy:7} {1e3 / shared.rebalance_alone:9.3f} "
        f"{1e3 / shared.rebalance_beside:10.3f} {shared.rebalance_kept:15.2f} "
        f"{shared.loop_kept:10.2f} {shared.waits(interval):6.1f} {_met(shared, busy):>11}"
    )


def _met(shared: Shared, busy: str) -> str:
    """Both targets met ("yes") or not ("no"); "-" beside torch calls, which have none."""
    if busy != "python":
        return "-"
    met = shared.rebalance_kept >= TARGET_REBALANCE and shared.loop_kept >= TARGET_LOOP
    return "yes" if met else "no"


if __name__ == "__main__":
    sys.exit(main())
