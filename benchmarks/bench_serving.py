"""Step time while serving, with and without rebalancing: does a rebalance stall a step?

Each rank serves decode steps of a DeepSeek-V2-Lite-shaped MoE (26 layers, 64
experts plus redundant slots, per expert three bf16 matrices 2048 x 1408): per
layer, the router's top-6 choices go through ``ExpertBalancer.route``, tokens
are gathered from all ranks (``all_gather``), each rank runs a grouped SwiGLU
expert matmul over its slots (``bmm`` over a fixed capacity per slot, as
low-latency EP kernels lay tokens out, no host sync), and the results are
summed back (``all_reduce``). The expert ids follow the real DeepSeek-R1
statistics (``../shared/data``): every ``--interval`` steps the workload phase
changes (another trace, other layers, experts relabelled), so that every
rebalance moves most slots. The dispatch uses the default process group, the
balancer its own (as engines do).

Modes, each a fresh model and balancer, the same steps and tokens:

- ``none``: no rebalancing (the balancer only routes and records);
- ``blocking``: the seed's approach: at each interval, the window's load to the
  host (all-reduce, ``.cpu()``), the placement on the serving thread, the
  weights moved (``rearrange_expert_weights``), all inside that step;
- ``all``: ``ExpertBalancer`` as by default: placement on a worker thread, all
  layers' weights moved in one step;
- ``staged K``: ``ExpertBalancer(layers_per_step=K)``.

``--migration-tolerance T`` gives the all and staged modes the migration-aware
placement (``ExpertBalancer(migration_tolerance=T)``): a placement within T of
SPEC's balancedness that keeps experts where they are, so a rebalance moves
fewer slots (the ``moved`` column) than the blocking baseline's SPEC placement.

A step's time is host wall time from its start until the compute stream has
finished it (an event, as an engine waits for its sampled tokens); per step,
the slowest rank's. The report: p50, p99 and max over the timed steps, the
worst step of the rebalance windows, and the steps from each interval to the
end of its apply. After each mode every slot's weights are checked against
the maps (a fingerprint per expert); a mismatch exits non-zero.

Beside each step's time, the host time spent inside ``balancer.step()`` (for
the blocking baseline: inside its rebalance) is reported separately: the
serving thread's own rebalancing work, apart from the forward pass.

``--cuda-graph`` captures each mode's forward pass once (``torch.cuda.graph``)
and replays it every step, as engines serve decode: the host then launches a
step in a fraction of a millisecond, the step time is the GPU's, and a
rebalance's host work inside ``step()`` overlaps the forward pass in flight
instead of adding to it. The replayed graph reads the balancer's maps and the
weights in place, so every staged commit must keep their addresses (the check
after each mode would catch a slot the graph did not see updated).

Python's cyclic garbage collector is frozen and disabled inside the timed
loops, and one discarded warm-up run precedes the timed modes (see
``run_mode`` and ``_report``).

    python benchmarks/bench_serving.py --world-size 2 --plot serving.png   # 2 GPUs
    python benchmarks/bench_serving.py --world-size 1 --plot serving.png   # 1 GPU
    python benchmarks/bench_serving.py --world-size 1 --cuda-graph         # forward in a CUDA graph
    python benchmarks/bench_serving.py --shape cpu --world-size 2          # CPU, gloo, seconds
    python benchmarks/bench_serving.py --tiny --world-size 2               # smoke, faster still
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.loads import real_loads
from eplb.production import (
    ExpertBalancer,
    RearrangeOptions,
    rearrange_expert_weights,
    rebalance_experts,
)

#: (layers, experts, slots, hidden, ffn, tokens per rank, top-k): DeepSeek-V2-Lite; a CPU
#: shape with enough layers for staged chunks to matter that runs in seconds on gloo; tiny.
SHAPES = {
    "v2-lite": (26, 64, 72, 2048, 1408, 256, 6),
    "cpu": (12, 16, 24, 64, 32, 32, 4),
    "tiny": (4, 8, 12, 32, 16, 16, 2),
}
#: Per shape: steps per mode, steps between rebalances, leading steps left out.
RUNS = {"v2-lite": (560, 100, 20), "cpu": (190, 40, 5), "tiny": (36, 10, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="ranks (processes), default 2")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda if any (v2-lite)"
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="v2-lite",
        help="v2-lite (GPU); cpu (CPU, seconds); tiny (smoke). cpu, tiny: --device cpu by default",
    )
    p.add_argument("--tiny", action="store_true", help="the same as --shape tiny")
    p.add_argument("--slots", type=int, default=None, help="slots in all (default: the shape's)")
    p.add_argument("--steps", type=int, default=None, help="steps per mode (default: the shape's)")
    p.add_argument("--interval", type=int, default=None, help="steps between rebalances")
    p.add_argument("--warmup", type=int, default=None, help="leading steps left out of stats")
    p.add_argument("--modes", default="none,blocking,all,staged1,staged2,staged4")
    p.add_argument(
        "--keep-slots",
        action="store_true",
        help="ExpertBalancer(keep_slots=True) in the all and staged modes (fewer copies)",
    )
    p.add_argument(
        "--apply-delay",
        type=int,
        default=1,
        help="ExpertBalancer(apply_delay=D) in the all and staged modes (default 1; from 2 on "
        "the placement runs in the placement service)",
    )
    p.add_argument(
        "--migration-tolerance",
        type=float,
        default=None,
        help="ExpertBalancer(migration_tolerance=T) in the all and staged modes: the "
        "migration-aware placement, which moves fewer slots (default: SPEC's placement)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the forward pass in a CUDA graph and replay it each step (CUDA only)",
    )
    p.add_argument("--plot", default=None, help="write step time over the run to this PNG")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
    if args.device is None:
        gpu = args.shape == "v2-lite" and torch.cuda.is_available()
        args.device = "cuda" if gpu else "cpu"
    shape = SHAPES[args.shape]
    args.layers, args.experts, slots, args.hidden, args.ffn, args.tokens, args.topk = shape
    args.slots = args.slots or slots
    # The last interval's apply (a staged one of K = 1 included) ends within the run.
    steps, interval, warmup = RUNS[args.shape]
    args.steps = args.steps or steps
    args.interval = args.interval or interval
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.modes = args.modes.split(",")
    for mode in args.modes:
        if mode not in ("none", "blocking", "all") and not (
            mode.startswith("staged") and mode[6:].isdigit() and int(mode[6:]) >= 1
        ):
            p.error(f"--modes: unknown mode {mode!r} (none, blocking, all, stagedK)")
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs --device cuda (a CUDA graph captures GPU work)")
    if args.slots % args.world_size or args.slots < args.experts:
        p.error("--slots must be a multiple of --world-size and >= the experts")
    return args


# ---------------------------------------------------------------------- workload


def phase_probs(args: argparse.Namespace, loads: list[np.ndarray], phase: int) -> np.ndarray:
    """[layers, experts] routing probabilities of a workload phase, from the real traces.

    Phase p: trace p mod 5, layers from (7 p) on, a random subset of the 256
    experts relabelled: each phase's hot experts differ, so each rebalance moves.
    """
    rng = np.random.default_rng(args.seed * 1000 + phase)
    trace = loads[phase % len(loads)]
    rows = (np.arange(args.layers) + 7 * phase) % trace.shape[0]
    experts = rng.permutation(trace.shape[1])[: args.experts]
    probs = trace[rows][:, experts] + 1.0  # every expert stays possible
    return probs / probs.sum(1, keepdims=True)


def phase_ids(args: argparse.Namespace, probs: np.ndarray, rank: int, count: int) -> torch.Tensor:
    """[count, layers, tokens, topk] int64: distinct expert choices per token, drawn from probs."""
    gen = torch.Generator().manual_seed(args.seed * 7919 + rank)
    p = torch.from_numpy(probs)
    out = torch.empty(count, args.layers, args.tokens, args.topk, dtype=torch.int64)
    for layer in range(args.layers):
        draws = torch.multinomial(
            p[layer].expand(count * args.tokens, -1), args.topk, generator=gen
        )
        out[:, layer] = draws.view(count, args.tokens, args.topk)
    return out


# ---------------------------------------------------------------------- model


class Model:
    """Expert weights of this rank's slots and a decode forward pass (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, balancer: ExpertBalancer, rank: int) -> None:
        self.args, self.balancer, self.rank = args, balancer, rank
        self.device = balancer.device
        self.local = args.slots // args.world_size
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # A slot's capacity: twice its even share of the (token, choice) pairs.
        pairs = args.world_size * args.tokens * args.topk
        self.capacity = max(1, -(-2 * pairs // args.slots))
        mine = balancer.phy2log[:, rank * self.local : (rank + 1) * self.local].cpu()
        #: Per layer [w1 [S, H, F], w3 [S, H, F], w2 [S, F, H]], moved by rebalances.
        self.expert_weights = [
            [torch.stack(m) for m in zip(*map(self._expert_of(layer), mine[layer]), strict=True)]
            for layer in range(args.layers)
        ]

    def _expert_of(self, layer: int):
        return lambda expert: self._expert(layer, int(expert))

    def _expert(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """The three matrices of (layer, expert): the same on every rank and every call."""
        args = self.args
        gen = torch.Generator(self.device).manual_seed(args.seed + 1000 * layer + expert)
        shapes = ((args.hidden, args.ffn), (args.hidden, args.ffn), (args.ffn, args.hidden))
        return tuple(
            (torch.randn(s, generator=gen, device=self.device) / s[0] ** 0.5).to(self.dtype)
            for s in shapes
        )

    def check_weights(self) -> None:
        """Every slot holds its mapped expert (first row of w1 compared exactly)."""
        phy2log = self.balancer.phy2log.cpu()
        for layer in range(self.args.layers):
            experts = phy2log[layer, self.rank * self.local : (self.rank + 1) * self.local]
            for i, expert in enumerate(experts.tolist()):
                want = self._expert(layer, expert)[0][0]
                if not torch.equal(self.expert_weights[layer][0][i, 0], want):
                    raise SystemExit(f"rank {self.rank}: layer {layer} slot {i} != expert {expert}")

    def forward(self, x: torch.Tensor, ids: torch.Tensor, record: bool = True) -> torch.Tensor:
        """x: [tokens, hidden]; ids: [layers, tokens, topk] this rank's router choices.

        record: count the choices in the balancer's load (False for warm-up passes)."""
        world = self.args.world_size
        for layer in range(self.args.layers):
            slots = self.balancer.route(layer, ids[layer], record=record)
            x_all, slots_all = (_gather(t, world) for t in (x, slots))
            y_all = self._experts(layer, x_all, slots_all)
            if world > 1:
                dist.all_reduce(y_all)
            x = y_all.view(world, -1, x.shape[1])[self.rank]
        return x

    def _experts(self, layer: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[tokens of all ranks, hidden]: the sum of this rank's slots' outputs per token."""
        s, c = self.local, self.capacity
        local = (slots - self.rank * s).reshape(-1)
        mine = (local >= 0) & (local < s)
        local = torch.where(mine, local, s)  # row s: a dump for other ranks' pairs
        # A pair's place among its slot's pairs, by a running count: no host sync.
        onehot = (local.unsqueeze(1) == torch.arange(s + 1, device=x.device)).long()
        position = (onehot.cumsum(0) * onehot).sum(1) - 1
        position = torch.where(position < c, position, c)  # column c: overflow, dropped
        token = torch.arange(slots.numel(), device=x.device) // slots.shape[1]
        buffer = x.new_zeros(s + 1, c + 1, x.shape[1])
        buffer[local, position] = x[token]
        w1, w3, w2 = self.expert_weights[layer]
        h = buffer[:s, :c]
        out = (torch.nn.functional.silu(torch.bmm(h, w1)) * torch.bmm(h, w3)).bmm(w2)
        out = torch.cat([out, out.new_zeros(s, 1, out.shape[2])], 1)  # overflow column: zero
        keep = (local < s).unsqueeze(1).to(out.dtype)
        picked = out[local.clamp(max=s - 1), position] * keep
        return x.new_zeros(x.shape).index_add_(0, token, picked)


def _gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


# ---------------------------------------------------------------------- one mode


@dataclass
class ModeRun:
    step_ms: list[float]
    step_call_ms: list[float]  # host time inside balancer.step() (blocking: its rebalance)
    finished: list[int]  # steps at which a rebalance finished
    moved_fraction: float  # slots whose expert changed, mean over rebalances


def blocking_rebalance(model: Model, group: dist.ProcessGroup | None) -> float:
    """The seed's way, on the critical path. Returns the fraction of slots that changed."""
    args, balancer = model.args, model.balancer
    load = balancer.window_load().clone()
    if args.world_size > 1:
        dist.all_reduce(load, group=group)
    new, _, _ = rebalance_experts(load.cpu(), args.slots, 1, 1, args.world_size)
    old = balancer.phy2log.cpu().clone()
    rearrange_expert_weights(old, new, model.expert_weights, group)
    balancer.reset(new)
    return float((old != new).float().mean())


def run_mode(
    args: argparse.Namespace,
    mode: str,
    rank: int,
    group: dist.ProcessGroup | None,
    phases,
    steps: int | None = None,
) -> ModeRun:
    """Serve ``steps`` (default ``args.steps``) decode steps in ``mode``; check the weights."""
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    automatic = mode not in ("none", "blocking")
    balancer = ExpertBalancer(
        args.layers,
        args.experts,
        args.slots,
        device=device,
        group=group,
        window_size=args.interval,
        step_interval=args.interval if automatic else 10**9,
        layers_per_step=int(mode[6:]) if mode.startswith("staged") else None,
        rearrange=RearrangeOptions(keep_slots=args.keep_slots and automatic),
        migration_tolerance=args.migration_tolerance if automatic else None,
        apply_delay=args.apply_delay if automatic else 1,
    )
    model = Model(args, balancer, rank)
    x0 = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
    x0 = x0.to(device, model.dtype)
    step_ms, call_ms, finished, moved = [], [], [], []
    forward = _captured(model, x0, phases[0][0]) if args.cuda_graph else None
    before = balancer.phy2log.cpu().clone()
    _sync(device)
    # A cyclic collection starts whenever enough objects were allocated, on
    # whichever step that happens, and stalls the host for milliseconds (the
    # heap of torch, numpy and numba is large): that is the collector's noise,
    # not the balancer's. Engines freeze the heap after start-up for the same
    # reason (vLLM calls gc.freeze()); here everything alive now is frozen out
    # of the collector's reach and collections are off until the loop ends.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        for step in range(1, (steps or args.steps) + 1):
            bank = phases[step // args.interval % len(phases)]
            ids = bank[step % bank.shape[0]]
            start = time.perf_counter()
            if forward is not None:
                forward(ids)
            else:
                model.forward(x0, ids)
            queued = time.perf_counter()
            if balancer.step(model.expert_weights):
                finished.append(step)
            if mode == "blocking" and step % args.interval == 0:
                moved.append(blocking_rebalance(model, group))
                finished.append(step)
            returned = time.perf_counter()
            _wait_compute(device)
            step_ms.append((time.perf_counter() - start) * 1e3)
            call_ms.append((returned - queued) * 1e3)
            if automatic and finished and finished[-1] == step:
                after = balancer.phy2log.cpu().clone()
                moved.append(float((before != after).float().mean()))
                before = after
    finally:
        gc.enable()
        gc.unfreeze()
    _sync(device)
    model.check_weights()
    balancer.close()
    del model, balancer, forward  # the graph holds its own memory pool
    gc.collect()  # the next mode's weights need this one's memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ModeRun(step_ms, call_ms, finished, float(np.mean(moved)) if moved else 0.0)


def _captured(model: Model, x: torch.Tensor, like: torch.Tensor):
    """The forward pass of ``x`` captured in a CUDA graph: returns ``run(ids)``, which
    copies ``ids`` ([layers, tokens, topk], as ``like``) into the graph's input and replays it."""
    ids = like.clone()
    side = torch.cuda.Stream(model.device)
    side.wait_stream(torch.cuda.current_stream(model.device))
    with torch.cuda.stream(side):  # torch.cuda.graph wants the kernels warm, off the capture
        for _ in range(2):
            model.forward(x, ids, record=False)
    torch.cuda.current_stream(model.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.forward(x, ids)

    def run(step_ids: torch.Tensor) -> None:
        ids.copy_(step_ids, non_blocking=True)
        graph.replay()

    return run


def _wait_compute(device: torch.device) -> None:
    """Wait for the compute stream only (side streams may still be moving weights)."""
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        event.synchronize()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- report


def summarize(
    args: argparse.Namespace, mode: str, run: ModeRun, step_ms: np.ndarray, call_ms: np.ndarray
) -> str:
    """One row of the table (see the column legend printed under it)."""
    timed = step_ms[args.warmup :]
    intervals = [] if mode == "none" else list(range(args.interval, args.steps + 1, args.interval))
    spans = list(zip(intervals, run.finished, strict=False))
    # Each interval step through the step after its apply finished (1-based steps).
    windows = [step_ms[s - 1 : f + 1] for s, f in spans]
    worst = max((float(w.max()) for w in windows), default=float("nan"))
    took = max((f - s for s, f in spans), default=0)
    p50, p99 = np.percentile(timed, [50, 99])
    # The serving thread's rebalancing work: every step from an interval to the
    # end of its apply, and the interval steps alone.
    working = [call_ms[s - 1 : f] for s, f in spans]
    reb = float(np.concatenate(working).mean()) if working else float("nan")
    start = float(np.mean([call_ms[s - 1] for s, _ in spans])) if spans else float("nan")
    return (
        f"{mode:10s} {p50:8.2f} {p99:8.2f} {timed.max():8.2f} {worst:12.2f} "
        f"{len(run.finished):6d} {took:6d} {run.moved_fraction:7.2f} "
        f"{call_ms[args.warmup :].max():10.3f} {reb:10.3f} {start:10.3f}"
    )


def worker(rank: int, args: argparse.Namespace, port: int, out: str | None) -> None:
    if args.device == "cuda":
        os.environ["TORCH_NCCL_HIGH_PRIORITY"] = "1"  # the README's recommended setting
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size
    )
    try:
        _report(rank, args, out)
    finally:
        dist.destroy_process_group()


def _report(rank: int, args: argparse.Namespace, out: str | None) -> None:
    say = print if rank == 0 else (lambda *a, **k: None)
    loads = list(real_loads().values())
    if not loads:
        raise SystemExit("real loads not found: put them in ../shared/data or set EPLB_DATA_DIR")
    group = dist.new_group(list(range(args.world_size)))  # the balancer's own
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    phases = [
        phase_ids(args, phase_probs(args, loads, p), rank, 8).to(device)
        for p in range(args.steps // args.interval + 1)
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"torch {torch.__version__}, {name}, backend {dist.get_backend()}")
    say(
        f"{args.world_size} rank(s) ({args.device}), {args.layers} layers, {args.experts} experts, "
        f"{args.slots} slots, hidden {args.hidden}, ffn {args.ffn}, {args.tokens} tokens/rank, "
        f"top-{args.topk}; {args.steps} steps, rebalance every {args.interval}, "
        f"first {args.warmup} steps not in the statistics"
        + ("; kept slots (all, staged)" if args.keep_slots else "")
        + ("; forward pass replayed from a CUDA graph" if args.cuda_graph else "")
        + (f"; apply_delay {args.apply_delay} (all, staged)" if args.apply_delay != 1 else "")
        + (
            f"; migration-aware placement, tolerance {args.migration_tolerance:g} (all, staged)"
            if args.migration_tolerance is not None
            else ""
        )
    )
    # One-off costs (lazily loaded kernels, allocator growth, the placement
    # core's first call, first collectives on the balancer's group) land in
    # whichever mode runs first: a discarded run of a rebalancing mode pays them.
    balancing = [m for m in args.modes if m.startswith("staged")] + ["all"]
    warm = balancing[0] if any(m != "none" for m in args.modes) else "none"
    run_mode(args, warm, rank, group, phases, steps=min(args.steps, 2 * args.interval))
    say(f"warm-up: one {warm} run of {min(args.steps, 2 * args.interval)} steps, discarded")
    results: dict[str, np.ndarray] = {}
    say(
        f"{'mode':10s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'rebal. max':>12s} "
        f"{'done':>6s} {'steps':>6s} {'moved':>7s} {'step() max':>10s} {'step() reb':>10s} "
        f"{'step() int':>10s}"
    )
    for mode in args.modes:
        run = run_mode(args, mode, rank, group, phases)
        # On the device: the default group is NCCL's on CUDA, which reduces no host tensor.
        times = torch.tensor([run.step_ms, run.step_call_ms], dtype=torch.float64, device=device)
        if args.world_size > 1:  # per step, the slowest rank
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
        times = times.cpu()
        results[mode] = times[0].numpy()
        say(summarize(args, mode, run, results[mode], times[1].numpy()), flush=True)
    say(
        "columns: step time percentiles over the timed steps; rebal. max: the worst step from "
        "each interval step to the end of its apply; done: rebalances finished; steps: the most "
        "steps from an interval to the end of its apply; moved: fraction of slots whose expert "
        "changed per rebalance; step() (ms, host time inside balancer.step(), for blocking "
        "inside its rebalance, slowest rank per step): max over the timed steps, reb the mean "
        "over the steps from each interval to the end of its apply, int the mean over the "
        "interval steps. All weights checked against the maps after each mode."
    )
    if "none" in results:
        steady = results["none"][args.warmup :]
        first = slice(args.warmup, args.interval - 1)  # before any rebalance: the same work
        say("\nagainst no rebalancing (targets: staged p99 <= 1.05x, staged max < 1.2x)")
        say(f"{'mode':10s} {'p99 x':>8s} {'max x':>8s} {'same work x':>12s} {'window/before':>14s}")
        for mode, times in results.items():
            timed = times[args.warmup :]
            ratio_p99 = np.percentile(timed, 99) / np.percentile(steady, 99)
            drift = np.median(times[first]) / np.median(results["none"][first])
            say(
                f"{mode:10s} {ratio_p99:8.3f} {timed.max() / steady.max():8.3f} "
                f"{drift:12.3f} {_window_over_before(args, mode, times):14.3f}"
            )
        say(
            "same work x: median step of the steps before the first rebalance (identical work "
            "in every mode) over no rebalancing's: how far the machine drifts between modes. "
            "window/before: per rebalance, the worst step of the half interval from its interval "
            "step on over the median of the 20 steps before the interval, worst rebalance: a "
            "comparison within one mode, free of that drift."
        )
    if out and rank == 0:
        plot(args, results, out)
        say(f"plot written to {out}")


def _window_over_before(args: argparse.Namespace, mode: str, times: np.ndarray) -> float:
    """Worst rebalance window's max (half an interval from its interval step) over the median
    of the 20 steps before its interval."""
    if mode == "none":
        return float("nan")
    ratios = []
    for start in range(args.interval, len(times) + 1, args.interval):
        before = times[max(args.warmup, start - 21) : start - 1]
        window = times[start - 1 : min(len(times), start - 1 + args.interval // 2)]
        if len(before) and len(window):
            ratios.append(float(window.max() / np.median(before)))
    return max(ratios, default=float("nan"))


def plot(args: argparse.Namespace, results: dict[str, np.ndarray], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    for mode, times in results.items():
        ax.plot(np.arange(1, len(times) + 1), times, label=mode, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms, slowest rank)")
    ax.set_yscale("log")
    ax.set_title(
        f"{args.world_size} rank(s), {args.layers} layers x {args.slots} slots, "
        f"rebalance every {args.interval} steps"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        found = torch.cuda.device_count()
        raise SystemExit(f"--device cuda needs {args.world_size} GPUs, found {found}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(args, port, args.plot), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    sys.exit(main())
