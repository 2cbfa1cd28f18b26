"""Rebalance speed: eplb.production against the two baselines it replaces.

Median milliseconds on ONE CPU thread, for each benchmark configuration, with a
synthetic skewed load and with the real DeepSeek-R1 loads (``../shared/data``,
or ``--data-dir``):

- ``eplb``: ``eplb.production.rebalance_experts`` (CPU tensors in and out);
- ``numpy loop``: the seed pull request's approach, a Python loop over layers
  (and rows) whose packing uses numpy arrays, written out below;
- ``torch port``: a straight port of DeepSeek's original ``eplb.py`` loops with
  torch ops (packing loops over rows and items; replication vectorized over
  rows; float32 load), written out below.

Every baseline placement is checked against SPEC.md's invariants; the table
also says whether it equals ours bit for bit (they differ on ties: unstable
sorts, float32).

    python benchmarks/bench_rebalance.py            # full table (a few minutes)
    python benchmarks/bench_rebalance.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os

# One thread everywhere, set before numpy/torch load their BLAS pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.conformance.invariants import check_invariants  # noqa: E402
from eplb.conformance.workloads import derive_load  # noqa: E402
from eplb.loads import read_load, real_loads, synthetic_load  # noqa: E402
from eplb.production import rebalance_experts  # noqa: E402

# name -> (layers, experts, R, G, N, P)
CONFIGS = {
    "DeepSeek-V2-Lite R=64": (26, 64, 64, 1, 1, 8),
    "DeepSeek-V2-Lite R=72": (26, 64, 72, 1, 1, 8),
    "DeepSeek-V3 R=288": (58, 256, 288, 8, 4, 32),
    "DeepSeek-V3 R=320": (58, 256, 320, 8, 8, 64),
    "Qwen3-235B R=144": (94, 128, 144, 1, 1, 16),
    "Kimi-K2 R=448": (60, 384, 448, 1, 8, 64),
}
Maps = tuple[np.ndarray, np.ndarray, np.ndarray]


# --- baseline 1: per-layer numpy loop (the seed PR's approach) -------------------


def _np_pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of one row at a time with numpy arrays (the seed PR's style)."""
    rows, items = weight.shape
    per_pack = items // num_packs
    pack = np.full((rows, items), -1, dtype=np.int64)
    rank = np.full((rows, items), -1, dtype=np.int64)
    if per_pack == 1:
        pack[:] = np.arange(items)
        rank[:] = 0
        return pack, rank
    for row in range(rows):
        totals = np.zeros(num_packs)
        counts = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[row]):
            free = np.flatnonzero(counts < per_pack)
            best = free[np.argmin(totals[free])]
            pack[row, item] = best
            rank[row, item] = counts[best]
            totals[best] += weight[row, item]
            counts[best] += 1
    return pack, rank


def _np_replicate(weight: np.ndarray, num_phy: int) -> Maps:
    rows, n = weight.shape
    phy2log = np.tile(np.arange(num_phy), (rows, 1))
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, n), dtype=np.int64)
    arange = np.arange(rows)
    for slot in range(n, num_phy):
        best = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[arange, best]
        logcnt[arange, best] += 1
    return phy2log, rank, logcnt


def _hierarchy(pack: Callable, replicate: Callable, xp_weight: np.ndarray, R, G, N, P) -> Maps:
    """The hierarchy of SPEC.md on numpy arrays, given packing/replication functions."""
    L, E = xp_weight.shape
    gs, epn, rpn, rpg = E // G, E // N, R // N, R // P
    group_pack, group_rank = pack(xp_weight.reshape(L, G, gs).sum(-1), N)
    log2mlog = ((group_pack * (G // N) + group_rank) * gs)[:, :, None] + np.arange(gs)
    log2mlog = log2mlog.reshape(L, E)
    mlog2log = np.argsort(log2mlog, axis=-1)
    tokens = np.take_along_axis(xp_weight, mlog2log, -1).reshape(L * N, epn)
    phy2mlog, phyrank, mlogcnt = replicate(tokens, rpn)
    slot_load = np.take_along_axis(tokens / mlogcnt, phy2mlog, -1)
    gpu_pack, gpu_rank = pack(slot_load, P // N)
    phy2pphy = gpu_pack * rpg + gpu_rank
    pphy2phy = np.argsort(phy2pphy, axis=-1)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = (pphy2mlog.reshape(L, N, rpn) + (np.arange(N) * epn)[None, :, None]).reshape(L, R)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(L, R)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, -1)
    return phy2log, pphyrank, logcnt


def _to_maps(phy2log: np.ndarray, rank: np.ndarray, logcnt: np.ndarray) -> Maps:
    L, R = phy2log.shape
    K = int(logcnt.max())
    log2phy = np.full((L, logcnt.shape[1], K), -1, dtype=np.int64)
    rows = np.repeat(np.arange(L), R)
    log2phy[rows, phy2log.ravel(), rank.ravel()] = np.tile(np.arange(R), L)
    return phy2log, log2phy, logcnt


def numpy_per_layer(weight: np.ndarray, R: int, G: int, N: int, P: int) -> Maps:
    """Baseline 1: one layer at a time, numpy packing."""
    if G % N:
        G, N = 1, 1
    parts = [
        _hierarchy(_np_pack, _np_replicate, weight[l : l + 1], R, G, N, P)
        for l in range(weight.shape[0])
    ]
    return _to_maps(*(np.concatenate(p) for p in zip(*parts, strict=True)))


# --- baseline 2: straight torch port of the original loops -----------------------


def _torch_pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        pack = torch.arange(items).expand(rows, items).clone()
        return pack, torch.zeros_like(pack)
    order = weight.float().sort(-1, descending=True).indices
    pack = torch.full_like(weight, -1, dtype=torch.int64)
    rank = torch.full_like(pack, -1)
    for row in range(rows):
        totals = [0.0] * num_packs
        counts = [0] * num_packs
        for item in order[row]:
            best = min(
                (p for p in range(num_packs) if counts[p] < per_pack), key=totals.__getitem__
            )
            pack[row, item] = best
            rank[row, item] = counts[best]
            totals[best] += weight[row, item].item()
            counts[best] += 1
    return pack, rank


def _torch_replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, ...]:
    rows, n = weight.shape
    phy2log = torch.arange(num_phy).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, n, dtype=torch.int64)
    arange = torch.arange(rows)
    for slot in range(n, num_phy):
        best = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[arange, best]
        logcnt[arange, best] += 1
    return phy2log, rank, logcnt


def torch_port(weight: np.ndarray, R: int, G: int, N: int, P: int) -> Maps:
    """Baseline 2: DeepSeek's loops with torch ops, float32 load, per-row packing."""
    if G % N:
        G, N = 1, 1
    w = torch.from_numpy(weight).float()
    L, E = w.shape
    gs, epn, rpn, rpg = E // G, E // N, R // N, R // P
    group_pack, group_rank = _torch_pack(w.unflatten(-1, (G, gs)).sum(-1), N)
    log2mlog = (
        ((group_pack * (G // N) + group_rank) * gs).unsqueeze(-1) + torch.arange(gs)
    ).flatten(-2)
    mlog2log = torch.argsort(log2mlog, dim=-1)
    tokens = w.gather(-1, mlog2log).view(-1, epn)
    phy2mlog, phyrank, mlogcnt = _torch_replicate(tokens, rpn)
    slot_load = (tokens / mlogcnt).gather(-1, phy2mlog)
    gpu_pack, gpu_rank = _torch_pack(slot_load, P // N)
    pphy2phy = torch.argsort(gpu_pack * rpg + gpu_rank, dim=-1)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(L, N, -1) + torch.arange(0, E, epn).view(1, -1, 1)).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(L, -1)
    logcnt = mlogcnt.view(L, -1).gather(-1, log2mlog)
    return _to_maps(phy2log.numpy(), pphyrank.numpy(), logcnt.numpy())


# --- the benchmark ---------------------------------------------------------------


def ours(weight: np.ndarray, R: int, G: int, N: int, P: int) -> Maps:
    maps = rebalance_experts(torch.from_numpy(weight), R, G, N, P)
    return tuple(m.numpy() for m in maps)  # type: ignore[return-value]


def _median_ms(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    fn()  # warm caches and allocator
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


def main() -> int:
    parser = argparse.ArgumentParser(description="eplb rebalance speed vs baselines")
    parser.add_argument("--quick", action="store_true", help="one small config, few repeats")
    parser.add_argument("--data-dir", help="folder of the real load JSON files")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of eplb")
    parser.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)

    names = list(CONFIGS)
    if args.configs:
        names = [n.strip() for n in args.configs.split(",")]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            parser.error(f"unknown configs {unknown}")
    if args.quick:
        names = names[:2] if not args.configs else names
    if args.data_dir:
        real = {p.stem: read_load(p)[3:] for p in sorted(Path(args.data_dir).glob("*.json"))}
    else:
        real = real_loads()
    real_name = "decode_in1000out1000" if "decode_in1000out1000" in real else next(iter(real), None)
    repeats = 5 if args.quick else args.repeats
    slow_repeats = 1 if args.quick else 3

    print(f"machine: {_cpu_name()}, 1 thread; torch {torch.__version__}, numpy {np.__version__}")
    header = (
        f"{'config':24} {'load':10} {'eplb ms':>9} {'numpy loop ms':>14} {'x':>6} "
        f"{'torch port ms':>14} {'x':>7}  same as eplb (numpy/torch)"
    )
    print(header)
    print("-" * len(header))
    status = 0
    for name in names:
        layers, experts, R, G, N, P = CONFIGS[name]
        counts = (R, G, N, P)
        loads = {"synthetic": synthetic_load(layers, experts, seed=1, skew=0.4, tokens=1 << 18)}
        if real_name is not None and not args.quick:
            loads["real"] = derive_load(real[real_name], experts, layers)
        for load_name, weight in loads.items():
            mine = ours(weight, R, G, N, P)
            t_ours = _median_ms(lambda w=weight, c=counts: ours(w, *c), repeats, 10.0)
            row = [t_ours]
            same = []
            for baseline in (numpy_per_layer, torch_port):
                maps = baseline(weight, R, G, N, P)
                try:
                    check_invariants(*maps, R, G, N, P)
                except AssertionError as exc:
                    print(f"{baseline.__name__} broke an invariant on {name}: {exc}")
                    status = 1
                same.append(all(np.array_equal(a, b) for a, b in zip(mine, maps, strict=True)))
                row.append(
                    _median_ms(lambda f=baseline, w=weight, c=counts: f(w, *c), slow_repeats, 60.0)
                )
            print(
                f"{name:24} {load_name:10} {row[0]:9.3f} {row[1]:14.1f} {row[1] / row[0]:6.0f} "
                f"{row[2]:14.1f} {row[2] / row[0]:7.0f}  {same[0]!s:>5} / {same[1]!s}"
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
