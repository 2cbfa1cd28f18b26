"""A small expert-parallel MoE model served with eplb's ExpertBalancer, on 2 ranks.

Each rank holds R/P expert slots (two matrices per expert) and its own tokens.
Routing is skewed like DeepSeek-R1's real per-layer loads. The balancer counts
the load in every forward pass, rebalances after ``--steps`` steps without
stalling, and this script checks and prints:

- the balancedness (SPEC.md: mean over max GPU load, mean over layers) of the
  window's load before and after the rebalance, and of the tokens each rank
  actually received for a fixed batch;
- that the model's output for that batch is the same after the rebalance as
  before: the weights moved to the right slots;
- with ``--timing`` (default on CUDA): the step time a rebalance adds, against a
  blocking baseline (``.cpu()`` of the load, placement on the main thread,
  rearrangement right away), from the same run;
- with ``--inject-fault``: rank 1 fails in the middle of a weight move; every
  rank's ``step()`` raises a RearrangeError within the timeout naming the
  layers it changed, and the engine recovers as the README's "Failure model"
  says: reload those layers, make a new EP group, ``reset(phy2log, group=)``;
  the next rebalance then succeeds and the outputs still match.

    python examples/moe_ep_example.py --device cpu --steps 8          # gloo, CI
    python examples/moe_ep_example.py --device cuda --tokens 4096     # 2 GPUs, NCCL
    python examples/moe_ep_example.py --device cpu --inject-fault     # failure, recovery
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import socket
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.loads import DATA_ENV_VAR, real_loads, synthetic_load
from eplb.metrics import balancedness
from eplb.production import (
    ExpertBalancer,
    RearrangeOptions,
    rearrange_expert_weights,
    rebalance_experts,
)
from eplb.production.errors import RearrangeError
from eplb.production.transport import TorchDistributedTransport


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world-size", type=int, default=2, help="EP ranks (processes)")
    parser.add_argument("--steps", type=int, default=8, help="steps before the rebalance")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--slots", type=int, default=None, help="R; default experts * 5 / 4")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank per step")
    parser.add_argument("--data-dir", default=None, help="folder of the real load JSON files")
    parser.add_argument("--workload", default=None, help="real load file stem (default: first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prepare-ahead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the balancer's worker thread prepares the weight move (ExpertBalancer's default)",
    )
    parser.add_argument(
        "--timing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the rebalance against a blocking baseline (default: on CUDA)",
    )
    parser.add_argument(
        "--inject-fault",
        action="store_true",
        help="rank 1 fails in the middle of a weight move; show the recovery",
    )
    parser.add_argument(
        "--fault-timeout", type=float, default=10.0, help="RearrangeOptions.timeout (seconds)"
    )
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be >= 4 (2 warm-up steps, then steps to time)")
    if args.slots is None:
        args.slots = args.experts * 5 // 4 // args.world_size * args.world_size
    if args.timing is None:
        args.timing = args.device == "cuda"
    return args


def routing_bias(args: argparse.Namespace) -> np.ndarray:
    """[layers, experts] float64: log of each expert's share of the real load.

    Layers and experts are taken evenly spaced from the real [58, 256] trace, so
    the toy model keeps its per-expert skew; a synthetic trace stands in without data.
    """
    if args.data_dir:
        os.environ[DATA_ENV_VAR] = args.data_dir
    loads = real_loads()
    if loads:
        trace = loads[args.workload or sorted(loads)[0]]
        rows = np.linspace(0, trace.shape[0] - 1, args.layers).round().astype(int)
        cols = np.linspace(0, trace.shape[1] - 1, args.experts).round().astype(int)
        load = trace[np.ix_(rows, cols)]
    else:
        print("real loads not found: using eplb.loads.synthetic_load")
        load = synthetic_load(args.layers, args.experts, seed=args.seed)
    share = (load + 1.0) / (load + 1.0).sum(axis=1, keepdims=True)
    return np.log(share)


class ToyMoE:
    """Residual MoE layers; this rank holds slots rank*R/P .. (rank+1)*R/P - 1 of each.

    Dispatch is kept simple: every rank sees all ranks' tokens (all-gather),
    computes the (token, choice) pairs routed to its slots, and a sum over ranks
    (all-reduce) combines them. Each pair is nonzero on exactly one rank, so the
    sum adds zeros only: the result does not depend on where the expert lives.
    """

    def __init__(self, args: argparse.Namespace, balancer: ExpertBalancer, rank: int) -> None:
        self.args, self.balancer, self.rank = args, balancer, rank
        self.device = balancer.device
        self.local = args.slots // args.world_size
        gen = torch.Generator().manual_seed(args.seed)  # the same model on every rank
        layers, experts, hidden, ffn = args.layers, args.experts, args.hidden, args.ffn
        self.gate = (torch.randn(layers, hidden, experts, generator=gen) / math.sqrt(hidden)).to(
            self.device
        )
        self.bias = torch.from_numpy(routing_bias(args)).float().to(self.device)
        #: The checkpoint: [layers, experts, H, F] and [layers, experts, F, H] (host).
        self.checkpoint = (
            torch.randn(layers, experts, hidden, ffn, generator=gen) / math.sqrt(hidden),
            torch.randn(layers, experts, ffn, hidden, generator=gen) / math.sqrt(ffn),
        )
        mine = balancer.phy2log[:, rank * self.local : (rank + 1) * self.local].cpu()
        #: Per layer, this rank's slots' [w_in [S, H, F], w_out [S, F, H]], moved by rebalances.
        self.expert_weights = [
            [full[layer, mine[layer]].to(self.device) for full in self.checkpoint]
            for layer in range(layers)
        ]

    def reload(self, layers: tuple[int, ...], phy2log: torch.Tensor) -> None:
        """Load ``layers`` of this rank's slots from the checkpoint, in placement ``phy2log``
        ([layers, R]), in place (the tensors the balancer moves stay the same)."""
        mine = phy2log[:, self.rank * self.local : (self.rank + 1) * self.local].cpu()
        for layer in layers:
            for tensor, full in zip(self.expert_weights[layer], self.checkpoint, strict=True):
                tensor.copy_(full[layer, mine[layer]])

    def forward(self, x: torch.Tensor, record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [tokens, hidden] this rank's tokens. Returns the output [tokens, hidden] and
        the slots every choice went to, [layers, tokens, topk]."""
        h, all_slots = x, []
        for layer in range(self.args.layers):
            # Routing from the token embedding: the same batch routes the same way
            # before and after a rebalance, which the output check relies on.
            logits = x @ self.gate[layer] + self.bias[layer]
            top, ids = logits.topk(self.args.topk, dim=-1)
            slots = self.balancer.route(layer, ids, record=record)
            h = h + (top.softmax(-1).unsqueeze(-1) * self._experts(layer, h, slots)).sum(1)
            all_slots.append(slots)
        return h, torch.stack(all_slots)

    def _experts(self, layer: int, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[tokens, topk, hidden]: each choice's expert output, from whichever rank holds it."""
        h_all, slots_all = _all_gather(h), _all_gather(slots)
        w_in, w_out = self.expert_weights[layer]
        # Every local slot on every token keeps the computation free of host syncs;
        # the rows a slot was not chosen for are masked out below.
        out = torch.relu(h_all @ w_in) @ w_out  # [S, N, H]
        local = slots_all - self.rank * self.local
        here = (local >= 0) & (local < self.local)
        tokens = torch.arange(h_all.shape[0], device=self.device).unsqueeze(1)
        picked = out[local.clamp(0, self.local - 1), tokens] * here.unsqueeze(-1)
        if dist.get_world_size() > 1:
            dist.all_reduce(picked)
        return picked.view(-1, h.shape[0], *picked.shape[1:])[self.rank]


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def routed_balancedness(slots: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean over layers of SPEC.md's balancedness of the tokens each rank received.

    slots: [layers, tokens, topk] this rank's routed slots (summed over ranks here).
    """
    per_rank = slots.reshape(args.layers, -1) // (args.slots // args.world_size)
    counts = torch.stack([torch.bincount(row, minlength=args.world_size) for row in per_rank])
    dist.all_reduce(counts)
    return float(balancedness(counts.cpu().numpy().astype(np.float64)).mean())


def blocking_rebalance(model: ToyMoE) -> None:
    """The baseline: load to the host (blocking), placement on this thread, move the weights."""
    args, balancer = model.args, model.balancer
    load = balancer.window_load().clone()
    dist.all_reduce(load)
    new, _, _ = rebalance_experts(load.cpu(), args.slots, args.groups, args.nodes, args.world_size)
    rearrange_expert_weights(balancer.phy2log, new, model.expert_weights)
    balancer.reset(new)


def warm_up_transfers(args: argparse.Namespace, rank: int) -> None:
    """Move dummy weights between the ranks once, so that neither timed run pays the
    first rearrangement's one-time costs (connections, lazy imports, allocations)."""
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    old = torch.arange(args.slots).remainder(args.experts).expand(args.layers, -1)
    new = old.roll(args.slots // args.world_size, dims=1)  # every slot from another rank
    shape = (args.slots // args.world_size, args.hidden, args.ffn)
    rearrange_expert_weights(old, new, [[torch.zeros(shape, device=device)] for _ in old])


class Run(NamedTuple):
    """One run's model, step durations (ms) and the check batch's (output, slots) before/after."""

    model: ToyMoE
    step_ms: list[float]
    before: tuple[torch.Tensor, torch.Tensor]
    after: tuple[torch.Tensor, torch.Tensor]


def run(args: argparse.Namespace, rank: int, blocking: bool) -> Run:
    """Build a model, run steps 1 .. steps + 3 with a rebalance at step ``steps``.

    Ours applies it at ``steps + 1`` (``apply_delay=1``); the baseline does all of
    it inside step ``steps``. A fixed check batch goes through before and after.
    """
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    balancer = ExpertBalancer(
        args.layers,
        args.experts,
        args.slots,
        args.groups,
        args.nodes,
        device=device,
        window_size=args.steps,
        # The baseline rebalances by hand; its balancer only records and routes.
        step_interval=10**9 if blocking else args.steps,
        rearrange=RearrangeOptions(prepare_ahead=args.prepare_ahead),
    )
    model = ToyMoE(args, balancer, rank)
    x_check = torch.randn(
        args.tokens, args.hidden, generator=torch.Generator().manual_seed(10_000 + rank)
    ).to(device)
    before = model.forward(x_check, record=False)
    clock = _Clock(device)
    for step in range(1, args.steps + 4):
        model.forward(_batch(args, rank, step, device))
        balancer.step(model.expert_weights)
        if blocking and step == args.steps:
            blocking_rebalance(model)
        clock.tick()
    step_ms = clock.durations_ms()
    assert blocking or balancer.stats.rebalances == 1, balancer.stats
    after = model.forward(x_check, record=False)
    balancer.close()
    return Run(model, step_ms, before, after)


class _Clock:
    """Per-step durations: CUDA events (the GPU timeline, idle gaps included) or host time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self.events = [torch.cuda.Event(enable_timing=True)]
            self.events[0].record()
        self.times = [time.perf_counter()]

    def tick(self) -> None:
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        else:
            self.times.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in itertools.pairwise(self.events)]
        return [(b - a) * 1e3 for a, b in itertools.pairwise(self.times)]


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # one core per rank: more threads only contend
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size
    )
    if args.inject_fault:
        fault_and_recovery(args, rank)
        # The failed move's group still has receives posted (gloo ends them only
        # at their deadline): destroying it before then aborts the process
        # (SIGABRT). Leave without tearing it down, as a process that failed would.
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
    try:
        _check_and_report(args, rank)
    finally:
        dist.destroy_process_group()


def fault_and_recovery(args: argparse.Namespace, rank: int) -> None:
    """Rank 1 fails mid-move; every rank raises in time, recovers, rebalances again."""
    say = print if rank == 0 else _quiet
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    world = list(range(args.world_size))
    balancer = ExpertBalancer(
        args.layers,
        args.experts,
        args.slots,
        args.groups,
        args.nodes,
        device=device,
        group=dist.new_group(world),  # the EP group: the model's collectives use the world
        window_size=args.steps,
        step_interval=args.steps,
        # One expert per pipeline step: the move takes many steps to fail in the middle of.
        rearrange=RearrangeOptions(max_batch_bytes=1, timeout=args.fault_timeout),
    )
    model = ToyMoE(args, balancer, rank)
    x_check = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(7))
    x_check = x_check.to(device)
    before = model.forward(x_check, record=False)[0]
    original_wait = TorchDistributedTransport.wait
    if rank == 1:  # a link that breaks on rank 1 at its 6th step of the move
        waits = []

        def breaking(self: TorchDistributedTransport, pending: object) -> None:
            waits.append(1)
            if len(waits) == 6:
                raise ConnectionError("injected: rank 1 lost its link mid-move")
            original_wait(self, pending)

        TorchDistributedTransport.wait = breaking  # type: ignore[method-assign]
    error, step, seconds = None, 0, 0.0
    while error is None and step < 3 * args.steps:
        step += 1
        model.forward(_batch(args, rank, step, device))
        start = time.perf_counter()
        try:
            balancer.step(model.expert_weights)
        except RearrangeError as exc:
            error, seconds = exc, time.perf_counter() - start
    TorchDistributedTransport.wait = original_wait  # type: ignore[method-assign]
    if error is None:
        raise AssertionError("the injected fault did not fail the rebalance")
    for r in world:  # in rank order
        if r == rank:
            print(
                f"rank {rank}: step {step} raised RearrangeError after {seconds:.2f} s "
                f"(cause {type(error.cause).__name__}): layers new {list(error.layers_new)}, "
                f"mixed {list(error.layers_mixed)}, old {list(error.layers_old)}",
                flush=True,
            )
        dist.barrier()
    try:
        balancer.step(model.expert_weights)
        raise AssertionError("a failed balancer must refuse steps until it is reset")
    except RuntimeError as refused:
        say(f"step() refuses until the engine recovers: {str(refused)[:60]}...")
    # Recovery: the maps still hold the old placement; reload the changed layers in
    # it, replace the aborted EP group, and tell the balancer what the weights hold.
    model.reload(error.layers_changed, balancer.phy2log)
    balancer.reset(balancer.phy2log.cpu(), group=dist.new_group(world))
    if not torch.allclose(model.forward(x_check, record=False)[0], before, atol=1e-5):
        raise AssertionError("outputs differ after the reload")
    while balancer.stats.rebalances == 0 and step < 6 * args.steps:
        step += 1
        model.forward(_batch(args, rank, step, device))
        balancer.step(model.expert_weights)
    if balancer.stats.rebalances != 1:
        raise AssertionError("no rebalance after the recovery")
    if not torch.allclose(model.forward(x_check, record=False)[0], before, atol=1e-5):
        raise AssertionError("outputs differ after the rebalance that followed the recovery")
    say(
        f"recovered: layers reloaded, new EP group, reset(); step {step} rebalanced again "
        "and the outputs match"
    )
    balancer.close()


def _batch(args: argparse.Namespace, rank: int, step: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + rank)
    return torch.randn(args.tokens, args.hidden, generator=gen).to(device)


def _check_and_report(args: argparse.Namespace, rank: int) -> None:
    say = print if rank == 0 else _quiet
    say(
        f"{args.world_size} ranks ({args.device}), {args.layers} layers, {args.experts} experts, "
        f"{args.slots} slots, top-{args.topk}, hidden {args.hidden}, "
        f"{args.tokens} tokens/rank/step, rebalance after {args.steps} steps"
    )
    warm_up_transfers(args, rank)
    ours = run(args, rank, blocking=False)
    stats = ours.model.balancer.stats
    say(
        f"window load: balancedness before {stats.balancedness_before:.3f} "
        f"after {stats.balancedness_after:.3f} (SPEC.md, mean over layers); placement "
        f"{stats.last_plan_seconds * 1e3:.2f} ms in the worker thread, apply "
        f"{stats.last_apply_seconds * 1e3:.2f} ms on the host ({stats.waits} waits)"
    )
    routed = [routed_balancedness(r[1], args) for r in (ours.before, ours.after)]
    say(f"check batch, tokens per rank: balancedness before {routed[0]:.3f} after {routed[1]:.3f}")

    # The rebalance moved weights and changed the slots tokens go to, but not the
    # routing (same logits) nor the result. Tolerance: only the GEMM kernels may
    # round differently now that the experts sit at other slot indices.
    ids_moved = ours.model.balancer.phy2log.gather(1, ours.after[1].reshape(args.layers, -1))
    ids_before = _initial_expert_of(ours.before[1], args)
    if not torch.equal(ids_moved.cpu(), ids_before):
        raise AssertionError("the check batch routed to other experts after the rebalance")
    diff = (ours.after[0] - ours.before[0]).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if not torch.allclose(ours.after[0], ours.before[0], rtol=1e-5, atol=1e-5):
        raise AssertionError(f"outputs differ after the rebalance: max abs diff {float(diff)}")
    moved = int((ours.after[1] != ours.before[1]).sum())
    say(
        f"outputs match after the rebalance (max abs diff {float(diff):.2e}; "
        f"{moved} of rank 0's choices now go to other slots)"
    )
    if not args.timing:
        return

    baseline = run(args, rank, blocking=True)
    n = args.steps - 1  # index of the interval step
    plain = float(np.mean(ours.step_ms[2:n] + baseline.step_ms[2:n]))  # 2 warm-up steps
    say("\nstep time (ms, rank 0)     interval step   next step   extra over the 2 steps")
    say(f"no rebalance (mean)        {plain:13.3f}")
    for name, ms in (
        ("ours (ExpertBalancer)", ours.step_ms),
        ("blocking baseline", baseline.step_ms),
    ):
        say(f"{name:26s} {ms[n]:13.3f} {ms[n + 1]:11.3f} {ms[n] + ms[n + 1] - 2 * plain:24.3f}")


def _initial_expert_of(slots: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """[layers, tokens * topk]: the expert behind each slot of the initial placement (s % E)."""
    return (slots.reshape(args.layers, -1) % args.experts).cpu()


def _quiet(*_: object) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        raise SystemExit(
            f"--device cuda needs {args.world_size} GPUs, found {torch.cuda.device_count()}"
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
