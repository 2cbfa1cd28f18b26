"""Weight rearrangement on 2 ranks: ours against a naive exchange and against the link bound.

Two placements are computed from two real workloads (by default
``prefill_in1024`` and ``decode_in1000out1000``), 2 ranks, 1 node; the expert
weights (3 bf16 matrices per expert) are moved from one placement to the other
and back, several times, each move timed from the call to the end of the last
copy (all ranks synchronized, slowest rank counted), and checked bit for bit.

Shapes:

- DeepSeek-V2-Lite: hidden 2048, intermediate 1408, 26 layers, 64 experts,
  R = 72 slots, no expert groups. The real trace has 256 experts; experts
  4i..4i+3 are summed into expert i, and its first 26 MoE layers are used.
- DeepSeek-V3: hidden 7168, intermediate 2048, 256 experts, R = 288, 8 groups.
  One layer holds 144 slots x 88 MB = 12.7 GB per rank, so all 58 layers do not
  fit in one GPU: ``--v3-layers`` (default 6) layers, evenly spaced over the 58,
  are placed and moved.

Printed beside our time, from the same run:

- the bound: bytes the busiest direction must move / one-way peer bandwidth.
  With 2 ranks every expert a rank lacks has one possible sender, so those bytes
  are fixed by the two placements. Peer bandwidth: a large GPU0 -> GPU1 copy
  (``copy_``, a peer cudaMemcpy) timed with CUDA events; NCCL send/recv of the
  same bytes, one way and both ways at once, is printed too;
- a naive baseline (written here, in the style of early serving engines): per
  layer, the maps copied to the host, one send/recv per expert, per matrix and
  per slot that needs it, local copies through a buffer.

Runs on 2 GPUs with NCCL (the default when 2 GPUs are present)::

    python benchmarks/bench_rearrange.py --data-dir DIR

With ``--high-priority-nccl`` the group's NCCL streams run at high CUDA
priority (as ``TORCH_NCCL_HIGH_PRIORITY=1`` does): the wire's kernels then get
SMs ahead of the pack and write copies (what we recommend for serving).

With ``--keep-slots`` placement B is reordered within each GPU so that experts
staying on a GPU keep their slots (``keep_experts_in_place``, what
``ExpertBalancer(keep_slots=True)`` does): the same transfers, far fewer local
copies.

With ``--plan-ahead`` each move is prepared before its timer starts
(``prepare_rearrangement``: the plan, the messages, when each slot is
written and the slot side of every copy, on the host), as ``ExpertBalancer``'s
worker thread does while the GPU serves; the time it took is printed with the
phases. The call then checks its input, agrees with the other rank and moves.

With ``--pin-cpus`` each rank's process (and the threads NCCL starts) runs on
its own share of the CPUs of its GPU's NUMA node, as serving engines pin
theirs: the host launches every step, so where its threads run shows in the
times.

With ``--kept-buffers`` every move takes its message buffers from one
``RearrangeBuffers`` (with NCCL: registered with the communicator, so NCCL
moves them without its staging copies).

and on the CPU with gloo, smaller matrices, for debugging::

    python benchmarks/bench_rearrange.py --backend gloo --scale 16 --repeats 1

Without moving anything, how each move is cut into steps (host only)::

    python benchmarks/bench_rearrange.py --plan-only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.loads import find_data_dir, read_load
from eplb.production.rearrange import (
    DEFAULT_MAX_BATCH_BYTES,
    RearrangeBuffers,
    keep_experts_in_place,
    plan_rearrangement,
    prepare_rearrangement,
    rearrange_expert_weights,
    warmup_rearrangement,
)

try:  # the fast path, where it exists; it returns the same placement as the reference
    from eplb.production import rebalance_experts as _rebalance

    PLACEMENT_SOURCE = "eplb.production.rebalance_experts"
except ImportError:
    from eplb.reference import rebalance_experts as _rebalance

    PLACEMENT_SOURCE = "eplb.reference.rebalance_experts"

RANKS = 2
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """One model's MoE shape as moved here."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    slots: int
    groups: int
    layers: tuple[int, ...]  # MoE layers of the trace used (after merging experts)

    def matrices(self) -> list[tuple[int, int]]:
        """Per-slot shapes of w1, w2, w3 (gate, down, up)."""
        return [
            (self.intermediate, self.hidden),
            (self.hidden, self.intermediate),
            (self.intermediate, self.hidden),
        ]

    @property
    def expert_bytes(self) -> int:
        return sum(a * b for a, b in self.matrices()) * 2  # bf16


@dataclass(frozen=True)
class Case:
    """One shape, its two placements and the figures derived from them."""

    shape: Shape
    first: np.ndarray  # [layers, R] placement of workload A
    second: np.ndarray  # [layers, R] placement of workload B


def _shapes(args: argparse.Namespace) -> list[Shape]:
    s = args.scale
    v3_layers = tuple(int(x) for x in np.linspace(0, 57, args.v3_layers).round())
    found = {
        "v2-lite": Shape("DeepSeek-V2-Lite", 2048 // s, 1408 // s, 64, 72, 1, tuple(range(26))),
        "v3": Shape("DeepSeek-V3", 7168 // s, 2048 // s, 256, 288, 8, v3_layers),
    }
    return [found[name] for name in args.shapes.split(",")]


def _placement(load: np.ndarray, shape: Shape) -> np.ndarray:
    """[layers, R] phy2log for 1 node and RANKS GPUs."""
    if shape.experts != load.shape[1]:  # merge adjacent experts, keeping the total
        load = load.reshape(load.shape[0], shape.experts, -1).sum(axis=2)
    load = load[list(shape.layers)]
    if PLACEMENT_SOURCE.startswith("eplb.production"):
        phy2log = _rebalance(torch.from_numpy(load), shape.slots, shape.groups, 1, RANKS)[0]
        return phy2log.cpu().numpy()
    return np.asarray(_rebalance(load, shape.slots, shape.groups, 1, RANKS)[0])


def _load(data_dir: Path, workload: str) -> np.ndarray:
    """[58, 256] tokens per expert of the MoE layers of one workload."""
    return read_load(data_dir / f"{workload}.json")[3:]


# ------------------------------------------------------------- weights and check


def _bases(shape: Shape, device: torch.device) -> list[torch.Tensor]:
    """One random int16 pattern per matrix, the same on every rank."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(-(2**15), 2**15, m, dtype=torch.int16, generator=generator).to(device)
        for m in shape.matrices()
    ]


def _key(layer: int, expert: int, matrix: int, experts: int) -> int:
    """What sets one expert's matrix apart from all others: added to the pattern."""
    return (layer * experts + expert) * 3 + matrix + 1


def _fill(weights, bases, phy2log: np.ndarray, rank: int, experts: int) -> None:
    per_rank = phy2log.shape[1] // RANKS
    for layer, tensors in enumerate(weights):
        for local in range(per_rank):
            expert = int(phy2log[layer, rank * per_rank + local])
            for matrix, tensor in enumerate(tensors):
                key = _key(layer, expert, matrix, experts)
                torch.add(bases[matrix], key, out=tensor[local].view(torch.int16))


def _mismatches(weights, bases, phy2log: np.ndarray, rank: int, experts: int) -> int:
    """Slots (per matrix) whose bits are not those of their expert under ``phy2log``."""
    per_rank = phy2log.shape[1] // RANKS
    bad = 0
    for layer, tensors in enumerate(weights):
        for local in range(per_rank):
            expert = int(phy2log[layer, rank * per_rank + local])
            for matrix, tensor in enumerate(tensors):
                want = bases[matrix] + _key(layer, expert, matrix, experts)
                bad += not torch.equal(tensor[local].view(torch.int16), want)
    return bad


# ------------------------------------------------------------------ naive baseline


def naive_rearrange(old: torch.Tensor, new: torch.Tensor, weights, rank: int) -> None:
    """One message per expert, matrix and slot; maps read to the host layer by layer.

    The sender of an expert a rank lacks is the lowest rank holding it. Slots
    filled locally or by messages go through a buffer as large as the layer.
    """
    for layer, tensors in enumerate(weights):
        old_row, new_row = old[layer].tolist(), new[layer].tolist()  # 2 copies per layer
        per_rank = len(old_row) // RANKS
        base = rank * per_rank
        held = [set(old_row[r * per_rank : (r + 1) * per_rank]) for r in range(RANKS)]
        holder = {}
        for slot in reversed(range(len(old_row))):
            holder[old_row[slot]] = slot
        buffers = [torch.empty_like(t) for t in tensors]
        ops, filled = [], []
        for slot in range(base, base + per_rank):
            expert = new_row[slot]
            if old_row[slot] == expert:
                continue
            filled.append(slot - base)
            if expert in held[rank]:
                source = old_row.index(expert, base, base + per_rank) - base
                for buffer, tensor in zip(buffers, tensors, strict=True):
                    buffer[slot - base].copy_(tensor[source])
            else:
                for buffer in buffers:
                    ops.append(
                        dist.P2POp(dist.irecv, buffer[slot - base], holder[expert] // per_rank)
                    )
        for peer in range(RANKS):
            if peer == rank:
                continue
            for slot in range(peer * per_rank, (peer + 1) * per_rank):
                expert = new_row[slot]
                if old_row[slot] == expert or expert in held[peer]:
                    continue
                if holder[expert] // per_rank == rank:
                    for tensor in tensors:
                        ops.append(dist.P2POp(dist.isend, tensor[holder[expert] - base], peer))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for local in filled:
            for buffer, tensor in zip(buffers, tensors, strict=True):
                tensor[local].copy_(buffer[local])


# ------------------------------------------------------------------ measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's ``seconds``."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds from a common start to the end of the slowest rank's last copy."""
    return _timed_own(run, device)[0]


def _timed_own(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``_timed``, and this rank's own seconds."""
    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    own = time.perf_counter() - start
    return _slowest(own, device), own


def _peer_copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes/s of a copy from this rank's GPU to the next one (host memcpy on CPU)."""
    if device.type != "cuda":
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        return nbytes * repeats / (time.perf_counter() - start)
    peer = torch.device("cuda", (device.index + 1) % torch.cuda.device_count())
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=peer)
    dst.copy_(src)  # enables peer access, warms up
    torch.cuda.synchronize(device)
    torch.cuda.synchronize(peer)
    # A cross-device copy_ runs on the source device's current stream.
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = begin.elapsed_time(end) / 1e3
    del src, dst
    with torch.cuda.device(peer):
        torch.cuda.empty_cache()
    return nbytes * repeats / seconds


def _p2p_bandwidth(nbytes: int, device: torch.device, rank: int, both: bool, repeats: int):
    """Bytes/s per direction of send/recv between ranks 0 and 1 (one way, or both at once)."""
    out = torch.ones(nbytes, dtype=torch.uint8, device=device)
    into = torch.empty(nbytes, dtype=torch.uint8, device=device)
    peer = 1 - rank

    def exchange() -> None:
        for _ in range(repeats):
            ops = []
            if both or rank == 0:
                ops.append(dist.P2POp(dist.isend, out, peer))
            if both or rank == 1:
                ops.append(dist.P2POp(dist.irecv, into, peer))
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    exchange()  # warm-up
    return nbytes * repeats / _timed(exchange, device)


# ---------------------------------------------------------------------- worker


def _worker(rank: int, args: argparse.Namespace, store: str, cases: list[Case]) -> None:
    if args.backend == "nccl":
        if args.high_priority_nccl:  # read by ProcessGroupNCCL when it makes its streams
            os.environ["TORCH_NCCL_HIGH_PRIORITY"] = "1"
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        if args.pin_cpus and (mine := _own_cpus(rank)):  # before NCCL starts its threads
            os.sched_setaffinity(0, mine)
        dist.init_process_group(
            "nccl", init_method=f"file://{store}", rank=rank, world_size=RANKS, device_id=device
        )
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    say = print if rank == 0 else (lambda *a, **k: None)
    bw_bytes = args.bw_mib << 20

    warm = _slowest(warmup_rearrangement(device=device), device)
    if rank == 0:
        print(f"warmup_rearrangement (P2P channels): {warm * 1e3:.1f} ms", flush=True)
    # Link figures first, while the GPUs are empty.
    peer = _peer_copy_bandwidth(bw_bytes, device, args.bw_repeats) if rank == 0 else 0.0
    dist.barrier()
    peer = _slowest(peer, device)  # rank 0's figure, shared
    one_way = _p2p_bandwidth(bw_bytes, device, rank, False, args.bw_repeats)
    both_ways = _p2p_bandwidth(bw_bytes, device, rank, True, args.bw_repeats)
    buffers = RearrangeBuffers(None, device) if args.kept_buffers else None
    priority = os.environ.get("TORCH_NCCL_HIGH_PRIORITY", "0") not in ("", "0")
    say(
        f"backend {args.backend}, {RANKS} ranks, device {_device_name(device)}"
        + (", NCCL streams at high priority" if priority and args.backend == "nccl" else "")
        + (f", kept buffers (registered: {buffers.registered})" if buffers is not None else "")
        + (", moves prepared ahead (prepare_rearrangement, not timed)" if args.plan_ahead else "")
    )
    cpus: list[str | None] = [None] * RANKS
    dist.all_gather_object(cpus, _cpu_list(os.sched_getaffinity(0)))
    say(
        f"host CPUs per rank: {cpus} of {os.cpu_count()}"
        + (" (pinned: each rank its share of its GPU's NUMA node)" if args.pin_cpus else "")
    )
    say(f"placements: {PLACEMENT_SOURCE}, {args.first} <-> {args.second}")
    say(
        f"link, {args.bw_mib} MiB: peer copy GPU0->GPU1 {peer / GB:.0f} GB/s; send/recv one way "
        f"{one_way / GB:.0f} GB/s, both ways at once {both_ways / GB:.0f} GB/s per direction"
    )
    say("bound = bytes of the busiest direction (rank a -> rank b) / one-way peer copy bandwidth")
    say("x nccl = time / (busiest-direction bytes / NCCL per-direction rate, both ways at once)")
    say("time = slowest rank, from the call to its last copy done; GB/s = busiest direction / time")
    say()
    header = (
        f"{'shape':<17} {'move':<6} {'method':<7} {'GB busiest':>10} {'GB total':>9} "
        f"{'ms median':>10} {'ms best':>8} {'GB/s':>6} {'bound ms':>9} {'x bound':>8} "
        f"{'x nccl':>7} {'msgs/rank':>9} {'peak GB':>8}"
    )
    say(header)
    say("-" * len(header))
    for case in cases:
        _run_case(case, args, rank, device, (peer, both_ways), say, buffers)
        dist.barrier()
    if buffers is not None:
        buffers.close()
    dist.destroy_process_group()


def _own_cpus(rank: int) -> set[int]:
    """This rank's share of its GPU's NUMA-node CPUs: the node's CPUs split evenly
    between the ranks whose GPUs share it, so that no two ranks' hosts compete."""
    local = [_gpu_local_cpus(torch.device("cuda", r)) for r in range(RANKS)]
    sharing = [r for r in range(RANKS) if local[r] == local[rank]]
    cpus = sorted(local[rank])
    share = len(cpus) // len(sharing)
    index = sharing.index(rank)
    return set(cpus[index * share : (index + 1) * share])


def _gpu_local_cpus(device: torch.device) -> set[int]:
    """The CPUs of the GPU's NUMA node (Linux sysfs); empty where unknown."""
    props = torch.cuda.get_device_properties(device)
    address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    try:
        text = (Path("/sys/bus/pci/devices") / address / "local_cpulist").read_text().strip()
    except OSError:
        return set()
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus & os.sched_getaffinity(0)


def _cpu_list(cpus: set[int]) -> str:
    """``0-15,32-47`` for a set of CPU ids."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _run_case(
    case: Case,
    args,
    rank: int,
    device: torch.device,
    link: tuple,
    say,
    buffers: RearrangeBuffers | None,
) -> None:
    """Time and check both methods on one shape; link: (peer copy, NCCL both-ways) bytes/s."""
    shape = case.shape
    per_rank = shape.slots // RANKS
    weights = [
        [torch.empty(per_rank, *m, dtype=torch.bfloat16, device=device) for m in shape.matrices()]
        for _ in shape.layers
    ]
    bases = _bases(shape, device)
    _fill(weights, bases, case.first, rank, shape.experts)
    maps = [torch.from_numpy(p).to(device) for p in (case.first, case.second)]
    our_messages: dict[int, int] = {}
    our_last: dict[int, float] = {}  # when the call returned (no sync)
    our_host: dict[int, list[float]] = {0: [], 1: []}
    our_own: dict[int, list[float]] = {0: [], 1: []}  # this rank's own time
    # Planned ahead, as ExpertBalancer's worker thread does, outside the times.
    prepared = [
        prepare_rearrangement(
            maps[src], maps[1 - src], weights, max_batch_bytes=args.max_batch_bytes
        )
        if args.plan_ahead
        else None
        for src in (0, 1)
    ]

    def ours(src: int) -> None:
        stats = rearrange_expert_weights(
            maps[src],
            maps[1 - src],
            weights,
            max_batch_bytes=args.max_batch_bytes,
            buffers=buffers,
            prepared=prepared[src],
        )
        our_messages[src] = stats.messages_sent
        our_last[src] = stats.seconds

    def naive(src: int) -> None:
        naive_rearrange(maps[src], maps[1 - src], weights, rank)

    methods = {"ours": ours} if args.skip_naive else {"ours": ours, "naive": naive}
    for name, method in methods.items():
        times: dict[int, list[float]] = {0: [], 1: []}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for repeat in range(args.repeats + 1):  # the first round trip warms up
            for src in (0, 1):
                seconds, own = _timed_own(lambda src=src, method=method: method(src), device)
                bad = _mismatches(
                    weights, bases, (case.second, case.first)[src], rank, shape.experts
                )
                bad_all = torch.tensor([bad], device=device)
                dist.all_reduce(bad_all)
                if bad_all.item():
                    raise SystemExit(f"{shape.name} {name}: {bad_all.item()} slots hold wrong bits")
                if repeat:
                    times[src].append(seconds)
                    if name == "ours":
                        our_host[src].append(our_last[src])
                        our_own[src].append(own)
        peak = (
            f"{torch.cuda.max_memory_allocated(device) / GB:.1f}" if device.type == "cuda" else "-"
        )
        for src in (0, 1):
            old, new = (case.first, case.second)[src], (case.second, case.first)[src]
            busiest, total, naive_messages = _bytes(old, new, shape)
            median, best = statistics.median(times[src]), min(times[src])
            bound = busiest / link[0]
            messages = our_messages[src] if name == "ours" else naive_messages[rank]
            say(
                f"{shape.name:<17} {('A->B', 'B->A')[src]:<6} {name:<7} {busiest / GB:>10.2f} "
                f"{total / GB:>9.2f} {median * 1e3:>10.1f} {best * 1e3:>8.1f} "
                f"{busiest / median / GB:>6.1f} {bound * 1e3:>9.1f} {median / bound:>8.2f} "
                f"{median / (busiest / link[1]):>7.2f} {messages:>9} {peak:>8}"
            )
    # One more move per direction with CUDA events per phase (not in the times above).
    for src in (0, 1):
        stats = rearrange_expert_weights(
            maps[src],
            maps[1 - src],
            weights,
            max_batch_bytes=args.max_batch_bytes,
            profile=True,
            buffers=buffers,
            prepared=prepared[src],
        )
        phases = ", ".join(f"{k} {v:.1f}" for k, v in stats.phase_ms.items())
        returned = statistics.median(our_host[src]) * 1e3
        own = statistics.median(our_own[src]) * 1e3
        ahead = prepared[src]
        line = (
            f"  phases ms, {('A->B', 'B->A')[src]}, rank {rank}, {stats.batches} steps: {phases}, "
            f"host (call returned) {stats.seconds * 1e3:.1f}; unprofiled moves (medians): "
            f"returned after {returned:.1f}, done after {own:.1f}"
            + (f"; prepared ahead in {ahead.seconds * 1e3:.1f} (not timed)" if ahead else "")
        )
        lines: list[str | None] = [None] * RANKS
        dist.all_gather_object(lines, line)
        for each in lines:
            say(each)
    weights.clear()  # free the GPU for the next shape
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bytes(old: np.ndarray, new: np.ndarray, shape: Shape) -> tuple[int, int, list[int]]:
    """Busiest-direction and total bytes that must move; naive messages sent per rank."""
    plan = plan_rearrangement(old, new, RANKS)
    pairs = np.zeros((RANKS, RANKS), dtype=np.int64)
    np.add.at(pairs, (plan.transfers[:, 2], plan.transfers[:, 4]), 1)
    per_rank = shape.slots // RANKS
    changed_remote = (old != new) & np.array(
        [
            [
                new[layer, s]
                not in old[layer, (s // per_rank) * per_rank : (s // per_rank + 1) * per_rank]
                for s in range(shape.slots)
            ]
            for layer in range(old.shape[0])
        ]
    )
    # Each such slot is one message per matrix, from the lowest rank holding its expert.
    senders = [0] * RANKS
    for layer, slot in zip(*np.nonzero(changed_remote), strict=True):
        senders[int(np.nonzero(old[layer] == new[layer, slot])[0][0]) // per_rank] += 3
    return int(pairs.max()) * shape.expert_bytes, int(pairs.sum()) * shape.expert_bytes, senders


def _plan_report(cases: list[Case], max_batch_bytes: int) -> None:
    """What each move's steps look like, per rank: computed on the host, no GPU needed.

    "one-way steps": steps in which some (sender, receiver) pair of ranks that
    has transfers in the layer sends nothing while the reverse direction sends:
    such a step leaves half of that link idle. "deferred": the most steps a
    received expert waits in its buffer before its slot may be written (its old
    content still to be sent or copied). "buffers GB": the rings a call allocates.
    """
    # Internals on purpose: this reports how the executor will cut the work.
    from eplb.production.rearrange_schedule import (
        Layout,
        buffer_bytes,
        last_use,
        program,
        split_steps,
    )

    print(
        f"{'shape':<17} {'move':<6} {'rank':>4} {'steps':>6} {'one-way steps':>13} "
        f"{'deferred':>8} {'buffers GB':>10} {'program ms':>10} {'local copies':>12}"
    )
    for case in cases:
        shape = case.shape
        layout = Layout(tuple(a * b * 2 for a, b in shape.matrices()), "bf16")
        for src in (0, 1):
            old, new = (case.first, case.second)[src], (case.second, case.first)[src]
            plan = plan_rearrangement(old, new, RANKS)
            order, step = split_steps(plan, shape.expert_bytes, max_batch_bytes)
            t = plan.transfers[order]
            one_way = 0
            for s in np.unique(step):
                at = t[step == s]
                directions = {(int(a), int(b)) for a, b in at[:, [2, 4]]}
                layer_pairs = {
                    (int(a), int(b))
                    for a, b in plan.transfers[np.isin(plan.transfers[:, 0], at[:, 0])][:, [2, 4]]
                }
                one_way += any(
                    (b, a) in layer_pairs and (b, a) not in directions for a, b in directions
                )
            for rank in range(RANKS):
                start = time.perf_counter()
                steps = program(plan, layout, rank, max_batch_bytes)
                ms = (time.perf_counter() - start) * 1e3
                last = last_use(steps)
                deferred = max(u - k for k, u in enumerate(last))
                print(
                    f"{shape.name:<17} {('A->B', 'B->A')[src]:<6} {rank:>4} {len(steps):>6} "
                    f"{one_way:>13} {deferred:>8} {buffer_bytes(steps) / GB:>10.2f} {ms:>10.1f} "
                    f"{int((plan.local_copies[:, 2] // (shape.slots // RANKS) == rank).sum()):>12}"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    two_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= RANKS
    parser.add_argument(
        "--backend", choices=["nccl", "gloo"], default="nccl" if two_gpus else "gloo"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of the real load JSON files (default: eplb.loads.find_data_dir())",
    )
    parser.add_argument("--first", default="prefill_in1024", help="workload of placement A")
    parser.add_argument("--second", default="decode_in1000out1000", help="workload of placement B")
    parser.add_argument("--shapes", default="v2-lite,v3", help="comma-separated: v2-lite, v3")
    parser.add_argument(
        "--v3-layers",
        type=int,
        default=6,
        help="DeepSeek-V3 layers moved (12.7 GB per layer per rank)",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="divide hidden and intermediate sizes by this (CPU debugging)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed round trips per method")
    parser.add_argument("--max-batch-bytes", type=int, default=DEFAULT_MAX_BATCH_BYTES)
    parser.add_argument("--bw-mib", type=int, default=1024, help="bytes of the link measurements")
    parser.add_argument("--bw-repeats", type=int, default=10)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--keep-slots",
        action="store_true",
        help="placement B reordered within each GPU so that experts keep their slots "
        "(keep_experts_in_place): far fewer local copies",
    )
    parser.add_argument(
        "--kept-buffers",
        action="store_true",
        help="one RearrangeBuffers for all moves (with NCCL: registered with the communicator)",
    )
    parser.add_argument(
        "--high-priority-nccl",
        action="store_true",
        help="NCCL's streams at high priority (TORCH_NCCL_HIGH_PRIORITY=1), ahead of copy kernels",
    )
    parser.add_argument(
        "--plan-ahead",
        action="store_true",
        help="each move prepared ahead (prepare_rearrangement, as ExpertBalancer's worker "
        "thread does), outside the times",
    )
    parser.add_argument(
        "--pin-cpus",
        action="store_true",
        help="pin each rank's process to its share of its GPU's NUMA-node CPUs (as serving does)",
    )
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="print how each move is cut into steps (host only, no GPU) and exit",
    )
    args = parser.parse_args(argv)
    if args.backend == "nccl" and not two_gpus and not args.plan_only:
        parser.error("--backend nccl needs 2 CUDA devices; use --backend gloo --scale 16")
    data_dir = args.data_dir or find_data_dir()
    if data_dir is None:
        parser.error("real loads not found: pass --data-dir")
    loads = {w: _load(data_dir, w) for w in (args.first, args.second)}
    cases = []
    for shape in _shapes(args):
        assert len(shape.layers) * shape.experts * 3 < 2**15, "keys must fit int16"
        first, second = (_placement(loads[w], shape) for w in (args.first, args.second))
        if args.keep_slots:
            second = keep_experts_in_place(first, second, RANKS)
        cases.append(Case(shape, first, second))
        gb = len(shape.layers) * (shape.slots // RANKS) * shape.expert_bytes / GB
        print(
            f"{shape.name}: {len(shape.layers)} layers, {shape.expert_bytes / 1e6:.1f} MB per "
            f"expert, {gb:.1f} GB of weights per rank",
            file=sys.stderr,
        )
    if args.plan_only:
        _plan_report(cases, args.max_batch_bytes)
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, str(Path(tmp) / "store"), cases), nprocs=RANKS, join=True)


if __name__ == "__main__":
    main()
