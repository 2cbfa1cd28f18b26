"""``eplb rebalance`` and ``eplb demo``: a placement and its quality report.

Heavy modules (torch, matplotlib, rich) are imported inside the run functions so
that ``eplb --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eplb.loads import read_load, synthetic_load
from eplb.metrics import (
    balancedness,
    colocated_replicas,
    contiguous_placement,
    gpu_loads,
    max_load_lower_bound,
)

__all__ = ["add_parser"]

# eplb demo: DeepSeek-V3's shape (58 MoE layers, 256 experts in 8 groups) on 4
# nodes of 8 GPUs with one redundant slot per GPU. Skew 0.4 puts the hottest
# expert at about 5.6x the mean, as in the real DeepSeek-R1 statistics.
_DEMO = {"layers": 58, "experts": 256, "replicas": 288, "groups": 8, "nodes": 4, "gpus": 32}
_DEMO_SKEW, _DEMO_TOKENS = 0.4, 8 * 32768


def add_parser(subparsers: Any, name: str) -> None:
    """Register ``eplb rebalance`` or ``eplb demo`` (by ``name``)."""
    if name == "rebalance":
        parser = subparsers.add_parser(
            name,
            help="place the experts for a load file and report the balance",
            description="Compute the placement of SPEC.md for a load trace and report its "
            "balancedness before (contiguous experts, no replicas) and after.",
        )
        parser.add_argument("load", metavar="LOAD", help=".json, .npy or .pt [layers, experts]")
        parser.add_argument("--replicas", type=int, required=True, metavar="R", help="slots")
        parser.add_argument("--groups", type=int, required=True, metavar="G")
        parser.add_argument("--nodes", type=int, required=True, metavar="N")
        parser.add_argument("--gpus", type=int, required=True, metavar="P")
        parser.add_argument(
            "--layers", metavar="A:B", help="use layers A..B-1 only (Python slice, e.g. 3:)"
        )
        parser.set_defaults(run=_run_rebalance)
    else:
        parser = subparsers.add_parser(
            name,
            help="the rebalance report on a built-in DeepSeek-V3-shaped load",
            description="Rebalance a deterministic synthetic DeepSeek-V3-shaped load "
            "(58 layers x 256 experts, skewed integer token counts) onto 288 slots, "
            "8 groups, 4 nodes, 32 GPUs, and report.",
        )
        parser.set_defaults(run=_run_demo)
    parser.add_argument("--output", metavar="FILE", help="write the maps to FILE (.json or .pt)")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of the balance to FILE")


@dataclass(frozen=True)
class _Problem:
    title: str
    weight: np.ndarray  # [L, E] float64
    replicas: int
    groups: int
    nodes: int
    gpus: int
    first_layer: int


def _run_rebalance(args: argparse.Namespace) -> int:
    weight = read_load(args.load)
    first = 0
    if args.layers:
        weight, first = _slice_layers(weight, args.layers)
    problem = _Problem(
        Path(args.load).name, weight, args.replicas, args.groups, args.nodes, args.gpus, first
    )
    return _report(problem, args.output, args.plot)


def _run_demo(args: argparse.Namespace) -> int:
    weight = synthetic_load(
        _DEMO["layers"], _DEMO["experts"], seed=0, skew=_DEMO_SKEW, tokens=_DEMO_TOKENS
    )
    problem = _Problem(
        "demo (synthetic DeepSeek-V3-shaped load)",
        weight,
        _DEMO["replicas"],
        _DEMO["groups"],
        _DEMO["nodes"],
        _DEMO["gpus"],
        0,
    )
    return _report(problem, args.output, args.plot)


def _slice_layers(weight: np.ndarray, spec: str) -> tuple[np.ndarray, int]:
    """weight[A:B] for ``--layers A:B``, and the index of its first layer."""
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(f"--layers must look like A:B (e.g. 3:61 or 3:), got {spec!r}") from None
    chosen = range(weight.shape[0])[slice(start, stop)]
    if len(chosen) == 0:
        raise ValueError(f"--layers {spec} selects no layer of the {weight.shape[0]} in the file")
    return weight[chosen.start : chosen.stop], chosen.start


def _contiguous_gpu_loads(weight: np.ndarray, num_gpus: int) -> np.ndarray:
    """GPU loads [L, P] before balancing: experts in order, no replicas.

    weight: [L, E] float64, tokens routed to each logical expert.
    """
    num_layers, num_experts = weight.shape
    if num_experts % num_gpus == 0:
        phy2log, logcnt = contiguous_placement(num_layers, num_experts)
        return gpu_loads(weight, phy2log, logcnt, num_gpus)
    # E/P experts per GPU is not whole: expert e on GPU e * P // E.
    gpu_of_expert = np.arange(num_experts) * num_gpus // num_experts
    one_hot = np.zeros((num_experts, num_gpus))
    one_hot[np.arange(num_experts), gpu_of_expert] = 1.0
    return weight @ one_hot


def _check_suffix(option: str, path: str | None, suffixes: tuple[str, ...]) -> None:
    """Refuse an output file name before any work is done."""
    if path is not None and Path(path).suffix.lower() not in suffixes:
        raise ValueError(f"{option} must end in {' or '.join(suffixes)}, got {path!r}")


def _report(problem: _Problem, output: str | None, plot: str | None) -> int:
    _check_suffix("--output", output, (".json", ".pt"))
    _check_suffix("--plot", plot, (".png",))
    import torch
    from rich.console import Console
    from rich.table import Table

    from eplb.production import rebalance_experts

    weight = problem.weight
    counts = (problem.replicas, problem.groups, problem.nodes, problem.gpus)
    tensor = torch.from_numpy(weight)
    start = time.perf_counter()
    maps = rebalance_experts(tensor, *counts)
    first_ms = (time.perf_counter() - start) * 1e3
    # A second call shows the cost in a running server, without one-time warm-up.
    start = time.perf_counter()
    rebalance_experts(tensor, *counts)
    warm_ms = (time.perf_counter() - start) * 1e3
    phy2log, log2phy, logcnt = (m.numpy() for m in maps)

    before = _contiguous_gpu_loads(weight, problem.gpus)
    after = gpu_loads(weight, phy2log, logcnt, problem.gpus)
    bal_before, bal_after = balancedness(before), balancedness(after)
    bound = max_load_lower_bound(weight, problem.replicas, problem.gpus)
    busy = bound > 0  # idle (e.g. dense) layers: balancedness 1.0, no load ratio
    colocated = colocated_replicas(phy2log, problem.gpus)
    worst = int(np.argmin(bal_after))
    global_bal = _global_balancedness(weight, problem, rebalance_experts)

    num_layers, num_experts = weight.shape
    policy = "hierarchical" if problem.groups % problem.nodes == 0 else "global"
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]eplb[/bold] {problem.title}: {num_layers} layers x {num_experts} experts -> "
        f"{problem.replicas} slots, {problem.groups} groups, {problem.nodes} nodes, "
        f"{problem.gpus} GPUs ({policy} policy)"
    )
    idle = num_layers - int(busy.sum())
    if idle:
        console.print(f"{idle} idle layer(s) (no load) left out of the figures below")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    if busy.any():
        table.add_row(
            "balancedness, mean",
            f"{bal_before[busy].mean():.4f}",
            f"{bal_after[busy].mean():.4f}",
        )
        table.add_row(
            f"balancedness, worst layer after ({worst + problem.first_layer})",
            f"{bal_before[worst]:.4f}",
            f"{bal_after[worst]:.4f}",
        )
        table.add_row(
            "balancedness, min over layers",
            f"{bal_before[busy].min():.4f}",
            f"{bal_after[busy].min():.4f}",
        )
        if global_bal is not None:
            table.add_row(
                "balancedness, mean, global policy (no groups)",
                "",
                f"{global_bal[busy].mean():.4f}",
            )
        ratio_before = before.max(-1)[busy] / bound[busy]
        ratio_after = after.max(-1)[busy] / bound[busy]
        table.add_row(
            "max load / lower bound, mean",
            f"{ratio_before.mean():.3f}",
            f"{ratio_after.mean():.3f}",
        )
        table.add_row(
            "max load / lower bound, worst", f"{ratio_before.max():.3f}", f"{ratio_after.max():.3f}"
        )
    table.add_row("replicas sharing a GPU with their twin", "0", f"{int(colocated.sum())}")
    console.print(table)
    if global_bal is not None and busy.any():
        gap = global_bal[busy].mean() - bal_after[busy].mean()
        if gap >= _CAP_GAP:
            console.print(
                f"the hierarchy caps the balance: each node must hold "
                f"{problem.groups // problem.nodes} whole group(s) of "
                f"{num_experts // problem.groups} experts, so {problem.nodes} nodes cannot even "
                f"out the groups' loads; the global policy (--groups 1 --nodes 1, no node "
                f"locality) reaches {global_bal[busy].mean():.4f} on the same loads"
            )
    console.print(
        f"placement computed in {warm_ms:.2f} ms (eplb.production, CPU; "
        f"first call {first_ms:.2f} ms)"
    )

    if output:
        _write_maps(Path(output), phy2log, log2phy, logcnt)
        console.print(f"maps written to {output}")
    if plot:
        _plot(Path(plot), before, after, bal_before, bal_after, worst, problem)
        console.print(f"plot written to {plot}")
    return 0


# Balancedness the global policy must gain before the report says the hierarchy caps it.
_CAP_GAP = 0.01


def _global_balancedness(
    weight: np.ndarray, problem: _Problem, rebalance: Any
) -> np.ndarray | None:
    """Balancedness per layer [L] under the global policy, when the hierarchy constrains it.

    weight: [L, E] float64, the loads. None for one node (or the global
    policy already): there the hierarchy constrains nothing.
    """
    if problem.nodes == 1 or problem.groups % problem.nodes:
        return None
    import torch

    phy2log, _, logcnt = rebalance(torch.from_numpy(weight), problem.replicas, 1, 1, problem.gpus)
    return balancedness(gpu_loads(weight, phy2log.numpy(), logcnt.numpy(), problem.gpus))


def _write_maps(path: Path, phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray) -> None:
    """Write the three maps as JSON lists or a ``.pt`` dict of int64 tensors."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        maps = {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}
        path.write_text(json.dumps({k: v.tolist() for k, v in maps.items()}))
    elif suffix == ".pt":
        import torch

        tensors = {
            "phy2log": torch.from_numpy(phy2log),
            "log2phy": torch.from_numpy(log2phy),
            "logcnt": torch.from_numpy(logcnt),
        }
        torch.save(tensors, path)
    else:
        raise ValueError(f"--output must end in .json or .pt, got {str(path)!r}")


def _plot(
    path: Path,
    before: np.ndarray,
    after: np.ndarray,
    bal_before: np.ndarray,
    bal_after: np.ndarray,
    worst: int,
    problem: _Problem,
) -> None:
    """PNG: per-GPU load of the worst layer, and balancedness per layer."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or CI
    import matplotlib.pyplot as plt

    fig, (ax_gpu, ax_layer) = plt.subplots(1, 2, figsize=(13, 4.5))
    gpus = np.arange(problem.gpus)
    ax_gpu.bar(gpus - 0.2, before[worst], width=0.4, label="before (contiguous)")
    ax_gpu.bar(gpus + 0.2, after[worst], width=0.4, label="after (eplb)")
    ax_gpu.axhline(before[worst].mean(), color="gray", linestyle=":", label="mean")
    ax_gpu.set(
        title=f"GPU load, worst layer ({worst + problem.first_layer})",
        xlabel="GPU",
        ylabel="tokens",
    )
    ax_gpu.legend()
    layers = np.arange(len(bal_after)) + problem.first_layer
    ax_layer.plot(layers, bal_before, marker=".", label="before (contiguous)")
    ax_layer.plot(layers, bal_after, marker=".", label="after (eplb)")
    ax_layer.set(title="balancedness (mean / max GPU load)", xlabel="layer", ylabel="balancedness")
    ax_layer.set_ylim(0, 1.05)
    ax_layer.legend()
    fig.suptitle(problem.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
