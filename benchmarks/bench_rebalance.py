"""Rebalance speed: eplb.production against the two baselines it replaces.

Median milliseconds on ONE CPU thread, per benchmark configuration, on a
synthetic skewed load and, for the 256-expert (DeepSeek-V3) shapes, on every
real DeepSeek-R1 load (``../shared/data``, or ``--data-dir``):

- ``compiled``: ``eplb.production.rebalance_experts(..., core="compiled")``, CPU
  tensor in and out, validation and log2phy included: the compiled core (numba);
- ``numpy core``: the same call with ``core="numpy"``, the vectorized numpy core
  (the fallback where numba cannot load);
- ``numpy loop``: the seed pull request's approach (vLLM #28369): DeepSeek's
  hierarchy in torch ops, with the packing moved to numpy arrays and a Python
  loop over layers and items;
- ``torch port``: a straight port of the loops of DeepSeek's original
  ``eplb.py``: the same hierarchy, packing with torch tensors (per-pack totals
  accumulate 0-d tensors, as the original does), float32 loads.

Both baselines are written out below. Their placements must pass SPEC.md's
invariants; they need not equal ours bit for bit (unstable sorts and float32
break ties differently), and the table says in how many layers they do. The
two cores must agree exactly: a difference is reported and fails the run.
The ``x`` columns are each baseline's time over the compiled core's.

    python benchmarks/bench_rebalance.py            # the full table (minutes)
    python benchmarks/bench_rebalance.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os

# One thread everywhere, set before numpy and torch start their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.conformance.invariants import check_invariants  # noqa: E402
from eplb.conformance.workloads import BENCHMARK_SHAPES  # noqa: E402
from eplb.loads import read_load, real_loads, synthetic_load  # noqa: E402
from eplb.production import compiled_core_error, rebalance_experts  # noqa: E402

#: name -> (experts, layers, R, G, N, P), shared with the conformance suite.
CONFIGS = BENCHMARK_SHAPES
#: DESIGN.md's next targets for the compiled core: (ms on one thread, x numpy loop).
TARGETS = {
    "DeepSeek-V3 R=288": (0.8, 35.0),
    "DeepSeek-V2-Lite R=64": (0.15, None),
    "DeepSeek-V2-Lite R=72": (0.15, None),
    "Kimi-K2 R=448": (3.0, None),
}
Maps = tuple[np.ndarray, np.ndarray, np.ndarray]
Packing = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


# --- the two packings the baselines differ by -------------------------------------


def _pack_torch(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's balanced packing: rows and items in Python, torch tensors throughout."""
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        pack = torch.arange(items, dtype=torch.int64).expand(rows, items).clone()
        return pack, torch.zeros_like(pack)
    order = weight.float().sort(-1, descending=True).indices
    pack = torch.full((rows, items), -1, dtype=torch.int64)
    rank = torch.full_like(pack, -1)
    for row in range(rows):
        totals: list = [0] * num_packs  # become 0-d tensors, as in the original
        counts = [0] * num_packs
        for item in order[row]:
            best = min(
                (p for p in range(num_packs) if counts[p] < per_pack), key=totals.__getitem__
            )
            pack[row, item] = best
            rank[row, item] = counts[best]
            totals[best] += weight[row, item]
            counts[best] += 1
    return pack, rank


def _pack_numpy(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed PR's packing: the same loops over numpy arrays and Python lists."""
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        pack = torch.arange(items, dtype=torch.int64).expand(rows, items).clone()
        return pack, torch.zeros_like(pack)
    loads = weight.numpy()
    order = np.argsort(-loads, axis=-1)
    pack_np = np.full((rows, items), -1, dtype=np.int64)
    rank_np = np.full((rows, items), -1, dtype=np.int64)
    for row in range(rows):
        totals = [0.0] * num_packs
        counts = [0] * num_packs
        for item in order[row]:
            best = min(
                (p for p in range(num_packs) if counts[p] < per_pack), key=totals.__getitem__
            )
            pack_np[row, item] = best
            rank_np[row, item] = counts[best]
            totals[best] += loads[row, item]
            counts[best] += 1
    return torch.from_numpy(pack_np), torch.from_numpy(rank_np)


# --- the hierarchy both baselines share (DeepSeek's, in torch ops) ----------------


def _replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, ...]:
    rows, num_log = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64)
    every_row = torch.arange(rows)
    for slot in range(num_log, num_phy):
        best = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[every_row, best]
        logcnt[every_row, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inverse


def _baseline(pack: Packing, weight: np.ndarray, R: int, G: int, N: int, P: int) -> Maps:
    """DeepSeek's rebalance (float32 loads) with the given packing function."""
    if G % N:
        G, N = 1, 1
    w = torch.from_numpy(weight).float()
    L, E = w.shape
    gs, epn, rpn, rpg = E // G, E // N, R // N, R // P
    group_pack, group_rank = pack(w.unflatten(-1, (G, gs)).sum(-1), N)
    log2mlog = (
        ((group_pack * (G // N) + group_rank) * gs).unsqueeze(-1) + torch.arange(gs)
    ).flatten(-2)
    mlog2log = _inverse(log2mlog)
    tokens = w.gather(-1, mlog2log).view(-1, epn)
    phy2mlog, phyrank, mlogcnt = _replicate(tokens, rpn)
    slot_load = (tokens / mlogcnt).gather(-1, phy2mlog)
    gpu_pack, gpu_rank = pack(slot_load, P // N)
    pphy2phy = _inverse(gpu_pack * rpg + gpu_rank)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(L, N, -1) + torch.arange(0, E, epn).view(1, -1, 1)).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    phyrank = phyrank.gather(-1, pphy2phy).view(L, -1)
    logcnt = mlogcnt.view(L, -1).gather(-1, log2mlog)
    K = int(logcnt.max())
    log2phy = torch.full((L, E, K), -1, dtype=torch.int64)
    log2phy.view(L, -1).scatter_(-1, phy2log * K + phyrank, torch.arange(R).expand(L, -1))
    return phy2log.numpy(), log2phy.numpy(), logcnt.numpy()


def numpy_per_layer(weight: np.ndarray, R: int, G: int, N: int, P: int) -> Maps:
    """Baseline 1, the seed PR: numpy packing, a Python loop over layers and items."""
    return _baseline(_pack_numpy, weight, R, G, N, P)


def torch_port(weight: np.ndarray, R: int, G: int, N: int, P: int) -> Maps:
    """Baseline 2: DeepSeek's original loops, torch ops, float32."""
    return _baseline(_pack_torch, weight, R, G, N, P)


def ours(weight: np.ndarray, R: int, G: int, N: int, P: int, core: str = "auto") -> Maps:
    """eplb.production on a CPU tensor with the given core, results back as numpy."""
    maps = rebalance_experts(torch.from_numpy(weight), R, G, N, P, core=core)
    return tuple(m.numpy() for m in maps)  # type: ignore[return-value]


# --- the benchmark ---------------------------------------------------------------


def _median_ms(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    fn()  # warm caches and the allocator
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _layers_equal(a: Maps, b: Maps) -> int:
    """Layers in which two placements are identical (phy2log and logcnt)."""
    return int(((a[0] == b[0]).all(-1) & (a[2] == b[2]).all(-1)).sum())


def _measure(
    name: str, load_name: str, weights: list[np.ndarray], args: argparse.Namespace
) -> tuple[list[float], list[int], int]:
    """Times (compiled, numpy core, numpy loop, torch port), layers agreeing, failures."""
    _, _, R, G, N, P = CONFIGS[name]
    counts = (R, G, N, P)
    times: list[list[float]] = [[], [], [], []]
    agree = [0, 0]
    failures = 0
    for weight in weights:
        mine = ours(weight, *counts, core=args.core)
        numpy_core = ours(weight, *counts, "numpy")
        if not all(np.array_equal(a, b) for a, b in zip(mine, numpy_core, strict=True)):
            print(f"the two cores differ on {name} {load_name}")
            failures += 1
        for i, core in enumerate((args.core, "numpy")):
            times[i].append(
                _median_ms(lambda w=weight, c=core: ours(w, *counts, c), args.repeats, 10.0)
            )
        for i, baseline in enumerate((numpy_per_layer, torch_port)):
            maps = baseline(weight, *counts)
            try:
                check_invariants(*maps, *counts)
            except AssertionError as exc:
                print(f"{baseline.__name__} broke an invariant on {name} {load_name}: {exc}")
                failures += 1
            agree[i] += _layers_equal(mine, maps)
            times[i + 2].append(
                _median_ms(lambda f=baseline, w=weight: f(w, *counts), args.slow_repeats, 30.0)
            )
    return [statistics.median(t) for t in times], agree, failures


def main() -> int:
    parser = argparse.ArgumentParser(description="eplb rebalance speed vs baselines")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--data-dir", help="folder of the real load JSON files")
    parser.add_argument("--repeats", type=int, default=100, help="timed calls of eplb")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed calls of baselines")
    parser.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.core = "compiled"
    if compiled_core_error() is not None:
        print(f"compiled core unavailable ({compiled_core_error()}): its column is the numpy core")
        args.core = "numpy"

    names = list(CONFIGS)
    if args.configs:
        names = [n.strip() for n in args.configs.split(",")]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if args.quick:
        names = names if args.configs else ["DeepSeek-V2-Lite R=72"]
        args.repeats, args.slow_repeats = 5, 1
    if args.quick:
        real: dict[str, np.ndarray] = {}
    elif args.data_dir:
        real = {p.stem: read_load(p)[3:] for p in sorted(Path(args.data_dir).glob("*.json"))}
    else:
        real = real_loads()

    print(
        f"machine: {_cpu_name()} ({platform.machine()}), 1 thread; torch {torch.__version__}, "
        f"numpy {np.__version__}, python {platform.python_version()}"
    )
    header = (
        f"{'config':23} {'load':12} {'compiled ms':>11} {'numpy core ms':>13} {'x':>5} "
        f"{'numpy loop ms':>13} {'x':>5} {'torch port ms':>13} {'x':>6}  "
        f"{'same layers: numpy / torch':>26}"
    )
    print(header)
    print("-" * len(header))
    status = 0
    results: dict[str, list[float]] = {}
    for name in names:
        experts, layers = CONFIGS[name][:2]
        loads = {"synthetic": [synthetic_load(layers, experts, seed=1, skew=0.4, tokens=1 << 18)]}
        if real and experts == 256:
            loads[f"real ({len(real)})"] = [w[:layers] for w in real.values()]
        for load_name, weights in loads.items():
            times, agree, failures = _measure(name, load_name, weights, args)
            status |= failures > 0
            total = layers * len(weights)
            results.setdefault(name, times)
            print(
                f"{name:23} {load_name:12} {times[0]:11.3f} {times[1]:13.3f} "
                f"{times[1] / times[0]:5.1f} {times[2]:13.1f} {times[2] / times[0]:5.0f} "
                f"{times[3]:13.1f} {times[3] / times[0]:6.0f}  "
                f"{f'{agree[0]}/{total} / {agree[1]}/{total}':>26}"
            )
    print(f"\ntargets ({args.core} core, synthetic load):")
    for name, (ms, x_numpy) in TARGETS.items():
        if name not in results:
            continue
        t = results[name]
        line = f"  {name}: {t[0]:.3f} ms (target < {ms} ms: {'met' if t[0] < ms else 'missed'})"
        if x_numpy is not None:
            x = t[2] / t[0]
            line += (
                f", {x:.0f}x numpy loop (target {x_numpy:.0f}x: "
                f"{'met' if x >= x_numpy else 'missed'})"
            )
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
