"""Host time inside ``ExpertBalancer.step()`` on rebalance steps, by phase (CPU, one rank).

The per-step host cost of a staged rebalance is per slot, tensor and message,
not per byte: this builds a 1-rank gloo balancer with DeepSeek-V2-Lite's slot
structure (26 layers, 64 experts, 72 slots, 3 tensors per slot) but tiny
tensors (8x8 float32 per slot by default), drives it with skewed loads that
change every interval (so that almost every slot changes expert), and reports
host milliseconds per ``step()`` call on the rebalance steps (the apply step
and each staged commit step; ``cpu ms``: the serving thread's CPU time,
``time.thread_time``, which preemption by other jobs does not inflate), with
the phases below (each the mean per
rebalance step; phases nest, see the indentation):

- ``launch``: ``StagedApply._launch`` (the move from the live slots into staging, the vote),
  of which ``move`` (``rearrange_expert_weights``), of which ``checks+agree``
  (the input checks and this rank's verdict), ``plan`` (the chunk's lazy
  plan), ``confirm`` and ``issue copies`` (``run_steps``);
- ``commit``: ``StagedApply._commit`` (staging -> slots, the maps' rows);
- ``vote wait``: ``StagedApply._await_vote``.

``all`` applies every layer in one step (``layers_per_step=None``).

Run: ``python benchmarks/profile_staged_host.py [--cprofile K]`` (``--cprofile``
prints the top functions by own time for that mode; 0 for all at once).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import os
import pstats
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb.production import ExpertBalancer, group_guard, rearrange, staged

# (module, attribute, phase name): wrapped with a timer while a mode runs.
_PHASES: list[tuple[Any, str, str]] = [
    (staged.StagedApply, "_launch", "launch"),
    (staged, "rearrange_expert_weights", "  move"),
    (group_guard.GuardedCall, "propose", "    checks+agree"),
    (rearrange, "_prepare", "    plan"),
    (group_guard.GuardedCall, "confirm", "    confirm"),
    (rearrange, "run_steps", "    issue copies"),
    (staged.StagedApply, "_commit", "commit"),
    (staged.StagedApply, "_await_vote", "vote wait"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=72)
    parser.add_argument("--tensors", type=int, default=3, help="weight tensors per slot")
    parser.add_argument("--size", type=int, default=8, help="each slot's tensor is size x size")
    parser.add_argument("--rebalances", type=int, default=6, help="rebalances per mode")
    parser.add_argument(
        "--modes", default="1,2,4,all", help="layers_per_step values, 'all' for all at once"
    )
    parser.add_argument(
        "--cprofile", default=None, help="profile this mode (e.g. 1 or all) and print hot spots"
    )
    return parser.parse_args(argv)


class _Timers:
    """Accumulates host seconds per phase while installed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        for owner, name, phase in _PHASES:
            original = owner.__dict__[name]
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(original, phase))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _timed(self, function: Callable[..., Any], phase: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if threading.current_thread() is threading.main_thread():  # not the worker's
                    elapsed = time.perf_counter() - start
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed

        return timed


def _ids(rng: np.random.Generator, args: argparse.Namespace, tokens: int) -> torch.Tensor:
    """[tokens, 6] expert ids, skewed towards a random set of experts."""
    weights = rng.permutation(1.0 / np.arange(1, args.experts + 1) ** 1.2)
    return torch.from_numpy(
        rng.choice(args.experts, size=(tokens, 6), p=weights / weights.sum())
    ).to(torch.int64)


def run_mode(args: argparse.Namespace, mode: str, profiler: cProfile.Profile | None):
    """Host ms per rebalance step() call and per phase, for one mode."""
    layers_per_step = None if mode == "all" else int(mode)
    chunks = 1 if layers_per_step is None else -(-args.layers // layers_per_step)
    interval = chunks + 4
    balancer = ExpertBalancer(
        args.layers,
        args.experts,
        args.slots,
        device="cpu",
        window_size=interval,
        step_interval=interval,
        layers_per_step=layers_per_step,
    )
    weights = [
        [torch.randn(args.slots, args.size, args.size) for _ in range(args.tensors)]
        for _ in range(args.layers)
    ]
    rng = np.random.default_rng(0)
    timers = _Timers()
    calls: list[float] = []
    cpu: list[float] = []
    gc.collect()
    gc.freeze()
    gc.disable()
    timers.install()
    try:
        for step in range(1, interval * (args.rebalances + 1) + 1):
            if step % interval == 1:
                ids = [_ids(rng, args, 64) for _ in range(args.layers)]
            for layer in range(args.layers):
                balancer.route(layer, ids[layer])
            pending = balancer._pending
            if pending is not None:
                pending.result()  # the worker's planning is not the serving thread's time
            staged_before = balancer._staging is not None
            applying = pending is not None and balancer.stats.steps + 1 >= balancer._apply_at
            if profiler is not None and (staged_before or applying):
                profiler.enable()
            start, thread_start = time.perf_counter(), time.thread_time()
            balancer.step(weights)
            seconds = time.perf_counter() - start
            thread_seconds = time.thread_time() - thread_start
            if profiler is not None:
                profiler.disable()
            if (staged_before or applying) and step > interval * 1.5:  # the first one warms up
                calls.append(seconds)
                cpu.append(thread_seconds)
            elif staged_before or applying:
                timers.seconds.clear()
    finally:
        timers.uninstall()
        gc.enable()
        gc.unfreeze()
    balancer.close()
    count = len(calls)
    phases = {k: 1e3 * v / count for k, v in timers.seconds.items()}
    return 1e3 * np.array(calls), 1e3 * np.array(cpu), phases


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        print(
            f"torch {torch.__version__}, 1 rank (gloo, CPU), {args.layers} layers, "
            f"{args.experts} experts, {args.slots} slots, {args.tensors} tensors of "
            f"{args.size}x{args.size} float32 per slot; {args.rebalances} rebalances per mode "
            "(the first not counted)"
        )
        names = [phase for _, _, phase in _PHASES]
        print(
            f"{'mode':6s} {'calls':>5s} {'mean ms':>8s} {'max ms':>8s} {'cpu ms':>8s}  "
            "per-call phase ms (wall)"
        )
        for mode in args.modes.split(","):
            profiler = cProfile.Profile() if args.cprofile == mode else None
            calls, cpu, phases = run_mode(args, mode, profiler)
            parts = ", ".join(f"{n.strip()} {phases[n]:.3f}" for n in names if n in phases)
            print(
                f"{mode:6s} {len(calls):5d} {calls.mean():8.3f} {calls.max():8.3f} "
                f"{cpu.mean():8.3f}  {parts}"
            )
            if profiler is not None:
                stats = pstats.Stats(profiler)
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats(40)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
